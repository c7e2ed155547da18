//! A pure codec for the KServe v2 / Open Inference Protocol REST inference API
//! (`POST /v2/models/{name}[/versions/{v}]/infer`), including Triton's binary tensor data
//! extension. No HTTP framework and no inference engine here: the HTTP layer hands
//! [`parse_request`] the body and the `Inference-Header-Content-Length` header, runs the
//! model, and sends back what [`encode_response`] produces.
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
//! exactly the declared sizes, and nested `data` arrays are flattened without recursion
//! (serde_json itself refuses JSON nested deeper than 128 levels).

use pollen_protocol::manifest::DType;
use serde::Deserialize;
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::{Map, Value};
use std::collections::HashSet;

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
pub const DATATYPES: [DType; 13] = [
    DType::Bool,
    DType::U8,
    DType::U16,
    DType::U32,
    DType::U64,
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F16,
    DType::F32,
    DType::F64,
    DType::Bytes,
];

/// The protocol name of a data type, e.g. `"FP32"`.
pub fn kserve_name(d: DType) -> &'static str {
    d.kserve_name()
}

/// The data type named `s` (exact, uppercase protocol name), or `None`.
pub fn parse_datatype(s: &str) -> Option<DType> {
    DATATYPES.into_iter().find(|d| d.kserve_name() == s)
}

/// A tensor in its raw encoding.
///
/// Invariants (guaranteed for tensors from [`parse_request`], checked by
/// [`encode_response`]): the element count is the product of `shape` (1 for `[]`) and at
/// most [`MAX_ELEMENTS`]; for fixed-size types `data.len()` is that count times
/// [`DType::size`], little-endian, row-major, BOOL bytes being 0 or 1; for BYTES, `data`
/// is exactly that many elements, each a 4-byte little-endian length followed by the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// The input or output name.
    pub name: String,
    /// The element type.
    pub datatype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Raw little-endian bytes (BYTES: length-prefixed concatenation).
    pub data: Vec<u8>,
}

/// A parsed inference request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferRequest {
    /// The request's `id`, echoed in the response.
    pub id: Option<String>,
    /// The inputs, in request order, names distinct.
    pub inputs: Vec<Tensor>,
    /// The requested outputs, in request order, names distinct; empty means "all outputs".
    pub outputs: Vec<RequestedOutput>,
    /// Request-level `parameters.binary_data_output`: send outputs in binary unless an output
    /// says otherwise (false when absent).
    pub binary_output_default: bool,
}

/// One entry of the request's `outputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    /// The output name.
    pub name: String,
    /// The output's `parameters.binary_data`, if given.
    pub binary: Option<bool>,
}

/// A request the codec refuses (or, for the two 500 variants, a response it cannot build).
/// [`KserveError::status`] gives the HTTP status; the `Display` text is meant for the
/// `{"error": "..."}` body.
#[derive(Debug, thiserror::Error)]
pub enum KserveError {
    /// The JSON part is not valid JSON or does not have the request's structure.
    #[error("malformed request JSON: {0}")]
    Json(serde_json::Error),
    /// The `Inference-Header-Content-Length` header value is not a number.
    #[error("invalid Inference-Header-Content-Length header {0:?}")]
    InvalidHeaderLength(String),
    /// The `Inference-Header-Content-Length` header is larger than the body.
    #[error(
        "Inference-Header-Content-Length is {header_len} but the body is only {body_len} bytes"
    )]
    HeaderLengthTooLarge {
        /// The header's value.
        header_len: usize,
        /// The body length.
        body_len: usize,
    },
    /// A parameter has the wrong JSON type.
    #[error("{context}: parameter '{param}' must be {expected}")]
    InvalidParameter {
        /// `request`, `input 'x'` or `output 'y'`.
        context: String,
        /// The parameter name.
        param: &'static str,
        /// What it must be, e.g. `a boolean`.
        expected: &'static str,
    },
    /// An input's datatype is not one of the protocol's names.
    #[error("input '{input}': unknown datatype '{datatype}'")]
    UnknownDatatype {
        /// The input name.
        input: String,
        /// The datatype as sent.
        datatype: String,
    },
    /// An input's shape has a negative dimension.
    #[error("input '{input}': shape {shape} has a negative dimension")]
    NegativeDimension {
        /// The input name.
        input: String,
        /// The shape as sent, e.g. `[-1,3]`.
        shape: String,
    },
    /// An input's shape has a dimension or an element count above [`MAX_ELEMENTS`]
    /// (including counts that overflow).
    #[error("input '{input}': shape {shape} exceeds the limit of {limit} elements")]
    ShapeTooLarge {
        /// The input name.
        input: String,
        /// The shape as sent.
        shape: String,
        /// [`MAX_ELEMENTS`].
        limit: usize,
    },
    /// An input has both `data` and `parameters.binary_data_size`.
    #[error("input '{input}' has both 'data' and 'binary_data_size'")]
    DataAndBinary {
        /// The input name.
        input: String,
    },
    /// An input has neither `data` nor `parameters.binary_data_size`.
    #[error("input '{input}' has neither 'data' nor 'binary_data_size'")]
    NoData {
        /// The input name.
        input: String,
    },
    /// An input has `binary_data_size` but there is no binary section.
    #[error(
        "input '{input}' has binary_data_size but the request has no Inference-Header-Content-Length header"
    )]
    BinaryWithoutHeader {
        /// The input name.
        input: String,
    },
    /// An input's element count (JSON `data` flattened, or BYTES elements) differs from its
    /// shape's.
    #[error("input '{input}': shape {shape} needs {expected} elements, got {got}")]
    ElementCount {
        /// The input name.
        input: String,
        /// The shape, e.g. `[1,64]`.
        shape: String,
        /// The shape's element count.
        expected: usize,
        /// The element count sent.
        got: usize,
    },
    /// A fixed-size input's `binary_data_size` differs from its shape's byte size.
    #[error(
        "input '{input}': shape {shape} of {} needs {expected} bytes, binary_data_size is {got}",
        kserve_name(*.datatype)
    )]
    BinarySize {
        /// The input name.
        input: String,
        /// The shape.
        shape: String,
        /// The datatype.
        datatype: DType,
        /// The shape's byte size.
        expected: usize,
        /// The declared `binary_data_size`.
        got: u64,
    },
    /// The bytes after the JSON are not exactly the sum of the inputs' `binary_data_size`.
    #[error(
        "binary data section is {actual} bytes but the inputs' binary_data_size values total {declared}"
    )]
    BinarySectionLength {
        /// Sum of `binary_data_size` (saturating).
        declared: u64,
        /// Body length minus the JSON length.
        actual: usize,
    },
    /// A JSON `data` element has the wrong type or is out of range for the datatype.
    #[error("input '{input}': data[{index}]: {msg}")]
    InvalidElement {
        /// The input name.
        input: String,
        /// Index of the element in the flattened (row-major) data.
        index: usize,
        /// What is wrong, e.g. `expected an integer in -128..=127 (INT8), got 300`.
        msg: String,
    },
    /// A binary BYTES input is not a well-formed sequence of length-prefixed elements.
    #[error("input '{input}': malformed BYTES data: {msg}")]
    MalformedBytes {
        /// The input name.
        input: String,
        /// What is wrong.
        msg: String,
    },
    /// Two inputs have the same name.
    #[error("duplicate input '{0}'")]
    DuplicateInput(String),
    /// The same output is requested twice.
    #[error("output '{0}' requested more than once")]
    DuplicateOutput(String),
    /// A requested output is not among the model's outputs.
    #[error("unknown output '{0}'")]
    UnknownOutput(String),
    /// A BYTES output requested as JSON holds an element that is not UTF-8 (JSON strings
    /// cannot carry it; binary output can).
    #[error(
        "output '{output}': BYTES element {index} is not valid UTF-8; request it with binary_data"
    )]
    NonUtf8Output {
        /// The output name.
        output: String,
        /// The element's index.
        index: usize,
    },
    /// An output tensor handed to [`encode_response`] breaks the [`Tensor`] invariants: a
    /// server bug, hence 500.
    #[error("output '{output}': {msg}")]
    InvalidOutputTensor {
        /// The output name.
        output: String,
        /// What is wrong.
        msg: String,
    },
    /// serde_json failed to write the response (not expected to happen), 500.
    #[error("cannot serialize the response: {0}")]
    Serialize(serde_json::Error),
}

impl KserveError {
    /// The HTTP status: 400 for everything the client sent (including an unknown requested
    /// output), 500 for [`KserveError::InvalidOutputTensor`] and [`KserveError::Serialize`].
    pub fn status(&self) -> u16 {
        match self {
            KserveError::InvalidOutputTensor { .. } | KserveError::Serialize(_) => 500,
            _ => 400,
        }
    }
}

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

/// Round an `f32` to the nearest IEEE binary16 (ties to even) and return its bits.
/// Overflow gives infinity, tiny values subnormals or signed zero; NaN stays NaN (quiet,
/// sign and top payload bits kept).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    if x.is_nan() {
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        return sign | 0x7e00 | ((b >> 13) & 0x3ff) as u16;
    }
    f64_to_f16_bits(f64::from(x))
}

/// The `f32` value of IEEE binary16 bits (exact: every half is an `f32`). NaN payloads are
/// kept.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        0 => {
            // Zero or subnormal: mant * 2^-24, exact in f32.
            let v = mant as f32 * (1.0 / 16_777_216.0);
            if sign != 0 { -v } else { v }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (mant << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13)),
    }
}

/// Round an `f64` straight to binary16 (no double rounding through `f32`).
fn f64_to_f16_bits(x: f64) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 48) & 0x8000) as u16;
    let exp = ((b >> 52) & 0x7ff) as i32;
    let mant = b & ((1u64 << 52) - 1);
    if exp == 0x7ff {
        return if mant == 0 {
            sign | 0x7c00
        } else {
            sign | 0x7e00 | ((mant >> 42) & 0x3ff) as u16
        };
    }
    if exp == 0 {
        // Zero or an f64 subnormal (< 2^-1022): rounds to zero.
        return sign;
    }
    let e = exp - 1023;
    if e > 15 {
        return sign | 0x7c00;
    }
    // value = m * 2^(e-52); the half's quantum is 2^(max(e,-14)-10).
    let m = mant | (1u64 << 52);
    let shift = (42 + (-14 - e).max(0)) as u32;
    if shift >= 54 {
        // m < 2^53 <= half a quantum: rounds to zero.
        return sign;
    }
    let mut q = m >> shift;
    let rem = m & ((1u64 << shift) - 1);
    let half = 1u64 << (shift - 1);
    if rem > half || (rem == half && q & 1 == 1) {
        q += 1;
    }
    // Normal: q in [2^10, 2^11], a carry to 2^11 bumps the exponent. Subnormal: q in
    // [0, 2^10], 2^10 being the smallest normal.
    let r = if e >= -14 {
        (((e + 15) as u64) << 10) + q - 1024
    } else {
        q
    };
    if r >= 0x7c00 {
        sign | 0x7c00
    } else {
        sign | r as u16
    }
}

/// Checked shape of an input: dims non-negative, each and their product at most
/// [`MAX_ELEMENTS`]. Returns the shape and element count.
fn input_shape(name: &str, dims: &[i64]) -> Result<(Vec<usize>, usize), KserveError> {
    let shown = || {
        let parts: Vec<String> = dims.iter().map(i64::to_string).collect();
        truncate(&format!("[{}]", parts.join(",")), 200)
    };
    let mut shape = Vec::with_capacity(dims.len());
    for &d in dims {
        if d < 0 {
            return Err(KserveError::NegativeDimension {
                input: name.into(),
                shape: shown(),
            });
        }
        shape.push(usize::try_from(d).unwrap_or(usize::MAX));
    }
    let count = element_count(&shape).ok_or_else(|| KserveError::ShapeTooLarge {
        input: name.into(),
        shape: shown(),
        limit: MAX_ELEMENTS,
    })?;
    Ok((shape, count))
}

/// Product of `shape`, or `None` if a dimension or the product exceeds [`MAX_ELEMENTS`].
fn element_count(shape: &[usize]) -> Option<usize> {
    let mut n: usize = 1;
    let mut zero = false;
    for &d in shape {
        if d > MAX_ELEMENTS {
            return None;
        }
        if d == 0 {
            zero = true;
        }
        // Capped at MAX + 1, so n * d < 2^53 never overflows (and saturates on 32-bit).
        n = n.saturating_mul(d.max(1)).min(MAX_ELEMENTS + 1);
    }
    if zero {
        Some(0)
    } else if n > MAX_ELEMENTS {
        None
    } else {
        Some(n)
    }
}

/// `[1,64]`, truncated when absurdly long.
fn fmt_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(usize::to_string).collect();
    truncate(&format!("[{}]", parts.join(",")), 200)
}

/// At most `max` chars of `s`, with `...` if cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}...", &s[..i]),
    }
}

/// Call `f` on every non-array leaf of `v` in row-major order, without recursion.
fn for_each_leaf<'a, E>(
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
fn show(v: &Value) -> String {
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
fn decode_json_data(
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
fn json_integer<T: TryFrom<i64> + TryFrom<u64>>(
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
fn json_float(v: &Value, dt: DType) -> Result<f64, String> {
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
fn encode_element(dt: DType, v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
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

/// The elements of length-prefixed BYTES data; yields one `Err` and stops on malformed
/// data.
struct BytesElements<'a> {
    rest: &'a [u8],
    index: usize,
}

impl<'a> BytesElements<'a> {
    fn new(data: &'a [u8]) -> Self {
        BytesElements {
            rest: data,
            index: 0,
        }
    }
}

impl<'a> Iterator for BytesElements<'a> {
    type Item = Result<&'a [u8], String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let i = self.index;
        self.index += 1;
        let Some((len, tail)) = self.rest.split_first_chunk::<4>() else {
            let n = self.rest.len();
            self.rest = &[];
            return Some(Err(format!(
                "element {i}: length prefix needs 4 bytes, only {n} remain"
            )));
        };
        let len = u32::from_le_bytes(*len) as usize;
        match tail.split_at_checked(len) {
            Some((elem, tail)) => {
                self.rest = tail;
                Some(Ok(elem))
            }
            None => {
                let n = tail.len();
                self.rest = &[];
                Some(Err(format!(
                    "element {i}: length {len} exceeds the {n} remaining bytes"
                )))
            }
        }
    }
}

/// Number of elements in well-formed BYTES data.
fn count_bytes_elements(data: &[u8]) -> Result<usize, String> {
    let mut n = 0;
    for e in BytesElements::new(data) {
        e?;
        n += 1;
    }
    Ok(n)
}

/// Check an output tensor against the [`Tensor`] invariants (and UTF-8 if sent as JSON).
fn check_output(t: &Tensor, as_json: bool) -> Result<(), KserveError> {
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
struct JsonData<'a>(&'a Tensor);

/// Fixed-size little-endian chunks of `data` (a trailing partial chunk is dropped).
fn le_chunks<const N: usize>(data: &[u8]) -> impl ExactSizeIterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

fn serialize_all<S: Serializer, T: Serialize>(
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
    use serde_json::json;

    fn parse_json(v: &Value) -> Result<InferRequest, KserveError> {
        parse_request(v.to_string().as_bytes(), None)
    }

    fn one_input(datatype: &str, shape: Value, data: Value) -> Value {
        json!({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]})
    }

    fn body_json(r: &EncodedResponse) -> Value {
        let n = r.header_len.unwrap_or(r.body.len());
        serde_json::from_slice(&r.body[..n]).expect("response JSON")
    }

    fn tensor(name: &str, datatype: DType, shape: &[usize], data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
            data,
        }
    }

    fn f32s(xs: &[f32]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn bytes_elems(xs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for x in xs {
            out.extend_from_slice(&(x.len() as u32).to_le_bytes());
            out.extend_from_slice(x);
        }
        out
    }

    fn no_outputs_requested() -> InferRequest {
        InferRequest {
            id: None,
            inputs: vec![],
            outputs: vec![],
            binary_output_default: false,
        }
    }

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

    /// A request built from a JSON header and a binary tail.
    fn with_binary(header: Value, tail: &[u8]) -> Body {
        let h = header.to_string();
        let mut body = h.clone().into_bytes();
        body.extend_from_slice(tail);
        (body, Some(h.len()))
    }

    /// A request body and its `Inference-Header-Content-Length`.
    type Body = (Vec<u8>, Option<usize>);

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

    #[test]
    fn f16_known_values() {
        let cases: [(f32, u16); 18] = [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (0.1, 0x2e66),
            (1.0 / 3.0, 0x3555),
            (65504.0, 0x7bff),
            (65519.99, 0x7bff),
            (65520.0, 0x7c00),
            (1e10, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
            (6.103_515_6e-5, 0x0400), // 2^-14, smallest normal
            (6.097_555e-5, 0x03ff),   // largest subnormal
            (5.960_464_5e-8, 0x0001), // 2^-24, smallest subnormal
            (2.980_232_2e-8, 0x0000), // 2^-25: tie, to even (zero)
            (8.940_697e-8, 0x0002),   // 1.5 * 2^-24: tie, to even (2)
        ];
        for (x, h) in cases {
            assert_eq!(f32_to_f16_bits(x), h, "{x:e}");
        }
        assert_eq!(
            f32_to_f16_bits(f32::from_bits(2f32.powi(-25).to_bits() + 1)),
            0x0001
        );
        assert_eq!(f32_to_f16_bits(1e-30), 0x0000);
        assert_eq!(f32_to_f16_bits(-1e-30), 0x8000);
        assert_eq!(f32_to_f16_bits(f32::MIN_POSITIVE / 4.0), 0x0000); // f32 subnormal
        assert_eq!(f32_to_f16_bits(f32::MAX), 0x7c00);
        assert_eq!(f32_to_f16_bits(-f32::MAX), 0xfc00);
        // 2048 + 1 is a tie between 2048 and 2050: to even (2048); 2048 + 3 goes up to 2052.
        assert_eq!(f32_to_f16_bits(2049.0), f32_to_f16_bits(2048.0));
        assert_eq!(f16_bits_to_f32(f32_to_f16_bits(2051.0)), 2052.0);
        // f64 path: no double rounding through f32 (1 + 2^-11 + 2^-30 is above the tie).
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-30);
        assert_eq!(f64_to_f16_bits(x), 0x3c01);
        assert_eq!(f32_to_f16_bits(x as f32), 0x3c00); // the f32 is exactly the tie

        assert_eq!(f16_bits_to_f32(0x3c00), 1.0);
        assert_eq!(f16_bits_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_bits_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_bits_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_bits_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_bits_to_f32(0xfc00), f32::NEG_INFINITY);
        assert_eq!(f16_bits_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert!(f16_bits_to_f32(0x7e00).is_nan());
        assert!(f16_bits_to_f32(0x7c01).is_nan()); // signalling NaN stays NaN
        let n = f32_to_f16_bits(f32::NAN);
        assert!(n & 0x7c00 == 0x7c00 && n & 0x3ff != 0);
        // A NaN whose payload is only in low f32 bits is still NaN, not infinity.
        let n = f32_to_f16_bits(f32::from_bits(0x7f80_0001));
        assert!(f16_bits_to_f32(n).is_nan());
        let n = f32_to_f16_bits(f32::from_bits(0xff80_0001));
        assert_eq!(n & 0x8000, 0x8000);
    }

    #[test]
    fn f16_exhaustive_roundtrip_and_ties() {
        for h in 0..=u16::MAX {
            let f = f16_bits_to_f32(h);
            if h & 0x7c00 == 0x7c00 && h & 0x3ff != 0 {
                assert!(f.is_nan(), "{h:#06x}");
                let back = f32_to_f16_bits(f);
                assert_eq!(back, h | 0x0200, "{h:#06x}"); // quietened
            } else {
                assert_eq!(f32_to_f16_bits(f), h, "{h:#06x}");
                assert_eq!(f64_to_f16_bits(f64::from(f)), h, "{h:#06x}");
            }
        }
        // Every midpoint between consecutive positive finite halves (and the last one,
        // towards 65536, the overflow threshold).
        for h in 0..0x7c00u16 {
            let lo = f64::from(f16_bits_to_f32(h));
            let hi = if h == 0x7bff {
                65536.0
            } else {
                f64::from(f16_bits_to_f32(h + 1))
            };
            let mid = (lo + hi) / 2.0;
            let up = h + 1; // 0x7c00 is infinity
            let even = if h % 2 == 0 { h } else { up };
            assert_eq!(f64_to_f16_bits(mid), even, "tie above {h:#06x}");
            assert_eq!(f32_to_f16_bits(mid as f32), even, "f32 tie above {h:#06x}");
            let above = f64::from_bits(mid.to_bits() + 1);
            let below = f64::from_bits(mid.to_bits() - 1);
            assert_eq!(f64_to_f16_bits(above), up, "above tie {h:#06x}");
            assert_eq!(f64_to_f16_bits(below), h, "below tie {h:#06x}");
            let above = f32::from_bits((mid as f32).to_bits() + 1);
            let below = f32::from_bits((mid as f32).to_bits() - 1);
            assert_eq!(f32_to_f16_bits(above), up, "f32 above tie {h:#06x}");
            assert_eq!(f32_to_f16_bits(below), h, "f32 below tie {h:#06x}");
            // Sign symmetry.
            assert_eq!(f64_to_f16_bits(f64::from(-above)), up | 0x8000);
            assert_eq!(f32_to_f16_bits(-below), h | 0x8000);
        }
    }

    /// xorshift64: deterministic, dependency-free noise.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Whatever parses must hold the Tensor invariants (checked by encoding it back).
    fn check_parsed(body: &[u8], header_len: Option<usize>) {
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
