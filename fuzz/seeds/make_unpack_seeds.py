#!/usr/bin/env python3
"""Writes the seed layers of the `unpack` fuzz target to seeds/unpack/.

Each seed is a small tar archive shaped like an OCI layer, most of them
hostile: absolute paths, `..`, symlinks and hard links that point outside the
layer's folder, whiteouts (`.wh.NAME`, `.wh..wh..opq`) reached through such
links, and entries that replace one kind of file by another. The fuzz target
unpacks each into a fresh folder with a `canary` folder and a `witness` file
beside it, so `../canary` and `../witness` are the names an escape would use.
That folder already holds a lower layer: `etc/old`, `etc/keep`,
`var/cache/x`, `var/cache/sub/` and the symlinks `up -> ..`,
`canary-link -> ../canary` and `abs -> /`.

Run from anywhere: python3 fuzz/seeds/make_unpack_seeds.py
"""

import io
import os
import tarfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unpack")


def entry(name, kind=tarfile.REGTYPE, data=b"", link="", mode=None, uid=0, gid=0):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.uid, info.gid = uid, gid
    info.mtime = 1700000000
    if mode is None:
        mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mode = mode
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, io.BytesIO(data)
    return info, None


def d(name, **kw):
    return entry(name, tarfile.DIRTYPE, **kw)


def f(name, data=b"x\n", **kw):
    return entry(name, tarfile.REGTYPE, data=data, **kw)


def sym(name, link, **kw):
    return entry(name, tarfile.SYMTYPE, link=link, **kw)


def hard(name, link, **kw):
    return entry(name, tarfile.LNKTYPE, link=link, **kw)


SEEDS = {
    # What a layer normally holds.
    "plain": [
        d("etc"),
        f("etc/hostname", b"slate\n"),
        d("usr/bin"),
        f("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
        sym("usr/bin/alias", "tool"),
        hard("usr/bin/again", "usr/bin/tool"),
        sym("etc/abs", "/etc/hostname"),
    ],
    "modes-and-owners": [
        d("locked", mode=0o000),
        d("open", mode=0o777),
        f("open/setuid", mode=0o4755),
        f("open/sticky", mode=0o1644),
        f("open/owned", uid=1000, gid=1000),
        entry("open/fifo", tarfile.FIFOTYPE),
        entry("open/char", tarfile.CHRTYPE),
        entry("open/block", tarfile.BLKTYPE),
        f("./dot/./file"),
        f("double//slash"),
    ],
    "absolute-paths": [
        f("/escape-absolute"),
        d("/abs-dir"),
        f("/abs-dir/file"),
        sym("/abs-link", "/"),
    ],
    "parent-dirs": [
        f("../escape"),
        f("a/../../escape"),
        f("./../escape"),
        d("../canary/new-dir"),
        sym("../canary/link", "/"),
        hard("../canary/hard", "etc/passwd"),
    ],
    "symlink-then-write": [
        sym("up", ".."),
        f("up/escape"),
        sym("canary-link", "../canary"),
        f("canary-link/new"),
        f("canary-link/witness", b"changed\n"),
        d("canary-link/dir/sub"),
    ],
    "symlink-absolute": [
        sym("root", "/"),
        f("root/tmp/escape"),
        sym("etc", "/etc"),
        f("etc/escape"),
    ],
    "symlink-chain": [
        sym("a", "b"),
        sym("b", "c/../../canary"),
        d("c"),
        f("a/escape"),
        sym("c/deep", "../../../canary"),
        f("c/deep/escape"),
    ],
    "whiteout-through-symlink": [
        sym("canary-link", "../canary"),
        f("canary-link/.wh.witness"),
        f("canary-link/.wh.dir"),
        sym("up", ".."),
        f("up/.wh.witness"),
        f("up/.wh.canary"),
    ],
    "opaque-through-symlink": [
        sym("canary-link", "../canary"),
        f("canary-link/.wh..wh..opq"),
        sym("up", ".."),
        f("up/.wh..wh..opq"),
    ],
    "whiteout-absolute": [
        f("/.wh.etc"),
        f("/tmp/.wh.escape"),
        f("/.wh..wh..opq"),
    ],
    "whiteout-parent": [
        f("../.wh.canary"),
        f("../.wh.witness"),
        f("a/../../.wh.canary"),
        f("../.wh..wh..opq"),
    ],
    "whiteout-of-dest": [
        d("keep"),
        f("keep/file"),
        f(".wh."),
        f("./.wh."),
        f(".wh..wh..opq"),
        f("keep/.wh.."),
    ],
    "whiteouts-normal": [
        d("etc"),
        f("etc/old"),
        d("var/cache"),
        f("var/cache/x"),
        f("etc/.wh.old"),
        f("var/cache/.wh..wh..opq"),
        f("var/cache/y"),
        f(".wh.missing"),
        d(".wh.dir-whiteout"),
        sym(".wh.link-whiteout", "../canary"),
    ],
    "hard-link-outside": [
        hard("witness-link", "../witness"),
        f("witness-link", b"changed\n"),
        hard("passwd", "/etc/passwd"),
        sym("canary-link", "../canary"),
        hard("via-symlink", "canary-link/witness"),
        f("via-symlink", b"changed\n"),
    ],
    "hard-link-then-symlink": [
        f("file"),
        hard("hl", "file"),
        sym("file", "../witness"),
        f("hl", b"changed\n"),
        hard("hl2", "file"),
    ],
    "replace-kinds": [
        d("dir"),
        f("dir/inner"),
        f("dir"),
        f("file"),
        d("file"),
        sym("link", "../canary"),
        d("link"),
        f("link/inside"),
        sym("dir2", "../canary"),
        f("dir2"),
    ],
    # Through the symlinks the lower layer left.
    "lower-layer-links": [
        f("canary-link/.wh.witness"),
        f("canary-link/.wh..wh..opq"),
        f("up/.wh.canary"),
        f("up/.wh.witness"),
        f("abs/.wh.etc"),
        f("abs/tmp/escape"),
        d("canary-link/new"),
        hard("hl", "canary-link/witness"),
        f("etc/.wh.old"),
        f("var/cache/.wh..wh..opq"),
        f(".wh.up"),
        f("canary-link"),
    ],
    "dir-over-symlink-to-outside": [
        sym("x", "../canary"),
        d("x/dir"),
        d("x/new", mode=0o700),
        f("x/dir/.wh.inner"),
    ],
}


def write(name, entries, fmt):
    path = os.path.join(OUT, name + ".tar")
    with tarfile.open(path, "w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, data)
        end = tar.offset
    # Two zero blocks end an archive; tarfile pads to 10 KiB past them, which
    # would only give the fuzzer zeros to mutate.
    with open(path, "r+b") as out:
        out.truncate(end + 2 * tarfile.BLOCKSIZE)


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, entries in SEEDS.items():
        write(name, entries, tarfile.USTAR_FORMAT if name == "plain" else tarfile.GNU_FORMAT)
    # Names past ustar's 100 bytes: a GNU long name and a PAX path header.
    long_up = "a/" * 60 + "../" * 62 + "escape"
    long_wh = "l/" * 60 + ".wh.witness"
    write("long-names-gnu", [sym("l", "../canary"), f(long_wh), f(long_up)], tarfile.GNU_FORMAT)
    write("long-names-pax", [sym("l", "../canary"), f(long_wh), f(long_up)], tarfile.PAX_FORMAT)


if __name__ == "__main__":
    main()
