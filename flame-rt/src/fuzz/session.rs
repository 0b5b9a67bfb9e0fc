//! A runner that holds the right token, then says anything: drives the parent's listener (with
//! a stranger's bytes first), its per-connection loop and the channels' reassembly, and checks
//! what must hold whatever a runner says.

use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::backend::{Backend, BootSpec, RunnerHandle};
use crate::error::{Error, ErrorKind};
use crate::pool::Pool;

/// The longest the session's calls may take once the runner's connection has ended: they are
/// resolved at once then, or after the pool's failed boots of a replacement (a few hundred ms).
const RESOLVED_WITHIN: Duration = Duration::from_secs(20);

/// Runs sessions on a runtime of its own, one pool each.
pub struct Session {
    runtime: tokio::runtime::Runtime,
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Session {
    /// A runtime for sessions.
    pub fn new() -> Session {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a Tokio runtime");
        Session { runtime }
    }

    /// Starts a one-runner pool, runs `calls` on it (it starts calls and awaits them), and plays
    /// its runner: while the runner boots, a stranger sends `stranger`; then the runner dials
    /// back with the right token, sends the frames of [`impostor::script`](super::impostor::script)
    /// `(script)`, and hangs up.
    ///
    /// # Panics
    /// When what must hold whatever a runner says does not: the stranger cost the runner its
    /// welcome, a call was not resolved, or a slot was not given back.
    pub fn run<F>(&self, stranger: &[u8], script: &[u8], calls: impl FnOnce(Pool) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let frames = super::impostor::script(script);
        self.runtime.block_on(async {
            let (booted, mut boots) = mpsc::unbounded_channel();
            let pool = Pool::builder("fuzz")
                .backend(Scripted { booted })
                .max(1)
                .start()
                .await
                .expect("the pool starts");
            let callers = tokio::spawn(calls(pool.clone()));
            let (addr, runner_id, token) = boots.recv().await.expect("the pool boots a runner");
            boots.close();

            if !stranger.is_empty()
                && let Ok(mut peer) = tokio::net::TcpStream::connect(&addr).await
            {
                let _ = peer.write_all(stranger).await;
            }
            let runner = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("the listener");
            let (mut from_parent, mut to_parent) = runner.into_split();
            to_parent
                .write_all(&super::impostor::hello(&runner_id, token))
                .await
                .expect("the hello is sent");
            let mut len = [0; 4];
            from_parent.read_exact(&mut len).await.expect("an answer");
            let mut welcome = vec![0; u32::from_be_bytes(len) as usize];
            from_parent
                .read_exact(&mut welcome)
                .await
                .expect("an answer");
            assert_eq!(
                super::impostor::describe(&welcome),
                "welcome",
                "a stranger's bytes cost the runner its welcome"
            );
            // What the parent sends is read and dropped, so its writes never wait on us.
            let drain = tokio::spawn(async move {
                let mut sink = vec![0; 64 << 10];
                while from_parent.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            });
            let _ = to_parent.write_all(&frames).await;
            drop(to_parent);

            match tokio::time::timeout(RESOLVED_WITHIN, callers).await {
                Ok(Ok(())) => {}
                Ok(Err(panicked)) => std::panic::resume_unwind(panicked.into_panic()),
                Err(_) => {
                    panic!(
                        "a call was not resolved {RESOLVED_WITHIN:?} after its runner hung up \
                         ({:?})",
                        pool.stats()
                    )
                }
            }
            let given_back = async {
                while pool.stats().in_flight > 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            if tokio::time::timeout(RESOLVED_WITHIN, given_back)
                .await
                .is_err()
            {
                panic!("slots still taken: {:?}", pool.stats());
            }
            pool.shutdown().await;
            drain.abort();
        });
    }
}

/// Hands the session its one runner's boot; later boots fail at once.
struct Scripted {
    booted: mpsc::UnboundedSender<(String, String, [u8; 16])>,
}

struct Played;

impl RunnerHandle for Played {
    fn describe(&self) -> String {
        "a runner played by the fuzz session".into()
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        futures::future::pending().boxed()
    }

    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()> {
        futures::future::ready(()).boxed()
    }
}

impl Backend for Scripted {
    fn name(&self) -> &str {
        "fuzz"
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, Error>> {
        let handoff = &spec.handoff;
        let first = self
            .booted
            .send((
                handoff.addr.clone(),
                handoff.runner_id.clone(),
                handoff.token,
            ))
            .is_ok();
        let booted: Result<Box<dyn RunnerHandle>, Error> = match first {
            true => Ok(Box::new(Played)),
            false => Err(Error::new(
                ErrorKind::BootFailed,
                "a fuzz session boots one runner",
            )),
        };
        futures::future::ready(booted).boxed()
    }
}
