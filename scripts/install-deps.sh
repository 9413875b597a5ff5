#!/usr/bin/env bash
# Installs what slate needs on Debian 12, Debian 13 or Ubuntu 24.04, as root.
#
#   scripts/install-deps.sh [core] [vm] [test]     (default: core)
#
#   core   bake Debian images and build in sandboxes: what scripts/quickstart.sh needs
#   vm     the vm provider: QEMU's x86 system emulator and qemu-img, mkfs.ext4
#   test   the test suite's own tools and servers (registry, S3 client, qemu-user, ...)
#
# It works from any apt state: it first repairs packages a failed earlier run
# left half-installed, asks apt for a dry run before installing anything (so a
# set apt cannot resolve is never half-applied), never lets apt remove a
# package, and takes the QEMU packages as one set from the release's
# backports suite where the release's own QEMU cannot be installed (a newer
# qemu-utils from backports is already there, as on many cloud images).
set -euo pipefail

say() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit "${2:-1}"; }

if [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0 $*): it installs packages with apt-get" 2
fi
command -v apt-get >/dev/null || die "apt-get not found: slate's install script supports Debian and Ubuntu" 2

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(core)
for g in "${groups[@]}"; do
    case "$g" in core | vm | test) ;; *) die "unknown group \`$g\` (core, vm or test)" 2 ;; esac
done

# shellcheck disable=SC1091
. /etc/os-release
distro="${ID:-debian}"
codename="${VERSION_CODENAME:-}"
arch="$(dpkg --print-architecture)"
case "$arch" in
    amd64) qemu_system=qemu-system-x86 ;;
    arm64) qemu_system=qemu-system-arm ;;
    *) qemu_system=qemu-system-x86 ;;
esac

# package|group|why: what each group needs. A package is asked for only
# when dpkg does not list it as installed (so half-installed ones count as
# missing and are completed).
wanted=(
    "mmdebstrap|core|bootstraps debian: images from the archive"
    "debian-archive-keyring|core|verifies the Debian archive's signatures"
    "ca-certificates|core|HTTPS for cargo and apt"
    "gcc|core|links slate (rustc calls cc)"
    "libc6-dev|core|links slate"
    "tar|core|unpacks tar: images"
    "zstd|core|unpacks .tar.zst images, kernel modules"
    "xz-utils|core|unpacks .tar.xz images, kernel modules"
    "$qemu_system|vm|runs the vm provider's guests"
    "qemu-utils|vm|qemu-img: VM disks and disk exports"
    "e2fsprogs|vm|mkfs.ext4: VM disks and disk exports"
    "qemu-user-static|test|runs the arm64 image test's binaries (registered by slate)"
    "arch-test|test|lets mmdebstrap bootstrap a foreign architecture"
    "busybox-static|test|the tests' network-free root filesystem"
    "bubblewrap|test|the isolation test runs the same probes in it"
    "skopeo|test|reads exported OCI images independently"
    "umoci|test|unpacks exported OCI images independently"
    "docker-registry|test|the OCI registry the tests push to and pull from"
    "awscli|test|reads back what slate publishes to S3"
    "openssl|test|signs and verifies provenance, serves HTTPS in the CA test"
    "curl|test|fetches over HTTPS in the CA test"
    "procps|test|pgrep: the tests check that no process is left"
    "python3-junitparser|test|reads the JUnit XML slate writes, as a CI server would"
    "groff-base|test|renders the manual page \`slate man\` prints"
    "python3-jsonschema|test|checks --log-format json events against docs/events.schema.json"
    "openssh-client|core|ssh: the ssh provider's connections to build hosts"
    "openssh-server|test|sshd: the ssh provider's tests start their own build hosts on loopback"
    "python3-venv|test|a virtualenv for moto, the EC2 API server the ec2 provider's tests start on loopback"
    "iproute2|test|ip: the ec2 tests give their instances' addresses to a network namespace of their own"
    "chromium|test|the report test opens report.html in a real browser, headless"
    "chromium-driver|test|chromedriver: the report test drives chromium through WebDriver"
    "rsyslog|test|rsyslogd: the log shipping tests start their own syslog server on loopback"
    "rsyslog-gnutls|test|rsyslog's TLS input, for shipping over TLS"
    "nginx-light|test|HTTPS and credentials in front of the tests' Elasticsearch-compatible server"
)

in_groups() {
    local g
    for g in "${groups[@]}"; do [ "$g" = "$1" ] && return 0; done
    return 1
}
installed() {
    [ "$(dpkg-query -W -f '${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

# 1. Repair what an interrupted or failed earlier run left behind.
if [ -n "$(dpkg --audit 2>/dev/null)" ] || ! apt-get check -q >/dev/null 2>&1; then
    say "repairing packages an earlier run left half-installed (dpkg --configure -a; apt-get -f install)"
    DEBIAN_FRONTEND=noninteractive dpkg --configure -a
    DEBIAN_FRONTEND=noninteractive apt-get -f install -y -q
fi

# 2. What is missing, and why it is wanted.
plain=() qemu=()
for row in "${wanted[@]}"; do
    IFS='|' read -r pkg group why <<<"$row"
    in_groups "$group" || continue
    installed "$pkg" && continue
    say "will install $pkg ($group): $why"
    case "$pkg" in qemu-*) qemu+=("$pkg") ;; *) plain+=("$pkg") ;; esac
done

apt_install() { # apt-get install, after a dry run that must succeed and remove nothing
    local sim
    if ! sim=$(DEBIAN_FRONTEND=noninteractive apt-get install -s -q --no-install-recommends "$@" 2>&1); then
        printf '%s\n' "$sim" | tail -n 15 >&2
        return 1
    fi
    # busybox-static takes the place of busybox; nothing else may go.
    if printf '%s\n' "$sim" | grep '^Remv ' | grep -v -q '^Remv busybox '; then
        printf '%s\n' "$sim" | grep '^Remv ' >&2
        say "apt would remove the packages above; not going ahead that way"
        return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

if [ ${#plain[@]} -gt 0 ] || [ ${#qemu[@]} -gt 0 ]; then
    say "apt-get update"
    apt-get update -q
fi

# A test tool this release does not package (Ubuntu 24.04 has no awscli)
# is left out with a warning: the tests that need it fail naming it.
if [ ${#plain[@]} -gt 0 ]; then
    kept=()
    for pkg in "${plain[@]}"; do
        if apt-cache policy "$pkg" 2>/dev/null | grep 'Candidate: [^(]' >/dev/null; then
            kept+=("$pkg")
        elif in_groups test && grep -q "^$pkg|test|" <<<"$(printf '%s\n' "${wanted[@]}")"; then
            say "warning: $distro $codename has no package \`$pkg\`; the tests that need it will fail until it is installed another way"
        else
            die "$distro $codename has no package \`$pkg\` (check apt's sources: universe on Ubuntu)"
        fi
    done
    plain=("${kept[@]}")
fi
# What is installed here starts no service (openssh-server, docker-registry
# would listen on every address): slate's tests start their own servers, on
# loopback, and stop them. Debian's policy-rc.d says so to the packages.
policy=/usr/sbin/policy-rc.d
policy_cleanup() { [ "${own_policy:-0}" = 0 ] || rm -f "$policy"; }
if [ ${#plain[@]} -gt 0 ]; then
    if [ ! -e "$policy" ]; then
        own_policy=1
        printf '#!/bin/sh\n# slate install-deps: no service starts while it installs\nexit 101\n' >"$policy"
        chmod 755 "$policy"
    fi
    apt_install "${plain[@]}" || { policy_cleanup; die "apt cannot install ${plain[*]} (see above); nothing was changed"; }
    policy_cleanup
fi

# 3. QEMU as one set. Packages of one QEMU build depend on each other by exact
# version, so mixing the release's with backports' cannot work: where some
# qemu package already comes from backports, or the release's set does not
# resolve, the whole set (named packages and what they pull in) comes from
# the release's backports suite.
backports_opts=()
backports_cleanup() { [ -z "${bpo_dir:-}" ] || rm -rf "$bpo_dir"; }
trap backports_cleanup EXIT
use_backports() {
    local suite="$codename-backports" mirror keyring comps
    [ -n "$codename" ] || die "no VERSION_CODENAME in /etc/os-release: cannot name the backports suite"
    if apt-cache policy 2>/dev/null | grep " $suite/" >/dev/null; then
        backports_opts=(-t "$suite")
        return
    fi
    # Not in apt's sources: add it for these commands only, through the
    # machine's own mirror, without touching /etc/apt.
    mirror=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
        sed -n -E -e 's/^URIs: *([^ ]+).*/\1/p' -e 's/^deb +(\[[^]]*\] +)?([^ ]+) .*/\2/p' |
        awk 'tolower($0) ~ /debian|ubuntu/ && $0 !~ /security/ && !found { print; found = 1 }')
    [ -n "$mirror" ] || die "cannot install QEMU from $codename (see above), and found no $distro mirror in apt's sources to try $suite"
    case "$distro" in
        ubuntu) keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg comps="main universe" ;;
        *) keyring=/usr/share/keyrings/debian-archive-keyring.gpg comps="main" ;;
    esac
    bpo_dir=$(mktemp -d)
    chmod 755 "$bpo_dir"  # apt downloads as _apt
    mkdir -p "$bpo_dir/lists/partial"
    { cat /etc/apt/sources.list 2>/dev/null || true
      echo "deb [signed-by=$keyring] $mirror $suite $comps"
    } >"$bpo_dir/sources.list"
    backports_opts=(-o "Dir::Etc::sourcelist=$bpo_dir/sources.list" -o "Dir::State::lists=$bpo_dir/lists" -t "$suite")
    say "adding $suite ($mirror) for this install only"
    apt-get "${backports_opts[@]}" update -q
}

if [ ${#qemu[@]} -gt 0 ]; then
    # The installed qemu packages are named too, so apt upgrades them with
    # the set instead of resolving a clash by removing them.
    have=$(dpkg-query -W -f '${Package} ${Version} ${db:Status-Abbrev}\n' 'qemu-*' 2>/dev/null | awk '$3 == "ii" { print $1 " " $2 }' || true)
    set_pkgs=("${qemu[@]}")
    while read -r p _; do
        [ -n "$p" ] && [[ " ${set_pkgs[*]} " != *" $p "* ]] && set_pkgs+=("$p")
    done <<<"$have"
    if grep -q '~bpo' <<<"$have"; then
        say "qemu packages from backports are installed ($(grep '~bpo' <<<"$have" | tr '\n' ' ')); taking ${qemu[*]} from $codename-backports too"
        use_backports
        apt_install "${backports_opts[@]}" "${set_pkgs[@]}" ||
            die "apt cannot install ${set_pkgs[*]} from $codename-backports (see above); nothing was changed"
    elif ! apt_install "${set_pkgs[@]}"; then
        say "the release's QEMU cannot be installed here; trying the whole set from $codename-backports"
        use_backports
        apt_install "${backports_opts[@]}" "${set_pkgs[@]}" ||
            die "apt cannot install ${set_pkgs[*]} from $codename or $codename-backports (see above); nothing was changed"
    fi
fi

# 4. Never leave broken packages behind.
apt-get check -q >/dev/null || die "apt-get check reports broken packages after the install; run \`apt-get -f install\`"

if in_groups core; then
    if ! command -v cargo >/dev/null 2>&1; then
        die "cargo is missing: install Rust 1.85 or newer (rustup, or your distribution's rustc and cargo), then run this again" 2
    fi
    v=$(rustc --version 2>/dev/null | awk '{ print $2 }')
    major=${v%%.*} rest=${v#*.} minor=${rest%%.*}
    if [ "${major:-0}" -lt 1 ] || { [ "$major" = 1 ] && [ "${minor:-0}" -lt 85 ]; }; then
        die "rustc $v is too old: slate needs Rust 1.85 or newer" 2
    fi
fi
say "ready (${groups[*]})"
