//! # pollen-keys: the operator's side of Pollen's trust
//!
//! Key files, trust roots (creation, rotation, offline co-signing), manifest building and
//! signing, and node certificates. The `pollen` binary exposes all of it as `pollen keys …`;
//! `pollen publish` builds on [`manifest`].
//!
//! Everything written here is checked with the very code a node runs (the
//! `pollen-protocol` crate), so an object this crate writes as complete is one nodes accept.
//! Unlike the sans-IO core this crate reads files, the OS random source and the wall clock
//! (functions take `now` as a [`pollen_protocol::UnixTime`] argument where it matters, so
//! tests pick the time; [`time::unix_now`] reads the clock).
//!
//! ## Layout
//!
//! * [`keyfile`]: secret key files (generate, load) and public keys on the command line.
//! * [`files`]: reading and writing signed object files.
//! * [`trust`]: trust roots: create, rotate, co-sign, describe.
//! * [`manifest`]: hash files, build, sign, co-sign and describe manifests.
//! * [`golden`]: golden checks from the ONNX test-data layout; inline or as a golden file.
//! * [`onnx_pb`]: the bits of ONNX protobuf golden data needs (`TensorProto`, graph I/O).
//! * [`cert`]: node certificates signed by the fleet key.
//! * [`time`]: wall clock, durations and dates for humans.
//!
//! ## File formats
//!
//! * Secret key file: the text `pollen-secret-key-v1\n<64 hex digits>\n` (the 32-byte
//!   ed25519 seed), mode 0600, never overwritten ([`keyfile`]).
//! * Public key: 64 hex digits, on the command line or alone in a file.
//! * Trust root, manifest, node certificate: the binary envelope of
//!   [`pollen_protocol::signing::Signed::to_bytes`], byte for byte what travels on the
//!   wire ([`files`]).
//!
//! Errors are [`anyhow::Error`]s whose messages name the file or argument at fault.

pub mod cert;
pub mod files;
pub mod golden;
pub mod keyfile;
pub mod manifest;
pub mod onnx_pb;
pub mod time;
pub mod trust;

pub use keyfile::{
    generate_key, generate_key_file, load_key_file, parse_public_key, public_key, write_key_file,
};
pub use trust::Completion;

#[cfg(test)]
mod tests;
