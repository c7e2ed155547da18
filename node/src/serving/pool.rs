//! The inference pool: admission first, then threads of its own.
//!
//! * **Admission** ([`Pool::admit`]), before a request's body is read: the request takes one
//!   of `threads + queue` places and reserves its body's bytes from a budget. Without a
//!   place or without the bytes it is refused at once ([`Busy`]; the HTTP layer answers
//!   503), so a flood of large bodies is neither buffered nor left to hang.
//! * **Running** ([`Admission::run`]): the job goes through a bounded channel to one of
//!   `threads` std threads that run nothing but inference. Tokio's blocking pool, which
//!   store work and uploads use, is not involved: neither can starve the other. A job that
//!   panics is caught on its thread, which goes on to the next job.
//!
//! The place and the bytes are given back when the job returns (or when the admission is
//! dropped unused), not when the caller stops waiting: a request whose client left still
//! holds its place while its job runs, since a thread is busy with it.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was refused admission: retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// Every place is taken: this many requests are being read, waiting or running.
    #[error("inference queue full ({0} requests admitted): retry later")]
    Queue(usize),
    /// The bodies of the requests admitted hold too much of the body budget.
    #[error(
        "request bodies in flight hold {held} of {budget} bytes, no room for {wanted} more: retry later"
    )]
    Bodies {
        /// Bytes reserved by the requests admitted.
        held: usize,
        /// Bytes this request asked for.
        wanted: usize,
        /// The budget.
        budget: usize,
    },
}

/// An admitted job did not return a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failed {
    /// The job panicked (its thread caught the panic and serves on).
    #[error("the inference job panicked")]
    Panicked,
    /// The pool's threads are gone (the node is shutting down).
    #[error("the inference threads have stopped")]
    Stopped,
}

type Job = Box<dyn FnOnce() + Send>;

/// The inference pool (see the module documentation).
#[derive(Debug)]
pub struct Pool {
    places: Arc<Semaphore>,
    place_count: usize,
    bytes: Arc<Semaphore>,
    budget: usize,
    jobs: SyncSender<Job>,
}

/// An admitted request: a place in the pool and the bytes of its body. Dropping it gives
/// both back.
#[derive(Debug)]
pub struct Admission {
    place: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
    jobs: SyncSender<Job>,
}

impl Pool {
    /// `threads` inference threads (0: one per CPU), `queue` admitted requests beyond them,
    /// and `body_budget` bytes of request bodies held at once (at most
    /// `Semaphore::MAX_PERMITS`). Spawns the threads; they exit once the pool and every
    /// admission are dropped.
    pub fn new(threads: usize, queue: usize, body_budget: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let place_count = threads.saturating_add(queue);
        // Holds at most one job per place, so sending an admitted job never finds it full.
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(place_count);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pollen-infer-{i}"))
                .spawn(move || worker(&rx));
            if let Err(e) = spawned {
                // Fewer threads than asked: the pool still runs every job, more slowly; with
                // none at all, `run` reports `Stopped`.
                tracing::error!("cannot start inference thread {i}: {e}");
            }
        }
        let budget = body_budget.min(Semaphore::MAX_PERMITS);
        Pool {
            places: Arc::new(Semaphore::new(place_count)),
            place_count,
            bytes: Arc::new(Semaphore::new(budget)),
            budget,
            jobs,
        }
    }

    /// Admit a request whose body may take `body_bytes` bytes, or refuse it at once.
    pub fn admit(&self, body_bytes: usize) -> Result<Admission, Busy> {
        let place = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy::Queue(self.place_count))?;
        let bodies = || Busy::Bodies {
            held: self.budget - self.bytes.available_permits(),
            wanted: body_bytes,
            budget: self.budget,
        };
        let n = u32::try_from(body_bytes).map_err(|_| bodies())?;
        let bytes = self
            .bytes
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| bodies())?;
        Ok(Admission {
            place,
            bytes,
            jobs: self.jobs.clone(),
        })
    }
}

impl Admission {
    /// Run `f` on an inference thread (waiting for one behind the jobs admitted before)
    /// and return its value, or [`Failed::Panicked`] if it panicked. The admission is given
    /// back when `f` returns or panics, before this future is woken.
    ///
    /// Cancel-safe in the sense that matters here: dropping the future does not stop `f`,
    /// which runs and then frees the place; only its value is lost.
    pub async fn run<T: Send + 'static>(
        self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Failed> {
        let Admission { place, bytes, jobs } = self;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let out = std::panic::catch_unwind(AssertUnwindSafe(f));
            // Given back before the caller hears of the result, so that it can be admitted
            // again at once.
            drop((place, bytes));
            let _ = tx.send(out.map_err(|_| Failed::Panicked));
        });
        match jobs.try_send(job) {
            Ok(()) => {}
            // Full cannot happen (one slot per place); Disconnected: every thread is gone.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                return Err(Failed::Stopped);
            }
        }
        // The sender is dropped without a value only if the job unwound past its own catch.
        rx.await.unwrap_or(Err(Failed::Panicked))
    }
}

/// An inference thread: run jobs until the channel closes. Each job catches its own
/// panic; this catch is a second guard, so that nothing a job does ends the thread.
fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for a job, never while running one.
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = next else { return };
        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_past_the_queue_bound() {
        let pool = Arc::new(Pool::new(1, 1, 1 << 20));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let a = pool.admit(10).expect("a place");
        let running = tokio::spawn(a.run(move || rx.recv().ok()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = pool.admit(10).expect("the queue's place");
        let waiting = tokio::spawn(b.run(|| 1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            pool.admit(10).err(),
            Some(Busy::Queue(2)),
            "refused at once"
        );
        tx.send(()).unwrap();
        assert_eq!(running.await.unwrap(), Ok(Some(())));
        assert_eq!(waiting.await.unwrap(), Ok(1));
        assert_eq!(pool.admit(10).unwrap().run(|| 3).await, Ok(3));
        // An admission dropped unused gives its place back.
        let unused = pool.admit(0).unwrap();
        let _other = pool.admit(0).unwrap();
        assert!(pool.admit(0).is_err());
        drop(unused);
        assert!(pool.admit(0).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn body_bytes_are_budgeted() {
        let pool = Pool::new(1, 8, 100);
        let a = pool.admit(60).expect("60 of 100");
        assert_eq!(
            pool.admit(50).err(),
            Some(Busy::Bodies {
                held: 60,
                wanted: 50,
                budget: 100
            })
        );
        let b = pool.admit(40).expect("40 more fit");
        assert!(matches!(pool.admit(1), Err(Busy::Bodies { .. })));
        assert!(matches!(pool.admit(101), Err(Busy::Bodies { .. })));
        // Given back when the job returns.
        assert_eq!(a.run(|| ()).await, Ok(()));
        assert!(pool.admit(50).is_ok());
        drop(b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_does_not_cost_a_thread() {
        let pool = Pool::new(1, 0, 1 << 20);
        for _ in 0..3 {
            let r = pool.admit(0).unwrap().run(|| panic!("a bad job")).await;
            assert_eq!(r, Err::<(), _>(Failed::Panicked));
            // The one thread is still there, and the place was given back.
            let name = pool
                .admit(0)
                .unwrap()
                .run(|| std::thread::current().name().map(String::from))
                .await;
            assert_eq!(name, Ok(Some("pollen-infer-0".to_string())));
        }
    }

    /// Jobs run on the pool's own threads: with tokio's blocking pool taken up entirely
    /// (store work, uploads), inference still runs.
    #[test]
    fn a_busy_blocking_pool_does_not_stop_inference() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (release, held) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::task::spawn_blocking(move || held.recv().ok());
            let pool = Pool::new(1, 1, 1 << 20);
            let run = pool.admit(0).unwrap().run(|| 7);
            let r = tokio::time::timeout(Duration::from_secs(5), run).await;
            assert_eq!(r, Ok(Ok(7)), "inference waited for the blocking pool");
            release.send(()).unwrap();
            blocker.await.unwrap();
        });
    }
}
