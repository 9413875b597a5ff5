#!/usr/bin/env bash
# VM start-up: a fresh VM through slate (`slate run IMG --provider vm -- true`:
# overlay, machine restored from its saved state, agent, `true`, teardown),
# the same with saved machines turned off (a kernel boot each time), and the
# bare kernel-boot floor: the same QEMU machine, kernel and initramfs, whose
# init only powers off. In one hyperfine run. See bench/README.md.
#
# Environment:
#   RUNS=10 WARMUP=1        hyperfine's --runs / --warmup
#   BENCH_JSON=PATH         where hyperfine's JSON goes
#                           (default: target/bench/vm-boot.json)
#   SLATE_CACHE=DIR         slate's cache (default: target/bench/vm-cache, kept
#                           between runs: the first run bakes Debian with a kernel)
#
# It reports; it does not assert: it exits 0 whenever the benchmark ran.
set -euo pipefail

RUNS="${RUNS:-10}"
WARMUP="${WARMUP:-1}"
TARGET_RATIO=0.5        # restored from a saved machine, against the floor
TARGET_BOOT_RATIO=1.3   # booted, against the floor

root="$(cd "$(dirname "$0")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (slate bakes Debian images)"

"$root/scripts/install-deps.sh" >/dev/null
command -v hyperfine >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hyperfine >/dev/null
}
say "building slate (release)"
(cd "$root" && cargo build --release -p slate --quiet)
slate="${CARGO_TARGET_DIR:-$root/target}/release/slate"

export SLATE_CACHE="${SLATE_CACHE:-$root/target/bench/vm-cache}"
proj="$(mktemp -d -t slate-bench.XXXXXX)"
trap 'rm -rf "$proj"' EXIT
printf '[images.vm]\nfrom = "debian:bookworm"\nvm = true\n' >"$proj/slate.toml"
# The same image, every VM booting its kernel.
boot="$proj/boot"
mkdir "$boot"
printf '[images.vm]\nfrom = "debian:bookworm"\nvm = true\n[providers.vm]\nsnapshots = false\n' >"$boot/slate.toml"
say "baking a Debian bookworm image with its kernel (cached after the first run)"
"$slate" -C "$proj" bake vm >&2
say "first VM (makes the base disk, kernel and initramfs, saves the booted machine; probes KVM once per host boot)"
t0=$(date +%s.%N)
"$slate" -C "$proj" run vm --provider vm -- true
first=$(python3 -c "print($(date +%s.%N) - $t0)")
say "second VM (everything cached: what every later VM costs)"
t0=$(date +%s.%N)
"$slate" -q -C "$proj" run vm --provider vm -- true
second=$(python3 -c "print($(date +%s.%N) - $t0)")
# A cold cache has just written a base disk of a gigabyte or so: let the
# kernel write it back now rather than during the measured boots.
sync

kdir=$(ls -td "$SLATE_CACHE"/v1/vm/kernels/*/ | head -n 1)
kernel="$kdir/vmlinux"
[ -f "$kernel" ] || die "no unpacked kernel in $kdir"
initrd=$(ls -t "$kdir"/initramfs-*.cpio | head -n 1)
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
append="console=ttyS0 panic=-1 reboot=t quiet mitigations=off cryptomgr.notests audit=0 apparmor=0 security=none ipv6.disable=1 rcupdate.rcu_expedited=1 8250.nr_uarts=1 nowatchdog tsc_early_khz=$khz slate.probe=1"
floor="qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 1024M -M pc -nodefaults -no-user-config -display none -no-reboot -serial stdio -device virtio-serial-pci -kernel $kernel -initrd $initrd -append '$append'"
grep -q 'broken' "$SLATE_CACHE/v1/vm/kvm-probe" 2>/dev/null || say "note: KVM works here, slate uses it; the floor is TCG"

json="${BENCH_JSON:-$root/target/bench/vm-boot.json}"
mkdir -p "$(dirname "$json")"
hyperfine --warmup "$WARMUP" --runs "$RUNS" --export-json "$json" \
    -n slate "$slate -q -C $proj run vm --provider vm -- true" \
    -n slate-boot "$slate -q -C $boot run vm --provider vm -- true" \
    -n floor "$floor"

python3 - "$json" "$TARGET_RATIO" "$first" "$second" "$TARGET_BOOT_RATIO" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))["results"]
target = float(sys.argv[2])
boot_target = float(sys.argv[5])
print(f"first VM run after the bake (base disk, boot files, saved machine, KVM probe): {float(sys.argv[3]):.2f} s")
print(f"second VM run (all cached): {float(sys.argv[4]):.2f} s")
med = {r["command"]: r["median"] for r in res}
print()
print(f"{'what':<12}{'median s':>10}{'mean s':>9}{'stddev':>9}{'min s':>8}")
for r in res:
    print(f"{r['command']:<12}{r['median']:>10.2f}{r['mean']:>9.2f}{r['stddev']:>9.2f}{r['min']:>8.2f}")
print()
for name, goal, what in [("slate", target, "restored"), ("slate-boot", boot_target, "booted")]:
    ratio = med[name] / med["floor"]
    verdict = "met" if ratio <= goal else "NOT met"
    print(f"slate ({what}) / bare boot floor median: {ratio:.2f}x  (target: <= {goal}x) -> {verdict}")
print(f"hyperfine JSON: {sys.argv[1]}")
PY
exit 0
