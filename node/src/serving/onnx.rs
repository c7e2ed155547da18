//! ONNX models read and adjusted at the protobuf level, before tract sees them.
//!
//! tract's facade loads a model from bytes and takes facts about its inputs, but it cannot
//! turn an input into a constant or drop an operator. Both are easy on the protobuf, so
//! they happen here, on the bytes:
//!
//! * [`parse_graph`]: the graph's inputs (with their declared element types and
//!   dimensions), outputs and nodes (subgraphs included), for naming things in errors and
//!   for checking what a publisher declares.
//! * [`prepare`]: constant inputs (`--const sr=16000`) become initializers, which tract
//!   folds like any weight; an `If` whose condition they decide is replaced here by the
//!   branch it takes (tract types both branches of an `If` alike, so it refuses one whose
//!   branches differ even when the condition is constant); and a `ZipMap` at a graph
//!   output (scikit-learn's default export) becomes an `Identity`, so the output is the
//!   probability tensor the ZipMap wraps; `ai.onnx.ml` operators tract lacks but
//!   scikit-learn exports (`Scaler`, `TreeEnsembleRegressor`) become ones it has
//!   (the `ml` module); a `Softmax` fed by a `DequantizeLinear` reads a float copy of
//!   its input, which keeps tract off its integer softmax (wrong in 0.23.9).
//! * [`declare_const`], [`check_declared`]: what `pollen publish --const` and `--input`
//!   check against the file.
//!
//! Every walk is bounded by the bytes it is given and returns an error rather than
//! panicking on malformed input.

use pollen_protocol::manifest::{DType, TensorData};
use std::collections::{BTreeMap, BTreeSet};

mod ml;

/// ONNX `TensorProto.DataType` of a data type (`None` for BYTES: ONNX strings are not
/// served).
pub fn onnx_elem(d: DType) -> Option<i64> {
    Some(match d {
        DType::F32 => 1,
        DType::U8 => 2,
        DType::I8 => 3,
        DType::U16 => 4,
        DType::I16 => 5,
        DType::I32 => 6,
        DType::I64 => 7,
        DType::Bool => 9,
        DType::F16 => 10,
        DType::F64 => 11,
        DType::U32 => 12,
        DType::U64 => 13,
        _ => return None,
    })
}

/// The data type of an ONNX `TensorProto.DataType`, if Pollen serves it.
pub fn dtype_of_elem(e: i64) -> Option<DType> {
    pollen_protocol::manifest::DType::from_short_name(match e {
        1 => "f32",
        2 => "u8",
        3 => "i8",
        4 => "u16",
        5 => "i16",
        6 => "i32",
        7 => "i64",
        9 => "bool",
        10 => "f16",
        11 => "f64",
        12 => "u32",
        13 => "u64",
        _ => return None,
    })
}

/// The name ONNX gives an element type, for messages.
pub fn elem_name(e: i64) -> String {
    match e {
        8 => "string".into(),
        16 => "bfloat16".into(),
        14 | 15 => "complex".into(),
        _ => dtype_of_elem(e).map_or_else(|| format!("type {e}"), |d| d.short_name().into()),
    }
}

/// One dimension as a model file declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnnxDim {
    /// A fixed size (`dim_value`).
    Value(i64),
    /// A named size (`dim_param`).
    Param(String),
    /// Nothing declared.
    Unknown,
}

/// A graph input or output as the file declares it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValueInfo {
    /// Name.
    pub name: String,
    /// Element type of a tensor (`None`: not a tensor, e.g. ZipMap's sequence of maps, or
    /// no type given).
    pub elem: Option<i64>,
    /// Dimensions, if a shape is declared.
    pub dims: Option<Vec<OnnxDim>>,
}

impl ValueInfo {
    /// `NAME=DTYPE[DIMS]` as `pollen publish --input` takes it, with the file's dimensions
    /// (`?` where it names none).
    pub fn as_declaration(&self) -> String {
        let dt = self.elem.map_or_else(|| "?".to_string(), elem_name);
        let dims = self.dims.as_ref().map_or_else(
            || "...".to_string(),
            |d| {
                d.iter()
                    .map(|d| match d {
                        OnnxDim::Value(v) if *v >= 0 => v.to_string(),
                        OnnxDim::Param(p) if is_plain_symbol(p) => p.clone(),
                        _ => "?".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            },
        );
        format!("{}={dt}[{dims}]", self.name)
    }

    /// Every dimension declared and fixed.
    pub fn is_fixed(&self) -> bool {
        self.dims
            .as_ref()
            .is_some_and(|d| d.iter().all(|d| matches!(d, OnnxDim::Value(v) if *v >= 0)))
    }

    /// A scalar, or a tensor of one element (every dimension fixed at 1).
    pub fn is_scalar(&self) -> bool {
        self.dims
            .as_ref()
            .is_some_and(|d| d.iter().all(|d| *d == OnnxDim::Value(1)))
    }
}

/// `name` is a symbol as `--input` writes them (a letter, then letters, digits or `_`).
fn is_plain_symbol(name: &str) -> bool {
    let mut c = name.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// A node of the graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    /// Node name (may be empty in the file).
    pub name: String,
    /// Operator.
    pub op_type: String,
    /// Operator domain (`""` is the default `ai.onnx`).
    pub domain: String,
    /// Input tensor names.
    pub inputs: Vec<String>,
    /// Output tensor names.
    pub outputs: Vec<String>,
    /// Graphs held in attributes (`If` branches, `Loop` and `Scan` bodies).
    pub subgraphs: Vec<Graph>,
    /// Class labels of a `ZipMap` (`classlabels_int64s` or `classlabels_strings`).
    pub labels: Vec<String>,
    /// Attributes of one number (an int, a float, a tensor of one element), by name: a
    /// `Constant`'s value, a `Cast`'s target type.
    pub scalars: Vec<(String, f64)>,
}

impl Node {
    /// The name tract gives this node: its own, else its first output's.
    pub fn display_name(&self) -> &str {
        if !self.name.is_empty() {
            &self.name
        } else {
            self.outputs.first().map_or("", |s| s.as_str())
        }
    }

    /// `domain:op` (just `op` in the default domain).
    pub fn qualified_op(&self) -> String {
        if self.domain.is_empty() || self.domain == "ai.onnx" {
            self.op_type.clone()
        } else {
            format!("{}:{}", self.domain, self.op_type)
        }
    }
}

/// A graph: its inputs (those an initializer does not feed), outputs, nodes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    /// Inputs a caller feeds, in order.
    pub inputs: Vec<ValueInfo>,
    /// Outputs, in order.
    pub outputs: Vec<ValueInfo>,
    /// Nodes, in file order.
    pub nodes: Vec<Node>,
    /// Initializer names.
    pub initializers: Vec<String>,
}

impl Graph {
    /// The input named `name`.
    pub fn input(&self, name: &str) -> Option<&ValueInfo> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// Every node, subgraphs included (depth first).
    pub fn all_nodes(&self) -> Vec<&Node> {
        let mut out = Vec::new();
        let mut stack: Vec<&Graph> = vec![self];
        while let Some(g) = stack.pop() {
            for n in &g.nodes {
                out.push(n);
                stack.extend(n.subgraphs.iter());
            }
        }
        out
    }

    /// The first node (subgraphs included) whose operator is `op`.
    pub fn find_op(&self, op: &str) -> Option<&Node> {
        self.all_nodes().into_iter().find(|n| n.op_type == op)
    }

    /// The node (subgraphs included) that tract names `name`.
    pub fn find_node(&self, name: &str) -> Option<&Node> {
        self.all_nodes()
            .into_iter()
            .find(|n| n.display_name() == name)
    }

    /// Graph inputs the conditions of this graph's `If` nodes depend on (through the
    /// nodes of this graph), in input order.
    pub fn if_condition_inputs(&self) -> Vec<&ValueInfo> {
        let mut wanted: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.op_type == "If")
            .filter_map(|n| n.inputs.first().map(|s| s.as_str()))
            .collect();
        let mut seen: Vec<&str> = Vec::new();
        while let Some(t) = wanted.pop() {
            if seen.contains(&t) {
                continue;
            }
            seen.push(t);
            if let Some(p) = self.nodes.iter().find(|n| n.outputs.iter().any(|o| o == t)) {
                wanted.extend(p.inputs.iter().map(|s| s.as_str()));
            }
        }
        self.inputs
            .iter()
            .filter(|i| seen.contains(&i.name.as_str()))
            .collect()
    }
}

/// A protobuf wire value.
#[derive(Clone, Copy, Debug)]
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// One field of a message: number, value, and its whole encoding (key included).
struct Field<'a> {
    num: u64,
    value: Wire<'a>,
    raw: &'a [u8],
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

/// The fields of a message, or `None` if it does not parse.
fn fields(b: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let key = varint(b, &mut i)?;
        let value = match key & 7 {
            0 => Wire::Varint(varint(b, &mut i)?),
            1 => {
                i = i.checked_add(8)?;
                Wire::Fixed
            }
            5 => {
                i = i.checked_add(4)?;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let end = i.checked_add(len)?;
                let slice = b.get(i..end)?;
                i = end;
                Wire::Bytes(slice)
            }
            _ => return None,
        };
        out.push(Field {
            num: key >> 3,
            value,
            raw: b.get(start..i)?,
        });
    }
    Some(out)
}

fn bytes_of<'a>(f: &Field<'a>) -> Option<&'a [u8]> {
    match f.value {
        Wire::Bytes(b) => Some(b),
        _ => None,
    }
}

fn string_of(f: &Field<'_>) -> Option<String> {
    String::from_utf8(bytes_of(f)?.to_vec()).ok()
}

/// Integers of a repeated int64 field, packed or not.
fn ints_of(f: &Field<'_>) -> Option<Vec<i64>> {
    match f.value {
        Wire::Varint(v) => Some(vec![v as i64]),
        Wire::Bytes(b) => {
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                out.push(varint(b, &mut i)? as i64);
            }
            Some(out)
        }
        Wire::Fixed => None,
    }
}

fn put_varint(mut n: u64, out: &mut Vec<u8>) {
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

fn put_bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
    put_varint((field << 3) | 2, out);
    put_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn put_int(field: u64, n: u64, out: &mut Vec<u8>) {
    put_varint(field << 3, out);
    put_varint(n, out);
}

/// Deepest nesting of subgraphs read (an `If` in an `If`...): a hostile file cannot make
/// the walk recurse without bound.
const MAX_DEPTH: usize = 16;

fn parse_value_info(b: &[u8]) -> Option<ValueInfo> {
    let mut vi = ValueInfo::default();
    for f in fields(b)? {
        match f.num {
            1 => vi.name = string_of(&f)?,
            2 => {
                // TypeProto.tensor_type (1): elem_type (1), shape (2).
                for t in fields(bytes_of(&f)?)? {
                    if t.num != 1 {
                        continue;
                    }
                    for tt in fields(bytes_of(&t)?)? {
                        match (tt.num, tt.value) {
                            (1, Wire::Varint(e)) => vi.elem = Some(e as i64),
                            (2, Wire::Bytes(shape)) => {
                                let mut dims = Vec::new();
                                for d in fields(shape)?.iter().filter(|d| d.num == 1) {
                                    let mut dim = OnnxDim::Unknown;
                                    for v in fields(bytes_of(d)?)? {
                                        match (v.num, v.value) {
                                            (1, Wire::Varint(n)) => dim = OnnxDim::Value(n as i64),
                                            (2, Wire::Bytes(_)) => {
                                                let p = string_of(&v)?;
                                                if !p.is_empty() {
                                                    dim = OnnxDim::Param(p);
                                                }
                                            }
                                            _ => {}
                                        }
                                    }
                                    dims.push(dim);
                                }
                                vi.dims = Some(dims);
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(vi)
}

fn parse_node(b: &[u8], depth: usize) -> Option<Node> {
    let mut n = Node::default();
    for f in fields(b)? {
        match f.num {
            1 => n.inputs.push(string_of(&f)?),
            2 => n.outputs.push(string_of(&f)?),
            3 => n.name = string_of(&f)?,
            4 => n.op_type = string_of(&f)?,
            7 => n.domain = string_of(&f)?,
            5 => {
                // AttributeProto: name (1), ints (8), strings (9), g (6), graphs (11).
                let attr = fields(bytes_of(&f)?)?;
                let name = attr
                    .iter()
                    .find(|a| a.num == 1)
                    .and_then(string_of)
                    .unwrap_or_default();
                for a in &attr {
                    match a.num {
                        6 | 11 if depth < MAX_DEPTH => {
                            n.subgraphs.push(parse_graph_at(bytes_of(a)?, depth + 1)?)
                        }
                        8 if name == "classlabels_int64s" => {
                            n.labels
                                .extend(ints_of(a)?.into_iter().map(|v| v.to_string()));
                        }
                        9 if name == "classlabels_strings" => n.labels.push(string_of(a)?),
                        3 => {
                            if let Wire::Varint(v) = a.value {
                                n.scalars.push((name.clone(), v as i64 as f64));
                            }
                        }
                        2 => {
                            let b: [u8; 4] =
                                a.raw.get(a.raw.len().checked_sub(4)?..)?.try_into().ok()?;
                            n.scalars
                                .push((name.clone(), f64::from(f32::from_le_bytes(b))));
                        }
                        5 => {
                            if let Some(v) = scalar_of_tensor(bytes_of(a)?) {
                                n.scalars.push((name.clone(), v));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(n)
}

fn parse_graph_at(b: &[u8], depth: usize) -> Option<Graph> {
    let mut g = Graph::default();
    let mut inputs = Vec::new();
    for f in fields(b)? {
        match f.num {
            1 => g.nodes.push(parse_node(bytes_of(&f)?, depth)?),
            5 => {
                let name = fields(bytes_of(&f)?)?
                    .iter()
                    .find(|t| t.num == 8)
                    .and_then(string_of)
                    .unwrap_or_default();
                g.initializers.push(name);
            }
            11 => inputs.push(parse_value_info(bytes_of(&f)?)?),
            12 => g.outputs.push(parse_value_info(bytes_of(&f)?)?),
            _ => {}
        }
    }
    g.inputs = inputs
        .into_iter()
        .filter(|i| !g.initializers.contains(&i.name))
        .collect();
    Some(g)
}

/// The one graph field of a model, or `None`.
fn graph_field<'a>(model: &'a [Field<'a>]) -> Option<&'a [u8]> {
    let mut graphs = model.iter().filter(|f| f.num == 7);
    let g = graphs.next()?;
    if graphs.next().is_some() {
        return None;
    }
    bytes_of(g)
}

/// The main graph of an ONNX model (`ModelProto.graph`), or an error if the bytes are not
/// one.
pub fn parse_graph(model: &[u8]) -> Result<Graph, String> {
    let top = fields(model).ok_or("the file is not an ONNX model (protobuf does not parse)")?;
    let g = graph_field(&top).ok_or("the file is not an ONNX model (no graph)")?;
    parse_graph_at(g, 0).ok_or_else(|| "the ONNX graph does not parse".to_string())
}

/// The graph output names of an ONNX model (`ModelProto.graph.output[].name`), or `None`
/// if the bytes do not parse.
pub fn onnx_graph_outputs(model: &[u8]) -> Option<Vec<String>> {
    parse_graph(model)
        .ok()
        .map(|g| g.outputs.into_iter().map(|o| o.name).collect())
}

/// A ZipMap [`prepare`] took out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZipMapStripped {
    /// The graph output it produced (now the probability tensor).
    pub output: String,
    /// Its class labels, in the order of the tensor's last axis.
    pub labels: Vec<String>,
}

/// A model ready for tract: its bytes and what changed.
#[derive(Debug)]
pub struct Prepared {
    /// The model, with constants as initializers and ZipMaps at outputs replaced.
    pub bytes: Vec<u8>,
    /// The graph of the original file.
    pub graph: Graph,
    /// The ZipMaps taken out.
    pub zipmaps: Vec<ZipMapStripped>,
    /// The `If` nodes decided by constants and replaced by the branch they take.
    pub folded: Vec<String>,
    /// `DequantizeLinear` nodes of initializers replaced by their float result (tract 0.23
    /// dequantises 8-bit weights on every run otherwise: 5x slower than float for a
    /// language model's matrix-vector products).
    pub dequantized: usize,
    /// `ai.onnx.ml` nodes written with operators tract has, one line each.
    pub rewritten: Vec<String>,
}

/// Make `consts` initializers of the model (checked: each is a graph input of the same
/// element type), replace every top-level `If` whose condition the constants decide by the
/// branch it takes (tract types both branches of an `If` alike, which fails when they
/// differ, even with a constant condition), and replace every `ZipMap` that produces a
/// graph output by an `Identity`. Returns the bytes unchanged when there is nothing to do.
pub fn prepare(model: Vec<u8>, consts: &[TensorData]) -> Result<Prepared, String> {
    let graph = parse_graph(&model)?;
    for c in consts {
        let input = graph.input(&c.name).ok_or_else(|| {
            format!(
                "constant '{}' is not an input of the model (its inputs: {})",
                c.name,
                names(&graph.inputs)
            )
        })?;
        if let Some(e) = input.elem
            && Some(e) != onnx_elem(c.dtype)
        {
            return Err(format!(
                "constant '{}' is {}, the model's input is {}",
                c.name,
                c.dtype.short_name(),
                elem_name(e)
            ));
        }
    }
    check_classifiers(&model, &graph)?;
    let zipmaps: Vec<ZipMapStripped> = graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "ZipMap" && n.inputs.len() == 1 && n.outputs.len() == 1)
        .filter(|n| graph.outputs.iter().any(|o| o.name == n.outputs[0]))
        .map(|n| ZipMapStripped {
            output: n.outputs[0].clone(),
            labels: n.labels.clone(),
        })
        .collect();
    let dequantize = graph
        .nodes
        .iter()
        .any(|n| n.op_type == "DequantizeLinear" && n.inputs.len() >= 2);
    let ml = graph.nodes.iter().any(ml::is_rewritable);
    let int64_outputs: BTreeSet<&str> = graph
        .outputs
        .iter()
        .filter(|o| o.elem == Some(INT64))
        .map(|o| o.name.as_str())
        .take(MAX_INT64_OUTPUTS)
        .collect();
    if consts.is_empty() && zipmaps.is_empty() && !dequantize && !ml && int64_outputs.is_empty() {
        return Ok(Prepared {
            bytes: model,
            graph,
            zipmaps,
            folded: Vec::new(),
            dequantized: 0,
            rewritten: Vec::new(),
        });
    }
    let r =
        rewrite(&model, consts, &zipmaps, &int64_outputs).ok_or("the ONNX model does not parse")?;
    Ok(Prepared {
        bytes: r.bytes,
        graph,
        zipmaps,
        folded: r.folded,
        dequantized: r.dequantized,
        rewritten: r.rewritten,
    })
}

/// Refuse a top-level `LinearClassifier` whose coefficients do not fit the features of
/// the graph input it reads (see [`ml::check_linear_classifier`]).
fn check_classifiers(model: &[u8], graph: &Graph) -> Result<(), String> {
    if !graph.nodes.iter().any(|n| n.op_type == "LinearClassifier") {
        return Ok(());
    }
    let Some(top) = fields(model) else {
        return Ok(());
    };
    let Some(graph_fields) = graph_field(&top).and_then(fields) else {
        return Ok(());
    };
    for f in graph_fields.iter().filter(|f| f.num == 1) {
        let Some(raw) = bytes_of(f) else { continue };
        let Some(node) = parse_node(raw, MAX_DEPTH) else {
            continue;
        };
        let features = node
            .inputs
            .first()
            .and_then(|x| graph.input(x))
            .and_then(|i| match i.dims.as_deref()?.last()? {
                OnnxDim::Value(v) => u64::try_from(*v).ok(),
                _ => None,
            });
        if let Some(features) = features {
            ml::check_linear_classifier(raw, &node, features)?;
        }
    }
    Ok(())
}

/// An initializer's dims, element type and raw little-endian data (`None` for data held
/// in typed fields or outside the file).
fn raw_tensor(t: &[u8]) -> Option<(Vec<u64>, i64, &[u8])> {
    let (mut dims, mut elem, mut raw) = (Vec::new(), 0, None);
    for f in fields(t)? {
        match (f.num, f.value) {
            (1, _) => {
                for d in ints_of(&f)? {
                    dims.push(u64::try_from(d).ok()?);
                }
            }
            (2, Wire::Varint(v)) => elem = v as i64,
            (9, _) => raw = Some(bytes_of(&f)?),
            (14, Wire::Varint(1)) => return None, // data_location EXTERNAL
            _ => {}
        }
    }
    Some((dims, elem, raw?))
}

/// The float tensor `name` a `DequantizeLinear` of initializers computes: `(x - zero) *
/// scale`, per tensor or along `axis`; `None` when it is not that simple case (8-bit `x`,
/// float scale, raw data).
fn dequantized(node: &Node, inits: &BTreeMap<String, &[u8]>, name: &str) -> Option<TensorData> {
    let (dims, x_elem, x) = raw_tensor(inits.get(node.inputs.first()?)?)?;
    let (s_dims, s_elem, scale) = raw_tensor(inits.get(node.inputs.get(1)?)?)?;
    // Element types: 3 = int8, 2 = uint8, 1 = float.
    if !(x_elem == 2 || x_elem == 3) || s_elem != 1 {
        return None;
    }
    let elements = usize::try_from(dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d))?).ok()?;
    if x.len() != elements {
        return None;
    }
    let scale: Vec<f32> = scale
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let zero: Vec<i32> = match node.inputs.get(2).filter(|z| !z.is_empty()) {
        None => vec![0; scale.len()],
        Some(z) => {
            let (_, z_elem, z) = raw_tensor(inits.get(z)?)?;
            if z_elem != x_elem || z.len() != scale.len() {
                return None;
            }
            z.iter()
                .map(|b| {
                    if x_elem == 3 {
                        i32::from(*b as i8)
                    } else {
                        i32::from(*b)
                    }
                })
                .collect()
        }
    };
    let value = |b: u8| {
        if x_elem == 3 {
            i32::from(b as i8)
        } else {
            i32::from(b)
        }
    };
    // Per tensor (one scale), or one scale per index along `axis`. Products of dims are
    // checked: with a zero dimension `x` is empty whatever the others claim.
    let product = |d: &[u64]| d.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
    let (period, inner) = if scale.len() == 1 && product(&s_dims) == Some(1) {
        (1, 1)
    } else {
        let rank = dims.len() as i64;
        let axis = node
            .scalars
            .iter()
            .find(|(k, _)| k == "axis")
            .map_or(1, |(_, v)| *v as i64);
        let axis = usize::try_from(if axis < 0 { axis + rank } else { axis }).ok()?;
        if axis >= dims.len() || dims[axis] as usize != scale.len() {
            return None;
        }
        let inner = usize::try_from(product(&dims[axis + 1..])?).ok()?;
        (scale.len(), inner)
    };
    // Element i takes scale (i / inner) % period: walked as runs of `inner` elements, one
    // scale each, `period` runs to a block (no division per element: a language model
    // has some 10^8 of them).
    let mut data = vec![0u8; elements * 4];
    let mut out = data.chunks_exact_mut(4);
    for block in x.chunks((period * inner).max(1)) {
        for (c, run) in block.chunks(inner.max(1)).enumerate() {
            let (z, s) = (zero[c], scale[c]);
            for (b, o) in run.iter().zip(&mut out) {
                o.copy_from_slice(&(((value(*b) - z) as f32) * s).to_le_bytes());
            }
        }
    }
    Some(TensorData {
        name: name.to_string(),
        dtype: DType::F32,
        shape: dims,
        data,
    })
}

fn names(v: &[ValueInfo]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.iter()
        .map(|i| format!("'{}'", i.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`rewrite`] made: the model's bytes and what changed (see [`Prepared`]).
struct Rewritten {
    bytes: Vec<u8>,
    folded: Vec<String>,
    dequantized: usize,
    rewritten: Vec<String>,
}

fn rewrite(
    model: &[u8],
    consts: &[TensorData],
    zipmaps: &[ZipMapStripped],
    int64_outputs: &BTreeSet<&str>,
) -> Option<Rewritten> {
    let top = fields(model)?;
    let mut nodes: Vec<Vec<u8>> = Vec::new();
    let mut rest = Vec::with_capacity(model.len() + 64);
    let mut known: Vec<(String, f64)> = Vec::new();
    let graph_bytes = graph_field(&top)?;
    let graph_fields = fields(graph_bytes)?;
    let mut inits: BTreeMap<String, &[u8]> = BTreeMap::new();
    for f in &graph_fields {
        match f.num {
            1 => nodes.push(bytes_of(f)?.to_vec()),
            5 => {
                let t = bytes_of(f)?;
                if let (Some(v), Some(name)) = (scalar_of_tensor(t), tensor_name(t)) {
                    known.push((name, v));
                }
                if let Some(name) = tensor_name(t) {
                    inits.insert(name, t);
                }
            }
            _ => {}
        }
    }
    let mut dequantized = 0;
    let mut rewritten = Vec::new();
    let mut kept = Vec::with_capacity(nodes.len());
    let mut floats = Vec::new();
    let mut consumed: Vec<String> = Vec::new();
    for n in nodes {
        let node = parse_node(&n, MAX_DEPTH)?;
        let folded = (node.op_type == "DequantizeLinear"
            && (node.domain.is_empty() || node.domain == "ai.onnx"))
            .then(|| dequantized_of(&node, &inits))
            .flatten();
        if let Some(t) = folded {
            put_bytes(5, &tensor_proto(&t)?, &mut floats);
            consumed.extend(node.inputs);
            dequantized += 1;
        } else if let Some(e) = ml::expand(&n, &node) {
            kept.extend(e.nodes);
            for t in &e.initializers {
                put_bytes(5, t, &mut floats);
            }
            rewritten.push(e.note);
        } else {
            kept.push(n);
        }
    }
    rewritten.extend(float_softmax_inputs(&mut kept, &inits)?);
    // The 8-bit tensors nothing else reads are left out: the float ones replace them.
    let mut used = BTreeSet::new();
    for n in &kept {
        inputs_of(&parse_node(n, MAX_DEPTH)?, &mut used);
    }
    for f in graph_fields.iter().filter(|f| f.num == 12) {
        used.insert(parse_value_info(bytes_of(f)?)?.name);
    }
    let dropped: BTreeSet<&String> = consumed.iter().filter(|c| !used.contains(*c)).collect();
    for f in &graph_fields {
        match f.num {
            1 => {}
            5 if tensor_name(bytes_of(f)?).is_some_and(|n| dropped.contains(&n)) => {}
            // A ZipMap's output is declared a sequence of maps: it is now a float tensor
            // (tract would take the sequence type for a tensor of another type).
            12 => {
                let name = parse_value_info(bytes_of(f)?)?.name;
                if zipmaps.iter().any(|z| z.output == name) {
                    put_bytes(12, &float_tensor_value(&name), &mut rest);
                } else {
                    rest.extend_from_slice(f.raw);
                }
            }
            _ => rest.extend_from_slice(f.raw),
        }
    }
    rest.extend_from_slice(&floats);
    drop(floats);
    let mut nodes = kept;
    for n in &mut nodes {
        let node = parse_node(n, MAX_DEPTH)?;
        if node.op_type == "ZipMap" && zipmaps.iter().any(|z| node.outputs == [z.output.clone()]) {
            *n = identity(node.inputs.first()?, node.outputs.first()?, &node.name);
        }
    }
    for c in consts {
        put_bytes(5, &tensor_proto(c)?, &mut rest);
        if let Some(v) = scalar_of_data(c) {
            known.push((c.name.clone(), v));
        }
    }
    let folded = fold_ifs(&mut nodes, &mut rest, &known)?;
    cast_int64_outputs(&mut nodes, &mut rest, int64_outputs)?;
    let mut graph =
        Vec::with_capacity(rest.len() + nodes.iter().map(|n| n.len() + 8).sum::<usize>());
    for n in &nodes {
        put_bytes(1, n, &mut graph);
    }
    graph.extend_from_slice(&rest);
    let mut out = Vec::with_capacity(graph.len() + 64);
    for f in &top {
        if f.num == 7 {
            put_bytes(7, &graph, &mut out);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Some(Rewritten {
        bytes: out,
        folded,
        dequantized,
        rewritten,
    })
}

/// Every tensor name `node` reads, in its subgraphs too (which may read names of the
/// graphs around them).
fn inputs_of(node: &Node, into: &mut BTreeSet<String>) {
    into.extend(node.inputs.iter().cloned());
    for g in &node.subgraphs {
        for n in &g.nodes {
            inputs_of(n, into);
        }
        into.extend(g.outputs.iter().map(|o| o.name.clone()));
    }
}

/// Most `Softmax` nodes [`float_softmax_inputs`] rewrites in one model (a transformer has
/// one per layer; the rest are left to tract).
const MAX_FLOAT_SOFTMAX: usize = 256;

/// tract 0.23.9 runs a `Softmax` whose input comes from a `DequantizeLinear` (of an
/// activation, not a weight) as its integer softmax when a `QuantizeLinear` follows, and
/// that answers 1.0 for every element (a classifier's two probabilities both 1.0, an
/// attention's weights all 1.0). Each such `Softmax` reads instead its own float copy of
/// the input, `Mul(Sub(Cast(x), Cast(zero_point)), scale)`: what `DequantizeLinear`
/// computes, bit for bit, written with operators tract keeps in float. Only per-tensor
/// quantisation (a scalar scale and zero point from initializers) is covered; any other
/// form is left to tract and its golden checks. Returns one note per rewritten node.
fn float_softmax_inputs(
    nodes: &mut Vec<Vec<u8>>,
    inits: &BTreeMap<String, &[u8]>,
) -> Option<Vec<String>> {
    let parsed: Vec<Node> = nodes
        .iter()
        .map(|n| parse_node(n, MAX_DEPTH))
        .collect::<Option<_>>()?;
    let default_domain = |n: &Node| n.domain.is_empty() || n.domain == "ai.onnx";
    let scalar_init = |name: &str| inits.get(name).and_then(|t| scalar_of_tensor(t));
    let mut producers: BTreeMap<&str, &Node> = BTreeMap::new();
    for n in &parsed {
        if n.op_type == "DequantizeLinear"
            && default_domain(n)
            && let [out] = n.outputs.as_slice()
        {
            producers.insert(out, n);
        }
    }
    let mut notes = Vec::new();
    let mut extra: Vec<(usize, Vec<Vec<u8>>)> = Vec::new();
    for (i, sm) in parsed.iter().enumerate() {
        if notes.len() >= MAX_FLOAT_SOFTMAX {
            break;
        }
        if sm.op_type != "Softmax" || !default_domain(sm) {
            continue;
        }
        let Some(dq) = sm.inputs.first().and_then(|x| producers.get(x.as_str())) else {
            continue;
        };
        let (x, scale) = match dq.inputs.as_slice() {
            [x, s] | [x, s, _] => (x, s),
            _ => continue,
        };
        let zero = dq.inputs.get(2).filter(|z| !z.is_empty());
        if scalar_init(scale).is_none() || zero.is_some_and(|z| scalar_init(z).is_none()) {
            continue;
        }
        let p = format!("{}.pollen.float{i}", sm.display_name());
        let to_float = |input: &str, what: &str| {
            node_proto(
                "Cast",
                "",
                &[input],
                &[&format!("{p}.{what}")],
                &format!("{p}.cast_{what}"),
                &[ml::attr_int("to", 1)],
            )
        };
        let mut pre = vec![to_float(x, "x")];
        let mut current = format!("{p}.x");
        if let Some(z) = zero {
            pre.push(to_float(z, "zero"));
            pre.push(node_proto(
                "Sub",
                "",
                &[&current, &format!("{p}.zero")],
                &[&format!("{p}.centred")],
                &format!("{p}.sub"),
                &[],
            ));
            current = format!("{p}.centred");
        }
        pre.push(node_proto(
            "Mul",
            "",
            &[&current, scale],
            &[&format!("{p}.value")],
            &format!("{p}.mul"),
            &[],
        ));
        // The Softmax's first input becomes the float copy.
        nodes[i] = with_first_name(&nodes[i], NODE_INPUT, &format!("{p}.value"))?;
        notes.push(format!(
            "Softmax '{}' reads DequantizeLinear '{}' as float (Cast, Sub, Mul): tract 0.23 \
             answers 1.0 for every element of its integer softmax",
            sm.display_name(),
            dq.display_name()
        ));
        extra.push((i, pre));
    }
    // Each float copy goes just before its Softmax (the file's order stays topological).
    if !extra.is_empty() {
        let mut pre: BTreeMap<usize, Vec<Vec<u8>>> = extra.into_iter().collect();
        let old = std::mem::take(nodes);
        for (i, n) in old.into_iter().enumerate() {
            if let Some(p) = pre.remove(&i) {
                nodes.extend(p);
            }
            nodes.push(n);
        }
    }
    Some(notes)
}

/// [`dequantized`] for the node's one output.
fn dequantized_of(node: &Node, inits: &BTreeMap<String, &[u8]>) -> Option<TensorData> {
    match node.outputs.as_slice() {
        [out] => dequantized(node, inits, out),
        _ => None,
    }
}

/// ONNX's INT64 element type.
const INT64: i64 = 7;

/// Most INT64 graph outputs [`cast_int64_outputs`] casts back (two nodes and a constant
/// each): a hostile file with thousands of them adds no more than this; the rest are left
/// to tract.
const MAX_INT64_OUTPUTS: usize = 64;

/// tract 0.23 computes INT64 values as dimensions (`TDim`) where it can (every
/// `Cast(to=INT64)`, `Shape`, ...), and its API returns no `TDim` tensor: a model with such a
/// graph output cannot load. For each INT64 graph output `out` (of `outputs`) a node
/// produces, that node writes a renamed tensor instead (its readers follow), and a
/// `CastLike` of an INT64 constant (which tract types from the constant, so as INT64)
/// writes `out`. An output a subgraph reads from the graph around it is left alone. One
/// pass over the nodes, whatever the number of outputs.
fn cast_int64_outputs(
    nodes: &mut Vec<Vec<u8>>,
    rest: &mut Vec<u8>,
    outputs: &BTreeSet<&str>,
) -> Option<()> {
    if outputs.is_empty() {
        return Some(());
    }
    let parsed: Vec<Node> = nodes
        .iter()
        .map(|n| parse_node(n, MAX_DEPTH))
        .collect::<Option<_>>()?;
    let mut nested = BTreeSet::new();
    for n in parsed.iter().filter(|n| !n.subgraphs.is_empty()) {
        let mut inner = BTreeSet::new();
        inputs_of(n, &mut inner);
        nested.extend(inner.into_iter().filter(|i| !n.inputs.contains(i)));
    }
    // Produced by a node (not a graph input or an initializer), read by no subgraph.
    let cast: BTreeSet<&str> = parsed
        .iter()
        .flat_map(|n| &n.outputs)
        .map(String::as_str)
        .filter(|o| outputs.contains(o) && !nested.contains(*o))
        .collect();
    let renamed = |out: &str| format!("{out}.pollen.tdim");
    for (n, node) in nodes.iter_mut().zip(&parsed) {
        if !node
            .inputs
            .iter()
            .chain(&node.outputs)
            .any(|i| cast.contains(i.as_str()))
        {
            continue;
        }
        let mut b = Vec::with_capacity(n.len() + 16);
        for f in fields(n)? {
            match (f.num, std::str::from_utf8(bytes_of(&f).unwrap_or_default())) {
                (1 | 2, Ok(name)) if cast.contains(name) => {
                    put_bytes(f.num, renamed(name).as_bytes(), &mut b)
                }
                _ => b.extend_from_slice(f.raw),
            }
        }
        *n = b;
    }
    for out in cast {
        let zero = format!("{out}.pollen.int64");
        let t = TensorData {
            name: zero.clone(),
            dtype: DType::I64,
            shape: Vec::new(),
            data: 0i64.to_le_bytes().to_vec(),
        };
        put_bytes(5, &tensor_proto(&t)?, rest);
        nodes.push(node_proto(
            "CastLike",
            "",
            &[&renamed(out), &zero],
            &[out],
            &format!("{out}.pollen.cast"),
            &[],
        ));
    }
    Some(())
}

/// A `ValueInfoProto` of a FLOAT tensor of unknown shape.
fn float_tensor_value(name: &str) -> Vec<u8> {
    let mut tensor = Vec::new();
    put_int(1, 1, &mut tensor);
    let mut typ = Vec::new();
    put_bytes(1, &tensor, &mut typ);
    let mut v = Vec::new();
    put_bytes(1, name.as_bytes(), &mut v);
    put_bytes(2, &typ, &mut v);
    v
}

/// A `NodeProto`: operator, domain (`""` for the default), inputs, outputs, name and
/// encoded `AttributeProto`s.
fn node_proto(
    op: &str,
    domain: &str,
    inputs: &[&str],
    outputs: &[&str],
    name: &str,
    attrs: &[Vec<u8>],
) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        put_bytes(1, i.as_bytes(), &mut n);
    }
    for o in outputs {
        put_bytes(2, o.as_bytes(), &mut n);
    }
    put_bytes(3, name.as_bytes(), &mut n);
    put_bytes(4, op.as_bytes(), &mut n);
    if !domain.is_empty() {
        put_bytes(7, domain.as_bytes(), &mut n);
    }
    for a in attrs {
        put_bytes(5, a, &mut n);
    }
    n
}

/// `NodeProto` fields of input and output names.
pub(super) const NODE_INPUT: u64 = 1;
pub(super) const NODE_OUTPUT: u64 = 2;

/// The `NodeProto` `raw` with its first name in field `field` (its first input or first
/// output) replaced by `name`; every other field as it was.
pub(super) fn with_first_name(raw: &[u8], field: u64, name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len() + name.len());
    let mut first = true;
    for f in fields(raw)? {
        if f.num == field && first {
            put_bytes(field, name.as_bytes(), &mut out);
            first = false;
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Some(out)
}

/// An `Identity` node `output = input`.
fn identity(input: &str, output: &str, name: &str) -> Vec<u8> {
    node_proto("Identity", "", &[input], &[output], name, &[])
}

/// Most `If` nodes folded in one model (each fold may bring nested ones to the top).
const MAX_FOLDS: usize = 1024;

/// Most operator evaluations spent deciding conditions in one model: a hostile graph
/// (conditions built from long chains that reuse their inputs) costs no more than this.
const MAX_EVAL_STEPS: usize = 100_000;

/// Replace every top-level `If` whose condition is a constant (computed from `known`
/// values, `Constant` nodes and a few scalar operators) by the nodes of the branch it
/// takes, its initializers going to `rest`. Returns the names of the Ifs folded.
fn fold_ifs(
    nodes: &mut Vec<Vec<u8>>,
    rest: &mut Vec<u8>,
    known: &[(String, f64)],
) -> Option<Vec<String>> {
    let mut parsed: Vec<Node> = nodes
        .iter()
        .map(|n| parse_node(n, MAX_DEPTH))
        .collect::<Option<_>>()?;
    let mut folded = Vec::new();
    let mut steps = 0;
    for _ in 0..MAX_FOLDS {
        let producers: BTreeMap<&str, usize> = parsed
            .iter()
            .enumerate()
            .flat_map(|(k, n)| n.outputs.iter().map(move |o| (o.as_str(), k)))
            .collect();
        let mut next = None;
        for (k, n) in parsed.iter().enumerate() {
            if n.op_type != "If" || !(n.domain.is_empty() || n.domain == "ai.onnx") {
                continue;
            }
            let mut eval = Eval {
                nodes: &parsed,
                producers: &producers,
                known,
                steps: &mut steps,
            };
            if let Some(c) = n.inputs.first().and_then(|c| eval.value(c, 0)) {
                next = Some((k, c != 0.0));
                break;
            }
        }
        let Some((k, cond)) = next else {
            return Some(folded);
        };
        let node = parsed[k].clone();
        let branch = if_branch(&nodes[k], if cond { "then_branch" } else { "else_branch" })?;
        let mut replacement = Vec::new();
        let mut outputs = Vec::new();
        for f in fields(branch)? {
            match f.num {
                1 => replacement.push(bytes_of(&f)?.to_vec()),
                5 | 15 => rest.extend_from_slice(f.raw),
                12 => outputs.push(parse_value_info(bytes_of(&f)?)?.name),
                _ => {}
            }
        }
        if outputs.len() != node.outputs.len() {
            return None;
        }
        for (i, (from, to)) in outputs.iter().zip(&node.outputs).enumerate() {
            if !to.is_empty() {
                replacement.push(identity(
                    from,
                    to,
                    &format!("{}.{}.{i}", node.display_name(), cond),
                ));
            }
        }
        let replaced: Vec<Node> = replacement
            .iter()
            .map(|n| parse_node(n, MAX_DEPTH))
            .collect::<Option<_>>()?;
        folded.push(node.display_name().to_string());
        nodes.splice(k..=k, replacement);
        parsed.splice(k..=k, replaced);
    }
    Some(folded)
}

/// The graph of attribute `which` of a node.
fn if_branch<'a>(node: &'a [u8], which: &str) -> Option<&'a [u8]> {
    for f in fields(node)?.into_iter().filter(|f| f.num == 5) {
        let attr = fields(bytes_of(&f)?)?;
        if attr
            .iter()
            .any(|a| a.num == 1 && string_of(a).as_deref() == Some(which))
        {
            return attr.iter().find(|a| a.num == 6).and_then(bytes_of);
        }
    }
    None
}

/// Deepest chain of operators [`Eval::value`] follows.
const MAX_EVAL_DEPTH: usize = 64;

/// Deciding conditions: the graph's nodes, who produces each tensor, the values known.
struct Eval<'a> {
    nodes: &'a [Node],
    producers: &'a BTreeMap<&'a str, usize>,
    known: &'a [(String, f64)],
    /// Evaluations spent so far, against [`MAX_EVAL_STEPS`].
    steps: &'a mut usize,
}

impl Eval<'_> {
    /// The value of tensor `name` if it is one number that constants decide: a known
    /// value, a `Constant`, or a few scalar operators of such values.
    fn value(&mut self, name: &str, depth: usize) -> Option<f64> {
        if let Some((_, v)) = self.known.iter().find(|(n, _)| n == name) {
            return Some(*v);
        }
        *self.steps += 1;
        if depth > MAX_EVAL_DEPTH || *self.steps > MAX_EVAL_STEPS {
            return None;
        }
        let nodes = self.nodes;
        let n = &nodes[*self.producers.get(name)?];
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            return None;
        }
        let attr = |a: &str| n.scalars.iter().find(|(k, _)| k == a).map(|(_, v)| *v);
        let bool_of = |b: bool| if b { 1.0 } else { 0.0 };
        let mut arg = |i: usize| -> Option<f64> { self.value(n.inputs.get(i)?, depth + 1) };
        Some(match n.op_type.as_str() {
            "Constant" => attr("value")
                .or_else(|| attr("value_int"))
                .or_else(|| attr("value_float"))?,
            "Identity" | "Squeeze" | "Unsqueeze" | "Reshape" | "Flatten" => arg(0)?,
            "Cast" => {
                let v = arg(0)?;
                match attr("to")? as i64 {
                    9 => bool_of(v != 0.0),
                    1 | 10 | 11 => v,
                    2..=7 | 12 | 13 => v.trunc(),
                    _ => return None,
                }
            }
            "Not" => bool_of(arg(0)? == 0.0),
            op @ ("Equal" | "Greater" | "Less" | "GreaterOrEqual" | "LessOrEqual" | "And"
            | "Or" | "Xor" | "Add" | "Sub" | "Mul") => {
                let (a, b) = (arg(0)?, arg(1)?);
                match op {
                    "Equal" => bool_of(a == b),
                    "Greater" => bool_of(a > b),
                    "Less" => bool_of(a < b),
                    "GreaterOrEqual" => bool_of(a >= b),
                    "LessOrEqual" => bool_of(a <= b),
                    "And" => bool_of(a != 0.0 && b != 0.0),
                    "Or" => bool_of(a != 0.0 || b != 0.0),
                    "Xor" => bool_of((a != 0.0) != (b != 0.0)),
                    "Add" => a + b,
                    "Sub" => a - b,
                    _ => a * b,
                }
            }
            _ => return None,
        })
    }
}

/// The name of a `TensorProto`.
fn tensor_name(t: &[u8]) -> Option<String> {
    fields(t)?.iter().find(|f| f.num == 8).and_then(string_of)
}

/// The value of a `TensorProto` of one element, as a number.
fn scalar_of_tensor(t: &[u8]) -> Option<f64> {
    let fs = fields(t)?;
    let mut elements = 1u64;
    let mut dtype = 0;
    for f in &fs {
        match (f.num, f.value) {
            (1, _) => {
                for d in ints_of(f)? {
                    elements = elements.checked_mul(u64::try_from(d).ok()?)?;
                }
            }
            (2, Wire::Varint(v)) => dtype = v as i64,
            _ => {}
        }
    }
    if elements != 1 {
        return None;
    }
    for f in &fs {
        match f.num {
            9 => {
                let b = bytes_of(f)?;
                return match dtype {
                    1 => Some(f64::from(f32::from_le_bytes(b.try_into().ok()?))),
                    11 => Some(f64::from_le_bytes(b.try_into().ok()?)),
                    2 | 9 => Some(f64::from(*b.first()?)),
                    3 => Some(f64::from(*b.first()? as i8)),
                    4 => Some(f64::from(u16::from_le_bytes(b.try_into().ok()?))),
                    5 => Some(f64::from(i16::from_le_bytes(b.try_into().ok()?))),
                    6 => Some(f64::from(i32::from_le_bytes(b.try_into().ok()?))),
                    12 => Some(f64::from(u32::from_le_bytes(b.try_into().ok()?))),
                    7 => Some(i64::from_le_bytes(b.try_into().ok()?) as f64),
                    13 => Some(u64::from_le_bytes(b.try_into().ok()?) as f64),
                    _ => None,
                };
            }
            4 => {
                let b = match f.value {
                    Wire::Bytes(b) => b,
                    _ => f.raw.get(f.raw.len().checked_sub(4)?..)?,
                };
                return Some(f64::from(f32::from_le_bytes(b.get(..4)?.try_into().ok()?)));
            }
            10 => {
                let b = match f.value {
                    Wire::Bytes(b) => b,
                    _ => f.raw.get(f.raw.len().checked_sub(8)?..)?,
                };
                return Some(f64::from_le_bytes(b.get(..8)?.try_into().ok()?));
            }
            5 | 7 => return ints_of(f)?.first().map(|v| *v as f64),
            11 => return ints_of(f)?.first().map(|v| *v as u64 as f64),
            _ => {}
        }
    }
    None
}

/// The value of a constant of one element, as a number.
fn scalar_of_data(t: &TensorData) -> Option<f64> {
    let b = t.data.as_slice();
    Some(match t.dtype {
        DType::Bool | DType::U8 => f64::from(*b.first()?),
        DType::I8 => f64::from(*b.first()? as i8),
        DType::U16 => f64::from(u16::from_le_bytes(b.try_into().ok()?)),
        DType::I16 => f64::from(i16::from_le_bytes(b.try_into().ok()?)),
        DType::U32 => f64::from(u32::from_le_bytes(b.try_into().ok()?)),
        DType::I32 => f64::from(i32::from_le_bytes(b.try_into().ok()?)),
        DType::U64 => u64::from_le_bytes(b.try_into().ok()?) as f64,
        DType::I64 => i64::from_le_bytes(b.try_into().ok()?) as f64,
        DType::F32 => f64::from(f32::from_le_bytes(b.try_into().ok()?)),
        DType::F64 => f64::from_le_bytes(b.try_into().ok()?),
        _ => return None,
    })
}

/// A `TensorProto` of `t`: dims, data type, name, raw little-endian data.
pub fn tensor_proto(t: &TensorData) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for d in &t.shape {
        put_int(1, *d, &mut out);
    }
    put_int(2, onnx_elem(t.dtype)? as u64, &mut out);
    put_bytes(8, t.name.as_bytes(), &mut out);
    put_bytes(9, &t.data, &mut out);
    Some(out)
}

/// The constant `NAME=VALUE` for the model of `graph` (`pollen publish --const`): NAME must
/// be a graph input of one element; VALUE is read as the input's element type (`true`,
/// `16000`, `0.5`).
pub fn declare_const(graph: &Graph, decl: &str) -> Result<TensorData, String> {
    let (name, value) = decl
        .split_once('=')
        .ok_or_else(|| format!("{decl:?}: expected NAME=VALUE, e.g. sr=16000"))?;
    let (name, value) = (name.trim(), value.trim());
    let input = graph.input(name).ok_or_else(|| {
        format!(
            "--const {name}: the model has no graph input '{name}' (its inputs: {})",
            names(&graph.inputs)
        )
    })?;
    let elem = input
        .elem
        .ok_or_else(|| format!("--const {name}: the model does not declare the input's type"))?;
    let dtype = dtype_of_elem(elem).ok_or_else(|| {
        format!(
            "--const {name}: the input is {}, which Pollen does not serve",
            elem_name(elem)
        )
    })?;
    let shape: Vec<u64> = match &input.dims {
        None => Vec::new(),
        Some(_) if input.is_scalar() => vec![1; input.dims.as_ref().map_or(0, |d| d.len())],
        Some(_) => {
            return Err(format!(
                "--const {name}: the input is {}; --const fixes inputs of one element",
                input.as_declaration()
            ));
        }
    };
    let bad = || {
        format!(
            "--const {name}={value}: expected a value of the input's type, {}",
            dtype.short_name()
        )
    };
    let int = || value.parse::<i128>().map_err(|_| bad());
    let data = match dtype {
        DType::Bool => match value {
            "true" | "1" => vec![1],
            "false" | "0" => vec![0],
            _ => return Err(bad()),
        },
        DType::U8 => u8::try_from(int()?)
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::U16 => u16::try_from(int()?)
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::U32 => u32::try_from(int()?)
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::U64 => u64::try_from(int()?)
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::I8 => i8::try_from(int()?)
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::I16 => i16::try_from(int()?)
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::I32 => i32::try_from(int()?)
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::I64 => i64::try_from(int()?)
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::F16 => {
            let v: f32 = value.parse().map_err(|_| bad())?;
            super::kserve::f32_to_f16_bits(v).to_le_bytes().to_vec()
        }
        DType::F32 => value
            .parse::<f32>()
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        DType::F64 => value
            .parse::<f64>()
            .map_err(|_| bad())?
            .to_le_bytes()
            .to_vec(),
        _ => return Err(bad()),
    };
    Ok(TensorData {
        name: name.to_string(),
        dtype,
        shape,
        data,
    })
}

/// Check a declared input (`pollen publish --input`) against the model of `graph`: it is a
/// graph input, of the file's element type and rank.
pub fn check_declared(
    graph: &Graph,
    fact: &pollen_protocol::manifest::InputFact,
) -> Result<(), String> {
    let input = graph.input(&fact.name).ok_or_else(|| {
        format!(
            "--input {fact}: the model has no graph input '{}' (its inputs: {})",
            fact.name,
            names(&graph.inputs)
        )
    })?;
    if let Some(e) = input.elem
        && Some(e) != onnx_elem(fact.dtype)
    {
        return Err(format!(
            "--input {fact}: the model's input is {} ({})",
            elem_name(e),
            input.as_declaration()
        ));
    }
    if let Some(d) = &input.dims
        && d.len() != fact.dims.len()
    {
        return Err(format!(
            "--input {fact}: the model's input has {} dimensions ({})",
            d.len(),
            input.as_declaration()
        ));
    }
    Ok(())
}

/// Minimal ONNX writers for tests: enough for graphs with attributes, subgraphs, domains
/// and initializers of any type.
#[cfg(test)]
pub(crate) mod build {
    use super::{put_bytes, put_int};

    /// An attribute of a node.
    pub enum Attr<'a> {
        /// A graph (`If` branches).
        Graph(&'a str, Vec<u8>),
        /// An integer.
        Int(&'a str, i64),
        /// A list of integers.
        Ints(&'a str, Vec<i64>),
        /// A tensor (`Constant`).
        Tensor(&'a str, Vec<u8>),
        /// A list of floats.
        Floats(&'a str, Vec<f32>),
        /// A list of strings.
        Strings(&'a str, Vec<&'a str>),
        /// A string.
        Str(&'a str, &'a str),
    }

    /// A node: operator, domain, inputs, outputs, attributes.
    pub fn node(
        op: &str,
        domain: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: &[Attr<'_>],
    ) -> Vec<u8> {
        let attrs: Vec<Vec<u8>> = attrs
            .iter()
            .map(|a| {
                let mut ab = Vec::new();
                match a {
                    Attr::Graph(name, g) => {
                        put_bytes(1, name.as_bytes(), &mut ab);
                        put_bytes(6, g, &mut ab);
                        put_int(20, 5, &mut ab);
                    }
                    Attr::Int(name, v) => {
                        put_bytes(1, name.as_bytes(), &mut ab);
                        put_int(3, *v as u64, &mut ab);
                        put_int(20, 2, &mut ab);
                    }
                    Attr::Ints(name, v) => {
                        put_bytes(1, name.as_bytes(), &mut ab);
                        for x in v {
                            put_int(8, *x as u64, &mut ab);
                        }
                        put_int(20, 7, &mut ab);
                    }
                    Attr::Tensor(name, t) => {
                        put_bytes(1, name.as_bytes(), &mut ab);
                        put_bytes(5, t, &mut ab);
                        put_int(20, 4, &mut ab);
                    }
                    Attr::Floats(name, v) => {
                        // Unpacked, as some exporters write them (the reader takes both).
                        put_bytes(1, name.as_bytes(), &mut ab);
                        for x in v {
                            super::put_varint((7 << 3) | 5, &mut ab);
                            ab.extend_from_slice(&x.to_le_bytes());
                        }
                        put_int(20, 6, &mut ab);
                    }
                    Attr::Strings(name, v) => {
                        put_bytes(1, name.as_bytes(), &mut ab);
                        for x in v {
                            put_bytes(9, x.as_bytes(), &mut ab);
                        }
                        put_int(20, 8, &mut ab);
                    }
                    Attr::Str(name, v) => {
                        put_bytes(1, name.as_bytes(), &mut ab);
                        put_bytes(4, v.as_bytes(), &mut ab);
                        put_int(20, 3, &mut ab);
                    }
                }
                ab
            })
            .collect();
        let name = format!("{op}_{}", outputs.first().unwrap_or(&""));
        super::node_proto(op, domain, inputs, outputs, &name, &attrs)
    }

    /// A value that is a sequence of maps from INT64 to FLOAT (a ZipMap's output, as
    /// skl2onnx declares it).
    pub fn seq_of_maps_value_info(name: &str) -> Vec<u8> {
        let mut tensor = Vec::new();
        put_int(1, 1, &mut tensor);
        let mut value_type = Vec::new();
        put_bytes(1, &tensor, &mut value_type);
        let mut map = Vec::new();
        put_int(1, 7, &mut map);
        put_bytes(2, &value_type, &mut map);
        let mut map_type = Vec::new();
        put_bytes(5, &map, &mut map_type);
        let mut seq = Vec::new();
        put_bytes(1, &map_type, &mut seq);
        let mut typ = Vec::new();
        put_bytes(4, &seq, &mut typ);
        let mut vi = Vec::new();
        put_bytes(1, name.as_bytes(), &mut vi);
        put_bytes(2, &typ, &mut vi);
        vi
    }

    /// A tensor value: `elem` type, `dims` (`Err(name)` for a symbolic one, `None` for an
    /// untyped value).
    pub fn value_info(
        name: &str,
        elem: Option<i64>,
        dims: Option<&[Result<i64, &str>]>,
    ) -> Vec<u8> {
        let mut vi = Vec::new();
        put_bytes(1, name.as_bytes(), &mut vi);
        if let Some(elem) = elem {
            let mut tensor = Vec::new();
            put_int(1, elem as u64, &mut tensor);
            if let Some(dims) = dims {
                let mut shape = Vec::new();
                for d in dims {
                    let mut dim = Vec::new();
                    match d {
                        Ok(v) => put_int(1, *v as u64, &mut dim),
                        Err("") => {}
                        Err(p) => put_bytes(2, p.as_bytes(), &mut dim),
                    }
                    put_bytes(1, &dim, &mut shape);
                }
                put_bytes(2, &shape, &mut tensor);
            }
            let mut typ = Vec::new();
            put_bytes(1, &tensor, &mut typ);
            put_bytes(2, &typ, &mut vi);
        }
        vi
    }

    /// A graph of encoded nodes, initializers (`TensorProto`s), inputs and outputs
    /// (`ValueInfoProto`s).
    pub fn graph(
        nodes: &[Vec<u8>],
        inits: &[Vec<u8>],
        inputs: &[Vec<u8>],
        outputs: &[Vec<u8>],
    ) -> Vec<u8> {
        let mut g = Vec::new();
        for n in nodes {
            put_bytes(1, n, &mut g);
        }
        put_bytes(2, b"g", &mut g);
        for t in inits {
            put_bytes(5, t, &mut g);
        }
        for i in inputs {
            put_bytes(11, i, &mut g);
        }
        for o in outputs {
            put_bytes(12, o, &mut g);
        }
        g
    }

    /// A model (IR 8) of `graph`, importing opset 13 of the default domain and 1 of
    /// `ai.onnx.ml`.
    pub fn model(graph: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        put_int(1, 8, &mut m);
        for (domain, version) in [("", 13u64), ("ai.onnx.ml", 1)] {
            let mut opset = Vec::new();
            put_bytes(1, domain.as_bytes(), &mut opset);
            put_int(2, version, &mut opset);
            put_bytes(8, &opset, &mut m);
        }
        put_bytes(7, graph, &mut m);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    /// A TensorProto of `elem` type and `dims` holding `raw` bytes.
    fn raw_proto(name: &str, elem: i64, dims: &[u64], raw: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for d in dims {
            put_int(1, *d, &mut b);
        }
        put_int(2, elem as u64, &mut b);
        put_bytes(8, name.as_bytes(), &mut b);
        put_bytes(9, raw, &mut b);
        b
    }

    /// `y = x @ DequantizeLinear(w_q, scale, axis=1)`, with int8 `w_q` `[3, 2]` and one
    /// scale per output column.
    fn dequantize_model(zero: Option<[i8; 2]>) -> Vec<u8> {
        dequantize_model_along(1, &[0.5, 0.25], zero.as_ref().map(|z| &z[..]))
    }

    /// `y = x @ DequantizeLinear(w_q, scale, zero, axis)`, with int8 `w_q` `[3, 2]`.
    fn dequantize_model_along(axis: i64, scales: &[f32], zero: Option<&[i8]>) -> Vec<u8> {
        let t = raw_proto;
        let w: [i8; 6] = [1, -2, 3, -4, 127, -127];
        let scale: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        let n = scales.len() as u64;
        let mut inits = vec![
            t("w_q", 3, &[3, 2], &w.map(|v| v as u8)),
            t("scale", 1, &[n], &scale),
        ];
        let mut dq_inputs = vec!["w_q", "scale"];
        if let Some(z) = zero {
            let z: Vec<u8> = z.iter().map(|v| *v as u8).collect();
            inits.push(t("zero", 3, &[n], &z));
            dq_inputs.push("zero");
        }
        let f32s = |name, dims: &[Result<i64, &str>]| value_info(name, Some(1), Some(dims));
        model(&graph(
            &[
                node(
                    "DequantizeLinear",
                    "",
                    &dq_inputs,
                    &["w"],
                    &[Attr::Int("axis", axis)],
                ),
                node("MatMul", "", &["x", "w"], &["y"], &[]),
            ],
            &inits,
            &[f32s("x", &[Ok(1), Ok(3)])],
            &[f32s("y", &[Ok(1), Ok(2)])],
        ))
    }

    #[test]
    fn dequantized_weights_become_float_initializers() {
        let p = prepare(dequantize_model(None), &[]).expect("prepares");
        assert_eq!(p.dequantized, 1);
        let g = parse_graph(&p.bytes).expect("parses");
        assert!(g.nodes.iter().all(|n| n.op_type != "DequantizeLinear"));
        assert_eq!(w_of(&p.bytes), [0.5, -0.5, 1.5, -1.0, 63.5, -31.75]);
        let top = fields(&p.bytes).unwrap();
        assert!(
            fields(graph_field(&top).unwrap())
                .unwrap()
                .into_iter()
                .filter(|f| f.num == 5)
                .all(|f| tensor_name(bytes_of(&f).unwrap()).as_deref() != Some("w_q")),
            "the int8 weights nothing reads any more are left out"
        );
        // With zero points (w - zero) * scale.
        let p = prepare(dequantize_model(Some([1, -1])), &[]).expect("prepares");
        assert_eq!(p.dequantized, 1);
        assert_eq!(w_of(&p.bytes), [0.0, -0.25, 1.0, -0.75, 63.0, -31.5]);
        // One scale per row (axis 0: runs of two elements share one), and one per tensor.
        let p = prepare(
            dequantize_model_along(0, &[1.0, 0.5, 0.25], Some(&[0, 1, -1])),
            &[],
        )
        .expect("prepares");
        assert_eq!(w_of(&p.bytes), [1.0, -2.0, 1.0, -2.5, 32.0, -31.5]);
        let p = prepare(dequantize_model_along(1, &[2.0], None), &[]).expect("prepares");
        assert_eq!(w_of(&p.bytes), [2.0, -4.0, 6.0, -8.0, 254.0, -254.0]);
    }

    /// The float initializer `w` of a prepared model (checked to be float `[3, 2]`).
    fn w_of(bytes: &[u8]) -> Vec<f32> {
        let top = fields(bytes).unwrap();
        let w = fields(graph_field(&top).unwrap())
            .unwrap()
            .into_iter()
            .filter(|f| f.num == 5)
            .map(|f| bytes_of(&f).unwrap())
            .find(|t| tensor_name(t).as_deref() == Some("w"))
            .expect("w is an initializer");
        let (dims, elem, raw) = raw_tensor(w).unwrap();
        assert_eq!((dims, elem), (vec![3, 2], 1), "float [3, 2]");
        raw.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    /// Dimensions whose product overflows u64 in a `DequantizeLinear`'s scale, or after
    /// a zero dimension of its input (so that the input is empty and passes the element
    /// count): not the simple case, left alone. Both overflowed (a panic with overflow
    /// checks on).
    #[test]
    fn dequantize_with_overflowing_dims_is_left_alone() {
        let t = raw_proto;
        let huge = 1u64 << 32;
        for (x_dims, s_dims, scale) in [
            // One scale value whose dims claim 2^64 elements.
            (vec![2u64], vec![huge, huge], 1f32.to_le_bytes().to_vec()),
            // No scale values along axis 0 (of size 0); the dims after it overflow.
            (vec![0, huge, huge], vec![0], vec![]),
        ] {
            let x = vec![1u8; x_dims.iter().product::<u64>() as usize];
            let m = model(&graph(
                &[node(
                    "DequantizeLinear",
                    "",
                    &["x_q", "scale"],
                    &["y"],
                    &[Attr::Int("axis", 0)],
                )],
                &[t("x_q", 3, &x_dims, &x), t("scale", 1, &s_dims, &scale)],
                &[],
                &[value_info("y", Some(1), None)],
            ));
            let p = prepare(m, &[]).expect("prepares");
            assert_eq!(p.dequantized, 0, "{x_dims:?} {s_dims:?}");
        }
    }

    fn zipmap_model() -> Vec<u8> {
        let f32s = |name, dims: &[Result<i64, &str>]| value_info(name, Some(1), Some(dims));
        graph(
            &[
                node("Softmax", "", &["X"], &["probs"], &[]),
                node(
                    "ZipMap",
                    "ai.onnx.ml",
                    &["probs"],
                    &["out"],
                    &[Attr::Ints("classlabels_int64s", vec![0, 1, 2])],
                ),
            ],
            &[],
            &[f32s("X", &[Err("N"), Ok(3)])],
            &[value_info("out", None, None)],
        )
    }

    #[test]
    fn reads_inputs_outputs_and_nodes() {
        let g = parse_graph(&model(&zipmap_model())).expect("parses");
        assert_eq!(g.inputs.len(), 1);
        assert_eq!(g.inputs[0].elem, Some(1));
        assert_eq!(
            g.inputs[0].dims,
            Some(vec![OnnxDim::Param("N".into()), OnnxDim::Value(3)])
        );
        assert_eq!(g.inputs[0].as_declaration(), "X=f32[N,3]");
        assert_eq!(g.outputs[0].elem, None);
        assert_eq!(g.nodes[1].qualified_op(), "ai.onnx.ml:ZipMap");
        assert_eq!(g.nodes[1].labels, ["0", "1", "2"]);
        assert_eq!(
            onnx_graph_outputs(&model(&zipmap_model())),
            Some(vec!["out".to_string()])
        );
        for bad in [&b"\xff\xff"[..], b"", b"\x3a\x05ab"] {
            assert!(parse_graph(bad).is_err());
        }
    }

    #[test]
    fn constants_become_initializers_and_zipmaps_identities() {
        let sr = TensorData {
            name: "sr".into(),
            dtype: DType::I64,
            shape: vec![],
            data: 16000i64.to_le_bytes().to_vec(),
        };
        let g = graph(
            &[node("Identity", "", &["x"], &["y"], &[])],
            &[],
            &[
                value_info("x", Some(1), Some(&[Ok(2)])),
                value_info("sr", Some(7), Some(&[])),
            ],
            &[value_info("y", Some(1), Some(&[Ok(2)]))],
        );
        let p = prepare(model(&g), std::slice::from_ref(&sr)).expect("prepared");
        let after = parse_graph(&p.bytes).expect("still a model");
        assert_eq!(after.initializers, ["sr"]);
        assert_eq!(after.inputs.len(), 1, "sr is no longer fed");
        let e = prepare(
            model(&g),
            &[TensorData {
                name: "rate".into(),
                ..sr.clone()
            }],
        )
        .unwrap_err();
        assert!(
            e.contains("'rate' is not an input") && e.contains("'x', 'sr'"),
            "{e}"
        );
        let e = prepare(
            model(&g),
            &[TensorData {
                dtype: DType::F64,
                ..sr
            }],
        )
        .unwrap_err();
        assert!(e.contains("f64") && e.contains("i64"), "{e}");

        let p = prepare(model(&zipmap_model()), &[]).expect("prepared");
        assert_eq!(
            p.zipmaps,
            [ZipMapStripped {
                output: "out".into(),
                labels: vec!["0".into(), "1".into(), "2".into()]
            }]
        );
        let after = parse_graph(&p.bytes).expect("still a model");
        assert_eq!(after.nodes[1].op_type, "Identity");
        assert_eq!(after.nodes[1].inputs, ["probs"]);
        assert_eq!(after.nodes[1].outputs, ["out"]);
        // Nothing to do: the same bytes.
        let plain = model(&g);
        assert_eq!(prepare(plain.clone(), &[]).expect("ok").bytes, plain);
    }

    /// `y = If(c)` where `c` is the end of `links` nodes `Add(prev, prev)` from the
    /// constant input `sr`.
    fn chained_condition(links: usize) -> Vec<u8> {
        let branch = |v: &str| {
            graph(
                &[node("Identity", "", &[v], &["o"], &[])],
                &[],
                &[],
                &[value_info("o", Some(1), None)],
            )
        };
        let mut nodes = Vec::new();
        let mut prev = "sr".to_string();
        for i in 0..links {
            let out = format!("a{i}");
            nodes.push(node("Add", "", &[&prev, &prev], &[&out], &[]));
            prev = out;
        }
        nodes.push(node(
            "If",
            "",
            &[&prev],
            &["y"],
            &[
                Attr::Graph("then_branch", branch("x")),
                Attr::Graph("else_branch", branch("sr")),
            ],
        ));
        model(&graph(
            &nodes,
            &[],
            &[
                value_info("x", Some(7), Some(&[])),
                value_info("sr", Some(7), Some(&[])),
            ],
            &[value_info("y", Some(7), None)],
        ))
    }

    #[test]
    fn ifs_decided_by_constants_are_folded_within_bounds() {
        let sr = TensorData {
            name: "sr".into(),
            dtype: DType::I64,
            shape: vec![],
            data: 1i64.to_le_bytes().to_vec(),
        };
        let p = prepare(chained_condition(3), std::slice::from_ref(&sr)).expect("prepared");
        assert_eq!(p.folded, ["If_y"]);
        let after = parse_graph(&p.bytes).expect("a model");
        assert!(after.nodes.iter().all(|n| n.op_type != "If"));
        // The branch's last node, then the cast of the INT64 output (see
        // cast_int64_output).
        let [.., branch, cast] = after.nodes.as_slice() else {
            panic!("nodes")
        };
        assert_eq!(
            (branch.inputs.as_slice(), branch.outputs.as_slice()),
            (&["o".to_string()][..], &["y.pollen.tdim".to_string()][..])
        );
        assert_eq!(
            (cast.op_type.as_str(), cast.outputs.as_slice()),
            ("CastLike", &["y".to_string()][..])
        );
        // A condition reusing its inputs down a long chain costs a bounded number of
        // evaluations (2^60 without the bound), and is left to tract.
        let started = std::time::Instant::now();
        let p = prepare(chained_condition(60), &[sr]).expect("prepared");
        assert!(p.folded.is_empty());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn publish_declarations_are_checked_against_the_model() {
        let g = graph(
            &[],
            &[],
            &[
                value_info("x", Some(1), Some(&[Err("N"), Ok(3)])),
                value_info("sr", Some(7), Some(&[])),
                value_info("on", Some(9), Some(&[Ok(1)])),
                value_info("h", Some(10), None),
            ],
            &[],
        );
        let g = parse_graph(&model(&g)).expect("parses");
        let c = declare_const(&g, "sr=16000").expect("i64");
        assert_eq!(
            (c.dtype, c.shape.as_slice(), c.data.as_slice()),
            (DType::I64, &[][..], &16000i64.to_le_bytes()[..])
        );
        let c = declare_const(&g, "on=true").expect("bool of shape [1]");
        assert_eq!(
            (c.shape.as_slice(), c.data.as_slice()),
            (&[1u64][..], &[1u8][..])
        );
        let c = declare_const(&g, "h=0.5").expect("f16 with no declared shape");
        assert_eq!(c.data, 0x3800u16.to_le_bytes());
        for (bad, why) in [
            ("rate=1", "no graph input 'rate'"),
            ("x=1", "one element"),
            ("sr=1.5", "the input's type, i64"),
            ("on=2", "the input's type, bool"),
            ("sr", "NAME=VALUE"),
        ] {
            let e = declare_const(&g, bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(check_declared(&g, &"x=f32[1,3]".parse().expect("fact")).is_ok());
        for (bad, why) in [
            ("y=f32[1]", "no graph input 'y'"),
            ("x=f16[1,3]", "input is f32"),
            ("x=f32[1,3,1]", "has 2 dimensions"),
        ] {
            let e = check_declared(&g, &bad.parse().expect("fact")).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn if_conditions_are_traced_to_inputs() {
        let branch = graph(
            &[node("Identity", "", &["x"], &["o"], &[])],
            &[],
            &[],
            &[value_info("o", Some(1), None)],
        );
        let g = graph(
            &[
                node("Equal", "", &["sr", "k"], &["c"], &[]),
                node(
                    "If",
                    "",
                    &["c"],
                    &["y"],
                    &[
                        Attr::Graph("then_branch", branch.clone()),
                        Attr::Graph("else_branch", branch),
                    ],
                ),
            ],
            &[],
            &[
                value_info("x", Some(1), Some(&[Err("N")])),
                value_info("sr", Some(7), Some(&[])),
            ],
            &[value_info("y", Some(1), None)],
        );
        let g = parse_graph(&model(&g)).expect("parses");
        let ins: Vec<&str> = g
            .if_condition_inputs()
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(ins, ["sr"]);
        assert!(g.input("sr").is_some_and(|i| i.is_scalar()));
        assert_eq!(g.all_nodes().len(), 4, "branch nodes included");
        assert_eq!(g.find_node("If_y").map(|n| n.op_type.as_str()), Some("If"));
    }
}
