#!/usr/bin/env bash
# Regenerates muster/v1 from proto/ (needs grpcio-tools: pip install -e '.[test]').
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gen_protos.py "$@"
