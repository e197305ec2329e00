#!/usr/bin/env bash
# Checks the Python SDK the way a new user's machine would: creates a virtual
# environment (the path given, else agent-sdk/python/.venv), installs the
# package with its test extras, then runs ruff, mypy --strict and pytest.
#
# The tests start a real `muster serve`: MUSTER_BIN names the binary,
# defaulting to $CARGO_TARGET_DIR/debug/muster (or <repo>/target/debug/muster),
# so build it first: `cargo build -p muster --bin muster`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$venv/bin/python" ]; then
  echo "creating a virtual environment in $venv"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here[test]"

cd "$here"
echo "ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
echo "mypy --strict"
"$venv/bin/mypy"
echo "pytest"
"$venv/bin/pytest" -q
