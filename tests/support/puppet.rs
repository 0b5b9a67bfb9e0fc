//! A backend whose runners the test plays: it boots nothing and hands the test what a runner
//! gets (where the parent listens, the runner id, the hand-off), so the test can be a stranger
//! without the token, or a runner with the token that breaks the rules.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flame::{Backend, BootSpec, Pool, ProcessBackend, RunnerHandle};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Boots nothing: records the boot's hand-off and where the parent listens; its runner never
/// exits by itself.
#[derive(Clone, Default)]
pub struct Puppet {
    /// `(parent address, runner id, hand-off)` of the boot in progress.
    booting: Arc<Mutex<Option<(String, String, String)>>>,
    booted: Arc<tokio::sync::Notify>,
    /// Boots a real runner after this long, if set.
    then_boot: Option<(ProcessBackend, Duration)>,
}

struct Puppeteered;

impl RunnerHandle for Puppeteered {
    fn describe(&self) -> String {
        "a runner played by the test".into()
    }
    fn exited(&mut self) -> BoxFuture<'_, String> {
        Box::pin(std::future::pending())
    }
    fn destroy(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

impl Backend for Puppet {
    fn name(&self) -> &str {
        "puppet"
    }

    fn boot(
        &self,
        spec: BootSpec,
    ) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, flame::Error>> {
        *self.booting.lock().unwrap() = Some((
            spec.parent_addr().to_string(),
            spec.runner_id().to_string(),
            spec.handoff_env().1.to_string(),
        ));
        self.booted.notify_one();
        match &self.then_boot {
            Some((backend, after)) => {
                let (boot, after) = (backend.boot(spec), *after);
                Box::pin(async move {
                    tokio::time::sleep(after).await;
                    boot.await
                })
            }
            None => Box::pin(async { Ok(Box::new(Puppeteered) as Box<dyn RunnerHandle>) }),
        }
    }
}

impl Puppet {
    /// A puppet whose boots start a real runner with `backend` after `after`: the test plays
    /// a stranger meanwhile.
    pub fn then_boot(backend: ProcessBackend, after: Duration) -> Puppet {
        Puppet {
            then_boot: Some((backend, after)),
            ..Puppet::default()
        }
    }

    /// A one-runner pool on this backend.
    pub async fn pool(&self, name: &str) -> Pool {
        self.builder(name).start().await.unwrap()
    }

    /// The builder of a one-runner pool on this backend, for more settings.
    pub fn builder(&self, name: &str) -> flame::PoolBuilder {
        Pool::builder(name).backend(self.clone()).max(1)
    }

    /// Waits for a boot: `(parent address, runner id, hand-off)`.
    pub async fn booting(&self) -> (String, String, String) {
        self.booted.notified().await;
        self.booting.lock().unwrap().clone().unwrap()
    }

    /// Waits for a boot and dials back as its runner, with the right token: the parent
    /// welcomes it. From there the test speaks for the runner.
    pub async fn impostor(&self) -> Impostor {
        let mut impostor = Impostor {
            stream: self.say_hello().await,
        };
        assert_eq!(impostor.next().await.as_deref(), Some("welcome"));
        impostor
    }

    /// Waits for a boot, dials back as its runner with the right token, and hangs up right
    /// after its hello, before the parent's welcome.
    pub async fn hang_up_after_hello(&self) {
        drop(self.say_hello().await);
    }

    async fn say_hello(&self) -> tokio::net::TcpStream {
        let (addr, runner_id, handoff) = self.booting().await;
        let token = unhex(crate::field(&handoff, "token").unwrap());
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(&flame::__private::fuzz::impostor::hello(&runner_id, token))
            .await
            .unwrap();
        stream
    }
}

/// The test's side of a runner connection that passed the handshake.
pub struct Impostor {
    stream: tokio::net::TcpStream,
}

impl Impostor {
    /// Writes frames built with `flame::__private::fuzz::impostor`.
    pub async fn send(&mut self, frames: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(frames).await
    }

    /// The parent's next frame other than a heartbeat, described by
    /// `flame::__private::fuzz::impostor::describe`; `None` once the parent closed the connection.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            let mut len = [0; 4];
            self.stream.read_exact(&mut len).await.ok()?;
            let mut frame = vec![0; u32::from_be_bytes(len) as usize];
            self.stream.read_exact(&mut frame).await.ok()?;
            let said = flame::__private::fuzz::impostor::describe(&frame);
            if said != "heartbeat" {
                return Some(said);
            }
        }
    }

    /// The id of the next call the parent runs here.
    pub async fn next_run(&mut self) -> u64 {
        let said = self.next().await.expect("the parent closed the connection");
        let call = said
            .strip_prefix("run ")
            .unwrap_or_else(|| panic!("expected a run, got {said}"));
        call.parse().unwrap()
    }
}

/// The hand-off's token, from its hex form.
pub fn unhex(hex: &str) -> [u8; 16] {
    let mut out = [0; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}
