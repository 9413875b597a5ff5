//! An OCI layer (a tar archive) → `slate_layers::unpack::unpack` into a root
//! folder that already holds a lower layer, and the same bytes as a `tar:`
//! base into an empty one: any archive unpacks or fails, never panics, and
//! never creates, changes or removes anything outside its folder.
//!
//! A layer that escapes would damage the machine it runs on, so this target
//! refuses to start unless `/` is read-only and the process cannot remount it
//! (no CAP_SYS_ADMIN): run it through `scripts/fuzz.sh`, which starts it in a
//! bubblewrap sandbox where only `$FUZZ_TMP` is writable. Each input is
//! unpacked into `$FUZZ_TMP/unpack-PID/case/{layer,base}`, beside a `canary`
//! folder and a `witness` file; after it, everything outside those two must
//! be as it was, and no error may be "read-only file system" (an attempt to
//! write somewhere outside `$FUZZ_TMP`). The lower layer has symlinks out of
//! the root (`up -> ..`, `canary-link -> ../canary`, `abs -> /`), as a hostile
//! image could, so that whiteouts and entries can try to go through them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use slate_layers::unpack::{unpack, Source};
use std::collections::BTreeMap;
use std::error::Error;
use std::ffi::CString;
use std::fs;
use std::io::{self, ErrorKind};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Setup {
    /// `$FUZZ_TMP`: the only writable folder in the sandbox.
    tmp: PathBuf,
    /// `$FUZZ_TMP/unpack-PID`, holding nothing but `case`.
    root: PathBuf,
    /// The names directly in `$FUZZ_TMP`, which no input may change.
    tmp_names: Vec<String>,
}

static SETUP: OnceLock<Setup> = OnceLock::new();

fn is_read_only(path: &Path) -> bool {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_flag & libc::ST_RDONLY != 0
}

/// Whether this process may mount, and so could make `/` writable again.
fn may_mount() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// What a path is, as far as an escape could change it.
#[derive(Debug, PartialEq)]
struct Node {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    content: Vec<u8>,
}

/// Everything under `dir` except the roots in `skip`, without following
/// symlinks.
fn snapshot(dir: &Path, skip: &[&Path], out: &mut BTreeMap<PathBuf, Node>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if skip.contains(&p.as_path()) {
            continue;
        }
        let m = fs::symlink_metadata(&p).unwrap();
        let content = if m.file_type().is_symlink() {
            fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()
        } else if m.is_file() {
            fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        let node = Node {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            nlink: m.nlink(),
            content,
        };
        if m.is_dir() {
            snapshot(&p, skip, out);
        }
        out.insert(p, node);
    }
}

/// Removes `dir` even when the archive left folders without write or search
/// permission.
fn remove_all(dir: &Path) {
    let Ok(m) = fs::symlink_metadata(dir) else {
        return;
    };
    if m.is_dir() {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                remove_all(&e.path());
            }
        }
        fs::remove_dir(dir).unwrap();
    } else {
        fs::remove_file(dir).unwrap();
    }
}

fn setup() -> &'static Setup {
    SETUP.get_or_init(|| {
        if !is_read_only(Path::new("/")) || may_mount() {
            eprintln!(
                "the unpack target runs only where `/` is read-only and cannot be \
                 remounted (no CAP_SYS_ADMIN): use scripts/fuzz.sh unpack"
            );
            std::process::exit(2);
        }
        let tmp = PathBuf::from(std::env::var_os("FUZZ_TMP").expect("FUZZ_TMP is not set"));
        assert!(!is_read_only(&tmp), "`$FUZZ_TMP` must be writable");
        let root = tmp.join(format!("unpack-{}", std::process::id()));
        remove_all(&root);
        fs::create_dir(&root).unwrap();
        let tmp_names = names_in(&tmp);
        Setup {
            tmp,
            root,
            tmp_names,
        }
    })
}

/// Whether an error, or one of its causes, is "read-only file system".
fn is_read_only_error(e: &(dyn Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == ErrorKind::ReadOnlyFilesystem)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// What an image's lower layers left in the root before this layer.
fn lower_layer(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/old"), "old\n").unwrap();
    fs::write(root.join("etc/keep"), "keep\n").unwrap();
    fs::create_dir_all(root.join("var/cache/sub")).unwrap();
    fs::write(root.join("var/cache/x"), "x\n").unwrap();
    symlink("..", root.join("up")).unwrap();
    symlink("../canary", root.join("canary-link")).unwrap();
    symlink("/", root.join("abs")).unwrap();
}

/// Unpacks `data` both ways and checks that nothing outside the roots moved.
fn unpack_one(s: &Setup, data: &[u8]) {
    let case = s.root.join("case");
    let layer = case.join("layer");
    let base = case.join("base");
    fs::create_dir_all(case.join("canary/dir")).unwrap();
    fs::write(case.join("canary/witness"), "canary\n").unwrap();
    fs::write(case.join("canary/dir/inner"), "inner\n").unwrap();
    fs::write(case.join("witness"), "sibling\n").unwrap();
    fs::create_dir(&layer).unwrap();
    lower_layer(&layer);
    fs::create_dir(&base).unwrap();
    let roots = [layer.as_path(), base.as_path()];
    let mut before = BTreeMap::new();
    snapshot(&case, &roots, &mut before);

    for (root, source) in [(&layer, Source::OciLayer), (&base, Source::TarBase)] {
        if let Err(e) = unpack(data, root, source) {
            assert!(
                !is_read_only_error(&e),
                "the archive tried to write outside its root ({source:?}): {e:?}"
            );
        }
    }

    let mut after = BTreeMap::new();
    snapshot(&case, &roots, &mut after);
    assert_eq!(before, after, "the archive changed files beside its root");
    assert_eq!(
        names_in(&case),
        ["base", "canary", "layer", "witness"],
        "the archive replaced or added something beside its root"
    );
    assert_eq!(
        names_in(&s.root),
        ["case"],
        "the archive wrote beside its case"
    );
    assert_eq!(
        names_in(&s.tmp),
        s.tmp_names,
        "the archive wrote into $FUZZ_TMP"
    );
    for root in roots {
        assert!(
            fs::symlink_metadata(root).is_ok_and(|m| m.is_dir()),
            "the archive replaced its own root"
        );
    }
    remove_all(&case);
}

fuzz_target!(init: { setup(); }, |data: &[u8]| unpack_one(setup(), data));
