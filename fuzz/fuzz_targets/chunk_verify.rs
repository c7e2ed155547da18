//! Chunk layout and verification.
//!
//! Input layout (no `arbitrary`; short inputs are padded with zeros):
//!
//! ```text
//! [0]        chunk size: 1 << (14 + b % 3)  (16, 32 or 64 KiB)
//! [1..9]     file size, u64 LE (mod 8 chunks + 1 unless its top bit is set)
//! [9]        number of chaining values, b % 9  (0..=8)
//! [10..42]   content id
//! 32 * n     chaining values, as available
//! 4          chunk index, u32 LE (u32::MAX stands for u64::MAX)
//! rest       chunk data
//! ```
//!
//! Negative side: a `FileSpec` built from those fields (not necessarily consistent: its
//! fields are public and it is `Deserialize`) must never make `check` or `verify_chunk`
//! panic. Positive side: the rest, stretched (cycled) to the size field modulo 128 KiB + 1
//! (or kept whole if longer), hashed at the chosen chunk size with
//! `spec_for_bytes` must give content id = BLAKE3 of the file, pass `check`, verify every
//! chunk, and refuse a chunk with one flipped byte or at the wrong index.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollen_protocol::ContentId;
use pollen_protocol::chunking::{ChunkSize, ChunkingError, FileHasher, FileSpec, spec_for_bytes};

/// Take `N` bytes, zero-padded when the input runs out.
fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = N.min(data.len());
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

fuzz_target!(|input: &[u8]| {
    let mut d = input;
    let [sel] = take::<1>(&mut d);
    let chunk_size = ChunkSize::new(1u64 << (14 + sel % 3)).expect("valid chunk size");
    let c = chunk_size.bytes();
    let raw_size = u64::from_le_bytes(take::<8>(&mut d));
    let size = if raw_size >> 63 == 1 {
        raw_size
    } else {
        raw_size % (8 * c + 1)
    };
    let [ncv] = take::<1>(&mut d);
    let content_id = ContentId(take::<32>(&mut d));
    let mut chaining_values = Vec::new();
    for _ in 0..ncv % 9 {
        if d.is_empty() {
            break;
        }
        chaining_values.push(take::<32>(&mut d));
    }
    let raw_index = u32::from_le_bytes(take::<4>(&mut d));
    let index = if raw_index == u32::MAX {
        u64::MAX
    } else {
        u64::from(raw_index)
    };
    let rest = d;

    // ChunkSize::new on arbitrary values: accepts exactly the powers of two in range.
    for v in [raw_size, 1u64 << (raw_size % 64), u64::from(raw_index)] {
        match ChunkSize::new(v) {
            Ok(cs) => {
                assert!(v.is_power_of_two() && (16 * 1024..=16 * 1024 * 1024).contains(&v));
                assert_eq!(cs.bytes(), v);
            }
            Err(e) => {
                assert_eq!(e, ChunkingError::InvalidChunkSize(v));
                assert!(!v.is_power_of_two() || !(16 * 1024..=16 * 1024 * 1024).contains(&v));
            }
        }
    }

    // Negative side: an arbitrary, possibly inconsistent spec.
    let spec = FileSpec {
        content_id,
        size,
        chunk_size,
        chaining_values,
    };
    let checked = spec.check();
    let _ = spec.chunk_len(index);
    let _ = spec.chunk_offset(index);
    let verified = spec.verify_chunk(index, rest);
    if checked.is_ok() && verified.is_ok() {
        // A consistent spec (the input got the content id or chaining values right) accepted
        // the chunk: it has that index's length.
        assert_eq!(Ok(rest.len() as u64), spec.chunk_len(index));
    }

    // Positive side: a real file of at most 8 x 16 KiB (bounded cost per run: 2 to 8
    // chunks at 16 KiB, 2 to 4 at 32 KiB, 2 at 64 KiB).
    let target_len = (size % (8 * 16 * 1024 + 1)) as usize;
    let mut file = rest.to_vec();
    if file.len() < target_len {
        if rest.is_empty() {
            file.resize(target_len, 0);
        } else {
            while file.len() < target_len {
                let n = rest.len().min(target_len - file.len());
                file.extend_from_slice(&rest[..n]);
            }
        }
    }
    let spec = spec_for_bytes(&file, chunk_size);
    assert_eq!(
        spec.content_id.0,
        *blake3::hash(&file).as_bytes(),
        "content id is not BLAKE3 of the file"
    );
    assert_eq!(spec.size, file.len() as u64);
    assert_eq!(spec.chunk_size, chunk_size);
    spec.check().expect("a file's own spec must check");
    let count = spec.chunk_count();
    assert_eq!(
        count,
        if file.is_empty() {
            1
        } else {
            (file.len() as u64).div_ceil(c)
        }
    );
    assert_eq!(
        spec.chaining_values.len() as u64,
        if count == 1 { 0 } else { count }
    );
    let chunk = |i: u64| {
        let off = spec.chunk_offset(i) as usize;
        let len = spec.chunk_len(i).expect("index in range") as usize;
        &file[off..off + len]
    };
    for i in 0..count {
        spec.verify_chunk(i, chunk(i))
            .expect("a chunk of the file must verify");
    }
    assert!(matches!(
        spec.verify_chunk(count, &[]),
        Err(ChunkingError::IndexOutOfRange { .. })
    ));

    // One flipped byte in one chunk fails.
    let k = u64::from(raw_index) % count;
    let mut bad = chunk(k).to_vec();
    if bad.is_empty() {
        // The empty file: any byte is the wrong length.
        assert!(matches!(
            spec.verify_chunk(k, &[0]),
            Err(ChunkingError::WrongLength { .. })
        ));
    } else {
        let p = (raw_size as usize) % bad.len();
        bad[p] ^= 1 << (ncv % 8);
        assert_eq!(
            spec.verify_chunk(k, &bad),
            Err(ChunkingError::HashMismatch),
            "flipped byte accepted"
        );
    }
    // Chunk k's bytes at another index fail when they differ from that chunk's bytes
    // (the offset is bound into the hash; a cycled file often has equal chunks).
    if count >= 2 {
        let other = (k + 1) % count;
        let good = chunk(k);
        if good != chunk(other) && good.len() as u64 == spec.chunk_len(other).expect("in range") {
            assert!(
                spec.verify_chunk(other, good).is_err(),
                "chunk {k} accepted at index {other}"
            );
        }
    }

    // Streaming in arbitrary pieces gives the same spec (at most ~64 pieces, for speed).
    let piece = (raw_index as usize % 5000 + 1).max(file.len() / 64 + 1);
    let mut h = FileHasher::new(chunk_size);
    for p in file.chunks(piece) {
        h.update(p);
    }
    assert_eq!(
        h.finish(),
        spec,
        "streaming hasher disagrees with spec_for_bytes"
    );
});
