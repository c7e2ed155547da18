//! The chunk scheduler: which chunk to ask which peer for.

use crate::ids::{ContentId, NodeId};
use crate::state::exchange::Request;
use crate::state::exchange::{Ctx, Exchange};
use crate::state::timers::Timer;
use crate::time::Now;
use crate::wire::Message;
use core::time::Duration;
use rand_core::Rng;

impl Exchange {
    /// Request chunk `index` of `file` from `peer` if it is free, wanted and the peer has
    /// room (the rules of [`Mesh::pick_chunk`], for one chunk).
    pub(in crate::state) fn schedule_one<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Now,
        peer: NodeId,
        file: ContentId,
        index: u32,
    ) {
        if cx
            .timers
            .get(Timer::StoreBackoff)
            .is_some_and(|t| now.mono < t)
        {
            return;
        }
        let Some(p) = cx.peers.get(&peer) else {
            return;
        };
        if self.inflight(&peer) >= cx.config.max_inflight_per_peer || p.refused {
            return;
        }
        let (Some(bits), Some(f)) = (self.announced(&peer, &file), self.files.get(&file)) else {
            return;
        };
        if !f.wanted
            || f.have.get(index)
            || !bits.get(index)
            || f.inflight.contains_key(&index)
            || f.pending.contains(&index)
        {
            return;
        }
        let avail = f.avail.get(index as usize).copied().unwrap_or(0);
        if bits.count() == f.total() && avail > f.seeds {
            // A seed serves only chunks no other peer can (see pick_chunk).
            return;
        }
        // Across a WAN link: one at a time, and only what no peer on this site has.
        if cx.peers.remote(p)
            && (self.inflight(&peer) >= cx.config.max_inflight_per_seed
                || cx.peers.iter().any(|(qid, q)| {
                    cx.peers.on_site(q) && self.announced(qid, &file).is_some_and(|b| b.get(index))
                }))
        {
            return;
        }
        self.request(cx, now, peer, file, index);
    }

    /// Issue chunk requests to peers with free slots.
    pub(in crate::state) fn schedule<R: Rng>(&mut self, cx: &mut Ctx<'_, R>, now: Now) {
        if cx
            .timers
            .get(Timer::StoreBackoff)
            .is_some_and(|t| now.mono < t)
        {
            return;
        }
        cx.timers.stop(Timer::StoreBackoff);
        let max = cx.config.max_inflight_per_peer;
        if self.files.values().all(|f| !f.wanted || f.complete()) {
            return;
        }
        let my_site = cx.config.site.clone();
        // Peers with free slots, best first: same site, lower RTT, random salt.
        let mut order: Vec<(bool, Duration, u64, NodeId)> = cx
            .peers
            .iter()
            .filter(|(id, _)| {
                self.inflight(id) < max && self.haves.get(*id).is_some_and(|h| !h.is_empty())
            })
            .map(|(id, p)| {
                let same = my_site.is_some() && p.site == my_site;
                (!same, p.rtt.unwrap_or(Duration::from_secs(1)), p.salt, *id)
            })
            .collect();
        order.sort();
        let files: Vec<ContentId> = self
            .files
            .iter()
            .filter(|(_, f)| f.wanted && !f.complete())
            .map(|(k, _)| *k)
            .collect();
        for (_, _, _, peer) in order {
            for file in &files {
                loop {
                    let slots = cx
                        .peers
                        .get(&peer)
                        .map_or(0, |_| max.saturating_sub(self.inflight(&peer)));
                    if slots == 0 {
                        break;
                    }
                    let Some(index) = self.pick_chunk(cx, now, &peer, file) else {
                        break;
                    };
                    self.request(cx, now, peer, *file, index);
                }
            }
        }
    }

    /// The chunk to ask `peer` for next from `file`, or None: the rarest missing chunk it
    /// has that is neither in flight nor pending; from a seed only chunks no non-seed peer
    /// has, and from a peer on another site only chunks no peer on this site has, each one
    /// at a time; when every missing chunk is in flight, an old request to another peer to
    /// duplicate (endgame).
    pub(in crate::state) fn pick_chunk<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Now,
        peer: &NodeId,
        file: &ContentId,
    ) -> Option<u32> {
        let p = cx.peers.get(peer)?;
        let bits = self.announced(peer, file)?;
        let f = self.files.get(file)?;
        let n = f.total();
        if n == 0 {
            return None;
        }
        let is_seed = bits.count() == n;
        // Keep few requests queued at a seed: what it uploads twice is wasted on its uplink.
        if is_seed && self.inflight(peer) >= cx.config.max_inflight_per_seed {
            return None;
        }
        // A peer on another site is behind a WAN link: ask it only for chunks no peer on
        // this site has (those come over the LAN), one at a time.
        let remote = cx.peers.remote(p);
        if remote && self.inflight(peer) >= cx.config.max_inflight_per_seed {
            return None;
        }
        let local: Vec<u8> = if remote {
            let mut u = vec![0u8; f.have.as_bytes().len()];
            for (qid, q) in cx.peers.iter() {
                if cx.peers.on_site(q)
                    && let Some(b) = self.announced(qid, file)
                {
                    for (x, y) in u.iter_mut().zip(b.as_bytes()) {
                        *x |= *y;
                    }
                }
            }
            u
        } else {
            Vec::new()
        };
        // Chunk order from a random start; a byte (8 chunks) where the peer has nothing this
        // node lacks is skipped at once.
        let (pb, hb) = (bits.as_bytes(), f.have.as_bytes());
        let start = (cx.rng.next_u64() % u64::from(n)) as u32;
        let mut best: Option<(u16, u32)> = None;
        let mut k = 0u32;
        while k < n {
            let i = (start + k) % n;
            let b = (i / 8) as usize;
            let cand = pb.get(b).copied().unwrap_or(0)
                & !hb.get(b).copied().unwrap_or(0xff)
                & !local.get(b).copied().unwrap_or(0);
            if cand == 0 {
                // Next byte boundary (or the wrap to chunk 0).
                k += (8 - i % 8).min(n - i);
                continue;
            }
            k += 1;
            if cand & (1 << (i % 8)) == 0 || f.inflight.contains_key(&i) || f.pending.contains(&i) {
                continue;
            }
            let avail = f.avail[i as usize];
            // Seeds serve only chunks no non-seed peer can.
            if is_seed && avail.saturating_sub(f.seeds) > 0 {
                continue;
            }
            if best.is_none_or(|(a, _)| avail < a) {
                best = Some((avail, i));
            }
        }
        if let Some((_, i)) = best {
            return Some(i);
        }
        let any_free_missing = hb.iter().enumerate().any(|(b, byte)| {
            let missing = !byte;
            missing != 0
                && (0..8u32).any(|bit| {
                    let i = b as u32 * 8 + bit;
                    missing & (1 << bit) != 0
                        && i < n
                        && !f.inflight.contains_key(&i)
                        && !f.pending.contains(&i)
                })
        });
        if any_free_missing {
            return None;
        }
        // Endgame: every missing chunk is in flight; duplicate old requests.
        let mut pick = None;
        for (i, ids) in &f.inflight {
            if !bits.get(*i) || ids.len() >= 2 {
                continue;
            }
            let old = ids.iter().all(|id| {
                self.requests.get(id).is_some_and(|r| {
                    r.peer != *peer
                        && now.mono.saturating_duration_since(r.sent) >= cx.config.endgame_after
                })
            });
            if old {
                pick = Some(*i);
                break;
            }
        }
        pick
    }

    pub(in crate::state) fn request<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Now,
        peer: NodeId,
        file: ContentId,
        index: u32,
    ) {
        let id = self.next_request;
        self.next_request += 1;
        let bytes = self.chunk_bytes(&file, index);
        let deadline = self.request_deadline(cx.config, &peer, now.mono, bytes);
        self.requests.insert(
            id,
            Request {
                peer,
                file,
                index,
                sent: now.mono,
                deadline,
            },
        );
        cx.timers.set_request(deadline, id);
        if cx.peers.contains(&peer) {
            *self.asked.entry(peer).or_default() += 1;
        }
        if let Some(f) = self.files.get_mut(&file) {
            f.inflight.entry(index).or_default().push(id);
        }
        cx.send(peer, Message::Request { id, file, index });
    }
}

#[cfg(test)]
mod tests {
    use crate::state::testkit::{add_peer, at, bench, peer, requests};

    #[test]
    fn pick_chunk_takes_the_rarest_chunk_the_peer_has() {
        let (mut m, f) = bench(8, None);
        add_peer(&mut m, 1, None, f, &[0, 1, 2, 3]);
        add_peer(&mut m, 2, None, f, &[0, 1, 3]);
        add_peer(&mut m, 3, None, f, &[0, 1, 3]);
        // Chunk 2 is held by peer 1 only: it goes first, whatever the random start.
        for _ in 0..20 {
            assert_eq!(m.pick_chunk(at(0), &peer(1), &f), Some(2));
        }
    }

    #[test]
    fn pick_chunk_skips_chunks_held_pending_or_in_flight() {
        let (mut m, f) = bench(4, None);
        add_peer(&mut m, 1, None, f, &[0, 1, 2]);
        m.exchange.files_mut().get_mut(&f).unwrap().have.set(0);
        m.exchange
            .files_mut()
            .get_mut(&f)
            .unwrap()
            .pending
            .insert(1);
        assert_eq!(m.pick_chunk(at(0), &peer(1), &f), Some(2));
        m.request(at(0), peer(1), f, 2);
        // Chunk 3 is missing and free but peer 1 lacks it: no endgame yet, nothing to ask.
        assert_eq!(m.pick_chunk(at(0), &peer(1), &f), None);
    }

    #[test]
    fn a_seed_is_asked_only_for_chunks_no_other_peer_has_and_one_at_a_time() {
        let (mut m, f) = bench(6, None);
        add_peer(&mut m, 1, None, f, &[0, 1, 2, 3, 4, 5]); // the seed
        add_peer(&mut m, 2, None, f, &[0, 1, 2, 3]);
        for _ in 0..20 {
            let c = m.pick_chunk(at(0), &peer(1), &f).unwrap();
            assert!(c == 4 || c == 5, "seed asked for {c}");
        }
        m.request(at(0), peer(1), f, 4);
        assert_eq!(
            m.pick_chunk(at(0), &peer(1), &f),
            None,
            "one request at a seed"
        );
    }

    #[test]
    fn a_peer_across_the_wan_is_asked_only_for_what_this_site_lacks_one_at_a_time() {
        let (mut m, f) = bench(8, Some("lan"));
        add_peer(&mut m, 1, Some("lan"), f, &[0, 1, 2, 3]);
        add_peer(&mut m, 2, Some("far"), f, &[0, 1, 2, 3, 4, 5]);
        for _ in 0..20 {
            let c = m.pick_chunk(at(0), &peer(2), &f).unwrap();
            assert!(
                c == 4 || c == 5,
                "WAN peer asked for {c}, which the LAN has"
            );
        }
        m.request(at(0), peer(2), f, 4);
        assert_eq!(
            m.pick_chunk(at(0), &peer(2), &f),
            None,
            "one at a time over the WAN"
        );
        // The same rule for a single announced chunk.
        m.schedule_one(at(0), peer(2), f, 5);
        assert!(requests(&mut m).iter().all(|r| r.1 == 4));
    }

    #[test]
    fn schedule_asks_the_same_site_first_and_bounds_requests_per_peer() {
        let (mut m, f) = bench(16, Some("lan"));
        let all: Vec<u32> = (0..15).collect(); // not seeds: nobody has chunk 15
        add_peer(&mut m, 1, Some("far"), f, &all);
        add_peer(&mut m, 2, Some("lan"), f, &all);
        m.schedule(at(0));
        let sent = requests(&mut m);
        let max = m.config.max_inflight_per_peer;
        let local: Vec<_> = sent.iter().filter(|r| r.0 == peer(2)).collect();
        assert_eq!(local.len(), max, "the LAN peer's slots are filled");
        assert_eq!(
            sent[..max].iter().filter(|r| r.0 == peer(2)).count(),
            max,
            "LAN first"
        );
        assert!(
            sent.iter().all(|r| r.0 != peer(1)),
            "the WAN peer holds nothing the LAN lacks: {sent:?}"
        );
        assert_eq!(m.exchange.inflight(&peer(2)), max);
        m.schedule(at(1));
        assert!(requests(&mut m).is_empty(), "no slot left");
    }

    #[test]
    fn endgame_duplicates_old_requests_to_another_peer() {
        let (mut m, f) = bench(2, None);
        m.config.max_inflight_per_seed = 2;
        add_peer(&mut m, 1, None, f, &[0, 1]);
        add_peer(&mut m, 2, None, f, &[0, 1]);
        m.request(at(0), peer(1), f, 0);
        m.request(at(0), peer(1), f, 1);
        assert_eq!(m.pick_chunk(at(100), &peer(2), &f), None, "too early");
        let late = at(m.config.endgame_after.as_millis() as u64);
        let c = m.pick_chunk(late, &peer(2), &f).unwrap();
        assert!(c < 2);
        assert_eq!(
            m.pick_chunk(late, &peer(1), &f),
            None,
            "never to the same peer"
        );
        m.request(late, peer(2), f, c);
        assert_eq!(m.pick_chunk(late, &peer(2), &f), Some(1 - c));
        m.request(late, peer(2), f, 1 - c);
        // Two requests per chunk are the most: a third peer gets nothing.
        add_peer(&mut m, 3, None, f, &[0, 1]);
        assert_eq!(m.pick_chunk(late, &peer(3), &f), None);
    }
}
