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

use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::error::{Error, ErrorKind};
use crate::handshake;
use crate::wire::{self, ToParent};

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
    tls: bool,
    accepted: oneshot::Sender<Result<Accepted, Error>>,
}

/// The connection of a runner the listener routed to its pool.
pub(crate) enum Accepted {
    /// It passed the handshake in plaintext; the pool sends the `Welcome`.
    Plain(std::net::TcpStream),
    /// It asked for TLS: the pool does the TLS handshake and checks the hello inside it.
    Tls(std::net::TcpStream),
}

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
    pub(crate) fn expect(
        self: &Arc<Self>,
        runner_id: &str,
        token: [u8; 16],
        tls: bool,
    ) -> Expectation {
        let (tx, rx) = oneshot::channel();
        self.expected.lock().unwrap().insert(
            runner_id.to_string(),
            Expected {
                token,
                tls,
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
        // Nothing but one small frame is read before the peer has proven who it is.
        let read_first = async {
            match wire::read_one_frame(&mut stream, wire::MAX_HELLO_FRAME).await {
                Ok(Some(frame)) => Some(wire::decode::<ToParent>(&frame)),
                Ok(None) => None,
                Err(e) => Some(Err(Error::io("reading a frame", e))),
            }
        };
        let first = match tokio::time::timeout(HELLO_TIMEOUT, read_first).await {
            Ok(Some(Ok(first @ (ToParent::Hello(_) | ToParent::StartTls { .. })))) => first,
            outcome => {
                let why = match outcome {
                    Err(_) => "sent no hello in time".to_string(),
                    Ok(None) => "closed the connection before its hello".to_string(),
                    Ok(Some(Ok(other))) => {
                        format!("sent {} before its hello", message_name(&other))
                    }
                    Ok(Some(Err(e))) => format!("sent an unreadable frame ({e})"),
                };
                self.dropped(peer, &why);
                return;
            }
        };
        let hello = match first {
            ToParent::Hello(hello) => hello,
            ToParent::StartTls { runner_id } => return self.route_tls(stream, peer, &runner_id),
            _ => unreachable!("matched above"),
        };
        // The version first: a runner of another release may not even mean the same by its id.
        if hello.protocol != wire::PROTOCOL_VERSION {
            let reason = handshake::version_mismatch(hello.protocol);
            handshake::refuse(&mut stream, &reason).await;
            if let Some(expected) = self.take(&hello.runner_id) {
                let _ = expected
                    .accepted
                    .send(Err(Error::new(ErrorKind::Rejected, reason)));
            }
            return;
        }
        let Some(expected) = self.take(&hello.runner_id) else {
            let reason = format!(
                "unknown runner id {:?}: this parent did not boot it, or gave up on it (a runner left \
                 over from an earlier parent?)",
                hello.runner_id
            );
            handshake::refuse(&mut stream, &reason).await;
            return;
        };
        let verdict = if expected.tls {
            Err("this pool requires TLS and the runner spoke plaintext: a runner built without the \
                 `tls` feature, or someone in between stripping it"
                .to_string())
        } else {
            handshake::verify(&hello, &expected.token)
        };
        if let Err(reason) = verdict {
            handshake::refuse(&mut stream, &reason).await;
            let _ = expected
                .accepted
                .send(Err(Error::new(ErrorKind::Rejected, reason)));
            return;
        }
        let accepted = stream
            .into_std()
            .map(Accepted::Plain)
            .map_err(|e| Error::io("handing over a runner connection", e));
        let _ = expected.accepted.send(accepted);
    }

    /// A runner of a TLS pool named itself: its pool does the TLS handshake and checks its
    /// hello inside it.
    fn route_tls(&self, stream: TcpStream, peer: SocketAddr, runner_id: &str) {
        let Some(expected) = self.take(runner_id) else {
            return self.dropped(
                peer,
                &format!("asked for TLS as unknown runner {runner_id:?}"),
            );
        };
        if !expected.tls {
            let reason = format!("runner {runner_id} asked for TLS, which its pool does not use");
            self.dropped(peer, &reason);
            let _ = expected
                .accepted
                .send(Err(Error::new(ErrorKind::Rejected, reason)));
            return;
        }
        let accepted = stream
            .into_std()
            .map(Accepted::Tls)
            .map_err(|e| Error::io("handing over a runner connection", e));
        let _ = expected.accepted.send(accepted);
    }

    fn take(&self, runner_id: &str) -> Option<Expected> {
        self.expected.lock().unwrap().remove(runner_id)
    }

    fn dropped(&self, peer: SocketAddr, why: &str) {
        let dropped = self.unauthenticated.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(%peer, dropped, "flame: dropped a connection that {why}");
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
        ToParent::StartTls { .. } => "a TLS request",
        ToParent::Chan(_) => "channel traffic",
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
