//! The registry of served models: per channel the current version and the previous one,
//! kept warm for an instant rollback. Swaps are atomic: new requests see the new version,
//! requests that hold the old `Arc` finish on it.

use super::model::LoadedModel;
use pollen_protocol::ids::ManifestId;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

#[derive(Debug, Default)]
struct Slot {
    current: Option<Arc<LoadedModel>>,
    previous: Option<Arc<LoadedModel>>,
}

/// The models this node serves: per channel the current version and the previous one,
/// kept warm.
#[derive(Debug, Default)]
pub struct Registry {
    slots: RwLock<BTreeMap<String, Slot>>,
}

impl Registry {
    /// Make `m` the current version of its channel; the current one becomes previous.
    pub fn activate(&self, m: Arc<LoadedModel>) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(m.channel.clone()).or_default();
        if slot
            .current
            .as_ref()
            .is_some_and(|c| c.manifest == m.manifest)
        {
            return;
        }
        slot.previous = slot.current.take();
        slot.current = Some(m);
    }

    /// Go back to the warm previous version if it is `manifest`; false if it is not loaded.
    pub fn roll_back_to(&self, channel: &str, manifest: &ManifestId) -> bool {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.get_mut(channel) else {
            return false;
        };
        if slot
            .previous
            .as_ref()
            .is_some_and(|p| &p.manifest == manifest)
        {
            std::mem::swap(&mut slot.current, &mut slot.previous);
            return true;
        }
        false
    }

    /// Stop serving a channel.
    pub fn remove(&self, channel: &str) {
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(channel);
    }

    /// The current version of a channel.
    pub fn current(&self, channel: &str) -> Option<Arc<LoadedModel>> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(channel)?
            .current
            .clone()
    }

    /// A loaded version (current or previous) of a channel.
    pub fn version(&self, channel: &str, version: u64) -> Option<Arc<LoadedModel>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let slot = slots.get(channel)?;
        [&slot.current, &slot.previous]
            .into_iter()
            .flatten()
            .find(|m| m.version == version)
            .cloned()
    }

    /// Loaded versions of a channel, current first.
    pub fn versions(&self, channel: &str) -> Vec<u64> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .get(channel)
            .map(|s| {
                [&s.current, &s.previous]
                    .into_iter()
                    .flatten()
                    .map(|m| m.version)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every loaded version (current and previous) of every channel, by channel.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .flat_map(|s| [&s.current, &s.previous])
            .flatten()
            .cloned()
            .collect()
    }

    /// Channels with a current version.
    pub fn channels(&self) -> Vec<String> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter(|(_, s)| s.current.is_some())
            .map(|(c, _)| c.clone())
            .collect()
    }
}
