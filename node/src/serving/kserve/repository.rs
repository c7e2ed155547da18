//! Triton's model repository extension, its index only (`POST /v2/repository/index`):
//! the request (`{}`, `{"ready": true}`, or an empty body, which Triton's own HTTP
//! client sends) and the answer, a JSON array of `{"name", "version", "state", "reason"}`.
//! Models are loaded and unloaded by rollouts, so the extension's load and unload calls
//! are not served, and the server metadata does not claim the extension.

use super::KserveError;
use crate::serving::states::{ModelState, VersionState};
use serde_json::Value;

/// Largest repository index request body: 4 KiB (the request has one boolean field).
pub const MAX_INDEX_BODY: usize = 4096;

/// Read an index request: `Ok(true)` when only ready models are asked for. An empty (or
/// blank) body asks for everything; otherwise the body must be a JSON object whose
/// optional `ready` is a boolean (other fields are ignored).
pub fn parse_index_request(body: &[u8]) -> Result<bool, KserveError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    let bad = |m: String| KserveError::IndexRequest(m);
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let Value::Object(fields) = v else {
        return Err(bad("the body must be a JSON object".into()));
    };
    match fields.get("ready") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad("'ready' must be a boolean".into())),
    }
}

/// One entry of the index (and of a model metadata's `states`).
pub fn index_entry(name: &str, s: &VersionState) -> Value {
    serde_json::json!({
        "name": name,
        "version": s.version.to_string(),
        "state": s.state.as_str(),
        "reason": s.reason,
    })
}

/// The index: every version of every channel, by channel then version; only the `READY`
/// ones if `ready_only`.
pub fn index_json(channels: &[(String, Vec<VersionState>)], ready_only: bool) -> Value {
    Value::Array(
        channels
            .iter()
            .flat_map(|(name, versions)| {
                versions
                    .iter()
                    .filter(move |s| !ready_only || s.state == ModelState::Ready)
                    .map(move |s| index_entry(name, s))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_requests_as_triton_clients_send_them() {
        assert!(
            !parse_index_request(b"").unwrap(),
            "tritonclient's empty body"
        );
        assert!(!parse_index_request(b" \n").unwrap());
        assert!(!parse_index_request(b"{}").unwrap());
        assert!(parse_index_request(br#"{"ready": true}"#).unwrap());
        assert!(!parse_index_request(br#"{"ready": false, "repository_name": ""}"#).unwrap());
        for bad in [&b"[]"[..], br#"{"ready": "yes"}"#, b"{", b"\xff"] {
            let e = parse_index_request(bad).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(
                e.to_string()
                    .starts_with("malformed repository index request"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_index_lists_each_version_with_its_state() {
        let s = |version, state, reason: &str| VersionState {
            version,
            state,
            reason: reason.into(),
            class: None,
        };
        let channels = vec![
            (
                "a".to_string(),
                vec![
                    s(1, ModelState::Ready, ""),
                    s(2, ModelState::Unavailable, "failed"),
                ],
            ),
            ("b".to_string(), vec![s(7, ModelState::Loading, "fetching")]),
        ];
        assert_eq!(
            index_json(&channels, false),
            serde_json::json!([
                {"name": "a", "version": "1", "state": "READY", "reason": ""},
                {"name": "a", "version": "2", "state": "UNAVAILABLE", "reason": "failed"},
                {"name": "b", "version": "7", "state": "LOADING", "reason": "fetching"},
            ])
        );
        assert_eq!(
            index_json(&channels, true),
            serde_json::json!([{"name": "a", "version": "1", "state": "READY", "reason": ""}])
        );
    }
}
