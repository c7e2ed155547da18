//! Super-seeding of a file nobody else has.

use crate::bitfield::Bitfield;
use crate::ids::{ContentId, NodeId};
use crate::state::exchange::{Ctx, Exchange};
use crate::time::{Instant, Now};
use crate::wire::Message;
use core::time::Duration;
use rand_core::Rng;

/// Super-seeding: the first holder of a file (the node it was published through) shows
/// each peer only its own share of the chunks not yet uploaded, so every chunk leaves the
/// seed once before any leaves twice; once each was uploaded (or uploads stall, or a peer
/// with a share leaves) it announces the whole file.
#[derive(Debug)]
pub(in crate::state) struct SuperSeed {
    /// Chunks uploaded at least once.
    pub(in crate::state) served: Bitfield,
    /// Next chunk to hand out in a share.
    pub(in crate::state) cursor: u32,
    /// Last time a chunk was uploaded for the first time.
    pub(in crate::state) progress: Instant,
}

/// Without a first upload for this long, a super-seed announces everything.
const SUPERSEED_STALL: Duration = Duration::from_secs(5);

impl Exchange {
    /// Start super-seeding `file`, which this node alone holds: show each peer, in a
    /// random order, its share.
    pub(in crate::state) fn start_superseed<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Now,
        file: ContentId,
    ) {
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        f.superseed = Some(SuperSeed {
            served: Bitfield::new(f.total()),
            cursor: 0,
            progress: now.mono,
        });
        let mut peers: Vec<NodeId> = cx.peers.ids().copied().collect();
        // A random order, so who gets the first chunks differs between files.
        for i in (1..peers.len()).rev() {
            let j = (cx.rng.next_u64() % (i as u64 + 1)) as usize;
            peers.swap(i, j);
        }
        for p in peers {
            self.announce_share(cx, p, file);
        }
    }

    /// A peer asked for chunk `index`: a first upload is progress; once every chunk left
    /// once, announce the whole file.
    pub(in crate::state) fn superseed_served<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Now,
        file: ContentId,
        index: u32,
    ) {
        if let Some(f) = self.files.get_mut(&file)
            && let Some(ss) = f.superseed.as_mut()
            && f.have.get(index)
            && !ss.served.get(index)
        {
            ss.served.set(index);
            ss.progress = now.mono;
            if ss.served.count() == f.total() {
                self.reveal(cx, file);
            }
        }
    }

    /// Reveal every super-seeded file without a first upload for [`SUPERSEED_STALL`], or
    /// whose every chunk some peer already holds (it left this node once, or reached that
    /// peer another way: peers also fetch from each other across sites).
    pub(in crate::state) fn reveal_stalled<R: Rng>(&mut self, cx: &mut Ctx<'_, R>, now: Now) {
        let stalled: Vec<ContentId> = self
            .files
            .iter()
            .filter(|(_, f)| {
                f.superseed.as_ref().is_some_and(|s| {
                    now.mono.saturating_duration_since(s.progress) >= SUPERSEED_STALL
                        || f.avail.iter().all(|a| *a > 0)
                })
            })
            .map(|(k, _)| *k)
            .collect();
        for file in stalled {
            self.reveal(cx, file);
        }
    }

    /// Super-seeding: show `peer` the next share of the chunks not uploaded yet (an equal
    /// part for each current peer). In a mesh of several sites every peer is shown the
    /// whole file instead: each site fetches a chunk over the WAN once by the WAN share
    /// rule (see `Exchange::wan_members`), which needs every member of a site to see the
    /// same chunks here (a share is seen by one peer only), and this node's own site
    /// counts it as a member that will fetch its part, which a seed never does. The seed
    /// rule (a seed is asked only for what no other peer has, one chunk at a time) still
    /// spares its uplink.
    pub(in crate::state) fn announce_share<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        peer: NodeId,
        file: ContentId,
    ) {
        let sites = cx.config.site.is_some() && cx.peers.iter().any(|(_, p)| cx.peers.remote(p));
        if sites && let Some(f) = self.files.get(&file) {
            let chunks = f.have.clone();
            cx.send(peer, Message::Have { file, chunks });
            return;
        }
        let npeers = cx.peers.len().max(1) as u32;
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        let total = f.total();
        let Some(ss) = f.superseed.as_mut() else {
            return;
        };
        let unserved = total - ss.served.count();
        let share = unserved.div_ceil(npeers).max(1);
        let mut bits = Bitfield::new(total);
        let mut given = 0;
        let mut k = 0;
        while given < share && k < total {
            let i = (ss.cursor + k) % total;
            k += 1;
            if !ss.served.get(i) {
                bits.set(i);
                given += 1;
            }
        }
        ss.cursor = (ss.cursor + k) % total;
        cx.send(peer, Message::Have { file, chunks: bits });
    }

    /// Stop super-seeding `file`: announce all of it.
    pub(in crate::state) fn reveal<R: Rng>(&mut self, cx: &mut Ctx<'_, R>, file: ContentId) {
        if let Some(f) = self.files.get_mut(&file)
            && f.superseed.take().is_some()
        {
            self.announce_file(cx, file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SuperSeed;
    use crate::bitfield::Bitfield;
    use crate::ids::ContentId;
    use crate::io::Output;
    use crate::state::testkit::{Bench, add_peer, at, bench, peer};
    use crate::wire::Message;

    /// Start super-seeding `f` (of `chunks` chunks) on `m` and announce a share to each of
    /// `peers`: the bitfields shown, in order.
    fn shown_to(m: &mut Bench, f: ContentId, chunks: u32, peers: &[u8]) -> Vec<Bitfield> {
        m.exchange.files_mut().get_mut(&f).unwrap().superseed = Some(SuperSeed {
            served: Bitfield::new(chunks),
            cursor: 0,
            progress: at(0).mono,
        });
        for p in peers {
            m.announce_share(peer(*p), f);
        }
        core::iter::from_fn(|| m.poll_output())
            .filter_map(|o| match o {
                Output::Send {
                    msg: Message::Have { chunks, .. },
                    ..
                } => Some(chunks),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn in_a_mesh_of_sites_every_peer_sees_the_whole_file() {
        let (mut m, f) = bench(10, Some("hq"));
        add_peer(&mut m, 1, Some("hq"), f, &[]);
        add_peer(&mut m, 2, Some("edge"), f, &[]);
        for i in 0..10 {
            m.exchange.files_mut().get_mut(&f).unwrap().have.set(i);
        }
        let shown: Vec<u32> = shown_to(&mut m, f, 10, &[1, 2])
            .iter()
            .map(Bitfield::count)
            .collect();
        assert_eq!(shown, [10, 10]);
    }

    #[test]
    fn shares_split_the_unserved_chunks_between_peers() {
        let (mut m, f) = bench(10, None);
        add_peer(&mut m, 1, None, f, &[]);
        add_peer(&mut m, 2, None, f, &[]);
        let shares = shown_to(&mut m, f, 10, &[1, 2]);
        assert_eq!(shares.len(), 2);
        assert_eq!((shares[0].count(), shares[1].count()), (5, 5));
        assert!(
            (0..10).all(|i| shares[0].get(i) != shares[1].get(i)),
            "disjoint"
        );
        // Once served, a chunk is in no share.
        let ss = m
            .exchange
            .files_mut()
            .get_mut(&f)
            .unwrap()
            .superseed
            .as_mut()
            .unwrap();
        for i in 0..9 {
            ss.served.set(i);
        }
        m.announce_share(peer(1), f);
        match m.poll_output() {
            Some(Output::Send {
                msg: Message::Have { chunks, .. },
                ..
            }) => assert_eq!((chunks.count(), chunks.get(9)), (1, true)),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn reveal_announces_the_whole_file_and_ends_superseeding() {
        let (mut m, f) = bench(4, None);
        add_peer(&mut m, 1, None, f, &[]);
        let fs = m.exchange.files_mut().get_mut(&f).unwrap();
        for i in 0..4 {
            fs.have.set(i);
        }
        fs.superseed = Some(SuperSeed {
            served: Bitfield::new(4),
            cursor: 0,
            progress: at(0).mono,
        });
        m.reveal(f);
        assert!(m.exchange.files()[&f].superseed.is_none());
        assert!(matches!(
            m.poll_output(),
            Some(Output::Send { msg: Message::Have { chunks, .. }, .. }) if chunks.count() == 4
        ));
    }
}
