#!/usr/bin/env bash
# Every test of the project: the Rust workspace (unit, integration, fault
# and monitoring tests), then the Python SDK in its own virtual environment
# (created on first use under agent-sdk/python/.venv) against the `muster`
# binary the Rust tests built.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace
cargo build -p muster --bin muster
MUSTER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/muster" bash agent-sdk/python/scripts/test.sh
