//! `ProcessBackend`: runners as child processes running this same executable.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::{Backend, BootSpec, LastWords, RunnerHandle, RunnerOutput};
use crate::error::{Error, ErrorKind};

/// Set by [`ProcessBackend`] to the parent's pid: the runner arms its parent-death signal.
pub(crate) const PARENT_PID_ENV: &str = "FLAME_PARENT_PID";

/// Boots each runner by executing the current executable again (same arguments by default)
/// with the hand-off environment variable set; the runner dials back over loopback.
///
/// This is the default backend and the one to develop with: a runner is a real separate
/// process, yet boots in about a millisecond. Runners' stdout and stderr are forwarded to the
/// parent's, each line prefixed with `[<runner id>]`.
///
/// On Linux each runner also gets a parent-death signal (SIGTERM), so it stops even when the
/// parent is killed with SIGKILL. The protocol's own failsafe does not depend on it: a runner
/// whose parent connection ends stops by itself.
///
/// Each runner leads a process group of its own, which the processes its tasks start join. When
/// the runner goes — destroyed, killed, or stopping by itself because its parent is gone — what
/// is left of its group is killed with it, so a task's children never outlive their runner, even
/// those not started with `kill_on_drop`. (A child that starts a group or session of its own,
/// like a daemon, is out of reach.) It also keeps a terminal's Ctrl-C, which goes to the
/// parent's group, away from runners: the parent drains them gracefully instead.
#[derive(Debug, Clone)]
pub struct ProcessBackend {
    program: Option<PathBuf>,
    args: Option<Vec<OsString>>,
    env: Vec<(OsString, OsString)>,
    parent_death_signal: bool,
}

impl Default for ProcessBackend {
    fn default() -> Self {
        ProcessBackend {
            program: None,
            args: None,
            env: Vec::new(),
            parent_death_signal: true,
        }
    }
}

impl ProcessBackend {
    /// Runners run this executable with this process's arguments.
    pub fn new() -> ProcessBackend {
        ProcessBackend::default()
    }

    /// Runs another program as the runner (it must be built with the same tasks: parent and
    /// runner compare task manifests in the handshake). It gets no arguments unless
    /// [`args`](ProcessBackend::args) gives some.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// Sets the runner's arguments (default: this process's own when the runner is this
    /// executable, none for another [`program`](ProcessBackend::program)).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args = Some(
            args.into_iter()
                .map(|a| a.as_ref().to_os_string())
                .collect(),
        );
        self
    }

    /// Sets an environment variable in runners (they inherit the parent's environment too).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Whether runners get a parent-death signal on Linux (default `true`). Turning it off
    /// leaves only the protocol's failsafe to stop orphaned runners.
    pub fn parent_death_signal(mut self, enabled: bool) -> Self {
        self.parent_death_signal = enabled;
        self
    }

    fn command(&self, spec: &BootSpec) -> Result<Command, Error> {
        let mut cmd = match &self.program {
            Some(program) => Command::new(program),
            None => {
                let exe = std::env::current_exe()
                    .map_err(|e| Error::io("finding the current executable", e))?;
                let mut cmd = Command::new(exe);
                // The same app, so the same command line, unless told otherwise; a test binary
                // is told to run just the test that started the pool.
                match (&self.args, &spec.test_runner_args) {
                    (None, Some(test)) => cmd.args(test),
                    (None, None) if crate::parent::in_test_binary() => {
                        return Err(Error::new(
                            ErrorKind::Config,
                            "this pool was started in a test binary but not on a #[flame::test]'s own \
                             thread (in a spawned task, say), so its runners would re-run the whole \
                             test suite: start the pool in the test's body, or give ProcessBackend a \
                             program",
                        ));
                    }
                    (None, None) => cmd.args(std::env::args_os().skip(1)),
                    (Some(_), _) => &mut cmd,
                };
                cmd
            }
        };
        if let Some(args) = &self.args {
            cmd.args(args);
        }
        let (key, value) = spec.handoff_env();
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(key, value)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        // The runner sets its own parent-death signal first thing (see `runtime.rs`): a
        // `pre_exec` hook here would force a full fork of this process instead of
        // `posix_spawn`, which costs milliseconds once the parent has grown.
        if self.parent_death_signal {
            cmd.env(PARENT_PID_ENV, std::process::id().to_string());
        }
        Ok(cmd)
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &str {
        "process"
    }

    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Box<dyn RunnerHandle>, Error>> {
        let command = self.command(&spec);
        let runner_id = spec.runner_id().to_string();
        async move {
            let command = command?;
            let program = command.as_std().get_program().to_owned();
            let mut child = spawn(command).await.map_err(|e| {
                Error::new(
                    ErrorKind::BootFailed,
                    format!(
                        "could not start the runner process {}: {e}; check \
                         ProcessBackend::program (by default this program's own executable)",
                        program.to_string_lossy()
                    ),
                )
            })?;
            // stdout and stderr are read by tasks of their own, each with its own line buffer.
            let err_output = RunnerOutput::new(&runner_id);
            let last_words = err_output.last_words();
            if let Some(out) = child.stdout.take() {
                tokio::spawn(forward(out, RunnerOutput::new(&runner_id), false));
            }
            let stderr_done = child
                .stderr
                .take()
                .map(|err| tokio::spawn(forward(err, err_output, true)));
            let handle: Box<dyn RunnerHandle> = Box::new(ProcessRunner {
                pid: child.id().unwrap_or(0),
                child,
                last_words,
                stderr_done,
            });
            Ok(handle)
        }
        .boxed()
    }
}

/// Spawns on a thread that lives as long as the process: Linux delivers the parent-death signal
/// when the *thread* that forked the child exits, and Tokio's worker and blocking threads come
/// and go.
async fn spawn(command: Command) -> std::io::Result<Child> {
    struct Job {
        command: Command,
        runtime: tokio::runtime::Handle,
        reply: oneshot::Sender<std::io::Result<Child>>,
    }
    static SPAWNER: OnceLock<std::sync::mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("flame-spawner".into())
            .spawn(move || {
                for mut job in rx {
                    // The child is registered with the caller's runtime, which reaps it.
                    let _guard = job.runtime.enter();
                    let _ = job.reply.send(job.command.spawn());
                }
            })
            .expect("starting the flame spawner thread");
        tx
    });
    let (reply, result) = oneshot::channel();
    spawner
        .send(Job {
            command,
            runtime: tokio::runtime::Handle::current(),
            reply,
        })
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    result
        .await
        .map_err(|_| std::io::Error::other("the spawner thread dropped the request"))?
}

/// Copies one of a runner's output pipes into ours.
async fn forward(mut from: impl AsyncRead + Unpin, mut output: RunnerOutput, is_err: bool) {
    let mut chunk = vec![0; 8 * 1024];
    loop {
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return output.finish(),
            Ok(n) if is_err => output.stderr(&chunk[..n]),
            Ok(n) => output.stdout(&chunk[..n]),
        }
    }
}

struct ProcessRunner {
    pid: u32,
    child: Child,
    last_words: LastWords,
    stderr_done: Option<tokio::task::JoinHandle<()>>,
}

impl RunnerHandle for ProcessRunner {
    fn describe(&self) -> String {
        format!("pid {}", self.pid)
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        async move {
            let status = match self.child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => return format!("could not wait for it: {e}"),
            };
            // Its last lines may still be in the pipe. Bounded, as a grandchild holding the pipe
            // keeps it open.
            if let Some(forwarder) = self.stderr_done.take() {
                let _ = tokio::time::timeout(Duration::from_millis(200), forwarder).await;
            }
            self.last_words.after(status)
        }
        .boxed()
    }

    fn destroy(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            // A runner told to stop exits by itself within moments; one that doesn't is killed.
            if tokio::time::timeout(Duration::from_secs(1), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
            }
            // Dropping `self` kills what is left of its group.
        }
        .boxed()
    }
}

impl Drop for ProcessRunner {
    fn drop(&mut self) {
        kill_group(self.pid);
    }
}

/// Kills every process left in the group `pgid` (a runner's, whose id is its pid). A group with
/// members left can't have its id reused, so this reaches only what the runner left behind.
fn kill_group(pgid: u32) {
    #[cfg(unix)]
    if let Ok(pgid) = libc::pid_t::try_from(pgid)
        && pgid > 1
    {
        // SAFETY: killpg takes no pointers; ESRCH (no such group left) is the common case.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// In a runner leading its own group (a Process runner, or a container's first process): kills
/// the other members of the group, the processes its tasks started, before it exits.
pub(crate) fn kill_own_group_but_me() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid and getpgrp take no arguments.
        let (me, group) = unsafe { (libc::getpid(), libc::getpgrp()) };
        if me != group {
            return;
        }
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for pid in procs.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok()) {
            // The group is the third field after the command name, which is in parentheses and
            // may itself hold spaces and parentheses.
            let in_group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, fields) = stat.rsplit_once(')')?;
                    fields
                        .split_whitespace()
                        .nth(2)?
                        .parse::<libc::pid_t>()
                        .ok()
                })
                == Some(me);
            if in_group && pid != me {
                // SAFETY: kill takes no pointers.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}
