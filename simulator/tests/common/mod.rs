//! Helpers shared by the simulator's tests.

use pollen_sim::scenario::Scenario;
use std::path::Path;

/// Load `scenarios/<name>` from the repository.
pub fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(name);
    Scenario::load(&path).expect("scenario loads")
}
