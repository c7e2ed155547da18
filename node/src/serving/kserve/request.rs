//! Parsing a request: the JSON part, then the binary section of the tensor data
//! extension, checked against the declared shapes and sizes before anything is allocated.

use super::*;
use pollen_protocol::manifest::DType;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashSet;

/// Parse the `Inference-Header-Content-Length` header value (decimal, surrounding
/// whitespace allowed).
pub fn parse_header_len(value: &str) -> Result<usize, KserveError> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(KserveError::InvalidHeaderLength(truncate(value, 40)));
    }
    v.parse()
        .map_err(|_| KserveError::InvalidHeaderLength(truncate(value, 40)))
}

#[derive(Deserialize)]
struct RawRequest {
    id: Option<String>,
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RawInput>,
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
struct RawInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    parameters: Option<Map<String, Value>>,
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    parameters: Option<Map<String, Value>>,
}

/// Where an input's elements come from, between the two passes of [`parse_request`].
enum Pending {
    Ready(Vec<u8>),
    Binary(u64),
}

/// Parse a request body.
///
/// `header_len` is the `Inference-Header-Content-Length` header (see [`parse_header_len`]):
/// `None` means the whole body is JSON; `Some(n)` means the first `n` bytes are JSON and the
/// rest is the binary section, which must be exactly the concatenation of the inputs that
/// declare `parameters.binary_data_size`, in input order.
///
/// The returned tensors satisfy the [`Tensor`] invariants: JSON `data` (flat or nested to
/// any depth, flattened row-major; a bare scalar counts as one element) is converted to raw
/// bytes with range checks (integers must be JSON integers within the type's range, floats
/// JSON numbers that do not overflow the type, FP16 rounded to nearest-even, BOOL `true` /
/// `false`, BYTES strings); binary BOOL bytes are normalised to 0/1. JSON floats are read
/// by serde_json as the nearest `f64` and then rounded to FP32/FP16, so a decimal lying
/// within `f64` precision of a rounding boundary may round differently from a direct
/// decimal-to-`f32` conversion (binary data is bit-exact).
///
/// Errors: any [`KserveError`] except the output-side ones; all are status 400.
pub fn parse_request(body: &[u8], header_len: Option<usize>) -> Result<InferRequest, KserveError> {
    let (json, binary): (&[u8], &[u8]) = match header_len {
        Some(n) => body
            .split_at_checked(n)
            .ok_or(KserveError::HeaderLengthTooLarge {
                header_len: n,
                body_len: body.len(),
            })?,
        None => (body, &[]),
    };
    let raw: RawRequest = serde_json::from_slice(json).map_err(KserveError::Json)?;

    let binary_output_default = match raw
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_output"))
    {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(KserveError::InvalidParameter {
                context: "request".into(),
                param: "binary_data_output",
                expected: "a boolean",
            });
        }
    };

    // Pass 1: metadata of every input, JSON data decoded, binary sizes collected.
    let mut names = HashSet::new();
    let mut pending = Vec::with_capacity(raw.inputs.len());
    let mut declared: u64 = 0;
    for input in raw.inputs {
        if !names.insert(input.name.clone()) {
            return Err(KserveError::DuplicateInput(input.name));
        }
        let name = input.name;
        let datatype =
            parse_datatype(&input.datatype).ok_or_else(|| KserveError::UnknownDatatype {
                input: name.clone(),
                datatype: truncate(&input.datatype, 40),
            })?;
        let (shape, count) = input_shape(&name, &input.shape)?;
        let binary_size = match input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
        {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| KserveError::InvalidParameter {
                context: format!("input '{name}'"),
                param: "binary_data_size",
                expected: "a non-negative integer",
            })?),
        };
        let source = match (input.data, binary_size) {
            (Some(_), Some(_)) => return Err(KserveError::DataAndBinary { input: name }),
            (None, None) => return Err(KserveError::NoData { input: name }),
            (Some(data), None) => {
                Pending::Ready(decode_json_data(&name, datatype, &shape, count, &data)?)
            }
            (None, Some(size)) => {
                if header_len.is_none() {
                    return Err(KserveError::BinaryWithoutHeader { input: name });
                }
                if let Some(elem) = datatype.size() {
                    // count <= MAX_ELEMENTS and elem <= 8: no overflow.
                    let expected = count * elem;
                    if size != expected as u64 {
                        return Err(KserveError::BinarySize {
                            input: name,
                            shape: fmt_shape(&shape),
                            datatype,
                            expected,
                            got: size,
                        });
                    }
                }
                declared = declared.saturating_add(size);
                Pending::Binary(size)
            }
        };
        pending.push((name, datatype, shape, count, source));
    }
    if declared != binary.len() as u64 {
        return Err(KserveError::BinarySectionLength {
            declared,
            actual: binary.len(),
        });
    }

    // Pass 2: slice the binary section.
    let mut rest = binary;
    let mut inputs = Vec::with_capacity(pending.len());
    for (name, datatype, shape, count, source) in pending {
        let data = match source {
            Pending::Ready(data) => data,
            Pending::Binary(size) => {
                let section_error = || KserveError::BinarySectionLength {
                    declared,
                    actual: binary.len(),
                };
                let size = usize::try_from(size).map_err(|_| section_error())?;
                let (chunk, tail) = rest.split_at_checked(size).ok_or_else(section_error)?;
                rest = tail;
                match datatype {
                    DType::Bool => chunk.iter().map(|&b| u8::from(b != 0)).collect(),
                    DType::Bytes => {
                        let got = count_bytes_elements(chunk).map_err(|msg| {
                            KserveError::MalformedBytes {
                                input: name.clone(),
                                msg,
                            }
                        })?;
                        if got != count {
                            return Err(KserveError::ElementCount {
                                input: name,
                                shape: fmt_shape(&shape),
                                expected: count,
                                got,
                            });
                        }
                        chunk.to_vec()
                    }
                    _ => chunk.to_vec(),
                }
            }
        };
        inputs.push(Tensor {
            name,
            datatype,
            shape,
            data,
        });
    }

    let mut outputs = Vec::new();
    let mut out_names = HashSet::new();
    for out in raw.outputs.unwrap_or_default() {
        if !out_names.insert(out.name.clone()) {
            return Err(KserveError::DuplicateOutput(out.name));
        }
        let binary = match out.parameters.as_ref().and_then(|p| p.get("binary_data")) {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                return Err(KserveError::InvalidParameter {
                    context: format!("output '{}'", out.name),
                    param: "binary_data",
                    expected: "a boolean",
                });
            }
        };
        outputs.push(RequestedOutput {
            name: out.name,
            binary,
        });
    }

    Ok(InferRequest {
        id: raw.id,
        inputs,
        outputs,
        binary_output_default,
    })
}

/// Call `f` on every non-array leaf of `v` in row-major order, without recursion.
pub(super) fn for_each_leaf<'a, E>(
    v: &'a Value,
    mut f: impl FnMut(&'a Value) -> Result<(), E>,
) -> Result<(), E> {
    let Value::Array(top) = v else {
        return f(v);
    };
    let mut stack = vec![top.iter()];
    while let Some(it) = stack.last_mut() {
        match it.next() {
            None => {
                stack.pop();
            }
            Some(Value::Array(a)) => stack.push(a.iter()),
            Some(leaf) => f(leaf)?,
        }
    }
    Ok(())
}

/// A short rendering of a JSON value for error messages.
pub(super) fn show(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => truncate(&n.to_string(), 40),
        Value::String(s) => format!("\"{}\"", truncate(s, 40)),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Decode an input's JSON `data` into raw bytes, checking the element count first.
pub(super) fn decode_json_data(
    name: &str,
    dt: DType,
    shape: &[usize],
    count: usize,
    data: &Value,
) -> Result<Vec<u8>, KserveError> {
    let mut got = 0usize;
    let _ = for_each_leaf(data, |_| {
        got += 1;
        Ok::<(), ()>(())
    });
    if got != count {
        return Err(KserveError::ElementCount {
            input: name.into(),
            shape: fmt_shape(shape),
            expected: count,
            got,
        });
    }
    let mut out = Vec::with_capacity(count * dt.size().unwrap_or(4));
    let mut index = 0usize;
    for_each_leaf(data, |v| {
        encode_element(dt, v, &mut out).map_err(|msg| KserveError::InvalidElement {
            input: name.into(),
            index,
            msg,
        })?;
        index += 1;
        Ok(())
    })?;
    Ok(out)
}

/// An integer JSON value converted to `T`, or an error message.
pub(super) fn json_integer<T: TryFrom<i64> + TryFrom<u64>>(
    v: &Value,
    dt: DType,
    range: impl Fn() -> String,
) -> Result<T, String> {
    let err = |what: &str| {
        format!(
            "expected {what} in {} ({}), got {}",
            range(),
            kserve_name(dt),
            show(v)
        )
    };
    let Value::Number(n) = v else {
        return Err(err("an integer"));
    };
    if let Some(i) = n.as_i64() {
        T::try_from(i).map_err(|_| err("an integer"))
    } else if let Some(u) = n.as_u64() {
        T::try_from(u).map_err(|_| err("an integer"))
    } else {
        Err(err("an integer"))
    }
}

/// A JSON number as `f64`, or an error message.
pub(super) fn json_float(v: &Value, dt: DType) -> Result<f64, String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("expected a number ({}), got {}", kserve_name(dt), show(v))),
        _ => Err(format!(
            "expected a number ({}), got {}",
            kserve_name(dt),
            show(v)
        )),
    }
}

/// Append the raw encoding of one JSON element of type `dt` to `out`.
pub(super) fn encode_element(dt: DType, v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    macro_rules! int {
        ($t:ty) => {{
            let range = || format!("{}..={}", <$t>::MIN, <$t>::MAX);
            out.extend_from_slice(&json_integer::<$t>(v, dt, range)?.to_le_bytes());
        }};
    }
    match dt {
        DType::Bool => match v {
            Value::Bool(b) => out.push(u8::from(*b)),
            _ => return Err(format!("expected true or false (BOOL), got {}", show(v))),
        },
        DType::U8 => int!(u8),
        DType::U16 => int!(u16),
        DType::U32 => int!(u32),
        DType::U64 => int!(u64),
        DType::I8 => int!(i8),
        DType::I16 => int!(i16),
        DType::I32 => int!(i32),
        DType::I64 => int!(i64),
        DType::F16 => {
            let h = f64_to_f16_bits(json_float(v, dt)?);
            if h & 0x7fff == 0x7c00 {
                return Err(format!(
                    "{} is out of range for FP16 (largest finite value 65504)",
                    show(v)
                ));
            }
            out.extend_from_slice(&h.to_le_bytes());
        }
        DType::F32 => {
            let x = json_float(v, dt)? as f32;
            if x.is_infinite() {
                return Err(format!("{} is out of range for FP32", show(v)));
            }
            out.extend_from_slice(&x.to_le_bytes());
        }
        DType::F64 => out.extend_from_slice(&json_float(v, dt)?.to_le_bytes()),
        DType::Bytes => match v {
            Value::String(s) => {
                let len = u32::try_from(s.len())
                    .map_err(|_| "string longer than 4 GiB (BYTES)".to_string())?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            _ => return Err(format!("expected a string (BYTES), got {}", show(v))),
        },
        // DType is non-exhaustive; the codec parses only the types above.
        _ => return Err(format!("datatype {} is not supported", kserve_name(dt))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::kserve::test_util::*;

    use serde_json::json;

    #[test]
    fn nested_data_is_flattened_row_major() {
        let expect: Vec<u8> = [1i32, 2, 3, 4, 5, 6]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        for data in [
            json!([1, 2, 3, 4, 5, 6]),
            json!([[1, 2, 3], [4, 5, 6]]),
            json!([1, [2, [3, [4]]], [[[[5]]]], 6]),
            json!([[], [1, 2], [], [[3, 4, 5, 6]]]),
        ] {
            let r = parse_json(&one_input("INT32", json!([2, 3]), data)).expect("parse");
            assert_eq!(r.inputs[0].data, expect);
        }
        // A scalar: shape [] has one element, given bare or in an array.
        for data in [json!(7), json!([7]), json!([[7]])] {
            let r = parse_json(&one_input("UINT8", json!([]), data)).expect("scalar");
            assert_eq!(r.inputs[0].data, vec![7]);
            assert_eq!(r.inputs[0].shape, Vec::<usize>::new());
        }
        // Zero elements.
        let r = parse_json(&one_input("FP32", json!([0, 3]), json!([]))).expect("empty");
        assert!(r.inputs[0].data.is_empty());
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let nest = |depth: usize| {
            let open = "[".repeat(depth);
            let close = "]".repeat(depth);
            format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"INT8","data":{open}5{close}}}]}}"#
            )
        };
        let r = parse_request(nest(100).as_bytes(), None).expect("depth 100");
        assert_eq!(r.inputs[0].data, vec![5]);
        let e = parse_request(nest(100_000).as_bytes(), None).expect_err("too deep");
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("recursion limit"), "{e}");
        // A hand-built value deeper than serde_json would parse is flattened iteratively.
        let mut v = json!(9);
        for _ in 0..1000 {
            v = Value::Array(vec![v]);
        }
        let data = decode_json_data("x", DType::U8, &[1], 1, &v).expect("deep value");
        assert_eq!(data, vec![9]);
    }

    #[test]
    fn binary_inputs_mixed_with_json() {
        let a_json = json!([1.5, -2.0]);
        let b_raw: Vec<u8> = [1i16, -2, 300]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let c_raw = bytes_elems(&[b"abc", &[0xff, 0x00]]);
        let d_raw = vec![0u8, 1, 2, 255];
        let header = json!({
            "id": "req-7",
            "inputs": [
                {"name": "a", "shape": [2], "datatype": "FP32", "data": a_json},
                {"name": "b", "shape": [3], "datatype": "INT16",
                 "parameters": {"binary_data_size": b_raw.len()}},
                {"name": "c", "shape": [2], "datatype": "BYTES",
                 "parameters": {"binary_data_size": c_raw.len()}},
                {"name": "d", "shape": [2, 2], "datatype": "BOOL",
                 "parameters": {"binary_data_size": 4, "other": "ignored"}},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}],
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&b_raw);
        body.extend_from_slice(&c_raw);
        body.extend_from_slice(&d_raw);
        let r = parse_request(&body, Some(header.len())).expect("parse");
        assert_eq!(r.id.as_deref(), Some("req-7"));
        assert!(!r.binary_output_default);
        assert_eq!(r.inputs.len(), 4);
        assert_eq!(
            r.inputs[0],
            tensor("a", DType::F32, &[2], f32s(&[1.5, -2.0]))
        );
        assert_eq!(r.inputs[1], tensor("b", DType::I16, &[3], b_raw));
        assert_eq!(r.inputs[2], tensor("c", DType::Bytes, &[2], c_raw));
        // BOOL bytes are normalised to 0/1.
        assert_eq!(
            r.inputs[3],
            tensor("d", DType::Bool, &[2, 2], vec![0, 1, 1, 1])
        );
        assert_eq!(
            r.outputs,
            vec![
                RequestedOutput {
                    name: "y".into(),
                    binary: Some(true)
                },
                RequestedOutput {
                    name: "z".into(),
                    binary: None
                },
            ]
        );
        // A header covering the whole body with no binary inputs is fine too.
        let plain = one_input("UINT8", json!([1]), json!([3])).to_string();
        let r = parse_request(plain.as_bytes(), Some(plain.len())).expect("no binary");
        assert_eq!(r.inputs[0].data, vec![3]);
    }

    #[test]
    fn error_cases() {
        let x = |dt: &str, shape: Value, data: Value| {
            (one_input(dt, shape, data).to_string().into_bytes(), None)
        };
        let xb = |dt: &str, shape: Value, size: Value, tail: &[u8]| {
            with_binary(
                json!({"inputs": [{"name": "x", "shape": shape, "datatype": dt,
                                   "parameters": {"binary_data_size": size}}]}),
                tail,
            )
        };
        let big = 4_294_967_296u64;
        let cases: Vec<(Body, &str)> = vec![
            (
                (br#"{}"#.to_vec(), None),
                "malformed request JSON: missing field `inputs` at line 1 column 2",
            ),
            (
                (br#"{"inputs": 5}"#.to_vec(), None),
                "malformed request JSON: invalid type: integer `5`, expected a sequence at line 1 column 12",
            ),
            (
                (b"\xff\xfe".to_vec(), None),
                "malformed request JSON: expected value at line 1 column 1",
            ),
            ((b"{}".to_vec(), Some(3)), "Inference-Header-Content-Length is 3 but the body is only 2 bytes"),
            (
                x("FLOAT32", json!([1]), json!([1.0])),
                "input 'x': unknown datatype 'FLOAT32'",
            ),
            (
                x("FP32", json!([1, 64]), json!(vec![0.5; 63])),
                "input 'x': shape [1,64] needs 64 elements, got 63",
            ),
            (
                x("INT32", json!([2, 2]), json!([[1, 2], [3, 4], [5]])),
                "input 'x': shape [2,2] needs 4 elements, got 5",
            ),
            (
                x("INT32", json!([2, -1]), json!([1, 2])),
                "input 'x': shape [2,-1] has a negative dimension",
            ),
            (
                x("UINT8", json!([big, big, big]), json!([])),
                "input 'x': shape [4294967296,4294967296,4294967296] exceeds the limit of 67108864 elements",
            ),
            (
                x("UINT8", json!([8192, 8193]), json!([])),
                "input 'x': shape [8192,8193] exceeds the limit of 67108864 elements",
            ),
            (
                x("UINT8", json!([0, 67108865]), json!([])),
                "input 'x': shape [0,67108865] exceeds the limit of 67108864 elements",
            ),
            (
                (
                    json!({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8",
                        "data": [1], "parameters": {"binary_data_size": 1}}]})
                    .to_string()
                    .into_bytes(),
                    None,
                ),
                "input 'x' has both 'data' and 'binary_data_size'",
            ),
            (
                (
                    br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8"}]}"#.to_vec(),
                    None,
                ),
                "input 'x' has neither 'data' nor 'binary_data_size'",
            ),
            (
                (
                    json!({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8",
                        "parameters": {"binary_data_size": 1}}]})
                    .to_string()
                    .into_bytes(),
                    None,
                ),
                "input 'x' has binary_data_size but the request has no Inference-Header-Content-Length header",
            ),
            (
                xb("FP32", json!([1, 64]), json!(252), &[0; 252]),
                "input 'x': shape [1,64] of FP32 needs 256 bytes, binary_data_size is 252",
            ),
            (
                xb("FP32", json!([2]), json!(8), &[0; 4]),
                "binary data section is 4 bytes but the inputs' binary_data_size values total 8",
            ),
            (
                xb("FP32", json!([2]), json!(8), &[0; 9]),
                "binary data section is 9 bytes but the inputs' binary_data_size values total 8",
            ),
            (
                with_binary(one_input("UINT8", json!([1]), json!([1])), &[1, 2]),
                "binary data section is 2 bytes but the inputs' binary_data_size values total 0",
            ),
            (
                // 256 MiB declared, nothing sent: refused before any allocation.
                xb("FP32", json!([67108864]), json!(268435456), &[]),
                "binary data section is 0 bytes but the inputs' binary_data_size values total 268435456",
            ),
            (
                xb("UINT8", json!([1]), json!(-1), &[]),
                "input 'x': parameter 'binary_data_size' must be a non-negative integer",
            ),
            (
                xb("BYTES", json!([1]), json!(6), &[5, 0, 0, 0, b'a', b'b']),
                "input 'x': malformed BYTES data: element 0: length 5 exceeds the 2 remaining bytes",
            ),
            (
                xb("BYTES", json!([2]), json!(7), &[1, 0, 0, 0, b'a', 0, 0]),
                "input 'x': malformed BYTES data: element 1: length prefix needs 4 bytes, only 2 remain",
            ),
            (
                xb("BYTES", json!([2]), json!(5), &[1, 0, 0, 0, b'a']),
                "input 'x': shape [2] needs 2 elements, got 1",
            ),
            (
                x("INT8", json!([2]), json!([1, 300])),
                "input 'x': data[1]: expected an integer in -128..=127 (INT8), got 300",
            ),
            (
                x("INT32", json!([2]), json!([1, 1.5])),
                "input 'x': data[1]: expected an integer in -2147483648..=2147483647 (INT32), got 1.5",
            ),
            (
                x("UINT8", json!([1]), json!([-1])),
                "input 'x': data[0]: expected an integer in 0..=255 (UINT8), got -1",
            ),
            (
                x("INT64", json!([1]), json!([u64::MAX])),
                "input 'x': data[0]: expected an integer in -9223372036854775808..=9223372036854775807 (INT64), got 18446744073709551615",
            ),
            (
                x("UINT16", json!([1]), json!(["7"])),
                "input 'x': data[0]: expected an integer in 0..=65535 (UINT16), got \"7\"",
            ),
            (
                x("INT32", json!([1]), json!([{"a": 1}])),
                "input 'x': data[0]: expected an integer in -2147483648..=2147483647 (INT32), got an object",
            ),
            (
                x("BOOL", json!([2]), json!([true, 1])),
                "input 'x': data[1]: expected true or false (BOOL), got 1",
            ),
            (
                x("FP32", json!([1]), json!([null])),
                "input 'x': data[0]: expected a number (FP32), got null",
            ),
            (
                x("FP32", json!([1]), json!([1e39])),
                "input 'x': data[0]: 1e+39 is out of range for FP32",
            ),
            (
                x("FP16", json!([1]), json!([65520])),
                "input 'x': data[0]: 65520 is out of range for FP16 (largest finite value 65504)",
            ),
            (
                x("BYTES", json!([1]), json!([1])),
                "input 'x': data[0]: expected a string (BYTES), got 1",
            ),
            (
                (
                    br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [1]},
                                    {"name": "x", "shape": [1], "datatype": "UINT8", "data": [2]}]}"#
                        .to_vec(),
                    None,
                ),
                "duplicate input 'x'",
            ),
            (
                (br#"{"inputs": [], "outputs": [{"name": "y"}, {"name": "y"}]}"#.to_vec(), None),
                "output 'y' requested more than once",
            ),
            (
                (br#"{"inputs": [], "parameters": {"binary_data_output": "yes"}}"#.to_vec(), None),
                "request: parameter 'binary_data_output' must be a boolean",
            ),
            (
                (
                    br#"{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}"#
                        .to_vec(),
                    None,
                ),
                "output 'y': parameter 'binary_data' must be a boolean",
            ),
        ];
        for ((body, header_len), msg) in cases {
            let e = parse_request(&body, header_len).expect_err(msg);
            assert_eq!(e.to_string(), msg);
            assert_eq!(e.status(), 400, "{msg}");
        }
        // serde_json's own message for truncated JSON.
        let e = parse_request(br#"{"inputs": ["#, None).expect_err("truncated");
        assert!(e.to_string().starts_with("malformed request JSON: "), "{e}");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn header_len_larger_than_body_rejected() {
        let body = one_input("UINT8", json!([1]), json!([1])).to_string();
        for n in [body.len() + 1, usize::MAX] {
            let e = parse_request(body.as_bytes(), Some(n)).expect_err("too long");
            assert!(matches!(e, KserveError::HeaderLengthTooLarge { .. }), "{e}");
            assert_eq!(e.status(), 400);
        }
        let e = parse_request(b"", Some(0)).expect_err("empty");
        assert!(matches!(e, KserveError::Json(_)));
    }

    #[test]
    fn header_len_value_parsing() {
        assert_eq!(parse_header_len("123").expect("n"), 123);
        assert_eq!(parse_header_len(" 0 ").expect("n"), 0);
        for bad in ["", "-1", "+5", "1e3", "abc", "99999999999999999999999999"] {
            let e = parse_header_len(bad).expect_err(bad);
            assert_eq!(e.status(), 400);
            assert!(
                e.to_string()
                    .starts_with("invalid Inference-Header-Content-Length")
            );
        }
    }

    #[test]
    fn huge_shapes_rejected() {
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[MAX_ELEMENTS]), Some(MAX_ELEMENTS));
        assert_eq!(element_count(&[MAX_ELEMENTS / 2, 2]), Some(MAX_ELEMENTS));
        assert_eq!(element_count(&[MAX_ELEMENTS, 2]), None);
        assert_eq!(element_count(&[MAX_ELEMENTS + 1]), None);
        assert_eq!(element_count(&[0, MAX_ELEMENTS]), Some(0));
        assert_eq!(element_count(&[MAX_ELEMENTS + 1, 0]), None);
        assert_eq!(element_count(&[usize::MAX, usize::MAX, 0]), None);
        assert_eq!(element_count(&[4096; 40]), None);
        assert_eq!(element_count(&[1; 10_000]), Some(1));
        for shape in [
            json!([i64::MAX]),
            json!([i64::MAX, i64::MAX]),
            json!([65536, 65536]),
        ] {
            let e = parse_json(&one_input("FP64", shape, json!([]))).expect_err("huge");
            assert!(matches!(e, KserveError::ShapeTooLarge { .. }), "{e}");
            assert_eq!(e.status(), 400);
        }
        // Larger than i64: serde refuses it.
        let e = parse_request(
            br#"{"inputs":[{"name":"x","shape":[18446744073709551616],"datatype":"UINT8","data":[]}]}"#,
            None,
        )
        .expect_err("u64 overflow");
        assert!(matches!(e, KserveError::Json(_)));
    }
}
