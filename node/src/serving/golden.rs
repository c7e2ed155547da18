//! Golden checks: a release carries input tensors and the outputs the model must give for
//! them (in its manifest, and in the golden file of the variant when they are too large
//! for it); activation fails unless every expected output matches.
//!
//! The rule, per output type: integers and booleans exactly; floats (FP16, FP32, FP64)
//! element by element, passing when the value equals the expected one, both are NaN, or
//! `|got - want| <= atol + rtol * |want|`, with `atol` the check's `tolerance` and `rtol`
//! its entry in the manifest's `ServingSpec::golden_rtol` (0 when absent). Shapes and
//! element types must match exactly.

use super::kserve::Tensor;
use super::kserve::f16::f16_bits_to_f32;
use super::model::LoadedModel;
use pollen_protocol::manifest::{
    DType, GoldenCheck, MAX_GOLDEN, MAX_GOLDEN_FILE, TensorData, decode_golden_file,
};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The golden checks of a release on this node, with their relative tolerances.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GoldenSet {
    /// The manifest's checks, then the golden file's.
    pub checks: Vec<GoldenCheck>,
    /// Per check (same order), the relative tolerance of float outputs; missing ones are 0.
    pub rtol: Vec<f32>,
}

impl GoldenSet {
    /// The checks of a release: the manifest's `inline` ones, then those of the variant's
    /// golden file at `file` (its size known from the manifest, checked before reading:
    /// the store verified its content), with the manifest's relative tolerances. Errors
    /// past [`MAX_GOLDEN`] checks, when there are more tolerances than checks, or when
    /// the file is unreadable or malformed.
    pub fn gather(
        inline: Vec<GoldenCheck>,
        file: Option<(&Path, u64)>,
        rtol: Vec<f32>,
    ) -> Result<Self, String> {
        let mut checks = inline;
        if let Some((path, size)) = file {
            if size > MAX_GOLDEN_FILE {
                return Err(format!(
                    "the golden file has {size} bytes, at most {MAX_GOLDEN_FILE}"
                ));
            }
            let bytes =
                std::fs::read(path).map_err(|e| format!("golden file {}: {e}", path.display()))?;
            checks.extend(decode_golden_file(&bytes)?);
        }
        if checks.len() > MAX_GOLDEN {
            return Err(format!(
                "{} golden checks, at most {MAX_GOLDEN}",
                checks.len()
            ));
        }
        if rtol.len() > checks.len() {
            return Err(format!(
                "the manifest gives {} relative tolerances for {} golden checks",
                rtol.len(),
                checks.len()
            ));
        }
        Ok(GoldenSet { checks, rtol })
    }

    /// No checks at all.
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }
}

impl LoadedModel {
    /// Run the golden checks: every expected output must match (see the module doc).
    /// The error names the check, the output and, for a value, the element (flat index and
    /// coordinates), what the model gave, what was expected and the bound.
    pub fn golden(&self, set: &GoldenSet) -> Result<(), String> {
        for (i, check) in set.checks.iter().enumerate() {
            let inputs: Vec<Tensor> = check
                .inputs
                .iter()
                .map(golden_tensor)
                .collect::<Result<_, _>>()?;
            let outputs = self
                .run(&inputs)
                .map_err(|e| format!("golden check {i}: {e}"))?;
            let tol = Tolerance {
                atol: check.tolerance,
                rtol: set.rtol.get(i).copied().unwrap_or(0.0),
            };
            for want in &check.expected {
                let want = golden_tensor(want)?;
                let got = outputs
                    .iter()
                    .find(|o| o.name == want.name)
                    .ok_or_else(|| {
                        format!(
                            "golden check {i}: the model has no output {:?} (it has {:?})",
                            want.name,
                            self.outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
                        )
                    })?;
                compare(&want, got, tol)
                    .map_err(|e| format!("golden check {i}, output '{}': {e}", want.name))?;
            }
        }
        Ok(())
    }
}

fn golden_tensor(t: &TensorData) -> Result<Tensor, String> {
    if t.dtype.size().is_none() {
        return Err("golden tensors need a fixed-size dtype".into());
    }
    Ok(Tensor {
        name: t.name.clone(),
        datatype: t.dtype,
        shape: t.shape.iter().map(|d| *d as usize).collect(),
        data: t.data.clone(),
    })
}

/// The float tolerance of one check.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tolerance {
    atol: f32,
    rtol: f32,
}

impl Tolerance {
    /// The largest difference accepted from `want`.
    fn bound(self, want: f64) -> f64 {
        f64::from(self.atol) + f64::from(self.rtol) * want.abs()
    }

    /// Does `got` pass for `want`? An infinite `want` needs the same infinity.
    fn passes(self, got: f64, want: f64) -> bool {
        got == want
            || (got.is_nan() && want.is_nan())
            || (want.is_finite() && (got - want).abs() <= self.bound(want))
    }
}

/// The coordinates of flat element `k` of a row-major tensor of `shape`.
fn coordinates(mut k: usize, shape: &[usize]) -> Vec<usize> {
    let mut at = vec![0; shape.len()];
    for (c, &d) in at.iter_mut().zip(shape).rev() {
        if d > 0 {
            *c = k % d;
            k /= d;
        }
    }
    at
}

/// The elements of `t` as `f64` (floats only: FP16, FP32, FP64).
fn floats(t: &Tensor) -> Option<Vec<f64>> {
    let d = &t.data;
    Some(match t.datatype {
        DType::F16 => d
            .chunks_exact(2)
            .map(|c| f64::from(f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        DType::F32 => d
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        _ => return None,
    })
}

/// An integer or boolean element as text.
fn exact_value(t: &Tensor, k: usize) -> String {
    let Some(size) = t.datatype.size() else {
        return "?".into();
    };
    let Some(b) = t.data.get(k * size..(k + 1) * size) else {
        return "?".into();
    };
    let mut w = [0u8; 8];
    w[..size].copy_from_slice(b);
    let u = u64::from_le_bytes(w);
    match t.datatype {
        DType::Bool => (u != 0).to_string(),
        DType::I8 => (b[0] as i8).to_string(),
        DType::I16 => i16::from_le_bytes([b[0], b[1]]).to_string(),
        DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        DType::I64 => (u as i64).to_string(),
        _ => u.to_string(),
    }
}

fn compare(want: &Tensor, got: &Tensor, tol: Tolerance) -> Result<(), String> {
    if want.datatype != got.datatype || want.shape != got.shape || want.data.len() != got.data.len()
    {
        return Err(format!(
            "expected {} {:?}, got {} {:?}",
            want.datatype.kserve_name(),
            want.shape,
            got.datatype.kserve_name(),
            got.shape
        ));
    }
    let at = |k: usize| {
        if want.shape.len() > 1 {
            format!("element {k} (at {:?})", coordinates(k, &want.shape))
        } else {
            format!("element {k}")
        }
    };
    if let (Some(w), Some(g)) = (floats(want), floats(got)) {
        return match w.iter().zip(&g).position(|(w, g)| !tol.passes(*g, *w)) {
            None => Ok(()),
            Some(k) => {
                let bad = w
                    .iter()
                    .zip(&g)
                    .filter(|(w, g)| !tol.passes(**g, **w))
                    .count();
                // Values in the precision of the type, shortest form.
                let show = |v: f64| match want.datatype {
                    DType::F64 => v.to_string(),
                    _ => (v as f32).to_string(),
                };
                Err(format!(
                    "{}: got {}, want {}, bound {:.3e} (atol {} + rtol {} * |want|); \
                     {bad} of {} elements out of bounds",
                    at(k),
                    show(g[k]),
                    show(w[k]),
                    tol.bound(w[k]),
                    tol.atol,
                    tol.rtol,
                    w.len()
                ))
            }
        };
    }
    let size = want.datatype.size().unwrap_or(1).max(1);
    match want
        .data
        .chunks(size)
        .zip(got.data.chunks(size))
        .position(|(w, g)| w != g)
    {
        None => Ok(()),
        Some(k) => Err(format!(
            "{}: got {}, want {} (exact match for {})",
            at(k),
            exact_value(got, k),
            exact_value(want, k),
            want.datatype.kserve_name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_protocol::manifest::encode_golden_file;

    fn tensor(dtype: DType, shape: &[usize], data: Vec<u8>) -> Tensor {
        Tensor {
            name: "y".into(),
            datatype: dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    fn f32s(v: &[f32]) -> Tensor {
        tensor(
            DType::F32,
            &[v.len()],
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    const TOL: Tolerance = Tolerance {
        atol: 1e-4,
        rtol: 1e-3,
    };

    #[test]
    fn floats_pass_within_atol_plus_rtol_times_want() {
        let want = f32s(&[0.0, 1.0, 1000.0, -1000.0, f32::NAN, f32::INFINITY]);
        // Bounds: 1e-4, 1.1e-3, 1.0001, 1.0001; NaN matches NaN; inf matches inf.
        let ok = f32s(&[9e-5, 1.001, 1000.99, -999.01, f32::NAN, f32::INFINITY]);
        assert_eq!(compare(&want, &ok, TOL), Ok(()));
        for (k, bad) in [
            (0, 2e-4),
            (1, 1.0012),
            (2, 1001.01),
            (4, 0.0),
            (5, f32::MAX),
        ] {
            let mut v = [9e-5, 1.001, 1000.99, -999.01, f32::NAN, f32::INFINITY];
            v[k] = bad;
            let e = compare(&want, &f32s(&v), TOL).expect_err("out of bounds");
            assert!(e.starts_with(&format!("element {k}: got ")), "{e}");
            assert!(e.contains("1 of 6 elements"), "{e}");
        }
        // A NaN where a number is expected fails.
        let e = compare(&f32s(&[1.0]), &f32s(&[f32::NAN]), TOL).expect_err("NaN");
        assert!(e.contains("got NaN, want 1"), "{e}");
        // Without a relative tolerance only atol counts.
        let abs = Tolerance {
            atol: 1e-4,
            rtol: 0.0,
        };
        assert!(compare(&f32s(&[1000.0]), &f32s(&[1000.01]), abs).is_err());
        assert!(compare(&f32s(&[1000.0]), &f32s(&[1000.01]), TOL).is_ok());
    }

    #[test]
    fn f16_and_f64_use_the_same_rule() {
        // FP16 1.0 = 0x3c00; the next half up, 1.000977 = 0x3c01: within 1.1e-3.
        let h = |bits: &[u16]| {
            tensor(
                DType::F16,
                &[bits.len()],
                bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
            )
        };
        assert!(compare(&h(&[0x3c00]), &h(&[0x3c01]), TOL).is_ok());
        assert!(compare(&h(&[0x3c00]), &h(&[0x3c02]), TOL).is_err());
        assert!(
            compare(&h(&[0x7e00]), &h(&[0x7e01]), TOL).is_ok(),
            "NaN = NaN"
        );
        let d = |v: &[f64]| {
            tensor(
                DType::F64,
                &[v.len()],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        assert!(compare(&d(&[2.0]), &d(&[2.002]), TOL).is_ok());
        assert!(compare(&d(&[2.0]), &d(&[2.003]), TOL).is_err());
    }

    #[test]
    fn integers_and_booleans_match_exactly_and_errors_say_where() {
        let i64s = |v: &[i64]| {
            tensor(
                DType::I64,
                &[2, 2],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        let loose = Tolerance {
            atol: 10.0,
            rtol: 1.0,
        };
        assert!(compare(&i64s(&[1, 2, 3, -4]), &i64s(&[1, 2, 3, -4]), loose).is_ok());
        let e = compare(&i64s(&[1, 2, 3, -4]), &i64s(&[1, 2, 3, -5]), loose).expect_err("exact");
        assert_eq!(
            e,
            "element 3 (at [1, 1]): got -5, want -4 (exact match for INT64)"
        );
        let b = |v: &[u8]| tensor(DType::Bool, &[v.len()], v.to_vec());
        let e = compare(&b(&[1, 0]), &b(&[1, 1]), loose).expect_err("bool");
        assert_eq!(e, "element 1: got true, want false (exact match for BOOL)");
        let u8s = |v: &[u8]| tensor(DType::U8, &[v.len()], v.to_vec());
        assert!(compare(&u8s(&[200]), &u8s(&[201]), loose).is_err());
        // Shape and type mismatches.
        let e = compare(&b(&[1, 0]), &u8s(&[1, 0]), loose).expect_err("type");
        assert!(e.contains("expected BOOL [2], got UINT8 [2]"), "{e}");
        let mut wide = f32s(&[1.0, 2.0]);
        wide.shape = vec![1, 2];
        assert!(compare(&f32s(&[1.0, 2.0]), &wide, TOL).is_err());
        assert_eq!(coordinates(23, &[2, 3, 4]), [1, 2, 3]);
        assert_eq!(coordinates(0, &[]), Vec::<usize>::new());
    }

    fn check(tolerance: f32) -> GoldenCheck {
        GoldenCheck {
            inputs: vec![],
            expected: vec![TensorData {
                name: "y".into(),
                dtype: DType::F32,
                shape: vec![1],
                data: vec![0; 4],
            }],
            tolerance,
        }
    }

    #[test]
    fn a_release_checks_come_from_the_manifest_then_the_golden_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("golden.checks");
        let bytes = encode_golden_file(&[check(2.0), check(3.0)]);
        std::fs::write(&path, &bytes).expect("write");
        let size = bytes.len() as u64;
        let set = GoldenSet::gather(vec![check(1.0)], Some((&path, size)), vec![0.1, 0.2])
            .expect("gather");
        let tols: Vec<f32> = set.checks.iter().map(|c| c.tolerance).collect();
        assert_eq!(tols, [1.0, 2.0, 3.0]);
        assert_eq!(set.rtol, [0.1, 0.2]);
        assert!(GoldenSet::gather(vec![], Some((&path, size)), vec![0.1; 3]).is_err());
        assert!(
            GoldenSet::gather(
                vec![check(1.0); MAX_GOLDEN - 1],
                Some((&path, size)),
                vec![]
            )
            .is_err()
        );
        assert!(GoldenSet::gather(vec![], Some((&path, MAX_GOLDEN_FILE + 1)), vec![]).is_err());
        std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("write");
        let e = GoldenSet::gather(vec![], Some((&path, size)), vec![]).expect_err("cut");
        assert!(e.contains("malformed golden file"), "{e}");
        std::fs::write(&path, b"model bytes").expect("write");
        let e = GoldenSet::gather(vec![], Some((&path, size)), vec![]).expect_err("magic");
        assert!(e.contains("not a golden file"), "{e}");
    }
}
