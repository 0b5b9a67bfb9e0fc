//! The parent's listener: runners dial the parent (never the other way round). One listener per
//! bind address serves every pool of the process; it checks each runner's `Hello` — in plaintext,
//! or inside TLS for a TLS pool — and hands the connection to the pool that booted that runner.
//!
//! Anyone who can reach the listener can connect, and runner ids are predictable, so nothing a
//! peer sends changes any state a booting runner depends on until it has proven the runner's
//! one-time token: a stranger's hello is dropped without an answer (it learns nothing, not even
//! whether the id exists) and the boot goes on waiting for its runner. Only a peer holding the
//! token is told why it is refused (another release, another build). Connections that have not
//! proven themselves are capped; the oldest is cut off when a new one arrives at the cap, since
//! a real runner sends its hello the moment it connects.
//!
//! It runs on the protocol's own runtime (`io_runtime`), so it outlives any one app runtime and
//! keeps accepting runners while the app's workers are busy.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind};
use crate::protocol::handshake;
use crate::protocol::{self, BoxRead, BoxWrite, Hello, ToParent};
use crate::task::{Registry, manifest_diff, registry};

/// How long a fresh connection may take to prove itself (hello, and TLS for a TLS pool): a
/// runner does it at once, so a peer that dribbles bytes (slowloris) is cut off early.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Unproven connections allowed whatever is booting, plus this many per runner booting, up to
/// the ceiling. A real runner proves itself within milliseconds, so a small allowance suffices.
const UNPROVEN_BASE: usize = 128;
const UNPROVEN_PER_BOOT: usize = 16;
const UNPROVEN_CEILING: usize = 512;

/// Connections the kernel may queue before `accept`: Linux's default of 128 overflows under a
/// flood, and a runner whose SYN is dropped waits a second to try again.
const BACKLOG: u32 = 1024;

/// How often at most the listener logs what it dropped.
const DROP_LOG_EVERY: Duration = Duration::from_secs(1);

/// What a boot's error may say about refused peers that claimed its runner id.
const NOTES_KEPT: usize = 3;

pub(crate) struct Listener {
    addr: SocketAddr,
    expected: Mutex<HashMap<String, Expected>>,
    /// Connections that have not proven a token yet, oldest first.
    unproven: Mutex<Unproven>,
    drops: Mutex<Drops>,
}

struct Expected {
    token: [u8; 16],
    tls: bool,
    accepted: oneshot::Sender<Result<Halves, Error>>,
    /// Peers that claimed this runner id and were dropped, for the boot's error if it fails.
    notes: Vec<String>,
    refused_peers: u32,
}

/// A runner connection that passed the handshake, ready for its pool's `Welcome`.
pub(crate) type Halves = (BoxRead, BoxWrite);

#[derive(Default)]
struct Unproven {
    next_id: u64,
    open: VecDeque<(u64, CancellationToken)>,
}

/// Why a connection was dropped before proving itself, counted for the rate-limited log.
#[derive(Clone, Copy)]
enum Dropped {
    Closed,
    Silent,
    Unreadable,
    UnknownRunner,
    WrongToken,
    TlsFailed,
    Evicted,
}

const DROP_KINDS: [(Dropped, &str); 7] = [
    (Dropped::Closed, "closed before a hello"),
    (Dropped::Silent, "sent no hello in time"),
    (Dropped::Unreadable, "sent something other than a hello"),
    (Dropped::UnknownRunner, "named no runner being booted"),
    (Dropped::WrongToken, "presented a wrong token"),
    (Dropped::TlsFailed, "failed the TLS handshake"),
    (
        Dropped::Evicted,
        "were cut off to make room (too many unproven connections)",
    ),
];

#[derive(Default)]
struct Drops {
    since_log: [u64; DROP_KINDS.len()],
    total: u64,
    log_scheduled: bool,
}

/// The listener bound to `bind`, started on first use.
pub(crate) fn listener_for(bind: SocketAddr) -> Result<Arc<Listener>, Error> {
    static LISTENERS: Mutex<Vec<(SocketAddr, Arc<Listener>)>> = Mutex::new(Vec::new());
    let mut all = LISTENERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, l)) = all.iter().find(|(b, _)| *b == bind) {
        return Ok(l.clone());
    }
    let socket = match bind {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    };
    // Registered with the protocol's runtime, which serves it.
    let tcp_listener = {
        let _io = crate::io_runtime::handle().enter();
        socket
            .and_then(|socket| {
                socket.set_reuseaddr(true)?;
                socket.bind(bind)?;
                socket.listen(BACKLOG)
            })
            .map_err(|e| Error::io(&format!("binding the runner listener on {bind}"), e))?
    };
    let listener = Arc::new(Listener {
        addr: tcp_listener
            .local_addr()
            .map_err(|e| Error::io("reading the runner listener's address", e))?,
        expected: Mutex::new(HashMap::new()),
        unproven: Mutex::new(Unproven::default()),
        drops: Mutex::new(Drops::default()),
    });
    crate::io_runtime::spawn(listener.clone().accept_loop(tcp_listener));
    all.push((bind, listener.clone()));
    Ok(listener)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        lock(&self.expected).insert(
            runner_id.to_string(),
            Expected {
                token,
                tls,
                accepted: tx,
                notes: Vec::new(),
                refused_peers: 0,
            },
        );
        Expectation {
            listener: self.clone(),
            runner_id: runner_id.to_string(),
            accepted: rx,
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _peer)) => {
                    let cut_off = self.admit();
                    tokio::spawn(self.clone().handshake(stream, cut_off));
                    // Let it read a hello that is already here before accepting the next peer:
                    // under a flood, a real runner is proven long before it could be cut off.
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "flame: accepting a runner connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Counts a new unproven connection, cutting off the oldest one at the cap. Returns the new
    /// connection's id and the token that cuts it off in turn.
    fn admit(&self) -> (u64, CancellationToken) {
        let booting = lock(&self.expected).len();
        let cap = (UNPROVEN_BASE + UNPROVEN_PER_BOOT * booting).min(UNPROVEN_CEILING);
        let mut unproven = lock(&self.unproven);
        while unproven.open.len() >= cap {
            if let Some((_, oldest)) = unproven.open.pop_front() {
                oldest.cancel();
            }
        }
        unproven.next_id += 1;
        let entry = (unproven.next_id, CancellationToken::new());
        unproven.open.push_back(entry.clone());
        entry
    }

    fn proven_or_gone(&self, id: u64) {
        let mut unproven = lock(&self.unproven);
        if let Some(at) = unproven.open.iter().position(|(i, _)| *i == id) {
            unproven.open.remove(at);
        }
    }

    async fn handshake(
        self: Arc<Self>,
        stream: TcpStream,
        (id, cut_off): (u64, CancellationToken),
    ) {
        let _ = stream.set_nodelay(true);
        let proving = tokio::time::timeout(HELLO_TIMEOUT, self.prove(stream));
        let outcome = tokio::select! {
            outcome = proving => outcome.unwrap_or(Err(Dropped::Silent)),
            () = cut_off.cancelled() => Err(Dropped::Evicted),
        };
        self.proven_or_gone(id);
        match outcome {
            Ok(Some((hello, tls, halves))) => self.admit_runner(hello, tls, halves).await,
            Ok(None) => self.dropped(Dropped::Closed),
            Err(why) => self.dropped(why),
        }
    }

    /// Reads the peer's hello, inside TLS if it asks for TLS for a runner booting in a TLS pool.
    /// `Ok(None)`: it closed before its hello.
    async fn prove(&self, mut stream: TcpStream) -> Result<Option<(Hello, bool, Halves)>, Dropped> {
        // Nothing but one small frame is read before the peer has proven who it is.
        let first = match read_hello_frame(&mut stream).await? {
            Some(first) => first,
            None => return Ok(None),
        };
        match first {
            ToParent::Hello(hello) => {
                let (reader, writer) = stream.into_split();
                Ok(Some((hello, false, (Box::new(reader), Box::new(writer)))))
            }
            ToParent::StartTls { runner_id } => {
                let tls_pool = lock(&self.expected).get(&runner_id).map(|e| e.tls);
                match tls_pool {
                    Some(true) => self.prove_tls(stream, &runner_id).await.map(Some),
                    // A runner of a plaintext pool never asks for TLS.
                    Some(false) | None => Err(Dropped::UnknownRunner),
                }
            }
            _ => Err(Dropped::Unreadable),
        }
    }

    #[cfg(feature = "tls")]
    async fn prove_tls(
        &self,
        stream: TcpStream,
        runner_id: &str,
    ) -> Result<(Hello, bool, Halves), Dropped> {
        let acceptor = match crate::protocol::tls::parent_tls() {
            Ok(tls) => tls.acceptor.clone(),
            Err(e) => {
                self.note(runner_id, format!("the parent's TLS identity failed: {e}"));
                return Err(Dropped::TlsFailed);
            }
        };
        let stream = match acceptor.accept(stream).await {
            Ok(stream) => stream,
            Err(e) => {
                self.note(
                    runner_id,
                    format!("a peer claiming to be it failed the TLS handshake: {e}"),
                );
                return Err(Dropped::TlsFailed);
            }
        };
        let (mut reader, writer) = tokio::io::split(stream);
        match read_hello_frame(&mut reader).await? {
            Some(ToParent::Hello(hello)) => Ok((hello, true, (Box::new(reader), Box::new(writer)))),
            _ => Err(Dropped::Unreadable),
        }
    }

    #[cfg(not(feature = "tls"))]
    async fn prove_tls(
        &self,
        _stream: TcpStream,
        _runner_id: &str,
    ) -> Result<(Hello, bool, Halves), Dropped> {
        // A pool can't ask for TLS without the feature, so no expected runner is a TLS one.
        Err(Dropped::UnknownRunner)
    }

    /// Hands a runner that proved its token to its pool, or tells it why it is refused.
    async fn admit_runner(self: &Arc<Self>, hello: Hello, tls: bool, (reader, mut writer): Halves) {
        let expected = {
            let mut table = lock(&self.expected);
            let Some(expected) = table.get_mut(&hello.runner_id) else {
                drop(table);
                return self.dropped(Dropped::UnknownRunner);
            };
            if !handshake::token_matches(&hello, &expected.token) {
                drop(table);
                self.note(
                    &hello.runner_id,
                    "a peer claiming to be it presented a wrong token".into(),
                );
                return self.dropped(Dropped::WrongToken);
            }
            table
                .remove(&hello.runner_id)
                .expect("looked up under the same lock")
        };
        // The token checks out: from here on the peer is our runner, and is told what is wrong.
        let verdict = if expected.tls && !tls {
            Err("this pool requires TLS and the runner spoke plaintext: a runner built without the \
                 `tls` feature, or someone in between stripping it"
                .to_string())
        } else {
            verify(&hello)
        };
        if let Err(reason) = verdict {
            handshake::refuse(&mut writer, &reason).await;
            let _ = expected
                .accepted
                .send(Err(Error::new(ErrorKind::Rejected, reason)));
            return;
        }
        let _ = expected.accepted.send(Ok((reader, writer)));
    }

    fn note(&self, runner_id: &str, note: String) {
        if let Some(expected) = lock(&self.expected).get_mut(runner_id) {
            expected.refused_peers += 1;
            if expected.notes.len() < NOTES_KEPT {
                expected.notes.push(note);
            }
        }
    }

    /// Counts a dropped connection. What was dropped is logged at most once a second, as
    /// counts by reason, so a flood can't flood the log, nor make it carry what a stranger wrote.
    fn dropped(self: &Arc<Self>, why: Dropped) {
        let mut drops = lock(&self.drops);
        drops.since_log[why as usize] += 1;
        drops.total += 1;
        if std::mem::replace(&mut drops.log_scheduled, true) {
            return;
        }
        drop(drops);
        let this = self.clone();
        crate::io_runtime::spawn(async move {
            tokio::time::sleep(DROP_LOG_EVERY).await;
            let (counts, total) = {
                let mut drops = lock(&this.drops);
                drops.log_scheduled = false;
                (std::mem::take(&mut drops.since_log), drops.total)
            };
            let what = DROP_KINDS
                .iter()
                .filter(|(kind, _)| counts[*kind as usize] > 0)
                .map(|(kind, why)| format!("{} {why}", counts[*kind as usize]))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                addr = %this.addr,
                total,
                what,
                "flame: dropped connections that did not prove to be runners of this parent"
            );
        });
    }
}

/// Reads the first frame a peer sends, allocating only as its bytes arrive.
async fn read_hello_frame<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<ToParent>, Dropped> {
    match protocol::read_one_frame(io, protocol::MAX_HELLO_FRAME).await {
        Ok(Some(frame)) => protocol::decode::<ToParent>(&frame)
            .map(Some)
            .map_err(|_| Dropped::Unreadable),
        Ok(None) => Ok(None),
        Err(_) => Err(Dropped::Unreadable),
    }
}

/// A pending boot's claim on its runner's connection. Dropping it (boot abandoned) forgets the
/// runner id, so a late dial-back is dropped as unknown.
pub(crate) struct Expectation {
    listener: Arc<Listener>,
    runner_id: String,
    accepted: oneshot::Receiver<Result<Halves, Error>>,
}

impl Expectation {
    pub(crate) async fn accepted(&mut self) -> Result<Halves, Error> {
        (&mut self.accepted).await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::BootFailed,
                "the runner listener stopped",
            ))
        })
    }

    /// What the listener refused from peers claiming this runner's id, to explain a boot that
    /// then failed: `None` if nobody claimed it. A refusal makes the failure `Rejected`: the
    /// runner itself most likely failed to prove itself, which no retry fixes.
    pub(crate) fn refused_claims(&self) -> Option<String> {
        let table = lock(&self.listener.expected);
        let expected = table.get(&self.runner_id)?;
        (expected.refused_peers > 0).then(|| {
            let more = expected.refused_peers as usize - expected.notes.len();
            let mut text = expected.notes.join("; ");
            if more > 0 {
                text.push_str(&format!(" (and {more} more)"));
            }
            text
        })
    }
}

impl Drop for Expectation {
    fn drop(&mut self) {
        lock(&self.listener.expected).remove(&self.runner_id);
    }
}

/// Why the parent refuses a runner that proved its token: another protocol version, or another
/// build's tasks.
pub(crate) fn check(hello: &Hello, registry: &Registry) -> Result<(), String> {
    if hello.protocol != protocol::PROTOCOL_VERSION {
        return Err(handshake::version_mismatch(hello.protocol));
    }
    if hello.manifest_hash != registry.manifest_hash {
        return Err(format!(
            "task manifest mismatch ({}); the runner runs a different build of the app: deploy the \
             same build as the parent",
            manifest_diff(&registry.manifest, &hello.manifest)
        ));
    }
    Ok(())
}

/// Everything the parent checks on a hello that proved its token: protocol and task manifest.
/// A different build with the same tasks is allowed (and logged).
pub(crate) fn verify(hello: &Hello) -> Result<(), String> {
    let registry = registry().map_err(|e| e.to_string())?;
    check(hello, registry)?;
    if hello.fingerprint != handshake::fingerprint() {
        tracing::debug!(
            runner = %hello.runner_id,
            runner_build = %hello.fingerprint,
            parent_build = %handshake::fingerprint(),
            "flame: runner is a different build with the same tasks"
        );
    }
    Ok(())
}
