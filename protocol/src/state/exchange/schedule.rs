//! The chunk scheduler: which chunk to ask which peer for.

use crate::bitfield::Bitfield;
use crate::ids::{ContentId, NodeId};
use crate::state::exchange::Request;
use crate::state::exchange::{Ctx, Exchange};
use crate::state::timers::Timer;
use crate::time::{Instant, Now};
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
        if self.inflight(&peer) >= cx.config.max_inflight_per_peer
            || p.refused
            || self.backing_off(&peer, now.mono)
        {
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
        if bits.count() == f.total() {
            // A seed serves only chunks no other peer we may ask can (see pick_chunk).
            let others = if cx.peers.remote(p) {
                avail > f.seeds
            } else {
                self.site_partial_holders(cx, &peer, &file)
                    .get(index as usize / 8)
                    .is_some_and(|b| b & (1 << (index % 8)) != 0)
            };
            if others {
                return;
            }
        }
        // Across a WAN link: one at a time, only what no peer on this site has, and only
        // what this node fetches for the site.
        if cx.peers.remote(p) {
            if self.inflight(&peer) >= cx.config.max_inflight_per_seed
                || f.hinted(index, now.mono)
                || cx.peers.iter().any(|(qid, q)| {
                    cx.peers.on_site(q) && self.announced(qid, &file).is_some_and(|b| b.get(index))
                })
            {
                return;
            }
            // The site's progress is sampled by `pick_chunk` (every schedule pass and
            // tick), not here: this runs for every chunk a peer announces.
            if let Some(members) = self.wan_members(cx, &file)
                && wan_owner(&members, &file, index) != cx.me
            {
                return;
            }
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
        let has_site = cx.config.site.is_some();
        // Peers with free slots, best first: same site, lower RTT, random salt.
        let mut order: Vec<(bool, Duration, u64, NodeId)> = cx
            .peers
            .iter()
            .filter(|(id, _)| {
                self.inflight(id) < max
                    && self.haves.get(*id).is_some_and(|h| !h.is_empty())
                    && !self.backing_off(id, now.mono)
            })
            .map(|(id, p)| {
                let same = has_site && p.same_site;
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
        let remote = cx.peers.remote(p);
        // A peer on another site is behind a WAN link: ask it only for chunks no peer on
        // this site has (those come over the LAN), one at a time, and of those only the
        // ones this node fetches for its site.
        let (local, members) = if remote {
            let local = self.site_holds(cx, file);
            self.note_site_progress(cx, now.mono, file, &local);
            (local, self.wan_members(cx, file))
        } else {
            (Vec::new(), None)
        };
        let bits = self.announced(peer, file)?;
        let f = self.files.get(file)?;
        let n = f.total();
        if n == 0 {
            return None;
        }
        let is_seed = bits.count() == n;
        // A seed on this site serves only what no other peer on this site can: a partial
        // holder across the WAN does not count, as chunks this site holds are not asked
        // across the WAN (that would leave such a chunk with no source at all).
        let site_partial = if is_seed && !remote {
            self.site_partial_holders(cx, peer, file)
        } else {
            Vec::new()
        };
        // Keep few requests queued at a seed: what it uploads twice is wasted on its uplink.
        if is_seed && self.inflight(peer) >= cx.config.max_inflight_per_seed {
            return None;
        }
        if remote && self.inflight(peer) >= cx.config.max_inflight_per_seed {
            return None;
        }
        if remote {
            let cap = wan_cap(cx.config, members.as_ref().map(Vec::len));
            let wan = self
                .requests
                .values()
                .filter(|r| cx.peers.get(&r.peer).is_some_and(|q| cx.peers.remote(q)))
                .count();
            if wan >= cap {
                return None;
            }
        }
        // Chunk order from a random start; a byte (8 chunks) where the peer has nothing this
        // node lacks is skipped at once.
        let (pb, hb) = (bits.as_bytes(), f.have.as_bytes());
        let start = (cx.rng.next_u64() % u64::from(n)) as u32;
        let mut best: Option<((bool, u16), u32)> = None;
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
            if cand & (1 << (i % 8)) == 0
                || f.inflight.contains_key(&i)
                || f.pending.contains(&i)
                || (remote && f.hinted(i, now.mono))
            {
                continue;
            }
            if let Some(m) = &members
                && wan_owner(m, file, i) != cx.me
            {
                continue;
            }
            let avail = f.avail[i as usize];
            // Seeds serve only chunks no non-seed peer can.
            if is_seed
                && if remote {
                    avail.saturating_sub(f.seeds) > 0
                } else {
                    site_partial.get(b).is_some_and(|x| x & (1 << (i % 8)) != 0)
                }
            {
                continue;
            }
            // Across the WAN, chunks another site is not fetching come first.
            let key = (remote && f.fetched_elsewhere(i, now.mono), avail);
            if best.is_none_or(|(a, _)| key < a) {
                best = Some((key, i));
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
        // Endgame: every missing chunk is in flight; duplicate old requests (not over the
        // WAN while the share rule holds: a WAN chunk takes long, and its copy would cross
        // the site's link twice).
        if members.is_some() {
            return None;
        }
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

    /// The chunks of `file` held by peers on this site (other than `except`) that do not
    /// hold all of it, as bitfield bytes.
    fn site_partial_holders<R>(
        &self,
        cx: &Ctx<'_, R>,
        except: &NodeId,
        file: &ContentId,
    ) -> Vec<u8> {
        self.site_union(cx, file, |q, b| q != except && b.count() < b.len())
    }

    /// The chunks of `file` some usable peer on this site announced, as bitfield bytes.
    fn site_holds<R>(&self, cx: &Ctx<'_, R>, file: &ContentId) -> Vec<u8> {
        self.site_union(cx, file, |_, _| true)
    }

    /// The union of what the usable peers on this site that pass `keep` announced of
    /// `file`, as bitfield bytes.
    fn site_union<R>(
        &self,
        cx: &Ctx<'_, R>,
        file: &ContentId,
        keep: impl Fn(&NodeId, &Bitfield) -> bool,
    ) -> Vec<u8> {
        let len = self.files.get(file).map_or(0, |f| f.have.as_bytes().len());
        let mut u = vec![0u8; len];
        for (qid, q) in cx.peers.iter() {
            if cx.peers.on_site(q)
                && let Some(b) = self.announced(qid, file)
                && keep(qid, b)
            {
                for (x, y) in u.iter_mut().zip(b.as_bytes()) {
                    *x |= *y;
                }
            }
        }
        u
    }

    /// The WAN share rule, for sites without a gateway: of the chunks of `file` no peer on
    /// this site holds, each is fetched over the WAN by one member of the site only, and
    /// reaches the others over the LAN. Members are this node and the site peers that
    /// announced the file; a chunk's fetcher is the member with the highest rendezvous
    /// score for it ([`wan_owner`]), so nodes that see different members still agree on
    /// the chunks of the members they share. Returns the members, or None when the rule
    /// does not apply: no site, `wan_share_grace` zero, or lifted for this file (see
    /// [`Exchange::note_site_progress`]).
    pub(in crate::state) fn wan_members<R>(
        &self,
        cx: &Ctx<'_, R>,
        file: &ContentId,
    ) -> Option<Vec<NodeId>> {
        if cx.config.site.is_none() || cx.config.wan_share_grace.is_zero() {
            return None;
        }
        if self.files.get(file)?.wan_open {
            return None;
        }
        let mut members = vec![cx.me];
        for (qid, q) in cx.peers.iter() {
            if cx.peers.on_site(q) && self.announced(qid, file).is_some() {
                members.push(*qid);
            }
        }
        Some(members)
    }

    /// A fetcher may never come (it cannot reach the WAN, it left, or views differ): the
    /// WAN share rule is lifted for `file` once what the site holds of it (`local`, with
    /// this node's own chunks) has not grown for `wan_share_grace` (or twice the slowest
    /// WAN chunk measured, if longer) while this node has no request in flight for it.
    /// Lifted, it stays so until the file completes.
    pub(in crate::state) fn note_site_progress<R>(
        &mut self,
        cx: &Ctx<'_, R>,
        now: Instant,
        file: &ContentId,
        local: &[u8],
    ) {
        if cx.config.site.is_none() || cx.config.wan_share_grace.is_zero() {
            return;
        }
        let Some(f) = self.files.get_mut(file) else {
            return;
        };
        if f.wan_open {
            return;
        }
        let held: u32 = f
            .have
            .as_bytes()
            .iter()
            .zip(local.iter().chain(core::iter::repeat(&0)))
            .map(|(a, b)| (a | b).count_ones())
            .sum();
        if held != f.site_held.0 || f.site_held.1 == Instant::ZERO {
            f.site_held = (held, now);
            return;
        }
        if !f.inflight.is_empty() || !f.pending.is_empty() {
            return;
        }
        // A member's request across the WAN may still run (its fetch hint): the site is
        // at work, however long a chunk takes on a link many members share.
        if super::secs(now) < f.hints_until {
            f.site_held.1 = now;
            return;
        }
        let chunk_kib = u64::from(f.spec().chunk_size.get()).div_ceil(1024);
        let since = f.site_held.1;
        // Twice the slowest chunk a WAN peer has been measured to take.
        let slowest = cx
            .peers
            .iter()
            .filter(|(_, p)| cx.peers.remote(p))
            .filter_map(|(id, _)| self.served.get(id))
            .map(|s| s.nanos_per_kib.saturating_mul(chunk_kib))
            .max()
            .unwrap_or(0);
        let grace = cx
            .config
            .wan_share_grace
            .max(Duration::from_nanos(slowest.saturating_mul(2)));
        if now.saturating_duration_since(since) >= grace
            && let Some(f) = self.files.get_mut(file)
        {
            f.wan_open = true;
        }
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
        // Across the WAN, under the share rule: tell the site (see `on_fetching`).
        if !cx.config.wan_share_grace.is_zero()
            && cx.peers.get(&peer).is_some_and(|p| cx.peers.remote(p))
        {
            let millis = u32::try_from(deadline.saturating_duration_since(now.mono).as_millis())
                .unwrap_or(u32::MAX);
            // The site leaves the chunk to this node; the other sites' peers ask the
            // WAN for other chunks first (the source's uplink carries it once).
            for q in cx
                .peers
                .site_peers()
                .into_iter()
                .chain(cx.peers.remote_peers(&peer))
            {
                cx.send(
                    q,
                    Message::Fetching {
                        file,
                        index,
                        millis,
                    },
                );
            }
        }
        if let Some(f) = self.files.get_mut(&file) {
            f.inflight.entry(index).or_default().push(id);
        }
        cx.send(peer, Message::Request { id, file, index });
    }
}

/// Chunk requests a node keeps in flight across the WAN: the site's share
/// (`site_inflight_wan`) split among the `members` fetching for it under the share rule,
/// at least `max_inflight_wan` each; all of it when the node fetches alone (`None`: the
/// rule is lifted or does not apply).
pub(in crate::state) fn wan_cap(config: &crate::state::Config, members: Option<usize>) -> usize {
    let site = config.site_inflight_wan.max(1);
    members.map_or(site, |m| {
        site.div_ceil(m.max(1)).max(config.max_inflight_wan.max(1))
    })
}

/// The member of `members` that fetches chunk `index` of `file` over the WAN for its site:
/// the highest rendezvous score (a hash of member, file and chunk), ties to the lower id.
pub(in crate::state) fn wan_owner(members: &[NodeId], file: &ContentId, index: u32) -> NodeId {
    let f = u64::from_le_bytes(file.0[..8].try_into().unwrap_or_default());
    let salt = f.rotate_left(29) ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut best = (0u64, members[0]);
    for m in members {
        let k = u64::from_le_bytes(m.0[..8].try_into().unwrap_or_default());
        let s = splitmix(k ^ salt);
        if s > best.0 || (s == best.0 && *m < best.1) {
            best = (s, *m);
        }
    }
    best.1
}

/// SplitMix64's finaliser: a fixed, well-mixed 64-bit hash.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::wan_cap;
    use crate::state::testkit::{add_peer, at, bench, peer, requests};

    /// A `Busy` answer frees the request; the peer keeps its announced chunks but is not
    /// asked again until `busy_backoff` has passed. Any other refusal means the peer lacks
    /// the chunk.
    #[test]
    fn a_busy_peer_keeps_its_chunks_and_is_asked_again_after_the_backoff() {
        use crate::state::testkit::requests_with_ids;
        use crate::wire::RejectReason;
        let (mut m, f) = bench(6, None);
        add_peer(&mut m, 1, None, f, &[0, 1, 2, 3, 4]);
        add_peer(&mut m, 2, None, f, &[0, 1, 2, 3, 4]);
        m.schedule(at(0));
        let sent = requests_with_ids(&mut m);
        assert_eq!(sent.len(), 4, "two per peer: {sent:?}");
        let (_, id, index) = *sent.iter().find(|r| r.0 == peer(1)).expect("one to peer 1");
        let avail = m.exchange.files()[&f].avail[index as usize];
        {
            let (x, mut cx) = m.cx();
            x.on_reject(&mut cx, at(5).mono, peer(1), id, RejectReason::Busy);
            assert_eq!(x.inflight(&peer(1)), 1);
            assert!(x.announced(&peer(1), &f).unwrap().get(index));
        }
        assert_eq!(m.exchange.files()[&f].avail[index as usize], avail);
        // Within the backoff: nothing more for peer 1 (peer 2 has no slot free).
        m.schedule(at(20));
        assert!(requests(&mut m).is_empty());
        // After it: peer 1 is asked again.
        m.schedule(at(5 + 30 + 1));
        assert_eq!(
            requests(&mut m).iter().filter(|r| r.0 == peer(1)).count(),
            1
        );
        // Not found: the peer's announcement of that chunk is dropped.
        let (_, id2, index2) = *sent.iter().find(|r| r.0 == peer(2)).expect("one to peer 2");
        let (x, mut cx) = m.cx();
        x.on_reject(&mut cx, at(40).mono, peer(2), id2, RejectReason::NotFound);
        assert!(!x.announced(&peer(2), &f).unwrap().get(index2));
    }

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
    fn wan_owner_gives_each_chunk_one_member_and_keeps_it_when_others_leave() {
        use super::wan_owner;
        let (_, f) = bench(1, None);
        let members = [peer(0), peer(1), peer(2)];
        let mut owned = [0u32; 3];
        for i in 0..300 {
            let o = wan_owner(&members, &f, i);
            let k = members.iter().position(|m| *m == o).expect("a member");
            owned[k] += 1;
            // Rendezvous: a member that does not own the chunk leaving changes nothing, and
            // the order members are listed in does not matter.
            let gone = members[(k + 1) % 3];
            let rest: Vec<_> = members.iter().copied().filter(|m| *m != gone).collect();
            assert_eq!(wan_owner(&rest, &f, i), o);
            let rev: Vec<_> = members.iter().rev().copied().collect();
            assert_eq!(wan_owner(&rev, &f, i), o);
        }
        for n in owned {
            assert!((60..=140).contains(&n), "shares {owned:?} of 300 chunks");
        }
    }

    #[test]
    fn a_site_fetches_each_chunk_over_the_wan_once_until_it_stalls() {
        use super::wan_owner;
        let (mut m, f) = bench(32, Some("lan"));
        // Peer 1 is on this site and wants the file (it announced an empty bitfield);
        // peers 2 and 3 across the WAN hold all of it.
        add_peer(&mut m, 1, Some("lan"), f, &[]);
        let all: Vec<u32> = (0..32).collect();
        add_peer(&mut m, 2, Some("far"), f, &all);
        add_peer(&mut m, 3, Some("far"), f, &all);
        let members = [peer(0), peer(1)];
        let mine: Vec<u32> = all
            .iter()
            .copied()
            .filter(|c| wan_owner(&members, &f, *c) == peer(0))
            .collect();
        assert!(!mine.is_empty() && mine.len() < 32, "{mine:?}");
        // Only this node's chunks are asked across the WAN, while the site progresses.
        for t in 0..mine.len() as u64 {
            let now = at(1 + t * 500);
            let c = m.pick_chunk(now, &peer(2), &f).expect("a chunk of mine");
            assert!(mine.contains(&c), "asked the WAN for {c}, peer 1's");
            m.request(now, peer(2), f, c);
            let (x, mut cx) = m.cx();
            x.on_chunk_stored(&mut cx, now.mono, Some(peer(2)), f, c);
            let _ = requests(&mut m);
        }
        // Every chunk of mine is here; peer 1 never brings its own: the site stalls.
        let grace = m.config.wan_share_grace.as_millis() as u64;
        let t = 1 + mine.len() as u64 * 500;
        assert_eq!(m.pick_chunk(at(t), &peer(2), &f), None);
        assert_eq!(m.pick_chunk(at(t + grace - 1), &peer(2), &f), None);
        // Past the grace with nothing in flight, the rule is lifted for this file.
        let c = m.pick_chunk(at(t + grace), &peer(2), &f).expect("lifted");
        assert!(!mine.contains(&c));
        assert!(m.exchange.files_mut()[&f].wan_open);
    }

    /// The fetch hints a bench sent: (to, index, millis).
    fn hints(m: &mut crate::state::testkit::Bench) -> Vec<(crate::ids::NodeId, u32, u32)> {
        let mut v = Vec::new();
        while let Some(o) = m.poll_output() {
            if let crate::io::Output::Send {
                to,
                msg: crate::wire::Message::Fetching { index, millis, .. },
            } = o
            {
                v.push((to, index, millis));
            }
        }
        v
    }

    #[test]
    fn a_request_across_the_wan_is_hinted_to_the_site_and_the_other_sites() {
        let (mut m, f) = bench(8, Some("lan"));
        add_peer(&mut m, 1, Some("lan"), f, &[]);
        add_peer(&mut m, 2, Some("far"), f, &[0, 1, 2, 3, 4, 5, 6, 7]);
        add_peer(&mut m, 3, Some("lan"), f, &[0]);
        add_peer(&mut m, 4, Some("far"), f, &[]);
        add_peer(&mut m, 5, Some("other"), f, &[]);
        m.request(at(0), peer(2), f, 5);
        let timeout = m.config.request_timeout.as_millis() as u32;
        let mut sent = hints(&mut m);
        sent.sort();
        // Not to the source's site: its peers hold the chunk or fetch it from the source
        // over their LAN.
        let mut want = vec![
            (peer(1), 5, timeout),
            (peer(3), 5, timeout),
            (peer(5), 5, timeout),
        ];
        want.sort();
        assert_eq!(sent, want);
        // A request on the LAN is not hinted.
        m.request(at(0), peer(3), f, 0);
        assert!(hints(&mut m).is_empty());
    }

    /// A chunk another site said it is fetching across the WAN is asked across the WAN
    /// from here last (two sites would pull it through the same uplink), for the span of
    /// that site's request; the LAN is not affected.
    #[test]
    fn a_chunk_another_site_fetches_is_asked_across_the_wan_last() {
        let (mut m, f) = bench(4, Some("lan"));
        add_peer(&mut m, 2, Some("far"), f, &[0, 1, 2, 3]);
        add_peer(&mut m, 5, Some("other"), f, &[]);
        add_peer(&mut m, 6, Some("far"), f, &[0, 1, 2, 3]);
        m.exchange.files_mut().get_mut(&f).unwrap().wan_open = true;
        for i in [0, 1, 2] {
            let (x, cx) = m.cx();
            x.on_fetching(&cx, at(0).mono, peer(5), f, i, 10_000);
        }
        // Not a site hint: nothing is held back for this site.
        assert!(m.exchange.files_mut()[&f].fetch_hints.is_empty());
        for _ in 0..20 {
            assert_eq!(m.pick_chunk(at(1_000), &peer(2), &f), Some(3));
        }
        // Past the span, in any order again.
        assert!((0..50).any(|_| m.pick_chunk(at(12_000), &peer(2), &f) != Some(3)));
        // Only an order: with chunk 3 in flight, the others are asked across the WAN.
        m.request(at(1_000), peer(2), f, 3);
        let c = m.pick_chunk(at(1_000), &peer(6), &f);
        assert!(c.is_some_and(|c| c < 3), "{c:?}");
    }

    /// The site's WAN requests split among its members, at least two each; a node
    /// fetching alone has the site's share.
    #[test]
    fn the_sites_wan_requests_are_split_among_its_members() {
        let c = crate::state::Config::default();
        assert_eq!((c.site_inflight_wan, c.max_inflight_wan), (8, 2));
        assert_eq!(wan_cap(&c, None), 8);
        assert_eq!(wan_cap(&c, Some(1)), 8);
        assert_eq!(wan_cap(&c, Some(3)), 3);
        assert_eq!(wan_cap(&c, Some(6)), 2);
        assert_eq!(wan_cap(&c, Some(200)), 2);
    }

    /// A node keeps at most its cap of requests in flight across the WAN, to all peers on
    /// other sites together; the LAN is not counted.
    #[test]
    fn requests_across_the_wan_are_capped_in_total() {
        let (mut m, f) = bench(8, Some("lan"));
        add_peer(&mut m, 1, Some("lan"), f, &[7]);
        for p in [2, 3, 4] {
            add_peer(&mut m, p, Some("far"), f, &[0, 1, 2, 3, 4, 5, 6, 7]);
        }
        // The rule lifted: this node fetches alone, with the site's whole share.
        m.exchange.files_mut().get_mut(&f).unwrap().wan_open = true;
        m.config.site_inflight_wan = 2;
        m.request(at(0), peer(2), f, 1);
        assert!(m.pick_chunk(at(0), &peer(3), &f).is_some());
        m.request(at(0), peer(3), f, 2);
        assert_eq!(m.pick_chunk(at(0), &peer(4), &f), None);
        assert_eq!(
            m.pick_chunk(at(0), &peer(1), &f),
            Some(7),
            "the LAN is not capped"
        );
    }

    #[test]
    fn a_hinted_chunk_is_left_to_its_fetcher_while_its_request_may_run() {
        let (mut m, f) = bench(4, Some("lan"));
        add_peer(&mut m, 1, Some("lan"), f, &[]);
        add_peer(&mut m, 2, Some("far"), f, &[0, 1, 2, 3]);
        add_peer(&mut m, 3, Some("far"), f, &[0, 1, 2, 3]);
        // The rule off (lifted), so every chunk is this node's to fetch but the hinted.
        m.exchange.files_mut().get_mut(&f).unwrap().wan_open = true;
        let hint = |m: &mut crate::state::testkit::Bench, from: u8, index: u32, t: u64| {
            let (x, cx) = m.cx();
            x.on_fetching(&cx, at(t).mono, peer(from), f, index, 10_000);
        };
        for i in [0, 1, 2] {
            hint(&mut m, 1, i, 0);
        }
        // A peer across the WAN cannot hint for this site.
        hint(&mut m, 2, 3, 0);
        for _ in 0..20 {
            assert_eq!(m.pick_chunk(at(5_000), &peer(2), &f), Some(3));
        }
        m.schedule_one(at(5_000), peer(3), f, 1);
        assert!(requests(&mut m).is_empty(), "hinted chunk 1 asked");
        // Past the hinted span (10 s, rounded up to the second), it is free again.
        let c = m.pick_chunk(at(11_001), &peer(2), &f).unwrap();
        assert!(c < 4);
        // A second hint for a chunk holds it back again; a third is past the cap.
        hint(&mut m, 1, 0, 12_000);
        for _ in 0..20 {
            assert_ne!(m.pick_chunk(at(13_000), &peer(2), &f), Some(0));
        }
        hint(&mut m, 1, 0, 24_000);
        assert!(
            (0..50).any(|_| m.pick_chunk(at(25_000), &peer(2), &f) == Some(0)),
            "a hint past the cap honoured"
        );
    }

    #[test]
    fn a_node_without_a_site_keeps_no_fetch_hints() {
        let (mut m, f) = bench(4, None);
        add_peer(&mut m, 1, None, f, &[]);
        let (x, cx) = m.cx();
        x.on_fetching(&cx, at(0).mono, peer(1), f, 2, 10_000);
        let st = &m.exchange.files_mut()[&f];
        assert!(st.fetch_hints.is_empty() && st.hints_until == 0);
    }

    /// A hint for a chunk past the file's end, from a peer whose site is unknown, or from
    /// a peer not connected is dropped: nothing is kept, nothing is held back.
    #[test]
    fn hints_out_of_range_or_from_unknown_peers_keep_nothing() {
        let (mut m, f) = bench(4, Some("lan"));
        add_peer(&mut m, 1, Some("lan"), f, &[]);
        add_peer(&mut m, 2, Some("far"), f, &[]);
        add_peer(&mut m, 3, None, f, &[]);
        let (x, cx) = m.cx();
        for from in [1, 2] {
            x.on_fetching(&cx, at(0).mono, peer(from), f, 4, 10_000);
            x.on_fetching(&cx, at(0).mono, peer(from), f, u32::MAX, 10_000);
        }
        x.on_fetching(&cx, at(0).mono, peer(3), f, 1, 10_000);
        x.on_fetching(&cx, at(0).mono, peer(9), f, 1, 10_000);
        let st = &m.exchange.files_mut()[&f];
        assert!(st.fetch_hints.is_empty() && st.hints_until == 0);
        assert!(st.elsewhere.is_empty());
    }

    #[test]
    fn the_share_rule_holds_while_a_members_request_across_the_wan_may_run() {
        let (mut m, f) = bench(32, Some("lan"));
        add_peer(&mut m, 1, Some("lan"), f, &[]);
        let all: Vec<u32> = (0..32).collect();
        add_peer(&mut m, 2, Some("far"), f, &all);
        // Peer 1 fetches a chunk it owns across a slow link: 60 s, far past the grace.
        let members = [peer(0), peer(1)];
        let theirs = all
            .iter()
            .copied()
            .find(|c| super::wan_owner(&members, &f, *c) == peer(1))
            .unwrap();
        let (x, cx) = m.cx();
        x.on_fetching(&cx, at(0).mono, peer(1), f, theirs, 60_000);
        // This node has taken all of its own chunks (marked held): it is idle.
        for c in all
            .iter()
            .filter(|c| super::wan_owner(&members, &f, **c) == peer(0))
        {
            m.exchange.files_mut().get_mut(&f).unwrap().have.set(*c);
        }
        let grace = m.config.wan_share_grace.as_millis() as u64;
        for t in [1, grace + 1, 30_000, 60_000] {
            assert_eq!(m.pick_chunk(at(t), &peer(2), &f), None, "at {t} ms");
            assert!(!m.exchange.files_mut()[&f].wan_open, "lifted at {t} ms");
        }
        // Its request has run out and the site made no progress for the grace: lifted.
        assert_eq!(m.pick_chunk(at(61_001), &peer(2), &f), None);
        assert!(m.pick_chunk(at(61_001 + grace), &peer(2), &f).is_some());
        assert!(m.exchange.files_mut()[&f].wan_open);
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
