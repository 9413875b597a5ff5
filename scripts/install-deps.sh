#!/bin/sh
# Installs what slate and its tests need on Debian or Ubuntu (as root).
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "error: run as root (sudo $0): slate's sandboxes need root" >&2
    exit 2
fi

need=""
for pair in mmdebstrap:mmdebstrap debootstrap:debootstrap busybox:busybox-static \
            tar:tar sha256sum:coreutils pgrep:procps dpkg-deb:dpkg script:bsdutils gcc:gcc \
            skopeo:skopeo umoci:umoci qemu-aarch64-static:qemu-user-static \
            update-binfmts:binfmt-support docker-registry:docker-registry \
            mkfs.ext4:e2fsprogs debugfs:e2fsprogs zstd:zstd aws:awscli openssl:openssl arch-test:arch-test; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need="$need $pkg"
done
# busybox must be the static one: tests copy it into a bare rootfs.
if command -v busybox >/dev/null 2>&1 && ldd "$(command -v busybox)" >/dev/null 2>&1; then
    need="$need busybox-static"
fi
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need="$need debian-archive-keyring"
if [ -n "$need" ]; then
    echo "installing:$need"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need ca-certificates
fi

# QEMU for the vm provider. Where a newer qemu-utils (from backports) makes
# the release's qemu-system-x86 uninstallable, take qemu-system-x86 from the
# same backports suite, through this machine's own Debian mirror, without
# changing its apt sources.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v qemu-img >/dev/null 2>&1; then
    echo "installing: qemu-system-x86 qemu-utils"
    # Both named: apt must not resolve a clash by removing qemu-utils.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils; then
        . /etc/os-release
        mirror=$(sed -n -E -e 's/^URIs: *([^ ]+).*/\1/p' -e 's/^deb +(\[[^]]*\] +)?([^ ]+) .*/\2/p' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
            grep -v security | head -n 1)
        if [ -z "$mirror" ]; then
            echo "error: cannot install qemu-system-x86 (see above), and found no Debian mirror in apt's sources to try ${VERSION_CODENAME}-backports" >&2
            exit 1
        fi
        bpo=$(mktemp -d)
        trap 'rm -rf "$bpo"' EXIT
        mkdir -p "$bpo/lists/partial" "$bpo/archives/partial"
        { cat /etc/apt/sources.list 2>/dev/null || true
          echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror ${VERSION_CODENAME}-backports main"
        } >"$bpo/sources.list"
        opts="-o Dir::Etc::sourcelist=$bpo/sources.list -o Dir::State::lists=$bpo/lists -o Dir::Cache::archives=$bpo/archives"
        echo "retrying with qemu-system-x86 from ${VERSION_CODENAME}-backports ($mirror)"
        apt-get $opts update -q
        DEBIAN_FRONTEND=noninteractive apt-get $opts install -y -q --no-install-recommends \
            "qemu-system-x86/${VERSION_CODENAME}-backports" "qemu-utils/${VERSION_CODENAME}-backports"
        rm -rf "$bpo"
    fi
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is missing; install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
    exit 2
fi
