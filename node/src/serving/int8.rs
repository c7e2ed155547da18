//! Weight matrices held as int8: the matrix product of float activations with the
//! 8-bit weights a model's file stores (and, for a float32 language model, with its
//! float32 weights, packed the same way: [`super::half::FloatWeights`]).
//!
//! A quantised variant's file stores each weight matrix as int8 values and a float scale
//! per output (`DequantizeLinear` before a `MatMul`), which the node folds into float
//! weights when it prepares the graph ([`super::onnx::prepare`]). tract 0.23 has no x86
//! kernel for a product of 8-bit weights with float activations, and a language model's
//! decoding streams every weight once per token, so its speed is the bytes per weight:
//! float16 ([`super::half`]) reads two, this op reads one.
//!
//! The node recovers the int8 values from the folded floats, exactly
//! ([`PackedMatrix::exact`]): a matrix qualifies only when every value is an integer in
//! [-127, 127] times its row's scale (or one scale for the whole matrix), to float32
//! rounding; anything else (asymmetric zero points, float weights) is left to
//! [`super::half`]. The product then computes what the file says:
//!
//! * one row of activations (a decoding step): `y[n] = s[n] · Σₖ x[k] · q[n][k]`, the
//!   int8 values widened to float32 in registers (AVX2 and FMA where the CPU has them,
//!   portable code elsewhere), accumulated in float32;
//! * several rows (a prompt): each block of weight rows is widened once to the float32
//!   weights `q · s` and multiplied with every activation row.
//!
//! Rows are split across the generation's threads: for one activation row by output, on a
//! [`Team`] whose helpers spin between products; for several by output too, on tract's
//! rayon pool ([`tract_linalg::multithread`]). Each output's sum runs in one thread in a
//! fixed order, so the answer does not depend on the thread count.

use std::sync::{Arc, Mutex};

use tract_core::internal::*;
use tract_core::ops::einsum::EinSum;
use tract_linalg::multithread::Executor;

use super::team::Team;

/// Multiply-accumulates from which a decoding step's product is split across the
/// generation's threads ([`Team`]): below it (under 64 KiB of weights, a few
/// microseconds) a split costs more than it saves.
const TEAM_MACS: usize = 1 << 16;

/// Parts a decoding step's product is cut into per thread: enough that a thread that
/// starts late takes fewer, few enough that taking one costs nothing.
const PARTS_PER_THREAD: usize = 4;

/// Largest int8 magnitude a symmetric quantiser uses.
const Q_MAX: f32 = 127.0;

/// Relative difference within which a float weight counts as its int8 value times its
/// scale: a few float32 roundings (the fold's product, and the scale recovered here).
const EXACT: f32 = 1.0 / (1 << 20) as f32;

/// Weights read in one step of a kernel: 16 consecutive values of each of four rows.
const STEP: usize = 16;
/// Rows a kernel reads side by side.
const GROUP: usize = 4;

/// One cache line of weights: [`STEP`] values of each row of a group, row after row.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lanes<T>([T; STEP * GROUP]);

/// One cache line of int8 weights.
type Line = Lanes<i8>;
/// Sixteen float32 weights of each row of a group: four cache lines.
type FloatLine = Lanes<f32>;

/// The values `value(n, k)` of a `rows` × `depth` matrix in the kernels' order: group
/// `g`, step `c` at `g * steps + c` (`steps` = `depth` in steps, rounded up), zeros past
/// the last row and the depth.
fn pack<T: Copy + Default>(
    rows: usize,
    depth: usize,
    value: impl Fn(usize, usize) -> T,
) -> Vec<Lanes<T>> {
    let steps = depth.div_ceil(STEP);
    let mut lines = vec![Lanes([T::default(); STEP * GROUP]); rows.div_ceil(GROUP) * steps];
    for n in 0..rows {
        let (g, r) = (n / GROUP, n % GROUP);
        for k in 0..depth {
            lines[g * steps + k / STEP].0[r * STEP + k % STEP] = value(n, k);
        }
    }
    lines
}

/// A rank-2 float32 tensor read as rows of weights: output `n` at depth `k`.
struct Rows<'a> {
    v: &'a [f32],
    rows: usize,
    depth: usize,
    k_axis: usize,
}

impl Rows<'_> {
    /// The weight of output `n` at depth `k`.
    #[inline]
    fn at(&self, n: usize, k: usize) -> f32 {
        if self.k_axis == 0 {
            self.v[k * self.rows + n]
        } else {
            self.v[n * self.depth + k]
        }
    }
}

/// `f` of `w` read as [`Rows`] summed over its axis `k_axis`; `None` unless `w` is a
/// rank-2 float32 tensor.
fn with_rows<R>(w: &Tensor, k_axis: usize, f: impl FnOnce(&Rows<'_>) -> Option<R>) -> Option<R> {
    if w.datum_type() != f32::datum_type() || w.rank() != 2 || k_axis > 1 {
        return None;
    }
    let plain = w.try_as_plain_ram().ok()?;
    f(&Rows {
        v: plain.as_slice::<f32>().ok()?,
        rows: w.shape()[1 - k_axis],
        depth: w.shape()[k_axis],
        k_axis,
    })
}

/// A weight matrix's values: int8 with a float32 scale per output row, or float32.
#[derive(Clone)]
enum Values {
    Int8 { lines: Vec<Line>, scales: Vec<f32> },
    Float(Vec<FloatLine>),
}

/// A weight matrix as int8 values and a float32 scale per output row, or as float32.
///
/// The values are stored in the order the decoding kernel reads them, one stream: rows
/// in groups of [`GROUP`], each group a run of cache lines ([`Line`]) of [`STEP`] values
/// per row; a last partial group and the depth past the last whole step are padded with
/// zeros.
#[derive(Clone)]
pub struct PackedMatrix {
    /// Outputs (`n`).
    rows: usize,
    /// Inputs summed over (`k`).
    depth: usize,
    /// Lines per group: the depth in steps, rounded up.
    steps: usize,
    /// Group `g`, step `c` at `g * steps + c`.
    values: Values,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix({}x{})", self.rows, self.depth)
    }
}

impl PackedMatrix {
    /// The int8 matrix whose values times their scales are `w` (rank 2, float32), summed
    /// over its axis `k_axis`, with a scale per output row, or else one for the whole
    /// matrix; `None` when `w` is not such a matrix to float32 rounding. The scale is the
    /// largest magnitude over 127, as a symmetric quantiser chose it.
    pub fn exact(w: &Tensor, k_axis: usize) -> Option<PackedMatrix> {
        with_rows(w, k_axis, |w| {
            let (rows, depth, at) = (w.rows, w.depth, |n, k| w.at(n, k));
            // Whether row `n` is int8 values times `scale`.
            let exact_row = |n: usize, scale: f32| {
                (0..depth).all(|k| {
                    let x = at(n, k);
                    let i = quantised(x, scale);
                    !i.is_nan() && i.abs() <= Q_MAX && (i * scale - x).abs() <= x.abs() * EXACT
                })
            };
            let amax = |n: usize| (0..depth).fold(0f32, |m, k| m.max(at(n, k).abs()));
            let mut scales: Vec<f32> = (0..rows).map(|n| amax(n) / Q_MAX).collect();
            if !(0..rows).all(|n| exact_row(n, scales[n])) {
                let scale = scales.iter().fold(0f32, |m, s| m.max(*s));
                if !(0..rows).all(|n| exact_row(n, scale)) {
                    return None;
                }
                scales.fill(scale);
            }
            if !(0..rows).all(|n| (0..depth).all(|k| at(n, k).is_finite())) {
                return None;
            }
            let lines = pack(rows, depth, |n, k| quantised(at(n, k), scales[n]) as i8);
            Some(PackedMatrix {
                rows,
                depth,
                steps: depth.div_ceil(STEP),
                values: Values::Int8 { lines, scales },
            })
        })
    }

    /// `w` (rank 2, float32) as it is, summed over its axis `k_axis`.
    pub fn float(w: &Tensor, k_axis: usize) -> Option<PackedMatrix> {
        with_rows(w, k_axis, |w| {
            Some(PackedMatrix {
                rows: w.rows,
                depth: w.depth,
                steps: w.depth.div_ceil(STEP),
                values: Values::Float(pack(w.rows, w.depth, |n, k| w.at(n, k))),
            })
        })
    }

    /// Bytes held: the values (padding included) and the scales.
    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::Int8 { lines, scales } => {
                lines.len() * std::mem::size_of::<Line>() + scales.len() * 4
            }
            Values::Float(lines) => lines.len() * std::mem::size_of::<FloatLine>(),
        }
    }

    /// The int8 value of row `n` at depth `k`.
    #[cfg(test)]
    fn value(&self, n: usize, k: usize) -> i8 {
        match &self.values {
            Values::Int8 { lines, .. } => {
                lines[n / GROUP * self.steps + k / STEP].0[n % GROUP * STEP + k % STEP]
            }
            Values::Float(_) => panic!("float values"),
        }
    }

    /// The lines and scales of int8 values.
    #[cfg(test)]
    fn int8(&self) -> (&[Line], &[f32]) {
        match &self.values {
            Values::Int8 { lines, scales } => (lines, scales),
            Values::Float(_) => panic!("float values"),
        }
    }

    /// The weights of group `g`'s rows into `panel` (rows `stride` apart, `stride` at
    /// least the padded depth), as float32: `q · s` for int8.
    fn widen_group(&self, g: usize, panel: &mut [f32], stride: usize) {
        let lines = g * self.steps..(g + 1) * self.steps;
        for r in 0..GROUP {
            let row = &mut panel[r * stride..][..self.steps * STEP];
            match &self.values {
                Values::Int8 { lines: l, scales } => {
                    let s = scales.get(g * GROUP + r).copied().unwrap_or(0.0);
                    for (c, line) in l[lines.clone()].iter().enumerate() {
                        let values = &line.0[r * STEP..(r + 1) * STEP];
                        for (d, &v) in row[c * STEP..][..STEP].iter_mut().zip(values) {
                            *d = v as f32 * s;
                        }
                    }
                }
                Values::Float(l) => {
                    for (c, line) in l[lines.clone()].iter().enumerate() {
                        row[c * STEP..][..STEP].copy_from_slice(&line.0[r * STEP..(r + 1) * STEP]);
                    }
                }
            }
        }
    }

    /// `out` = the products of `x` (padded to whole steps) with the rows of groups
    /// `groups` (a value per row of those groups).
    fn decode(&self, x: &[f32], groups: std::ops::Range<usize>, out: &mut [f32]) {
        let first = groups.start;
        let lines = groups.start * self.steps..groups.end * self.steps;
        match &self.values {
            Values::Int8 { lines: l, scales } => {
                decode_groups(x, &l[lines], self.steps, out);
                for (y, s) in out.iter_mut().zip(&scales[first * GROUP..]) {
                    *y *= s;
                }
            }
            Values::Float(l) => decode_float_groups(x, &l[lines], self.steps, out),
        }
    }
}

/// `x / scale` rounded: the int8 value of weight `x` (0 for a zero scale).
fn quantised(x: f32, scale: f32) -> f32 {
    if scale == 0.0 {
        0.0
    } else {
        (x / scale).round()
    }
}

/// How an `x · w` product lays out its operands and output ([`product_form`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductForm {
    /// The axis of the weights (as a matrix, [`ProductReading::matrix`]) summed over (the
    /// other is the output's last).
    pub k_axis: usize,
    /// For each output axis but the last: the (prepared) activations' axis whose length it
    /// has, or `None` for an axis of length 1 the product adds.
    pub out: TVec<Option<usize>>,
}

impl ProductForm {
    /// The output's shape for activations of shape `x` and `n` outputs.
    fn shape<D: DimLike>(&self, x: &[D], n: usize) -> TVec<D> {
        let mut shape: TVec<D> = self
            .out
            .iter()
            .map(|a| a.map_or(D::one(), |i| x[i].clone()))
            .collect();
        shape.push(D::from(n));
        shape
    }
}

/// An `x · w` product as [`product_form`] reads it: the weights as a matrix, and how the
/// activations are brought to `[.., k]` before a [`PackedProduct`] with [`Self::form`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductReading {
    /// The weights' axes summed over, in the order their values run along a row of the
    /// matrix (one for a matrix; several where tract folded a reshape of the activations
    /// into the weights, as it does with attention's heads before the output projection).
    pub w_k: TVec<usize>,
    /// The weights' axis of outputs.
    pub w_n: usize,
    /// Axis moves, then at most one reshape, that lay the activations out as `[.., k]`
    /// with `k` their summed axes in `w_k`'s order, merged; empty when they already are.
    pub x_prep: TVec<AxisOp>,
    /// The product on the prepared activations.
    pub form: ProductForm,
}

impl ProductReading {
    /// `w` (whose layout this reading describes) as a matrix of rank 2 and the axis of it
    /// summed over: `w` itself when it has rank 2, else its summed axes in `w_k`'s order
    /// merged into the first and its outputs the second.
    pub fn matrix(&self, w: &Tensor) -> TractResult<(Tensor, usize)> {
        if w.rank() == 2 {
            return Ok((w.clone(), self.form.k_axis));
        }
        let order: TVec<usize> = self.w_k.iter().copied().chain([self.w_n]).collect();
        let depth: usize = self.w_k.iter().map(|&a| w.shape()[a]).product();
        let moved = w.clone().permute_axes(&order)?;
        Ok((moved.into_shape(&[depth, w.shape()[self.w_n]])?, 0))
    }
}

/// The layout of `product`, whose input `w_slot` is a constant, when it is
/// `y[.., n] = Σₖ x[.., k] · w[k, n]` in float32 up to the layout of its axes: `n` is one
/// axis of the weights and the output's last; every other axis of the weights is summed
/// with one of the activations (the depth `k` is those axes together); every other axis of
/// the activations passes to the output in its order or, of length 1 in `x_shape`, is
/// dropped; the output may add axes of length 1. tract's decluttering folds such unit
/// axes and reshapes into its products. Once prepared ([`ProductReading::x_prep`]), the
/// activations are row-major `[m, k]` and the output `[m, n]`. `None` for any other
/// product (a batch axis in the weights, a transposed output, quantised operands).
pub fn product_form(product: &EinSum, w_slot: usize, x_shape: &[TDim]) -> Option<ProductReading> {
    let axes = &product.axes;
    let x_rank = x_shape.len();
    if product.q_params.is_some()
        || product.operating_dt != f32::datum_type()
        || w_slot > 1
        || x_rank == 0
        || axes.input_count() != 2
        || axes.output_count() != 1
    {
        return None;
    }
    let x_slot = 1 - w_slot;
    let y_rank = axes.rank(InOut::Out(0));
    let last_y = y_rank.checked_sub(1)?;
    // Summed axes (weights', activations'), the weights' output axis, passed axes
    // (activations', output's).
    let mut ks: Vec<(usize, usize)> = Vec::new();
    let mut w_n = None;
    let mut passed = Vec::new();
    for axis in axes.iter_all_axes() {
        let (x, w, y) = (
            axis.inputs[x_slot].as_slice(),
            axis.inputs[w_slot].as_slice(),
            axis.outputs[0].as_slice(),
        );
        match (x, w, y) {
            ([xp], [wp], []) => ks.push((*wp, *xp)),
            ([], [wp], [yp]) if *yp == last_y && w_n.is_none() => w_n = Some(*wp),
            ([xp], [], [yp]) if *yp < last_y => passed.push((*xp, *yp)),
            ([xp], [], []) if x_shape[*xp].is_one() => {}
            ([], [], [yp]) if *yp < last_y => {}
            _ => return None,
        }
    }
    let w_n = w_n?;
    if ks.is_empty() {
        return None;
    }
    // The passed axes keep their order, so the rows of `x` are the rows of `y`.
    passed.sort_unstable();
    if !passed.windows(2).all(|p| p[0].1 < p[1].1) {
        return None;
    }
    ks.sort_unstable();
    let summed = |a: usize| ks.iter().any(|k| k.1 == a);
    // The activations' axes once prepared: the others in their order, then the summed
    // ones in the weights' order.
    let rest: Vec<usize> = (0..x_rank).filter(|&a| !summed(a)).collect();
    let target: Vec<usize> = rest.iter().copied().chain(ks.iter().map(|k| k.1)).collect();
    let mut x_prep = TVec::new();
    let mut now: Vec<usize> = (0..x_rank).collect();
    for (to, a) in target.iter().enumerate() {
        let from = now.iter().position(|c| c == a)?;
        if from != to {
            x_prep.push(AxisOp::Move(from, to));
            let moved = now.remove(from);
            now.insert(to, moved);
        }
    }
    if ks.len() > 1 {
        let from: TVec<TDim> = ks.iter().map(|k| x_shape[k.1].clone()).collect();
        let depth: TDim = from.iter().product();
        x_prep.push(AxisOp::Reshape(rest.len(), from, tvec![depth]));
    }
    let mut out: TVec<Option<usize>> = tvec![None; last_y];
    for (xp, yp) in passed {
        out[yp] = Some(rest.iter().position(|&a| a == xp)?);
    }
    let k_axis = if ks.len() == 1 { ks[0].0 } else { 0 };
    Some(ProductReading {
        w_k: ks.iter().map(|k| k.0).collect(),
        w_n,
        x_prep,
        form: ProductForm { k_axis, out },
    })
}

/// `y[.., n] = Σₖ x[.., k] · w[n, k]` with `w` an [`PackedMatrix`]: float32 in and out, the
/// output laid out as `form` says.
#[derive(Clone, Debug)]
pub struct PackedProduct {
    pub w: Arc<PackedMatrix>,
    pub form: ProductForm,
}

impl PartialEq for PackedProduct {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.w, &other.w) && self.form == other.form
    }
}

impl Eq for PackedProduct {}

impl Op for PackedProduct {
    fn name(&self) -> StaticName {
        "PollenPackedProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let kind = match self.w.values {
            Values::Int8 { .. } => "int8",
            Values::Float(_) => "float32",
        };
        Ok(vec![format!("{}x{} {kind}", self.w.rows, self.w.depth)])
    }

    op_as_typed_op!();
}

impl EvalOp for PackedProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let w = &*self.w;
        ensure!(
            x.datum_type() == f32::datum_type() && x.rank() >= 1,
            "PollenPackedProduct takes float32 activations, not {:?} of rank {}",
            x.datum_type(),
            x.rank()
        );
        ensure!(
            x.shape()[x.rank() - 1] == w.depth,
            "PollenPackedProduct: activations of {:?} against weights of depth {}",
            x.shape(),
            w.depth
        );
        let shape = self.form.shape(x.shape(), w.rows);
        let mut y = Tensor::zero::<f32>(&shape)?;
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        {
            let mut ys = y.try_as_plain_ram_mut()?;
            let ys = ys.as_slice_mut::<f32>()?;
            product(w, xs, ys)?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for PackedProduct {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(x.datum_type == f32::datum_type() && x.rank() >= 1);
        ensure!(x.shape[x.rank() - 1] == self.w.depth.to_dim());
        ensure!(self.form.out.iter().flatten().all(|&a| a < x.rank() - 1));
        Ok(tvec!(f32::fact(
            self.form.shape(x.shape.dims(), self.w.rows)
        )))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let x = inputs[0];
        let rows_of_x: TDim = x.shape.iter().take(x.rank() - 1).product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            rows_of_x * (self.w.rows * self.w.depth)
        )))
    }
}

/// `ys` (`[m, rows]`) from `xs` (`[m, depth]`), split across the current tract executor's
/// threads.
fn product(w: &PackedMatrix, xs: &[f32], ys: &mut [f32]) -> TractResult<()> {
    if w.depth == 0 || w.rows == 0 {
        return Ok(());
    }
    let m = xs.len() / w.depth;
    let padded = w.steps * STEP;
    if m == 1 {
        // The activations padded to whole steps, the outputs to whole groups.
        let mut x = vec![0f32; padded];
        x[..w.depth].copy_from_slice(xs);
        let groups = w.rows.div_ceil(GROUP);
        let mut sums = vec![0f32; groups * GROUP];
        let threads = match tract_linalg::multithread::current_tract_executor() {
            Executor::MultiThread(pool) => pool.current_num_threads(),
            _ => 1,
        };
        if threads <= 1 || w.rows * w.depth < TEAM_MACS {
            w.decode(&x, 0..groups, &mut sums);
        } else {
            // Contiguous runs of groups, PARTS_PER_THREAD per thread, taken as threads
            // come free.
            let per = groups.div_ceil(threads * PARTS_PER_THREAD);
            let shares: Vec<Mutex<&mut [f32]>> =
                sums.chunks_mut(per * GROUP).map(Mutex::new).collect();
            Team::global().run(threads, shares.len(), &|part| {
                let mut out = shares[part].lock().unwrap_or_else(|e| e.into_inner());
                let first = part * per;
                w.decode(&x, first..first + out.len() / GROUP, &mut out);
            });
        }
        ys.copy_from_slice(&sums[..w.rows]);
        Ok(())
    } else {
        // Group-major, so that each thread widens only its own groups.
        let groups = w.rows.div_ceil(GROUP);
        let mut sums = vec![0f32; groups * m * GROUP];
        tract_linalg::multithread::par_chunks_mut(
            &mut sums,
            m * GROUP,
            m * w.rows * w.depth,
            |first, out| {
                prompt_groups(w, xs, first, out);
                Ok(())
            },
        )?;
        for (g, block) in sums.chunks_exact(m * GROUP).enumerate() {
            let take = GROUP.min(w.rows - g * GROUP);
            for (i, row) in block.chunks_exact(GROUP).enumerate() {
                ys[i * w.rows + g * GROUP..][..take].copy_from_slice(&row[..take]);
            }
        }
        Ok(())
    }
}

/// The sums `Σₖ x[k] · q[n][k]` of the rows of `lines` (whole groups, `steps` lines
/// each) into `out` (a value per row of those groups); `x` holds `steps · STEP` values.
#[allow(unsafe_code)] // calls the AVX2 kernel once the CPU is known to have it
fn decode_groups(x: &[f32], lines: &[Line], steps: usize, out: &mut [f32]) {
    assert!(x.len() >= steps * STEP && lines.len() * GROUP >= out.len() * steps);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the sizes are as asserted.
        unsafe { avx2::decode(x, lines, steps, out) };
        return;
    }
    portable_decode(x, lines, steps, out);
}

/// [`decode_groups`] on any CPU.
fn portable_decode(x: &[f32], lines: &[Line], steps: usize, out: &mut [f32]) {
    for (g, sums) in out.chunks_exact_mut(GROUP).enumerate() {
        let group = &lines[g * steps..(g + 1) * steps];
        for (r, sum) in sums.iter_mut().enumerate() {
            // Two accumulators of eight lanes, as the vector kernel sums.
            let mut acc = [[0f32; 8]; 2];
            for (c, line) in group.iter().enumerate() {
                for (h, lanes) in acc.iter_mut().enumerate() {
                    for (l, lane) in lanes.iter_mut().enumerate() {
                        let j = h * 8 + l;
                        *lane += x[c * STEP + j] * line.0[r * STEP + j] as f32;
                    }
                }
            }
            *sum = (0..8).map(|l| acc[0][l] + acc[1][l]).sum();
        }
    }
}

/// [`decode_groups`] for float32 weights.
#[allow(unsafe_code)] // calls the AVX2 kernel once the CPU is known to have it
fn decode_float_groups(x: &[f32], lines: &[FloatLine], steps: usize, out: &mut [f32]) {
    assert!(x.len() >= steps * STEP && lines.len() * GROUP >= out.len() * steps);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the sizes are as asserted.
        unsafe { avx2::decode_float(x, lines, steps, out) };
        return;
    }
    for (g, sums) in out.chunks_exact_mut(GROUP).enumerate() {
        let group = &lines[g * steps..(g + 1) * steps];
        for (r, sum) in sums.iter_mut().enumerate() {
            let mut acc = [[0f32; 8]; 2];
            for (c, line) in group.iter().enumerate() {
                for (h, lanes) in acc.iter_mut().enumerate() {
                    for (l, lane) in lanes.iter_mut().enumerate() {
                        let j = h * 8 + l;
                        *lane += x[c * STEP + j] * line.0[r * STEP + j];
                    }
                }
            }
            *sum = (0..8).map(|l| acc[0][l] + acc[1][l]).sum();
        }
    }
}

/// Activation rows `xs` (`[m, depth]`) against the groups of weight rows from `first`,
/// into `out` (per group, `[m, GROUP]`): each group widened once to float32 (`q · s`, the
/// file's weights) and passed by every activation row while it sits in the first-level
/// cache.
fn prompt_groups(w: &PackedMatrix, xs: &[f32], first: usize, out: &mut [f32]) {
    let k = w.depth;
    let m = xs.len() / k;
    let stride = w.steps * STEP;
    let mut panel = vec![0f32; GROUP * stride];
    for (g, block) in out.chunks_exact_mut(m * GROUP).enumerate() {
        w.widen_group(first + g, &mut panel, stride);
        let mut i = 0;
        while i < m {
            let pair = (i + 1 < m) as usize;
            let x0 = &xs[i * k..(i + 1) * k];
            let x1 = &xs[(i + pair) * k..(i + pair + 1) * k];
            let dots = tile(x0, x1, &panel, k, stride);
            block[i * GROUP..][..GROUP].copy_from_slice(&dots[0]);
            if pair == 1 {
                block[(i + 1) * GROUP..][..GROUP].copy_from_slice(&dots[1]);
            }
            i += 1 + pair;
        }
    }
}

/// The dots of activation rows `x0` and `x1` (`k` values) with the [`GROUP`] rows of
/// `panel` (`stride` apart).
#[allow(unsafe_code)] // calls a vector kernel once the CPU is known to have it
fn tile(x0: &[f32], x1: &[f32], panel: &[f32], k: usize, stride: usize) -> [[f32; GROUP]; 2] {
    assert!(x0.len() >= k && x1.len() >= k && stride >= k && panel.len() >= GROUP * stride);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the sizes are as asserted.
        return unsafe { avx512::tile(x0, x1, panel, k, stride) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the sizes are as asserted.
        return unsafe { avx2::tile(x0, x1, panel, k, stride) };
    }
    let dot = |x: &[f32], r: usize| -> f32 {
        let w = &panel[r * stride..r * stride + k];
        let mut lanes = [0f32; 8];
        let (xc, wc) = (x[..k].chunks_exact(8), w.chunks_exact(8));
        let tail: f32 = xc
            .remainder()
            .iter()
            .zip(wc.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (xs, ws) in xc.zip(wc) {
            for l in 0..8 {
                lanes[l] += xs[l] * ws[l];
            }
        }
        lanes.iter().sum::<f32>() + tail
    };
    [
        std::array::from_fn(|r| dot(x0, r)),
        std::array::from_fn(|r| dot(x1, r)),
    ]
}

/// A prompt's tile in AVX-512 (x86-64 servers): twice the products per instruction of
/// [`avx2::tile`], as tract's own kernels use where the CPU has it.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics and raw-pointer loads within checked bounds
mod avx512 {
    use super::GROUP;
    use std::arch::x86_64::*;

    /// [`super::avx2::tile`] sixteen lanes wide.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x0`, `x1` hold `k` values, `panel` four rows of `k`
    /// `stride` apart.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        x0: &[f32],
        x1: &[f32],
        panel: &[f32],
        k: usize,
        stride: usize,
    ) -> [[f32; GROUP]; 2] {
        assert!(x0.len() >= k && x1.len() >= k && stride >= k && panel.len() >= GROUP * stride);
        let body = k - k % 16;
        let rows = [0, 1, 2, 3].map(|i| panel[i * stride..].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); GROUP]; 2];
        let mut j = 0;
        while j < body {
            // SAFETY: j + 16 <= body <= k, within each slice and row.
            let xs = unsafe {
                [
                    _mm512_loadu_ps(x0.as_ptr().add(j)),
                    _mm512_loadu_ps(x1.as_ptr().add(j)),
                ]
            };
            for r in 0..GROUP {
                let w = unsafe { _mm512_loadu_ps(rows[r].add(j)) };
                acc[0][r] = _mm512_fmadd_ps(xs[0], w, acc[0][r]);
                acc[1][r] = _mm512_fmadd_ps(xs[1], w, acc[1][r]);
            }
            j += 16;
        }
        let mut out = [[0f32; GROUP]; 2];
        for (i, x) in [x0, x1].into_iter().enumerate() {
            for r in 0..GROUP {
                let mut s = _mm512_reduce_add_ps(acc[i][r]);
                for t in body..k {
                    s += x[t] * panel[r * stride + t];
                }
                out[i][r] = s;
            }
        }
        out
    }
}

/// The kernels in AVX2 and FMA intrinsics (x86-64 CPUs since 2013-2015), selected at run
/// time.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics and raw-pointer loads within checked bounds
mod avx2 {
    use super::{FloatLine, GROUP, Line, STEP};
    use std::arch::x86_64::*;

    /// Sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Lines read ahead of the one being summed: far enough to cover the memory's latency
    /// at the rate a core sums lines.
    const AHEAD: usize = 32;

    /// `out[r]` = the sum over the steps of `x · q` for each row `r` of the groups in
    /// `lines` (`steps` lines a group): a group's four rows side by side, two accumulators
    /// per row (eight FMA chains in flight), the weights read as one stream.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x.len() >= steps * STEP`,
    /// `lines.len() * GROUP >= out.len() * steps`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn decode(x: &[f32], lines: &[Line], steps: usize, out: &mut [f32]) {
        assert!(x.len() >= steps * STEP && lines.len() * GROUP >= out.len() * steps);
        let xp = x.as_ptr();
        let end = lines.as_ptr_range().end as *const i8;
        for (g, sums) in out.chunks_exact_mut(GROUP).enumerate() {
            let mut lo = [_mm256_setzero_ps(); GROUP];
            let mut hi = [_mm256_setzero_ps(); GROUP];
            for c in 0..steps {
                let line = lines[g * steps + c].0.as_ptr();
                // A prefetch of any address is harmless; it is kept within the lines all
                // the same.
                let ahead = line.wrapping_add(AHEAD * 64);
                if ahead < end {
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                }
                // SAFETY: (c + 1) · STEP <= steps · STEP <= x.len().
                let (x0, x1) = unsafe {
                    (
                        _mm256_loadu_ps(xp.add(c * STEP)),
                        _mm256_loadu_ps(xp.add(c * STEP + 8)),
                    )
                };
                for r in 0..GROUP {
                    // SAFETY: a line holds GROUP rows of STEP bytes.
                    let (w0, w1) = unsafe {
                        let p = line.add(r * STEP);
                        (
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                p as *const __m128i,
                            ))),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                p.add(8) as *const __m128i
                            ))),
                        )
                    };
                    lo[r] = _mm256_fmadd_ps(x0, w0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(x1, w1, hi[r]);
                }
            }
            for r in 0..GROUP {
                sums[r] = hsum(_mm256_add_ps(lo[r], hi[r]));
            }
        }
    }

    /// [`decode`] for float32 weights: four cache lines a step.
    ///
    /// # Safety
    /// As [`decode`]'s.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn decode_float(x: &[f32], lines: &[FloatLine], steps: usize, out: &mut [f32]) {
        assert!(x.len() >= steps * STEP && lines.len() * GROUP >= out.len() * steps);
        let xp = x.as_ptr();
        let end = lines.as_ptr_range().end as *const i8;
        for (g, sums) in out.chunks_exact_mut(GROUP).enumerate() {
            let mut lo = [_mm256_setzero_ps(); GROUP];
            let mut hi = [_mm256_setzero_ps(); GROUP];
            for c in 0..steps {
                let line = lines[g * steps + c].0.as_ptr();
                let ahead = (line as *const i8).wrapping_add(AHEAD * 64);
                for l in 0..4 {
                    let p = ahead.wrapping_add(l * 64);
                    if p < end {
                        _mm_prefetch::<_MM_HINT_T0>(p);
                    }
                }
                // SAFETY: (c + 1) · STEP <= steps · STEP <= x.len().
                let (x0, x1) = unsafe {
                    (
                        _mm256_loadu_ps(xp.add(c * STEP)),
                        _mm256_loadu_ps(xp.add(c * STEP + 8)),
                    )
                };
                for r in 0..GROUP {
                    // SAFETY: a line holds GROUP rows of STEP values, 64-byte aligned.
                    let (w0, w1) = unsafe {
                        let p = line.add(r * STEP);
                        (_mm256_load_ps(p), _mm256_load_ps(p.add(8)))
                    };
                    lo[r] = _mm256_fmadd_ps(x0, w0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(x1, w1, hi[r]);
                }
            }
            for r in 0..GROUP {
                sums[r] = hsum(_mm256_add_ps(lo[r], hi[r]));
            }
        }
    }

    /// The dots of `x0` and `x1` with the four rows of `panel`: eight accumulators, each
    /// activation and weight load serving several products.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x0`, `x1` hold `k` values, `panel` four rows of `k`
    /// `stride` apart.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(
        x0: &[f32],
        x1: &[f32],
        panel: &[f32],
        k: usize,
        stride: usize,
    ) -> [[f32; GROUP]; 2] {
        assert!(x0.len() >= k && x1.len() >= k && stride >= k && panel.len() >= GROUP * stride);
        let body = k - k % 8;
        let rows = [0, 1, 2, 3].map(|i| panel[i * stride..].as_ptr());
        let mut acc = [[_mm256_setzero_ps(); GROUP]; 2];
        let mut j = 0;
        while j < body {
            // SAFETY: j + 8 <= body <= k, within each slice and row.
            let xs = unsafe {
                [
                    _mm256_loadu_ps(x0.as_ptr().add(j)),
                    _mm256_loadu_ps(x1.as_ptr().add(j)),
                ]
            };
            for r in 0..GROUP {
                let w = unsafe { _mm256_loadu_ps(rows[r].add(j)) };
                acc[0][r] = _mm256_fmadd_ps(xs[0], w, acc[0][r]);
                acc[1][r] = _mm256_fmadd_ps(xs[1], w, acc[1][r]);
            }
            j += 8;
        }
        let mut out = [[0f32; GROUP]; 2];
        for (i, x) in [x0, x1].into_iter().enumerate() {
            for r in 0..GROUP {
                let mut s = hsum(acc[i][r]);
                for t in body..k {
                    s += x[t] * panel[r * stride + t];
                }
                out[i][r] = s;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::half::{HalfWeights, INT8, INT8_BYTES};
    use tract_core::transform::ModelTransform;
    use tract_linalg::multithread::{Executor, multithread_tract_scope};

    /// A `[rows, cols]` matrix of int8 values in [-127, 127] (127 in every row and column
    /// among them) times `scale(row)`.
    fn int8_times(rows: usize, cols: usize, scale: impl Fn(usize) -> f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let q = if r == c % rows || c == r % cols {
                    127.0
                } else {
                    ((i * 7919 % 253) as f32) - 126.0
                };
                q * scale(r)
            })
            .collect();
        Tensor::from_shape(&[rows, cols], &v).unwrap()
    }

    fn floats(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 2654435761 % 1000) as f32 / 500.0 - 1.0) * 0.37)
            .collect();
        Tensor::from_shape(shape, &v).unwrap()
    }

    /// `expr` of a source `x` of `x_shape` and a constant `w`.
    fn product_model(expr: &str, x_shape: &[usize], w: Tensor) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(x_shape)).unwrap();
        let w = model.add_const("w", w).unwrap();
        let y = model
            .wire_node(
                "mm",
                EinSum::new(expr.parse().unwrap(), f32::datum_type()),
                &[x, w],
            )
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        model.into_decluttered().unwrap()
    }

    fn run(model: &TypedModel, x: &Tensor) -> Vec<f32> {
        crate::serving::half::tests::run(model.clone(), x)
    }

    fn int8_products(model: &TypedModel) -> usize {
        model
            .nodes
            .iter()
            .filter(|n| n.op_is::<PackedProduct>())
            .count()
    }

    #[test]
    fn int8_values_times_a_scale_per_row_or_per_matrix_are_recovered_exactly() {
        // [k, n], summed over axis 0: a scale per column of the file's matrix.
        let per_row = int8_times(24, 40, |r| 0.001 * (r + 1) as f32);
        let t = Tensor::from_shape(&[40, 24], &{
            let p = per_row.try_as_plain_ram().unwrap();
            let v = p.as_slice::<f32>().unwrap();
            (0..40 * 24)
                .map(|i| v[(i % 24) * 40 + i / 24])
                .collect::<Vec<f32>>()
        })
        .unwrap();
        let m = PackedMatrix::exact(&t, 0).expect("a scale per output");
        assert_eq!((m.rows, m.depth), (24, 40));
        let file = per_row.try_as_plain_ram().unwrap();
        let file = file.as_slice::<f32>().unwrap();
        for n in 0..24 {
            let s = 0.001 * (n + 1) as f32;
            assert!((m.int8().1[n] - s).abs() < 1e-9);
            for k in 0..40 {
                assert_eq!(m.value(n, k) as f32, (file[n * 40 + k] / s).round());
            }
        }
        let again = PackedMatrix::exact(&per_row, 1).expect("the same, stored [n, k]");
        assert!((0..24).all(|n| (0..40).all(|k| again.value(n, k) == m.value(n, k))));
        // Six groups of three lines (40 values a row, padded to 48), and the scales.
        assert_eq!(m.bytes(), 6 * 3 * 64 + 24 * 4);
        // One scale for the whole matrix, some rows short of 127.
        let mut one = int8_times(8, 64, |_| 0.02);
        one.try_as_plain_ram_mut()
            .unwrap()
            .as_slice_mut::<f32>()
            .unwrap()[..64]
            .iter_mut()
            .for_each(|v| *v = (*v / 2.0 / 0.02).round() * 0.02);
        let m = PackedMatrix::exact(&one, 1).expect("one scale");
        assert!(m.int8().1.iter().all(|s| (*s - 0.02).abs() < 1e-9));
    }

    #[test]
    fn floats_asymmetric_zero_points_and_other_types_are_not_int8() {
        assert!(PackedMatrix::exact(&floats(&[16, 32], 1), 1).is_none());
        // A zero point: q - 3 for q in [-128, 127], scale 0.01.
        let shifted = Tensor::from_shape(
            &[4, 256],
            &(0..1024)
                .map(|i| ((i % 256) as f32 - 128.0 - 3.0) * 0.01)
                .collect::<Vec<f32>>(),
        )
        .unwrap();
        assert!(PackedMatrix::exact(&shifted, 1).is_none());
        let half = int8_times(4, 16, |_| 0.5)
            .cast_to::<f16>()
            .unwrap()
            .into_owned();
        assert!(PackedMatrix::exact(&half, 1).is_none());
        let mut inf = int8_times(4, 16, |_| 0.5);
        inf.try_as_plain_ram_mut()
            .unwrap()
            .as_slice_mut::<f32>()
            .unwrap()[3] = f32::INFINITY;
        assert!(PackedMatrix::exact(&inf, 1).is_none());
    }

    #[test]
    fn only_plain_products_up_to_their_axes_layout_are_taken() {
        let reading = |expr: &str, slot: usize, x: &[usize]| {
            let x: TVec<TDim> = x.iter().map(|d| d.to_dim()).collect();
            product_form(
                &EinSum::new(expr.parse().unwrap(), f32::datum_type()),
                slot,
                &x,
            )
        };
        let form = |expr: &str, slot: usize, x: &[usize]| {
            reading(expr, slot, x).map(|r| {
                assert!(r.x_prep.is_empty(), "{expr}: {:?}", r.x_prep);
                (r.form.k_axis, r.form.out.into_vec())
            })
        };
        assert_eq!(form("mk,kn->mn", 1, &[3, 8]), Some((0, vec![Some(0)])));
        assert_eq!(
            form("bsk,nk->bsn", 1, &[2, 3, 8]),
            Some((1, vec![Some(0), Some(1)]))
        );
        assert_eq!(form("kn,mk->mn", 0, &[3, 8]), Some((0, vec![Some(0)])));
        // Unit axes tract folds into a product: added to the output, dropped from the
        // activations.
        assert_eq!(
            form("mk,kn->amn", 1, &[3, 8]),
            Some((0, vec![None, Some(0)]))
        );
        assert_eq!(form("amk,kn->mn", 1, &[1, 3, 8]), Some((0, vec![Some(1)])));
        // Not when the dropped axis is longer: it is summed.
        assert!(reading("amk,kn->mn", 1, &[2, 3, 8]).is_none());
        // The weights on the left of the output, a transposed output, passed axes
        // reordered, a batch axis in the weights, an axis of the weights alone.
        assert!(reading("mk,kn->nm", 1, &[3, 8]).is_none());
        assert!(reading("bmk,kn->mbn", 1, &[2, 3, 8]).is_none());
        assert!(reading("bmk,bkn->bmn", 1, &[2, 3, 8]).is_none());
        assert!(reading("mk,kjn->mn", 1, &[3, 8]).is_none());
        assert!(
            product_form(
                &EinSum::new("mk,kn->mn".parse().unwrap(), f16::datum_type()),
                1,
                &[3.to_dim(), 8.to_dim()]
            )
            .is_none()
        );
        // The summed axis of the activations elsewhere than last: moved there first.
        let r = reading("km,kn->mn", 1, &[8, 3]).unwrap();
        assert_eq!(r.x_prep.as_slice(), &[AxisOp::Move(1, 0)]);
        assert_eq!((r.w_k.as_slice(), r.w_n), (&[0][..], 1));
        assert_eq!(r.form.out.as_slice(), &[Some(0)]);
        // Attention's heads folded into the output projection: the activations
        // `[heads, m, d]` against weights `[heads, d, n]` sum over heads and d.
        let r = reading("bmk,bkn->amn", 1, &[9, 5, 64]).unwrap();
        assert_eq!(
            r.x_prep.as_slice(),
            &[
                AxisOp::Move(1, 0),
                AxisOp::Reshape(1, tvec![9.to_dim(), 64.to_dim()], tvec![576.to_dim()])
            ]
        );
        assert_eq!((r.w_k.as_slice(), r.w_n), (&[0, 1][..], 2));
        assert_eq!(
            (r.form.k_axis, r.form.out.as_slice()),
            (0, &[None, Some(0)][..])
        );
        // The weights' summed axes in their own order, whatever the activations' order.
        let r = reading("mdb,bdn->mn", 1, &[5, 64, 9]).unwrap();
        assert_eq!(
            r.x_prep.as_slice(),
            &[
                AxisOp::Move(2, 1),
                AxisOp::Reshape(1, tvec![9.to_dim(), 64.to_dim()], tvec![576.to_dim()])
            ]
        );
        assert_eq!((r.w_k.as_slice(), r.w_n), (&[0, 1][..], 2));
    }

    /// Weights of rank 3 whose two summed axes tract folded out of the activations'
    /// reshape (attention's heads before the output projection), and activations whose
    /// summed axis is not last: the int8 product answers as the float one does.
    #[test]
    fn folded_heads_and_moved_activations_are_multiplied_as_int8_too() {
        let (h, d, n) = (3, 40, 48);
        for (expr, x_shape) in [
            ("bmk,bkn->amn", vec![h, 1, d]),
            ("bmk,bkn->amn", vec![h, 5, d]),
            ("mkb,bkn->mn", vec![4, d, h]),
        ] {
            // [n, h·d] with a scale per output, as [h, d, n].
            let w = int8_times(n, h * d, |r| 0.002 + 0.0003 * r as f32)
                .permute_axes(&[1, 0])
                .unwrap()
                .into_shape(&[h, d, n])
                .unwrap();
            let float = product_model(expr, &x_shape, w);
            let mut int8 = float.clone();
            HalfWeights.transform(&mut int8).unwrap();
            assert_eq!(int8_products(&int8), 1, "{expr} {x_shape:?}");
            let x = floats(&x_shape, 3);
            let want = run(&float, &x);
            let got = run(&int8, &x);
            assert_eq!(want.len(), got.len());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in want.iter().zip(&got) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{expr} {x_shape:?}: {a} against {b}"
                );
            }
            let mut packed = float.clone();
            crate::serving::half::FloatWeights
                .transform(&mut packed)
                .unwrap();
            assert_eq!(int8_products(&packed), 1, "{expr} {x_shape:?}");
            let got = run(&packed, &x);
            for (a, b) in want.iter().zip(&got) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{expr} float32: {a} against {b}"
                );
            }
        }
    }

    /// The product through the node's transform answers as the float product does, for
    /// one activation row and several, depths that are not a multiple of the kernels'
    /// steps, either storage of the weights, and any thread count, bit for bit.
    #[test]
    fn the_int8_product_answers_as_the_float_one_on_any_shape_and_thread_count() {
        for (expr, x_shape, w_shape, k_axis) in [
            ("mk,kn->mn", vec![1, 70], [70, 67], 0),
            ("mk,kn->mn", vec![5, 70], [70, 67], 0),
            ("bsk,nk->bsn", vec![1, 1, 37], [131, 37], 1),
            ("bsk,nk->bsn", vec![1, 7, 37], [131, 37], 1),
            ("bsk,kn->bsn", vec![1, 3, 256], [256, 96], 0),
            ("mk,kn->mn", vec![1, 256], [256, 2048], 0),
            ("mk,kn->mn", vec![4, 256], [256, 64], 0),
            ("mk,kn->amn", vec![3, 256], [256, 64], 0),
            ("amk,kn->mn", vec![1, 3, 256], [256, 64], 0),
        ] {
            let (n, k) = (w_shape[1 - k_axis], w_shape[k_axis]);
            // A scale per output.
            let w = int8_times(n, k, |r| 0.003 + 0.0001 * r as f32);
            let w = if k_axis == 0 {
                w.permute_axes(&[1, 0]).unwrap()
            } else {
                w
            };
            assert_eq!(w.shape(), w_shape);
            let float = product_model(expr, &x_shape, w);
            let mut int8 = float.clone();
            HalfWeights.transform(&mut int8).unwrap();
            assert_eq!(int8_products(&int8), 1, "{expr} {x_shape:?}");
            let props = |p: &str| {
                *int8.properties[p]
                    .try_as_plain_ram()
                    .unwrap()
                    .to_scalar::<i64>()
                    .unwrap()
            };
            assert_eq!(props(INT8), 1);
            let padded = n.div_ceil(GROUP) * GROUP * k.div_ceil(STEP) * STEP;
            assert_eq!(props(INT8_BYTES), (padded + n * 4) as i64);
            let x = floats(&x_shape, k);
            let want = run(&float, &x);
            let got = run(&int8, &x);
            assert_eq!(want.len(), got.len());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in want.iter().zip(&got) {
                // Float32 sums of k products in another order.
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{expr} {x_shape:?}: {a} against {b}"
                );
            }
            let threaded = multithread_tract_scope(Executor::multithread(2), || run(&int8, &x));
            assert_eq!(
                threaded, got,
                "{expr} {x_shape:?}: threads changed the answer"
            );
            assert!(
                int8.clone()
                    .into_optimized()
                    .unwrap()
                    .nodes
                    .iter()
                    .all(|c| !c.op_is::<tract_core::ops::konst::Const>()
                        || c.outputs[0].fact.shape.volume().as_i64() != Some((n * k) as i64)),
                "the float weights are dropped"
            );
        }
    }

    #[test]
    fn activations_of_another_depth_are_refused() {
        let w = Arc::new(PackedMatrix::exact(&int8_times(4, 32, |_| 0.1), 1).unwrap());
        let form = ProductForm {
            k_axis: 1,
            out: tvec![Some(0)],
        };
        let op = PackedProduct { w, form };
        let x = floats(&[1, 31], 0).into_tvalue();
        let err = op.eval(&EvalContext::out_of_plan(), tvec!(x)).unwrap_err();
        assert!(format!("{err:#}").contains("depth 32"), "{err:#}");
    }

    /// The vector kernel and the portable loop agree, and a group's sums do not depend
    /// on which groups are summed with it.
    #[test]
    fn the_vector_kernel_and_the_portable_loop_agree() {
        let w = PackedMatrix::exact(&int8_times(11, 83, |r| 0.01 * (r + 1) as f32), 1).unwrap();
        assert_eq!((w.steps, w.int8().0.len()), (6, 3 * 6));
        let mut x = floats(&[96], 5)
            .into_plain_array::<f32>()
            .unwrap()
            .into_raw_vec_and_offset()
            .0;
        x[83..].iter_mut().for_each(|v| *v = 0.0);
        let mut fast = vec![0f32; 12];
        decode_groups(&x, w.int8().0, w.steps, &mut fast);
        let mut slow = vec![0f32; 12];
        portable_decode(&x, w.int8().0, w.steps, &mut slow);
        for n in 0..11 {
            let want: f32 = (0..83).map(|k| x[k] * w.value(n, k) as f32).sum();
            assert!(
                (fast[n] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{n}: {} against {want}",
                fast[n]
            );
            assert!(
                (slow[n] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{n}: {} against {want}",
                slow[n]
            );
        }
        assert_eq!(fast[11], 0.0, "the padding row");
        let mut part = vec![0f32; 4];
        decode_groups(&x, &w.int8().0[w.steps..2 * w.steps], w.steps, &mut part);
        assert_eq!(part, fast[4..8]);
    }

    /// Each vector kernel of a prompt's tile answers as the plain sums do.
    #[test]
    #[allow(unsafe_code)]
    fn the_prompt_tiles_agree_with_plain_sums() {
        let (k, stride) = (83, 96);
        let x = floats(&[2, k], 3)
            .into_plain_array::<f32>()
            .unwrap()
            .into_raw_vec_and_offset()
            .0;
        let panel = floats(&[GROUP, stride], 9)
            .into_plain_array::<f32>()
            .unwrap()
            .into_raw_vec_and_offset()
            .0;
        let (x0, x1) = x.split_at(k);
        let want: Vec<Vec<f32>> = [x0, x1]
            .iter()
            .map(|x| {
                (0..GROUP)
                    .map(|r| (0..k).map(|t| x[t] * panel[r * stride + t]).sum())
                    .collect()
            })
            .collect();
        let check = |got: [[f32; GROUP]; 2], what: &str| {
            for i in 0..2 {
                for r in 0..GROUP {
                    assert!(
                        (got[i][r] - want[i][r]).abs() <= 1e-5,
                        "{what} [{i}][{r}]: {} against {}",
                        got[i][r],
                        want[i][r]
                    );
                }
            }
        };
        check(tile(x0, x1, &panel, k, stride), "dispatched");
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA.
                check(unsafe { avx2::tile(x0, x1, &panel, k, stride) }, "avx2");
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                check(unsafe { avx512::tile(x0, x1, &panel, k, stride) }, "avx512");
            }
        }
    }

    /// A float32 matrix packed for the product answers as tract's float product does.
    #[test]
    fn a_float_matrix_multiplies_as_tract_s_product_does() {
        use crate::serving::half::{FLOAT, FloatWeights};
        for x_shape in [vec![1, 70], vec![5, 70]] {
            let w = floats(&[70, 67], 4);
            let float = product_model("mk,kn->mn", &x_shape, w);
            let mut packed = float.clone();
            FloatWeights.transform(&mut packed).unwrap();
            assert_eq!(int8_products(&packed), 1);
            assert_eq!(
                *packed.properties[FLOAT]
                    .try_as_plain_ram()
                    .unwrap()
                    .to_scalar::<i64>()
                    .unwrap(),
                1
            );
            let x = floats(&x_shape, 2);
            let (want, got) = (run(&float, &x), run(&packed, &x));
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} against {b}");
            }
            let threaded = multithread_tract_scope(Executor::multithread(2), || run(&packed, &x));
            assert_eq!(threaded, got);
        }
    }
}
