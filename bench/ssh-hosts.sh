#!/usr/bin/env bash
# The ssh provider's cost: 8 trivial targets built on 1 and on 2 ssh hosts
# (with the same number of slots in all), against the same build in local
# sandboxes, side by side in one hyperfine run; then one target alone over
# ssh against one alone here, for the per-target overhead of a warm host
# (slate and the layers already shipped). The hosts are real OpenSSH
# servers on loopback ports of this machine, each with its own slate cache:
# the ratios measure slate's overhead, not scale. See bench/README.md.
#
# Environment:
#   RUNS=10 WARMUP=2        hyperfine's --runs / --warmup
#
# It reports; it does not assert: it exits 0 whenever the benchmark ran.
set -euo pipefail

RUNS="${RUNS:-10}"
WARMUP="${WARMUP:-2}"

root="$(cd "$(dirname "$0")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (namespaces, overlayfs, sshd)"
for p in hyperfine busybox-static openssh-server openssh-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || {
        say "installing: $p"
        apt-get update -qq
        # No service starts: this script runs its own sshd on loopback.
        [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own_policy=1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null
        [ "${own_policy:-0}" = 0 ] || rm -f /usr/sbin/policy-rc.d
    }
done

say "building slate (release)"
(cd "$root" && cargo build --release -p slate --quiet)
slate="${CARGO_TARGET_DIR:-$root/target}/release/slate"

tmp="$(mktemp -d -t slate-bench.XXXXXX)"
pids=()
cleanup() {
    # The sessions first: slate's master connections keep theirs open for a
    # minute after a run.
    for p in "${pids[@]}"; do pkill -KILL -P "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf --one-file-system "$tmp" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- two build hosts: sshd on free loopback ports ---------------------------
mkdir -p /run/sshd "$tmp/ssh"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/client_key"
: >"$tmp/ssh/known_hosts"
ports=()
for i in 0 1; do
    h="$tmp/ssh/host$i"
    mkdir -p "$h"
    ssh-keygen -q -t ed25519 -N '' -f "$h/host_key"
    cp "$tmp/ssh/client_key.pub" "$h/authorized_keys"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf 'Port %s\nListenAddress 127.0.0.1\nHostKey %s\nAuthorizedKeysFile %s\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPidFile %s\nMaxSessions 64\nMaxStartups 64\nSetEnv SLATE_CACHE=%s\n' \
        "$port" "$h/host_key" "$h/authorized_keys" "$h/sshd.pid" "$h/cache" >"$h/sshd_config"
    /usr/sbin/sshd -D -e -f "$h/sshd_config" 2>>"$h/sshd.log" &
    pids+=($!)
    printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$h/host_key.pub")" >>"$tmp/ssh/known_hosts"
    ports+=("$port")
done
for port in "${ports[@]}"; do
    for _ in $(seq 500); do
        exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null && { exec 3<&- 3>&-; break; }
        sleep 0.02
    done
done

# --- the projects: one config, three provider sections ----------------------
rootfs="$tmp/rootfs"
mkdir -p "$rootfs/bin" "$rootfs"/{etc,root,tmp,proc,dev,sys,run,usr}
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
    [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
ssh_section() { # ssh_section SLOTS PORT...
    local slots=$1; shift
    local hosts=""
    for p in "$@"; do hosts="$hosts\"127.0.0.1:$p\", "; done
    printf '[providers.ssh]\nhosts = [%s]\nidentity = "%s"\nknown_hosts_file = "%s"\nslots = %s\n' \
        "${hosts%, }" "$tmp/ssh/client_key" "$tmp/ssh/known_hosts" "$slots"
}
project() { # project NAME PROVIDER TARGETS [ssh section args]
    local dir="$tmp/$1" provider=$2 n=$3; shift 3
    mkdir -p "$dir"
    tar -C "$rootfs" -czf "$dir/rootfs.tar.gz" .
    local values
    values=$(seq -s '", "' 1 "$n")
    {
        printf '[images.bench]\nfrom = "tar:rootfs.tar.gz"\n\n'
        printf '[builds.t]\nimage = "bench"\nprovider = "%s"\nmatrix = { n = ["%s"] }\n' "$provider" "$values"
        printf 'run = ["mkdir -p out && echo {n} > out/n"]\nartifacts = ["out/n"]\ninputs = []\n'
        [ $# -eq 0 ] || ssh_section "$@"
    } >"$dir/slate.toml"
}
project local8 sandbox 8
project one8 ssh 8 4 "${ports[0]}"
project two8 ssh 8 2 "${ports[@]}"
project local1 sandbox 1
project one1 ssh 1 4 "${ports[0]}"
export SLATE_CACHE="$tmp/cache"

say "cold: the first build on fresh hosts ships slate and the layers"
cold_start=$(date +%s%N)
"$slate" -q -C "$tmp/two8" build -j 4 >&2 || die "slate build over ssh failed"
cold_ms=$(( ($(date +%s%N) - cold_start) / 1000000 ))
for p in local8 one8 local1 one1; do
    "$slate" -q -C "$tmp/$p" build -j 4 >&2 || die "slate build ($p) failed"
done

json="$root/target/bench/ssh-hosts.json"
mkdir -p "$(dirname "$json")"
say "measuring ($WARMUP warm-up + $RUNS runs each)"
hyperfine -N --warmup "$WARMUP" --runs "$RUNS" --export-json "$json" \
    -n "8 targets, local sandboxes (-j 4)" "$slate -q -C $tmp/local8 build -j 4" \
    -n "8 targets, 1 ssh host (4 slots)" "$slate -q -C $tmp/one8 build -j 4" \
    -n "8 targets, 2 ssh hosts (2 slots each)" "$slate -q -C $tmp/two8 build -j 4" \
    -n "1 target, local sandbox" "$slate -q -C $tmp/local1 build" \
    -n "1 target, 1 ssh host" "$slate -q -C $tmp/one1 build"

python3 - "$json" "$cold_ms" <<'PY'
import json, sys
res = [r["median"] * 1e3 for r in json.load(open(sys.argv[1]))["results"]]
local8, one8, two8, local1, one1 = res
print()
print(f"cold (fresh hosts: slate and layers shipped), 8 targets on 2 hosts: {int(sys.argv[2])} ms")
print(f"8 targets: local {local8:.0f} ms, 1 ssh host {one8:.0f} ms, 2 ssh hosts {two8:.0f} ms")
print(f"throughput, 2 hosts vs 1 host (same slots, same machine): {one8 / two8:.2f}x")
print(f"8 targets over ssh vs local: {one8 / local8:.2f}x")
print(f"per-target overhead of ssh over the local sandbox, warm host: {one1 - local1:.0f} ms ({local1:.0f} vs {one1:.0f} ms)")
PY
exit 0
