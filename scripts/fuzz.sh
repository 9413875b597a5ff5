#!/usr/bin/env bash
# Runs one fuzz target of fuzz/ on its committed corpus (not part of CI):
#
#   scripts/fuzz.sh [config|unpack] [seconds]     (defaults: config, 900)
#   scripts/fuzz.sh config|unpack cmin            minimise fuzz/corpus/TARGET
#
# Needs a nightly toolchain (FUZZ_TOOLCHAIN, default `nightly`); installs
# cargo-fuzz when it is missing. New corpus entries land in
# fuzz/corpus/TARGET/, crash reproducers in fuzz/artifacts/TARGET/.
#
# `unpack` writes files where an archive says, so it runs only inside a
# bubblewrap sandbox (Debian: bubblewrap) in which `/` is read-only and a
# fresh temporary folder is the one place it can write; the target itself
# refuses to start anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-config}
seconds=${2:-900}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
corpus=fuzz/corpus/$target
seeds=fuzz/seeds/$target
artifacts=fuzz/artifacts/$target

case $target in
config | unpack) ;;
*)
    echo "error: unknown fuzz target \`$target\`; the targets are config and unpack" >&2
    exit 2
    ;;
esac
if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "error: cargo fuzz needs the \`$toolchain\` toolchain" >&2
    echo "hint: rustup toolchain install nightly" >&2
    exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p "$corpus"

limits=(-timeout=30 -rss_limit_mb=2048)
run=(-max_total_time="$seconds" -print_final_stats=1 "${limits[@]}")
# Keeps one input per covered edge, smallest first, rather than one per
# hit-count bucket: a tenth of the size for the same edges.
cmin=(-set_cover_merge=1 -use_counters=0 "${limits[@]}")

if [ "$target" = config ]; then
    if [ "$seconds" = cmin ]; then
        exec nice -n 19 cargo "+$toolchain" fuzz cmin config "$corpus" -- "${cmin[@]}"
    fi
    mkdir -p "$artifacts"
    exec nice -n 19 cargo "+$toolchain" fuzz run config "$corpus" "$seeds" -- "${run[@]}"
fi

if ! command -v bwrap >/dev/null; then
    echo "error: the unpack target runs only in a bwrap sandbox, and bwrap is missing" >&2
    echo "hint: apt-get install bubblewrap" >&2
    exit 1
fi
nice -n 19 cargo "+$toolchain" fuzz build unpack
host=$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')
bin=$PWD/fuzz/target/$host/release/unpack

FUZZ_TMP=$(mktemp -d -t slate-fuzz-unpack.XXXXXX)
trap 'rm -rf "$FUZZ_TMP"' EXIT
mkdir "$FUZZ_TMP/corpus" "$FUZZ_TMP/min" "$FUZZ_TMP/artifacts"
find "$corpus" -maxdepth 1 -type f -exec cp -t "$FUZZ_TMP/corpus" {} +

# bwrap started by root keeps every capability unless told otherwise, and
# CAP_SYS_ADMIN remounts `/` writable: drop them all, then keep what unpacking
# as root needs (owners, modes, folders without write permission). --bind
# mounts are nodev, so a device node an archive makes opens nothing.
caps=()
if [ "$(id -u)" = 0 ]; then
    caps=(--cap-drop ALL --cap-add CAP_CHOWN --cap-add CAP_DAC_OVERRIDE
        --cap-add CAP_FOWNER --cap-add CAP_FSETID)
fi
sandboxed() {
    nice -n 19 bwrap --ro-bind / / --bind "$FUZZ_TMP" "$FUZZ_TMP" \
        --dev /dev --remount-ro /dev --proc /proc \
        --unshare-pid --unshare-net --unshare-ipc --unshare-uts --die-with-parent \
        "${caps[@]}" \
        --setenv FUZZ_TMP "$FUZZ_TMP" --setenv TMPDIR "$FUZZ_TMP" \
        --chdir "$FUZZ_TMP" "$bin" "$@"
}

if [ "$seconds" = cmin ]; then
    sandboxed "${cmin[@]}" -max_len=16384 "$FUZZ_TMP/min" "$FUZZ_TMP/corpus"
    find "$corpus" -maxdepth 1 -type f -delete
    find "$FUZZ_TMP/min" -maxdepth 1 -type f -exec cp -t "$corpus" {} +
    exit 0
fi

status=0
sandboxed "${run[@]}" -max_len=16384 -artifact_prefix="$FUZZ_TMP/artifacts/" \
    "$FUZZ_TMP/corpus" "$PWD/$seeds" || status=$?
find "$FUZZ_TMP/corpus" -maxdepth 1 -type f -exec cp -n -t "$corpus" {} +
if [ -n "$(ls -A "$FUZZ_TMP/artifacts")" ]; then
    mkdir -p "$artifacts"
    cp -t "$artifacts" "$FUZZ_TMP"/artifacts/*
fi
exit "$status"
