#!/bin/sh
# Runs inside a fresh environment: compile, test, package as a .deb.
set -eu

make
./greet slate

arch=$(dpkg --print-architecture)
pkg=pkgroot
mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" dist
install -m 0755 greet "$pkg/usr/bin/greet"
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: greet
Version: ${VERSION}+${DISTRO}
Architecture: ${arch}
Maintainer: slate quickstart <quickstart@example.invalid>
Description: says hello (built by $(cat /etc/slate-toolchain))
CONTROL
dpkg-deb --root-owner-group --build "$pkg" "dist/greet_${VERSION}+${DISTRO}_${arch}.deb"
dpkg-deb --info "dist/greet_${VERSION}+${DISTRO}_${arch}.deb"
