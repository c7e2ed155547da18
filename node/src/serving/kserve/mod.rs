//! A pure codec for the KServe v2 / Open Inference Protocol REST inference API
//! (`POST /v2/models/{name}[/versions/{v}]/infer`), including Triton's binary tensor data
//! extension. No HTTP framework and no inference engine here: the HTTP layer hands
//! [`parse_request`] the body and the `Inference-Header-Content-Length` header, runs the
//! model, and sends back what [`encode_response`] produces. Also the index of Triton's
//! model repository extension ([`parse_index_request`], [`index_json`]).
//!
//! # Wire format
//!
//! * Request JSON: `{"id"?, "parameters"?: {"binary_data_output"?: bool}, "inputs": [{"name",
//!   "shape", "datatype", "parameters"?: {"binary_data_size"?: n}, "data"?}], "outputs"?:
//!   [{"name", "parameters"?: {"binary_data"?: bool}}]}`. Unknown fields and parameters are
//!   ignored.
//! * Binary extension: with `Inference-Header-Content-Length: N` the body is N bytes of JSON
//!   followed by the raw bytes of every input that has `binary_data_size`, concatenated in the
//!   order of `inputs`. Raw bytes are little-endian and row-major; BOOL is one byte per
//!   element; a BYTES element is a 4-byte little-endian length followed by that many bytes.
//! * Response JSON: `{"model_name", "model_version", "id"?, "outputs": [{"name", "datatype",
//!   "shape", "data"}]}`. A binary output carries `"parameters": {"binary_data_size": n}`
//!   instead of `"data"`, its bytes follow the JSON in output order, and the response has the
//!   `Inference-Header-Content-Length` header set to the JSON length.
//!
//! # Limits
//!
//! Nothing a client sends can make this module panic or allocate more than a constant times
//! the body length: every dimension and every tensor's element count is at most
//! [`MAX_ELEMENTS`], the declared JSON length must fit the body, the binary section must be
//! exactly the declared sizes, and JSON `data` is read straight into the tensor's buffer,
//! never through a tree of values (at most 4 bytes of tensor per byte of text, for FP64 and
//! the 64-bit integers; nesting is bounded by serde_json's recursion limit of 128 levels).

mod error;
pub(crate) mod f16;
mod repository;
mod request;
mod response;
mod tensor;

pub use error::KserveError;
pub use f16::{f16_bits_to_f32, f32_to_f16_bits};
pub use repository::{MAX_INDEX_BODY, index_entry, index_json, parse_index_request};
pub use request::{parse_header_len, parse_request};
pub use response::{EncodedResponse, encode_response, tensor_to_json_data};
pub use tensor::{InferRequest, RequestedOutput, Tensor};
// The parts reach each other's helpers through `use super::*`.
use {f16::*, tensor::*};

use pollen_protocol::manifest::DType;

/// The largest element count of one tensor, and the largest single dimension (64 Mi).
pub const MAX_ELEMENTS: usize = 64 * 1024 * 1024;

/// The binary extension's header name, lowercase (as `http::HeaderName::from_static` needs;
/// HTTP header names are case-insensitive).
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// Content-Type of a response without binary outputs.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Content-Type of a response with binary outputs (JSON header + raw tensor bytes).
pub const CONTENT_TYPE_BINARY: &str = "application/octet-stream";

/// Every data type of the protocol, in protocol order.
pub const DATATYPES: [DType; 13] = DType::ALL;

/// The protocol name of a data type, e.g. `"FP32"`.
pub fn kserve_name(d: DType) -> &'static str {
    d.kserve_name()
}

/// The data type named `s` (exact, uppercase protocol name), or `None`.
pub fn parse_datatype(s: &str) -> Option<DType> {
    DATATYPES.into_iter().find(|d| d.kserve_name() == s)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use serde_json::{Value, json};

    pub(crate) fn parse_json(v: &Value) -> Result<InferRequest, KserveError> {
        parse_request(v.to_string().as_bytes(), None)
    }

    pub(crate) fn one_input(datatype: &str, shape: Value, data: Value) -> Value {
        json!({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]})
    }

    pub(crate) fn body_json(r: &EncodedResponse) -> Value {
        let n = r.header_len.unwrap_or(r.body.len());
        serde_json::from_slice(&r.body[..n]).expect("response JSON")
    }

    pub(crate) fn tensor(name: &str, datatype: DType, shape: &[usize], data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
            data,
        }
    }

    pub(crate) fn f32s(xs: &[f32]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub(crate) fn bytes_elems(xs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for x in xs {
            out.extend_from_slice(&(x.len() as u32).to_le_bytes());
            out.extend_from_slice(x);
        }
        out
    }

    pub(crate) fn no_outputs_requested() -> InferRequest {
        InferRequest {
            id: None,
            inputs: vec![],
            outputs: vec![],
            binary_output_default: false,
        }
    }

    /// xorshift64: deterministic, dependency-free noise.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// A request built from a JSON header and a binary tail.
    pub(crate) fn with_binary(header: Value, tail: &[u8]) -> Body {
        let h = header.to_string();
        let mut body = h.clone().into_bytes();
        body.extend_from_slice(tail);
        (body, Some(h.len()))
    }

    /// A request body and its `Inference-Header-Content-Length`.
    pub(crate) type Body = (Vec<u8>, Option<usize>);

    /// Whatever parses must hold the Tensor invariants (checked by encoding it back).
    pub(crate) fn check_parsed(body: &[u8], header_len: Option<usize>) {
        if let Ok(req) = parse_request(body, header_len) {
            let mut echo = no_outputs_requested();
            echo.binary_output_default = true;
            let resp = encode_response("m", "1", None, &req.inputs, &echo);
            let resp = resp.expect("parsed inputs are valid outputs");
            assert!(resp.header_len.is_some() || req.inputs.is_empty());
            for t in &req.inputs {
                let _ = tensor_to_json_data(t);
            }
            let _ = encode_response("m", "1", req.id.as_deref(), &req.inputs, &req);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use serde_json::Value;
    use serde_json::json;

    #[test]
    fn datatype_names_and_sizes() {
        let names = [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64", "BYTES",
        ];
        for (dt, name) in DATATYPES.iter().zip(names) {
            assert_eq!(kserve_name(*dt), name);
            assert_eq!(parse_datatype(name), Some(*dt));
        }
        assert_eq!(parse_datatype("fp32"), None);
        assert_eq!(parse_datatype("FLOAT32"), None);
        assert_eq!(DType::Bool.size(), Some(1));
        assert_eq!(DType::F16.size(), Some(2));
        assert_eq!(DType::I32.size(), Some(4));
        assert_eq!(DType::F64.size(), Some(8));
        assert_eq!(DType::Bytes.size(), None);
    }

    #[test]
    fn json_roundtrip_every_datatype() {
        let le = |v: Vec<Vec<u8>>| v.concat();
        // (datatype, shape, request data, raw bytes, response data)
        let cases: Vec<(&str, Value, Value, Vec<u8>, Value)> = vec![
            (
                "BOOL",
                json!([2, 2]),
                json!([[true, false], [false, true]]),
                vec![1, 0, 0, 1],
                json!([true, false, false, true]),
            ),
            (
                "UINT8",
                json!([3]),
                json!([0, 255, 7]),
                vec![0, 255, 7],
                json!([0, 255, 7]),
            ),
            (
                "UINT16",
                json!([2]),
                json!([0, 65535]),
                le(vec![
                    0u16.to_le_bytes().into(),
                    65535u16.to_le_bytes().into(),
                ]),
                json!([0, 65535]),
            ),
            (
                "UINT32",
                json!([2]),
                json!([1, 4294967295u32]),
                le(vec![
                    1u32.to_le_bytes().into(),
                    u32::MAX.to_le_bytes().into(),
                ]),
                json!([1, 4294967295u32]),
            ),
            (
                "UINT64",
                json!([1, 2]),
                json!([[0, u64::MAX]]),
                le(vec![
                    0u64.to_le_bytes().into(),
                    u64::MAX.to_le_bytes().into(),
                ]),
                json!([0, u64::MAX]),
            ),
            (
                "INT8",
                json!([2]),
                json!([-128, 127]),
                vec![0x80, 0x7f],
                json!([-128, 127]),
            ),
            (
                "INT16",
                json!([2]),
                json!([-32768, 32767]),
                le(vec![
                    i16::MIN.to_le_bytes().into(),
                    i16::MAX.to_le_bytes().into(),
                ]),
                json!([-32768, 32767]),
            ),
            (
                "INT32",
                json!([1, 2]),
                json!([[i32::MIN, i32::MAX]]),
                le(vec![
                    i32::MIN.to_le_bytes().into(),
                    i32::MAX.to_le_bytes().into(),
                ]),
                json!([i32::MIN, i32::MAX]),
            ),
            (
                "INT64",
                json!([2]),
                json!([i64::MIN, i64::MAX]),
                le(vec![
                    i64::MIN.to_le_bytes().into(),
                    i64::MAX.to_le_bytes().into(),
                ]),
                json!([i64::MIN, i64::MAX]),
            ),
            (
                "FP16",
                json!([2, 2]),
                json!([[1.0, -2.5], [65504, 0.1]]),
                le(vec![
                    0x3c00u16.to_le_bytes().into(),
                    0xc100u16.to_le_bytes().into(),
                    0x7bffu16.to_le_bytes().into(),
                    0x2e66u16.to_le_bytes().into(),
                ]),
                json!([1.0, -2.5, 65504.0, 0.099975586]),
            ),
            (
                "FP32",
                json!([3]),
                json!([0.1, -1.5, 3e38]),
                f32s(&[0.1, -1.5, 3e38]),
                json!([0.1, -1.5, 3e38]),
            ),
            (
                "FP64",
                json!([2]),
                json!([0.1, -1e300]),
                le(vec![
                    0.1f64.to_le_bytes().into(),
                    (-1e300f64).to_le_bytes().into(),
                ]),
                json!([0.1, -1e300]),
            ),
            (
                "BYTES",
                json!([2]),
                json!(["hi", ""]),
                bytes_elems(&[b"hi", b""]),
                json!(["hi", ""]),
            ),
        ];
        for (dt, shape, data, raw, out) in cases {
            let req = parse_json(&one_input(dt, shape.clone(), data)).expect(dt);
            let t = &req.inputs[0];
            assert_eq!(kserve_name(t.datatype), dt);
            assert_eq!(json!(t.shape), shape, "{dt}");
            assert_eq!(t.data, raw, "{dt}");
            assert_eq!(tensor_to_json_data(t), out, "{dt}");
            let resp = encode_response("m", "1", None, std::slice::from_ref(t), &req).expect(dt);
            assert_eq!(resp.header_len, None);
            assert_eq!(resp.content_type(), CONTENT_TYPE_JSON);
            let v = body_json(&resp);
            assert_eq!(v["outputs"][0]["data"], out, "{dt}");
            assert_eq!(v["outputs"][0]["datatype"], dt);
            assert_eq!(v["outputs"][0]["shape"], shape);
            // The response data parses back to the same bytes.
            let again = parse_json(&one_input(dt, shape, out)).expect(dt);
            assert_eq!(again.inputs[0].data, raw, "{dt} second trip");
        }
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Pure noise.
        for _ in 0..3000 {
            let len = rng.below(200);
            let body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let header_len = match rng.below(3) {
                0 => None,
                _ => Some(rng.below(len + 4)),
            };
            check_parsed(&body, header_len);
        }
        // Mutations of a valid binary request: flipped, inserted and deleted bytes, and
        // JSON-significant characters, with the header length kept or nudged. Whatever
        // still parses must hold the Tensor invariants.
        let (valid, hl) = with_binary(
            json!({
                "id": "z",
                "parameters": {"binary_data_output": false},
                "inputs": [
                    {"name": "a", "shape": [2, 2], "datatype": "FP16", "data": [[1, 2], [3, 4]]},
                    {"name": "b", "shape": [2], "datatype": "BYTES",
                     "parameters": {"binary_data_size": 9}},
                    {"name": "c", "shape": [1], "datatype": "INT64", "data": [-5]},
                    {"name": "d", "shape": [3], "datatype": "BOOL",
                     "parameters": {"binary_data_size": 3}},
                ],
                "outputs": [{"name": "a", "parameters": {"binary_data": true}}],
            }),
            &[1, 0, 0, 0, b'q', 0, 0, 0, 0, 1, 0, 7],
        );
        check_parsed(&valid, hl);
        parse_request(&valid, hl).expect("the seed is valid");
        let alphabet = b"[]{}\",:0123456789-.eE truefalsnul\\\x00\xff";
        for _ in 0..5000 {
            let mut body = valid.clone();
            for _ in 0..1 + rng.below(4) {
                // A third of the mutations hit the binary section.
                let json_len = hl.unwrap_or(0);
                let i = if rng.below(3) == 0 && json_len < body.len() {
                    json_len + rng.below(body.len() - json_len)
                } else {
                    rng.below(body.len())
                };
                match rng.below(4) {
                    0 => body[i] = rng.next() as u8,
                    1 => body[i] = alphabet[rng.below(alphabet.len())],
                    2 => body.insert(i, alphabet[rng.below(alphabet.len())]),
                    _ => {
                        body.remove(i);
                    }
                }
            }
            let header_len = hl.map(|n| match rng.below(4) {
                0 => n.saturating_sub(1),
                1 => n + 1,
                _ => n,
            });
            check_parsed(&body, header_len);
        }
    }
}
