//! Parsing a request: the JSON part, then the binary section of the tensor data
//! extension, checked against the declared shapes and sizes before anything is allocated.
//!
//! The JSON is read in two passes over the body, neither of which builds a tree of values.
//! The first reads the request's structure and keeps each input's `data` as the borrowed
//! text of its value ([`RawValue`]: serde_json checks its syntax and finds its end, nothing
//! is allocated), so that `datatype` and `shape` are known wherever they stand in the
//! object. The second reads each `data` text with a typed visitor ([`Flatten`]) that writes
//! every element straight into the tensor's little-endian buffer.

use super::*;
use pollen_protocol::manifest::DType;
use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
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
struct RawRequest<'a> {
    id: Option<String>,
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<RawInput<'a>>,
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
struct RawInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    parameters: Option<Map<String, Value>>,
    /// The text of the `data` value, a slice of the body (`null` reads as `None`).
    #[serde(borrow)]
    data: Option<&'a RawValue>,
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
/// any depth serde_json reads, 128 levels within `data`, flattened row-major; a bare
/// scalar counts as one element) is converted to raw bytes with range checks (integers
/// must be JSON integers within the type's range, floats JSON numbers that do not overflow
/// the type, FP16 rounded to nearest-even, BOOL `true` / `false`, BYTES strings); binary
/// BOOL bytes are normalised to 0/1. JSON floats are read by serde_json as the nearest
/// `f64` and then rounded to FP32/FP16, so a decimal lying within `f64` precision of a
/// rounding boundary may round differently from a direct decimal-to-`f32` conversion
/// (binary data is bit-exact). A wrong element count is reported before a bad element.
///
/// Memory: no tree of JSON values is built. Besides the body, parsing holds the request's
/// small fields and each input's tensor buffer, which is allocated once at its final size
/// (never more than the shape needs, nor more than its `data` text can fill: 8 bytes per
/// two bytes of text at most, for FP64 and the 64-bit integers): peak memory is the body
/// plus 1× the tensors.
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
    let raw: RawRequest<'_> = serde_json::from_slice(json).map_err(KserveError::Json)?;
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
            (Some(data), None) => Pending::Ready(decode_json_data(
                &name, datatype, &shape, count, json, data,
            )?),
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

/// Decode an input's JSON `data` into raw bytes, in one pass over its text.
///
/// `raw` is the text of the value, a slice of `json` (already checked to be JSON by the
/// first pass). The element count is checked first: a wrong count is reported even when
/// some element is also bad; otherwise the first bad element is. Elements past `count`
/// are counted, not stored.
pub(super) fn decode_json_data(
    name: &str,
    dt: DType,
    shape: &[usize],
    count: usize,
    json: &[u8],
    raw: &RawValue,
) -> Result<Vec<u8>, KserveError> {
    let text = raw.get();
    // n elements take at least 2n - 1 bytes of text: the buffer is never larger than the
    // text can fill, whatever the shape claims.
    let fits = count.min(text.len().div_ceil(2));
    let mut sink = Sink {
        dt,
        expected: count,
        out: Vec::with_capacity(fits * dt.size().unwrap_or(0)),
        got: 0,
        bad: None,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    Flatten(&mut sink)
        .deserialize(&mut de)
        .map_err(|e| relocate(&e, json, offset_in(json, text)))?;
    if sink.got != count {
        return Err(KserveError::ElementCount {
            input: name.into(),
            shape: fmt_shape(shape),
            expected: count,
            got: sink.got,
        });
    }
    if let Some((index, msg)) = sink.bad {
        return Err(KserveError::InvalidElement {
            input: name.into(),
            index,
            msg,
        });
    }
    Ok(sink.out)
}

/// Where `part` (a slice of `whole`) starts in `whole`; 0 if it is not a slice of it.
fn offset_in(whole: &[u8], part: &str) -> usize {
    (part.as_ptr() as usize)
        .checked_sub(whole.as_ptr() as usize)
        .filter(|&o| o <= whole.len())
        .unwrap_or(0)
}

/// A serde_json error met in the text of a `data` value that starts at byte `at` of
/// `json`, with its line and column moved to where they are in `json`.
fn relocate(e: &serde_json::Error, json: &[u8], at: usize) -> KserveError {
    let text = e.to_string();
    if e.line() == 0 {
        return KserveError::JsonData(text);
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let what = text.strip_suffix(&suffix).unwrap_or(&text);
    let before = &json[..at.min(json.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line0 = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let (line, column) = if e.line() == 1 {
        (line0, at - line_start + e.column())
    } else {
        (line0 + e.line() - 1, e.column())
    };
    KserveError::JsonData(format!("{what} at line {line} column {column}"))
}

/// Where the elements of one input's `data` go as [`Flatten`] reads them.
struct Sink {
    dt: DType,
    /// The shape's element count.
    expected: usize,
    /// The raw tensor bytes of the elements so far (emptied at the first bad element).
    out: Vec<u8>,
    /// Elements seen so far, stored or not.
    got: usize,
    /// The first bad element: its index and what is wrong with it.
    bad: Option<(usize, String)>,
}

impl Sink {
    fn leaf(&mut self, leaf: Leaf<'_>) {
        let index = self.got;
        self.got += 1;
        if index >= self.expected || self.bad.is_some() {
            return;
        }
        if let Err(msg) = encode_element(self.dt, leaf, &mut self.out) {
            self.bad = Some((index, msg));
            self.out = Vec::new();
        }
    }
}

/// Reads a `data` value (an array nested to any depth, or a bare scalar) into a [`Sink`],
/// row-major. It never fails on an element (a bad one is noted in the sink and reading
/// goes on, so that the count is known); the only errors are serde_json's own (nesting
/// past its recursion limit, a number out of `f64` range).
struct Flatten<'s>(&'s mut Sink);

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tensor data")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.0.leaf(Leaf::Object);
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.leaf(Leaf::Null);
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.leaf(Leaf::Bool(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.leaf(Leaf::U64(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.leaf(Leaf::I64(v));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.leaf(Leaf::F64(v));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.leaf(Leaf::Str(v));
        Ok(())
    }
}

/// One element of a `data` value, as serde_json reads it: a non-negative integer is a
/// `U64`, a negative one an `I64`, any other number an `F64`.
#[derive(Clone, Copy, Debug)]
enum Leaf<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(&'a str),
    /// An object (its contents are skipped).
    Object,
}

impl Leaf<'_> {
    /// A short rendering for error messages (numbers as serde_json writes them).
    fn show(self) -> String {
        match self {
            Leaf::Null => "null".into(),
            Leaf::Bool(b) => b.to_string(),
            Leaf::U64(u) => u.to_string(),
            Leaf::I64(i) => i.to_string(),
            Leaf::F64(f) => serde_json::Number::from_f64(f)
                .map_or_else(|| f.to_string(), |n| truncate(&n.to_string(), 40)),
            Leaf::Str(s) => format!("\"{}\"", truncate(s, 40)),
            Leaf::Object => "an object".into(),
        }
    }

    /// The value as `T`, if it is an integer within `T`'s range.
    fn integer<T: TryFrom<i64> + TryFrom<u64>>(self) -> Option<T> {
        match self {
            Leaf::U64(u) => T::try_from(u).ok(),
            Leaf::I64(i) => T::try_from(i).ok(),
            _ => None,
        }
    }

    /// The value as `f64`, if it is a number.
    fn float(self) -> Option<f64> {
        match self {
            Leaf::U64(u) => Some(u as f64),
            Leaf::I64(i) => Some(i as f64),
            Leaf::F64(f) => Some(f),
            _ => None,
        }
    }
}

/// Append the raw encoding of one JSON element of type `dt` to `out`, or say what is wrong
/// with it.
fn encode_element(dt: DType, v: Leaf<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    macro_rules! int {
        ($t:ty) => {
            match v.integer::<$t>() {
                Some(x) => out.extend_from_slice(&x.to_le_bytes()),
                None => {
                    return Err(format!(
                        "expected an integer in {}..={} ({}), got {}",
                        <$t>::MIN,
                        <$t>::MAX,
                        kserve_name(dt),
                        v.show()
                    ));
                }
            }
        };
    }
    let float = || {
        v.float()
            .ok_or_else(|| format!("expected a number ({}), got {}", kserve_name(dt), v.show()))
    };
    match dt {
        DType::Bool => match v {
            Leaf::Bool(b) => out.push(u8::from(b)),
            _ => return Err(format!("expected true or false (BOOL), got {}", v.show())),
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
            let h = f64_to_f16_bits(float()?);
            if h & 0x7fff == 0x7c00 {
                return Err(format!(
                    "{} is out of range for FP16 (largest finite value 65504)",
                    v.show()
                ));
            }
            out.extend_from_slice(&h.to_le_bytes());
        }
        DType::F32 => {
            let x = float()? as f32;
            if x.is_infinite() {
                return Err(format!("{} is out of range for FP32", v.show()));
            }
            out.extend_from_slice(&x.to_le_bytes());
        }
        DType::F64 => out.extend_from_slice(&float()?.to_le_bytes()),
        DType::Bytes => match v {
            Leaf::Str(s) => {
                let len = u32::try_from(s.len())
                    .map_err(|_| "string longer than 4 GiB (BYTES)".to_string())?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            _ => return Err(format!("expected a string (BYTES), got {}", v.show())),
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
        // The limit applies within `data` (128 levels), and the error says where in the body.
        let e = parse_request(nest(200).as_bytes(), None).expect_err("too deep");
        let at = r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":"#.len();
        assert_eq!(
            e.to_string(),
            format!(
                "malformed request JSON: recursion limit exceeded at line 1 column {}",
                at + 128
            )
        );
        // A number out of f64 range is found in the second pass; its position is the one a
        // parse of the whole body as a `Value` gives, on the first line or a later one.
        for body in [
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP64","data":[1, 1e400]}]}"#,
            "{\n \"inputs\": [{\"name\": \"x\", \"shape\": [2], \"datatype\": \"FP64\",\n  \"data\": [1,\n   -2e999]}]}",
        ] {
            let e = parse_request(body.as_bytes(), None).expect_err("out of range");
            let v = serde_json::from_str::<Value>(body).expect_err("Value parse");
            assert_eq!(e.to_string(), format!("malformed request JSON: {v}"));
            assert_eq!(e.status(), 400);
        }
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
    fn datatype_and_shape_may_follow_data() {
        // Every datatype, with `data` before `datatype` and `shape` (and `name` last): the
        // same tensor as in the usual order.
        let cases = [
            ("BOOL", json!([[true, false]])),
            ("UINT8", json!([[0, 255]])),
            ("UINT16", json!([[1, 65535]])),
            ("UINT32", json!([[1, 4294967295u32]])),
            ("UINT64", json!([[0, u64::MAX]])),
            ("INT8", json!([[-128, 127]])),
            ("INT16", json!([[-32768, 7]])),
            ("INT32", json!([[i32::MIN, 3]])),
            ("INT64", json!([[i64::MIN, i64::MAX]])),
            ("FP16", json!([[0.1, -65504]])),
            ("FP32", json!([[0.1, 3e38]])),
            ("FP64", json!([[0.1, -1e300]])),
            ("BYTES", json!([["a\"b", ""]])),
        ];
        for (dt, data) in cases {
            let usual = parse_json(&one_input(dt, json!([1, 2]), data.clone())).expect(dt);
            let body = format!(
                r#"{{"inputs": [{{"data": {data}, "parameters": {{}}, "datatype": "{dt}",
                    "shape": [1, 2], "name": "x"}}], "id": "r"}}"#
            );
            let late = parse_request(body.as_bytes(), None).expect(dt);
            assert_eq!(late.inputs, usual.inputs, "{dt}");
            assert_eq!(late.id.as_deref(), Some("r"));
            // The buffer is allocated once at its final size.
            let t = &late.inputs[0];
            if t.datatype != DType::Bytes {
                assert_eq!(t.data.capacity(), t.data.len(), "{dt}");
            }
        }
        // A bad element is found whatever the order, and so is a wrong count.
        let body =
            r#"{"inputs": [{"data": [1, 300], "name": "x", "datatype": "UINT8", "shape": [2]}]}"#;
        let e = parse_request(body.as_bytes(), None).expect_err("300");
        assert_eq!(
            e.to_string(),
            "input 'x': data[1]: expected an integer in 0..=255 (UINT8), got 300"
        );
        let body =
            r#"{"inputs": [{"data": [[1], [2]], "shape": [3], "name": "x", "datatype": "INT64"}]}"#;
        let e = parse_request(body.as_bytes(), None).expect_err("count");
        assert_eq!(
            e.to_string(),
            "input 'x': shape [3] needs 3 elements, got 2"
        );
    }

    #[test]
    fn count_errors_come_before_element_errors_and_objects_are_one_element() {
        let x = |dt: &str, shape: Value, data: Value| {
            parse_json(&one_input(dt, shape, data)).map(|r| r.inputs[0].data.clone())
        };
        let msg = |r: Result<Vec<u8>, KserveError>| r.expect_err("an error").to_string();
        // Too many elements, one of them bad: the count is reported (as before).
        assert_eq!(
            msg(x("INT8", json!([2]), json!([1, 300, 5]))),
            "input 'x': shape [2] needs 2 elements, got 3"
        );
        assert_eq!(
            msg(x("UINT8", json!([2]), json!([1, [300, 2]]))),
            "input 'x': shape [2] needs 2 elements, got 3"
        );
        // Far too many elements: all counted, none past the shape stored.
        let many = json!(vec![0; 100_000]);
        assert_eq!(
            msg(x("FP64", json!([3]), many)),
            "input 'x': shape [3] needs 3 elements, got 100000"
        );
        // A shape far larger than the data: the count error, and no buffer of the shape's
        // size was needed to find it (the buffer is bounded by the text: see below).
        assert_eq!(
            msg(x("FP64", json!([67108864]), json!([1, 2]))),
            "input 'x': shape [67108864] needs 67108864 elements, got 2"
        );
        // The first bad element wins; an object is one (bad) element, whatever it holds.
        assert_eq!(
            msg(x("INT32", json!([3]), json!([1, {"a": [1, 2, 3]}, "z"]))),
            "input 'x': data[1]: expected an integer in -2147483648..=2147483647 (INT32), got an object"
        );
        assert_eq!(
            msg(x("FP32", json!([2]), json!([[true], [null]]))),
            "input 'x': data[0]: expected a number (FP32), got true"
        );
        // Out of range for the type, integer or not.
        for (dt, v, want) in [
            (
                "UINT8",
                json!(300),
                "expected an integer in 0..=255 (UINT8), got 300",
            ),
            (
                "UINT8",
                json!(-1),
                "expected an integer in 0..=255 (UINT8), got -1",
            ),
            (
                "INT32",
                json!(1.5),
                "expected an integer in -2147483648..=2147483647 (INT32), got 1.5",
            ),
            (
                "INT32",
                json!(2147483648u64),
                "expected an integer in -2147483648..=2147483647 (INT32), got 2147483648",
            ),
            (
                "UINT64",
                json!(1e20),
                "expected an integer in 0..=18446744073709551615 (UINT64), got 1e+20",
            ),
            (
                "INT16",
                json!(1.0),
                "expected an integer in -32768..=32767 (INT16), got 1.0",
            ),
            ("FP32", json!(-3.5e38), "-3.5e+38 is out of range for FP32"),
            (
                "FP16",
                json!(-65520.0),
                "-65520.0 is out of range for FP16 (largest finite value 65504)",
            ),
            (
                "BOOL",
                json!("true"),
                "expected true or false (BOOL), got \"true\"",
            ),
            ("BYTES", json!(null), "expected a string (BYTES), got null"),
        ] {
            let got = msg(x(dt, json!([2]), json!([v.clone(), v])));
            assert_eq!(got, format!("input 'x': data[0]: {want}"), "{dt}");
        }
        // The largest values that fit.
        assert_eq!(
            x("FP16", json!([1]), json!([65504])).unwrap(),
            vec![0xff, 0x7b]
        );
        assert_eq!(
            x("FP32", json!([1]), json!([3.4028234663852886e38])).unwrap(),
            f32::MAX.to_le_bytes()
        );
    }

    /// The earlier decoding, through a tree of `Value`s: the streaming one must agree with
    /// it on every body, in result and in error message.
    fn through_values(
        dt: DType,
        shape: &[usize],
        count: usize,
        data: &Value,
    ) -> Result<Vec<u8>, String> {
        let mut leaves = Vec::new();
        let mut stack = vec![data];
        while let Some(v) = stack.pop() {
            match v {
                Value::Array(a) => stack.extend(a.iter().rev()),
                leaf => leaves.push(leaf),
            }
        }
        if leaves.len() != count {
            return Err(format!(
                "input 'x': shape {} needs {count} elements, got {}",
                fmt_shape(shape),
                leaves.len()
            ));
        }
        let mut out = Vec::new();
        for (i, v) in leaves.into_iter().enumerate() {
            let leaf = match v {
                Value::Null => Leaf::Null,
                Value::Bool(b) => Leaf::Bool(*b),
                Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                    (Some(u), _, _) => Leaf::U64(u),
                    (None, Some(i), _) => Leaf::I64(i),
                    (_, _, f) => Leaf::F64(f.expect("a number")),
                },
                Value::String(s) => Leaf::Str(s),
                Value::Object(_) => Leaf::Object,
                Value::Array(_) => unreachable!("flattened"),
            };
            encode_element(dt, leaf, &mut out).map_err(|m| format!("input 'x': data[{i}]: {m}"))?;
        }
        Ok(out)
    }

    #[test]
    fn agrees_with_decoding_through_values() {
        let mut rng = Rng(0x51_7cc1_b727_220a);
        fn leaf(rng: &mut Rng) -> Value {
            match rng.below(12) {
                0 => json!(rng.below(2) == 0),
                1 => json!(rng.below(300)),
                2 => json!(-(rng.below(40_000) as i64)),
                3 => json!(rng.next()),
                4 => json!(rng.next() as i64),
                5 => json!((rng.below(2000) as f64 - 1000.0) / 8.0),
                6 => json!(f64::from_bits(rng.next() >> 2)),
                7 => json!(["é\"", "", "ab"][rng.below(3)]),
                8 => Value::Null,
                9 => json!({"k": [1, 2]}),
                10 => json!(65504.0 + rng.below(40) as f64),
                _ => json!(rng.below(2)),
            }
        }
        fn nested(rng: &mut Rng, depth: usize) -> Value {
            if depth == 0 || rng.below(3) == 0 {
                return leaf(rng);
            }
            Value::Array((0..rng.below(4)).map(|_| nested(rng, depth - 1)).collect())
        }
        let mut agreed_ok = 0;
        for _ in 0..20_000 {
            let dt = DATATYPES[rng.below(DATATYPES.len())];
            let data = if rng.below(4) == 0 {
                // Many elements of one kind, so that whole tensors decode too.
                let v = leaf(&mut rng);
                Value::Array(vec![v; rng.below(6)])
            } else {
                nested(&mut rng, 4)
            };
            if data.is_null() {
                // `"data": null` is no data at all (NoData), as before.
                continue;
            }
            let n = rng.below(7);
            let shape = if rng.below(2) == 0 {
                vec![n]
            } else {
                vec![1, n]
            };
            let req = if rng.below(2) == 0 {
                one_input(kserve_name(dt), json!(shape), data)
            } else {
                json!({"inputs": [{"data": data, "shape": shape, "name": "x",
                                   "datatype": kserve_name(dt)}]})
            };
            // The Values the earlier code saw: parsed from the body text (serde_json's float
            // parsing is not always the nearest f64, the same in both passes).
            let parsed: Value = serde_json::from_str(&req.to_string()).expect("json");
            let want = through_values(dt, &shape, n, &parsed["inputs"][0]["data"]);
            let got = parse_json(&req).map(|r| r.inputs[0].data.clone());
            match (&got, &want) {
                (Ok(g), Ok(w)) => {
                    assert_eq!(g, w, "{req}");
                    agreed_ok += 1;
                }
                (Err(g), Err(w)) => assert_eq!(&g.to_string(), w, "{req}"),
                _ => panic!("{req}: streaming {got:?}, through values {want:?}"),
            }
        }
        assert!(agreed_ok > 1000, "only {agreed_ok} valid tensors");
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
