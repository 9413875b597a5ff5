#!/bin/sh
# Installs what is missing and runs the whole test suite as root, including
# the tests that need root, real sandboxes, QEMU, servers and a real Debian
# bootstrap (a plain `cargo test` lists those as ignored, with the reason).
# Arguments go to `cargo test` (e.g. `-p slate --test cli`).
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "error: run as root (sudo $0): the tests make sandboxes, mounts and VMs" >&2
    exit 2
fi
./scripts/install-deps.sh core vm test
# The S3-compatible server the publish tests start on loopback (s3s-fs checks
# SigV4 signatures, so signing mistakes fail the tests). Built once.
[ -x target/tools/bin/s3s-fs ] ||
    cargo install s3s-fs@0.14.1 --features binary --locked --root target/tools
# moto, the EC2 (and EBS) API server the ec2 tests start on loopback, with
# boto3 to read back what slate launched, tagged and registered. Built once.
[ -x target/tools/moto/bin/moto_server ] || {
    python3 -m venv target/tools/moto
    target/tools/moto/bin/pip install -q 'moto[server]==5.2.6'
}
case " $* " in
    *" -- "*) exec cargo test --workspace --locked "$@" --include-ignored ;;
    *) exec cargo test --workspace --locked "$@" -- --include-ignored ;;
esac
