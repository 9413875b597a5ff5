//! What a VM boots from, made once and cached: the image's kernel as an
//! uncompressed ELF (QEMU enters it through PVH, skipping the firmware and
//! the in-guest decompression that cost about 3 s under TCG), a small
//! initramfs holding slate's agent and the few modules it needs, and a base
//! disk per image that every environment's copy-on-write overlay stands on.

use slate_layers::hash::hash as sha_of;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The modules the agent needs (with their dependencies), loaded in order
/// when they are not built in. `crc32c_generic` is only a soft dependency
/// of ext4, but mounting a disk with metadata checksums fails without it.
const WANTED: [&str; 5] = [
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "ext4",
];
/// Loaded only for `network = true`.
const WANTED_NET: [&str; 1] = ["virtio_net"];

/// Holds an exclusive lock on `path` (its folder made) while alive.
pub struct Lock {
    _file: slate_layers::lock::Lock,
}

impl Lock {
    pub fn take(path: &Path) -> io::Result<Lock> {
        if let Some(d) = path.parent() {
            fs_err::create_dir_all(d)?;
        }
        Ok(Lock {
            _file: slate_layers::lock::lock_file(path)?,
        })
    }
}

/// Everything a VM of one image boots from.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub disk: PathBuf,
}

/// Makes (or finds) the boot files of the image made of `layers`, under
/// `cache` (`v1/vm`). `agent` is slate's guest agent binary.
pub fn prepare(cache: &Path, layers: &[PathBuf], agent: &Path) -> io::Result<BootFiles> {
    let kernel = slate_layers::tree::kernel_in(layers).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "the image has no kernel in /boot: set `vm = true` on it (or on its base) to install the distro kernel",
        )
    })?;
    // Layers never change once made, and the agent changes only with slate:
    // their path, size and time name them without reading them.
    let stamp = |p: &Path| -> io::Result<String> {
        let m = std::fs::metadata(p)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot read `{}`: {e}", p.display())))?;
        let t = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(format!("{}\n{}\n{}", p.display(), m.len(), t.as_nanos()))
    };
    let kernel_id = stamp(&kernel.path)?;
    let agent_id = stamp(agent)?;
    let kdir = cache.join("kernels").join(sha_of(&[kernel_id.as_bytes()]));
    fs_err::create_dir_all(&kdir)?;
    let _lock = Lock::take(&kdir.join("lock"))?;
    // What `gc` checks: the folder goes when its kernel's layer is gone.
    fs_err::write(
        kdir.join("source"),
        kernel.path.as_os_str().as_encoded_bytes(),
    )?;
    // Copies in slate's cache, never the image's own files: QEMU's group
    // is given read access to them.
    let vmlinux = kdir.join("vmlinux");
    let vmlinuz = kdir.join("vmlinuz");
    let kernel_file = if vmlinux.exists() {
        vmlinux
    } else if vmlinuz.exists() {
        vmlinuz
    } else {
        let bz = fs_err::read(&kernel.path)?;
        match extract_vmlinux(&bz) {
            Some(elf) => {
                write_atomic(&vmlinux, &elf)?;
                vmlinux
            }
            // Not a bzImage we can unpack: QEMU boots it the slow way.
            None => {
                write_atomic(&vmlinuz, &bz)?;
                vmlinuz
            }
        }
    };
    let initramfs = kdir.join(format!(
        "initramfs-{}.cpio",
        &sha_of(&[agent_id.as_bytes()])[..16]
    ));
    if !initramfs.exists() {
        let cpio = build_initramfs(layers, &kernel.version, agent)?;
        write_atomic(&initramfs, &cpio)?;
    }
    drop(_lock);
    let key = sha_of(
        &layers
            .iter()
            .map(|l| l.as_os_str().as_encoded_bytes())
            .collect::<Vec<_>>(),
    );
    let disk = cache.join("disks").join(format!("{}.qcow2", &key[..32]));
    if !disk.exists() {
        let _lock = Lock::take(&disk.with_extension("lock"))?;
        if !disk.exists() {
            // What `gc` checks: the disk goes when one of its layers is gone.
            let list: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
            fs_err::write(disk.with_extension("layers"), list.join("\n"))?;
            // 4 GiB free for builds: the file is sparse, so it costs nothing.
            slate_layers::disk::write_disk(layers, &disk, 0, 4096)?;
        }
    }
    for f in [&kernel_file, &initramfs, &disk] {
        crate::jail::grant_read(f)?;
    }
    Ok(BootFiles {
        kernel: kernel_file,
        initramfs,
        disk,
    })
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs_err::write(&tmp, data)?;
    fs_err::rename(&tmp, path)
}

/// The ELF kernel inside a bzImage: the payload the boot header points at,
/// decompressed with the host's own tool for its format.
pub fn extract_vmlinux(bz: &[u8]) -> Option<Vec<u8>> {
    if bz.len() < 0x250 || &bz[0x202..0x206] != b"HdrS" {
        return None;
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let le32 = |o: usize| u32::from_le_bytes([bz[o], bz[o + 1], bz[o + 2], bz[o + 3]]) as usize;
    let start = (setup_sects + 1) * 512 + le32(0x248);
    let payload = bz.get(start..start + le32(0x24c))?;
    let tool = if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        "xz"
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd"
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        "gzip"
    } else if payload.starts_with(b"\x7fELF") {
        return Some(payload.to_vec());
    } else {
        return None;
    };
    let elf = decompress(tool, payload).ok()?;
    elf.starts_with(b"\x7fELF").then_some(elf)
}

fn decompress(tool: &str, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(["-d", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || {
        // xz and zstd may stop reading at the end of their stream.
        let _ = stdin.write_all(&data);
    });
    let mut out = Vec::new();
    child.stdout.take().expect("piped").read_to_end(&mut out)?;
    let _ = feeder.join();
    let st = child.wait()?;
    // Trailing bytes after the stream make some tools complain; what came out counts.
    if out.is_empty() && !st.success() {
        return Err(io::Error::other(format!("{tool} -d failed")));
    }
    Ok(out)
}

/// modules.dep: module name → (path under the modules folder, dependencies).
fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let name = |p: &str| {
        let base = p.rsplit('/').next().unwrap_or(p);
        base.split(".ko").next().unwrap_or(base).replace('-', "_")
    };
    text.lines()
        .filter_map(|l| {
            let (path, deps) = l.split_once(':')?;
            Some((
                name(path),
                (
                    path.trim().to_string(),
                    deps.split_whitespace().map(name).collect(),
                ),
            ))
        })
        .collect()
}

/// The modules to load, dependencies first, as paths under the modules
/// folder: those every guest needs, then those only a networked one needs.
fn module_order(dep: &BTreeMap<String, (String, Vec<String>)>) -> (Vec<String>, Vec<String>) {
    fn visit(
        m: &str,
        dep: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        if let Some((path, deps)) = dep.get(m) {
            for d in deps {
                visit(d, dep, seen, out);
            }
            out.push(path.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let (mut base, mut net) = (Vec::new(), Vec::new());
    // Built-in modules are not in modules.dep: nothing to load.
    for m in WANTED {
        visit(m, dep, &mut seen, &mut base);
    }
    for m in WANTED_NET {
        visit(m, dep, &mut seen, &mut net);
    }
    (base, net)
}

/// The modules folder of `version` in the image (merged-/usr or not).
fn modules_dir(layers: &[PathBuf], version: &str) -> Option<String> {
    ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| format!("{d}/{version}"))
        .find(|d| slate_layers::tree::layer_file(layers, &format!("{d}/modules.dep")).is_some())
}

/// The initramfs: `/init` is the agent, with the shared libraries it needs
/// (copied from the host, at the paths `ldd` names) and the modules.
fn build_initramfs(layers: &[PathBuf], version: &str, agent: &Path) -> io::Result<Vec<u8>> {
    let mut c = Cpio::default();
    for d in ["dev", "proc", "sys", "newroot", "modules"] {
        c.dir(d);
    }
    c.node("dev/console", 0o020600, (5, 1));
    let agent_bytes = match stripped(agent) {
        Some(b) => b,
        None => fs_err::read(agent)?,
    };
    c.file("init", 0o755, &agent_bytes);
    for lib in shared_libs(agent)? {
        let rel = lib.trim_start_matches('/');
        c.parents(rel);
        c.file(rel, 0o755, &fs_err::read(&lib)?);
    }
    let mdir = modules_dir(layers, version).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("the image has a kernel {version} but no /lib/modules/{version}/modules.dep"),
        )
    })?;
    let depfile =
        slate_layers::tree::layer_file(layers, &format!("{mdir}/modules.dep")).expect("checked");
    let dep = parse_modules_dep(&fs_err::read_to_string(depfile)?);
    let (base, net) = module_order(&dep);
    let mut orders = [String::new(), String::new()];
    for (i, rel) in base
        .iter()
        .map(|r| (0, r))
        .chain(net.iter().map(|r| (1, r)))
    {
        let src =
            slate_layers::tree::layer_file(layers, &format!("{mdir}/{rel}")).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("module `{rel}` is listed but missing"),
                )
            })?;
        let raw = fs_err::read(&src)?;
        // Compressed modules are unpacked here, so the guest needs no decompressor.
        let ko = if rel.ends_with(".xz") {
            decompress("xz", &raw)?
        } else if rel.ends_with(".zst") {
            decompress("zstd", &raw)?
        } else if rel.ends_with(".gz") {
            decompress("gzip", &raw)?
        } else {
            raw
        };
        let base = rel.rsplit('/').next().unwrap_or(rel);
        let name = format!("{}.ko", base.split(".ko").next().unwrap_or(base));
        c.file(&format!("modules/{name}"), 0o644, &ko);
        orders[i].push_str(&name);
        orders[i].push('\n');
    }
    c.file("modules/order", 0o644, orders[0].as_bytes());
    c.file("modules/order-net", 0o644, orders[1].as_bytes());
    Ok(c.finish())
}

/// The agent without debug information, which a debug build carries by the
/// tens of megabytes: the guest would unpack every byte of it at boot.
fn stripped(agent: &Path) -> Option<Vec<u8>> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("slate-agent-{}-{n}", std::process::id()));
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(agent)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let out = if ok { fs_err::read(&tmp).ok() } else { None };
    let _ = fs_err::remove_file(&tmp);
    out
}

/// The shared libraries `ldd` says the agent needs (empty for a static one).
fn shared_libs(agent: &Path) -> io::Result<Vec<String>> {
    let out = Command::new("ldd").arg(agent).output();
    let Ok(out) = out else { return Ok(vec![]) };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect();
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// A newc cpio archive, as the kernel unpacks into the initial root.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize as u32,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, 0o040755, (0, 0), &[]);
        }
    }

    /// The folders above `rel`.
    fn parents(&mut self, rel: &str) {
        let parts: Vec<&str> = rel.split('/').collect();
        for i in 1..parts.len() {
            self.dir(&parts[..i].join("/"));
        }
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | (perm & 0o7777), (0, 0), data);
    }

    fn node(&mut self, name: &str, mode: u32, rdev: (u32, u32)) {
        self.entry(name, mode, rdev, &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// Removes base disks and boot files whose layers are gone (after `slate gc`
/// removed them), and saved machines of gone disks or unused for `idle`:
/// what a machine of a live image needs stays. Returns the count and bytes
/// removed.
pub fn gc(cache: &Path, idle: Option<std::time::Duration>) -> (usize, u64) {
    let (mut n, mut bytes) = (0, 0);
    let size = |p: &Path| -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs_err::symlink_metadata(p)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };
    if let Ok(rd) = fs_err::read_dir(cache.join("disks")) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "qcow2") {
                continue;
            }
            let list = fs_err::read_to_string(p.with_extension("layers")).unwrap_or_default();
            let alive = !list.is_empty() && list.lines().all(|l| Path::new(l).is_dir());
            if !alive {
                if let Ok(_lock) = Lock::take(&p.with_extension("lock")) {
                    bytes += size(&p);
                    let _ = fs_err::remove_file(&p);
                    let _ = fs_err::remove_file(p.with_extension("layers"));
                    n += 1;
                }
                let _ = fs_err::remove_file(p.with_extension("lock"));
            }
        }
    }
    if let Ok(rd) = fs_err::read_dir(cache.join("kernels")) {
        for e in rd.flatten() {
            let source = fs_err::read_to_string(e.path().join("source")).unwrap_or_default();
            if source.is_empty() || !Path::new(&source).exists() {
                let _lock = Lock::take(&e.path().join("lock"));
                if let Ok(files) = fs_err::read_dir(e.path()) {
                    bytes += files.flatten().map(|f| size(&f.path())).sum::<u64>();
                }
                let _ = fs_err::remove_dir_all(e.path());
                n += 1;
            }
        }
    }
    let (saved, saved_bytes) = crate::snapshot::gc(cache, idle);
    (n + saved, bytes + saved_bytes)
}

/// The agent binary beside slate's own (`SLATE_AGENT` overrides).
pub fn find_agent() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLATE_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let agent = exe.with_file_name("slate-agent");
    if agent.exists() {
        let _ = fs_err::set_permissions(&agent, fs::Permissions::from_mode(0o755));
        return Ok(agent);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "slate's guest agent `{}` is missing; it is built with slate (`cargo build --release -p slate` builds both)",
            agent.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_dependencies_first_and_skip_built_ins() {
        let dep = parse_modules_dep(
            "kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz kernel/lib/crc16.ko.xz\n\
             kernel/fs/jbd2/jbd2.ko.xz:\nkernel/fs/mbcache.ko.xz:\nkernel/lib/crc16.ko.xz:\n\
             kernel/crypto/crc32c_generic.ko.xz:\n\
             kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz\n\
             kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz\n\
             kernel/drivers/virtio/virtio_ring.ko.xz:\n",
        );
        let (order, net) = module_order(&dep);
        assert!(net.is_empty(), "virtio_net is not in this modules.dep");
        let pos = |m: &str| order.iter().position(|p| p.contains(m)).unwrap();
        assert!(pos("virtio_ring") < pos("virtio.ko") && pos("virtio.ko") < pos("virtio_blk"));
        assert!(pos("jbd2") < pos("ext4") && pos("crc16") < pos("ext4"));
        assert!(order.iter().any(|p| p.contains("crc32c_generic")));
        // virtio_pci and virtio_console are built in here: not listed, not loaded.
        assert!(!order.iter().any(|p| p.contains("virtio_pci")));
        assert_eq!(order.len(), 8);
    }

    #[test]
    fn cpio_is_newc_with_a_trailer() {
        let mut c = Cpio::default();
        c.parents("lib/x86_64-linux-gnu/libc.so.6");
        c.file("lib/x86_64-linux-gnu/libc.so.6", 0o755, b"abc");
        c.node("dev/console", 0o020600, (5, 1));
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("lib\0") && text.contains("lib/x86_64-linux-gnu\0"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn extracts_an_elf_from_a_gzip_bzimage() {
        // A fake bzImage: header fields, then a gzip payload holding an ELF head.
        let mut elf = b"\x7fELF".to_vec();
        elf.extend_from_slice(&[7u8; 100]);
        let mut gz = Command::new("gzip")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        gz.stdin.take().unwrap().write_all(&elf).unwrap();
        let payload = gz.wait_with_output().unwrap().stdout;
        let mut bz = vec![0u8; 0x1000];
        bz[0x1f1] = 1; // setup sectors: payload area starts at 2 * 512
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bz[1024 + 16..1024 + 16 + payload.len()].copy_from_slice(&payload);
        assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
        assert!(extract_vmlinux(b"not a kernel").is_none());
    }
}
