//! Foreign architectures: images of another arch run through qemu-user,
//! registered with the kernel's binfmt_misc by slate itself.
//!
//! Distributions keep their binfmt entries in different places
//! (`/usr/share/binfmts` for binfmt-support, `/usr/lib/binfmt.d` for
//! systemd-binfmt since QEMU 8) and often leave them disabled, so slate does
//! not depend on either: it finds a static qemu-user interpreter and
//! registers it under its own name with the fix-binary flag (`F`), so the
//! kernel opens the interpreter once, at registration, and it runs inside
//! sandboxes and chroots that do not contain it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";

/// The host's Debian architecture name.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "arm" => "armhf",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// qemu's name for a Debian architecture.
fn qemu_name(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "armhf" | "armel" => "arm",
        "i386" => "i386",
        "ppc64el" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64el" => "mips64el",
        _ => return None,
    })
}

/// The ELF header bytes that identify an executable of qemu's `q`
/// (e_ident and e_machine), with the mask that lets executables and
/// position-independent ones (e_type 2 and 3) both match.
fn magic(q: &str) -> Option<(String, &'static str)> {
    // (64-bit?, big-endian?, e_machine)
    let (wide, big, machine): (bool, bool, u16) = match q {
        "x86_64" => (true, false, 0x3e),
        "aarch64" => (true, false, 0xb7),
        "arm" => (false, false, 0x28),
        "i386" => (false, false, 0x03),
        "ppc64le" => (true, false, 0x15),
        "s390x" => (true, true, 0x16),
        "riscv64" => (true, false, 0xf3),
        "mips64el" => (true, false, 0x08),
        _ => return None,
    };
    let mut bytes = vec![0x7f, b'E', b'L', b'F', if wide { 2 } else { 1 }];
    bytes.extend([if big { 2 } else { 1 }, 1]);
    bytes.extend([0; 9]);
    let (etype, mach) = if big {
        ([0, 2], machine.to_be_bytes())
    } else {
        ([2, 0], machine.to_le_bytes())
    };
    bytes.extend(etype);
    bytes.extend(mach);
    let hex: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
    let mask = if big {
        r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff"
    } else {
        r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    };
    Some((hex, mask))
}

fn runs_natively(arch: &str) -> bool {
    let host = host_arch();
    arch == host || (host == "amd64" && arch == "i386") || (host == "arm64" && arch == "armhf")
}

/// The name slate registers its entry under.
fn entry_name(q: &str) -> String {
    format!("slate-qemu-{q}")
}

/// One binfmt_misc entry as the kernel shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub enabled: bool,
    pub interpreter: String,
    pub flags: String,
}

fn read_entry(name: &str) -> Option<Entry> {
    let text = fs_err::read_to_string(Path::new(BINFMT).join(name)).ok()?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Some(Entry {
        name: name.to_string(),
        enabled: text.starts_with("enabled"),
        interpreter: field("interpreter "),
        flags: field("flags:"),
    })
}

/// An entry that makes `q` binaries run everywhere (enabled, fix-binary).
fn usable_entry(q: &str) -> Option<Entry> {
    [entry_name(q), format!("qemu-{q}")]
        .iter()
        .filter_map(|n| read_entry(n))
        .find(|e| e.enabled && e.flags.contains('F'))
}

/// Whether an ELF file runs without a dynamic loader (no PT_INTERP), which
/// an interpreter registered with `F` must: inside a sandbox, the image's
/// loader is of the wrong architecture.
fn is_static_elf(path: &Path) -> bool {
    let Ok(mut f) = fs::File::open(path) else {
        return false;
    };
    let mut head = Vec::new();
    if f.by_ref().take(1 << 20).read_to_end(&mut head).is_err() || !head.starts_with(b"\x7fELF") {
        return false;
    }
    let wide = head.get(4) == Some(&2);
    let le = head.get(5) == Some(&1);
    let num = |at: usize, len: usize| -> Option<u64> {
        let b = head.get(at..at + len)?;
        let mut v = 0u64;
        for i in 0..len {
            let byte = if le { b[len - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Some(v)
    };
    let (phoff, phentsize, phnum) = if wide {
        (num(0x20, 8), num(0x36, 2), num(0x38, 2))
    } else {
        (num(0x1c, 4), num(0x2a, 2), num(0x2c, 2))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        usize::try_from(at).ok().and_then(|at| num(at, 4)) != Some(3) // PT_INTERP
    })
}

/// A static qemu-user interpreter for `q` and the flags to register it
/// with: Debian's `-binfmt-P` wrappers expect the original argv[0] (`P`)
/// and an open file (`O`); a plain `qemu-q-static` takes the path.
fn find_interpreter(q: &str) -> Option<(PathBuf, &'static str)> {
    let mut candidates = vec![
        (
            PathBuf::from(format!("/usr/libexec/qemu-binfmt/{q}-binfmt-P")),
            "POF",
        ),
        (
            PathBuf::from(format!("/usr/lib/qemu-binfmt/{q}-binfmt-P")),
            "POF",
        ),
    ];
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        candidates.push((dir.join(format!("qemu-{q}-static")), "F"));
        candidates.push((dir.join(format!("qemu-{q}")), "F"));
    }
    candidates
        .into_iter()
        .find(|(p, _)| p.is_file() && is_static_elf(p))
}

/// What binfmt_misc holds for `arch`, in words for `slate check`.
pub fn describe(arch: &str) -> String {
    if runs_natively(arch) {
        return format!("{arch}: runs natively");
    }
    let Some(q) = qemu_name(arch) else {
        return format!("{arch}: slate does not know how to emulate it");
    };
    if let Some(e) = usable_entry(q) {
        return format!(
            "{arch}: registered as `{}` ({}, flags {})",
            e.name, e.interpreter, e.flags
        );
    }
    let others: Vec<String> = [format!("qemu-{q}")]
        .iter()
        .filter_map(|n| read_entry(n))
        .map(|e| {
            format!(
                "`{}` is {} without the fix-binary flag",
                e.name,
                if e.enabled { "enabled" } else { "disabled" }
            )
        })
        .collect();
    let others = if others.is_empty() {
        String::new()
    } else {
        format!(" ({})", others.join(", "))
    };
    match find_interpreter(q) {
        Some((p, flags)) => format!(
            "{arch}: not registered yet{others}; slate registers {} (flags {flags}) when an image needs it",
            p.display()
        ),
        None => format!(
            "{arch}: cannot run: no static qemu-{q} found{others}; install qemu-user-static (apt-get install qemu-user-static)"
        ),
    }
}

/// Makes sure binaries of `arch` can run here, registering a static
/// qemu-user interpreter with binfmt_misc when nothing usable is. The error
/// says what to install.
pub fn ensure(arch: &str) -> Result<(), String> {
    if runs_natively(arch) {
        return Ok(());
    }
    let q =
        qemu_name(arch).ok_or_else(|| format!("slate does not know how to emulate `{arch}`"))?;
    if usable_entry(q).is_some() {
        return Ok(());
    }
    let (interp, flags) = find_interpreter(q).ok_or_else(|| {
        format!(
            "`{arch}` binaries cannot run on this `{}` host: no static qemu-{q} interpreter found; install `qemu-user-static` (apt-get install qemu-user-static)",
            host_arch()
        )
    })?;
    if !Path::new(BINFMT).join("register").exists() {
        // SAFETY: mounting binfmt_misc at its usual place; plain C strings.
        let rc = unsafe {
            libc::mount(
                c"binfmt_misc".as_ptr(),
                c"/proc/sys/fs/binfmt_misc".as_ptr(),
                c"binfmt_misc".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "`{arch}` binaries need binfmt_misc, which is not mounted and cannot be mounted here ({}); run slate as root, or mount it: mount -t binfmt_misc binfmt_misc {BINFMT}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let name = entry_name(q);
    // A stale entry of ours (disabled, or its interpreter gone) is replaced.
    if Path::new(BINFMT).join(&name).exists() {
        let _ = fs_err::write(Path::new(BINFMT).join(&name), "-1");
    }
    let (magic, mask) = magic(q).expect("every qemu name has a magic");
    let rule = format!(":{name}:M::{magic}:{mask}:{}:{flags}", interp.display());
    fs_err::write(Path::new(BINFMT).join("register"), &rule).map_err(|e| {
        format!(
            "cannot register {} for `{arch}` with binfmt_misc: {e}; run slate as root",
            interp.display()
        )
    })?;
    if usable_entry(q).is_some() {
        Ok(())
    } else {
        Err(format!(
            "registered {} for `{arch}`, but binfmt_misc does not show it enabled",
            interp.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_matches_the_elf_header_of_each_arch() {
        let (m, mask) = magic("aarch64").unwrap();
        assert_eq!(
            m,
            r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
        );
        assert!(mask.ends_with(r"\xfe\xff\xff\xff"));
        let (m, mask) = magic("s390x").unwrap();
        assert!(m.ends_with(r"\x00\x02\x00\x16"), "{m}");
        assert!(mask.ends_with(r"\xff\xfe\xff\xff"));
        let (m, _) = magic("arm").unwrap();
        assert!(m.starts_with(r"\x7f\x45\x4c\x46\x01\x01\x01"), "{m}");
    }

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // The test binary itself is dynamically linked (it has PT_INTERP).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me));
        assert!(!is_static_elf(Path::new("/nonexistent")));
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("script");
        fs::write(&text, "#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&text));
        // A minimal static ELF: a 64-bit header with no program headers.
        let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1];
        elf.resize(64, 0);
        let bin = dir.path().join("static");
        fs::write(&bin, &elf).unwrap();
        assert!(is_static_elf(&bin));
    }
}
