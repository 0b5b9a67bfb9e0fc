//! Tracing support for `tests/observability.rs`: an OpenTelemetry layer (ids only, nothing is
//! exported) for parent and runners, a layer that records events, and a task that reports the
//! trace it runs in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tracing::field::{Field, Visit};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// A subscriber with an OpenTelemetry layer (an SDK tracer without exporter: spans get real
/// trace and span ids), and `recorder` if given.
pub fn otel_subscriber(recorder: Option<Recorder>) -> impl tracing::Subscriber + Send + Sync {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("flame-tests")))
        .with(recorder)
}

/// The trace id of the current span, if it has one.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The trace id of the span this task runs in on its runner, and that span's name.
#[flame::task]
pub async fn trace_here() -> (Option<String>, Option<String>) {
    let name = tracing::Span::current()
        .metadata()
        .map(|m| m.name().to_string());
    (current_trace_id(), name)
}

/// One recorded event: its message and its other fields, formatted.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The event's message.
    pub message: String,
    /// Its other fields, formatted with `Debug` (strings as they are).
    pub fields: HashMap<String, String>,
}

/// Records every event, and wakes those waiting for one.
#[derive(Clone, Default)]
pub struct Recorder {
    events: Arc<Mutex<Vec<Recorded>>>,
    added: Arc<tokio::sync::Notify>,
}

impl Recorder {
    /// How many events with this message were recorded.
    pub fn count(&self, message: &str) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.message == message)
            .count()
    }

    /// Waits (up to `bound`) for an event whose message is `message`, and returns it.
    pub async fn wait_for(&self, message: &str, bound: Duration) -> Recorded {
        self.wait_for_where(message, |_| true, bound).await
    }

    /// Waits (up to `bound`) for an event whose message is `message` and that `matches`.
    pub async fn wait_for_where(
        &self,
        message: &str,
        matches: impl Fn(&Recorded) -> bool,
        bound: Duration,
    ) -> Recorded {
        let until = tokio::time::Instant::now() + bound;
        loop {
            let added = self.added.notified();
            if let Some(found) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|e| e.message == message && matches(e))
            {
                return found.clone();
            }
            if tokio::time::timeout_at(until, added).await.is_err() {
                let seen: Vec<String> = self
                    .events
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|e| e.message.clone())
                    .collect();
                panic!("no event {message:?} within {bound:?}; saw {seen:?}");
            }
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: HashMap<String, String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            name => {
                self.fields.insert(name.to_string(), format!("{value:?}"));
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            name => {
                self.fields.insert(name.to_string(), value.to_string());
            }
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.events.lock().unwrap().push(Recorded {
            message: fields.message,
            fields: fields.fields,
        });
        self.added.notify_waiters();
    }
}
