#!/usr/bin/env bash
# What shipping logs to a sink that is down costs a build: one `slate build`
# of 8 trivial targets with no sink, and with a sink that refuses connections
# and one that takes them but never answers (syslog over TCP and
# Elasticsearch), side by side in one hyperfine run. See bench/README.md.
#
# Environment:
#   RUNS=20 WARMUP=2        hyperfine's --runs / --warmup
#
# It reports; it does not assert: it exits 0 whenever the benchmark ran.
set -euo pipefail

RUNS="${RUNS:-20}"
WARMUP="${WARMUP:-2}"

root="$(cd "$(dirname "$0")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (namespaces, overlayfs)"
for p in hyperfine busybox-static python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || {
        say "installing: $p"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null
    }
done

say "building slate (release)"
(cd "$root" && cargo build --release -p slate --quiet)
slate="${CARGO_TARGET_DIR:-$root/target}/release/slate"

tmp="$(mktemp -d -t slate-bench.XXXXXX)"
hole_pid=
cleanup() {
    [ -z "$hole_pid" ] || kill "$hole_pid" 2>/dev/null || true
    rm -rf --one-file-system "$tmp" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
busybox_project "$tmp"
proj="$tmp/proj"
export SLATE_CACHE="$tmp/cache"
"$slate" -q -C "$proj" bake >&2 || die "slate bake failed"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
closed=$(port)
hole=$(port)
# A listener that never accepts: connections complete in its backlog, and
# nothing is ever read or answered.
python3 -c "
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $hole)); s.listen(4096); time.sleep(86400)" &
hole_pid=$!

json="$root/target/bench/ship-dead-sink.json"
mkdir -p "$(dirname "$json")"
b="$slate -q -C $proj build -j 2"
say "measuring ($WARMUP warm-up + $RUNS runs each)"
hyperfine --warmup "$WARMUP" --runs "$RUNS" --export-json "$json" \
    -n "no sink" "$b" \
    -n "syslog, connection refused" "$b --ship syslog+tcp://127.0.0.1:$closed 2>/dev/null" \
    -n "syslog, never answers" "$b --ship syslog+tcp://127.0.0.1:$hole 2>/dev/null" \
    -n "elasticsearch, connection refused" "$b --ship elasticsearch+http://127.0.0.1:$closed/slate 2>/dev/null" \
    -n "elasticsearch, never answers" "$b --ship elasticsearch+http://127.0.0.1:$hole/slate 2>/dev/null"

python3 - "$json" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))["results"]
base = res[0]["median"] * 1e3
print(f"\nslate build of 8 targets, no sink: {base:.1f} ms (median)")
for r in res[1:]:
    m = r["median"] * 1e3
    print(f"  {r['command']:<36} {m:8.1f} ms  (+{m - base:.1f} ms)")
PY
exit 0
