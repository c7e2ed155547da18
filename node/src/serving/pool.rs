//! The bounded inference pool: at most `threads` inferences run at once (on the blocking
//! pool, never on the async threads), at most `queue` more wait; past that a request is
//! refused at once (the HTTP layer answers 503), never left to hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Semaphore;

/// The pool is full: too many requests running and waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("inference queue full ({0} waiting): retry later")]
pub struct Busy(pub usize);

/// A bounded pool of inference slots.
#[derive(Debug)]
pub struct Pool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl Pool {
    /// `threads` concurrent inferences (0: the number of CPUs), `queue` waiting at most.
    pub fn new(threads: usize, queue: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        Pool {
            permits: Arc::new(Semaphore::new(threads)),
            waiting: AtomicUsize::new(0),
            max_waiting: queue,
        }
    }

    /// Run `f` on a blocking thread once a slot is free, or refuse at once when the queue
    /// is full. Cancel-safe: dropping the future before it runs frees its queue place.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let w = self.waiting.fetch_add(1, Ordering::SeqCst);
                let _guard = Waiting(&self.waiting);
                if w >= self.max_waiting {
                    return Err(Busy(w));
                }
                match self.permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return Err(Busy(w)),
                }
            }
        };
        let joined = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await;
        match joined {
            Ok(v) => Ok(v),
            // The closure panicked: re-raise here (callers catch tract panics themselves).
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_past_the_queue_bound() {
        let pool = Arc::new(Pool::new(1, 1));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let p = pool.clone();
        let running = tokio::spawn(async move { p.run(move || rx.recv().ok()).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let p = pool.clone();
        let waiting = tokio::spawn(async move { p.run(|| 1).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            matches!(pool.run(|| 2).await, Err(Busy(_))),
            "third request refused at once"
        );
        tx.send(()).unwrap();
        assert!(running.await.unwrap().is_ok());
        assert_eq!(waiting.await.unwrap(), Ok(1));
        assert_eq!(pool.run(|| 3).await, Ok(3));
    }
}
