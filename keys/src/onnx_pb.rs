//! Just enough of ONNX's protobuf to read golden data: `TensorProto` files (the
//! `input_K.pb` / `output_K.pb` of the ONNX test-data layout) and the names and kinds of a
//! model's graph inputs and outputs.
//!
//! A hand-written protobuf walker, not a protobuf library: the two messages need a dozen
//! fields between them, and a model file is walked from disk without loading it whole
//! (initializers are skipped by seeking), so a multi-GiB model costs a few KiB of memory.
//! Every length is checked against what remains, so malformed bytes are an error, never a
//! panic or an allocation larger than the input.

use anyhow::{Context, Result, anyhow, bail};
use pollen_protocol::manifest::DType;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// A protobuf field value, as the wire type gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of a message, in order: `(field number, value)`; `None` if malformed.
fn fields(b: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let value = match key & 7 {
            0 => Value::Varint(varint(b, &mut i)?),
            1 => {
                let s = b.get(i..i.checked_add(8)?)?;
                i += 8;
                Value::Fixed64(u64::from_le_bytes(s.try_into().ok()?))
            }
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let end = i.checked_add(len)?;
                let s = b.get(i..end)?;
                i = end;
                Value::Bytes(s)
            }
            5 => {
                let s = b.get(i..i.checked_add(4)?)?;
                i += 4;
                Value::Fixed32(u32::from_le_bytes(s.try_into().ok()?))
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

/// Append the varints of a repeated integer field, packed (`Bytes`) or not (`Varint`).
fn push_varints(v: Value<'_>, out: &mut Vec<u64>) -> Option<()> {
    match v {
        Value::Varint(n) => out.push(n),
        Value::Bytes(b) => {
            let mut i = 0;
            while i < b.len() {
                out.push(varint(b, &mut i)?);
            }
        }
        _ => return None,
    }
    Some(())
}

/// Append the 4-byte words of a repeated `float` field, packed or not.
fn push_fixed32(v: Value<'_>, out: &mut Vec<u32>) -> Option<()> {
    match v {
        Value::Fixed32(n) => out.push(n),
        Value::Bytes(b) if b.len() % 4 == 0 => out.extend(
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        _ => return None,
    }
    Some(())
}

/// Append the 8-byte words of a repeated `double` field, packed or not.
fn push_fixed64(v: Value<'_>, out: &mut Vec<u64>) -> Option<()> {
    match v {
        Value::Fixed64(n) => out.push(n),
        Value::Bytes(b) if b.len() % 8 == 0 => out.extend(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
        ),
        _ => return None,
    }
    Some(())
}

/// The name of an ONNX `TensorProto.DataType` code, for messages.
pub fn onnx_type_name(code: u64) -> String {
    let name = match code {
        0 => "UNDEFINED",
        1 => "FLOAT",
        2 => "UINT8",
        3 => "INT8",
        4 => "UINT16",
        5 => "INT16",
        6 => "INT32",
        7 => "INT64",
        8 => "STRING",
        9 => "BOOL",
        10 => "FLOAT16",
        11 => "DOUBLE",
        12 => "UINT32",
        13 => "UINT64",
        14 => "COMPLEX64",
        15 => "COMPLEX128",
        16 => "BFLOAT16",
        17 => "FLOAT8E4M3FN",
        18 => "FLOAT8E4M3FNUZ",
        19 => "FLOAT8E5M2",
        20 => "FLOAT8E5M2FNUZ",
        21 => "UINT4",
        22 => "INT4",
        23 => "FLOAT4E2M1",
        24 => "FLOAT8E8M0",
        25 => "UINT2",
        26 => "INT2",
        _ => return format!("data type {code}"),
    };
    format!("{name} ({code})")
}

/// The element type Pollen serves for an ONNX data type code; `None` for the types it
/// has no tensor type for (strings, complex, bfloat16, 8-, 4- and 2-bit floats and ints).
pub fn dtype_of_onnx(code: u64) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        4 => DType::U16,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        12 => DType::U32,
        13 => DType::U64,
        _ => return None,
    })
}

/// A tensor read from a `TensorProto`.
#[derive(Clone, Debug, PartialEq)]
pub struct PbTensor {
    /// `TensorProto.name`; `None` when absent or empty.
    pub name: Option<String>,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Little-endian element bytes, `product(shape) * dtype.size()` of them (booleans as
    /// 0 or 1).
    pub data: Vec<u8>,
}

/// Read a serialised `TensorProto`: dims, data type, name, and the values from
/// `raw_data` or the typed field the ONNX spec puts them in (`float_data`; `int32_data`
/// for BOOL, INT8/16, UINT8/16, INT32 and FLOAT16 bit patterns; `int64_data`;
/// `double_data`; `uint64_data` for UINT32/64), packed or not.
///
/// Refused with a message naming the type: element types Pollen has no tensor type for
/// (STRING, COMPLEX*, BFLOAT16, FLOAT8*, INT4/UINT4, FLOAT4, INT2/UINT2), data stored
/// outside the file (`data_location = EXTERNAL`), segmented tensors, negative
/// dimensions, values out of the type's range, and a value count that is not the
/// product of the dimensions.
pub fn read_tensor(bytes: &[u8]) -> Result<PbTensor> {
    let malformed = || anyhow!("not a TensorProto: malformed protobuf");
    let mut dims = Vec::new();
    let mut data_type = 0u64;
    let mut name = None;
    let mut raw: Option<&[u8]> = None;
    let (mut floats, mut doubles) = (Vec::new(), Vec::new());
    let (mut int32s, mut int64s, mut uint64s) = (Vec::new(), Vec::new(), Vec::new());
    let mut strings = 0usize;
    let mut external = false;
    for (field, v) in fields(bytes).ok_or_else(malformed)? {
        match (field, v) {
            (1, v) => push_varints(v, &mut dims).ok_or_else(malformed)?,
            (2, Value::Varint(t)) => data_type = t,
            (3, _) => bail!("segmented tensors are not supported"),
            (4, v) => push_fixed32(v, &mut floats).ok_or_else(malformed)?,
            (5, v) => push_varints(v, &mut int32s).ok_or_else(malformed)?,
            (6, Value::Bytes(_)) => strings += 1,
            (7, v) => push_varints(v, &mut int64s).ok_or_else(malformed)?,
            (8, Value::Bytes(b)) => {
                let s = std::str::from_utf8(b).context("the tensor name is not UTF-8")?;
                name = (!s.is_empty()).then(|| s.to_string());
            }
            (9, Value::Bytes(b)) => raw = Some(b),
            (10, v) => push_fixed64(v, &mut doubles).ok_or_else(malformed)?,
            (11, v) => push_varints(v, &mut uint64s).ok_or_else(malformed)?,
            (13, Value::Bytes(_)) => external = true,
            (14, Value::Varint(loc)) => external |= loc == 1,
            (1..=11 | 13 | 14, _) => return Err(malformed()),
            // doc_string, metadata_props and fields of later ONNX versions.
            _ => {}
        }
    }
    let what = match &name {
        Some(n) => format!("tensor {n:?}"),
        None => "the tensor".to_string(),
    };
    if external {
        bail!(
            "{what}: its data is stored outside the .pb file (external data); \
             write the test data with the values inside"
        );
    }
    let dtype = dtype_of_onnx(data_type).ok_or_else(|| {
        anyhow!(
            "{what} is of type {}, which Pollen has no tensor type for \
             (golden checks take BOOL, INT8 to INT64, UINT8 to UINT64, FLOAT16, FLOAT, DOUBLE)",
            onnx_type_name(data_type)
        )
    })?;
    let shape = dims
        .iter()
        .map(|&d| {
            // int64 dims arrive as two's complement varints.
            let d = d as i64;
            u64::try_from(d).map_err(|_| anyhow!("{what} has a negative dimension {d}"))
        })
        .collect::<Result<Vec<u64>>>()?;
    let n = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| anyhow!("{what}: shape {shape:?} overflows"))?;
    let size = dtype.size().unwrap_or(1);
    let typed = floats.len() + doubles.len() + int32s.len() + int64s.len() + uint64s.len();
    if strings > 0 {
        bail!(
            "{what} holds strings but is declared {}",
            onnx_type_name(data_type)
        );
    }
    let count = |len: usize, field: &str| -> Result<()> {
        if len != n {
            bail!("{what} of shape {shape:?} has {len} values in {field}, expected {n}");
        }
        Ok(())
    };
    let data = if let Some(raw) = raw {
        if typed > 0 {
            bail!("{what} has both raw_data and typed values");
        }
        if raw.len() / size != n || raw.len() % size != 0 {
            bail!(
                "{what} of shape {shape:?} has {} bytes of raw_data, expected {}",
                raw.len(),
                n.saturating_mul(size)
            );
        }
        match dtype {
            DType::Bool => raw.iter().map(|&b| u8::from(b != 0)).collect(),
            _ => raw.to_vec(),
        }
    } else {
        let mut out = Vec::with_capacity(n.saturating_mul(size).min(bytes.len() * 8));
        // int32_data holds int32s as sign-extended varints; narrower types must fit.
        let ints = |range: std::ops::RangeInclusive<i64>, out: &mut Vec<u8>| -> Result<()> {
            count(int32s.len(), "int32_data")?;
            for (k, &v) in int32s.iter().enumerate() {
                let v = v as i64;
                if !range.contains(&v) {
                    bail!(
                        "{what}: value {v} at element {k} is out of range for {}",
                        onnx_type_name(data_type)
                    );
                }
                out.extend_from_slice(&v.to_le_bytes()[..size]);
            }
            Ok(())
        };
        match dtype {
            DType::F32 => {
                count(floats.len(), "float_data")?;
                out.extend(floats.iter().flat_map(|w| w.to_le_bytes()));
            }
            DType::F64 => {
                count(doubles.len(), "double_data")?;
                out.extend(doubles.iter().flat_map(|w| w.to_le_bytes()));
            }
            DType::I64 => {
                count(int64s.len(), "int64_data")?;
                out.extend(int64s.iter().flat_map(|w| w.to_le_bytes()));
            }
            DType::U64 => {
                count(uint64s.len(), "uint64_data")?;
                out.extend(uint64s.iter().flat_map(|w| w.to_le_bytes()));
            }
            DType::U32 => {
                count(uint64s.len(), "uint64_data")?;
                for (k, &v) in uint64s.iter().enumerate() {
                    let v = u32::try_from(v).map_err(|_| {
                        anyhow!("{what}: value {v} at element {k} is out of range for UINT32")
                    })?;
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            DType::Bool => ints(0..=1, &mut out)?,
            DType::I8 => ints(i8::MIN.into()..=i8::MAX.into(), &mut out)?,
            DType::U8 => ints(0..=u8::MAX.into(), &mut out)?,
            DType::I16 => ints(i16::MIN.into()..=i16::MAX.into(), &mut out)?,
            // FLOAT16 values are their bit patterns.
            DType::U16 | DType::F16 => ints(0..=u16::MAX.into(), &mut out)?,
            DType::I32 => ints(i32::MIN.into()..=i32::MAX.into(), &mut out)?,
            _ => bail!("{what}: unsupported type {}", onnx_type_name(data_type)),
        }
        out
    };
    Ok(PbTensor {
        name,
        dtype,
        shape,
        data,
    })
}

/// What kind of value a graph input or output is (`ValueInfoProto.type`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// A tensor of this ONNX element type code (0 when not given).
    Tensor(u64),
    /// A sequence.
    Sequence,
    /// A map.
    Map,
    /// An optional value.
    Optional,
    /// A sparse tensor.
    SparseTensor,
    /// No type, or one this reader does not know.
    Unknown,
}

impl std::fmt::Display for ValueKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueKind::Tensor(t) => write!(f, "a tensor of {}", onnx_type_name(*t)),
            ValueKind::Sequence => f.write_str("a sequence"),
            ValueKind::Map => f.write_str("a map"),
            ValueKind::Optional => f.write_str("an optional value"),
            ValueKind::SparseTensor => f.write_str("a sparse tensor"),
            ValueKind::Unknown => f.write_str("of an unknown kind"),
        }
    }
}

/// A graph input or output: name and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphValue {
    /// Name in the graph.
    pub name: String,
    /// Tensor (with element type), sequence, map, ….
    pub kind: ValueKind,
}

/// The inputs a caller feeds (graph inputs that are not initializers) and the outputs
/// of a model, in graph order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphIo {
    /// Inputs, initializers left out.
    pub inputs: Vec<GraphValue>,
    /// Outputs.
    pub outputs: Vec<GraphValue>,
    /// The class labels of each `ZipMap` that produces an output, by output name: the
    /// node serves such an output as the probability tensor the ZipMap wraps, one column
    /// per label in this order.
    pub zipmaps: Vec<(String, ZipLabels)>,
}

impl GraphIo {
    /// The labels of the ZipMap producing output `name`.
    pub fn zipmap(&self, name: &str) -> Option<&ZipLabels> {
        self.zipmaps.iter().find(|(n, _)| n == name).map(|(_, l)| l)
    }
}

/// A ZipMap's class labels (`classlabels_int64s` or `classlabels_strings`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZipLabels {
    /// Integer labels.
    Ints(Vec<i64>),
    /// String labels.
    Strings(Vec<String>),
}

impl ZipLabels {
    fn len(&self) -> usize {
        match self {
            ZipLabels::Ints(v) => v.len(),
            ZipLabels::Strings(v) => v.len(),
        }
    }
}

/// `(outputs, labels)` of a `NodeProto` if it is a `ZipMap` (any domain spelling).
fn zipmap_node(b: &[u8]) -> Option<(Vec<String>, ZipLabels)> {
    let (mut op, mut outputs) = (None, Vec::new());
    let (mut ints, mut strings) = (Vec::new(), Vec::new());
    for (f, v) in fields(b)? {
        match (f, v) {
            (2, Value::Bytes(o)) => outputs.push(String::from_utf8(o.to_vec()).ok()?),
            (4, Value::Bytes(o)) => op = Some(o),
            (5, Value::Bytes(a)) => {
                let attr = fields(a)?;
                let name = attr.iter().find_map(|(f, v)| match (f, v) {
                    (1, Value::Bytes(n)) => Some(*n),
                    _ => None,
                });
                for (f, v) in attr {
                    match (name, f) {
                        (Some(b"classlabels_int64s"), 8) => push_varints(v, &mut ints)?,
                        (Some(b"classlabels_strings"), 9) => match v {
                            Value::Bytes(s) => strings.push(String::from_utf8(s.to_vec()).ok()?),
                            _ => return None,
                        },
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if op != Some(b"ZipMap".as_slice()) {
        return None;
    }
    let labels = if strings.is_empty() {
        ZipLabels::Ints(ints.into_iter().map(|v| v as i64).collect())
    } else {
        ZipLabels::Strings(strings)
    };
    Some((outputs, labels))
}

/// Most maps in a golden sequence, and most keys in one map: far past any classifier's
/// batch and classes, and small enough that a hostile file costs little.
const MAX_MAPS: usize = 1 << 20;

/// Read a serialised `SequenceProto` of `MapProto`s (what onnxruntime and the ONNX
/// tools write for a `ZipMap` output: one map per input row, class label to
/// probability) as the probability tensor the node serves in its place: FLOAT, one row
/// per map, one column per label of `labels` in order. Returns the sequence's name (if
/// any) and the tensor. Refused: another kind of sequence, a map whose keys are not
/// exactly the labels, a value that is not one float.
pub fn read_map_sequence(bytes: &[u8], labels: &ZipLabels) -> Result<(Option<String>, PbTensor)> {
    let malformed = || anyhow!("not a SequenceProto of maps: malformed protobuf");
    let (mut name, mut maps) = (None, Vec::new());
    for (f, v) in fields(bytes).ok_or_else(malformed)? {
        match (f, v) {
            (1, Value::Bytes(n)) if !n.is_empty() => {
                name = Some(String::from_utf8(n.to_vec()).context("the name is not UTF-8")?)
            }
            (6, Value::Bytes(m)) => maps.push(m),
            (3 | 4 | 5 | 7, _) => bail!("a sequence of something other than maps"),
            _ => {}
        }
    }
    if maps.len() > MAX_MAPS {
        bail!("{} maps in one sequence, at most {MAX_MAPS}", maps.len());
    }
    let columns = labels.len();
    // Each value read takes more bytes in the file than its 4 here: the file bounds this.
    let want = maps.len().saturating_mul(columns).saturating_mul(4);
    let mut data = Vec::with_capacity(want.min(bytes.len()));
    for (row, m) in maps.iter().enumerate() {
        let (mut ints, mut strings, mut values) = (Vec::new(), Vec::new(), None);
        for (f, v) in fields(m).ok_or_else(malformed)? {
            match f {
                3 => push_varints(v, &mut ints).ok_or_else(malformed)?,
                4 => match v {
                    Value::Bytes(s) => strings.push(s),
                    _ => return Err(malformed()),
                },
                5 => match v {
                    Value::Bytes(s) => values = Some(s),
                    _ => return Err(malformed()),
                },
                _ => {}
            }
        }
        let mut tensors = Vec::new();
        for (f, v) in fields(values.unwrap_or_default()).ok_or_else(malformed)? {
            if let (3, Value::Bytes(t)) = (f, v) {
                tensors.push(t);
            }
        }
        let keys = ints.len().max(strings.len());
        if keys != tensors.len() || keys != columns || keys > MAX_MAPS {
            bail!(
                "map {row} has {keys} keys and {} values; the ZipMap has {columns} labels",
                tensors.len()
            );
        }
        for c in 0..columns {
            let at = match labels {
                ZipLabels::Ints(l) => ints.iter().position(|k| *k as i64 == l[c]),
                ZipLabels::Strings(l) => strings.iter().position(|k| *k == l[c].as_bytes()),
            }
            .ok_or_else(|| anyhow!("map {row} has no key for the ZipMap's label {c}"))?;
            let t = read_tensor(tensors[at]).with_context(|| format!("map {row}, value {at}"))?;
            let v = match (t.dtype, t.data.len()) {
                (DType::F32, 4) => f32::from_le_bytes(t.data[..4].try_into()?),
                (DType::F64, 8) => f64::from_le_bytes(t.data[..8].try_into()?) as f32,
                _ => bail!("map {row}, value {at} is not one float"),
            };
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    let tensor = PbTensor {
        name: name.clone(),
        dtype: DType::F32,
        shape: vec![maps.len() as u64, columns as u64],
        data,
    };
    Ok((name, tensor))
}

/// Longest `ValueInfoProto` or tensor name read from a model file.
const MAX_SMALL_FIELD: u64 = 1 << 20;

/// A protobuf walker over a file: reads keys and small fields, seeks past large ones.
struct FileWalker<R> {
    r: BufReader<R>,
    pos: u64,
}

impl<R: Read + Seek> FileWalker<R> {
    fn byte(&mut self) -> Result<u8> {
        let mut b = [0u8];
        self.r.read_exact(&mut b).context("truncated protobuf")?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("malformed varint")
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let n = i64::try_from(n).context("field too long")?;
        self.r.seek_relative(n)?;
        self.pos = self.pos.checked_add(n as u64).context("field too long")?;
        Ok(())
    }

    fn read(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > MAX_SMALL_FIELD {
            bail!("a field of {n} bytes where a small one was expected");
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).context("truncated protobuf")?;
        self.pos += n;
        Ok(b)
    }

    /// Visit the fields of the message that ends at `end`: `visit(walker, field, len)`
    /// is called for each length-delimited field and must consume exactly `len` bytes
    /// (or return `false` to have it skipped); other fields are skipped.
    fn message(
        &mut self,
        end: u64,
        visit: &mut dyn FnMut(&mut Self, u64, u64) -> Result<bool>,
    ) -> Result<()> {
        while self.pos < end {
            let key = self.varint()?;
            if key >> 3 == 0 {
                // No message has a field 0: a file of zeros is refused at once, not walked.
                bail!("field number 0: not a protobuf message");
            }
            match key & 7 {
                0 => {
                    self.varint()?;
                }
                1 => self.skip(8)?,
                5 => self.skip(4)?,
                2 => {
                    let len = self.varint()?;
                    let field_end = self.pos.checked_add(len).context("field too long")?;
                    if field_end > end {
                        bail!("a field runs past the end of its message");
                    }
                    if !visit(self, key >> 3, len)? {
                        self.skip(len)?;
                    }
                    if self.pos != field_end {
                        bail!("malformed field");
                    }
                }
                _ => bail!("malformed protobuf (wire type {})", key & 7),
            }
        }
        if self.pos != end {
            bail!("a field runs past the end of its message");
        }
        Ok(())
    }
}

/// A `ValueInfoProto`: name and kind.
fn value_info(b: &[u8]) -> Option<GraphValue> {
    let mut name = None;
    let mut kind = ValueKind::Unknown;
    for (field, v) in fields(b)? {
        match (field, v) {
            (1, Value::Bytes(n)) => name = Some(String::from_utf8(n.to_vec()).ok()?),
            (2, Value::Bytes(t)) => {
                for (f, v) in fields(t)? {
                    kind = match (f, v) {
                        (1, Value::Bytes(tt)) => ValueKind::Tensor(
                            fields(tt)?
                                .into_iter()
                                .find_map(|(f, v)| match (f, v) {
                                    (1, Value::Varint(e)) => Some(e),
                                    _ => None,
                                })
                                .unwrap_or(0),
                        ),
                        (4, _) => ValueKind::Sequence,
                        (5, _) => ValueKind::Map,
                        (8, _) => ValueKind::SparseTensor,
                        (9, _) => ValueKind::Optional,
                        _ => continue,
                    };
                }
            }
            _ => {}
        }
    }
    Some(GraphValue { name: name?, kind })
}

/// The graph inputs (initializers left out) and outputs of the ONNX model at `path`,
/// walking the file from disk (`ModelProto.graph`: `input`, `output`, and the names of
/// `initializer` and `sparse_initializer`).
pub fn graph_io(path: &Path) -> Result<GraphIo> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    graph_io_from(file, len).with_context(|| format!("{} is not an ONNX model", path.display()))
}

fn graph_io_from<R: Read + Seek>(r: R, len: u64) -> Result<GraphIo> {
    let mut w = FileWalker {
        r: BufReader::new(r),
        pos: 0,
    };
    w.r.seek(SeekFrom::Start(0))?;
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut inits = std::collections::BTreeSet::new();
    let mut zipmaps = Vec::new();
    let mut graphs = 0;
    // The name (field 8) of a TensorProto ending at `end`, skipping its data.
    fn tensor_name<R: Read + Seek>(w: &mut FileWalker<R>, end: u64) -> Result<Option<String>> {
        let mut name = None;
        w.message(end, &mut |w, f, len| {
            if f == 8 {
                name = Some(String::from_utf8(w.read(len)?).context("a name is not UTF-8")?);
                return Ok(true);
            }
            Ok(false)
        })?;
        Ok(name)
    }
    w.message(len, &mut |w, f, glen| {
        if f != 7 {
            return Ok(false);
        }
        graphs += 1;
        let gend = w.pos + glen;
        w.message(gend, &mut |w, f, len| {
            let end = w.pos + len;
            match f {
                11 | 12 => {
                    let v = value_info(&w.read(len)?).context("malformed graph input or output")?;
                    let list = if f == 11 { &mut inputs } else { &mut outputs };
                    list.push(v);
                }
                5 => inits.extend(tensor_name(w, end)?),
                // A node small enough to be a ZipMap (large ones are Constants and the
                // like): read whole, its integer labels may be unpacked varints.
                1 if len <= MAX_SMALL_FIELD => {
                    if let Some((outs, labels)) = zipmap_node(&w.read(len)?) {
                        zipmaps.extend(outs.into_iter().map(|o| (o, labels.clone())));
                    }
                }
                15 => {
                    // SparseTensorProto.values (1) carries the name.
                    let mut name = None;
                    w.message(end, &mut |w, f, len| {
                        if f == 1 {
                            let end = w.pos + len;
                            name = tensor_name(w, end)?;
                            return Ok(true);
                        }
                        Ok(false)
                    })?;
                    inits.extend(name);
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(true)
    })?;
    if graphs == 0 {
        bail!("no graph");
    }
    inputs.retain(|v| !inits.contains(&v.name));
    zipmaps.retain(|(o, _)| outputs.iter().any(|v| &v.name == o));
    Ok(GraphIo {
        inputs,
        outputs,
        zipmaps,
    })
}

/// A tiny protobuf writer for tests: fields, TensorProtos, models with named graph
/// inputs and outputs.
#[cfg(test)]
pub(crate) mod pbw {
    pub(crate) fn put_varint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    pub(crate) fn key(field: u64, wire: u64, out: &mut Vec<u8>) {
        put_varint(field << 3 | wire, out);
    }
    pub(crate) fn put_bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
        key(field, 2, out);
        put_varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
    pub(crate) fn put_uint(field: u64, n: u64, out: &mut Vec<u8>) {
        key(field, 0, out);
        put_varint(n, out);
    }
    pub(crate) fn head(dims: &[i64], dtype: u64, name: Option<&str>) -> Vec<u8> {
        let mut t = Vec::new();
        for &d in dims {
            put_uint(1, d as u64, &mut t);
        }
        put_uint(2, dtype, &mut t);
        if let Some(n) = name {
            put_bytes(8, n.as_bytes(), &mut t);
        }
        t
    }
    /// Varints of `vals` in `field`, packed or one field each.
    pub(crate) fn ints(field: u64, vals: &[i64], packed: bool, out: &mut Vec<u8>) {
        if packed {
            let mut p = Vec::new();
            for &v in vals {
                put_varint(v as u64, &mut p);
            }
            put_bytes(field, &p, out);
        } else {
            for &v in vals {
                put_uint(field, v as u64, out);
            }
        }
    }

    pub(crate) fn tensor_type(elem: u64) -> Vec<u8> {
        let mut tt = Vec::new();
        put_uint(1, elem, &mut tt);
        let mut t = Vec::new();
        put_bytes(1, &tt, &mut t);
        t
    }

    pub(crate) fn value(name: &str, typ: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_bytes(1, name.as_bytes(), &mut v);
        put_bytes(2, typ, &mut v);
        v
    }

    /// A model whose graph has an initializer `w`, inputs `(name, TypeProto)` (plus `w`),
    /// and outputs.
    pub(crate) fn model(inputs: &[(&str, Vec<u8>)], outputs: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut g = Vec::new();
        put_bytes(1, b"\x0a\x01x\x12\x01y\x22\x08Identity", &mut g);
        let mut init = head(&[4], 1, Some("w"));
        put_bytes(9, &[0; 16], &mut init);
        put_bytes(5, &init, &mut g);
        for (k, (n, t)) in inputs.iter().enumerate() {
            if k == 1 {
                put_bytes(11, &value("w", &tensor_type(1)), &mut g);
            }
            put_bytes(11, &value(n, t), &mut g);
        }
        for (n, t) in outputs {
            put_bytes(12, &value(n, t), &mut g);
        }
        let mut m = Vec::new();
        put_uint(1, 7, &mut m);
        put_bytes(7, &g, &mut m);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::pbw::*;
    use super::*;

    fn le<T: Copy, const N: usize>(vals: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        vals.iter().flat_map(|v| f(*v)).collect()
    }

    #[test]
    fn every_supported_type_from_raw_and_typed_fields_packed_or_not() {
        let shape = [2i64, 2];
        let f16 = [0x3c00i64, 0xc000, 0x7e00, 0x0001];
        // (type code, element type, raw little-endian bytes, the typed field and its
        // varint values)
        type Case = (u64, DType, Vec<u8>, u64, Vec<i64>);
        let cases: Vec<Case> = vec![
            (9, DType::Bool, vec![1, 0, 0, 1], 5, vec![1, 0, 0, 1]),
            (
                3,
                DType::I8,
                vec![0x80, 0xff, 0, 127],
                5,
                vec![-128, -1, 0, 127],
            ),
            (2, DType::U8, vec![0, 1, 200, 255], 5, vec![0, 1, 200, 255]),
            (
                5,
                DType::I16,
                le(&[-32768i16, -1, 0, 32767], i16::to_le_bytes),
                5,
                vec![-32768, -1, 0, 32767],
            ),
            (
                4,
                DType::U16,
                le(&[0u16, 1, 40_000, 65535], u16::to_le_bytes),
                5,
                vec![0, 1, 40_000, 65535],
            ),
            (
                6,
                DType::I32,
                le(&[i32::MIN, -1, 0, i32::MAX], i32::to_le_bytes),
                5,
                vec![i32::MIN.into(), -1, 0, i32::MAX.into()],
            ),
            (
                7,
                DType::I64,
                le(&[i64::MIN, -1, 0, i64::MAX], i64::to_le_bytes),
                7,
                vec![i64::MIN, -1, 0, i64::MAX],
            ),
            (
                12,
                DType::U32,
                le(&[0u32, 1, 7, u32::MAX], u32::to_le_bytes),
                11,
                vec![0, 1, 7, u32::MAX.into()],
            ),
            (
                13,
                DType::U64,
                le(&[0u64, 1, 7, u64::MAX], u64::to_le_bytes),
                11,
                vec![0, 1, 7, u64::MAX as i64],
            ),
            (
                10,
                DType::F16,
                le(&f16.map(|v| v as u16), u16::to_le_bytes),
                5,
                f16.to_vec(),
            ),
        ];
        for (code, dtype, raw, field, vals) in cases {
            let mut t = head(&shape, code, Some("x"));
            put_bytes(9, &raw, &mut t);
            let got = read_tensor(&t).unwrap_or_else(|e| panic!("{code} raw: {e:#}"));
            assert_eq!(
                got,
                PbTensor {
                    name: Some("x".into()),
                    dtype,
                    shape: vec![2, 2],
                    data: raw.clone()
                },
                "type {code} from raw_data"
            );
            for packed in [true, false] {
                let mut t = head(&shape, code, None);
                ints(field, &vals, packed, &mut t);
                let got = read_tensor(&t).unwrap_or_else(|e| panic!("{code}: {e:#}"));
                assert_eq!(got.name, None);
                assert_eq!(got.dtype, dtype);
                assert_eq!(got.data, raw, "type {code}, packed {packed}");
            }
        }
        // float_data and double_data: fixed-width words, packed or one field each.
        let fl = [1.5f32, -0.0, f32::NAN, 3e38];
        let db = [1.5f64, -2.25, f64::INFINITY, 1e-300];
        for packed in [true, false] {
            let mut t = head(&shape, 1, Some("f"));
            let mut u = head(&shape, 11, Some("d"));
            if packed {
                put_bytes(4, &le(&fl, f32::to_le_bytes), &mut t);
                put_bytes(10, &le(&db, f64::to_le_bytes), &mut u);
            } else {
                for v in fl {
                    key(4, 5, &mut t);
                    t.extend(v.to_le_bytes());
                }
                for v in db {
                    key(10, 1, &mut u);
                    u.extend(v.to_le_bytes());
                }
            }
            let got = read_tensor(&t).expect("float_data");
            assert_eq!(
                (got.dtype, got.data),
                (DType::F32, le(&fl, f32::to_le_bytes))
            );
            let got = read_tensor(&u).expect("double_data");
            assert_eq!(
                (got.dtype, got.data),
                (DType::F64, le(&db, f64::to_le_bytes))
            );
        }
        // Raw booleans other than 0 and 1 are normalised.
        let mut t = head(&[2], 9, None);
        put_bytes(9, &[0, 7], &mut t);
        assert_eq!(read_tensor(&t).expect("bool").data, [0, 1]);
    }

    #[test]
    fn scalars_and_empty_tensors() {
        let mut t = head(&[], 7, Some("sr"));
        ints(7, &[16_000], true, &mut t);
        let got = read_tensor(&t).expect("scalar");
        assert_eq!(got.shape, Vec::<u64>::new());
        assert_eq!(got.data, 16_000i64.to_le_bytes());
        let t = head(&[3, 0], 1, Some("e"));
        let got = read_tensor(&t).expect("empty");
        assert_eq!((got.shape, got.data), (vec![3, 0], vec![]));
    }

    #[test]
    fn refusals_name_the_tensor_and_the_type() {
        let expect_err = |t: &[u8], want: &[&str]| {
            let e = format!("{:#}", read_tensor(t).expect_err("refused"));
            for w in want {
                assert!(e.contains(w), "{e:?} lacks {w:?}");
            }
        };
        for (code, name) in [
            (16, "BFLOAT16"),
            (17, "FLOAT8E4M3FN"),
            (19, "FLOAT8E5M2"),
            (22, "INT4"),
            (21, "UINT4"),
            (8, "STRING"),
            (14, "COMPLEX64"),
            (26, "INT2"),
            (0, "UNDEFINED"),
        ] {
            let mut t = head(&[1], code, Some("odd"));
            put_bytes(9, &[0, 0], &mut t);
            expect_err(&t, &["\"odd\"", name]);
        }
        // External data.
        let mut t = head(&[1], 1, Some("big"));
        put_uint(14, 1, &mut t);
        expect_err(&t, &["\"big\"", "external"]);
        let mut t = head(&[1], 1, Some("big"));
        put_bytes(13, b"\x0a\x08location\x12\x03x.b", &mut t);
        expect_err(&t, &["external"]);
        // Counts, ranges, both kinds of data, negative dims, garbage.
        let mut t = head(&[2, 2], 1, Some("x"));
        put_bytes(9, &[0; 12], &mut t);
        expect_err(&t, &["\"x\"", "12 bytes", "expected 16"]);
        let mut t = head(&[3], 6, Some("x"));
        ints(5, &[1, 2], true, &mut t);
        expect_err(&t, &["2 values", "expected 3"]);
        let mut t = head(&[1], 3, Some("x"));
        ints(5, &[200], false, &mut t);
        expect_err(&t, &["value 200", "INT8"]);
        let mut t = head(&[1], 9, Some("x"));
        ints(5, &[2], false, &mut t);
        expect_err(&t, &["value 2", "BOOL"]);
        let mut t = head(&[1], 6, Some("x"));
        ints(5, &[1], false, &mut t);
        put_bytes(9, &[0; 4], &mut t);
        expect_err(&t, &["both raw_data and typed"]);
        let mut t = head(&[-1], 1, Some("x"));
        put_bytes(9, &[], &mut t);
        expect_err(&t, &["negative dimension -1"]);
        let mut t = head(&[1 << 40, 1 << 40], 1, Some("x"));
        put_bytes(9, &[], &mut t);
        expect_err(&t, &["overflows"]);
        expect_err(&[0x0a, 0x05, 1], &["malformed"]);
        expect_err(&[0xff; 12], &["malformed"]);
        let mut t = head(&[1], 1, Some("x"));
        put_bytes(3, b"\x08\x00\x10\x01", &mut t);
        expect_err(&t, &["segmented"]);
        // A SequenceProto read as a TensorProto is refused, not misread.
        let mut seq = Vec::new();
        put_bytes(1, b"seq", &mut seq);
        put_uint(2, 1, &mut seq);
        put_bytes(3, &head(&[1], 1, None), &mut seq);
        assert!(read_tensor(&seq).is_err());
    }

    #[test]
    fn graph_inputs_leave_out_initializers_and_say_their_kind() {
        let mut seq = Vec::new();
        put_bytes(4, &tensor_type(1), &mut seq);
        let m = model(
            &[("x", tensor_type(1)), ("n", tensor_type(7))],
            &[("y", tensor_type(1)), ("s", seq)],
        );
        let len = m.len() as u64;
        let io = graph_io_from(std::io::Cursor::new(m.clone()), len).expect("model");
        let names = |v: &[GraphValue]| v.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&io.inputs),
            ["x", "n"],
            "the initializer w is not an input"
        );
        assert_eq!(io.inputs[1].kind, ValueKind::Tensor(7));
        assert_eq!(names(&io.outputs), ["y", "s"]);
        assert_eq!(io.outputs[1].kind, ValueKind::Sequence);
        for cut in [1, 5, m.len() - 1] {
            assert!(
                graph_io_from(std::io::Cursor::new(m[..cut].to_vec()), cut as u64).is_err(),
                "cut at {cut}"
            );
        }
        assert!(
            graph_io_from(std::io::Cursor::new(vec![8, 7]), 2).is_err(),
            "no graph"
        );
    }
}
