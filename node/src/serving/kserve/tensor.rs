//! The codec's tensor and request types, and the shape and BYTES helpers both directions
//! use.

use super::*;
use pollen_protocol::manifest::DType;

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

/// Checked shape of an input: dims non-negative, each and their product at most
/// [`MAX_ELEMENTS`]. Returns the shape and element count.
pub(super) fn input_shape(name: &str, dims: &[i64]) -> Result<(Vec<usize>, usize), KserveError> {
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
pub(super) fn element_count(shape: &[usize]) -> Option<usize> {
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
pub(super) fn fmt_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(usize::to_string).collect();
    truncate(&format!("[{}]", parts.join(",")), 200)
}

/// At most `max` chars of `s`, with `...` if cut.
pub(super) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}...", &s[..i]),
    }
}

/// The elements of length-prefixed BYTES data; yields one `Err` and stops on malformed
/// data.
pub(super) struct BytesElements<'a> {
    rest: &'a [u8],
    index: usize,
}

impl<'a> BytesElements<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
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
pub(super) fn count_bytes_elements(data: &[u8]) -> Result<usize, String> {
    let mut n = 0;
    for e in BytesElements::new(data) {
        e?;
        n += 1;
    }
    Ok(n)
}
