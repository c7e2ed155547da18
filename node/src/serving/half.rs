//! Weight matrices held as 16-bit floats: what a node does with a model whose file stores
//! its weights in 8 bits.
//!
//! tract 0.23 has no x86 kernel for a matrix product with 8-bit weights and float
//! activations, so the node folds an ONNX `DequantizeLinear` of int8 weights into float
//! weights when it prepares the graph ([`super::onnx::prepare`]). As 32-bit floats those
//! take four times the file's bytes, and a language model's decoding, which streams every
//! weight once per token, runs at float speed. tract does have kernels that take float16
//! weights against float32 activations (`f16f32` packing: the weights are widened in
//! registers and products accumulate in float32), so the node holds those weights as
//! float16 instead: half the memory and half the bytes read per token.
//!
//! Nothing of what the file says is lost: an int8 value times its scale rounds to float16
//! with a relative error of at most 2⁻¹¹, under a thousandth of the int8 step it came from.
//! The rule is per model (its file dequantises weights), and it takes every float weight
//! matrix that feeds only matrix products and row lookups (an embedding table, whose rows
//! are widened to float32 as they are gathered), so a float matrix the publisher left
//! beside the int8 ones is rounded to float16 too: the model is a quantised variant, and
//! its golden checks run on what the node serves.
//!
//! A matrix whose values are exactly the file's int8 values times a scale, read only by
//! products of the plain `x · w` form, is held as int8 instead, one byte per weight
//! ([`super::int8`]); float16 is for what that leaves.
//!
//! The rewrite is a tract model transform, registered under [`HALF_WEIGHTS`] and run
//! through the `tract` facade's `Model::transform`. It records how many matrices and bytes
//! it converted as model properties ([`CONVERTED`], [`CONVERTED_BYTES`], [`INT8`],
//! [`INT8_BYTES`]).

use tract_core::internal::*;
use tract_core::ops::array::Gather;
use tract_core::ops::cast::cast;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::konst::Const;
use tract_core::transform::ModelTransform;

use super::int8::{PackedMatrix, PackedProduct, ProductReading, product_form};

/// The transform's name in tract's registry.
pub const HALF_WEIGHTS: &str = "pollen_half_weights";
/// Model property: matrices converted (an `i64` scalar).
pub const CONVERTED: &str = "pollen.half_weights.matrices";
/// Model property: bytes the converted matrices take as float16 (an `i64` scalar).
pub const CONVERTED_BYTES: &str = "pollen.half_weights.bytes";
/// Model property: matrices held as int8 (an `i64` scalar).
pub const INT8: &str = "pollen.int8_weights.matrices";
/// Model property: bytes the int8 matrices take, scales included (an `i64` scalar).
pub const INT8_BYTES: &str = "pollen.int8_weights.bytes";

/// Smallest matrix converted, in elements: below it the saving is nothing and a
/// product's setup dominates.
const MIN_ELEMENTS: usize = 4096;

/// Largest magnitude float16 holds.
const F16_MAX: f32 = 65504.0;

/// Float32 constants of rank 2 or more, of at least [`MIN_ELEMENTS`] values, whose every
/// consumer is a float matrix product (`EinSum` without quantisation parameters) or a
/// `Gather` of their rows: a matrix of int8 values times scales read only by `x · w`
/// products ([`product_form`]) has those products replaced by [`PackedProduct`]s; any other
/// within float16's range becomes a float16 constant, the products keeping their float32
/// activations and outputs, and each `Gather` followed by a cast of its rows to float32.
#[derive(Debug, Default)]
pub struct HalfWeights;

impl ModelTransform for HalfWeights {
    fn name(&self) -> StaticName {
        HALF_WEIGHTS.into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        let mut matrices = 0i64;
        let mut bytes = 0i64;
        let (mut int8, mut int8_bytes) = (0i64, 0i64);
        let mut lookups = Vec::new();
        let mut int8_products = Vec::new();
        for id in 0..model.nodes.len() {
            let node = &model.nodes[id];
            let Some(k) = node.op_as::<Const>() else {
                continue;
            };
            let t = k.val();
            if t.datum_type() != f32::datum_type()
                || t.rank() < 2
                || t.len() < MIN_ELEMENTS
                || !t.is_plain()
            {
                continue;
            }
            let succ = &node.outputs[0].successors;
            let product = |s: &InletId| {
                model.nodes[s.node]
                    .op_as::<EinSum>()
                    .is_some_and(|e| e.q_params.is_none())
            };
            let lookup = |s: &InletId| s.slot == 0 && model.nodes[s.node].op_is::<Gather>();
            if succ.is_empty() || !succ.iter().all(|s| product(s) || lookup(s)) {
                continue;
            }
            if let Some((w, products)) = int8_matrix(model, t, succ)? {
                int8 += 1;
                int8_bytes += w.bytes() as i64;
                let w = Arc::new(w);
                int8_products.extend(products.into_iter().map(|p| (p, w.clone())));
                continue;
            }
            if !t
                .try_as_plain_ram()?
                .as_slice::<f32>()?
                .iter()
                .all(|v| v.abs() <= F16_MAX)
            {
                continue;
            }
            lookups.extend(succ.iter().filter(|s| lookup(s)).map(|s| s.node));
            let half = t.cast_to::<f16>()?.into_owned().into_arc_tensor();
            let op = Const::new(half)?;
            let fact = op.output_facts(&[])?.remove(0);
            bytes += (t.len() * 2) as i64;
            matrices += 1;
            model.nodes[id].op = Box::new(op);
            model.nodes[id].outputs[0].fact = fact;
        }
        wire_packed(model, int8_products)?;
        // A row lookup (an embedding) now gathers float16 rows: widened right after, so
        // what follows sees the float32 it saw.
        for id in lookups {
            let node = model.node(id).clone();
            let mut patch = TypedModelPatch::default();
            let inputs = patch.taps(model, &node.inputs)?;
            let rows = patch.wire_node(&node.name, node.op.clone(), &inputs)?;
            let widened = patch.wire_node(
                format!("{}.float32", node.name),
                cast(f32::datum_type()),
                &rows,
            )?;
            patch.shunt_outside(model, id.into(), widened[0])?;
            patch.apply(model)?;
        }
        model
            .properties
            .insert(CONVERTED.into(), rctensor0(matrices));
        model
            .properties
            .insert(CONVERTED_BYTES.into(), rctensor0(bytes));
        model.properties.insert(INT8.into(), rctensor0(int8));
        model
            .properties
            .insert(INT8_BYTES.into(), rctensor0(int8_bytes));
        Ok(())
    }
}

/// `t` as an int8 matrix, with the products that read it (node, its activations' outlet,
/// its reading), when every consumer in `succ` is an `x · w` product ([`product_form`])
/// reading `t` the same way, and `t` is int8 values times scales
/// ([`PackedMatrix::exact`]).
fn int8_matrix(
    model: &TypedModel,
    t: &Tensor,
    succ: &[InletId],
) -> TractResult<Option<(PackedMatrix, Products)>> {
    let Some(products) = products(model, t, succ)? else {
        return Ok(None);
    };
    let (matrix, k_axis) = products[0].2.matrix(t)?;
    Ok(PackedMatrix::exact(&matrix, k_axis).map(|w| (w, products)))
}

/// The products that read a constant: node, activations' outlet, reading.
type Products = Vec<(usize, OutletId, ProductReading)>;

/// The products that read `t`, when `t` has rank 2 or more and every consumer in `succ`
/// is an `x · w` product ([`product_form`]) of float32 activations that reads `t` the
/// same way (the same summed axes and axis of outputs).
fn products(model: &TypedModel, t: &Tensor, succ: &[InletId]) -> TractResult<Option<Products>> {
    if t.rank() < 2 || succ.is_empty() {
        return Ok(None);
    }
    let mut products: Products = Vec::new();
    for s in succ {
        let node = &model.nodes[s.node];
        let Some(e) = node.op_as::<EinSum>() else {
            return Ok(None);
        };
        if node.inputs.len() != 2 || s.slot > 1 {
            return Ok(None);
        }
        let x = node.inputs[1 - s.slot];
        let fact = model.outlet_fact(x)?;
        let Some(reading) = product_form(e, s.slot, fact.shape.dims()) else {
            return Ok(None);
        };
        let same = |p: &ProductReading| p.w_k == reading.w_k && p.w_n == reading.w_n;
        if fact.datum_type != f32::datum_type() || !products.iter().all(|p| same(&p.2)) {
            return Ok(None);
        }
        products.push((s.node, x, reading));
    }
    Ok(Some(products))
}

/// Replace `products`' nodes by [`PackedProduct`]s of `w`, each behind the axis changes
/// that prepare its activations.
fn wire_packed(
    model: &mut TypedModel,
    products: Vec<((usize, OutletId, ProductReading), Arc<PackedMatrix>)>,
) -> TractResult<()> {
    for ((id, x, reading), w) in products {
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::default();
        let mut x = patch.tap_model(model, x)?;
        for (i, op) in reading.x_prep.into_iter().enumerate() {
            x = patch.wire_node(format!("{name}.prepare.{i}"), op, &[x])?[0];
        }
        let y = patch.wire_node(
            name,
            PackedProduct {
                w,
                form: reading.form,
            },
            &[x],
        )?;
        patch.shunt_outside(model, id.into(), y[0])?;
        patch.apply(model)?;
    }
    Ok(())
}

register_simple_model_transform!("pollen_half_weights", HalfWeights);

/// The transform's name in tract's registry.
pub const FLOAT_WEIGHTS: &str = "pollen_float_weights";
/// Model property: float32 matrices packed for [`PackedProduct`]s (an `i64` scalar).
pub const FLOAT: &str = "pollen.float_weights.matrices";
/// Model property: bytes they take (an `i64` scalar).
pub const FLOAT_BYTES: &str = "pollen.float_weights.bytes";

/// For a language model in float32: every float32 constant of rank 2 or more and at least
/// [`MIN_ELEMENTS`] values read only by `x · w` products ([`product_form`]) has them
/// replaced by [`PackedProduct`]s of the same float32 weights, so that a decoding step's
/// matrix-vector products split across the generation's threads on a spinning team
/// ([`super::team`]) rather than on tract's pool, whose sleeping threads each product
/// would wake. The weights and what is computed do not change, only the order of each
/// sum's float32 additions.
#[derive(Debug, Default)]
pub struct FloatWeights;

impl ModelTransform for FloatWeights {
    fn name(&self) -> StaticName {
        FLOAT_WEIGHTS.into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        let (mut count, mut bytes) = (0i64, 0i64);
        let mut packed = Vec::new();
        for id in 0..model.nodes.len() {
            let node = &model.nodes[id];
            let Some(k) = node.op_as::<Const>() else {
                continue;
            };
            let t = k.val();
            if t.datum_type() != f32::datum_type() || t.len() < MIN_ELEMENTS || !t.is_plain() {
                continue;
            }
            let Some(products) = products(model, t, &node.outputs[0].successors)? else {
                continue;
            };
            let (matrix, k_axis) = products[0].2.matrix(t)?;
            let Some(w) = PackedMatrix::float(&matrix, k_axis) else {
                continue;
            };
            count += 1;
            bytes += w.bytes() as i64;
            let w = Arc::new(w);
            packed.extend(products.into_iter().map(|p| (p, w.clone())));
        }
        wire_packed(model, packed)?;
        model.properties.insert(FLOAT.into(), rctensor0(count));
        model
            .properties
            .insert(FLOAT_BYTES.into(), rctensor0(bytes));
        Ok(())
    }
}

register_simple_model_transform!("pollen_float_weights", FloatWeights);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `y = x · w` with `x` `[1, k]` from the caller and `w` `[k, n]` a constant.
    fn product(w: Tensor, also_added: bool) -> TractResult<TypedModel> {
        let (k, w_cols) = (w.shape()[0], w.shape()[1]);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, k]))?;
        let w = model.add_const("w", w)?;
        let mut y = model.wire_node(
            "mm",
            EinSum::new("mk,kn->mn".parse()?, f32::datum_type()),
            &[x, w],
        )?;
        if also_added {
            // The same constant also read by something other than a product (with a
            // caller's input, so the sum is not folded into a constant).
            let z = model.add_source("z", f32::fact([k, w_cols]))?;
            let sum = model.wire_node("sum", tract_core::ops::math::add(), &[w, z])?;
            y.push(sum[0]);
        }
        model.select_output_outlets(&y)?;
        model.into_decluttered()
    }

    /// Float weights that are not int8 values times a scale (which [`super::int8`] takes).
    fn weights(k: usize, n: usize, scale: f32) -> Tensor {
        let v: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919 % 255) as f32 - 127.3) * scale)
            .collect();
        Tensor::from_shape(&[k, n], &v).unwrap()
    }

    /// A count [`HalfWeights`] recorded.
    fn property(model: &TypedModel, name: &str) -> i64 {
        *model.properties[name]
            .try_as_plain_ram()
            .unwrap()
            .to_scalar::<i64>()
            .unwrap()
    }

    fn const_types(model: &TypedModel) -> Vec<DatumType> {
        model
            .nodes
            .iter()
            .filter_map(|n| n.op_as::<Const>())
            .map(|c| c.val().datum_type())
            .collect()
    }

    /// `model`'s first output for `x`, optimised as the node runs it.
    pub(crate) fn run(model: TypedModel, x: &Tensor) -> Vec<f32> {
        let out = model
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(tvec!(x.clone().into_tvalue()))
            .unwrap();
        out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_product_s_weights_become_half_and_its_answers_stay_within_float16_rounding() {
        let (k, n) = (256, 64);
        let x: Vec<f32> = (0..k).map(|i| ((i % 13) as f32 - 6.0) / 6.0).collect();
        let x = Tensor::from_shape(&[1, k], &x).unwrap();
        let w = weights(k, n, 0.01);
        let float = run(product(w.clone(), false).unwrap(), &x);
        let mut model = product(w, false).unwrap();
        HalfWeights.transform(&mut model).unwrap();
        assert_eq!(const_types(&model), vec![f16::datum_type()]);
        assert_eq!(property(&model, CONVERTED), 1);
        assert_eq!(property(&model, CONVERTED_BYTES), (k * n * 2) as i64);
        // The product still gives float32.
        assert_eq!(model.output_fact(0).unwrap().datum_type, f32::datum_type());
        let half = run(model, &x);
        let scale = float.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in float.iter().zip(&half) {
            // k products, each weight off by at most 2^-11 of itself.
            assert!((a - b).abs() <= 1e-3 * scale, "{a} against {b}");
        }
    }

    #[test]
    fn a_lookup_table_becomes_half_and_its_rows_are_widened_back_to_float32() -> TractResult<()> {
        let table = weights(512, 16, 0.01);
        let mut model = TypedModel::default();
        let ids = model.add_source("ids", i64::fact([3]))?;
        let t = model.add_const("table", table.clone())?;
        let rows = model.wire_node("rows", Gather::new(0), &[t, ids])?;
        model.select_output_outlets(&rows)?;
        let model = model.into_decluttered()?;
        let ids = tensor1(&[0i64, 7, 511]);
        let float = run(model.clone(), &ids);
        let mut half = model;
        HalfWeights.transform(&mut half)?;
        half.declutter()?;
        assert_eq!(const_types(&half), vec![f16::datum_type()]);
        assert_eq!(half.output_fact(0)?.datum_type, f32::datum_type());
        let got = run(half, &ids);
        assert_eq!(float.len(), got.len());
        for (a, b) in float.iter().zip(&got) {
            assert!((a - b).abs() <= a.abs() / 2048.0, "{a} against {b}");
        }
        Ok(())
    }

    #[test]
    fn weights_read_by_anything_but_a_product_or_out_of_float16_range_stay_float32() {
        let mut shared = product(weights(256, 64, 0.01), true).unwrap();
        HalfWeights.transform(&mut shared).unwrap();
        assert_eq!(const_types(&shared), vec![f32::datum_type()]);
        assert_eq!(property(&shared, CONVERTED), 0);

        let mut large = product(weights(256, 64, 1000.0), false).unwrap();
        HalfWeights.transform(&mut large).unwrap();
        assert_eq!(const_types(&large), vec![f32::datum_type()]);

        let mut small = product(weights(16, 16, 0.01), false).unwrap();
        HalfWeights.transform(&mut small).unwrap();
        assert_eq!(const_types(&small), vec![f32::datum_type()]);
    }
}
