#!/usr/bin/env bash
# Publish throughput: `slate publish` against `aws s3 cp --recursive` of the
# same files to the same S3-compatible server (s3s-fs on loopback), in one
# hyperfine run. See bench/README.md.
#
# Environment:
#   RUNS=5 WARMUP=1         hyperfine's --runs / --warmup
#   BIG_MIB=200 SMALL=30    one big file of BIG_MIB MiB, SMALL files of 1 MiB
#   BENCH_JSON=PATH         where hyperfine's JSON goes
#                           (default: target/bench/publish.json)
#
# It reports; it does not assert: it exits 0 whenever the benchmark ran.
set -euo pipefail

RUNS="${RUNS:-5}"
WARMUP="${WARMUP:-1}"
BIG_MIB="${BIG_MIB:-200}"
SMALL="${SMALL:-30}"
TARGET_RATIO=0.8

root="$(cd "$(dirname "$0")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- 1. tools ---------------------------------------------------------------
for t in hyperfine aws; do
    if ! command -v "$t" >/dev/null; then
        [ "$(id -u)" = 0 ] || die "$t is missing; run as root to install it"
        pkg=$t; [ "$t" = aws ] && pkg=awscli
        say "installing $pkg"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
    fi
done
s3s="$root/target/tools/bin/s3s-fs"
if [ ! -x "$s3s" ]; then
    say "building s3s-fs (once)"
    cargo install s3s-fs@0.14.1 --features binary --locked --root "$root/target/tools" --quiet
fi
say "building slate (release)"
(cd "$root" && cargo build --release -p slate --quiet)
slate="${CARGO_TARGET_DIR:-$root/target}/release/slate"

# --- 2. server and files ----------------------------------------------------
tmp="$(mktemp -d -t slate-bench.XXXXXX)"
pid=""
# s3s-fs does not end on SIGTERM while clients keep connections open, and a
# `wait` for it then never returned: ask, give it 5 s, then SIGKILL.
cleanup() {
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint="http://127.0.0.1:$port"
mkdir -p "$tmp/data/bench"
"$s3s" --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret "$tmp/data" \
    >"$tmp/s3s.log" 2>&1 &
pid=$!
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_DEFAULT_REGION=us-east-1 \
    AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL="$endpoint"
until curl -s -o /dev/null "$endpoint/"; do sleep 0.05; done

# A project whose artifacts folder looks like a finished build's.
proj="$tmp/proj"
art="$proj/artifacts"
mkdir -p "$art/app"
printf '[settings]\njobs = 1\n' >"$proj/slate.toml"
head -c "$((BIG_MIB << 20))" /dev/urandom >"$art/app/big.bin"
for i in $(seq 1 "$SMALL"); do head -c 1048576 /dev/urandom >"$art/app/small-$i.bin"; done
echo '{}' >"$art/app/provenance.json"
(cd "$art" && sha256sum app/*.bin >SHA256SUMS)
python3 - "$art" <<'PY'
import json, os, sys
art = sys.argv[1]
files = []
for line in open(os.path.join(art, "SHA256SUMS")):
    sha, path = line.split()
    files.append({"path": path, "size": os.path.getsize(os.path.join(art, path)), "sha256": sha})
m = {"run_id": "bench", "slate_version": "", "targets": [
    {"name": "app", "status": "succeeded", "image": "", "image_digest": "", "provider": "sandbox",
     "artifacts": files}]}
json.dump(m, open(os.path.join(art, "manifest.json"), "w"))
PY
total=$(du -sb "$art" | cut -f1)
say "publishing $((total >> 20)) MiB in $((SMALL + 4)) files"

# Every run starts from an empty bucket, so that both tools send every byte.
prepare="rm -rf $tmp/data/bench $tmp/data/.bucket-* && mkdir -p $tmp/data/bench"
json="${BENCH_JSON:-$root/target/bench/publish.json}"
mkdir -p "$(dirname "$json")"
hyperfine --warmup "$WARMUP" --runs "$RUNS" --prepare "$prepare" --export-json "$json" \
    -n slate "$slate -q -C $proj publish --to s3://bench/slate" \
    -n "aws s3 cp" "aws s3 cp --recursive --only-show-errors $art s3://bench/aws"

# --- 3. table ---------------------------------------------------------------
python3 - "$json" "$TARGET_RATIO" "$total" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))["results"]
target, total = float(sys.argv[2]), int(sys.argv[3])
med = {r["command"]: r["median"] for r in res}
print()
print(f"{'tool':<12}{'median s':>10}{'MiB/s':>9}{'stddev':>9}")
for r in res:
    print(f"{r['command']:<12}{r['median']:>10.2f}{total / r['median'] / 2**20:>9.1f}{r['stddev']:>9.2f}")
ratio = med["aws s3 cp"] / med["slate"]
verdict = "met" if ratio >= target else "NOT met"
print(f"\nslate throughput / aws s3 cp throughput: {ratio:.2f}x  (target: >= {target}x) -> {verdict}")
print(f"hyperfine JSON: {sys.argv[1]}")
PY
exit 0
