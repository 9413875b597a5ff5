#!/usr/bin/env bash
# Debian's own `hello` source package built for bookworm and for trixie, with
# slate (one build, a matrix over the two suites, `-j 2`) and with sbuild in
# unshare mode (one sbuild per suite, both at once), alternately in one run:
# the whole run's wall time, and the time outside dpkg-buildpackage (making
# and removing the environment, apt-get update, installing the build
# dependencies). See bench/README.md.
#
# Environment:
#   RUNS=3                 timed runs per tool, alternating; slate's first run
#                          of each cache set-up is the cold one (empty cache
#                          mount), the others are warm
#   VARIANTS="apt lists deps"
#                          slate's set-ups timed: apt = caches =
#                          ["/var/cache/apt/archives"] (the headline; apt's
#                          folders are `private` by default); lists = that and
#                          /var/lib/apt/lists, with `apt-get update -o
#                          APT::Get::List-Cleanup=false` (otherwise each
#                          suite's update deletes the other's lists from the
#                          folder: lists-plain times that); locked = the
#                          archive with sharing = "locked" (the targets take
#                          turns); deps = the build dependencies baked
#                          into the image (debian/control copied in, then
#                          `apt-get build-dep`: a layer rebaked only when
#                          debian/control changes; the script times that
#                          bake once, from this run's empty apt folders)
#   JOBS=2                 `slate build -j`
#   SBUILD_JOBS=2          sbuild processes at once (2: both suites together)
#   SBUILD_USER=sbuild-bench  the user sbuild runs as (made if missing, with
#                          /etc/subuid and /etc/subgid ranges; kept afterwards,
#                          with its chroot tarballs in ~/.cache/sbuild)
#   REMAKE_TARBALLS=1      make the sbuild chroot tarballs again
#   HELLO_VERSION=2.10-3   the source version (bookworm's), built for both
#                          suites: trixie's is incomplete on snapshot mirrors
#   SLATE_CACHE            default target/bench/debian-hello-cache (kept, so
#                          the two images are baked once; the cache mounts
#                          this run makes are removed at exit)
#   BENCH_JSON             default target/bench/debian-hello.json
#
# It reports; it does not assert: it exits 0 whenever the benchmark ran.
set -euo pipefail

RUNS="${RUNS:-3}"
VARIANTS="${VARIANTS:-apt lists deps}"
JOBS="${JOBS:-2}"
SBUILD_JOBS="${SBUILD_JOBS:-2}"
SBUILD_USER="${SBUILD_USER:-sbuild-bench}"
HELLO_VERSION="${HELLO_VERSION:-2.10-3}"
SUITES="bookworm trixie"
TARGET_WHOLE=0.75
TARGET_OUTSIDE=0.2

root="$(cd "$(dirname "$0")/.." && pwd)"
export BENCH_DIR="$root/bench" # bench/spans.py, for the Python parts
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (namespaces, overlayfs, apt-get, useradd)"
[ "$RUNS" -ge 1 ] 2>/dev/null || die "RUNS must be a number >= 1"
for v in $VARIANTS; do
    case "$v" in apt | lists | lists-plain | locked | deps) ;; *) die "unknown variant \`$v\` (apt, lists, lists-plain, locked, deps)" ;; esac
done

# --- 1. tools ---------------------------------------------------------------
missing_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || printf '%s\n' "$p"
    done
}
need=$(missing_pkgs sbuild mmdebstrap uidmap zstd dpkg-dev debian-archive-keyring python3)
if [ -n "$need" ]; then
    say "installing: $(echo $need)"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
for t in sbuild mmdebstrap newuidmap zstd dpkg-source python3 cargo; do
    command -v "$t" >/dev/null || die "$t not found"
done
arch="$(dpkg --print-architecture)"

# --- 2. slate ---------------------------------------------------------------
say "building slate (release)"
(cd "$root" && cargo build --release -p slate --quiet)
slate="${CARGO_TARGET_DIR:-$root/target}/release/slate"
[ -x "$slate" ] || die "no slate binary at $slate"
export SLATE_CACHE="${SLATE_CACHE:-$root/target/bench/debian-hello-cache}"
mkdir -p "$SLATE_CACHE"

work="$(mktemp -d -t slate-debian-hello.XXXXXX)"
chmod 755 "$work" # sbuild's user reads the .dsc and writes its build folders
projects=()
cleanup() {
    local p
    # The cache mounts of this run's projects, with their locks (the
    # projects' paths die with $work, so nothing would use them again).
    for p in "${projects[@]}"; do
        "$slate" -q -C "$p" images 2>/dev/null \
            | sed -n 's/^cache .*(\(.*\)\/[^/]*)$/\1/p' | sort -u \
            | while read -r d; do rm -rf --one-file-system "$d"; done
    done
    rm -rf --one-file-system "$work" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 3. the mirror, and the hello source ------------------------------------
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
mirror="$(apt-get indextargets --format '$(SITE) $(CODENAME) $(TARGET_OF)' 2>/dev/null \
    | awk -v c="$codename" '$2 == c && $3 == "deb" { print $1; exit }')"
mirror="${mirror:-http://deb.debian.org/debian}"
say "mirror (from apt's sources): $mirror"
# The host's apt settings snapshot mirrors need (as slate carries them over).
apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy) ' \
    >"$work/host-apt.conf" || true

say "fetching hello $HELLO_VERSION (bookworm's source) from $mirror"
src="$work/src"
mkdir -p "$src/lists/partial"
printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s bookworm main\n' \
    "$mirror" >"$src/sources.list"
aptsrc=(apt-get -q -o Dir::Etc::sourcelist="$src/sources.list" -o Dir::Etc::sourceparts=-
    -o Dir::State::Lists="$src/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
    -o APT::Sandbox::User=root)
"${aptsrc[@]}" update >"$src/apt.log" 2>&1 || { cat "$src/apt.log" >&2; die "apt-get update (deb-src) failed"; }
(cd "$src" && "${aptsrc[@]}" source "hello=$HELLO_VERSION" >>"$src/apt.log" 2>&1) \
    || { cat "$src/apt.log" >&2; die "apt-get source hello=$HELLO_VERSION failed"; }
dsc="$src/hello_${HELLO_VERSION}.dsc"
tree="$src/hello-${HELLO_VERSION%-*}"
[ -f "$dsc" ] && [ -d "$tree/debian" ] || die "no $dsc / $tree after apt-get source"

# --- 4. sbuild: its user and its chroot tarballs ----------------------------
if ! id "$SBUILD_USER" >/dev/null 2>&1; then
    say "adding user $SBUILD_USER (sbuild's unshare mode runs as a user with subordinate ids)"
    useradd --create-home --home-dir "/var/lib/$SBUILD_USER" --shell /bin/sh \
        --comment "slate bench/debian-hello.sh" "$SBUILD_USER"
fi
sb_home="$(getent passwd "$SBUILD_USER" | cut -d: -f6)"
for kind in uid gid; do
    if ! grep -q "^$SBUILD_USER:" "/etc/sub$kind"; then
        # The first 65536 ids past every range already given.
        start=$(awk -F: 'BEGIN { e = 100000 } { if ($2 + $3 > e) e = $2 + $3 } END { print e }' "/etc/sub$kind")
        usermod "--add-sub${kind}s" "$start-$((start + 65535))" "$SBUILD_USER"
    fi
done
sb_env=(env -i "HOME=$sb_home" "USER=$SBUILD_USER" "LOGNAME=$SBUILD_USER"
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
runuser -u "$SBUILD_USER" -- "${sb_env[@]}" unshare --user --map-root-user true \
    || die "$SBUILD_USER cannot make a user namespace (needed by sbuild --chroot-mode=unshare)"

# sbuild's unshare mode looks for ~/.cache/sbuild/SUITE-ARCH.t* (the chroot
# names of the schroot mode). Same sources as slate's debian: images (the
# suite, its updates and security, as mmdebstrap gives them by default), from
# this machine's mirror.
tarballs="$sb_home/.cache/sbuild"
runuser -u "$SBUILD_USER" -- mkdir -p "$tarballs"
pids=()
for s in $SUITES; do
    tb="$tarballs/$s-$arch.tar.zst"
    [ -s "$tb" ] && [ "${REMAKE_TARBALLS:-0}" != 1 ] && continue
    say "making the sbuild chroot tarball $tb (mmdebstrap --variant=buildd)"
    (mmdebstrap --variant=buildd --include=fakeroot --aptopt="$work/host-apt.conf" \
        "$s" "$tb.new" \
        "deb $mirror $s main" "deb $mirror $s-updates main" \
        "deb http://security.debian.org/debian-security $s-security main" \
        >"$work/mmdebstrap-$s.log" 2>&1 \
        && mv "$tb.new" "$tb" && chown "$SBUILD_USER:" "$tb") &
    pids+=($!)
done
for p in "${pids[@]}"; do
    wait "$p" || { tail -n 30 "$work"/mmdebstrap-*.log >&2; die "mmdebstrap failed"; }
done

now() { date +%s.%N; }

# --- 5. slate: one project per cache set-up, images baked (untimed) ---------
caches_line() {
    case "$1" in
    apt) echo 'caches = ["/var/cache/apt/archives"]' ;;
    lists | lists-plain) echo 'caches = ["/var/cache/apt/archives", "/var/lib/apt/lists"]' ;;
    locked) echo 'caches = [{ path = "/var/cache/apt/archives", sharing = "locked" }]' ;;
    deps) ;;
    esac
}
nonce="$(date +%s.%N)"
declare -A proj
for v in $VARIANTS; do
    p="$work/slate-$v"
    mkdir -p "$p/tree"
    # dpkg-buildpackage writes the .debs beside the source tree: workdir is
    # the folder holding it, and the artifacts are globs under workdir.
    cp -a "$tree" "$p/tree/"
    t="$(basename "$tree")"
    update="apt-get update"
    [ "$v" = lists ] && update="apt-get update -o APT::Get::List-Cleanup=false"
    run="[
    \"$update\",
    \"cd $t && apt-get build-dep -y .\",
    \"cd $t && dpkg-buildpackage -us -uc -b\",
]"
    deps=""
    if [ "$v" = deps ]; then
        run="[\"cd $t && dpkg-buildpackage -us -uc -b\"]"
        # The nonce makes this run bake the layer (and time it) afresh.
        deps="files = { \"tree/$t/debian/control\" = \"/usr/local/src/build-deps/debian/control\" }
steps = [\"DEBIAN_FRONTEND=noninteractive apt-get build-dep -y /usr/local/src/build-deps # bench $nonce\"]"
    fi
    cat >"$p/slate.toml" <<EOF
[images.builder-bookworm]
from = "debian:bookworm"
packages = ["build-essential", "fakeroot", "dpkg-dev"]
$deps

[images.builder-trixie]
from = "debian:trixie"
packages = ["build-essential", "fakeroot", "dpkg-dev"]
$deps

[builds.hello]
matrix = { suite = ["bookworm", "trixie"] }
image = "builder-{suite}"
network = true
privileges = "packages"
$(caches_line "$v")
inputs = ["tree"]
workdir = "/src"
run = $run
artifacts = ["*.deb"]
EOF
    proj[$v]="$p"
    projects+=("$p")
done
first="${proj[${VARIANTS%% *}]}"
say "baking builder-bookworm and builder-trixie (once; cached in $SLATE_CACHE)"
"$slate" -q -C "$first" bake >"$work/bake.log" 2>&1 || { tail -n 40 "$work/bake.log" >&2; die "slate bake failed"; }
deps_bake=0
for v in $VARIANTS; do
    t0=$(now)
    "$slate" -q -C "${proj[$v]}" bake >"$work/bake-$v.log" 2>&1 || { tail -n 40 "$work/bake-$v.log" >&2; die "slate bake failed"; }
    if [ "$v" = deps ]; then
        deps_bake=$(python3 -c "print($(now) - $t0)")
        say "deps: the build dependencies baked into both images in $(printf %.1f "$deps_bake") s (once per debian/control)"
    fi
done

# --- 6. the timed runs ------------------------------------------------------
results="$work/results.ndjson"
: >"$results"

run_slate() { # run_slate VARIANT ROUND
    local v="$1" i="$2" p="${proj[$1]}" t0 t1 rc=0 before after
    before="$(ls "$p/.slate/runs" 2>/dev/null || true)"
    t0=$(now)
    "$slate" -C "$p" --progress plain build -j "$JOBS" >"$work/slate-$v-$i.log" 2>&1 || rc=$?
    t1=$(now)
    after="$(ls "$p/.slate/runs")"
    local run
    run="$(comm -13 <(echo "$before") <(echo "$after") | tail -n 1)"
    if [ "$rc" != 0 ] || [ -z "$run" ]; then
        tail -n 40 "$work/slate-$v-$i.log" >&2
        die "slate build ($v, run $i) failed (exit $rc): see above; this looks like a slate problem"
    fi
    python3 - "$p/.slate/runs/$run/run.json" "$t0" "$t1" "$v" "$i" >>"$results" <<'PY'
import json, os, sys
sys.path.insert(0, os.environ["BENCH_DIR"])
from spans import covered as spans_covered
path, t0, t1, variant, rnd = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
run = json.load(open(path))
wall = t1 - t0
spans, out = [], {"tool": "slate", "variant": variant, "round": rnd, "wall": wall, "run": run["run_id"], "targets": {}}
cat = {"env": 0.0, "destroy": 0.0, "apt_update": 0.0, "build_dep": 0.0, "dpkg": 0.0}
outside = 0.0
for t in run["targets"]:
    ph = t["phases"]
    start, end = ph[0]["start"], max(p["end"] or p["start"] for p in ph)
    spans.append((start, end))
    d = {"span": end - start, "dpkg": 0.0}
    for p in ph:
        dur = (p["end"] or p["start"]) - p["start"]
        if p["name"].startswith("run:") and "dpkg-buildpackage" in p["name"]:
            key = "dpkg"
        elif p["name"].startswith("run:") and "build-dep" in p["name"]:
            key = "build_dep"
        elif p["name"].startswith("run:") and "apt-get update" in p["name"]:
            key = "apt_update"
        elif p["name"] == "destroy":
            key = "destroy"
        else:  # create, inputs, artifacts
            key = "env"
        d[key] = d.get(key, 0.0) + dur
        cat[key] += dur
    outside += d["span"] - d["dpkg"]
    out["targets"][t["name"]] = d
# Time no target was running (slate starting, checking images, waiting,
# writing the run's record) counts once.
covered = spans_covered(spans)
out["slate_only"] = max(0.0, wall - covered)
out["outside"] = outside + out["slate_only"]
out["dpkg"] = cat["dpkg"]
out["deps"] = cat["build_dep"]
out["parts"] = dict(cat, no_target=out["slate_only"])
print(json.dumps(out))
PY
}

run_sbuild() { # run_sbuild ROUND
    local i="$1" s t0 t1 pids=() rc=0
    rm -rf "$work/sbuild"
    for s in $SUITES; do
        mkdir -p "$work/sbuild/$s"
    done
    chown -R "$SBUILD_USER:" "$work/sbuild"
    one() { # one SUITE: sbuild for it, timed, in its own folder (same .deb names)
        local s="$1" a b r=0
        a=$(now)
        (cd "$work/sbuild/$s" && runuser -u "$SBUILD_USER" -- "${sb_env[@]}" \
            sbuild --chroot-mode=unshare --dist="$s" --arch="$arch" \
            --no-run-lintian --no-run-autopkgtest \
            --starting-build-commands='date +sbuild-bench-mark=%%s.%%N' \
            --finished-build-commands='date +sbuild-bench-mark=%%s.%%N' \
            "$dsc") >"$work/sbuild/$s.out" 2>&1 || r=$?
        b=$(now)
        echo "$r $a $b" >"$work/sbuild/$s.time"
    }
    t0=$(now)
    for s in $SUITES; do
        if [ "$SBUILD_JOBS" -ge 2 ]; then
            one "$s" &
            pids+=($!)
        else
            one "$s"
        fi
    done
    for p in "${pids[@]}"; do wait "$p"; done
    t1=$(now)
    for s in $SUITES; do
        read -r rc _ <"$work/sbuild/$s.time"
        if [ "$rc" != 0 ]; then
            tail -n 40 "$work/sbuild/$s.out" >&2
            tail -n 40 "$work/sbuild/$s"/*.build >&2 2>/dev/null || true
            die "sbuild for $s (run $i) failed (exit $rc): see above"
        fi
    done
    python3 - "$work/sbuild" "$t0" "$t1" "$i" "$SUITES" >>"$results" <<'PY'
import glob, json, os, re, sys
sys.path.insert(0, os.environ["BENCH_DIR"])
from spans import covered as spans_covered
base, t0, t1, rnd, suites = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split()
out = {"tool": "sbuild", "round": rnd, "wall": t1 - t0, "targets": {}}
spans, outside, dpkg_sum, deps_sum = [], 0.0, 0.0, 0.0
for s in suites:
    rc, a, b = open(f"{base}/{s}.time").read().split()
    a, b = float(a), float(b)
    logs = [l for l in glob.glob(f"{base}/{s}/*.build") if not os.path.islink(l)]
    text = open(logs[0], errors="replace").read()
    # The two marks: the last command before dpkg-buildpackage and the first
    # after it (`--starting-build-commands`, `--finished-build-commands`).
    marks = [float(m) for m in re.findall(r"^sbuild-bench-mark=([0-9.]+)$", text, re.M)]
    if len(marks) >= 2:
        dpkg = marks[-1] - marks[0]
    else:  # sbuild's own figure, whole seconds
        dpkg = float(re.search(r"^Build-Time: (\d+)", text, re.M).group(1))
    # Installing the build dependencies (sbuild's Install-Time, whole seconds).
    deps = float(re.search(r"^Install-Time: (\d+)", text, re.M).group(1))
    spans.append((a, b))
    out["targets"][s] = {"span": b - a, "dpkg": dpkg, "deps": deps}
    outside += (b - a) - dpkg
    dpkg_sum += dpkg
    deps_sum += deps
covered = spans_covered(spans)
out["outside"] = outside + max(0.0, out["wall"] - covered)
out["dpkg"] = dpkg_sum
out["deps"] = deps_sum
print(json.dumps(out))
PY
}

say "timing $RUNS run(s) per tool, alternately (each builds hello for $SUITES; minutes)"
for i in $(seq 1 "$RUNS"); do
    order="sbuild $VARIANTS"
    [ $((i % 2)) = 0 ] && order="$VARIANTS sbuild"
    for what in $order; do
        if [ "$what" = sbuild ]; then
            say "run $i/$RUNS: sbuild --chroot-mode=unshare ($SBUILD_JOBS at once)"
            run_sbuild "$i"
        else
            state=warm
            [ "$i" = 1 ] && state="cold cache mount"
            say "run $i/$RUNS: slate build -j $JOBS ($what, $state)"
            run_slate "$what" "$i"
        fi
        tail -n 1 "$results" | python3 -c 'import json, sys; r = json.load(sys.stdin); print("    whole %.1f s, outside dpkg-buildpackage %.1f s, dpkg-buildpackage %.1f s" % (r["wall"], r["outside"], r["dpkg"]), file=sys.stderr)'
    done
done

# --- 7. figures -------------------------------------------------------------
json_out="${BENCH_JSON:-$root/target/bench/debian-hello.json}"
mkdir -p "$(dirname "$json_out")"
python3 - "$results" "$json_out" "$TARGET_WHOLE" "$TARGET_OUTSIDE" "$VARIANTS" "$JOBS" "$SBUILD_JOBS" "$HELLO_VERSION" "$mirror" "$deps_bake" <<'PY'
import json, statistics, sys
res_path, json_out, tw, to, variants, jobs, sbjobs, version, mirror, deps_bake = sys.argv[1:11]
tw, to, variants = float(tw), float(to), variants.split()
rows = [json.loads(l) for l in open(res_path) if l.strip()]
def med(rs):
    if not rs:
        return None
    m = {k: statistics.median(r[k] for r in rs) for k in ("wall", "outside", "dpkg", "deps")}
    # Outside dpkg-buildpackage and outside installing the build
    # dependencies: the environment, apt-get update, the tool itself.
    m["rest"] = statistics.median(r["outside"] - r["deps"] for r in rs)
    return m
sb = [r for r in rows if r["tool"] == "sbuild"]
doc = {
    "hello": version, "suites": ["bookworm", "trixie"], "mirror": mirror,
    "slate_jobs": int(jobs), "sbuild_jobs": int(sbjobs),
    "targets": {"whole": tw, "outside": to},
    "sbuild": {"runs": sb, "median": med(sb)},
    "slate": {},
}
S = doc["sbuild"]["median"]
names = {"apt": 'caches = ["/var/cache/apt/archives"]',
         "lists": "+ /var/lib/apt/lists, List-Cleanup=false",
         "lists-plain": "+ /var/lib/apt/lists",
         "locked": 'archives, sharing = "locked"',
         "deps": "build dependencies baked into the image"}
print()
print(f"hello {version} for bookworm and trixie; seconds, medians, both suites: whole run = wall time;")
print("outside = outside dpkg-buildpackage; deps = installing the build dependencies;")
print(f"rest = outside - deps (environment, apt-get update, the tool). sbuild: {len(sb)} run(s), {sbjobs} at once")
print(f"{'':36}{'whole run':>10}{'outside':>9}{'deps':>7}{'rest':>7}{'dpkg-bp':>9}"
      f"{'whole x':>9}{'outside x':>10}{'rest x':>8}")
print(f"{'sbuild --chroot-mode=unshare':36}{S['wall']:>10.1f}{S['outside']:>9.1f}{S['deps']:>7.1f}"
      f"{S['rest']:>7.1f}{S['dpkg']:>9.1f}")
for v in variants:
    rs = sorted((r for r in rows if r["tool"] == "slate" and r["variant"] == v), key=lambda r: r["round"])
    cold, warm = rs[:1], rs[1:]
    entry = {"caches": names[v], "runs": rs, "cold": med(cold), "warm": med(warm)}
    for label, m in (("cold", entry["cold"]), ("warm", entry["warm"])):
        if m is None:
            continue
        entry[f"ratio_whole_{label}"] = m["wall"] / S["wall"]
        entry[f"ratio_outside_{label}"] = m["outside"] / S["outside"]
        entry[f"ratio_rest_{label}"] = m["rest"] / S["rest"]
        n = 1 if label == "cold" else len(warm)
        title = f"slate {v} ({label}, {n} run{'s' if n > 1 else ''})"
        print(f"{title:36}{m['wall']:>10.1f}{m['outside']:>9.1f}{m['deps']:>7.1f}{m['rest']:>7.1f}"
              f"{m['dpkg']:>9.1f}{m['wall'] / S['wall']:>8.2f}x{m['outside'] / S['outside']:>9.2f}x"
              f"{m['rest'] / S['rest']:>7.2f}x")
    parts = {k: statistics.median(r["parts"][k] for r in (warm or cold)) for k in rs[0]["parts"]}
    entry["parts_median"] = parts
    print(f"{'':4}{v}: " + ", ".join(f"{k.replace('_', ' ')} {x:.1f}" for k, x in parts.items())
          + f" s over both targets ({'warm' if warm else 'cold'})")
    doc["slate"][v] = entry
head = doc["slate"].get("apt") or doc["slate"][variants[0]]
m = "warm" if head.get("warm") else "cold"
print()
for what, target in (("whole", tw), ("outside", to)):
    r = head[f"ratio_{what}_{m}"]
    label = "whole run" if what == "whole" else "outside dpkg-buildpackage"
    verdict = "met" if r <= target else "NOT met"
    print(f"slate / sbuild, {label} ({head['caches']}, {m}): {r:.2f}x  (target: <= {target}x) -> {verdict}")
print(f"slate / sbuild, outside dpkg-buildpackage and installing the build dependencies: "
      f"{head[f'ratio_rest_{m}']:.2f}x  (no target: what is left of the environments' own cost)")
if "deps" in doc["slate"]:
    d = doc["slate"]["deps"]
    dm = "warm" if d.get("warm") else "cold"
    doc["slate"]["deps"]["bake_seconds"] = float(deps_bake)
    r = d[f"ratio_outside_{dm}"]
    verdict = "met" if r <= to else "NOT met"
    print(f"slate / sbuild, outside dpkg-buildpackage (build dependencies baked into the image, {dm}): "
          f"{r:.2f}x  (target: <= {to}x) -> {verdict}; baking them took {float(deps_bake):.1f} s for both "
          f"suites, once per debian/control (a run that bakes them: "
          f"{(d[dm]['outside'] + float(deps_bake)) / S['outside']:.2f}x)")
json.dump(doc, open(json_out, "w"), indent=1)
print(f"figures: {json_out}")
PY
exit 0
