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

/// The newest node state to write, shared by the actor and the persister: a save never
/// waits for room in the queue and is never lost; the persister writes whatever is newest.
pub(super) type StateSlot = Arc<std::sync::Mutex<Option<NodeState>>>;

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

/// Persistence runs in order on one blocking thread, off the actor: every manifest and
/// trust root of a batch, the last GC and prune of it, then the newest state, then the
/// flushes. A state that failed to write stays in the slot for the next batch.
pub(super) fn spawn_persister(store: Arc<Store>, mut rx: mpsc::Receiver<Persist>, slot: StateSlot) {
    std::thread::Builder::new()
        .name("pollen-persist".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
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
                        failed |= matches!(job, Persist::Manifest(..) | Persist::Trust(..));
                        tracing::error!("persisting {job:?}: {e}");
                    }
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
                if !failed {
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
        spawn_persister(store.clone(), rx, slot.clone());
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
    }
}
