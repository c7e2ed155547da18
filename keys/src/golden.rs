//! Golden checks for any model: read them from the ONNX test-data layout, and attach them
//! to a manifest, inline or as the variant's golden file.
//!
//! # Where they travel
//!
//! A manifest travels in one control frame (1 MiB) and every node keeps the manifests it
//! retains in memory, while the golden data of a real model is often megabytes (an OCR
//! detector's input `[1,3,384,640]` of FP32 is 2.9 MB). So [`attach`] keeps the checks
//! inline only while the encoded manifest body stays within [`INLINE_LIMIT`] bytes;
//! otherwise they go, whole, into a file named
//! [`GOLDEN_FILE`](pollen_protocol::manifest::GOLDEN_FILE) appended to every variant:
//! content-addressed like the model, so nodes fetch and verify it chunk by chunk like any
//! model file, and read it at activation. A manifest with a golden file is format 2
//! (`serving` is set), which nodes that predate golden files refuse rather than serve
//! the model unchecked.
//!
//! # Tolerances
//!
//! Integer and boolean outputs must match exactly. A float element passes when it equals
//! the expected one, both are NaN, or `|got - want| <= atol + rtol * |want|`, with `atol`
//! the check's own `tolerance` and `rtol` its entry in `ServingSpec::golden_rtol`. For
//! test data directories the defaults are [`DEFAULT_ATOL`] and [`DEFAULT_RTOL`].

use crate::onnx_pb::{GraphIo, ValueKind, dtype_of_onnx, graph_io, read_map_sequence, read_tensor};
use anyhow::{Context, Result, bail};
use pollen_protocol::chunking::spec_for_bytes;
use pollen_protocol::manifest::{
    FileEntry, GOLDEN_FILE, GoldenCheck, MAX_GOLDEN, MAX_GOLDEN_FILE, ManifestBody, TensorData,
    decode_golden_file, encode_golden_file,
};
use pollen_protocol::signing::SignedBody;
use std::path::{Path, PathBuf};

/// Default absolute tolerance of float outputs for test-data directories: FP32 models
/// run by another runtime differ by rounding (onnxruntime against itself with and
/// without graph optimisations: up to 1.6e-5 on the corpus's float models; tract
/// against onnxruntime on the OCR models: 2e-4 at values near 1).
pub const DEFAULT_ATOL: f32 = 1e-4;
/// Default relative tolerance of float outputs for test-data directories (the ONNX
/// backend tests' own default).
pub const DEFAULT_RTOL: f32 = 1e-3;
/// Golden checks stay inline while the encoded manifest body with them takes at most
/// this many bytes (an eighth of a control frame, so the signatures and later fields
/// have room); past it they travel as the variant's golden file.
pub const INLINE_LIMIT: usize = 128 * 1024;

/// Input or output, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Input,
    Output,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Input => "input",
            Role::Output => "output",
        }
    }
}

/// Read golden checks from `dir` in the layout of the ONNX model zoo and backend tests:
/// `dir/test_data_set_N/{input_K.pb, output_K.pb}` (one check per data set, in order of
/// N), or `dir` itself a data set holding `input_K.pb` files. Each `.pb` is a serialised
/// `TensorProto` of any fixed-size element type and shape ([`read_tensor`]); a tensor is
/// named by its `name`, else by its position `K` among the graph inputs (initializers
/// left out) or outputs of `model`, the ONNX file. The output of a `ZipMap` (a
/// `SequenceProto` of maps, as onnxruntime and the ONNX tools write it) is read as the
/// probability tensor the node serves in its place: one row per map, one column per class
/// label in the ZipMap's order ([`read_map_sequence`]). Files named otherwise (such as
/// `zipmap_output_0_as_tensor.pb`) are ignored. Every check gets `atol` as its
/// tolerance.
///
/// Refused, naming the file: a name the model does not have, a tensor where the model has
/// a sequence, map or optional value (other than a ZipMap's), an element type other than
/// the model's, a gap in the numbering, a data set without outputs, more than
/// [`MAX_GOLDEN`] data sets, or more than [`MAX_GOLDEN_FILE`] bytes of tensors.
pub fn golden_from_dir(dir: &Path, model: &Path, atol: f32) -> Result<Vec<GoldenCheck>> {
    if !(atol.is_finite() && atol >= 0.0) {
        bail!("the absolute tolerance must be a finite non-negative number");
    }
    let sets = data_sets(dir)?;
    if sets.len() > MAX_GOLDEN {
        bail!(
            "{}: {} data sets, at most {MAX_GOLDEN}",
            dir.display(),
            sets.len()
        );
    }
    let io = graph_io(model).context("golden checks need the model's graph inputs and outputs")?;
    let mut budget = MAX_GOLDEN_FILE;
    sets.iter()
        .map(|set| {
            let check = GoldenCheck {
                inputs: read_role(set, Role::Input, &io, &mut budget)?,
                expected: read_role(set, Role::Output, &io, &mut budget)?,
                tolerance: atol,
            };
            if check.expected.is_empty() {
                bail!("{}: no output_K.pb, nothing to check", set.display());
            }
            Ok(check)
        })
        .collect()
}

/// The data sets under `dir`: its `test_data_set_N/` in order of N, or `dir` itself.
fn data_sets(dir: &Path) -> Result<Vec<PathBuf>> {
    if !numbered(dir, "input_", ".pb")?.is_empty() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let sets: Vec<PathBuf> = numbered(dir, "test_data_set_", "")?
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| p.is_dir())
        .collect();
    if sets.is_empty() {
        bail!(
            "{} holds neither test_data_set_N/ directories nor input_K.pb files",
            dir.display()
        );
    }
    Ok(sets)
}

/// The entries `PREFIX<N>SUFFIX` of `dir`, in order of N.
fn numbered(dir: &Path, prefix: &str, suffix: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot read {}", dir.display()))?;
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(suffix))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, e.path()));
    }
    out.sort();
    Ok(out)
}

/// The tensors `input_K.pb` (or `output_K.pb`) of one data set, K = 0, 1, … without gaps.
fn read_role(set: &Path, role: Role, io: &GraphIo, budget: &mut u64) -> Result<Vec<TensorData>> {
    let files = numbered(set, &format!("{}_", role.as_str()), ".pb")?;
    let mut out: Vec<TensorData> = Vec::with_capacity(files.len());
    for (k, (n, path)) in files.iter().enumerate() {
        if *n != k as u64 {
            bail!(
                "{}: {}_{k}.pb is missing (found {}_{n}.pb)",
                set.display(),
                role.as_str(),
                role.as_str()
            );
        }
        let t = read_pb(path, role, k, io, budget)
            .with_context(|| format!("golden data {}", path.display()))?;
        if out.iter().any(|o| o.name == t.name) {
            bail!(
                "{}: two {}s named {:?}",
                set.display(),
                role.as_str(),
                t.name
            );
        }
        out.push(t);
    }
    Ok(out)
}

/// One `.pb` file: the tensor, named, checked against the model's value of that name.
fn read_pb(
    path: &Path,
    role: Role,
    k: usize,
    io: &GraphIo,
    budget: &mut u64,
) -> Result<TensorData> {
    let values = match role {
        Role::Input => &io.inputs,
        Role::Output => &io.outputs,
    };
    let r = role.as_str();
    let not_tensor = |name: &str, kind: &ValueKind| {
        anyhow::anyhow!(
            "the model's {r} {name:?} is {kind}; golden checks compare tensors only \
             (publish without --golden, or with test data for a model whose {r}s are tensors)"
        )
    };
    let size = std::fs::metadata(path)?.len();
    if size > *budget {
        bail!("golden data over {MAX_GOLDEN_FILE} bytes in all");
    }
    let bytes = std::fs::read(path)?;
    let t = match read_tensor(&bytes) {
        Ok(t) => t,
        Err(e) => {
            if role == Role::Output
                && let Some(t) = zipmap_output(&bytes, k, io)?
            {
                *budget = budget.saturating_sub(t.data.len() as u64);
                return Ok(t);
            }
            // A sequence or map in the model explains an unreadable file best.
            if let Some(v) = values.get(k)
                && !matches!(v.kind, ValueKind::Tensor(_))
            {
                return Err(not_tensor(&v.name, &v.kind));
            }
            return Err(e);
        }
    };
    *budget = budget.saturating_sub(t.data.len() as u64);
    let names = || {
        values
            .iter()
            .map(|v| format!("{:?}", v.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let value = match &t.name {
        Some(n) => values.iter().find(|v| &v.name == n).ok_or_else(|| {
            anyhow::anyhow!(
                "the tensor is named {n:?}, but the model's {r}s are {}",
                names()
            )
        })?,
        None => values.get(k).ok_or_else(|| {
            anyhow::anyhow!(
                "the tensor has no name, and the model has no {r} {k} (its {r}s are {})",
                names()
            )
        })?,
    };
    match value.kind {
        ValueKind::Tensor(elem) => {
            if elem != 0 && dtype_of_onnx(elem) != Some(t.dtype) {
                bail!(
                    "the tensor is {}, but the model's {r} {:?} is {}",
                    t.dtype.kserve_name(),
                    value.name,
                    value.kind
                );
            }
        }
        ref kind => return Err(not_tensor(&value.name, kind)),
    }
    Ok(TensorData {
        name: value.name.clone(),
        dtype: t.dtype,
        shape: t.shape,
        data: t.data,
    })
}

/// A `ZipMap` output's golden data, a sequence of maps (label to probability, one map per
/// row), as the probability tensor the node serves for it (`None` if output `k` or the
/// sequence's name is not a ZipMap's output).
fn zipmap_output(bytes: &[u8], k: usize, io: &GraphIo) -> Result<Option<TensorData>> {
    let Some(name) = io
        .outputs
        .get(k)
        .filter(|v| v.kind == ValueKind::Sequence)
        .map(|v| v.name.clone())
    else {
        return Ok(None);
    };
    let Some(labels) = io.zipmap(&name) else {
        return Ok(None);
    };
    let (seq_name, t) =
        read_map_sequence(bytes, labels).with_context(|| format!("the ZipMap output {name:?}"))?;
    if let Some(n) = seq_name
        && n != name
    {
        bail!("the sequence is named {n:?}, but output {k} of the model is {name:?}");
    }
    Ok(Some(TensorData {
        name,
        dtype: t.dtype,
        shape: t.shape,
        data: t.data,
    }))
}

/// Put `checks` in the manifest `body`, with relative tolerance `rtol` for every check
/// when given (then `body.serving` is set, making the manifest format 2). Inline while the
/// encoded body stays within [`INLINE_LIMIT`] bytes; otherwise the checks go into a
/// golden file ([`encode_golden_file`]) appended to every variant with the chunk size of
/// the variant's model file, and the file's bytes are returned: they must reach the node
/// with the other files. Errors when a variant already has a file of that name, past
/// [`MAX_GOLDEN`] checks or [`MAX_GOLDEN_FILE`] bytes, or if the body breaks a field rule.
pub fn attach(
    body: &mut ManifestBody,
    checks: Vec<GoldenCheck>,
    rtol: Option<f32>,
) -> Result<Option<Vec<u8>>> {
    if checks.len() > MAX_GOLDEN {
        bail!("{} golden checks, at most {MAX_GOLDEN}", checks.len());
    }
    if body
        .artifact
        .variants
        .iter()
        .any(|v| v.files.iter().any(|f| f.name == GOLDEN_FILE))
    {
        bail!("{GOLDEN_FILE} is a reserved file name (golden checks go with --golden)");
    }
    if let Some(r) = rtol {
        if !(r.is_finite() && r >= 0.0) {
            bail!("the relative tolerance must be a finite non-negative number");
        }
        body.serving
            .get_or_insert_with(Default::default)
            .golden_rtol = vec![r; checks.len()];
    }
    body.golden = checks;
    let invalid = |e: String| anyhow::anyhow!("invalid manifest: {e}");
    if body.encode().len() <= INLINE_LIMIT {
        body.validate().map_err(invalid)?;
        return Ok(None);
    }
    let checks = std::mem::take(&mut body.golden);
    let bytes = encode_golden_file(&checks);
    if bytes.len() as u64 > MAX_GOLDEN_FILE {
        bail!(
            "the golden checks take {} bytes, at most {MAX_GOLDEN_FILE}",
            bytes.len()
        );
    }
    // Refuse here what every node would refuse at activation.
    decode_golden_file(&bytes).map_err(|e| anyhow::anyhow!("invalid golden checks: {e}"))?;
    body.serving.get_or_insert_with(Default::default);
    for v in &mut body.artifact.variants {
        let Some(model) = v.files.first() else {
            bail!("variant {:?} has no files", v.name);
        };
        let spec = spec_for_bytes(&bytes, model.spec.chunk_size);
        v.files.push(FileEntry {
            name: GOLDEN_FILE.to_string(),
            spec,
        });
    }
    body.validate().map_err(invalid)?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_protocol::UnixTime;
    use pollen_protocol::chunking::{ChunkSize, spec_for_bytes};
    use pollen_protocol::manifest::{Channel, DType};
    use pollen_protocol::rollout::RolloutPlan;

    fn body() -> ManifestBody {
        ManifestBody::single_file(
            Channel::new("ocr.det").expect("channel"),
            1,
            spec_for_bytes(&[7; 1000], ChunkSize::new(1 << 16).expect("chunk")),
            RolloutPlan::immediate(),
            UnixTime::from_secs(1_000),
        )
    }

    fn check(elements: usize) -> GoldenCheck {
        let t = |name: &str| TensorData {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![1, elements as u64],
            data: (0..elements)
                .flat_map(|i| (i as f32).to_le_bytes())
                .collect(),
        };
        GoldenCheck {
            inputs: vec![t("x")],
            expected: vec![t("y")],
            tolerance: DEFAULT_ATOL,
        }
    }

    #[test]
    fn small_checks_stay_inline_and_keep_format_1_without_rtol() {
        let mut b = body();
        assert_eq!(attach(&mut b, vec![check(64)], None).expect("attach"), None);
        assert_eq!(b.golden, [check(64)]);
        assert_eq!(b.serving, None, "no relative tolerance: format 1");
        assert_eq!(b.artifact.variants[0].files.len(), 1);
        let mut b = body();
        assert_eq!(
            attach(&mut b, vec![check(64)], Some(1e-3)).expect("attach"),
            None
        );
        assert_eq!(b.serving.expect("format 2").golden_rtol, [1e-3]);
    }

    #[test]
    fn large_checks_travel_as_the_variant_golden_file() {
        let mut b = body();
        // Two checks of 2 x 160 KiB: over the inline limit.
        let checks = vec![check(40_000), check(40_000)];
        let bytes = attach(&mut b, checks.clone(), Some(1e-3))
            .expect("attach")
            .expect("a golden file");
        assert!(b.golden.is_empty(), "nothing inline");
        assert!(b.encode().len() < INLINE_LIMIT, "the manifest stays small");
        let v = &b.artifact.variants[0];
        assert_eq!(v.model_file().map(|f| f.name.as_str()), Some("model.onnx"));
        let g = v.golden_file().expect("golden file entry");
        assert_eq!(g.name, GOLDEN_FILE);
        assert_eq!(g.spec, spec_for_bytes(&bytes, v.files[0].spec.chunk_size));
        assert_eq!(decode_golden_file(&bytes).expect("decodes"), checks);
        let s = b.serving.as_ref().expect("format 2");
        assert_eq!(
            s.golden_rtol,
            [1e-3, 1e-3],
            "one per check, in the file's order"
        );
        // Without a relative tolerance the manifest is still format 2.
        let mut b = body();
        assert!(
            attach(&mut b, vec![check(40_000)], None)
                .expect("attach")
                .is_some()
        );
        assert!(b.serving.is_some());
        // What nodes would refuse is refused here too.
        let mut long = check(40_000);
        long.inputs[0].name = "x".repeat(200);
        let e = attach(&mut body(), vec![long], None).expect_err("long name");
        assert!(e.to_string().contains("tensor name"), "{e}");
        // The name is reserved.
        let mut b = body();
        b.artifact.variants[0].files[0].name = GOLDEN_FILE.into();
        assert!(attach(&mut b, vec![check(4)], None).is_err());
    }

    /// A model with inputs `x` (FP32) and `n` (INT64) beside an initializer, outputs `y`
    /// (FP32) and `s` (a sequence), and a data set directory `set` in `dir`.
    fn layout(dir: &Path) -> PathBuf {
        use crate::onnx_pb::pbw::*;
        let mut seq = Vec::new();
        put_bytes(4, &tensor_type(1), &mut seq);
        let m = model(
            &[("x", tensor_type(1)), ("n", tensor_type(7))],
            &[("y", tensor_type(1)), ("s", seq)],
        );
        let path = dir.join("model.onnx");
        std::fs::write(&path, m).expect("model");
        path
    }

    fn pb(name: Option<&str>, dtype: u64, dims: &[i64], raw: &[u8]) -> Vec<u8> {
        use crate::onnx_pb::pbw::*;
        let mut t = head(dims, dtype, name);
        put_bytes(9, raw, &mut t);
        t
    }

    fn write_set(set: &Path, files: &[(&str, Vec<u8>)]) {
        std::fs::create_dir_all(set).expect("set dir");
        for (n, b) in files {
            std::fs::write(set.join(n), b).expect("pb");
        }
    }

    #[test]
    fn data_sets_in_order_with_names_or_positions() {
        let tmp = tempfile::tempdir().expect("tmp");
        let model = layout(tmp.path());
        let root = tmp.path().join("golden");
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (n, value) in [(2, 2.0f32), (10, 10.0)] {
            write_set(
                &root.join(format!("test_data_set_{n}")),
                &[
                    // Unnamed: the second graph input that is not an initializer.
                    ("input_1.pb", pb(None, 7, &[], &7i64.to_le_bytes())),
                    (
                        "input_0.pb",
                        pb(Some("x"), 1, &[1, 2], &f32s(&[value, 0.5])),
                    ),
                    ("output_0.pb", pb(None, 1, &[1, 2], &f32s(&[value, 0.5]))),
                    ("zipmap_output_1_as_tensor.pb", vec![0xff]),
                ],
            );
        }
        std::fs::write(root.join("README"), "not a data set").expect("file");
        let checks = golden_from_dir(&root, &model, 1e-3).expect("golden");
        assert_eq!(checks.len(), 2);
        assert_eq!(
            checks[0].expected[0].data,
            f32s(&[2.0, 0.5]),
            "test_data_set_2 before test_data_set_10"
        );
        let c = &checks[1];
        let names: Vec<&str> = c.inputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["x", "n"]);
        assert_eq!(c.inputs[1].dtype, DType::I64);
        assert_eq!(c.inputs[1].shape, Vec::<u64>::new());
        assert_eq!(c.expected[0].name, "y");
        assert_eq!(c.tolerance, 1e-3);
        // A data set directory on its own.
        let one = golden_from_dir(&root.join("test_data_set_10"), &model, 0.0).expect("one set");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].inputs, checks[1].inputs);
    }

    #[test]
    fn a_zipmaps_sequence_of_maps_is_read_as_the_probability_tensor_served() {
        use crate::onnx_pb::pbw::*;
        let dir = tempfile::tempdir().expect("tmp");
        // x -> Identity -> y -> ZipMap(labels "b", "a") -> s
        let mut seq = Vec::new();
        put_bytes(4, &tensor_type(1), &mut seq);
        let mut attr = Vec::new();
        put_bytes(1, b"classlabels_strings", &mut attr);
        put_bytes(9, b"b", &mut attr);
        put_bytes(9, b"a", &mut attr);
        let mut zipmap = Vec::new();
        put_bytes(1, b"y", &mut zipmap);
        put_bytes(2, b"s", &mut zipmap);
        put_bytes(4, b"ZipMap", &mut zipmap);
        put_bytes(5, &attr, &mut zipmap);
        let mut g = Vec::new();
        put_bytes(1, b"\x0a\x01x\x12\x01y\x22\x08Identity", &mut g);
        put_bytes(1, &zipmap, &mut g);
        put_bytes(11, &value("x", &tensor_type(1)), &mut g);
        put_bytes(12, &value("y", &tensor_type(1)), &mut g);
        put_bytes(12, &value("s", &seq), &mut g);
        let mut m = Vec::new();
        put_uint(1, 7, &mut m);
        put_bytes(7, &g, &mut m);
        let model = dir.path().join("model.onnx");
        std::fs::write(&model, m).expect("model");
        // onnxruntime's order: keys sorted ("a", "b"), not the labels' order.
        let map = |a: f32, b: f32| {
            let mut values = Vec::new();
            put_uint(2, 1, &mut values);
            for v in [a, b] {
                put_bytes(3, &pb(None, 1, &[], &v.to_le_bytes()), &mut values);
            }
            let mut m = Vec::new();
            put_uint(2, 8, &mut m);
            put_bytes(4, b"a", &mut m);
            put_bytes(4, b"b", &mut m);
            put_bytes(5, &values, &mut m);
            m
        };
        let sequence = |maps: &[Vec<u8>]| {
            let mut s = Vec::new();
            put_bytes(1, b"s", &mut s);
            put_uint(2, 4, &mut s);
            for m in maps {
                put_bytes(6, m, &mut s);
            }
            s
        };
        let set = dir.path().join("test_data_set_0");
        let x = pb(Some("x"), 1, &[2, 2], &[0; 16]);
        let y = pb(Some("y"), 1, &[2, 2], &[0; 16]);
        write_set(
            &set,
            &[
                ("input_0.pb", x.clone()),
                ("output_0.pb", y.clone()),
                ("output_1.pb", sequence(&[map(0.25, 0.75), map(0.9, 0.1)])),
            ],
        );
        let checks = golden_from_dir(&set, &model, 0.0).expect("golden");
        let s = &checks[0].expected[1];
        assert_eq!(
            (s.name.as_str(), s.dtype, &s.shape[..]),
            ("s", DType::F32, &[2u64, 2][..])
        );
        let got: Vec<f32> = s
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // Columns in the ZipMap's label order: "b", then "a".
        assert_eq!(got, [0.75, 0.25, 0.1, 0.9]);
        // A map without one of the labels is refused, naming it.
        let mut partial = Vec::new();
        put_bytes(4, b"a", &mut partial);
        put_bytes(4, b"c", &mut partial);
        let mut values = Vec::new();
        for v in [0.5f32, 0.5] {
            put_bytes(3, &pb(None, 1, &[], &v.to_le_bytes()), &mut values);
        }
        put_bytes(5, &values, &mut partial);
        write_set(&set, &[("output_1.pb", sequence(&[partial]))]);
        let e = golden_from_dir(&set, &model, 0.0).expect_err("refused");
        assert!(
            format!("{e:#}").contains("no key for the ZipMap's label"),
            "{e:#}"
        );
    }

    #[test]
    fn bad_layouts_are_refused_naming_the_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let model = layout(tmp.path());
        let x = || ("input_0.pb", pb(Some("x"), 1, &[1], &[0; 4]));
        let y = || ("output_0.pb", pb(Some("y"), 1, &[1], &[0; 4]));
        // (the files of a data set, what the refusal must say)
        type Case<'a> = (Vec<(&'a str, Vec<u8>)>, &'a [&'a str]);
        let cases: Vec<Case<'_>> = vec![
            (
                vec![x(), ("output_0.pb", pb(Some("z"), 1, &[1], &[0; 4]))],
                &["output_0.pb", "named \"z\"", "\"y\", \"s\""],
            ),
            (
                vec![
                    x(),
                    y(),
                    ("output_1.pb", vec![0x0a, 0x03, b's', b'e', b'q']),
                ],
                &["output_1.pb", "output \"s\" is a sequence"],
            ),
            (
                vec![x(), y(), ("output_1.pb", pb(Some("s"), 1, &[1], &[0; 4]))],
                &["output \"s\" is a sequence"],
            ),
            (
                vec![x(), ("input_2.pb", pb(None, 7, &[], &[0; 8])), y()],
                &["input_1.pb is missing"],
            ),
            (
                vec![x(), ("input_1.pb", pb(None, 6, &[], &[0; 4])), y()],
                &["input_1.pb", "INT32", "\"n\"", "INT64"],
            ),
            (
                vec![
                    x(),
                    ("input_1.pb", pb(None, 7, &[], &[0; 8])),
                    ("input_2.pb", pb(None, 1, &[], &[0; 4])),
                    y(),
                ],
                &["input_2.pb", "no input 2"],
            ),
            (vec![x()], &["no output_K.pb"]),
            (
                vec![x(), ("output_0.pb", pb(Some("y"), 16, &[1], &[0; 2]))],
                &["output_0.pb", "\"y\"", "BFLOAT16"],
            ),
        ];
        for (i, (files, want)) in cases.into_iter().enumerate() {
            let set = tmp.path().join(format!("case{i}"));
            write_set(&set, &files);
            let e = format!(
                "{:#}",
                golden_from_dir(&set, &model, 0.0).expect_err("refused")
            );
            for w in want {
                assert!(e.contains(w), "case {i}: {e:?} lacks {w:?}");
            }
        }
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).expect("dir");
        let e = format!(
            "{:#}",
            golden_from_dir(&empty, &model, 0.0).expect_err("empty")
        );
        assert!(e.contains("neither test_data_set_N"), "{e}");
        let many = tmp.path().join("many");
        for n in 0..=MAX_GOLDEN {
            write_set(&many.join(format!("test_data_set_{n}")), &[x(), y()]);
        }
        let e = format!(
            "{:#}",
            golden_from_dir(&many, &model, 0.0).expect_err("many")
        );
        assert!(e.contains("at most 16"), "{e}");
    }

    #[test]
    fn bounds_are_refused() {
        assert!(attach(&mut body(), vec![check(1); MAX_GOLDEN + 1], None).is_err());
        assert!(attach(&mut body(), vec![check(1)], Some(f32::NAN)).is_err());
        assert!(attach(&mut body(), vec![check(1)], Some(-1.0)).is_err());
    }
}
