//! Decoding hostile frames allocates at most a small multiple of the frame size.
//!
//! A counting global allocator records the peak of live bytes while each frame decodes.
#![allow(unsafe_code)] // a GlobalAlloc wrapper is unsafe by definition

use pollen_protocol::wire::{MAX_CONTROL_FRAME, decode_frame};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size(), Ordering::SeqCst) + l.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
        // SAFETY: p was allocated by System with layout l.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn peak_while(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst) - base
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[test]
fn hostile_length_claims_do_not_allocate_beyond_the_frame() {
    // Every control kind, with a list or byte-string length claim of 2^40 followed by a full
    // frame of filler: nested claims at each position.
    let mut worst = 0f64;
    for kind in 1u8..=13 {
        for filler in [0x00u8, 0x01, 0x7f, 0xff] {
            let mut f = vec![kind];
            varint(1 << 40, &mut f);
            varint(1 << 40, &mut f);
            f.resize(MAX_CONTROL_FRAME, filler);
            let frame_len = f.len();
            let peak = peak_while(|| {
                let _ = decode_frame(&f);
            });
            worst = worst.max(peak as f64 / frame_len as f64);
            assert!(
                peak <= 4 * frame_len,
                "kind {kind} filler {filler:#x}: peak {peak} bytes for a {frame_len}-byte frame"
            );
        }
    }
    eprintln!("worst peak allocation while decoding: {worst:.2}x the frame size");
}
