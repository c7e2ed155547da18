//! Tunables ([`Config`]) and the fixed bounds and penalties of the core.

use crate::manifest::DeviceProfile;
use core::time::Duration;

/// Chunk sends a driver keeps waiting while all its upload slots are taken; a request past
/// them is answered [`crate::wire::RejectReason::Busy`] and the receiver asks another
/// holder for [`Config::busy_backoff`]. The node's `queued_uploads` and the simulator's
/// default. lan-1000, time to 100% over the bound, seeds 1-8: 1.76 (1.65-1.86) queuing
/// every request, 1.59 (1.53-1.62) with 2. Tried on seed 1 while a pipelined request
/// behind its receiver's upload also counted: 1.53 with 2, 1.54 with 4, 1.57 with 8, and
/// 2.29 answering Busy whenever no slot was free (0): a receiver needs its next chunk
/// queued behind the one on its way.
pub const QUEUED_UPLOADS: usize = 2;

#[derive(Clone, Debug)]
pub struct Config {
    /// This node's site (LAN), preferred for chunk exchange.
    pub site: Option<String>,
    /// What this device offers, for choosing a variant.
    pub device: DeviceProfile,
    /// Peers that get each tick's batch of new health reports (manifests and instructions
    /// follow the gossip tree instead; see the module doc of [`crate::state`]).
    pub eager_fanout: usize,
    /// Wait after an `IHave` before pulling (lets the eager push arrive first).
    pub ihave_delay: Duration,
    /// Most peers tracked; further `PeerUp`s are disconnected.
    pub max_peers: usize,
    /// Chunk requests in flight per peer: the chunk a peer is sending and the next one.
    /// A sender serves each receiver one chunk at a time, so a deeper queue only binds
    /// chunks to a sender while another holder may come free first, and new chunks spread
    /// a hop slower (lan-1000, time to 100% over the bound: 1.60 with 1, 1.76 with 2, 2.04
    /// with 4, 2.51 with 8). One in flight leaves a round trip and the sender's turnaround
    /// between chunks, which real nodes pay (a 6-node LAN took 7.6 s against 7.1 s);
    /// two do not (7.0 s). Seeds and peers across the WAN get one (`max_inflight_per_seed`).
    pub max_inflight_per_peer: usize,
    /// Chunk requests in flight to a peer that holds the whole file, while other peers hold
    /// parts of it (seeds should push new chunks, not the same ones to everybody).
    pub max_inflight_per_seed: usize,
    /// Chunk requests a site keeps in flight across the WAN (to peers on other sites), all
    /// its members together: under the WAN share rule each member keeps
    /// `site_inflight_wan / members` (at least `max_inflight_wan`), a node fetching alone
    /// (the rule lifted, or one gateway) all of it. The members share one WAN link: a few
    /// chunks keep it busy (a 1 MiB chunk takes 0.4 s of a 20 Mbit/s link, a round trip
    /// 0.1 s), where more only queue, arrive later, time out, and leave other sites no time
    /// to see what is fetched and pick other chunks.
    pub site_inflight_wan: usize,
    /// The least a member of a site keeps in flight across the WAN under the share rule
    /// (see `site_inflight_wan`).
    pub max_inflight_wan: usize,
    /// A request unanswered for this long is retried elsewhere.
    pub request_timeout: Duration,
    /// A peer that answers a request `Busy` (its uploads are all taken and others already
    /// wait: [`QUEUED_UPLOADS`]) is not asked again for this long, so the request goes to
    /// a peer with an upload free. Tried on lan-1000 (seed 2, the first rule of
    /// [`QUEUED_UPLOADS`]): 1.56 with 30 ms, 1.62 with 10 ms, 1.65 with 100 ms.
    pub busy_backoff: Duration,
    /// In the endgame, a request older than this is duplicated to another peer.
    pub endgame_after: Duration,
    /// The WAN share rule: on a site, each chunk no site peer holds is fetched over the WAN
    /// by one member of the site (see `Exchange::wan_members`). It is lifted for a file
    /// once the site has made no progress on it for this long (or twice the slowest WAN
    /// chunk measured, if longer) while this node has nothing in flight for it. Zero
    /// turns the rule off.
    pub wan_share_grace: Duration,
    /// Anti-entropy period (one random peer per period).
    pub anti_entropy_interval: Duration,
    /// Rollout evaluation period while a rollout is in progress.
    pub rollout_tick: Duration,
    /// Reports kept per release (K of the deterministic sample).
    pub report_sample_size: usize,
    /// Manifests kept per channel (the active one is always kept).
    pub retained_versions: usize,
    /// Most channels followed.
    pub max_channels: usize,
    /// Most files tracked.
    pub max_files: usize,
    /// Penalty score at which a peer is disconnected.
    pub disconnect_score: u32,
    /// One penalty point is forgiven per this much time, so what bans a peer is misconduct
    /// at a rate, not a lifetime total: a peer on a slow or flaky link that times out now
    /// and then is never banned for it, while 100 points at once still ban at once.
    /// Zero: penalties never decay.
    pub penalty_decay: Duration,
    /// Most pending pulls (`IHave`s waiting for their delay).
    pub max_pending_wants: usize,
    /// After the local store fails to keep a chunk (full disk), downloads pause this long.
    pub store_retry: Duration,
    /// Most pinned releases (see [`Command::Pin`](crate::io::Command::Pin)).
    pub max_pinned: usize,
    /// How far ahead of this node's clock a signed timestamp (health report, instruction)
    /// may be. Later ones are refused for now, without penalty: anti-entropy offers them
    /// again once this clock has caught up.
    pub max_clock_skew: Duration,
    /// A node whose latest report for a release is older than this counts as stale (not
    /// heard from lately) in the status; gate decisions do not depend on it.
    pub report_ttl: Duration,
    /// After restoring releases from disk ([`Command::Restore`](crate::io::Command::Restore)), a node switches to a newer
    /// version only once it has caught up with a peer (received the answer to its digest,
    /// and with it any halt it missed while offline), or after this long without one.
    /// Rollbacks never wait; a fresh node has nothing stale and does not wait.
    pub catch_up: Duration,
    /// Download releases this node is not (yet) in the stage for, so it can switch at once
    /// when its stage opens.
    pub prefetch: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            site: None,
            device: DeviceProfile::default(),
            eager_fanout: 4,
            ihave_delay: Duration::from_millis(200),
            max_peers: 512,
            max_inflight_per_peer: 2,
            max_inflight_per_seed: 1,
            site_inflight_wan: 8,
            max_inflight_wan: 2,
            request_timeout: Duration::from_secs(30),
            busy_backoff: Duration::from_millis(30),
            endgame_after: Duration::from_secs(2),
            wan_share_grace: Duration::from_secs(2),
            anti_entropy_interval: Duration::from_secs(20),
            rollout_tick: Duration::from_secs(1),
            report_sample_size: 256,
            retained_versions: 4,
            max_channels: 256,
            max_files: 1024,
            disconnect_score: 100,
            // A timed-out request (2 points) is forgiven in a minute, a corrupt chunk (40)
            // in 20 minutes.
            penalty_decay: Duration::from_secs(30),
            max_pending_wants: 1024,
            prefetch: true,
            max_pinned: 256,
            max_clock_skew: Duration::from_secs(10 * 60),
            report_ttl: Duration::from_secs(5 * 60),
            catch_up: Duration::from_secs(10),
            store_retry: Duration::from_secs(5),
        }
    }
}

/// Most instructions held for releases not known yet.
pub(super) const MAX_PENDING_INSTRUCTIONS: usize = 64;

/// Most equivocating manifests remembered per channel.
pub(super) const MAX_EQUIVOCATIONS: usize = 64;

/// Penalty for a message that does not decode or is forged: disconnect at once.
pub(super) const PENALTY_SEVERE: u32 = 100;
/// Penalty for a corrupt chunk.
pub(super) const PENALTY_CORRUPT: u32 = 40;
/// Penalty for a protocol misstep an honest but confused peer could make.
pub(super) const PENALTY_MINOR: u32 = 5;
/// Penalty for a request that timed out.
pub(super) const PENALTY_TIMEOUT: u32 = 2;
