//! Golden test data from untrusted bytes, both formats: a serialised ONNX `TensorProto`
//! (`input_K.pb` / `output_K.pb` of the ONNX test-data layout, read by `pollen publish`
//! with `pollen_keys::onnx_pb::read_tensor`) and a golden file (`PGOLDEN1` + postcard, which
//! a node fetches from peers and reads with `decode_golden_file`). Every input is tried as
//! both.
//!
//! Checks: nothing panics. An accepted `TensorProto` has a fixed-size type, exactly
//! `product(shape) * size` data bytes and BOOL bytes 0 or 1, and written back as a raw-data
//! `TensorProto` (`serving::onnx::tensor_proto`, what `prepare` writes for constants) it
//! reads back equal. An accepted golden file has at most `MAX_GOLDEN` checks whose tensors
//! have as many bytes as their shapes say, and re-encoded it decodes to equal checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollen_keys::onnx_pb::read_tensor;
use pollen_node::serving::onnx::tensor_proto;
use pollen_protocol::manifest::{
    DType, MAX_GOLDEN, TensorData, decode_golden_file, encode_golden_file,
};

fn check_len(dtype: DType, shape: &[u64], data: &[u8]) {
    let size = dtype.size().expect("a fixed-size type") as u64;
    let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    assert_eq!(
        n.and_then(|n| n.checked_mul(size)),
        Some(data.len() as u64),
        "data length does not match the shape"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = read_tensor(data) {
        check_len(t.dtype, &t.shape, &t.data);
        if t.dtype == DType::Bool {
            assert!(t.data.iter().all(|&b| b <= 1), "BOOL byte not 0 or 1");
        }
        let td = TensorData {
            name: t.name.clone().unwrap_or_default(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: t.data.clone(),
        };
        let pb = tensor_proto(&td).expect("every type read_tensor gives has an ONNX type");
        let again = read_tensor(&pb).expect("a written TensorProto reads back");
        assert_eq!(again, t, "TensorProto round trip changed the tensor");
    }

    if let Ok(checks) = decode_golden_file(data) {
        assert!(checks.len() <= MAX_GOLDEN);
        for t in checks
            .iter()
            .flat_map(|c| c.inputs.iter().chain(&c.expected))
        {
            check_len(t.dtype, &t.shape, &t.data);
        }
        let again = decode_golden_file(&encode_golden_file(&checks))
            .expect("a re-encoded golden file decodes");
        assert_eq!(again, checks, "golden file round trip changed the checks");
    }
});
