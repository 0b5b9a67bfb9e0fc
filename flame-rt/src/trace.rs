//! The caller's trace context, carried with each call to the span the task runs in on the
//! runner.
//!
//! Every call runs on its runner inside a `flame.task` span with the task id, call id, pool and
//! runner, so a task's own log lines say where they come from. With the `opentelemetry` feature,
//! the caller's OpenTelemetry context (as `tracing-opentelemetry` keeps it on the caller's
//! current span) travels with the call in W3C form (trace id, span id, flags) and becomes the
//! remote parent of that span: an OpenTelemetry layer on both sides shows the runner's work as
//! a child of the caller's span, in the same trace.

use serde::{Deserialize, Serialize};

/// A W3C `traceparent`, in binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TraceParent {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    pub(crate) flags: u8,
}

/// The trace context of the caller's current span, if there is one to carry.
#[inline]
pub(crate) fn capture() -> Option<TraceParent> {
    #[cfg(feature = "opentelemetry")]
    {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let current = tracing::Span::current();
        if current.is_disabled() {
            return None;
        }
        let cx = current.context();
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            return Some(TraceParent {
                trace_id: sc.trace_id().to_bytes(),
                span_id: sc.span_id().to_bytes(),
                flags: sc.trace_flags().to_u8(),
            });
        }
    }
    None
}

/// The span a call runs in on its runner, child of the caller's span when its context came
/// along.
pub(crate) fn task_span(
    task: &'static str,
    call: u64,
    pool: &str,
    runner: &str,
    parent: Option<TraceParent>,
) -> tracing::Span {
    let span = tracing::info_span!("flame.task", task, call, pool, runner);
    #[cfg(feature = "opentelemetry")]
    if let Some(parent) = parent
        && !span.is_disabled()
    {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.span_id),
            TraceFlags::new(parent.flags),
            true,
            TraceState::default(),
        );
        // Fails only if the span was entered already; it was just made.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    #[cfg(not(feature = "opentelemetry"))]
    let _ = parent;
    span
}
