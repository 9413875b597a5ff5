#!/bin/sh
# Installs what is missing for slate's main job (scripts/install-deps.sh core:
# no QEMU, no test tools), builds slate, and runs the main job on the bundled
# example: bake two Debian images, build a .deb in a fresh environment for each.
set -eu
cd "$(dirname "$0")/.."

./scripts/install-deps.sh core
cargo build --release --locked -p slate
./target/release/slate -C examples/quickstart build "$@"
echo
echo "artifacts (checked with sha256sum -c):"
cd examples/quickstart/artifacts
sha256sum -c SHA256SUMS
