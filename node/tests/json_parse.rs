//! Memory and speed of reading KServe JSON tensors, measured with a counting allocator:
//! parsing holds the body plus one tensor (security review M1: the earlier parse through
//! `serde_json::Value` held about 20 times the body), and an ignored benchmark prints the
//! figures next to a parse through `Value`
//! (`cargo test -p pollen-node --test json_parse -- --ignored --nocapture`).

// A global allocator is unsafe to implement; it only forwards to `System` and counts.
#![allow(unsafe_code)]

use pollen_node::serving::kserve::parse_request;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Forwards to the system allocator, counting the bytes live now and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; the counters are only atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as the new block arriving before the old one leaves: a moving realloc
            // holds both for a moment.
            grew(new_size);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests of this file measure one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Run `f`; return its result, the peak of live heap bytes above those live before it,
/// and its wall time.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base), took)
}

/// A request for input `x` of `datatype` and `shape` whose `data` is `elems` elements,
/// `elem` each, nested in rows of `row` elements when `row > 0`; `data` comes before
/// `datatype` and `shape` when `late`.
fn body(
    datatype: &str,
    shape: &[usize],
    elems: usize,
    elem: &str,
    row: usize,
    late: bool,
) -> Vec<u8> {
    let mut data = String::with_capacity(elems * (elem.len() + 1) + elems / row.max(1) * 3 + 2);
    data.push('[');
    for i in 0..elems {
        if row > 0 && i % row == 0 {
            data.push_str(if i == 0 { "[" } else { "],[" });
        } else if i > 0 {
            data.push(',');
        }
        data.push_str(elem);
    }
    if row > 0 && elems > 0 {
        data.push(']');
    }
    data.push(']');
    let shape = format!("{shape:?}").replace(' ', "");
    let text = if late {
        format!(
            r#"{{"inputs":[{{"name":"x","data":{data},"datatype":"{datatype}","shape":{shape}}}]}}"#
        )
    } else {
        format!(
            r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"{datatype}","data":{data}}}]}}"#
        )
    };
    text.into_bytes()
}

/// What the earlier code did: the body parsed as a `serde_json::Value`, then its leaves
/// converted to FP32 bytes.
fn through_value(body: &[u8]) -> usize {
    let v: serde_json::Value = serde_json::from_slice(body).expect("json");
    let mut out = Vec::new();
    let mut stack = vec![&v["inputs"][0]["data"]];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Array(a) => stack.extend(a.iter().rev()),
            leaf => out.extend_from_slice(&(leaf.as_f64().unwrap_or(0.0) as f32).to_le_bytes()),
        }
    }
    out.len()
}

#[test]
fn json_tensors_take_the_body_plus_one_tensor() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const MIB: usize = 1 << 20;
    // 1 Mi elements of `0,`: a 2 MiB body. (datatype, element bytes)
    for (datatype, size) in [("FP32", 4), ("FP64", 8), ("UINT8", 1), ("INT64", 8)] {
        let n = MIB;
        for (row, late) in [(0, false), (64, true)] {
            let shape = match n.checked_div(row) {
                Some(rows) => vec![rows, row],
                None => vec![n],
            };
            let b = body(datatype, &shape, n, "0", row, late);
            let (req, peak, _) = measure(|| parse_request(&b, None).expect("valid"));
            let tensor = n * size;
            assert_eq!(req.inputs[0].data.len(), tensor);
            // The tensor, plus a few KiB of request fields; before: about 32 bytes per
            // element in `Value`s, over 32 MiB here.
            assert!(
                peak <= tensor + 64 * 1024,
                "{datatype}: peak {peak} bytes for a {tensor}-byte tensor and a {}-byte body",
                b.len()
            );
        }
    }
    // A count that does not match: elements past the shape are counted, never stored,
    // and a shape far beyond the data is never allocated.
    let n = MIB;
    for shape in [vec![16], vec![64 * MIB]] {
        let b = body("FP64", &shape, n, "0", 0, false);
        let (r, peak, _) = measure(|| parse_request(&b, None));
        assert!(r.is_err());
        assert!(
            peak <= (shape[0] * 8).min(b.len() * 4) + 64 * 1024,
            "shape {shape:?}: peak {peak} bytes"
        );
    }
}

/// The figures for the report: parse time and peak heap above the body, streaming versus
/// through `Value`, for bodies of about 16 and 64 MiB.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn bench_streaming_against_value() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const MIB: usize = 1 << 20;
    println!(
        "| body | bytes | streaming: time, peak heap | through Value: time, peak heap | time ratio | heap ratio |"
    );
    println!("|---|---|---|---|---|---|");
    // (what, element text, elements)
    for (what, elem, n) in [
        ("`0,` x 8 Mi", "0", 8 * MIB),
        ("`0,` x 32 Mi", "0", 32 * MIB),
        ("`0.123456789,` x 1.5 Mi", "0.123456789", 3 * MIB / 2),
        ("`-1.2345678e-5,` x 4 Mi", "-1.2345678e-5", 4 * MIB),
    ] {
        let b = body("FP32", &[n / 64, 64], n, elem, 64, false);
        let (new, new_peak, new_time) = measure(|| parse_request(&b, None).expect("valid"));
        assert_eq!(new.inputs[0].data.len(), n * 4);
        drop(new);
        let (old, old_peak, old_time) = measure(|| through_value(&b));
        assert_eq!(old, n * 4);
        println!(
            "| {what} | {:.1} MiB | {:.2} s, {:.0} MiB | {:.2} s, {:.0} MiB | {:.1}x faster | {:.1}x less |",
            b.len() as f64 / MIB as f64,
            new_time.as_secs_f64(),
            new_peak as f64 / MIB as f64,
            old_time.as_secs_f64(),
            old_peak as f64 / MIB as f64,
            old_time.as_secs_f64() / new_time.as_secs_f64(),
            old_peak as f64 / new_peak as f64,
        );
    }
}
