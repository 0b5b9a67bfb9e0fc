//! Cancellation: a call whose caller went away (handle dropped or aborted, deadline passed) is
//! cancelled on its runner.
//!
//! `Drop` cannot await, so the cancel goes through the connection's unbounded command queue;
//! the runner drops the task's future and acknowledges, and only then is the slot freed.

use crate::connection::{Cmd, RunnerConn};

/// Sends `Cancel` for `call` when dropped, unless the call's outcome arrived first.
pub(crate) struct CancelOnDrop<'a> {
    conn: &'a RunnerConn,
    call: u64,
    armed: bool,
}

impl<'a> CancelOnDrop<'a> {
    pub(crate) fn new(conn: &'a RunnerConn, call: u64) -> Self {
        CancelOnDrop {
            conn,
            call,
            armed: true,
        }
    }

    /// The outcome arrived: nothing to cancel.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.send(Cmd::Cancel { call: self.call });
        }
    }
}
