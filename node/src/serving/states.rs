//! What a node tells clients about each version of a model it knows: `READY`, `LOADING`
//! or `UNAVAILABLE`, and why (the states of Triton's model repository index).
//!
//! The versions listed for a channel are the releases this node retains for it (the
//! core keeps a bounded number per channel) plus any version the [`super::Registry`]
//! still serves. Each gets the first state below that fits:
//!
//! | state | when | reason |
//! |---|---|---|
//! | `READY` | loaded and passed its checks here: the current version, or the previous one kept warm for an instant rollback | empty for the current version |
//! | `LOADING` | its activation runs (trial in a child process, loading, golden checks) | the step and how long it has run |
//! | `UNAVAILABLE` | it failed to activate here | its error class and detail |
//! | `UNAVAILABLE` | its rollout failed its gate | rolled back |
//! | `UNAVAILABLE` | this node is pinned to another version | the pin |
//! | `UNAVAILABLE` | an older version than the one served | superseded |
//! | `UNAVAILABLE` | its rollout has not reached this node (or is halted) | the stage it waits for |
//! | `LOADING` | this node is to serve it and its files are arriving | chunks held of the total |
//! | `LOADING` | its files are complete and it waits to be switched to | what it waits for |
//!
//! Every release gets a variant (the core falls back to the first one when none names
//! this device), so "no variant for this device" is never a state here.

use super::classify::label;
use pollen_protocol::rollout::ErrorClass;
use std::time::Duration;

/// The state of a model version on this node, as Triton's repository index names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ModelState {
    /// Loaded and answering.
    Ready,
    /// Being fetched or activated.
    Loading,
    /// Not served here, for the reason given.
    Unavailable,
}

impl ModelState {
    /// `READY`, `LOADING` or `UNAVAILABLE`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Ready => "READY",
            ModelState::Loading => "LOADING",
            ModelState::Unavailable => "UNAVAILABLE",
        }
    }
}

/// A step of an activation in progress, for the `LOADING` reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Its file is being finished in the store.
    Finishing = 0,
    /// The trial run in a child process under the memory budget.
    Trial = 1,
    /// Loading, optimising and warming up in the node.
    Loading = 2,
    /// The golden checks in the node.
    Checking = 3,
}

impl Phase {
    /// The phase stored as `n` (see [`Phase`]'s discriminants); `Finishing` for any other.
    pub fn from_u8(n: u8) -> Phase {
        match n {
            1 => Phase::Trial,
            2 => Phase::Loading,
            3 => Phase::Checking,
            _ => Phase::Finishing,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Phase::Finishing => "finishing its file in the store",
            Phase::Trial => {
                "trial run in a child process under the memory budget (load, optimise, \
                 warm-up, golden checks)"
            }
            Phase::Loading => "loading, optimising and warming up in the node",
            Phase::Checking => "running its golden checks in the node",
        }
    }
}

/// Where a version stands in the [`super::Registry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Not loaded.
    No,
    /// The current version: requests without a version go to it.
    Current,
    /// Loaded and warm, behind the current version.
    Previous,
}

/// What the node knows of one version of a channel: the inputs of [`state_of`].
#[derive(Clone, Debug)]
pub struct VersionFacts {
    /// The version.
    pub version: u64,
    /// Its place in the registry.
    pub served: Served,
    /// Its activation runs: the step, and for how long.
    pub activating: Option<(Phase, Duration)>,
    /// It failed to activate here: class and detail.
    pub failed: Option<(ErrorClass, String)>,
    /// Its rollout failed its gate.
    pub rolled_back: bool,
    /// An operator halted its rollout.
    pub halted: bool,
    /// Its rollout admits this node (an open stage holds it).
    pub admitted: bool,
    /// This node's stage in its plan (0-based; `None`: in none).
    pub my_stage: Option<usize>,
    /// Why its next stage is not open, if one is closed.
    pub waiting: Option<String>,
    /// Chunks of its files held, and in total.
    pub chunks: (u64, u64),
    /// The version the node is pinned to on this channel, if any.
    pub pinned: Option<u64>,
    /// The version requests without a version go to, if any.
    pub current: Option<u64>,
}

/// A version's state and reason on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionState {
    /// The version.
    pub version: u64,
    /// Its state.
    pub state: ModelState,
    /// Why (empty for the current version).
    pub reason: String,
    /// The class of its failed activation, if that is why.
    pub class: Option<ErrorClass>,
}

/// The state of one version; see the module doc for the order of the rules.
pub fn state_of(f: &VersionFacts) -> VersionState {
    let (state, reason, class) = rule(f);
    VersionState {
        version: f.version,
        state,
        reason,
        class,
    }
}

fn rule(f: &VersionFacts) -> (ModelState, String, Option<ErrorClass>) {
    use ModelState::{Loading, Ready, Unavailable};
    match f.served {
        Served::Current => return (Ready, String::new(), None),
        Served::Previous => {
            let current = f.current.map_or(String::new(), |c| format!(" {c}"));
            let mut why = format!(
                "kept warm for an instant rollback; requests without a version go to \
                 version{current}"
            );
            if f.rolled_back {
                why.push_str(" (this version was rolled back: its rollout failed its gate)");
            }
            return (Ready, why, None);
        }
        Served::No => {}
    }
    if let Some((phase, ran)) = f.activating {
        let why = format!(
            "activating: {} ({:.1} s so far)",
            phase.text(),
            ran.as_secs_f64()
        );
        return (Loading, why, None);
    }
    if let Some((class, detail)) = &f.failed {
        let why = format!(
            "failed to activate on this node ({}): {detail}",
            label(*class)
        );
        return (Unavailable, why, Some(*class));
    }
    if f.rolled_back {
        return (
            Unavailable,
            "rolled back: its rollout failed its gate".into(),
            None,
        );
    }
    if let Some(p) = f.pinned.filter(|p| *p != f.version) {
        return (
            Unavailable,
            format!("this node is pinned to version {p}"),
            None,
        );
    }
    if let Some(c) = f.current.filter(|c| *c > f.version) {
        return (Unavailable, format!("superseded by version {c}"), None);
    }
    // The pinned version is served whatever its rollout says.
    let chosen = f.admitted || f.pinned == Some(f.version);
    if !chosen {
        let why = if f.halted {
            "its rollout is halted by the operator".to_string()
        } else {
            match (f.my_stage, &f.waiting) {
                (None, _) => "its rollout does not include this node".to_string(),
                (Some(s), Some(w)) => {
                    format!("not rolled out to this node yet (its stage {}: {w})", s + 1)
                }
                (Some(s), None) => format!("not rolled out to this node yet (its stage {})", s + 1),
            }
        };
        return (Unavailable, why, None);
    }
    let (have, total) = f.chunks;
    if have < total {
        return (Loading, format!("fetching: {have} of {total} chunks"), None);
    }
    (
        Loading,
        "its files are here; waiting to be switched to (the node first hears its peers' \
         view of the rollouts)"
            .into(),
        None,
    )
}

/// Most versions a not-ready answer describes (newest first).
const MAX_DESCRIBED: usize = 4;

/// The `error` of a 503 for a request without a version to a channel with no current
/// version: each known version's state and reason, newest first. `None` if the channel
/// has no versions here.
pub fn not_ready_text(name: &str, states: &[VersionState]) -> Option<String> {
    if states.is_empty() {
        return None;
    }
    let loading = states.iter().any(|s| s.state == ModelState::Loading);
    let parts: Vec<String> = states
        .iter()
        .rev()
        .take(MAX_DESCRIBED)
        .map(|s| {
            format!(
                "version {} is {}: {}",
                s.version,
                s.state.as_str(),
                s.reason
            )
        })
        .collect();
    let head = if loading {
        format!("model '{name}' is loading on this node")
    } else {
        format!("model '{name}' has no version ready on this node")
    };
    Some(format!("{head}; {}", parts.join("; ")))
}

/// The `error` of a 503 for a request to one version that is not ready.
pub fn version_not_ready_text(name: &str, s: &VersionState) -> String {
    let what = match s.state {
        ModelState::Loading => "loading",
        _ => "unavailable",
    };
    format!(
        "model '{name}' version {} is {what}: {}",
        s.version, s.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(version: u64) -> VersionFacts {
        VersionFacts {
            version,
            served: Served::No,
            activating: None,
            failed: None,
            rolled_back: false,
            halted: false,
            admitted: true,
            my_stage: Some(0),
            waiting: None,
            chunks: (4, 4),
            pinned: None,
            current: None,
        }
    }

    fn state(f: &VersionFacts) -> (ModelState, String) {
        let s = state_of(f);
        (s.state, s.reason)
    }

    #[test]
    fn each_rule_in_order() {
        use ModelState::*;
        let mut f = facts(2);
        f.served = Served::Current;
        f.failed = Some((ErrorClass::GoldenMismatch, "x".into()));
        assert_eq!(state(&f), (Ready, String::new()), "served wins");

        let mut f = facts(1);
        f.served = Served::Previous;
        f.current = Some(2);
        let (s, why) = state(&f);
        assert_eq!(s, Ready);
        assert!(why.contains("go to version 2"), "{why}");

        let mut f = facts(3);
        f.activating = Some((Phase::Trial, Duration::from_millis(1500)));
        f.current = Some(2);
        let (s, why) = state(&f);
        assert_eq!(s, Loading);
        assert!(why.contains("trial run") && why.contains("1.5 s"), "{why}");

        let mut f = facts(1);
        f.failed = Some((ErrorClass::UnsupportedOp, "Unimplemented(ZipMap)".into()));
        f.current = Some(2);
        let s = state_of(&f);
        assert_eq!(s.state, Unavailable);
        assert_eq!(s.class, Some(ErrorClass::UnsupportedOp));
        assert_eq!(
            s.reason,
            "failed to activate on this node (UnsupportedOp): Unimplemented(ZipMap)"
        );

        let mut f = facts(3);
        f.rolled_back = true;
        assert_eq!(state(&f).0, Unavailable);
        assert!(state(&f).1.contains("rolled back"));

        let mut f = facts(3);
        f.pinned = Some(2);
        assert_eq!(
            state(&f),
            (Unavailable, "this node is pinned to version 2".into())
        );

        let mut f = facts(1);
        f.current = Some(2);
        assert_eq!(state(&f), (Unavailable, "superseded by version 2".into()));

        let mut f = facts(3);
        f.admitted = false;
        f.my_stage = Some(1);
        f.waiting = Some("gate: 1 of 2 healthy reports".into());
        assert_eq!(
            state(&f),
            (
                Unavailable,
                "not rolled out to this node yet (its stage 2: gate: 1 of 2 healthy reports)"
                    .into()
            )
        );
        f.halted = true;
        assert!(state(&f).1.contains("halted"));
        f.halted = false;
        f.my_stage = None;
        assert!(state(&f).1.contains("does not include this node"));

        let mut f = facts(3);
        f.chunks = (3, 10);
        assert_eq!(state(&f), (Loading, "fetching: 3 of 10 chunks".into()));
        // A pin serves its version whatever the rollout says.
        f.admitted = false;
        f.pinned = Some(3);
        assert_eq!(state(&f).0, Loading);

        let f = facts(3);
        let (s, why) = state(&f);
        assert_eq!(s, Loading);
        assert!(why.contains("waiting to be switched to"), "{why}");
    }

    #[test]
    fn not_ready_answers_name_each_version_newest_first() {
        let v = |version, state, reason: &str| VersionState {
            version,
            state,
            reason: reason.into(),
            class: None,
        };
        assert_eq!(not_ready_text("m", &[]), None);
        let failed = v(1, ModelState::Unavailable, "failed (GoldenMismatch): off");
        let text = not_ready_text("m", std::slice::from_ref(&failed)).unwrap();
        assert_eq!(
            text,
            "model 'm' has no version ready on this node; version 1 is UNAVAILABLE: failed \
             (GoldenMismatch): off"
        );
        let loading = v(2, ModelState::Loading, "fetching: 1 of 2 chunks");
        let text = not_ready_text("m", &[failed, loading.clone()]).unwrap();
        assert!(
            text.starts_with("model 'm' is loading on this node; version 2 is LOADING"),
            "{text}"
        );
        assert!(text.ends_with("version 1 is UNAVAILABLE: failed (GoldenMismatch): off"));
        assert_eq!(
            version_not_ready_text("m", &loading),
            "model 'm' version 2 is loading: fetching: 1 of 2 chunks"
        );
    }
}
