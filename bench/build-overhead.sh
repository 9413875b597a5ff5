#!/usr/bin/env bash
# The fixed cost of `slate build`: 8 trivial targets in one `slate build`
# against 8 separate `slate run IMG -- true` (the environments alone), side
# by side in one hyperfine run, over the same busybox image. See
# bench/README.md.
#
# Environment:
#   RUNS=30 WARMUP=3        hyperfine's --runs / --warmup
#   JOBS=2                  `slate build -j`
#
# It reports; it does not assert: it exits 0 whenever the benchmark ran.
set -euo pipefail

RUNS="${RUNS:-30}"
WARMUP="${WARMUP:-3}"
JOBS="${JOBS:-2}"
TARGET_RATIO=1.5

root="$(cd "$(dirname "$0")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (namespaces, overlayfs)"
for p in hyperfine busybox-static; do
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
cleanup() { rm -rf --one-file-system "$tmp" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
busybox_project "$tmp"
proj="$tmp/proj"
export SLATE_CACHE="$tmp/cache"
"$slate" -q -C "$proj" bake >&2 || die "slate bake failed"
"$slate" -q -C "$proj" build -j "$JOBS" >&2 || die "slate build failed"

json="$root/target/bench/build-overhead.json"
mkdir -p "$(dirname "$json")"
runs8="for i in 1 2 3 4 5 6 7 8; do $slate -q -C $proj run bench -- true; done"
say "measuring ($WARMUP warm-up + $RUNS runs each)"
hyperfine --warmup "$WARMUP" --runs "$RUNS" --export-json "$json" \
    -n "slate build (8 targets, -j $JOBS)" "$slate -q -C $proj build -j $JOBS" \
    -n "8 x slate run" "bash -c '$runs8'"

python3 - "$json" "$TARGET_RATIO" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))["results"]
build, runs = (r["median"] * 1e3 for r in res)
print(f"\nslate build of 8 targets: {build:.1f} ms; 8 x slate run: {runs:.1f} ms")
ratio = build / runs
verdict = "met" if ratio <= float(sys.argv[2]) else "NOT met"
print(f"build / runs median: {ratio:.2f}x  (target: <= {sys.argv[2]}x) -> {verdict}")
PY
exit 0
