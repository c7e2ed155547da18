//! The persister: one blocking thread that writes manifests, trust roots and node state
//! in order, off the actor, coalescing superseded state, GC and prune jobs.

use crate::store::{NodeState, Store};
use pollen_protocol::ids::{ContentId, ManifestId};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
/// Files younger than this are never garbage-collected (a publish may be uploading them).
const GC_GRACE: Duration = Duration::from_secs(600);
/// How often the store is collected besides when releases change.
pub(super) const GC_INTERVAL: Duration = Duration::from_secs(300);

/// The newest node state to write, shared by the actor and the persister: a save never
/// waits for room in the queue and is never lost; the persister writes whatever is newest.
pub(super) type StateSlot = Arc<std::sync::Mutex<Option<NodeState>>>;

/// Bytes of manifests and trust roots handed to the persister and not yet written,
/// shared by the actor (which adds) and the persister (which subtracts).
pub(super) type PersistBytes = Arc<std::sync::atomic::AtomicU64>;

/// A job for the persister thread.
#[derive(Debug)]
pub(super) enum Persist {
    Manifest(ManifestId, Vec<u8>),
    /// Answered once every job before it, and the newest state, are durable; dropped
    /// unanswered if any of them failed (the caller then answers an error, never a 2xx).
    Flush(oneshot::Sender<()>),
    Trust(u64, Vec<u8>),
    /// The state slot holds a newer state (a wake-up: it carries nothing).
    State,
    Gc(BTreeSet<ContentId>),
    /// Delete stored manifests not in the set (releases the core no longer keeps).
    PruneManifests(BTreeSet<ManifestId>),
}

/// Jobs waiting beyond the channel's capacity (a slow or stalled disk), at most.
const BACKLOG: usize = 4096;
/// Manifest and trust-root bytes handed over and not yet written, at most.
const UNWRITTEN_BYTES: u64 = 256 << 20;

/// The actor's side of the persister: a bounded channel, then an ordered backlog the run
/// loop drains as room appears (with [`PersistQueue::send_next`]), both bounded in jobs
/// and in bytes. Jobs reach the persister in the order they were pushed.
#[derive(Debug)]
pub(super) struct PersistQueue {
    tx: mpsc::Sender<Persist>,
    backlog: std::collections::VecDeque<Persist>,
    unwritten: PersistBytes,
    max_backlog: usize,
    max_bytes: u64,
}

impl PersistQueue {
    /// A queue on `tx`, sharing `unwritten` with the persister.
    pub(super) fn new(tx: mpsc::Sender<Persist>, unwritten: PersistBytes) -> Self {
        PersistQueue {
            tx,
            backlog: Default::default(),
            unwritten,
            max_backlog: BACKLOG,
            max_bytes: UNWRITTEN_BYTES,
        }
    }

    /// Hand `job` over, after every job before it. Past the backlog's bound, or the bound
    /// of unwritten bytes, it is refused with a message saying what was not persisted (a
    /// flush refused drops its answer, so its caller gets an error, never a 2xx).
    pub(super) fn push(&mut self, job: Persist) -> Result<(), String> {
        let bytes = job.bytes();
        let unwritten = self.unwritten.load(std::sync::atomic::Ordering::Relaxed);
        if self.backlog.len() >= self.max_backlog
            || unwritten.saturating_add(bytes) > self.max_bytes
        {
            return Err(format!(
                "the store is not keeping up ({} jobs and {unwritten} bytes waiting): not persisted: {}",
                self.backlog.len(),
                job.label()
            ));
        }
        self.unwritten
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        if !self.backlog.is_empty() {
            self.backlog.push_back(job);
            return Ok(());
        }
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(job)) => {
                self.backlog.push_back(job);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(job)) => Err(format!(
                "the persister is gone: not persisted: {}",
                job.label()
            )),
        }
    }

    /// Tell the persister the state slot changed (a wake-up; a full queue or a backlog
    /// will wake it anyway, and every batch writes the slot).
    pub(super) fn wake(&self) {
        let _ = self.tx.try_send(Persist::State);
    }

    /// Are jobs waiting in the backlog?
    pub(super) fn waiting(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// A sender to reserve room on (the run loop waits on it while jobs wait).
    pub(super) fn sender(&self) -> mpsc::Sender<Persist> {
        self.tx.clone()
    }

    /// Move the oldest waiting job into the room `permit` holds.
    pub(super) fn send_next(&mut self, permit: mpsc::Permit<'_, Persist>) {
        if let Some(job) = self.backlog.pop_front() {
            permit.send(job);
        }
    }
}

impl Persist {
    /// What it writes, for an error message.
    pub(super) fn label(&self) -> String {
        match self {
            Persist::Manifest(id, _) => format!("manifest {}", id.short()),
            Persist::Trust(v, _) => format!("trust root version {v}"),
            Persist::Flush(_) => "a write acknowledgement".into(),
            Persist::State => "the node state".into(),
            Persist::Gc(_) => "a garbage collection".into(),
            Persist::PruneManifests(_) => "a manifest pruning".into(),
        }
    }

    /// The bytes it holds (counted against the actor's budget of unwritten bytes).
    pub(super) fn bytes(&self) -> u64 {
        match self {
            Persist::Manifest(_, b) | Persist::Trust(_, b) => b.len() as u64,
            _ => 0,
        }
    }
}

/// Persistence runs in order on one blocking thread, off the actor: every manifest and
/// trust root of a batch, the last GC and prune of it, then the newest state, then the
/// flushes. A state that failed to write stays in the slot for the next batch.
pub(super) fn spawn_persister(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Persist>,
    slot: StateSlot,
    unwritten: PersistBytes,
) {
    std::thread::Builder::new()
        .name("pollen-persist".into())
        .spawn(move || {
            // Manifests and trust roots whose write failed: tried again before every later
            // batch, and while any is unwritten no flush is answered (bounded by the
            // actor's budget of unwritten bytes, which they keep holding).
            let mut unwritten_jobs: Vec<Persist> = Vec::new();
            while let Some(first) = rx.blocking_recv() {
                let mut batch = std::mem::take(&mut unwritten_jobs);
                batch.push(first);
                while let Ok(j) = rx.try_recv() {
                    batch.push(j);
                }
                let last_of =
                    |pred: fn(&Persist) -> bool, batch: &[Persist]| batch.iter().rposition(pred);
                let last_gc = last_of(|j| matches!(j, Persist::Gc(_)), &batch);
                let last_prune = last_of(|j| matches!(j, Persist::PruneManifests(_)), &batch);
                let mut failed = false;
                let mut flushes = Vec::new();
                for (i, job) in batch.into_iter().enumerate() {
                    let r = match &job {
                        Persist::Flush(_) | Persist::State => Ok(()),
                        Persist::Gc(_) if Some(i) != last_gc => Ok(()),
                        Persist::PruneManifests(_) if Some(i) != last_prune => Ok(()),
                        Persist::Manifest(id, b) => store.save_manifest(id, b),
                        Persist::Trust(v, b) => store.save_trust_root(*v, b),
                        Persist::Gc(keep) => store.gc(keep, GC_GRACE).map(|_| ()),
                        Persist::PruneManifests(keep) => store.manifests().and_then(|all| {
                            for (id, _) in all {
                                if !keep.contains(&id) {
                                    store.remove_manifest(&id)?;
                                }
                            }
                            Ok(())
                        }),
                    };
                    if let Err(e) = r {
                        tracing::error!("persisting {}: {e}", job.label());
                        if matches!(job, Persist::Manifest(..) | Persist::Trust(..)) {
                            unwritten_jobs.push(job);
                            continue;
                        }
                    }
                    unwritten.fetch_sub(job.bytes(), std::sync::atomic::Ordering::Relaxed);
                    if let Persist::Flush(done) = job {
                        flushes.push(done);
                    }
                }
                let newest = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(state) = newest
                    && let Err(e) = store.save_state(&state)
                {
                    tracing::error!("persisting the node state: {e}");
                    failed = true;
                    // Keep it for the next batch, unless a newer one came meanwhile.
                    slot.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(state);
                }
                if !failed && unwritten_jobs.is_empty() {
                    for done in flushes {
                        let _ = done.send(());
                    }
                }
            }
        })
        .expect("spawning the persistence thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_is_answered_only_once_every_write_before_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (tx, rx) = mpsc::channel(8);
        let slot = StateSlot::default();
        spawn_persister(store.clone(), rx, slot.clone(), PersistBytes::default());
        let flush = |tx: &mpsc::Sender<Persist>| {
            let (done, wait) = oneshot::channel();
            tx.blocking_send(Persist::Flush(done)).unwrap();
            wait.blocking_recv().is_ok()
        };
        // A manifest and the newest state, then a flush: answered, and both are on disk.
        let state = NodeState {
            pins: [("a".to_string(), 3)].into(),
            ..NodeState::default()
        };
        tx.blocking_send(Persist::Manifest(ManifestId([1; 32]), vec![7]))
            .unwrap();
        *slot.lock().unwrap() = Some(state.clone());
        tx.blocking_send(Persist::State).unwrap();
        assert!(flush(&tx));
        assert_eq!(store.load_state().unwrap(), state);
        assert_eq!(store.manifests().unwrap().len(), 1);
        // A write that fails (the manifests directory replaced by a file): the flush
        // behind it is never answered, so no caller answers 2xx.
        std::fs::remove_dir_all(dir.path().join("manifests")).unwrap();
        std::fs::write(dir.path().join("manifests"), b"not a directory").unwrap();
        tx.blocking_send(Persist::Manifest(ManifestId([2; 32]), vec![8]))
            .unwrap();
        assert!(!flush(&tx));
        // Whether the failed write and a later flush share a batch or not, no flush is
        // answered while it stays unwritten; once the disk is back, the next flush writes
        // it and is answered.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!flush(&tx), "a later flush, in a batch of its own");
        std::fs::remove_file(dir.path().join("manifests")).unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        assert!(flush(&tx));
        assert!(
            store
                .manifests()
                .unwrap()
                .iter()
                .any(|(id, _)| *id == ManifestId([2; 32]))
        );
    }

    /// A stalled disk: the persister takes nothing. Jobs wait in order up to the bounds,
    /// then are refused with a reason; as room appears they go out in the order pushed.
    #[test]
    fn a_stalled_persister_bounds_the_queue_in_jobs_and_bytes_and_keeps_order() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut q = PersistQueue::new(tx, PersistBytes::default());
        q.max_backlog = 3;
        q.max_bytes = 10;
        let m = |i: u8, len: usize| Persist::Manifest(ManifestId([i; 32]), vec![0; len]);
        for i in 0..4 {
            q.push(m(i, 2)).unwrap(); // two in the channel, two in the backlog
        }
        let e = q.push(m(4, 3)).unwrap_err();
        assert!(e.contains("not persisted: manifest"), "{e}: over the bytes");
        q.push(Persist::State).unwrap();
        let e = q.push(Persist::State).unwrap_err();
        assert!(e.contains("3 jobs"), "{e}: over the backlog");
        let order = |j: Persist| match j {
            Persist::Manifest(id, _) => id.0[0],
            _ => 99,
        };
        assert_eq!(order(rx.try_recv().unwrap()), 0);
        let permit = q.sender().try_reserve_owned().ok();
        drop(permit);
        let tx = q.sender();
        let permit = tx.try_reserve().unwrap();
        q.send_next(permit);
        let got: Vec<u8> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(order)
            .collect();
        assert_eq!(got, [1, 2], "in the order pushed");
        assert!(q.waiting());
    }
}
