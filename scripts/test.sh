#!/bin/sh
# Installs what is missing and runs the whole test suite, including the tests
# that need root, real sandboxes and a real Debian bootstrap.
set -eu
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
# The S3-compatible server the publish tests start on loopback (s3s-fs checks
# SigV4 signatures, so signing mistakes fail the tests). Built once.
[ -x target/tools/bin/s3s-fs ] ||
    cargo install s3s-fs@0.14.1 --features binary --locked --root target/tools
cargo test --workspace --locked "$@"
