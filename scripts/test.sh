#!/bin/sh
# Installs what is missing and runs the whole test suite, including the tests
# that need root, real sandboxes and a real Debian bootstrap.
set -eu
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo test --workspace --locked "$@"
