//! `ai.onnx.ml` operators tract 0.23 lacks, written with operators it has, so that
//! scikit-learn models exported by skl2onnx serve as they ship:
//!
//! * `Scaler` (every `StandardScaler`, `MinMaxScaler`, `MaxAbsScaler`):
//!   `Mul(Sub(Cast(x, float), offset), scale)`, `offset` and `scale` as initializers that
//!   broadcast along the feature axis, as the operator defines;
//! * `TreeEnsembleRegressor` (gradient boosting, random forests, decision trees): tract's
//!   `TreeEnsembleClassifier` over the same trees, one class per target (at least three,
//!   so that tract's two-class layout does not apply), its scores gathered back to the
//!   targets' columns (for `AVERAGE`, divided by the number of trees, then the base values
//!   added, as onnxruntime does). Without a post-transform, the classifier's scores are
//!   exactly the regressor's sums: per target, the leaves' weights plus the base value.
//!
//! * `TreeEnsembleClassifier` with two classes and the weights of one (scikit-learn's
//!   binary forests): tract computes the probabilities `[1 - s, s]` right but takes the
//!   label from the scores before that layout (`[s, 0]`), so the label is the first class
//!   whenever `s > 0`. The classifier is kept; its label comes from `ArgMax` over its
//!   probabilities, gathered from the class labels (onnxruntime's rule: the second class
//!   when `s > 0.5`). Only with integer labels and weights that are not negative
//!   (onnxruntime reads negative ones differently).
//!
//! * `LinearClassifier` is checked, not rewritten: one whose coefficients do not fit the
//!   features of the graph input it reads is refused, naming the numbers.
//!
//! A node these do not cover (`MIN` or `MAX` aggregates, a regressor post-transform,
//! attributes given as tensors) is left as it is, and tract's refusal names it.

use super::{
    Field, NODE_OUTPUT, Node, Wire, bytes_of, fields, ints_of, node_proto, put_bytes, put_int,
    tensor_proto, with_first_name,
};
use pollen_protocol::manifest::{DType, TensorData};
use std::collections::BTreeSet;

/// The domain of the classical machine-learning operators.
const ML: &str = "ai.onnx.ml";

/// Whether [`expand`] may replace `node`.
pub(super) fn is_rewritable(node: &Node) -> bool {
    node.domain == ML
        && matches!(
            node.op_type.as_str(),
            "Scaler" | "TreeEnsembleRegressor" | "TreeEnsembleClassifier"
        )
}

/// What replaces one node: nodes in order (the last writes the node's output) and the
/// initializers they read.
pub(super) struct Expansion {
    /// `NodeProto`s.
    pub nodes: Vec<Vec<u8>>,
    /// `TensorProto`s.
    pub initializers: Vec<Vec<u8>>,
    /// What was done, for the log.
    pub note: String,
}

/// The nodes that compute what `node` (whose `NodeProto` is `raw`) computes, or `None` to
/// keep it (not a rewritable operator, or a form of it not covered).
pub(super) fn expand(raw: &[u8], node: &Node) -> Option<Expansion> {
    if !is_rewritable(node) || node.inputs.len() != 1 {
        return None;
    }
    let attrs = attributes(raw)?;
    match node.op_type.as_str() {
        "Scaler" => scaler(node, &attrs),
        "TreeEnsembleRegressor" => tree_regressor(node, &attrs),
        "TreeEnsembleClassifier" => binary_classifier_label(raw, node, &attrs),
        _ => None,
    }
}

/// One `AttributeProto`: its name, whole encoding and fields.
struct Attr<'a> {
    name: String,
    fields: Vec<Field<'a>>,
}

fn attributes(raw: &[u8]) -> Option<Vec<Attr<'_>>> {
    let mut out = Vec::new();
    for f in fields(raw)?.into_iter().filter(|f| f.num == 5) {
        let fields = fields(bytes_of(&f)?)?;
        let name = fields
            .iter()
            .find(|a| a.num == 1)
            .and_then(|a| String::from_utf8(bytes_of(a)?.to_vec()).ok())?;
        out.push(Attr { name, fields });
    }
    Some(out)
}

fn find<'a, 'b>(attrs: &'b [Attr<'a>], name: &str) -> Option<&'b Attr<'a>> {
    attrs.iter().find(|a| a.name == name)
}

/// A float list attribute (`floats`, packed or not, or a single `f`).
fn floats(a: &Attr<'_>) -> Option<Vec<f32>> {
    let mut out = Vec::new();
    for f in &a.fields {
        match (f.num, f.value) {
            (7, Wire::Bytes(b)) => {
                if b.len() % 4 != 0 {
                    return None;
                }
                out.extend(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            (7 | 2, Wire::Fixed) => {
                let b: [u8; 4] = f.raw.get(f.raw.len().checked_sub(4)?..)?.try_into().ok()?;
                out.push(f32::from_le_bytes(b));
            }
            _ => {}
        }
    }
    Some(out)
}

/// An integer list attribute (`ints`, packed or not, or a single `i`).
fn ints(a: &Attr<'_>) -> Option<Vec<i64>> {
    let mut out = Vec::new();
    for f in a.fields.iter().filter(|f| f.num == 8 || f.num == 3) {
        out.extend(ints_of(f)?);
    }
    Some(out)
}

/// A string attribute (`s`).
fn string(a: &Attr<'_>) -> Option<String> {
    let f = a.fields.iter().find(|f| f.num == 4)?;
    String::from_utf8(bytes_of(f)?.to_vec()).ok()
}

/// The attribute again, under another name.
fn renamed(a: &Attr<'_>, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(1, name.as_bytes(), &mut out);
    for f in a.fields.iter().filter(|f| f.num != 1) {
        out.extend_from_slice(f.raw);
    }
    out
}

/// An `AttributeProto` of one integer.
pub(super) fn attr_int(name: &str, v: i64) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(1, name.as_bytes(), &mut out);
    put_int(3, v as u64, &mut out);
    put_int(20, 2, &mut out); // INT
    out
}

fn attr_ints(name: &str, v: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(1, name.as_bytes(), &mut out);
    for x in v {
        put_int(8, *x as u64, &mut out);
    }
    put_int(20, 7, &mut out); // INTS
    out
}

fn attr_floats(name: &str, v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(1, name.as_bytes(), &mut out);
    let packed: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    put_bytes(7, &packed, &mut out);
    put_int(20, 6, &mut out); // FLOATS
    out
}

fn f32_tensor(name: &str, v: &[f32]) -> Option<Vec<u8>> {
    tensor_proto(&TensorData {
        name: name.into(),
        dtype: DType::F32,
        shape: vec![v.len() as u64],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

/// `Y = (float(X) - offset) * scale`, `offset` and `scale` of one element or one per
/// feature (the last axis).
fn scaler(node: &Node, attrs: &[Attr<'_>]) -> Option<Expansion> {
    let [x] = node.inputs.as_slice() else {
        return None;
    };
    let [y] = node.outputs.as_slice() else {
        return None;
    };
    let offset = find(attrs, "offset")
        .map(floats)
        .unwrap_or(Some(Vec::new()))?;
    let scale = find(attrs, "scale")
        .map(floats)
        .unwrap_or(Some(Vec::new()))?;
    let name = node.display_name();
    // Each step: the operator and the initializer it reads (name, values), if any.
    type Step = (&'static str, Option<(String, Vec<f32>)>);
    let mut steps: Vec<Step> = vec![("Cast", None)];
    if !offset.is_empty() {
        steps.push(("Sub", Some((format!("{y}.pollen.offset"), offset))));
    }
    if !scale.is_empty() {
        steps.push(("Mul", Some((format!("{y}.pollen.scale"), scale))));
    }
    let (mut nodes, mut initializers) = (Vec::new(), Vec::new());
    let mut current = x.clone();
    let last = steps.len() - 1;
    for (k, (op, operand)) in steps.into_iter().enumerate() {
        let out = if k == last {
            y.clone()
        } else {
            format!("{y}.pollen.{}", op.to_lowercase())
        };
        let step_name = format!("{name}.pollen.{}", op.to_lowercase());
        let n = match operand {
            None => node_proto(
                op,
                "",
                &[&current],
                &[&out],
                &step_name,
                &[attr_int("to", 1)], // FLOAT
            ),
            Some((init, values)) => {
                initializers.push(f32_tensor(&init, &values)?);
                node_proto(op, "", &[&current, &init], &[&out], &step_name, &[])
            }
        };
        nodes.push(n);
        current = out;
    }
    Some(Expansion {
        nodes,
        initializers,
        note: format!("ai.onnx.ml Scaler '{name}' as Cast, Sub, Mul"),
    })
}

/// A `TreeEnsembleRegressor` as tract's `TreeEnsembleClassifier` (see the module's doc).
fn tree_regressor(node: &Node, attrs: &[Attr<'_>]) -> Option<Expansion> {
    let [x] = node.inputs.as_slice() else {
        return None;
    };
    let [y] = node.outputs.as_slice() else {
        return None;
    };
    if attrs.iter().any(|a| a.name.ends_with("_as_tensor")) {
        return None;
    }
    let targets = match find(attrs, "n_targets") {
        Some(a) => usize::try_from(*ints(a)?.first()?).ok()?,
        None => 1,
    };
    // Far more targets than any regressor has: the classifier's scores are N x targets.
    if targets == 0 || targets > 1 << 16 {
        return None;
    }
    let average = match find(attrs, "aggregate_function").map(string) {
        None => false,
        Some(Some(s)) if s == "SUM" => false,
        Some(Some(s)) if s == "AVERAGE" => true,
        _ => return None,
    };
    match find(attrs, "post_transform").map(string) {
        None => {}
        Some(Some(s)) if s == "NONE" => {}
        _ => return None,
    }
    let classes = targets.max(3);
    let trees = find(attrs, "nodes_treeids")
        .map(ints)??
        .into_iter()
        .collect::<BTreeSet<i64>>()
        .len();
    if trees == 0 {
        return None;
    }
    let mut new_attrs = Vec::new();
    for a in attrs {
        match a.name.as_str() {
            "n_targets" | "aggregate_function" | "post_transform" | "base_values" => {}
            n if n.starts_with("target_") => {
                new_attrs.push(renamed(a, &format!("class_{}", &n["target_".len()..])))
            }
            _ => {
                let mut whole = Vec::new();
                for f in &a.fields {
                    whole.extend_from_slice(f.raw);
                }
                new_attrs.push(whole);
            }
        }
    }
    let labels: Vec<i64> = (0..classes as i64).collect();
    new_attrs.push(attr_ints("classlabels_int64s", &labels));
    let base = match find(attrs, "base_values") {
        Some(a) => {
            let b = floats(a)?;
            if b.len() != targets {
                return None;
            }
            Some(b)
        }
        None => None,
    };
    // SUM adds the base values to the trees' sum (so may the classifier); AVERAGE adds
    // them after dividing by the number of trees (onnxruntime's reference).
    if let (Some(b), false) = (&base, average) {
        let mut padded = b.clone();
        padded.resize(classes, 0.0);
        new_attrs.push(attr_floats("base_values", &padded));
    }
    let name = node.display_name();
    let (label, scores) = (format!("{y}.pollen.label"), format!("{y}.pollen.scores"));
    let columns = format!("{y}.pollen.columns");
    let mut nodes = vec![node_proto(
        "TreeEnsembleClassifier",
        ML,
        &[x],
        &[&label, &scores],
        &format!("{name}.pollen.trees"),
        &new_attrs,
    )];
    let mut initializers = vec![tensor_proto(&TensorData {
        name: columns.clone(),
        dtype: DType::I64,
        shape: vec![targets as u64],
        data: (0..targets as i64).flat_map(|i| i.to_le_bytes()).collect(),
    })?];
    // Gather the targets' columns, then (AVERAGE) divide and add the base values.
    let mut steps: Vec<(&str, String, Vec<u8>)> = Vec::new();
    if average {
        let inverse = format!("{y}.pollen.inverse_trees");
        initializers.push(f32_tensor(&inverse, &[1.0 / trees as f32])?);
        steps.push(("Mul", inverse, Vec::new()));
        if let Some(b) = &base {
            let init = format!("{y}.pollen.base");
            initializers.push(f32_tensor(&init, b)?);
            steps.push(("Add", init, Vec::new()));
        }
    }
    steps.insert(0, ("Gather", columns, attr_int("axis", 1)));
    let mut current = scores;
    let last = steps.len() - 1;
    for (k, (op, operand, attr)) in steps.into_iter().enumerate() {
        let out = if k == last {
            y.clone()
        } else {
            format!("{y}.pollen.{}", op.to_lowercase())
        };
        let attrs: Vec<Vec<u8>> = Some(attr).into_iter().filter(|a| !a.is_empty()).collect();
        nodes.push(node_proto(
            op,
            "",
            &[&current, &operand],
            &[&out],
            &format!("{name}.pollen.{}", op.to_lowercase()),
            &attrs,
        ));
        current = out;
    }
    Some(Expansion {
        nodes,
        initializers,
        note: format!(
            "ai.onnx.ml TreeEnsembleRegressor '{name}' ({trees} trees, {targets} target(s)) \
             as TreeEnsembleClassifier and Gather"
        ),
    })
}

/// A two-class `TreeEnsembleClassifier` in tract's binary layout (every weight for one
/// class id, 0) with its label from `ArgMax` over the probabilities (see the module's doc).
fn binary_classifier_label(raw: &[u8], node: &Node, attrs: &[Attr<'_>]) -> Option<Expansion> {
    let [label, probabilities] = node.outputs.as_slice() else {
        return None;
    };
    if label.is_empty() || probabilities.is_empty() {
        return None;
    }
    let labels = ints(find(attrs, "classlabels_int64s")?)?;
    if labels.len() != 2 || find(attrs, "classlabels_strings").is_some() {
        return None;
    }
    if ints(find(attrs, "class_ids")?)?.iter().any(|c| *c != 0)
        || floats(find(attrs, "class_weights")?)?
            .iter()
            .any(|w| w.is_nan() || *w < 0.0)
    {
        return None;
    }
    let name = node.display_name();
    let unused = format!("{label}.pollen.tract_label");
    let (classes, winner) = (
        format!("{label}.pollen.classes"),
        format!("{label}.pollen.argmax"),
    );
    // The node as it is, its label output renamed (nothing reads it).
    let kept = with_first_name(raw, NODE_OUTPUT, &unused)?;
    let nodes = vec![
        kept,
        node_proto(
            "ArgMax",
            "",
            &[probabilities],
            &[&winner],
            &format!("{name}.pollen.argmax"),
            &[attr_int("axis", 1), attr_int("keepdims", 0)],
        ),
        node_proto(
            "Gather",
            "",
            &[&classes, &winner],
            &[label],
            &format!("{name}.pollen.label"),
            &[attr_int("axis", 0)],
        ),
    ];
    let initializers = vec![tensor_proto(&TensorData {
        name: classes,
        dtype: DType::I64,
        shape: vec![2],
        data: labels.iter().flat_map(|l| l.to_le_bytes()).collect(),
    })?];
    Some(Expansion {
        nodes,
        initializers,
        note: format!(
            "ai.onnx.ml TreeEnsembleClassifier '{name}' (two classes): label from ArgMax \
             over its probabilities (tract 0.23 takes it from the scores before its \
             two-class layout)"
        ),
    })
}

/// A `LinearClassifier` fed straight by a graph input of `features` features must hold
/// one row of coefficients per class (or one row for two classes, the binary form). A
/// file that does not is inconsistent: runtimes read its coefficients differently
/// (onnxruntime and tract give different answers to the same sample file), so it is
/// refused naming the numbers instead of failing its golden checks later.
pub(super) fn check_linear_classifier(
    raw: &[u8],
    node: &Node,
    features: u64,
) -> Result<(), String> {
    if node.domain != ML || node.op_type != "LinearClassifier" || features == 0 {
        return Ok(());
    }
    let Some(attrs) = attributes(raw) else {
        return Ok(());
    };
    let Some(coefficients) = find(&attrs, "coefficients").and_then(floats) else {
        return Ok(());
    };
    // LinearClassifier names its labels `classlabels_ints` or `classlabels_strings`.
    let classes = match (
        find(&attrs, "classlabels_ints"),
        find(&attrs, "classlabels_strings"),
    ) {
        (Some(a), _) => ints(a).map_or(0, |v| v.len()) as u64,
        (None, Some(a)) => a.fields.iter().filter(|f| f.num == 9).count() as u64,
        (None, None) => 0,
    };
    let n = coefficients.len() as u64;
    let rows_ok = n.is_multiple_of(features) && {
        let rows = n / features;
        rows == classes || (classes == 2 && rows == 1)
    };
    if classes == 0 || rows_ok {
        return Ok(());
    }
    Err(format!(
        "node '{}' (ai.onnx.ml:LinearClassifier): {n} coefficients for {classes} classes, \
         but its input '{}' has {features} features ({} expected); the file is \
         inconsistent, and runtimes read such a file differently: re-export the model",
        node.display_name(),
        node.inputs.first().map_or("", String::as_str),
        classes * features
    ))
}
