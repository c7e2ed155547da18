#!/usr/bin/env bash
# The checks to run before every commit: formatting, the dependency rule of the sans-IO
# core, and clippy over every target of the workspace with -D warnings. CI runs the first
# two and clippy on pollen-protocol only (its clippy.toml keeps clocks and sleeps out of the
# core); the workspace-wide clippy is a second full check build (about 6 minutes on 2 cores)
# that CI's time budget does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
scripts/dependency-rule.sh
cargo clippy --workspace --all-targets --all-features -- -D warnings
