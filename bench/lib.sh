# Shared by the benchmarks that build over a busybox image; sourced.

# busybox_project DIR: a project in DIR whose image `bench` is a busybox
# rootfs (`tar:rootfs.tar.gz`) and whose build `t` is 8 trivial targets,
# each writing one artifact.
busybox_project() {
    local dir="$1" rootfs="$1/rootfs" applet
    mkdir -p "$rootfs/bin" "$rootfs"/{etc,root,tmp,proc,dev,sys,run,usr}
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $("$rootfs/bin/busybox" --list); do
        [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
    done
    mkdir -p "$dir/proj"
    tar -C "$rootfs" -czf "$dir/proj/rootfs.tar.gz" .
    {
        printf '[images.bench]\nfrom = "tar:rootfs.tar.gz"\n\n'
        printf '[builds.t]\nimage = "bench"\nmatrix = { n = ["1", "2", "3", "4", "5", "6", "7", "8"] }\n'
        printf 'run = ["mkdir -p out && echo {n} > out/n"]\nartifacts = ["out/n"]\ninputs = []\n'
    } >"$dir/proj/slate.toml"
}
