#!/usr/bin/env bash
# pollen-protocol, the sans-IO core, must not depend on tokio, mio or libp2p.
set -euo pipefail
cd "$(dirname "$0")/.."
if cargo tree -p pollen-protocol -e normal --prefix none | grep -E '^(tokio|mio|libp2p)[ -]'; then
  echo "pollen-protocol must not depend on tokio, mio or libp2p" >&2
  exit 1
fi
