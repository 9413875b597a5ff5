#!/usr/bin/env bash
# Bake benchmark: baking the quickstart's two images from nothing with slate,
# against doing the same by hand (mmdebstrap, then apt-get install in a
# chroot), side by side in one run; then what a rebake of unchanged images
# costs. See bench/README.md.
#
# Environment: RUNS=2 (runs per side; each is a full bootstrap of two suites).
# It reports; it does not assert.
set -euo pipefail

RUNS="${RUNS:-2}"
root="$(cd "$(dirname "$0")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

for p in hyperfine mmdebstrap; do
    command -v "$p" >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null; }
done
say "building slate (release)"
(cd "$root" && cargo build --release -p slate --quiet)
slate="${CARGO_TARGET_DIR:-$root/target}/release/slate"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
proj="$work/quickstart"
mkdir -p "$proj"
cp "$root/examples/quickstart/slate.toml" "$proj/"
cp "$root/examples/quickstart/build.sh" "$proj/"

# The same apt options slate carries over from the host (snapshot mirrors).
apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy) ' > "$work/host-apt.conf" || true

cat > "$work/by-hand.sh" <<SCRIPT
#!/bin/sh
set -e
for suite in bookworm trixie; do
    dir="$work/hand-\$suite"
    rm -rf "\$dir"
    mmdebstrap --variant=minbase --aptopt="$work/host-apt.conf" "\$suite" "\$dir" >/dev/null 2>&1
    mount -t proc proc "\$dir/proc"
    chroot "\$dir" sh -c 'apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev make >/dev/null && gcc --version | head -n1 > /etc/slate-toolchain'
    umount "\$dir/proc"
done
SCRIPT
chmod +x "$work/by-hand.sh"

say "baking from nothing: slate vs by hand ($RUNS runs each; minutes)"
mkdir -p "$root/target/bench"
hyperfine --runs "$RUNS" --export-json "$root/target/bench/bake.json" \
    --prepare "rm -rf $work/cache $work/hand-bookworm $work/hand-trixie" \
    -n slate "SLATE_CACHE=$work/cache $slate -q -C $proj bake" \
    -n by-hand "$work/by-hand.sh"

say "rebaking unchanged images (all layers cached)"
SLATE_CACHE="$work/cache" "$slate" -q -C "$proj" bake
hyperfine -N --warmup 3 --runs 30 --export-json "$root/target/bench/rebake.json" \
    -n rebake "env SLATE_CACHE=$work/cache $slate -q -C $proj bake"

python3 - "$root/target/bench/bake.json" "$root/target/bench/rebake.json" <<'PY'
import json, sys
b = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
r = json.load(open(sys.argv[2]))["results"][0]
s, h = b["slate"]["median"], b["by-hand"]["median"]
print()
print(f"bake from nothing   slate {s:7.1f} s   by hand {h:7.1f} s   slate/by-hand {s/h:.2f}x   (target <= 1.1x)")
print(f"rebake, unchanged   median {r['median']*1000:.1f} ms  (target: under 50 ms of slate's own time)")
PY
