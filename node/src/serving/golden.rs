//! Golden checks: a release's manifest carries input tensors and the outputs the model
//! must give for them; activation fails unless every expected output matches (within the
//! tolerance, for floats).

use super::kserve::Tensor;
use super::model::LoadedModel;
use pollen_protocol::manifest::{DType, GoldenCheck, TensorData};

impl LoadedModel {
    /// Run the manifest's golden checks: every expected output within `tolerance`
    /// (absolute, for floats; exact for the rest).
    pub fn golden(&self, checks: &[GoldenCheck]) -> Result<(), String> {
        for (i, check) in checks.iter().enumerate() {
            let inputs: Vec<Tensor> = check
                .inputs
                .iter()
                .map(golden_tensor)
                .collect::<Result<_, _>>()?;
            let outputs = self
                .run(&inputs)
                .map_err(|e| format!("golden check {i}: {e}"))?;
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
                compare(&want, got, check.tolerance)
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
    let datatype = t.dtype;
    Ok(Tensor {
        name: t.name.clone(),
        datatype,
        shape: t.shape.iter().map(|d| *d as usize).collect(),
        data: t.data.clone(),
    })
}

fn compare(want: &Tensor, got: &Tensor, tol: f32) -> Result<(), String> {
    if want.datatype != got.datatype || want.shape != got.shape {
        return Err(format!(
            "expected {} {:?}, got {} {:?}",
            want.datatype.kserve_name(),
            want.shape,
            got.datatype.kserve_name(),
            got.shape
        ));
    }
    match want.datatype {
        DType::F32 => {
            let w = want
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            let g = got
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            for (k, (a, b)) in w.zip(g).enumerate() {
                if (a - b).abs().is_nan() || (a - b).abs() > tol {
                    return Err(format!(
                        "element {k}: expected {a}, got {b} (tolerance {tol})"
                    ));
                }
            }
            Ok(())
        }
        DType::F64 => {
            let w = want
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
            let g = got
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
            for (k, (a, b)) in w.zip(g).enumerate() {
                if (a - b).abs().is_nan() || (a - b).abs() > f64::from(tol) {
                    return Err(format!(
                        "element {k}: expected {a}, got {b} (tolerance {tol})"
                    ));
                }
            }
            Ok(())
        }
        _ if want.data == got.data => Ok(()),
        _ => Err("values differ".into()),
    }
}
