//! A runner's output, copied into the parent's: one place for every backend that can read it.
//!
//! What a runner prints must cost the parent little and never stall it: lines are cut at
//! [`MAX_LINE`], and written by a thread per stream through a bounded queue, so a parent whose
//! own stdout nobody reads drops runner lines (and says how many) instead of blocking a worker
//! of its runtime on a full pipe.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

/// The longest runner line copied whole; the rest of a longer one is dropped.
pub(crate) const MAX_LINE: usize = 16 * 1024;

/// Lines waiting for each stream's writer: at most `QUEUE × MAX_LINE` bytes held.
const QUEUE: usize = 1024;

/// Copies one runner's stdout and stderr into the parent's, each line prefixed with
/// `[<runner id>] ` and written whole, so lines from different runners never interleave; keeps
/// the last line the runner wrote to stderr.
///
/// A backend that can read its runners' output (a child's pipes, a container's attached
/// stream) feeds it here in chunks of any size. When a runner dies before it dials back, its
/// last words usually say why: [`LastWords::after`] adds them to how it ended, which the pool
/// shows in its `BootFailed` and `RunnerLost` errors.
#[derive(Debug)]
pub struct RunnerOutput {
    prefix: String,
    last_words: LastWords,
    // Chunks need not end at line ends: each stream's unfinished line waits here.
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    // Set while the rest of a line longer than `MAX_LINE` is dropped, per stream.
    skip_out: bool,
    skip_err: bool,
}

/// The last non-blank line a runner wrote to stderr; shared with the [`RunnerOutput`] that
/// records it.
#[derive(Debug, Clone, Default)]
pub struct LastWords(Arc<Mutex<String>>);

impl LastWords {
    /// The last line, or an empty string while there is none.
    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `status` (how the runner ended) followed by its last words, when it said any.
    pub fn after(&self, status: String) -> String {
        let last = self.get();
        if last.is_empty() {
            status
        } else {
            format!("{status}; its last words: {last}")
        }
    }
}

impl RunnerOutput {
    /// Output of the runner `runner_id` (see [`BootSpec::runner_id`](super::BootSpec::runner_id)).
    pub fn new(runner_id: &str) -> Self {
        RunnerOutput {
            prefix: format!("[{runner_id}] "),
            last_words: LastWords::default(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            skip_out: false,
            skip_err: false,
        }
    }

    /// A handle on the runner's last words, readable while output goes on arriving.
    pub fn last_words(&self) -> LastWords {
        self.last_words.clone()
    }

    /// Bytes the runner wrote to its stdout.
    pub fn stdout(&mut self, bytes: &[u8]) {
        self.stdout.extend_from_slice(bytes);
        self.flush_lines(false, false);
    }

    /// Bytes the runner wrote to its stderr.
    pub fn stderr(&mut self, bytes: &[u8]) {
        self.stderr.extend_from_slice(bytes);
        self.flush_lines(true, false);
    }

    /// The runner's output ended: writes what is left of an unfinished line.
    pub fn finish(&mut self) {
        self.flush_lines(false, true);
        self.flush_lines(true, true);
    }

    fn flush_lines(&mut self, is_err: bool, at_end: bool) {
        let (pending, skipping) = if is_err {
            (&mut self.stderr, &mut self.skip_err)
        } else {
            (&mut self.stdout, &mut self.skip_out)
        };
        loop {
            let newline = pending.iter().position(|b| *b == b'\n');
            if *skipping {
                // The rest of a cut line: dropped up to its end.
                match newline {
                    Some(end) => {
                        pending.drain(..=end);
                        *skipping = false;
                        continue;
                    }
                    None => return pending.clear(),
                }
            }
            let (end, cut) = match newline {
                Some(end) if end < MAX_LINE => (end + 1, false),
                _ if pending.len() >= MAX_LINE => (MAX_LINE, true),
                None if at_end && !pending.is_empty() => (pending.len(), false),
                _ => return,
            };
            let mut out = Vec::with_capacity(self.prefix.len() + end + 48);
            out.extend_from_slice(self.prefix.as_bytes());
            out.extend(pending.drain(..end));
            if cut {
                *skipping = true;
                out.extend_from_slice(b" [line cut at 16 KiB]");
            }
            if !out.ends_with(b"\n") {
                out.push(b'\n');
            }
            if is_err {
                let text = String::from_utf8_lossy(&out[self.prefix.len()..]);
                let text = text.trim_end();
                if !text.trim().is_empty() {
                    *self.last_words.0.lock().unwrap_or_else(|e| e.into_inner()) = text.to_owned();
                }
            }
            write(is_err, out);
        }
    }
}

/// Lines of runner output dropped because this process's stdout (0) or stderr (1) was not
/// being read fast enough.
static DROPPED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Queues a line for the stream's writer thread; drops it, counted, when the queue is full.
fn write(is_err: bool, line: Vec<u8>) {
    static WRITERS: OnceLock<[Option<SyncSender<Vec<u8>>>; 2]> = OnceLock::new();
    let writers = WRITERS.get_or_init(|| [writer(false), writer(true)]);
    let Some(writer) = &writers[usize::from(is_err)] else {
        return;
    };
    if let Err(TrySendError::Full(_)) = writer.try_send(line) {
        let dropped = DROPPED[usize::from(is_err)].fetch_add(1, Ordering::Relaxed) + 1;
        // Said on the other stream, which may still be read; at 1, 10, 100, ... lines.
        if is_power_of_ten(dropped)
            && let Some(other) = &writers[usize::from(!is_err)]
        {
            let stream = if is_err { "stderr" } else { "stdout" };
            let _ = other.try_send(
                format!(
                    "flame: {dropped} lines of runner output to {stream} dropped so far: this \
                     process's {stream} is not read fast enough\n"
                )
                .into_bytes(),
            );
        }
    }
}

/// A thread that writes queued lines to this process's stdout or stderr, blocking on a full
/// pipe so that nothing else does.
fn writer(is_err: bool) -> Option<SyncSender<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUE);
    std::thread::Builder::new()
        .name(
            if is_err {
                "flame-stderr"
            } else {
                "flame-stdout"
            }
            .into(),
        )
        .spawn(move || {
            for line in rx {
                let _ = if is_err {
                    std::io::stderr().lock().write_all(&line)
                } else {
                    std::io::stdout().lock().write_all(&line)
                };
            }
        })
        .ok()?;
    Some(tx)
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_and_their_rest_dropped() {
        let mut output = RunnerOutput::new("t-2");
        let words = output.last_words();
        output.stderr(&vec![b'x'; MAX_LINE * 3]);
        assert!(output.stderr.is_empty(), "nothing of a long line is kept");
        assert!(
            words.get().ends_with("x [line cut at 16 KiB]"),
            "{}",
            words.get().len()
        );
        output.stderr(b"xxx\nnext\n");
        assert_eq!(
            words.get(),
            "next",
            "the cut line's rest is dropped, the next one kept"
        );
        assert!(is_power_of_ten(1000) && is_power_of_ten(1) && !is_power_of_ten(20));
    }

    #[test]
    fn last_words_are_the_last_whole_stderr_line_across_chunks() {
        let mut output = RunnerOutput::new("t-1");
        let words = output.last_words();
        output.stderr(b"first line\nsecond ");
        assert_eq!(words.get(), "first line");
        output.stdout(b"not stderr\n");
        output.stderr(b"half\n\n   \n");
        assert_eq!(words.get(), "second half", "blank lines are no last words");
        output.stderr(b"unfinished");
        assert_eq!(words.get(), "second half");
        output.finish();
        assert_eq!(words.get(), "unfinished");
        assert_eq!(
            words.after("exit status: 3".into()),
            "exit status: 3; its last words: unfinished"
        );
        assert_eq!(LastWords::default().after("gone".into()), "gone");
    }
}
