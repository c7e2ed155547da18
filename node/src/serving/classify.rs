//! One rule for the [`ErrorClass`] of an activation failure, so that a failure carries the
//! same class wherever it is found (load, analysis, optimisation, warm-up, golden checks,
//! in the node or in the trial child) and wherever it is shown (health reports, `pollen
//! status`, model metadata, the repository index).

use pollen_protocol::rollout::ErrorClass;

/// Phrases of tract's messages that mean an operator, or an attribute or input of one, that
/// tract does not implement: `Unimplemented(ZipMap)` and "Operator can not be made a
/// TypedOp" for an operator it does not know; "unsupported" / "not supported" from the
/// builders of operators it knows only in part; an element type it cannot hold
/// (`Unknown DatumType Bfloat16`, an ONNX type code it does not know).
const UNSUPPORTED: [&str; 6] = [
    "unimplemented",
    "can not be made a typedop",
    "unsupported",
    "not supported",
    "unknown datumtype",
    "unknown onnx tensorproto.datatype",
];

/// The class of an activation failure with this `message` (the whole error chain), found
/// at a step whose own class is `step`: [`ErrorClass::UnsupportedOp`] if the message says
/// tract lacks an operator or a construct, whichever step found it; else `step`.
pub fn classify(message: &str, step: ErrorClass) -> ErrorClass {
    let m = message.to_ascii_lowercase();
    if UNSUPPORTED.iter().any(|p| m.contains(p)) {
        ErrorClass::UnsupportedOp
    } else {
        step
    }
}

/// The label of a class, as every display shows it (e.g. `UnsupportedOp`).
pub fn label(class: ErrorClass) -> String {
    format!("{class:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_tract_lacks_is_unsupported_at_every_step() {
        // Load: an operator builder refusing an attribute.
        let at_load = "Dropout in training mode with a non-zero ratio is not supported";
        // Analysis: the placeholder of an unknown operator.
        let at_analysis = "Translating node #3 \"n0\" Unimplemented(ZipMap) ToTypedTranslator: \
                           Operator can not be made a TypedOp.";
        // Optimisation or warm-up: an operator set tract does not take.
        let at_optimisation = "Unsupported operator set for Pad operator";
        // An element type tract cannot hold, in a graph input or a Cast.
        let dtype = "Building node  (Cast): Unknown DatumType Float8e4m3fn";
        for (m, step) in [
            (at_load, ErrorClass::LoadError),
            (dtype, ErrorClass::LoadError),
            (at_analysis, ErrorClass::LoadError),
            (at_optimisation, ErrorClass::LoadError),
            (at_optimisation, ErrorClass::GoldenMismatch),
        ] {
            assert_eq!(classify(m, step), ErrorClass::UnsupportedOp, "{m}");
        }
        // Anything else keeps the class of the step that found it.
        let budget = "the model file has 9 bytes, over the model memory budget of 8 bytes";
        assert_eq!(
            classify(budget, ErrorClass::LoadError),
            ErrorClass::LoadError
        );
        let mismatch = "golden check 0, output 'y': element 3 is 0.5, expected 0.25";
        assert_eq!(
            classify(mismatch, ErrorClass::GoldenMismatch),
            ErrorClass::GoldenMismatch
        );
        assert_eq!(label(ErrorClass::UnsupportedOp), "UnsupportedOp");
    }
}
