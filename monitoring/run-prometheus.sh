#!/usr/bin/env bash
# Starts Prometheus on this machine against a running `muster dev` (or
# `muster serve`), with Muster's recording and alert rules loaded.
#
#   monitoring/run-prometheus.sh                 # server HTTP on 127.0.0.1:7071
#   MUSTER_HTTP=10.0.0.5:7071 monitoring/run-prometheus.sh
#   MUSTER_TOKEN_FILE=viewer.token monitoring/run-prometheus.sh   # auth on
#
# With MUSTER_TOKEN_FILE (a file holding a viewer token's secret) it uses
# prometheus/prometheus-secure.yml, which sends that token.
#
# Prometheus listens on PROMETHEUS_LISTEN (default 127.0.0.1:9090) and keeps
# its data in a temporary directory removed on exit. Needs `prometheus` on
# PATH (Debian/Ubuntu: apt-get install prometheus).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
server="${MUSTER_HTTP:-127.0.0.1:7071}"
listen="${PROMETHEUS_LISTEN:-127.0.0.1:9090}"
interval="${SCRAPE_INTERVAL:-5s}"

command -v prometheus >/dev/null || { echo "prometheus is not installed (apt-get install prometheus)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
shipped="$here/prometheus/prometheus.yml"
token_file=/etc/prometheus/muster.token
if [ -n "${MUSTER_TOKEN_FILE:-}" ]; then
    shipped="$here/prometheus/prometheus-secure.yml"
    token_file="$(cd "$(dirname "$MUSTER_TOKEN_FILE")" && pwd)/$(basename "$MUSTER_TOKEN_FILE")"
fi
sed -e "s#127.0.0.1:7071#${server}#g" \
    -e "s#: 15s#: ${interval}#g" \
    -e "s#- rules/#- ${here}/prometheus/rules/#g" \
    -e "s#/etc/prometheus/muster.token#${token_file}#g" \
    "$shipped" > "$work/prometheus.yml"
echo "Prometheus on http://${listen} scraping muster at ${server} (agents via http://${server}/sd/agents)"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="$listen" --log.level=warn &
pid=$!
# Stopping the script stops Prometheus too, then removes its data.
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
wait "$pid"
