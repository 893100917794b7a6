//! Suspending training when the service stops: the running job saves a mid-epoch checkpoint
//! and goes back to the queue, so the next start resumes it from that step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Shared by the server (which asks) and the runner (which obeys); cheap to clone.
#[derive(Clone, Default)]
pub struct SuspendHandle {
    flag: Arc<AtomicBool>,
    /// Whether a job is being trained, with a condition variable to wait for the end.
    busy: Arc<(Mutex<bool>, Condvar)>,
}

impl SuspendHandle {
    /// From now on no job starts, and the running one stops before its next step.
    pub fn suspend(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    pub fn is_suspended(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The flag the trainer checks before each optimiser step.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// Waits up to `timeout` for the running job (if any) to stop; true if none runs.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let (busy, changed) = &*self.busy;
        let Ok(guard) = busy.lock() else {
            return false;
        };
        match changed.wait_timeout_while(guard, timeout, |busy| *busy) {
            Ok((guard, _)) => !*guard,
            Err(_) => false,
        }
    }

    /// Marks a job as running until the returned guard drops.
    pub(crate) fn running(&self) -> BusyGuard {
        self.set_busy(true);
        BusyGuard(self.clone())
    }

    fn set_busy(&self, value: bool) {
        let (busy, changed) = &*self.busy;
        if let Ok(mut busy) = busy.lock() {
            *busy = value;
        }
        changed.notify_all();
    }
}

pub(crate) struct BusyGuard(SuspendHandle);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.set_busy(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_running_job() {
        let handle = SuspendHandle::default();
        assert!(handle.wait_idle(Duration::ZERO));
        let guard = handle.running();
        assert!(!handle.wait_idle(Duration::from_millis(10)));
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(guard);
        });
        assert!(handle.wait_idle(Duration::from_secs(5)));
        releaser.join().unwrap();
    }
}
