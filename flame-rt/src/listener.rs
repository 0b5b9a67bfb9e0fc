//! The parent's listener: runners dial the parent (never the other way round). One listener per
//! bind address serves every pool of the process; it checks each runner's `Hello` and hands the
//! connection to the pool that booted that runner.
//!
//! It runs on a thread of its own, so it outlives any one Tokio runtime: tests (and apps) may
//! start pools on many runtimes, one after another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::SinkExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::codec::FramedWrite;

use crate::error::{Error, ErrorKind};
use crate::handshake;
use crate::task::registry;
use crate::wire::{self, Reader, ToParent, ToRunner};

/// How long a fresh connection may take to send its `Hello`: a runner sends it at once, so a
/// peer that dribbles bytes (slowloris) is cut off early.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Listener {
    addr: SocketAddr,
    expected: Mutex<HashMap<String, Expected>>,
    /// Connections dropped before a valid hello, for the logs.
    unauthenticated: AtomicU64,
}

struct Expected {
    token: [u8; 16],
    accepted: oneshot::Sender<Result<Accepted, Error>>,
}

/// The connection of a runner that passed the handshake. The pool sends the `Welcome`.
pub(crate) type Accepted = std::net::TcpStream;

/// The listener bound to `bind`, started on first use.
pub(crate) fn listener_for(bind: SocketAddr) -> Result<Arc<Listener>, Error> {
    static LISTENERS: Mutex<Vec<(SocketAddr, Arc<Listener>)>> = Mutex::new(Vec::new());
    let mut all = LISTENERS.lock().unwrap();
    if let Some((_, l)) = all.iter().find(|(b, _)| *b == bind) {
        return Ok(l.clone());
    }
    let std_listener = std::net::TcpListener::bind(bind)
        .map_err(|e| Error::io(&format!("binding the runner listener on {bind}"), e))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("configuring the runner listener", e))?;
    let listener = Arc::new(Listener {
        addr: std_listener
            .local_addr()
            .map_err(|e| Error::io("reading the runner listener's address", e))?,
        expected: Mutex::new(HashMap::new()),
        unauthenticated: AtomicU64::new(0),
    });
    let accepting = listener.clone();
    std::thread::Builder::new()
        .name("flame-listener".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building the flame listener's runtime");
            rt.block_on(accepting.accept_loop(std_listener));
        })
        .map_err(|e| Error::io("starting the listener thread", e))?;
    all.push((bind, listener.clone()));
    Ok(listener)
}

impl Listener {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Registers a runner about to boot; the receiver gets its connection once it has passed
    /// the handshake, or the reason it was refused.
    pub(crate) fn expect(self: &Arc<Self>, runner_id: &str, token: [u8; 16]) -> Expectation {
        let (tx, rx) = oneshot::channel();
        self.expected.lock().unwrap().insert(
            runner_id.to_string(),
            Expected {
                token,
                accepted: tx,
            },
        );
        Expectation {
            listener: self.clone(),
            runner_id: runner_id.to_string(),
            accepted: rx,
        }
    }

    async fn accept_loop(self: Arc<Self>, std_listener: std::net::TcpListener) {
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "flame: cannot listen for runners");
                return;
            }
        };
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(self.clone().handshake(stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "flame: accepting a runner connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handshake(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        // Nothing but a small hello is read before the peer has proven who it is.
        let mut reader = Reader::with_max_frame(&mut stream, wire::MAX_HELLO_FRAME);
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next::<ToParent>()).await {
            Ok(Some(Ok(ToParent::Hello(hello)))) => hello,
            outcome => {
                let why = match outcome {
                    Err(_) => "sent no hello in time".to_string(),
                    Ok(None) => "closed the connection before its hello".to_string(),
                    Ok(Some(Ok(other))) => {
                        format!("sent {} before its hello", message_name(&other))
                    }
                    Ok(Some(Err(e))) => format!("sent an unreadable frame ({e})"),
                };
                let refused = self.unauthenticated.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(%peer, refused, "flame: dropped a connection that {why}");
                return;
            }
        };
        drop(reader);
        // The version first: a runner of another release may not even mean the same by its id.
        if hello.protocol != wire::PROTOCOL_VERSION {
            let reason = handshake::version_mismatch(hello.protocol);
            refuse(&mut stream, &reason).await;
            if let Some(expected) = self.expected.lock().unwrap().remove(&hello.runner_id) {
                let _ = expected
                    .accepted
                    .send(Err(Error::new(ErrorKind::Rejected, reason)));
            }
            return;
        }
        let expected = self.expected.lock().unwrap().remove(&hello.runner_id);
        let Some(expected) = expected else {
            let reason = format!(
                "unknown runner id {:?}: this parent did not boot it, or gave up on it (a runner left \
                 over from an earlier parent?)",
                hello.runner_id
            );
            refuse(&mut stream, &reason).await;
            return;
        };
        let verdict = match registry() {
            Ok(reg) => handshake::check(&hello, &expected.token, reg),
            Err(e) => Err(e.to_string()),
        };
        if let Err(reason) = verdict {
            refuse(&mut stream, &reason).await;
            let _ = expected
                .accepted
                .send(Err(Error::new(ErrorKind::Rejected, reason)));
            return;
        }
        if hello.fingerprint != handshake::fingerprint() {
            tracing::debug!(
                runner = %hello.runner_id,
                runner_build = %hello.fingerprint,
                parent_build = %handshake::fingerprint(),
                "flame: runner is a different build with the same tasks"
            );
        }
        let accepted = stream
            .into_std()
            .map_err(|e| Error::io("handing over a runner connection", e));
        let _ = expected.accepted.send(accepted);
    }
}

fn message_name(msg: &ToParent) -> &'static str {
    match msg {
        ToParent::Hello(_) => "a hello",
        ToParent::Done { .. } => "a result",
        ToParent::Cancelled { .. } => "a cancel acknowledgement",
        ToParent::Heartbeat => "a heartbeat",
        ToParent::Idle { .. } => "an idle notice",
        ToParent::BootFailed { .. } => "a boot failure",
    }
}

async fn refuse(stream: &mut TcpStream, reason: &str) {
    tracing::warn!(%reason, "flame: refused a runner");
    if let Ok(frame) = wire::encode(&ToRunner::Refused {
        reason: reason.to_string(),
    }) {
        let mut sink = FramedWrite::new(stream, wire::codec());
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(frame)).await;
    }
}

/// A pending boot's claim on its runner's connection. Dropping it (boot abandoned) forgets the
/// runner id, so a late dial-back is refused as unknown.
pub(crate) struct Expectation {
    listener: Arc<Listener>,
    runner_id: String,
    accepted: oneshot::Receiver<Result<Accepted, Error>>,
}

impl Expectation {
    pub(crate) async fn accepted(&mut self) -> Result<Accepted, Error> {
        (&mut self.accepted).await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::BootFailed,
                "the runner listener stopped",
            ))
        })
    }
}

impl Drop for Expectation {
    fn drop(&mut self) {
        self.listener
            .expected
            .lock()
            .unwrap()
            .remove(&self.runner_id);
    }
}
