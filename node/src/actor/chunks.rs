//! The chunk pipeline: file specs, opening files in the store, writing received chunks on
//! the blocking pool, and batching the syncs that make them durable before the core
//! counts them (the design's durability rule).

use super::{Actor, Done, MAX_SPECS};
use crate::net::FrameBytes;
use crate::store::StoreError;
use anyhow::Result;
use libp2p::PeerId;
use pollen_protocol::chunking::FileSpec;
use pollen_protocol::ids::{ContentId, NodeId};
use pollen_protocol::io::{ChunkFailure, Command, Input};
use pollen_protocol::wire::Bitfield;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Actor {
    pub(super) fn spec(&mut self, file: &ContentId) -> Option<Arc<FileSpec>> {
        if let Some(s) = self.specs.get(file) {
            return Some(s.clone());
        }
        let s = Arc::new(self.mesh.chunk_spec(file)?.clone());
        if self.specs.len() > MAX_SPECS {
            self.specs.clear();
        }
        self.specs.insert(*file, s.clone());
        Some(s)
    }

    /// Register a file with the store and report its durable chunks to the core.
    /// `blocking`: at startup, do it inline.
    pub(super) fn open_file(&mut self, file: ContentId, blocking: bool) {
        if !self.opened.insert(file) {
            return;
        }
        let Some(spec) = self.spec(&file) else { return };
        let store = self.store.clone();
        if blocking {
            let r = store.open_file(&spec);
            self.on_opened(file, r);
        } else {
            let tx = self.done_tx.clone();
            tokio::task::spawn_blocking(move || {
                let r = store.open_file(&spec);
                let _ = tx.blocking_send(Done::Opened(file, r));
            });
        }
    }

    pub(super) fn on_opened(&mut self, file: ContentId, r: Result<Bitfield, StoreError>) {
        match r {
            Ok(bits) => {
                // Every chunk durable but no blob: killed between the last sync and the
                // rename. Finish it now.
                if bits.count() == bits.len()
                    && !self.store.has_blob(&file)
                    && let Some(spec) = self.spec(&file)
                {
                    let store = self.store.clone();
                    let tx = self.done_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let r = store.finish(&spec);
                        let _ = tx.blocking_send(Done::Finished(file, r));
                    });
                }
                if bits.count() > 0 {
                    let _ = self.core_command(Command::LocalChunks { file, chunks: bits });
                }
            }
            Err(e) => {
                self.opened.remove(&file);
                self.store_error(format!("cannot open file {}: {e}", file.short()), &e);
            }
        }
    }

    pub(super) fn store_error(&mut self, msg: String, _e: &StoreError) {
        self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        self.error(msg);
    }

    /// A chunk frame from `peer`: written on the blocking pool (which verifies it) if it
    /// answers a request we sent that peer and the core still needs it; dropped otherwise,
    /// before any hashing. `bytes` (the frame's share of the frame budget) is held until
    /// the write is done.
    pub(super) fn on_chunk(
        &mut self,
        peer: PeerId,
        header: pollen_protocol::wire::ChunkHeader,
        frame: crate::net::FrameBuf,
        offset: usize,
        bytes: FrameBytes,
    ) {
        let Some(c) = self.peers.get_mut(&peer) else {
            return;
        };
        if !c.up {
            return;
        }
        if c.requested.remove(&header.id) != Some((header.file, header.index)) {
            self.metrics
                .chunks_unsolicited
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let from = c.node;
        let key = (header.file, header.index);
        if !self.mesh.needs_chunk(&header.file, header.index)
            || self.writing.contains(&key)
            || self.pending_sync.contains_key(&key)
        {
            self.metrics
                .chunks_duplicate
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(spec) = self.spec(&header.file) else {
            return;
        };
        self.writing.insert(key);
        let store = self.store.clone();
        let tx = self.done_tx.clone();
        let lock = self.write_lock.clone();
        tokio::task::spawn_blocking(move || {
            // One chunk write at a time: concurrent pwrites to one file only contend on
            // the inode lock (measured: 7% of the receiver's time spinning on it).
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let result = store.write_chunk(&spec, header.index, &frame[offset..]);
            drop((frame, bytes));
            let _ = tx.blocking_send(Done::Written {
                from,
                file: header.file,
                index: header.index,
                result,
            });
        });
    }

    /// Start a sync if chunks wait for one and none runs. Syncs batch every chunk written
    /// since the last one.
    pub(super) fn maybe_sync(&mut self) {
        if self.syncing || self.pending_sync.is_empty() {
            return;
        }
        self.syncing = true;
        let store = self.store.clone();
        let tx = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let r = store.sync_all();
            let _ = tx.blocking_send(Done::Synced(r));
        });
    }

    /// A chunk write finished: on success it waits for the next sync before the core
    /// counts it; a corrupt chunk is the sender's fault, any other error the store's.
    pub(super) fn on_written(
        &mut self,
        from: NodeId,
        file: ContentId,
        index: u32,
        result: Result<(), StoreError>,
    ) {
        self.writing.remove(&(file, index));
        match result {
            Ok(()) => {
                self.pending_sync.insert((file, index), from);
                // Free the request slot now; the chunk counts once synced.
                self.handle(Input::ChunkReceived { from, file, index });
                self.maybe_sync();
            }
            Err(StoreError::Corrupt(msg)) => {
                self.metrics.chunks_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "corrupt chunk {index} of {} from {}: {msg}",
                    file.short(),
                    from.short()
                );
                self.handle(Input::ChunkFailed {
                    from,
                    file,
                    index,
                    reason: ChunkFailure::Corrupt,
                });
            }
            Err(e) => {
                let msg = format!("cannot store chunk {index} of {}: {e}", file.short());
                self.store_error(msg.clone(), &e);
                self.handle(Input::ChunkFailed {
                    from,
                    file,
                    index,
                    reason: ChunkFailure::Store(msg),
                });
            }
        }
    }

    /// A sync finished: every chunk it made durable is reported to the core; after a
    /// failure, the next sync waits a second.
    pub(super) fn on_synced(&mut self, result: Result<Vec<(ContentId, Vec<u32>)>, StoreError>) {
        self.syncing = false;
        match result {
            Ok(done) => {
                // Chunks of files the core dropped meanwhile will never be reported.
                let dropped: Vec<(ContentId, u32)> = self
                    .pending_sync
                    .keys()
                    .filter(|(f, _)| self.mesh.chunk_spec(f).is_none())
                    .copied()
                    .collect();
                for k in dropped {
                    self.pending_sync.remove(&k);
                }
                for (file, indices) in done {
                    for index in indices {
                        let from = self.pending_sync.remove(&(file, index));
                        self.metrics.chunks_verified.fetch_add(1, Ordering::Relaxed);
                        if let Some(f) = from {
                            self.metrics.chunk_from(&f.to_hex());
                        }
                        self.handle(Input::ChunkStored { from, file, index });
                    }
                }
            }
            Err(e) => {
                let msg = format!("store sync failed: {e}");
                self.store_error(msg, &e);
                // A persistent failure (full disk, read-only filesystem) must not
                // spin: retry after a pause.
                self.syncing = true;
                let tx = self.done_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = tx.send(Done::RetrySync).await;
                });
                return;
            }
        }
        self.maybe_sync();
    }
}
