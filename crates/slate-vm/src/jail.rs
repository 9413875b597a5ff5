//! Who QEMU runs as. QEMU emulates devices for a guest that runs the build,
//! so a flaw in it hands the guest whatever QEMU holds. When slate is root,
//! each QEMU gets a user and group of its own, from a range no account
//! uses, taken for as long as the machine runs (a lock file per id), so two
//! machines cannot signal or trace each other. It holds no capabilities
//! and reaches the host's files only through what slate opened for it:
//! the boot files by file descriptor (readable through one shared group),
//! and a folder of its own for its socket and its disk overlay.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first id of slate's range: the group that may read boot files.
/// Machines take the ids above it. Far from the ranges accounts,
/// `systemd` (61184-65519, 524288-1879048191) and subordinate ids use.
pub const ID_BASE: u32 = 0x7a00_0000;
/// How many machines may run at once on one host.
const SLOTS: u32 = 4096;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The ids one QEMU runs with.
pub struct Identity {
    /// `None` when slate is not root: QEMU then runs as slate's user.
    ids: Option<(u32, u32)>,
    groups: Vec<u32>,
    _slot: Option<slate_layers::lock::Lock>,
}

impl Identity {
    /// A free id of slate's range, held until the identity is dropped.
    /// `kvm`: the machine opens /dev/kvm, so it joins the device's group.
    pub fn take(locks: &Path, kvm: bool) -> io::Result<Identity> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || (kvm && kvm_is_roots().is_some()) {
            return Ok(Identity {
                ids: None,
                groups: vec![],
                _slot: None,
            });
        }
        fs_err::create_dir_all(locks)?;
        let start = std::process::id().wrapping_mul(31) + NEXT.fetch_add(1, Ordering::Relaxed);
        for i in 0..SLOTS {
            let slot = (start + i) % SLOTS;
            let Some(f) = slate_layers::lock::try_lock_file(&locks.join(slot.to_string()))? else {
                continue;
            };
            let id = ID_BASE + 1 + slot;
            let mut groups = vec![ID_BASE];
            if kvm {
                if let Ok(m) = fs_err::metadata("/dev/kvm") {
                    groups.push(m.gid());
                }
            }
            return Ok(Identity {
                ids: Some((id, id)),
                groups,
                _slot: Some(f),
            });
        }
        Err(io::Error::other(format!(
            "all {SLOTS} VM ids are in use (lock files in `{}`)",
            locks.display()
        )))
    }
}

/// Why QEMU must stay root to use KVM, if it must: /dev/kvm opens for
/// root alone (no group may read and write it, as udev's `kvm` group does).
pub fn kvm_is_roots() -> Option<String> {
    let m = fs_err::metadata("/dev/kvm").ok()?;
    let mode = m.mode() & 0o777;
    if m.gid() != 0 && mode & 0o060 == 0o060 || mode & 0o006 == 0o006 {
        return None;
    }
    Some(format!(
        "/dev/kvm is root's alone (mode {mode:04o}, group {}), so QEMU runs as root to use it; give it a group as udev does (`groupadd -r kvm; chgrp kvm /dev/kvm; chmod 0660 /dev/kvm`) and QEMU runs as a user of its own",
        m.gid()
    ))
}

impl Identity {
    /// The user QEMU runs as (for the folder given to it).
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.ids
    }

    /// Makes `cmd` start as this identity, keeping the file descriptors
    /// `keep` open across exec, and dying with the slate thread that starts
    /// it. (The parent-death signal is set after the change of user: the
    /// kernel clears it when credentials change.)
    pub fn apply(&self, cmd: &mut Command, keep: Vec<RawFd>) {
        let ids = self.ids;
        let groups: Vec<libc::gid_t> = self.groups.clone();
        // SAFETY: only raw system calls between fork and exec, which act on
        // the one thread the child has; nothing allocates.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_long| {
                    if r != 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                if let Some((uid, gid)) = ids {
                    check(libc::syscall(
                        libc::SYS_setgroups,
                        groups.len(),
                        groups.as_ptr(),
                    ))?;
                    check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
                    check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
                }
                for &fd in &keep {
                    check(libc::fcntl(fd, libc::F_SETFD, 0) as libc::c_long)?;
                }
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) as libc::c_long)?;
                Ok(())
            });
        }
    }
}

/// An open file QEMU reaches by descriptor: `/proc/self/fd/N` works for
/// QEMU whatever the folders above it allow.
pub struct Handed {
    file: File,
}

impl Handed {
    pub fn open(path: &Path) -> io::Result<Handed> {
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open `{}`: {e}", path.display())))?;
        Ok(Handed { file })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The path QEMU opens.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd()))
    }
}

/// Lets QEMU's group read a boot file (and nobody else who is not root).
pub fn grant_read(path: &Path) -> io::Result<()> {
    let m = fs_err::metadata(path)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || (m.gid() == ID_BASE && m.mode() & 0o777 == 0o640) {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(0), Some(ID_BASE))?;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(0o640))
}

/// Gives `path` (a folder slate made) to QEMU's user.
pub fn give(path: &Path, who: &Identity) -> io::Result<()> {
    if let Some((uid, gid)) = who.owner() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}
