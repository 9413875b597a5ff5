#!/usr/bin/env bash
# Proves the README's first command on a bare system: bootstraps a minimal
# Debian 12 root filesystem, puts it into the state of a fresh cloud machine
# here (qemu-utils from bookworm-backports, the network's proxy CA trusted,
# Rust installed, nothing else), copies this working tree in and runs
# `./scripts/quickstart.sh` inside it as root. Then checks the artifacts, that
# no test-only tool was installed and that apt is healthy; then runs
# `./scripts/install-deps.sh vm` and checks QEMU and `slate check`; then
# `./scripts/install-deps.sh test` and calls each test tool once.
#
#   sudo ./scripts/bare-system-test.sh               # the whole test (minutes: a release build)
#   sudo ./scripts/bare-system-test.sh --setup-only  # bootstrap, enter, smoke-test Rust and cargo; stop
#
# KEEP=1 keeps the chroot for debugging (its path is printed). BARE_TMP sets the
# folder the chroot is made in (default: target/bare in the repo; it must be a
# real filesystem on which overlayfs upper dirs work, e.g. ext4, not overlayfs).
#
# Everything that runs in the chroot runs in a private mount (and PID)
# namespace: every mount it needs lives and dies with that namespace, so
# nothing stays mounted on the host and no process outlives it, whatever
# happens; the chroot folder is then removed, after checking that nothing
# under it is mounted in the host's namespace.
set -euo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "$0")/.." && pwd)
SETUP_ONLY=0
case "${1:-}" in
    "") ;;
    --setup-only) SETUP_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "usage: $0 [--setup-only]" >&2; exit 2 ;;
esac

SUITE=bookworm
TEST_ONLY_PKGS=(skopeo umoci docker-registry awscli qemu-user-static binfmt-support)
TEST_ONLY_CMDS=(skopeo umoci docker-registry aws qemu-aarch64-static update-binfmts)

# ---------------------------------------------------------------- helpers

PHASE="start"
PHASE_T0=$EPOCHREALTIME
T_START=$EPOCHREALTIME
TIMINGS=()
FAILED_MSG=""
OK_MSG="bare-system: OK"

elapsed() { # elapsed T0 -> seconds since T0, one decimal
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}
phase() { # phase NAME: end the running phase (recording its time), start NAME
    end_phase
    PHASE=$1
    PHASE_T0=$EPOCHREALTIME
    echo
    echo "== bare-system: $PHASE"
}
end_phase() {
    if [ "$PHASE" != start ]; then
        local s
        s=$(elapsed "$PHASE_T0")
        TIMINGS+=("$(printf '%-28s %7ss' "$PHASE" "$s")")
        echo "-- $PHASE: ${s}s"
        PHASE=start
    fi
}
die() {
    FAILED_MSG="$*"
    echo "bare-system: FAILED ($PHASE): $*" >&2
    exit 1
}
note() { echo "   $*"; }
prefix() { sed -u 's/^/   | /'; }
# show CMD...: CMD's output, prefixed; CMD runs in the background while this
# shell waits for it, so that a signal to this script is handled at once.
show() {
    { "$@" 2>&1 | prefix; } &
    wait $!
}

# ----------------------------------------------------------- preflight

[ "$(id -u)" = 0 ] || { echo "error: run as root (sudo $0): it bootstraps and enters a chroot" >&2; exit 2; }

phase "preflight"
for cmd in unshare chroot findmnt git tar awk sed dpkg-query apt-config realpath rustc; do
    command -v "$cmd" >/dev/null 2>&1 || die "\`$cmd\` is missing on this host"
done
if ! command -v mmdebstrap >/dev/null 2>&1; then
    note "installing mmdebstrap on the host"
    apt-get update -q 2>&1 | prefix
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap 2>&1 | prefix
    command -v mmdebstrap >/dev/null 2>&1 || die "could not install mmdebstrap"
fi

# The host's Debian mirror, from apt's own sources (one-line *.list and deb822
# *.sources, in the order apt reads them): prints "URI SUITE" per enabled
# `deb` entry.
apt_entries() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do
        [ -f "$f" ] || continue
        case "$f" in
            *.list)
                sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
                    awk '$1 == "deb" && NF >= 3 { print $2, $3 }' ;;
            *.sources)
                awk '
                    function flush(   n, m, i, j, U, S) {
                        if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
                            n = split(uris, U, " "); m = split(suites, S, " ")
                            for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) print U[i], S[j]
                        }
                        types = uris = suites = enabled = ""; key = ""
                    }
                    /^#/ { next }
                    /^[ \t]*$/ { flush(); next }
                    /^[ \t]/ { val = $0 }
                    /^[^ \t#][^:]*:/ { key = tolower(substr($0, 1, index($0, ":") - 1)); val = substr($0, index($0, ":") + 1) }
                    { if (key == "types") types = types " " val
                      else if (key == "uris") uris = uris " " val
                      else if (key == "suites") suites = suites " " val
                      else if (key == "enabled") { enabled = val; gsub(/[ \t]/, "", enabled) } }
                    END { flush() }' "$f" ;;
        esac
    done
}
ENTRIES=$(apt_entries)
MIRROR=$(awk '$1 !~ /security/ && $2 !~ /-security$/ { print $1; exit }' <<<"$ENTRIES")
SECURITY=$(awk '$2 ~ /-security$/ { print $1; exit }' <<<"$ENTRIES")
[ -n "$MIRROR" ] || die "found no Debian mirror in apt's sources (/etc/apt/sources.list, /etc/apt/sources.list.d/)"
MIRROR=${MIRROR%/}
note "mirror: $MIRROR${SECURITY:+ (security: $SECURITY)}"
# The chroot's sources are plain Debian 12, like a fresh machine's: the release,
# plus -updates and -security where the host has them.
CHROOT_SOURCES=("deb $MIRROR $SUITE main")
awk '{ print $2 }' <<<"$ENTRIES" | grep -q -- '-updates$' && CHROOT_SOURCES+=("deb $MIRROR $SUITE-updates main")
[ -n "$SECURITY" ] && CHROOT_SOURCES+=("deb ${SECURITY%/} $SUITE-security main")
# apt settings the host needs to reach its archive (here: a snapshot whose
# Release files are past their Valid-Until; or a proxy): a fresh machine on
# this network has the same.
APT_OPTS=()
while IFS= read -r line; do
    [ -n "$line" ] && APT_OPTS+=(--aptopt="$line")
done < <(apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy|https?::proxy) ' || true)

# The host's Rust toolchain, shown read-only in the chroot at the same path.
SYSROOT=$(cd "$REPO" && rustc --print sysroot)
SYSROOT=$(realpath "$SYSROOT")
case "$SYSROOT" in
    /|/usr|/usr/*|/bin|/bin/*|/lib|/lib/*|/sbin|/sbin/*|/etc|/etc/*|/var|/var/*)
        die "the host's Rust lives in $SYSROOT (a distro or system path); this test shows a self-contained toolchain (rustup's) in the chroot" ;;
esac
[ -x "$SYSROOT/bin/cargo" ] || die "no cargo next to rustc in $SYSROOT/bin"
note "rust: $(cd "$REPO" && rustc --version) ($SYSROOT)"

# The chroot's folder: on a real filesystem, where overlayfs works.
BASE=${BARE_TMP:-$REPO/target/bare}
mkdir -p "$BASE"
W=$(mktemp -d "$BASE/bare.XXXXXX")
W=$(realpath "$W")   # as /proc and mountinfo show it
chmod 755 "$W"
ROOT=$W/root

mounted_under() { # lists mount points at or under $1 in this (the host's) mount namespace
    local esc
    esc=$(printf '%s' "$1" | sed -e 's/\\/\\134/g' -e 's/ /\\040/g' -e 's/\t/\\011/g')
    awk -v p="$esc" '$5 == p || index($5, p "/") == 1 { print $5 }' /proc/self/mountinfo
}
procs_under() { # PIDs of the processes whose root or working folder is at or under $1
    local d r c
    for d in /proc/[0-9]*; do
        r=$(readlink "$d/root" 2>/dev/null) || continue
        c=$(readlink "$d/cwd" 2>/dev/null) || c=""
        case "$r/ $c/" in "$1"/*|*" $1"/*) echo "${d#/proc/}" ;; esac
    done
}
stop_namespace() { # ends the namespace still running (after a signal or an error), and waits for its processes
    local pid
    if [ -f "$W/ns.pid" ]; then
        pid=$(cat "$W/ns.pid")
        # Only our own unshare, in case the PID was reused.
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '^unshare '; then
            echo "bare-system: ending the chroot's namespace (unshare, PID $pid)" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$W/ns.pid"
    fi
    for _ in $(seq 1 100); do
        [ -z "$(procs_under "$W")" ] && return 0
        sleep 0.1
    done
    return 1
}
print_timings() {
    echo
    echo "timings:"
    printf '   %s\n' "${TIMINGS[@]}" "$(printf '%-28s %7ss' total "$(elapsed "$T_START")")"
}
cleanup() {
    local rc=$? left failed_phase=$PHASE stopped=1
    trap - EXIT INT TERM
    end_phase >/dev/null 2>&1 || true
    print_timings
    stop_namespace || stopped=0
    if [ "$stopped" = 0 ]; then
        echo "bare-system: processes still run in $W:" >&2
        procs_under "$W" | while read -r p; do echo "   $p $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)"; done >&2
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "bare-system: KEEP=1: the chroot stays in $ROOT; to enter it:"
        echo "   unshare -m --propagation private sh -c 'mount --bind $ROOT $ROOT; mount -t proc proc $ROOT/proc; mount --rbind /dev $ROOT/dev; mount --rbind /sys $ROOT/sys; mount --bind -o ro $SYSROOT $ROOT$SYSROOT; exec chroot $ROOT /usr/bin/env -i HOME=/root PATH=$SYSROOT/bin:/usr/sbin:/usr/bin:/sbin:/bin CARGO_HOME=/root/.cargo LANG=C.UTF-8 /bin/bash'"
    elif [ "$stopped" = 0 ]; then
        echo "bare-system: NOT removing $W" >&2
        rc=1 failed_phase=cleanup
        FAILED_MSG="refused to remove $W: processes still run in it (listed above)"
    else
        left=$(mounted_under "$W")
        if [ -n "$left" ]; then
            echo "bare-system: NOT removing $W: these are mounted under it in the host's namespace:" >&2
            echo "$left" >&2
            rc=1 failed_phase=cleanup
            FAILED_MSG="refused to remove $W: something is mounted under it in the host's namespace (listed above)"
        else
            rm -rf --one-file-system "$W"
        fi
    fi
    if [ "$rc" = 0 ]; then
        echo "$OK_MSG"
    elif [ "$rc" = 130 ] || [ "$rc" = 143 ]; then
        echo "bare-system: FAILED: interrupted (signal) in phase \"$failed_phase\"" >&2
    elif [ -n "$FAILED_MSG" ]; then
        echo "bare-system: FAILED ($failed_phase): $FAILED_MSG" >&2
    else
        echo "bare-system: FAILED in phase \"$failed_phase\" (exit $rc); see the output above" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fstype=$(findmnt -n -o FSTYPE -T "$W")
note "work folder: $W ($fstype)"
case "$fstype" in
    overlay|tmpfs|ramfs) die "$W is on $fstype: put it on a real filesystem (BARE_TMP=/some/ext4/folder)" ;;
esac
# An overlay mount with its upper dir here, as slate's sandboxes make them.
mkdir -p "$W/probe/lower" "$W/probe/upper" "$W/probe/work" "$W/probe/merged"
unshare --mount --propagation private sh -c '
    cd "$1" && mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work merged && touch merged/x' \
    probe "$W/probe" || die "overlayfs with its upper dir in $W does not work (filesystem $fstype)"
rm -rf "$W/probe"

# Runs "$@" inside the chroot, as root, in a fresh mount and PID namespace: the
# kernel file systems, the toolchain and a /run are mounted there only; when
# the command ends, the namespace (its mounts, its processes) goes with it.
NS_SETUP='
set -eu
root=$1 sysroot=$2; shift 2
mount --bind "$root" "$root"                  # / must be a mount point, as on a machine
mount -t proc proc "$root/proc"               # this PID namespace'"'"'s processes
mount --rbind /sys "$root/sys"                # carries /sys/fs/cgroup and its v1 controllers
mount --make-rslave "$root/sys"
mount --rbind /dev "$root/dev"                # with /dev/pts
mount --make-rslave "$root/dev"
mount -t tmpfs -o nosuid,nodev tmpfs "$root/dev/shm"   # its own, not the host'"'"'s
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs "$root/run"
mkdir -p "$root$sysroot"
mount --bind "$sysroot" "$root$sysroot"
mount -o remount,bind,ro "$root$sysroot"
exec chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH="$sysroot/bin:/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    CARGO_HOME=/root/.cargo "$@"
'
# in_ns ARGS...: `unshare ARGS` (a new mount and PID namespace), in the
# background with its PID recorded, so that on a signal the cleanup can end it
# (and with it, through --kill-child, everything in its namespace) at once.
in_ns() {
    local pid rc=0
    unshare --mount --propagation private --pid --fork --kill-child "$@" </dev/null &
    pid=$!
    echo "$pid" >"$W/ns.pid"
    wait "$pid" || rc=$?
    rm -f "$W/ns.pid"
    return "$rc"
}
in_chroot() { # in_chroot CMD [ARGS...]
    in_ns -- bash -c "$NS_SETUP" ns "$ROOT" "$SYSROOT" "$@"
}
in_chroot_sh() { # in_chroot_sh 'SCRIPT': a sh script in the chroot, as root, from /root/slate
    in_chroot /bin/sh -c "set -e; cd /root/slate; $1"
}
# Whether PKG is installed (or half-installed) in the chroot.
pkg_installed() {
    local st
    st=$(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f '${db:Status-Abbrev}' "$1" 2>/dev/null) || return 1
    case "${st:1:1}" in n|c|"") return 1 ;; *) return 0 ;; esac
}
check_no_test_only() {
    local found="" p c d
    for p in "${TEST_ONLY_PKGS[@]}"; do
        pkg_installed "$p" && found="$found $p"
    done
    for c in "${TEST_ONLY_CMDS[@]}"; do
        for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin /root/.cargo/bin; do
            if [ -e "$ROOT$d/$c" ] || [ -L "$ROOT$d/$c" ]; then found="$found $d/$c"; break; fi
        done
    done
    [ -z "$found" ] || die "test-only tools were installed by $1:$found"
    note "no test-only package installed (${TEST_ONLY_PKGS[*]}: none)"
}
check_apt_health() {
    local audit
    show in_chroot apt-get check || die "apt-get check reports broken packages after $1"
    audit=$(in_chroot dpkg --audit 2>&1) || true
    [ -z "$audit" ] || { echo "$audit" | prefix; die "dpkg --audit reports half-installed packages after $1"; }
    note "apt-get check and dpkg --audit: OK"
}
chroot_sources() { # the chroot's apt sources, as text
    local f
    for f in "$ROOT/etc/apt/sources.list" "$ROOT"/etc/apt/sources.list.d/*; do
        [ -f "$f" ] && grep -v '^[[:space:]]*$' "$f"
    done
    return 0
}
sources_digest() { chroot_sources | sha256sum | cut -c1-16; }

# ------------------------------------------------------------ bootstrap

phase "bootstrap ($SUITE minbase)"
# In a private mount namespace too: whatever it mounts goes with it.
show in_ns -- mmdebstrap --variant=minbase "${APT_OPTS[@]}" "$SUITE" "$ROOT" "${CHROOT_SOURCES[@]}"

# ---------------------------------------------- "a fresh cloud machine here"

phase "machine state"
# DNS, and localhost, as on the machine.
rm -f "$ROOT/etc/resolv.conf"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -s "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
# No daemon started by a package's maintainer script in a chroot (as usual for
# chroots; the PID namespace would end it anyway).
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
# The network this machine sits on inspects TLS with its own CA, which the
# machine trusts. That is the user's own network trust, which any machine there
# has, not something slate needs: a bare minbase has no ca-certificates
# package, so the bundle is copied as well; once ca-certificates is installed,
# update-ca-certificates rebuilds it, /usr/local/share/ca-certificates included.
mkdir -p "$ROOT/usr/local/share/ca-certificates" "$ROOT/etc/ssl/certs"
n=0
for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$crt" ] || continue
    cp -L "$crt" "$ROOT/usr/local/share/ca-certificates/"
    n=$((n + 1))
done
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
note "trusted: $n local CA(s) and the host's CA bundle"
# A fresh machine here comes with qemu-utils from bookworm-backports (so that
# Debian 12's own qemu-system-x86 cannot be installed next to it). Installed
# through a temporary backports source, which is then removed again.
bpo="$ROOT/etc/apt/sources.list.d/bare-system-backports.list"
echo "deb $MIRROR $SUITE-backports main" >"$bpo"
show in_chroot apt-get update -q
show in_chroot /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q -t "$SUITE-backports" --no-install-recommends qemu-utils
rm -f "$bpo"
show in_chroot apt-get update -q
in_chroot apt-get clean
qemu_utils=$(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f '${Version}' qemu-utils)
case "$qemu_utils" in *bpo*) ;; *) die "qemu-utils $qemu_utils is not from $SUITE-backports" ;; esac
note "qemu-utils $qemu_utils (from $SUITE-backports); apt sources:"
chroot_sources | prefix
# Rust as a user has it, and an empty CARGO_HOME: crates are downloaded as a
# new user's would be.
mkdir -p "$ROOT/root/.cargo"

# ------------------------------------------------------------- the repo

phase "copy the working tree"
dest="$ROOT/root/slate"
mkdir -p "$dest"
# Tracked files as they are in the working tree (uncommitted changes too;
# files deleted there are left out) and untracked files that are not ignored.
git -C "$REPO" ls-files -z --cached --others --exclude-standard --deduplicate |
    (cd "$REPO" && while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done) |
    tar -C "$REPO" --null --no-recursion -T - -cf - | tar -C "$dest" -xf -
note "$(find "$dest" -type f | wc -l) files; work tree vs HEAD: $(git -C "$REPO" status --porcelain | wc -l) changed or untracked path(s)"

if [ "$SETUP_ONLY" = 1 ]; then
    phase "smoke test (--setup-only)"
    show in_chroot_sh '
        echo "rustc: $(command -v rustc): $(rustc --version)"
        echo "cargo: $(command -v cargo): $(cargo --version)"
        echo "CARGO_HOME=$CARGO_HOME (entries: $(ls -A "$CARGO_HOME" | wc -l)); id: $(id -u); sudo: $(command -v sudo || echo none)"
        echo "cgroup mounts: $(grep -c " /sys/fs/cgroup" /proc/self/mountinfo)"
        unshare --mount --pid --fork --net true && echo "nested namespaces (mount, pid, net): OK"
        echo "processes in this namespace: $(ls -d /proc/[0-9]* | wc -l)"
        if touch "$(rustc --print sysroot)/x" 2>/dev/null; then echo "toolchain is writable"; exit 1; fi
        echo "toolchain: read-only"
        cargo fetch --locked
        echo "cargo fetch: $(ls "$CARGO_HOME/registry/cache/"*/ | wc -l) crates downloaded"
    '
    OK_MSG="bare-system: setup OK (bare Debian 12 with qemu-utils $qemu_utils from backports; Rust and cargo fetch work inside); quickstart not run (--setup-only)"
    exit 0
fi

# ---------------------------------------------------- the README's first command

phase "quickstart.sh (in the chroot)"
sources_before=$(sources_digest)
# The leftover-process listing uses shell builtins only, so it sees no helper.
show in_chroot_sh '
    ./scripts/quickstart.sh
    left=""
    for d in /proc/[0-9]*; do
        p=${d#/proc/}
        [ "$p" = $$ ] && continue
        read -r c <"$d/comm" 2>/dev/null || continue
        left="$left $p:$c"
    done
    [ -z "$left" ] || echo "bare-system: WARNING: processes left running after quickstart.sh:$left"
' || die "./scripts/quickstart.sh failed in the bare chroot (output above)"

phase "checks after quickstart"
art="$ROOT/root/slate/examples/quickstart/artifacts"
debs=()
for t in greet-bookworm greet-trixie; do
    shopt -s nullglob
    found=("$art/$t"/*.deb)
    shopt -u nullglob
    [ "${#found[@]}" -ge 1 ] || die "no .deb in examples/quickstart/artifacts/$t/"
    for f in "${found[@]}"; do
        rel=${f#"$art"/}
        grep -qF " $rel" "$art/SHA256SUMS" 2>/dev/null || grep -qF "*$rel" "$art/SHA256SUMS" 2>/dev/null ||
            die "$rel is not listed in artifacts/SHA256SUMS"
        debs+=("$rel")
    done
done
note "artifacts: ${debs[*]}"
show in_chroot_sh 'cd examples/quickstart/artifacts && sha256sum -c SHA256SUMS' ||
    die "sha256sum -c SHA256SUMS failed in examples/quickstart/artifacts"
for rel in "${debs[@]}"; do
    pkg=$(in_chroot dpkg-deb -f "/root/slate/examples/quickstart/artifacts/$rel" Package) ||
        die "$rel is not a valid .deb"
    note "$rel: a .deb of package $pkg"
done
check_no_test_only "install-deps (core, through quickstart.sh)"
# The machine's own packages are still there (Debian 12's qemu-system-x86
# would have replaced the backports qemu-utils).
pkg_installed qemu-utils || die "qemu-utils (from backports, preinstalled) was removed by quickstart.sh"
check_apt_health "quickstart"
[ "$(sources_digest)" = "$sources_before" ] || note "WARNING: quickstart changed the chroot's apt sources"
note "slate check (examples/quickstart):"
show in_chroot_sh 'cd examples/quickstart && ../../target/release/slate check' ||
    die "slate check failed after quickstart"

# ----------------------------------------------------- step two: the vm provider

phase "install-deps.sh vm (in the chroot)"
show in_chroot_sh './scripts/install-deps.sh vm' || die "./scripts/install-deps.sh vm failed in the chroot"

phase "checks after install-deps vm"
show in_chroot qemu-system-x86_64 --version || die "qemu-system-x86_64 --version does not work after install-deps vm"
pkg_installed qemu-utils || die "install-deps vm removed qemu-utils"
in_chroot qemu-img --version 2>&1 | head -n 1 | prefix || die "qemu-img does not work after install-deps vm"
note "qemu-system-x86 $(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f '${Version}' qemu-system-x86 2>/dev/null || echo '?'), qemu-utils $(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f '${Version}' qemu-utils)"
check_apt_health "install-deps vm"
check_no_test_only "install-deps vm"
[ "$(sources_digest)" = "$sources_before" ] || note "WARNING: install-deps vm changed the chroot's apt sources"
out=$(in_chroot_sh 'cd examples/quickstart && ../../target/release/slate check' 2>&1) || {
    echo "$out" | prefix
    die "slate check failed after install-deps vm"
}
echo "$out" | prefix
# Loosely: a line about the vm provider, and none that says it does not work.
vm_lines=$(grep -iE '(^|[^a-z])vm([^a-z]|$)' <<<"$out" || true)
if grep -qiE 'unavailable|not (available|usable|working|found|supported)|missing|cannot|fail' <<<"$vm_lines"; then
    die "slate check says the vm provider does not work: $vm_lines"
fi
if [ -n "$vm_lines" ]; then
    vm_state="vm provider reported working"
else
    vm_state="slate check exit 0 (no line about the vm provider found)"
    note "WARNING: slate check printed no line about the vm provider"
fi

# --------------------------------------------------- step three: the test tools

phase "install-deps.sh test (in the chroot)"
# The test group has servers (openssh-server, docker-registry) whose packages
# would start them: install-deps.sh itself must keep them from starting, so
# the chroot's own guard goes for this step.
rm -f "$ROOT/usr/sbin/policy-rc.d"
# In the same PID namespace as the install, so that a server it started
# would still be running to be seen (by process name: `pgrep -f` would find
# this very script).
show in_chroot_sh './scripts/install-deps.sh test && ! pgrep -x sshd && ! pgrep -x docker-registry && ! pgrep -x rsyslogd && ! pgrep -x nginx' ||
    die "./scripts/install-deps.sh test failed in the chroot, or left a server running (see above)"

phase "checks after install-deps test"
check_apt_health "install-deps test"
pkg_installed qemu-utils || die "install-deps test removed qemu-utils"
pkg_installed qemu-system-x86 ||
    die "install-deps test removed qemu-system-x86"
# Each tool the tests call, called once.
for probe in 'bwrap --version' 'skopeo --version' 'umoci --version' 'aws --version' \
    'openssl version' 'curl --version' 'pgrep -V' 'busybox true' 'arch-test amd64' \
    'qemu-aarch64-static --version' 'test -x /usr/bin/docker-registry' \
    '/usr/bin/python3 -c "import junitparser"' \
    '/usr/bin/python3 -c "import jsonschema"' 'groff --version' 'ssh -V' \
    'test -x /usr/sbin/sshd' 'test ! -e /usr/sbin/policy-rc.d' \
    'python3 -m venv --help' 'ip -V' 'rsyslogd -v' 'dpkg -L rsyslog-gnutls | grep -q lmnsd_gtls' \
    'nginx -v' 'chromium --version 2>/dev/null' 'chromedriver --version'; do
    out=$(in_chroot_sh "$probe" 2>&1) || { echo "$out" | prefix; die "\`$probe\` fails after install-deps test"; }
    note "$probe: $(head -n 1 <<<"$out")"
done
[ "$(sources_digest)" = "$sources_before" ] || note "WARNING: install-deps test changed the chroot's apt sources"

OK_MSG="bare-system: OK (quickstart on a bare Debian 12 with qemu-utils from backports: ${#debs[@]} .deb, sha256sum -c OK; no test-only packages installed; install-deps vm: qemu-system-x86_64 OK, $vm_state; install-deps test: every test tool runs)"
exit 0
