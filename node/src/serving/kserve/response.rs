//! Encoding a response: JSON `data` or binary outputs, each output checked against the
//! [`Tensor`] invariants first.

use super::*;
use pollen_protocol::manifest::DType;
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::Value;

/// An encoded response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedResponse {
    /// The JSON, followed by the binary outputs' bytes if any.
    pub body: Vec<u8>,
    /// `Some(json length)` when some output is binary: send it as the
    /// `Inference-Header-Content-Length` header; `None` for a pure JSON body.
    pub header_len: Option<usize>,
}

impl EncodedResponse {
    /// [`CONTENT_TYPE_BINARY`] when `header_len` is set, else [`CONTENT_TYPE_JSON`].
    pub fn content_type(&self) -> &'static str {
        if self.header_len.is_some() {
            CONTENT_TYPE_BINARY
        } else {
            CONTENT_TYPE_JSON
        }
    }
}

#[derive(serde::Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(serde::Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinaryParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(serde::Serialize)]
struct BinaryParams {
    binary_data_size: usize,
}

/// Encode the response to `req`.
///
/// `outputs` are the model's outputs. Which are sent: those in `req.outputs`, in that order
/// (a name not among `outputs` is [`KserveError::UnknownOutput`], 400), or all of `outputs`
/// in their order when `req.outputs` is empty. Each is binary if its requested
/// `binary_data` flag says so, else if `req.binary_output_default`. `id` is echoed as the
/// response `id` (normally `req.id.as_deref()`).
///
/// JSON `data` is a flat array (see [`tensor_to_json_data`]); non-finite floats become
/// `null` since JSON has no representation for them. A BYTES output sent as JSON must be
/// UTF-8 ([`KserveError::NonUtf8Output`], 400). Each sent output is checked against the
/// [`Tensor`] invariants ([`KserveError::InvalidOutputTensor`], 500).
pub fn encode_response(
    model_name: &str,
    model_version: &str,
    id: Option<&str>,
    outputs: &[Tensor],
    req: &InferRequest,
) -> Result<EncodedResponse, KserveError> {
    let selected: Vec<(&Tensor, bool)> = if req.outputs.is_empty() {
        outputs
            .iter()
            .map(|t| (t, req.binary_output_default))
            .collect()
    } else {
        req.outputs
            .iter()
            .map(|r| {
                outputs
                    .iter()
                    .find(|t| t.name == r.name)
                    .map(|t| (t, r.binary.unwrap_or(req.binary_output_default)))
                    .ok_or_else(|| KserveError::UnknownOutput(r.name.clone()))
            })
            .collect::<Result<_, _>>()?
    };

    let mut json_outputs = Vec::with_capacity(selected.len());
    let mut binary_len = 0usize;
    let mut any_binary = false;
    for &(t, binary) in &selected {
        check_output(t, !binary)?;
        if binary {
            any_binary = true;
            binary_len = binary_len.saturating_add(t.data.len());
        }
        json_outputs.push(OutputJson {
            name: &t.name,
            datatype: kserve_name(t.datatype),
            shape: &t.shape,
            parameters: binary.then_some(BinaryParams {
                binary_data_size: t.data.len(),
            }),
            data: (!binary).then_some(JsonData(t)),
        });
    }
    let json = serde_json::to_vec(&ResponseJson {
        model_name,
        model_version,
        id,
        outputs: json_outputs,
    })
    .map_err(KserveError::Serialize)?;
    if !any_binary {
        return Ok(EncodedResponse {
            body: json,
            header_len: None,
        });
    }
    let header_len = json.len();
    let mut body = json;
    body.reserve(binary_len);
    for &(t, binary) in &selected {
        if binary {
            body.extend_from_slice(&t.data);
        }
    }
    Ok(EncodedResponse {
        body,
        header_len: Some(header_len),
    })
}

/// The tensor's elements as a flat JSON array: exactly the `data` that [`encode_response`]
/// writes. BOOL as `true`/`false`, integers as JSON integers, FP16/FP32 as the shortest
/// decimal that reads back to the same value, non-finite floats as `null`, BYTES as strings
/// (non-UTF-8 bytes replaced by U+FFFD). Never panics: trailing bytes that do not form a
/// whole element, and BYTES data after a malformed length prefix, are left out.
pub fn tensor_to_json_data(t: &Tensor) -> Value {
    serde_json::to_vec(&JsonData(t))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Check an output tensor against the [`Tensor`] invariants (and UTF-8 if sent as JSON).
pub(super) fn check_output(t: &Tensor, as_json: bool) -> Result<(), KserveError> {
    let invalid = |msg: String| KserveError::InvalidOutputTensor {
        output: t.name.clone(),
        msg,
    };
    let count = element_count(&t.shape).ok_or_else(|| {
        invalid(format!(
            "shape {} exceeds the limit of {MAX_ELEMENTS} elements",
            fmt_shape(&t.shape)
        ))
    })?;
    match t.datatype.size() {
        Some(size) => {
            if t.data.len() != count * size {
                return Err(invalid(format!(
                    "shape {} of {} needs {} bytes, data is {}",
                    fmt_shape(&t.shape),
                    kserve_name(t.datatype),
                    count * size,
                    t.data.len()
                )));
            }
        }
        None => {
            let mut n = 0;
            for e in BytesElements::new(&t.data) {
                let e = e.map_err(|msg| invalid(format!("malformed BYTES data: {msg}")))?;
                if as_json && std::str::from_utf8(e).is_err() {
                    return Err(KserveError::NonUtf8Output {
                        output: t.name.clone(),
                        index: n,
                    });
                }
                n += 1;
            }
            if n != count {
                return Err(invalid(format!(
                    "shape {} needs {count} elements, BYTES data has {n}",
                    fmt_shape(&t.shape)
                )));
            }
        }
    }
    Ok(())
}

/// Serializes a tensor's elements as a flat JSON array, streaming.
pub(super) struct JsonData<'a>(&'a Tensor);

/// Fixed-size little-endian chunks of `data` (a trailing partial chunk is dropped).
pub(super) fn le_chunks<const N: usize>(
    data: &[u8],
) -> impl ExactSizeIterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

pub(super) fn serialize_all<S: Serializer, T: Serialize>(
    s: S,
    items: impl ExactSizeIterator<Item = T>,
) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(items.len()))?;
    for x in items {
        seq.serialize_element(&x)?;
    }
    seq.end()
}

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = &self.0.data;
        match self.0.datatype {
            DType::Bool => serialize_all(s, d.iter().map(|&b| b != 0)),
            DType::U8 => serialize_all(s, d.iter().copied()),
            DType::I8 => serialize_all(s, d.iter().map(|&b| i8::from_le_bytes([b]))),
            DType::U16 => serialize_all(s, le_chunks(d).map(u16::from_le_bytes)),
            DType::I16 => serialize_all(s, le_chunks(d).map(i16::from_le_bytes)),
            DType::U32 => serialize_all(s, le_chunks(d).map(u32::from_le_bytes)),
            DType::I32 => serialize_all(s, le_chunks(d).map(i32::from_le_bytes)),
            DType::U64 => serialize_all(s, le_chunks(d).map(u64::from_le_bytes)),
            DType::I64 => serialize_all(s, le_chunks(d).map(i64::from_le_bytes)),
            DType::F16 => serialize_all(
                s,
                le_chunks(d).map(|a| f16_bits_to_f32(u16::from_le_bytes(a))),
            ),
            DType::F32 => serialize_all(s, le_chunks(d).map(f32::from_le_bytes)),
            DType::F64 => serialize_all(s, le_chunks(d).map(f64::from_le_bytes)),
            DType::Bytes => {
                let mut seq = s.serialize_seq(None)?;
                for e in BytesElements::new(d) {
                    let Ok(e) = e else { break };
                    match std::str::from_utf8(e) {
                        Ok(st) => seq.serialize_element(st)?,
                        Err(_) => seq.serialize_element(&String::from_utf8_lossy(e))?,
                    }
                }
                seq.end()
            }
            // DType is non-exhaustive; the codec parses only the types above.
            _ => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::kserve::test_util::*;

    use serde_json::json;

    #[test]
    fn binary_output_exact_layout() {
        let req = parse_json(&json!({
            "id": "r1",
            "parameters": {"binary_data_output": true},
            "inputs": [],
        }))
        .expect("parse");
        assert!(req.binary_output_default);
        let y = tensor("y", DType::F32, &[2], f32s(&[1.0, -2.0]));
        let resp = encode_response("m", "1", req.id.as_deref(), &[y], &req).expect("encode");
        let json = br#"{"model_name":"m","model_version":"1","id":"r1","outputs":[{"name":"y","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}"#;
        let mut expect = json.to_vec();
        expect.extend_from_slice(&[0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0]);
        assert_eq!(resp.header_len, Some(json.len()));
        assert_eq!(resp.body, expect);
        assert_eq!(resp.content_type(), CONTENT_TYPE_BINARY);
    }

    #[test]
    fn mixed_binary_and_json_outputs() {
        let a = tensor("a", DType::I32, &[2], vec![1, 0, 0, 0, 2, 0, 0, 0]);
        let b = tensor("b", DType::U8, &[3], vec![7, 8, 9]);
        let c = tensor("c", DType::Bytes, &[1], bytes_elems(&[b"xyz"]));
        let outputs = [a.clone(), b.clone(), c.clone()];

        // Per-output flags, request order, default JSON.
        let req = parse_json(&json!({
            "inputs": [],
            "outputs": [{"name": "c", "parameters": {"binary_data": true}}, {"name": "a"}],
        }))
        .expect("parse");
        let resp = encode_response("m", "2", None, &outputs, &req).expect("encode");
        let n = resp.header_len.expect("binary");
        let v = body_json(&resp);
        assert_eq!(
            v,
            json!({"model_name": "m", "model_version": "2", "outputs": [
                {"name": "c", "datatype": "BYTES", "shape": [1],
                 "parameters": {"binary_data_size": 7}},
                {"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]},
            ]})
        );
        assert_eq!(&resp.body[n..], &c.data[..]);

        // Default binary, one output opted out; binary bytes in output order.
        let req = parse_json(&json!({
            "parameters": {"binary_data_output": true},
            "inputs": [],
            "outputs": [{"name": "b"}, {"name": "a", "parameters": {"binary_data": false}},
                        {"name": "c"}],
        }))
        .expect("parse");
        let resp = encode_response("m", "2", Some("q"), &outputs, &req).expect("encode");
        let n = resp.header_len.expect("binary");
        let v = body_json(&resp);
        assert_eq!(v["id"], "q");
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 3);
        assert_eq!(v["outputs"][1]["data"], json!([1, 2]));
        assert!(v["outputs"][1].get("parameters").is_none());
        assert_eq!(v["outputs"][2]["parameters"]["binary_data_size"], 7);
        assert!(v["outputs"][2].get("data").is_none());
        assert_eq!(&resp.body[n..], &[&b.data[..], &c.data[..]].concat()[..]);
    }

    #[test]
    fn all_outputs_when_none_requested() {
        let a = tensor("a", DType::F64, &[1], 2.5f64.to_le_bytes().to_vec());
        let b = tensor("b", DType::Bool, &[2], vec![1, 0]);
        let resp = encode_response(
            "net",
            "",
            None,
            &[a.clone(), b.clone()],
            &no_outputs_requested(),
        )
        .expect("encode");
        assert_eq!(resp.header_len, None);
        assert_eq!(
            String::from_utf8(resp.body).expect("utf8"),
            r#"{"model_name":"net","model_version":"","outputs":[{"name":"a","datatype":"FP64","shape":[1],"data":[2.5]},{"name":"b","datatype":"BOOL","shape":[2],"data":[true,false]}]}"#
        );
        let mut req = no_outputs_requested();
        req.binary_output_default = true;
        let resp = encode_response("net", "1", None, &[a, b], &req).expect("encode");
        let n = resp.header_len.expect("binary");
        let mut tail = 2.5f64.to_le_bytes().to_vec();
        tail.extend_from_slice(&[1, 0]);
        assert_eq!(&resp.body[n..], &tail[..]);
    }

    #[test]
    fn output_errors() {
        let y = tensor("y", DType::F32, &[2], f32s(&[1.0, 2.0]));
        let req = parse_json(&json!({"inputs": [], "outputs": [{"name": "nope"}]})).expect("p");
        let e = encode_response("m", "1", None, std::slice::from_ref(&y), &req).expect_err("unk");
        assert_eq!(
            (e.status(), e.to_string()),
            (400, "unknown output 'nope'".into())
        );

        let bad = tensor("y", DType::F32, &[3], f32s(&[1.0, 2.0]));
        let e = encode_response("m", "1", None, &[bad], &no_outputs_requested()).expect_err("len");
        assert_eq!(e.status(), 500);
        assert_eq!(
            e.to_string(),
            "output 'y': shape [3] of FP32 needs 12 bytes, data is 8"
        );

        let bad = tensor("s", DType::Bytes, &[2], bytes_elems(&[b"a"]));
        let e = encode_response("m", "1", None, &[bad], &no_outputs_requested()).expect_err("n");
        assert_eq!(e.status(), 500);
        assert_eq!(
            e.to_string(),
            "output 's': shape [2] needs 2 elements, BYTES data has 1"
        );

        let bad = tensor("s", DType::Bytes, &[1], vec![9, 0, 0, 0, 1]);
        let e = encode_response("m", "1", None, &[bad], &no_outputs_requested()).expect_err("m");
        assert_eq!(e.status(), 500);
        assert_eq!(
            e.to_string(),
            "output 's': malformed BYTES data: element 0: length 9 exceeds the 1 remaining bytes"
        );

        let bad = tensor("h", DType::U8, &[MAX_ELEMENTS, 2], vec![]);
        let e = encode_response("m", "1", None, &[bad], &no_outputs_requested()).expect_err("big");
        assert_eq!(e.status(), 500);

        // Non-UTF-8 BYTES: refused as JSON, fine as binary.
        let s = tensor("s", DType::Bytes, &[2], bytes_elems(&[b"ok", &[0xff]]));
        let e = encode_response(
            "m",
            "1",
            None,
            std::slice::from_ref(&s),
            &no_outputs_requested(),
        )
        .expect_err("utf8");
        assert_eq!(e.status(), 400);
        assert_eq!(
            e.to_string(),
            "output 's': BYTES element 1 is not valid UTF-8; request it with binary_data"
        );
        let mut req = no_outputs_requested();
        req.binary_output_default = true;
        let resp = encode_response("m", "1", None, std::slice::from_ref(&s), &req).expect("bin");
        let n = resp.header_len.expect("binary");
        assert_eq!(&resp.body[n..], &s.data[..]);
        assert_eq!(tensor_to_json_data(&s), json!(["ok", "\u{fffd}"]));
    }

    #[test]
    fn non_finite_floats_become_null() {
        let t = tensor(
            "f",
            DType::F32,
            &[3],
            f32s(&[f32::NAN, f32::NEG_INFINITY, 1.0]),
        );
        assert_eq!(tensor_to_json_data(&t), json!([null, null, 1.0]));
        let h: Vec<u8> = [0x7e00u16, 0x7c00, 0x3800]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let t = tensor("h", DType::F16, &[3], h);
        assert_eq!(tensor_to_json_data(&t), json!([null, null, 0.5]));
        let t = tensor("d", DType::F64, &[1], f64::INFINITY.to_le_bytes().to_vec());
        let resp = encode_response("m", "1", None, &[t], &no_outputs_requested()).expect("enc");
        assert_eq!(body_json(&resp)["outputs"][0]["data"], json!([null]));
    }

    #[test]
    fn tensor_to_json_data_tolerates_malformed_tensors() {
        let t = tensor("f", DType::F32, &[2], vec![0, 0, 128, 63, 1, 2]);
        assert_eq!(tensor_to_json_data(&t), json!([1.0]));
        let mut data = bytes_elems(&[b"ab"]);
        data.extend_from_slice(&[200, 0, 0, 0, 1]);
        let t = tensor("s", DType::Bytes, &[2], data);
        assert_eq!(tensor_to_json_data(&t), json!(["ab"]));
        let t = tensor("s", DType::Bytes, &[2], vec![1, 0]);
        assert_eq!(tensor_to_json_data(&t), json!([]));
    }
}
