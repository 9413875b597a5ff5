#!/usr/bin/env bash
# Layers shared between machines: a cold machine (an empty local cache)
# baking the quickstart's two images with `--cache-from` a local S3 server
# (s3s-fs) and with `--cache-from` a local OCI registry (Debian's
# docker-registry) that hold them, against baking them from nothing, in one
# run; and the bytes moved against the layers' size. See bench/README.md.
#
# Environment: RUNS=2 (runs per side; baking from nothing bootstraps two
# Debian suites each time). It reports; it does not assert.
set -euo pipefail

RUNS="${RUNS:-2}"
TARGET_RATIO=0.2
root="$(cd "$(dirname "$0")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

for p in hyperfine mmdebstrap python3 docker-registry; do
    command -v "$p" >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null; }
done
say "building slate (release) and the S3 server (s3s-fs, once)"
(cd "$root" && cargo build --release -p slate --quiet)
slate="${CARGO_TARGET_DIR:-$root/target}/release/slate"
s3s="$root/target/tools/bin/s3s-fs"
[ -x "$s3s" ] || cargo install s3s-fs@0.14.1 --features binary --locked --root "$root/target/tools" --quiet

work="$(mktemp -d)"
s3_pid= reg_pid=
cleanup() {
    umount -q "$work/cold" 2>/dev/null || true
    [ -z "$s3_pid" ] || kill "$s3_pid" 2>/dev/null || true
    [ -z "$reg_pid" ] || kill "$reg_pid" 2>/dev/null || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
proj="$work/quickstart"
mkdir -p "$proj" "$work/s3/cache"
cp "$root/examples/quickstart/slate.toml" "$root/examples/quickstart/build.sh" "$proj/"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$s3s" --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret "$work/s3" >/dev/null 2>&1 &
s3_pid=$!
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_DEFAULT_REGION=us-east-1 \
    AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL="http://127.0.0.1:$port"
url="s3://cache/quickstart"

# The registry: loopback only, its blobs in the work folder.
reg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog: {level: warn}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' \
    "$work/registry" "$reg_port" >"$work/registry.yml"
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
reg_pid=$!
for _ in $(seq 1 100); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$reg_port/v2/')" 2>/dev/null && break
    sleep 0.1
done
reg_url="oci://127.0.0.1:$reg_port/slate/quickstart"

say "filling the layer cache from one bake (not timed)"
SLATE_CACHE="$work/filler" "$slate" -q -C "$proj" bake --cache-to "$url" >&2
SLATE_CACHE="$work/filler" "$slate" -q -C "$proj" bake --cache-to "$reg_url" >&2
layers=$(du -sb "$work/filler/v1/layers" | cut -f1)
stored=$(du -sb "$work/s3/cache" | cut -f1)
reg_stored=$(du -sb "$work/registry" | cut -f1)

# Each run gets a new, empty ext4 file system for its cache, as a fresh
# machine's disk is. Not `rm -rf` of the last run's cache: for about 30 s
# after a large tree is deleted, ext4's inode allocator checks every
# recently freed inode it passes, which added 3-5 s of system time to a
# pull here (and about 1.5 s to a bake from nothing) that a fresh machine
# never pays. Without loop devices, a folder is used and that cost stays.
cold="$work/cold"
mkdir -p "$cold"
prepare="rm -rf $cold/c; sync"
if truncate -s 16G "$work/cold.img" && mkfs.ext4 -q -F "$work/cold.img" \
    && mount -o loop "$work/cold.img" "$cold" 2>/dev/null; then
    umount "$cold"
    prepare="umount -q $cold 2>/dev/null; mkfs.ext4 -q -F $work/cold.img && mount -o loop $work/cold.img $cold && sync"
    say "each run's cache: a new ext4 file system on a loop device"
else
    say "warning: no loop device: each run's cache is a folder emptied with rm -rf (slower on both sides)"
fi

say "cold machine: from nothing vs --cache-from ($RUNS runs each; minutes)"
mkdir -p "$root/target/bench"
hyperfine --runs "$RUNS" --export-json "$root/target/bench/layer-cache.json" \
    --prepare "$prepare" \
    -n "bake from nothing" "SLATE_CACHE=$cold/c $slate -q -C $proj bake" \
    -n "bake --cache-from" "SLATE_CACHE=$cold/c $slate -q -C $proj bake --cache-from $url" \
    -n "bake --cache-from registry" "SLATE_CACHE=$cold/c $slate -q -C $proj bake --cache-from $reg_url"

python3 - "$root/target/bench/layer-cache.json" "$TARGET_RATIO" "$layers" "$stored" "$reg_stored" <<'PY'
import json, sys
res = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
cold = res["bake from nothing"]["median"]
layers, stored, reg_stored = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(f"\nbake from nothing: {cold:.1f} s (median)")
for name, what in [("bake --cache-from", "S3 (s3s-fs)"), ("bake --cache-from registry", "OCI registry")]:
    pull = res[name]["median"]
    ratio = pull / cold
    verdict = "met" if ratio <= float(sys.argv[2]) else "NOT met"
    print(f"--cache-from {what}: {pull:.1f} s; / from nothing: {ratio:.3f}x  (target: <= {sys.argv[2]}x) -> {verdict}")
print(f"bytes moved per cold bake: {stored / 1e6:.1f} MB of tars from S3, {reg_stored / 1e6:.1f} MB stored in the registry (tars and manifests); the layers take {layers / 1e6:.1f} MB on disk")
PY
exit 0
