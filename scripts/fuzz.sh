#!/usr/bin/env bash
# A deeper run of the property-test fuzz suites (server/src/fuzz): the
# store record decoder, specs and agent messages from the wire, and agent
# sessions driven into the scheduler and into a running server. `cargo
# test` runs them with small case counts; this runs PROPTEST_CASES of each
# (default 20000, about five minutes on two cores).
#
#   scripts/fuzz.sh                 # 20000 cases per property
#   PROPTEST_CASES=200000 scripts/fuzz.sh
#
# A failing case is shrunk, printed, and saved under
# server/proptest-regressions/fuzz/ (commit it: it is replayed first).
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${PROPTEST_CASES:-20000}"
exec cargo test -p muster-server --lib fuzz:: -- --test-threads "${FUZZ_THREADS:-2}" "$@"
