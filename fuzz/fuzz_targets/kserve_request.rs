//! KServe v2 inference requests (`POST /v2/models/{m}/infer`) from untrusted bytes.
//!
//! Input layout: byte 0 selects the form. Even: the rest is a JSON body (no
//! `Inference-Header-Content-Length`). Odd: bytes 1..5 are the header length (u32 LE, not
//! clamped: it may exceed the body) and the rest is the body, JSON header then binary
//! section. The rest is also read as the header's text (`parse_header_len`) and as a
//! repository index request (`parse_index_request`).
//!
//! Checks: nothing panics. A parsed request holds the `Tensor` invariants (its inputs
//! echoed back by `encode_response`, JSON and binary, are valid outputs). Re-sent with every
//! input in the binary extension it parses to the same tensors; re-sent as JSON (the
//! `data` `tensor_to_json_data` writes) it parses to the same tensors for every type whose
//! JSON form is exact (integers, BOOL, FP64, UTF-8 BYTES; FP16/FP32 only keep their shape,
//! see `parse_request` on double rounding), when no float is non-finite. An accepted
//! header length is the decimal it was written as.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollen_node::serving::kserve::{
    InferRequest, Tensor, encode_response, kserve_name, parse_header_len, parse_index_request,
    parse_request, tensor_to_json_data,
};
use pollen_protocol::manifest::DType;
use serde_json::{Value, json};

/// The elements of a BYTES tensor's data (length-prefixed), or `None` if malformed.
fn bytes_elements(mut d: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let len = u32::from_le_bytes(d.get(..4)?.try_into().ok()?) as usize;
        let e = d.get(4..4 + len)?;
        out.push(e);
        d = &d[4 + len..];
    }
    Some(out)
}

/// Whether the tensor's JSON form is exact, and whether it can be written at all.
fn json_form(t: &Tensor) -> (bool, bool) {
    match t.datatype {
        DType::F64 => {
            let finite = t
                .data
                .chunks_exact(8)
                .all(|b| f64::from_le_bytes(b.try_into().unwrap()).is_finite());
            (finite, finite)
        }
        DType::F32 => {
            let finite = t
                .data
                .chunks_exact(4)
                .all(|b| f32::from_le_bytes(b.try_into().unwrap()).is_finite());
            (false, finite)
        }
        DType::F16 => {
            // Exponent all ones: infinity or NaN.
            let finite = t
                .data
                .chunks_exact(2)
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 != 0x7c00);
            (false, finite)
        }
        DType::Bytes => {
            let utf8 = bytes_elements(&t.data)
                .expect("parsed BYTES data is well formed")
                .iter()
                .all(|e| std::str::from_utf8(e).is_ok());
            (utf8, utf8)
        }
        _ => (true, true),
    }
}

fn check_request(req: &InferRequest) {
    // The Tensor invariants, as encode_response checks them on outputs.
    let echo = |binary: bool| InferRequest {
        id: None,
        inputs: vec![],
        outputs: vec![],
        binary_output_default: binary,
    };
    encode_response("m", "1", None, &req.inputs, &echo(true))
        .expect("parsed inputs are valid binary outputs");
    let _ = encode_response("m", "1", req.id.as_deref(), &req.inputs, &echo(false));
    let _ = encode_response("m", "1", req.id.as_deref(), &req.inputs, req);

    // All inputs as binary: the same tensors.
    let mut inputs = Vec::new();
    let mut tail = Vec::new();
    for t in &req.inputs {
        inputs.push(json!({
            "name": t.name, "shape": t.shape, "datatype": kserve_name(t.datatype),
            "parameters": {"binary_data_size": t.data.len()},
        }));
        tail.extend_from_slice(&t.data);
    }
    let header = json!({"inputs": inputs}).to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&tail);
    let again = parse_request(&body, Some(header.len())).expect("binary re-encoding parses");
    assert_eq!(
        again.inputs, req.inputs,
        "binary re-encoding changed the tensors"
    );

    // As JSON, when every tensor can be written.
    let forms: Vec<(bool, bool)> = req.inputs.iter().map(json_form).collect();
    if forms.iter().all(|f| f.1) {
        let inputs: Vec<Value> = req
            .inputs
            .iter()
            .map(|t| {
                json!({
                    "name": t.name, "shape": t.shape, "datatype": kserve_name(t.datatype),
                    "data": tensor_to_json_data(t),
                })
            })
            .collect();
        let body = json!({"inputs": inputs}).to_string();
        let again = parse_request(body.as_bytes(), None).expect("JSON re-encoding parses");
        assert_eq!(again.inputs.len(), req.inputs.len());
        for ((a, b), (exact, _)) in again.inputs.iter().zip(&req.inputs).zip(&forms) {
            if *exact {
                assert_eq!(a, b, "JSON re-encoding changed a tensor");
            } else {
                assert_eq!(
                    (&a.name, a.datatype, &a.shape, a.data.len()),
                    (&b.name, b.datatype, &b.shape, b.data.len())
                );
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let (header_len, body) = if mode & 1 == 1 && rest.len() >= 4 {
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        (Some(n), &rest[4..])
    } else {
        (None, rest)
    };
    if let Ok(req) = parse_request(body, header_len) {
        check_request(&req);
    }

    if let Ok(s) = std::str::from_utf8(body) {
        if let Ok(n) = parse_header_len(s) {
            let digits = s.trim().trim_start_matches('0');
            assert_eq!(n.to_string(), if digits.is_empty() { "0" } else { digits });
        }
    }
    let _ = parse_index_request(body);
});
