//! Tiny ONNX models written byte by byte (protobuf by hand), for tests that need a model
//! with a particular shape or operator: a fixed huge input, a `Gather` whose index a client
//! controls. Only the fields tract reads are written. Also the `TensorProto` files of the
//! ONNX test-data layout ([`tensor_proto`]), for golden checks.

/// ONNX `TensorProto.DataType` codes used here.
pub const FLOAT: u64 = 1;
/// INT64.
pub const INT64: u64 = 7;

fn varint(mut n: u64, out: &mut Vec<u8>) {
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

fn field_varint(field: u64, n: u64, out: &mut Vec<u8>) {
    varint(field << 3, out);
    varint(n, out);
}

fn field_bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
    varint((field << 3) | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// A graph input or output: `name`, element type, dims (a negative dim is symbolic).
#[derive(Debug)]
pub struct Io<'a> {
    /// Name.
    pub name: &'a str,
    /// ONNX element type code.
    pub elem: u64,
    /// Dimensions; negative means a named symbolic dimension.
    pub dims: &'a [i64],
}

fn value_info(io: &Io<'_>) -> Vec<u8> {
    let mut shape = Vec::new();
    for (k, &d) in io.dims.iter().enumerate() {
        let mut dim = Vec::new();
        if d < 0 {
            field_bytes(2, format!("d{k}").as_bytes(), &mut dim);
        } else {
            field_varint(1, d as u64, &mut dim);
        }
        field_bytes(1, &dim, &mut shape);
    }
    let mut tensor = Vec::new();
    field_varint(1, io.elem, &mut tensor);
    field_bytes(2, &shape, &mut tensor);
    let mut typ = Vec::new();
    field_bytes(1, &tensor, &mut typ);
    let mut vi = Vec::new();
    field_bytes(1, io.name.as_bytes(), &mut vi);
    field_bytes(2, &typ, &mut vi);
    vi
}

/// A node: operator, inputs, outputs.
#[derive(Debug)]
pub struct Node<'a> {
    /// Operator type.
    pub op: &'a str,
    /// Input names.
    pub inputs: &'a [&'a str],
    /// Output names.
    pub outputs: &'a [&'a str],
}

/// A float initializer: name, dims, values.
#[derive(Debug)]
pub struct Init<'a> {
    /// Name.
    pub name: &'a str,
    /// Dimensions.
    pub dims: &'a [i64],
    /// Values (row-major).
    pub values: &'a [f32],
}

/// The bytes of a model (IR 7, opset 13) with these nodes, initializers, inputs, outputs.
pub fn model(
    nodes: &[Node<'_>],
    inits: &[Init<'_>],
    inputs: &[Io<'_>],
    outputs: &[Io<'_>],
) -> Vec<u8> {
    let mut g = Vec::new();
    for (k, n) in nodes.iter().enumerate() {
        let mut nb = Vec::new();
        for i in n.inputs {
            field_bytes(1, i.as_bytes(), &mut nb);
        }
        for o in n.outputs {
            field_bytes(2, o.as_bytes(), &mut nb);
        }
        field_bytes(3, format!("n{k}").as_bytes(), &mut nb);
        field_bytes(4, n.op.as_bytes(), &mut nb);
        field_bytes(1, &nb, &mut g);
    }
    field_bytes(2, b"g", &mut g);
    for init in inits {
        let mut t = Vec::new();
        for &d in init.dims {
            field_varint(1, d as u64, &mut t);
        }
        field_varint(2, FLOAT, &mut t);
        field_bytes(8, init.name.as_bytes(), &mut t);
        let raw: Vec<u8> = init.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        field_bytes(9, &raw, &mut t);
        field_bytes(5, &t, &mut g);
    }
    for i in inputs {
        field_bytes(11, &value_info(i), &mut g);
    }
    for o in outputs {
        field_bytes(12, &value_info(o), &mut g);
    }
    let mut opset = Vec::new();
    field_bytes(1, b"", &mut opset);
    field_varint(2, 13, &mut opset);
    let mut m = Vec::new();
    field_varint(1, 7, &mut m);
    field_bytes(8, &opset, &mut m);
    field_bytes(7, &g, &mut m);
    m
}

/// `y = Identity(x)` with `x` and `y` of FP32 and the given fixed dims.
pub fn identity(dims: &[i64]) -> Vec<u8> {
    let io = |name| Io {
        name,
        elem: FLOAT,
        dims,
    };
    model(
        &[Node {
            op: "Identity",
            inputs: &["x"],
            outputs: &["y"],
        }],
        &[],
        &[io("x")],
        &[io("y")],
    )
}

/// `y = Gather(W, idx)` with `W` a `[rows, 4]` FP32 table and `idx` an INT64 `[n]` input:
/// an index a client sends picks a row, and an out-of-range one is the client's error.
pub fn gather(rows: i64) -> Vec<u8> {
    let values: Vec<f32> = (0..rows * 4).map(|v| v as f32).collect();
    model(
        &[Node {
            op: "Gather",
            inputs: &["W", "idx"],
            outputs: &["y"],
        }],
        &[Init {
            name: "W",
            dims: &[rows, 4],
            values: &values,
        }],
        &[Io {
            name: "idx",
            elem: INT64,
            dims: &[-1],
        }],
        &[Io {
            name: "y",
            elem: FLOAT,
            dims: &[-1, 4],
        }],
    )
}

/// An attribute of a node (for [`node_with`]).
#[derive(Debug)]
pub enum Attr<'a> {
    /// An integer.
    Int(&'a str, i64),
    /// A list of integers.
    Ints(&'a str, &'a [i64]),
    /// A graph (the bytes of a `GraphProto`, from [`graph`]).
    Graph(&'a str, Vec<u8>),
}

/// A node with a domain and attributes (the bytes of a `NodeProto`), named `{op}_{first
/// output}`.
pub fn node_with(
    op: &str,
    domain: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: &[Attr<'_>],
) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        field_bytes(1, i.as_bytes(), &mut n);
    }
    for o in outputs {
        field_bytes(2, o.as_bytes(), &mut n);
    }
    let name = format!("{op}_{}", outputs.first().copied().unwrap_or(""));
    field_bytes(3, name.as_bytes(), &mut n);
    field_bytes(4, op.as_bytes(), &mut n);
    if !domain.is_empty() {
        field_bytes(7, domain.as_bytes(), &mut n);
    }
    for a in attrs {
        let mut ab = Vec::new();
        match a {
            Attr::Int(name, v) => {
                field_bytes(1, name.as_bytes(), &mut ab);
                field_varint(3, *v as u64, &mut ab);
                field_varint(20, 2, &mut ab);
            }
            Attr::Ints(name, v) => {
                field_bytes(1, name.as_bytes(), &mut ab);
                for x in *v {
                    field_varint(8, *x as u64, &mut ab);
                }
                field_varint(20, 7, &mut ab);
            }
            Attr::Graph(name, g) => {
                field_bytes(1, name.as_bytes(), &mut ab);
                field_bytes(6, g, &mut ab);
                field_varint(20, 5, &mut ab);
            }
        }
        field_bytes(5, &ab, &mut n);
    }
    n
}

/// A named dimension (`Err(name)`; `Err("")` leaves it unnamed) or a fixed one.
pub type DimSpec<'a> = Result<i64, &'a str>;

/// A tensor value (the bytes of a `ValueInfoProto`); `dims` `None` declares no shape.
pub fn tensor_value(name: &str, elem: u64, dims: Option<&[DimSpec<'_>]>) -> Vec<u8> {
    let mut tensor = Vec::new();
    field_varint(1, elem, &mut tensor);
    if let Some(dims) = dims {
        let mut shape = Vec::new();
        for d in dims {
            let mut dim = Vec::new();
            match d {
                Ok(v) => field_varint(1, *v as u64, &mut dim),
                Err("") => {}
                Err(p) => field_bytes(2, p.as_bytes(), &mut dim),
            }
            field_bytes(1, &dim, &mut shape);
        }
        field_bytes(2, &shape, &mut tensor);
    }
    let mut typ = Vec::new();
    field_bytes(1, &tensor, &mut typ);
    let mut vi = Vec::new();
    field_bytes(1, name.as_bytes(), &mut vi);
    field_bytes(2, &typ, &mut vi);
    vi
}

/// An initializer (the bytes of a `TensorProto`): `elem` type, dims, raw little-endian
/// data.
pub fn initializer(name: &str, elem: u64, dims: &[i64], raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dims {
        field_varint(1, d as u64, &mut t);
    }
    field_varint(2, elem, &mut t);
    field_bytes(8, name.as_bytes(), &mut t);
    field_bytes(9, raw, &mut t);
    t
}

/// A graph (the bytes of a `GraphProto`) of encoded nodes, initializers, inputs, outputs.
pub fn graph(
    nodes: &[Vec<u8>],
    inits: &[Vec<u8>],
    inputs: &[Vec<u8>],
    outputs: &[Vec<u8>],
) -> Vec<u8> {
    let mut g = Vec::new();
    for n in nodes {
        field_bytes(1, n, &mut g);
    }
    field_bytes(2, b"g", &mut g);
    for t in inits {
        field_bytes(5, t, &mut g);
    }
    for i in inputs {
        field_bytes(11, i, &mut g);
    }
    for o in outputs {
        field_bytes(12, o, &mut g);
    }
    g
}

/// A model (IR 8, opset 13) of a [`graph`].
pub fn model_of(graph: &[u8]) -> Vec<u8> {
    let mut opset = Vec::new();
    field_bytes(1, b"", &mut opset);
    field_varint(2, 13, &mut opset);
    let mut m = Vec::new();
    field_varint(1, 8, &mut m);
    field_bytes(8, &opset, &mut m);
    field_bytes(7, graph, &mut m);
    m
}

/// `y = If(sr == 16000, then: x * 2, else: Concat(x, x) on axis 1)` with `x` FP32 of
/// shape `[N, 4]` and `sr` an INT64 scalar, as voice-activity models branch on their
/// sample rate. The branches' shapes differ, so tract can type the `If` only once `sr` is
/// fixed (`pollen publish --const sr=16000`).
pub fn if_on_sample_rate() -> Vec<u8> {
    let two = initializer("two", FLOAT, &[], &2f32.to_le_bytes());
    let then_g = graph(
        &[node_with("Mul", "", &["x", "two"], &["t"], &[])],
        &[two],
        &[],
        &[tensor_value("t", FLOAT, None)],
    );
    let else_g = graph(
        &[node_with(
            "Concat",
            "",
            &["x", "x"],
            &["e"],
            &[Attr::Int("axis", 1)],
        )],
        &[],
        &[],
        &[tensor_value("e", FLOAT, None)],
    );
    let k = initializer("k", INT64, &[], &16000i64.to_le_bytes());
    model_of(&graph(
        &[
            node_with("Equal", "", &["sr", "k"], &["c"], &[]),
            node_with(
                "If",
                "",
                &["c"],
                &["y"],
                &[
                    Attr::Graph("then_branch", then_g),
                    Attr::Graph("else_branch", else_g),
                ],
            ),
        ],
        &[k],
        &[
            tensor_value("x", FLOAT, Some(&[Err("N"), Ok(4)])),
            tensor_value("sr", INT64, Some(&[])),
        ],
        &[tensor_value("y", FLOAT, None)],
    ))
}

/// One step of a U-Net: `y = Concat(x, ConvTranspose(MaxPool(x)))` on the channel axis,
/// `x` FP32 of shape `[1, 1, H, W]` (pooling 2x2, upsampling 2x2 with weights 1). tract
/// cannot prove that the upsampled height is `H` again, so the model is prepared per
/// input shape.
pub fn unet_step() -> Vec<u8> {
    let w: Vec<u8> = [1f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    model_of(&graph(
        &[
            node_with(
                "MaxPool",
                "",
                &["x"],
                &["p"],
                &[
                    Attr::Ints("kernel_shape", &[2, 2]),
                    Attr::Ints("strides", &[2, 2]),
                ],
            ),
            node_with(
                "ConvTranspose",
                "",
                &["p", "w"],
                &["u"],
                &[Attr::Ints("strides", &[2, 2])],
            ),
            node_with("Concat", "", &["x", "u"], &["y"], &[Attr::Int("axis", 1)]),
        ],
        &[initializer("w", FLOAT, &[1, 1, 2, 2], &w)],
        &[tensor_value(
            "x",
            FLOAT,
            Some(&[Ok(1), Ok(1), Err("H"), Err("W")]),
        )],
        &[tensor_value("y", FLOAT, None)],
    ))
}

/// A serialised `TensorProto` (an `input_K.pb` / `output_K.pb` of the ONNX test-data
/// layout): `dims`, element type `elem`, `name` when given, and the little-endian element
/// bytes in `raw_data`.
pub fn tensor_proto(name: Option<&str>, elem: u64, dims: &[u64], raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dims {
        field_varint(1, d, &mut t);
    }
    field_varint(2, elem, &mut t);
    if let Some(n) = name {
        field_bytes(8, n.as_bytes(), &mut t);
    }
    field_bytes(9, raw, &mut t);
    t
}
