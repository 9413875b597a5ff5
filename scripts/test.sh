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
# Python servers the tests start on loopback, in a virtualenv of their own:
# moto (EC2 and EBS APIs, with boto3 to read back what slate launched and
# registered) and osmem-server (an in-memory OpenSearch-compatible server
# that takes Elasticsearch's _bulk API). Installed once.
py=target/tools/py
[ -x "$py/bin/python" ] || python3 -m venv "$py"
"$py/bin/python" -c 'import moto, boto3, osmem_server' 2>/dev/null ||
    "$py/bin/pip" install -q 'moto[server]==5.2.6' 'osmem-server==0.1.6'
case " $* " in
    *" -- "*) exec cargo test --workspace --locked "$@" --include-ignored ;;
    *) exec cargo test --workspace --locked "$@" -- --include-ignored ;;
esac
