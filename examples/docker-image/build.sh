#!/bin/sh
# Runs inside the VM: slate's agent is PID 1, so this starts dockerd itself.
set -eu

gcc -static -O2 -o greet greet.c

# dockerd wants cgroups; slate's init mounts none.
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
# No network inside (network = false): no bridge, no iptables. vfs needs no
# kernel module and is plenty for an image this small.
dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
    >/tmp/dockerd.log 2>&1 &
tries=0
until docker info >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 600 ]; then
        echo "dockerd did not start:" >&2
        cat /tmp/dockerd.log >&2
        exit 1
    fi
    sleep 0.2
done

docker build -t "greet:$VERSION" .
docker run --rm --network none "greet:$VERSION"   # the image runs
mkdir -p dist
docker save -o "dist/greet-$VERSION.docker.tar" "greet:$VERSION"
echo "saved greet:$VERSION"
