#!/usr/bin/env bash
# Sandbox start-up benchmark: how long does it take to run `true` in a fresh
# environment and tear it down, with slate and with other sandboxing tools,
# all over the same busybox rootfs?  See bench/README.md.
#
# Environment:
#   RUNS=100 WARMUP=10      hyperfine's --runs / --warmup
#   BENCH_JSON=PATH         where hyperfine's JSON goes
#                           (default: target/bench/sandbox-startup.json)
#
# It reports; it does not assert: it exits 0 whenever the benchmark ran.
set -euo pipefail

RUNS="${RUNS:-100}"
WARMUP="${WARMUP:-10}"
TARGET_RATIO=1.5

root="$(cd "$(dirname "$0")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (namespaces, overlayfs, apt-get)"

# --- 1. tools ---------------------------------------------------------------
missing_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || printf '%s\n' "$p"
    done
}
updated=0
apt_install() { # apt_install PKG... ; runs apt-get update once, only if needed
    [ "$updated" = 1 ] || { apt-get update -qq; updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need=$(missing_pkgs hyperfine bubblewrap systemd-container busybox-static)
if [ -n "$need" ]; then
    say "installing: $(echo $need)"
    # shellcheck disable=SC2086
    apt_install $need
fi
# podman (with runc: crun refuses hybrid-cgroup hosts) is optional.
want=$(missing_pkgs podman runc)
if [ -n "$want" ]; then
    say "installing: $(echo $want)"
    # shellcheck disable=SC2086
    apt_install $want || say "could not install $(echo $want); podman will be left out"
fi
for t in hyperfine bwrap systemd-nspawn cargo python3; do
    command -v "$t" >/dev/null || die "$t not found"
done
[ -x /bin/busybox ] || die "/bin/busybox not found"

# --- 2. slate ---------------------------------------------------------------
say "building slate (release)"
(cd "$root" && cargo build --release -p slate --quiet)
slate="${CARGO_TARGET_DIR:-$root/target}/release/slate"
[ -x "$slate" ] || die "no slate binary at $slate"

# --- 3. rootfs --------------------------------------------------------------
tmp="$(mktemp -d -t slate-bench.XXXXXX)"
cleanup() { rm -rf --one-file-system "$tmp" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

rootfs="$tmp/rootfs"
mkdir -p "$rootfs/bin"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
    [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
# usr: systemd-nspawn refuses a tree without /usr
mkdir -p "$rootfs"/{etc,root,tmp,proc,dev,sys,run,usr}

# --- 4. slate project -------------------------------------------------------
proj="$tmp/proj"
mkdir -p "$proj"
tar -C "$rootfs" -czf "$proj/rootfs.tar.gz" .
cat >"$proj/slate.toml" <<'EOF'
[images.bench]
from = "tar:rootfs.tar.gz"
EOF
export SLATE_CACHE="$tmp/cache"
say "baking the bench image"
"$slate" -C "$proj" bake bench >&2 || die "slate bake failed"

# --- 5. probe, then measure -------------------------------------------------
names=() cmds=()
probe() { # probe NAME CMD... ; keeps the tool if one run succeeds
    local name="$1" out; shift
    if out=$("$@" 2>&1); then
        names+=("$name") cmds+=("$(printf '%q ' "$@")")
    else
        printf 'skipping %s: `%s` failed (exit %s):\n%s\n' "$name" "$*" "$?" "$out" >&2
        return 1
    fi
}
probe slate "$slate" -C "$proj" run bench -- true \
    || die "slate run failed (see above): this is a bug in slate"
probe bwrap bwrap --unshare-all --die-with-parent --ro-bind "$rootfs" / \
    --proc /proc --dev /dev --tmpfs /tmp /bin/true || true
# As root, bwrap keeps its capabilities unless told: this row is bwrap with
# what slate's sandbox does by default (no capabilities, a new session).
probe bwrap-nocaps bwrap --unshare-all --die-with-parent --cap-drop ALL --new-session \
    --ro-bind "$rootfs" / --proc /proc --dev /dev --tmpfs /tmp /bin/true || true
probe systemd-nspawn systemd-nspawn --quiet --register=no --keep-unit --console=pipe \
    --volatile=overlay -D "$rootfs" /bin/true || true
if command -v podman >/dev/null; then
    probe podman podman run --rm --network none --runtime runc \
        --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
        --rootfs "$rootfs" /bin/true || true
else
    say "skipping podman: not installed"
fi

json="${BENCH_JSON:-$root/target/bench/sandbox-startup.json}"
mkdir -p "$(dirname "$json")"
hf=(hyperfine -N --warmup "$WARMUP" --runs "$RUNS" --export-json "$json")
for i in "${!names[@]}"; do hf+=(-n "${names[$i]}" "${cmds[$i]}"); done
say "measuring ${names[*]} ($WARMUP warm-up + $RUNS runs each)"
"${hf[@]}"

# --- 6. table ---------------------------------------------------------------
python3 - "$json" "$TARGET_RATIO" <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))["results"]
target = float(sys.argv[2])
med = {r["command"]: r["median"] * 1e3 for r in res}
base = med.get("bwrap")
print()
print(f"{'tool':<16}{'median ms':>11}{'mean ms':>10}{'stddev':>9}{'min ms':>9}{'x bwrap':>9}")
for r in res:
    ratio = f"{med[r['command']] / base:.2f}" if base else "n/a"
    print(f"{r['command']:<16}{med[r['command']]:>11.2f}{r['mean']*1e3:>10.2f}"
          f"{r['stddev']*1e3:>9.2f}{r['min']*1e3:>9.2f}{ratio:>9}")
print()
if base and "slate" in med:
    ratio = med["slate"] / base
    verdict = "met" if ratio <= target else "NOT met"
    print(f"slate / bwrap median: {ratio:.2f}x  (target: <= {target}x) -> {verdict}")
else:
    print("slate / bwrap median: n/a (bwrap was not measured)")
print(f"hyperfine JSON: {sys.argv[1]}")
EOF
exit 0
