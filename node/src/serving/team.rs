//! Helper threads that wait for work by spinning, for the matrix-vector products of a
//! language model's decoding ([`super::int8`]).
//!
//! A decoding step is some two hundred products of 20 to 400 µs each, with a few
//! microseconds of other work between them. Split across a rayon pool, each product
//! wakes a sleeping thread (a futex wake and a reschedule, tens of microseconds on a
//! virtual machine) and two threads decode no faster than one (SmolLM2-135M int8: 58 and
//! 57 tokens/s). A [`Team`]'s helpers instead spin for a short while after each part they
//! run, so the next product finds them awake; after [`SPIN`] they yield the CPU to any
//! other runnable thread, and after [`IDLE`] they park until work is posted again, so an
//! idle node burns nothing. onnxruntime's intra-op threads spin the same way by default.
//!
//! One poster at a time: a product posted while another generation's product holds the
//! team runs on its caller's thread alone ([`Team::run`]).

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a helper spins after its last part before it yields its CPU between checks.
pub const SPIN: Duration = Duration::from_micros(200);
/// How long a helper stays awake after its last part before it parks.
pub const IDLE: Duration = Duration::from_millis(5);
/// Most helpers a team has.
const MAX_HELPERS: usize = 15;

/// Parts of one product, run on the poster's thread and its helpers.
#[derive(Debug)]
pub struct Team {
    helpers: Mutex<Vec<Arc<Helper>>>,
    /// Held by the product being posted.
    post: Mutex<()>,
}

/// A product's parts, on the poster's stack until every helper is done with it: each
/// thread takes the next part not yet taken until none is left, so a helper that starts
/// late or runs slower takes fewer.
struct Work {
    f: *const (dyn Fn(usize) + Sync),
    parts: usize,
    next: AtomicUsize,
}

impl Work {
    /// Run parts until none is left.
    #[allow(unsafe_code)] // calls the poster's function, alive until the poster returns
    fn drain(&self) {
        loop {
            let part = self.next.fetch_add(1, Ordering::Relaxed);
            if part >= self.parts {
                return;
            }
            // SAFETY: the poster keeps `f` alive until every job on this work is done.
            unsafe { (*self.f)(part) };
        }
    }
}

/// One helper's share of a [`Work`].
struct Job {
    work: *const Work,
    done: AtomicBool,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

#[derive(Debug)]
struct Helper {
    /// The job posted and not yet taken, or null.
    slot: AtomicPtr<Job>,
    sleeping: AtomicBool,
    thread: Thread,
}

impl Team {
    /// A team with no helper yet.
    fn new() -> Team {
        Team {
            helpers: Mutex::new(Vec::new()),
            post: Mutex::new(()),
        }
    }

    /// The process's team.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(Team::new)
    }

    /// Run `f(0)`, …, `f(parts - 1)` on the caller's thread and up to `threads - 1`
    /// helpers (started on first use), each taking the next part not yet taken; all on the
    /// caller's thread when another product holds the team or no helper can be started.
    /// Returns when every part has run; a panic in a part resumes in the caller.
    #[allow(unsafe_code)] // hands helpers a pointer to `f` and waits until they are done
    pub fn run(&self, threads: usize, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        let Ok(_posting) = self.post.try_lock() else {
            (0..parts).for_each(f);
            return;
        };
        let helpers = self.helpers(threads.min(parts).saturating_sub(1));
        // SAFETY: the lifetime is erased so a helper can hold the pointer; every job
        // is waited for below before this function returns, and a helper does not touch
        // a job or its work after it sets `done`.
        let f_static: *const (dyn Fn(usize) + Sync) = unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f)
        };
        let work = Work {
            f: f_static,
            parts,
            next: AtomicUsize::new(0),
        };
        let jobs: Vec<Job> = helpers
            .iter()
            .map(|_| Job {
                work: ptr::from_ref(&work),
                done: AtomicBool::new(false),
                panic: Mutex::new(None),
            })
            .collect();
        for (helper, job) in helpers.iter().zip(&jobs) {
            helper
                .slot
                .store(ptr::from_ref(job).cast_mut(), Ordering::SeqCst);
            if helper.sleeping.load(Ordering::SeqCst) {
                helper.thread.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| work.drain()));
        if mine.is_err() {
            // Leave the helpers nothing more to start.
            work.next.store(parts, Ordering::Relaxed);
        }
        let started = Instant::now();
        for job in &jobs {
            while !job.done.load(Ordering::Acquire) {
                if started.elapsed() < SPIN {
                    std::hint::spin_loop();
                } else {
                    thread::yield_now();
                }
            }
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        for job in &jobs {
            if let Some(p) = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
                resume_unwind(p);
            }
        }
    }

    /// Up to `n` helpers, started as needed (fewer if a thread cannot be started).
    fn helpers(&self, n: usize) -> Vec<Arc<Helper>> {
        let n = n.min(MAX_HELPERS);
        let mut helpers = self.helpers.lock().unwrap_or_else(|e| e.into_inner());
        while helpers.len() < n {
            let (tx, rx) = std::sync::mpsc::channel();
            let name = format!("pollen-lm-helper-{}", helpers.len() + 1);
            let started = thread::Builder::new().name(name).spawn(move || {
                let helper = Arc::new(Helper {
                    slot: AtomicPtr::new(ptr::null_mut()),
                    sleeping: AtomicBool::new(false),
                    thread: thread::current(),
                });
                if tx.send(helper.clone()).is_ok() {
                    helper.work();
                }
            });
            match started.ok().and_then(|_| rx.recv().ok()) {
                Some(h) => helpers.push(h),
                None => break,
            }
        }
        helpers.iter().take(n).cloned().collect()
    }
}

impl Helper {
    /// Take and run posted parts, for ever.
    #[allow(unsafe_code)] // runs a job the poster keeps alive until `done`
    fn work(&self) {
        let mut last = Instant::now();
        loop {
            let job = self.slot.swap(ptr::null_mut(), Ordering::SeqCst);
            if !job.is_null() {
                // SAFETY: the poster keeps the job and its work alive until `done`.
                let job = unsafe { &*job };
                let work = unsafe { &*job.work };
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| work.drain())) {
                    work.next.store(work.parts, Ordering::Relaxed);
                    *job.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                }
                // The last touch of the job: the poster may free it from here on.
                job.done.store(true, Ordering::Release);
                last = Instant::now();
                continue;
            }
            let idle = last.elapsed();
            if idle < SPIN {
                std::hint::spin_loop();
            } else if idle < IDLE {
                thread::yield_now();
            } else {
                self.sleeping.store(true, Ordering::SeqCst);
                // A job posted before `sleeping` was seen is found here; one posted after
                // unparks this thread.
                if self.slot.load(Ordering::SeqCst).is_null() {
                    thread::park();
                }
                self.sleeping.store(false, Ordering::SeqCst);
                last = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_and_the_caller_waits_for_all() {
        let team = Team::new();
        for (threads, parts) in [(1, 1), (2, 1), (2, 2), (2, 8), (3, 5), (4, 3)] {
            let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..200 {
                team.run(threads, parts, &|p| {
                    counts[p].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 200));
        }
        // Helpers that parked are woken.
        thread::sleep(IDLE * 3);
        let ran = AtomicUsize::new(0);
        team.run(3, 3, &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_panic_in_a_helper_s_part_resumes_in_the_caller_and_the_team_goes_on() {
        let team = Team::new();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(2, 64, &|p| {
                if p == 1 {
                    panic!("part 1");
                }
            })
        }));
        assert!(r.is_err());
        let ran = AtomicUsize::new(0);
        team.run(2, 2, &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_second_poster_runs_its_parts_itself() {
        let team = Arc::new(Team::new());
        let inner = AtomicUsize::new(0);
        // Whichever thread takes part 0 posts again.
        team.run(2, 2, &|p| {
            if p == 0 {
                // The team is held: these run on this thread.
                let me = thread::current().id();
                team.run(3, 3, &|_| {
                    assert_eq!(thread::current().id(), me);
                    inner.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(inner.load(Ordering::Relaxed), 3);
    }
}
