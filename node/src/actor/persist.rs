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

/// A job for the persister thread.
#[derive(Debug)]
pub(super) enum Persist {
    Manifest(ManifestId, Vec<u8>),
    /// Answered once every job before it is done.
    Flush(oneshot::Sender<()>),
    Trust(u64, Vec<u8>),
    State(NodeState),
    Gc(BTreeSet<ContentId>),
    /// Delete stored manifests not in the set (releases the core no longer keeps).
    PruneManifests(BTreeSet<ManifestId>),
}

/// Persistence runs in order on one blocking thread, off the actor.
pub(super) fn spawn_persister(store: Arc<Store>, mut rx: mpsc::Receiver<Persist>) {
    std::thread::Builder::new()
        .name("pollen-persist".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                // Take everything queued: keep every manifest, trust root and flush in
                // order, but only the last state, GC and prune (later ones supersede).
                let mut batch = vec![first];
                while let Ok(j) = rx.try_recv() {
                    batch.push(j);
                }
                let last_of =
                    |pred: fn(&Persist) -> bool, batch: &[Persist]| batch.iter().rposition(pred);
                let last_state = last_of(|j| matches!(j, Persist::State(_)), &batch);
                let last_gc = last_of(|j| matches!(j, Persist::Gc(_)), &batch);
                let last_prune = last_of(|j| matches!(j, Persist::PruneManifests(_)), &batch);
                // A flush answers only when the newest state is durable too.
                let newest_state = last_state.and_then(|j| match &batch[j] {
                    Persist::State(st) => Some(st.clone()),
                    _ => None,
                });
                for (i, job) in batch.into_iter().enumerate() {
                    if let (Persist::Flush(_), Some(j), Some(st)) =
                        (&job, last_state, &newest_state)
                        && j > i
                        && let Err(e) = store.save_state(st)
                    {
                        tracing::error!("persisting state: {e}");
                    }
                    let superseded = match &job {
                        Persist::State(_) => Some(i) != last_state,
                        Persist::Gc(_) => Some(i) != last_gc,
                        Persist::PruneManifests(_) => Some(i) != last_prune,
                        _ => false,
                    };
                    if superseded {
                        continue;
                    }
                    let r = match &job {
                        Persist::Manifest(id, b) => store.save_manifest(id, b),
                        Persist::Trust(v, b) => store.save_trust_root(*v, b),
                        Persist::State(s) => store.save_state(s),
                        Persist::Gc(keep) => store.gc(keep, GC_GRACE).map(|_| ()),
                        Persist::Flush(_) => Ok(()),
                        Persist::PruneManifests(keep) => store.manifests().and_then(|all| {
                            for (id, _) in all {
                                if !keep.contains(&id) {
                                    store.remove_manifest(&id)?;
                                }
                            }
                            Ok(())
                        }),
                    };
                    if let Persist::Flush(done) = job {
                        let _ = done.send(());
                        continue;
                    }
                    if let Err(e) = r {
                        tracing::error!("persisting {job:?}: {e}");
                    }
                }
            }
        })
        .expect("spawning the persistence thread");
}
