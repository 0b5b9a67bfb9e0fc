//! A runner's output, copied into the parent's: one place for every backend that can read it.

use std::io::Write;
use std::sync::{Arc, Mutex};

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
        let pending = if is_err {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        loop {
            let end = match pending.iter().position(|b| *b == b'\n') {
                Some(end) => end + 1,
                None if at_end && !pending.is_empty() => pending.len(),
                None => return,
            };
            let mut out = Vec::with_capacity(self.prefix.len() + end + 1);
            out.extend_from_slice(self.prefix.as_bytes());
            out.extend(pending.drain(..end));
            if !out.ends_with(b"\n") {
                out.push(b'\n');
            }
            let _ = if is_err {
                let text = String::from_utf8_lossy(&out[self.prefix.len()..]);
                let text = text.trim_end();
                if !text.trim().is_empty() {
                    *self.last_words.0.lock().unwrap_or_else(|e| e.into_inner()) = text.to_owned();
                }
                std::io::stderr().lock().write_all(&out)
            } else {
                std::io::stdout().lock().write_all(&out)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
