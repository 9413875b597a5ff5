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
            mkfs.ext4:e2fsprogs debugfs:e2fsprogs qemu-img:qemu-utils zstd:zstd aws:awscli openssl:openssl arch-test:arch-test; do
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

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is missing; install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
    exit 2
fi
