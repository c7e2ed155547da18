//! ONNX models from untrusted bytes, as a node reads a model file before tract does (the
//! file is the publisher's, signed through its content id; a node must not panic on it):
//! `serving::onnx::parse_graph` and `prepare` (constants made initializers, `If` nodes they
//! decide folded, `ZipMap` outputs stripped, 8-bit `DequantizeLinear` of initializers
//! computed, `Scaler` and `TreeEnsembleRegressor` rewritten, INT64 outputs cast back), and
//! what `pollen publish` does with a graph (`declare_const`).
//!
//! Checks: nothing panics. For a graph that parses: `onnx_graph_outputs` names its
//! outputs; each input's declaration renders; a constant `declare_const` accepts is one
//! element of the input's type; `prepare` without constants returns the bytes unchanged
//! unless there is something above to rewrite; whatever `prepare` returns
//! carries the original graph, parses again, and no longer has the constants as inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollen_node::serving::onnx::{
    declare_const, dtype_of_elem, onnx_graph_outputs, parse_graph, prepare,
};

/// Values tried for `--const NAME=VALUE`.
const VALUES: [&str; 6] = ["1", "0", "16000", "true", "-1", "0.5"];

fuzz_target!(|data: &[u8]| {
    let Ok(g) = parse_graph(data) else {
        assert!(onnx_graph_outputs(data).is_none());
        let _ = prepare(data.to_vec(), &[]);
        return;
    };
    assert_eq!(
        onnx_graph_outputs(data),
        Some(g.outputs.iter().map(|o| o.name.clone()).collect())
    );
    let nodes = g.all_nodes();
    let _ = g.find_op("If");
    if let Some(n) = nodes.first() {
        assert!(g.find_node(n.display_name()).is_some());
        let _ = n.qualified_op();
    }
    let _ = g.if_condition_inputs();

    let value = VALUES[data.len() % VALUES.len()];
    let mut consts = Vec::new();
    for input in g.inputs.iter().take(4) {
        let _ = (input.as_declaration(), input.is_fixed(), input.is_scalar());
        if let Ok(c) = declare_const(&g, &format!("{}={value}", input.name)) {
            // The name given may be trimmed or cut at an `=`: the constant is of the input
            // it names.
            let named = g.input(&c.name).expect("a constant names a graph input");
            assert_eq!(Some(c.dtype), named.elem.and_then(dtype_of_elem));
            let size = c.dtype.size().expect("a fixed-size type");
            assert_eq!(c.data.len(), size, "a constant is one element");
            assert!(c.shape.iter().all(|&d| d == 1));
            if !consts
                .iter()
                .any(|k: &pollen_protocol::manifest::TensorData| k.name == c.name)
            {
                consts.push(c);
            }
        }
    }

    let rewrites = g.nodes.iter().any(|n| {
        n.op_type == "ZipMap"
            || (n.op_type == "DequantizeLinear" && n.inputs.len() >= 2)
            || (n.domain == "ai.onnx.ml"
                && matches!(n.op_type.as_str(), "Scaler" | "TreeEnsembleRegressor"))
    }) || g.outputs.iter().any(|o| o.elem == Some(7)); // INT64 outputs are cast back
    for consts in [&[][..], &consts[..]] {
        let Ok(p) = prepare(data.to_vec(), consts) else {
            continue;
        };
        // Compared as text: a NaN attribute value is not equal to itself.
        assert_eq!(
            format!("{:?}", p.graph),
            format!("{g:?}"),
            "prepare changed the graph it reports"
        );
        if consts.is_empty() && !rewrites {
            assert_eq!(p.bytes, data, "nothing to do, yet the bytes changed");
        }
        let after = parse_graph(&p.bytes).expect("a prepared model parses");
        for c in consts {
            assert!(
                after.input(&c.name).is_none(),
                "constant {:?} is still an input",
                c.name
            );
        }
    }
});
