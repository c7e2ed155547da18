//! [`KserveError`]: every request the codec refuses, with its HTTP status.

use super::*;
use pollen_protocol::manifest::DType;

/// A request the codec refuses (or, for the two 500 variants, a response it cannot build).
/// [`KserveError::status`] gives the HTTP status; the `Display` text is meant for the
/// `{"error": "..."}` body.
#[derive(Debug, thiserror::Error)]
pub enum KserveError {
    /// The JSON part is not valid JSON or does not have the request's structure.
    #[error("malformed request JSON: {0}")]
    Json(serde_json::Error),
    /// An input's `data` cannot be read as JSON numbers, strings and arrays: nested deeper
    /// than serde_json's recursion limit, or a number out of `f64` range. The text is
    /// serde_json's, with the line and column in the body.
    #[error("malformed request JSON: {0}")]
    JsonData(String),
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
    /// A repository index request that is not `{}` or `{"ready": bool}` (or empty).
    #[error("malformed repository index request: {0}")]
    IndexRequest(String),
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
