//! Per-shape preparation of a model whose symbolic dimensions tract cannot optimise with:
//! a bounded cache of prepared models keyed by the concrete input shapes, least recently
//! used out.
//!
//! A shape not in the cache is prepared on a thread of its own (`pollen-prepare`), never
//! on the caller's: the caller waits for it at most the bound it gives, and past that gets
//! [`CacheError::Preparing`] (the HTTP layer answers 503) while the preparation goes on
//! and lands in the cache for the next request. At most [`MAX_PREPARING`] preparations
//! run at once per model, and at most [`MAX_WAITING`] requests wait for them; past either,
//! a request is answered [`CacheError::Preparing`] at once.
//!
//! A request waits on its inference thread (the preparation result is what it runs next).
//! So a request for a shape already prepared finds the cache at once, but it may wait for
//! an inference thread that a request waiting for a preparation holds: at most as long as
//! that preparation takes, never past the waiter's bound, and never more than
//! [`MAX_WAITING`] threads per model.
//!
//! Failures are cached too (a shape the model cannot take costs one preparation, not one
//! per request), and count against the same bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Most preparations of one model running at once.
pub const MAX_PREPARING: usize = 2;

/// Most callers with a bound (requests) waiting for preparations of one model at once.
pub const MAX_WAITING: usize = 2;

/// The concrete shape of every input, in the model's input order.
pub type Shapes = Vec<Vec<usize>>;

/// How a preparation turns shapes into a prepared model, or says why it cannot.
pub type Prepare<T> = Box<dyn Fn(&[Vec<usize>]) -> Result<T, String> + Send + Sync>;

/// Why [`ShapeCache::get`] has no prepared model to give.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The model cannot be prepared for these shapes (cached: asking again costs nothing).
    #[error("{0}")]
    Failed(String),
    /// The preparation did not finish within the caller's bound, or too many others are
    /// running: retry shortly.
    #[error("{0}")]
    Preparing(String),
}

/// A bounded cache of models prepared per input shapes (see the module documentation).
pub struct ShapeCache<T> {
    inner: Arc<Inner<T>>,
}

type Cell<T> = Arc<OnceLock<Result<Arc<T>, String>>>;

struct Inner<T> {
    state: Mutex<State<T>>,
    /// Signalled whenever a preparation finishes.
    finished: Condvar,
    capacity: usize,
    made: AtomicU64,
    prepare: Prepare<T>,
}

struct State<T> {
    entries: Vec<Entry<T>>,
    /// A counter for recency.
    tick: u64,
    /// Preparations running.
    preparing: usize,
    /// Callers with a bound waiting for a preparation.
    waiting: usize,
}

struct Entry<T> {
    key: Shapes,
    /// Empty while the preparation runs.
    cell: Cell<T>,
    used: u64,
}

impl<T> std::fmt::Debug for ShapeCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShapeCache")
            .field("capacity", &self.inner.capacity)
            .field("specialisations", &self.inner.made.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T: Send + Sync + 'static> ShapeCache<T> {
    /// A cache of at most `capacity` (at least 1) entries, prepared by `prepare`.
    pub fn new(capacity: usize, prepare: Prepare<T>) -> Self {
        ShapeCache {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    entries: Vec::new(),
                    tick: 0,
                    preparing: 0,
                    waiting: 0,
                }),
                finished: Condvar::new(),
                capacity: capacity.max(1),
                made: AtomicU64::new(0),
                prepare,
            }),
        }
    }

    /// The model prepared for `key`: from the cache, or prepared now on a thread of its
    /// own while this caller waits at most `wait` (`None`: until it is done).
    pub fn get(&self, key: &[Vec<usize>], wait: Option<Duration>) -> Result<Arc<T>, CacheError> {
        let inner = &self.inner;
        let mut st = inner.lock();
        st.tick += 1;
        let tick = st.tick;
        let cell = if let Some(e) = st.entries.iter_mut().find(|e| e.key == key) {
            e.used = tick;
            e.cell.clone()
        } else {
            if st.preparing >= MAX_PREPARING {
                return Err(CacheError::Preparing(format!(
                    "the model is being prepared for {} other input shapes; retry shortly",
                    st.preparing
                )));
            }
            let cell: Cell<T> = Arc::new(OnceLock::new());
            st.entries.push(Entry {
                key: key.to_vec(),
                cell: cell.clone(),
                used: tick,
            });
            st.preparing += 1;
            inner.evict(&mut st);
            inner.made.fetch_add(1, Ordering::Relaxed);
            let (worker, key, done) = (inner.clone(), key.to_vec(), cell.clone());
            let spawned = std::thread::Builder::new()
                .name("pollen-prepare".into())
                .spawn(move || worker.run(&key, &done));
            if let Err(e) = spawned {
                let _ = cell.set(Err(format!("cannot start a preparation thread: {e}")));
                st.preparing -= 1;
            }
            cell
        };
        if let Some(r) = cell.get() {
            return r.clone().map_err(CacheError::Failed);
        }
        let Some(wait) = wait else {
            loop {
                if let Some(r) = cell.get() {
                    return r.clone().map_err(CacheError::Failed);
                }
                st = inner
                    .finished
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        // A caller with a bound holds an inference thread while it waits: so few may.
        if st.waiting >= MAX_WAITING {
            return Err(CacheError::Preparing(format!(
                "the model is being prepared for input shapes {key:?} and {} requests already \
                 wait for preparations; retry shortly",
                st.waiting
            )));
        }
        st.waiting += 1;
        let deadline = Instant::now() + wait;
        let outcome = loop {
            if let Some(r) = cell.get() {
                break r.clone().map_err(CacheError::Failed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(CacheError::Preparing(format!(
                    "the model is still being prepared for input shapes {key:?} (waited {} ms); \
                     retry shortly",
                    wait.as_millis()
                )));
            }
            st = inner
                .finished
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        st.waiting -= 1;
        outcome
    }

    /// The model prepared for `key` if it is ready now (marked used); starts nothing.
    pub fn ready(&self, key: &[Vec<usize>]) -> Option<Arc<T>> {
        let mut st = self.inner.lock();
        st.tick += 1;
        let tick = st.tick;
        let e = st.entries.iter_mut().find(|e| e.key == key)?;
        let ready = e.cell.get()?.as_ref().ok()?.clone();
        e.used = tick;
        Some(ready)
    }

    /// Preparations started since the model was loaded (failed ones included).
    pub fn specialisations(&self) -> u64 {
        self.inner.made.load(Ordering::Relaxed)
    }

    /// Prepared models held now.
    pub fn cached(&self) -> usize {
        self.inner
            .lock()
            .entries
            .iter()
            .filter(|e| matches!(e.cell.get(), Some(Ok(_))))
            .count()
    }

    /// The shapes held or being prepared, least recently used first.
    pub fn keys(&self) -> Vec<Shapes> {
        let st = self.inner.lock();
        let mut v: Vec<(u64, Shapes)> =
            st.entries.iter().map(|e| (e.used, e.key.clone())).collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    }
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drop the least recently used finished entries past the capacity (a preparation
    /// running is never dropped; its waiters hold its cell anyway).
    fn evict(&self, st: &mut State<T>) {
        while st.entries.len() > self.capacity {
            let victim = st
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.cell.get().is_some())
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i);
            match victim {
                Some(i) => drop(st.entries.remove(i)),
                None => break,
            }
        }
    }

    /// The preparation thread: prepare, publish the result, wake the waiters.
    fn run(&self, key: &[Vec<usize>], cell: &Cell<T>) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.prepare)(key)));
        let r = match r {
            Ok(Ok(t)) => Ok(Arc::new(t)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the runtime panicked while preparing the model for these shapes".into()),
        };
        let mut st = self.lock();
        let _ = cell.set(r);
        st.preparing -= 1;
        self.evict(&mut st);
        drop(st);
        self.finished.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A cache whose preparations wait for a go from the test when the first dimension is
    /// 99, and fail for 0.
    fn cache(capacity: usize) -> (ShapeCache<usize>, mpsc::Sender<()>) {
        let (go, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let c = ShapeCache::new(
            capacity,
            Box::new(move |k: &[Vec<usize>]| match k[0][0] {
                0 => Err("zero".to_string()),
                99 => {
                    let _ = gate.lock().unwrap().recv();
                    Ok(99)
                }
                n => Ok(n * 10),
            }),
        );
        (c, go)
    }

    const WAIT: Option<Duration> = Some(Duration::from_secs(10));

    #[test]
    fn prepares_once_per_shape_and_evicts_the_least_recently_used() {
        let (c, _go) = cache(2);
        assert_eq!(*c.get(&[vec![1]], WAIT).unwrap(), 10);
        assert_eq!(*c.get(&[vec![2]], WAIT).unwrap(), 20);
        assert_eq!(*c.get(&[vec![1]], WAIT).unwrap(), 10, "cached");
        assert_eq!((c.specialisations(), c.cached()), (2, 2));
        // [2] is the least recently used: a third shape takes its place.
        assert_eq!(*c.get(&[vec![3]], WAIT).unwrap(), 30);
        assert_eq!(c.keys(), [vec![vec![1]], vec![vec![3]]]);
        assert_eq!(*c.get(&[vec![2]], WAIT).unwrap(), 20);
        assert_eq!((c.specialisations(), c.cached()), (4, 2));
        // A failure is kept: asking again prepares nothing.
        assert_eq!(
            c.get(&[vec![0]], WAIT),
            Err(CacheError::Failed("zero".into()))
        );
        assert_eq!(
            c.get(&[vec![0]], WAIT),
            Err(CacheError::Failed("zero".into()))
        );
        assert_eq!(c.specialisations(), 5);
    }

    #[test]
    fn a_slow_shape_is_answered_preparing_and_does_not_hold_up_others() {
        let (c, go) = cache(4);
        assert_eq!(*c.get(&[vec![1]], WAIT).unwrap(), 10);
        let short = Some(Duration::from_millis(50));
        let e = c.get(&[vec![99]], short).unwrap_err();
        assert!(
            matches!(&e, CacheError::Preparing(m) if m.contains("still being prepared")),
            "{e}"
        );
        // Another shape, prepared or not, is served meanwhile.
        assert_eq!(*c.get(&[vec![1]], short).unwrap(), 10);
        assert_eq!(*c.get(&[vec![2]], WAIT).unwrap(), 20);
        // One more slow shape fills the preparation slots: a new shape is refused at once.
        let e = c.get(&[vec![99, 1]], short).unwrap_err();
        assert!(matches!(e, CacheError::Preparing(_)));
        let e = c.get(&[vec![3]], WAIT).unwrap_err();
        assert!(
            matches!(&e, CacheError::Preparing(m) if m.contains("2 other input shapes")),
            "{e}"
        );
        go.send(()).unwrap();
        go.send(()).unwrap();
        // The preparation went on without its caller: the retry finds it.
        assert_eq!(*c.get(&[vec![99]], WAIT).unwrap(), 99);
        assert_eq!(*c.get(&[vec![3]], WAIT).unwrap(), 30);
    }

    #[test]
    fn few_requests_wait_for_preparations() {
        let (c, go) = cache(4);
        let c = Arc::new(c);
        let waiters: Vec<_> = (0..MAX_WAITING)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || c.get(&[vec![99]], WAIT))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.inner.lock().waiting < MAX_WAITING {
            assert!(Instant::now() < deadline, "the waiters never waited");
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = Instant::now();
        let e = c.get(&[vec![99]], WAIT).unwrap_err();
        assert!(
            matches!(&e, CacheError::Preparing(m) if m.contains("already wait")),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
        // Callers without a bound (golden checks) are not counted.
        let unbounded = {
            let c = c.clone();
            std::thread::spawn(move || c.get(&[vec![99]], None))
        };
        go.send(()).unwrap();
        for w in waiters {
            assert_eq!(*w.join().unwrap().unwrap(), 99);
        }
        assert_eq!(*unbounded.join().unwrap().unwrap(), 99);
    }

    #[test]
    fn a_panicking_preparation_is_a_failure() {
        let c: ShapeCache<()> = ShapeCache::new(1, Box::new(|_| panic!("inside tract")));
        let e = c.get(&[vec![1]], None).unwrap_err();
        assert!(
            matches!(&e, CacheError::Failed(m) if m.contains("panicked")),
            "{e}"
        );
    }
}
