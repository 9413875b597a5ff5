//! The seccomp filter every sandboxed command runs under, and the capability
//! sets it keeps.
//!
//! The filter follows the OCI runtimes' default profile in spirit, written as
//! a deny list: what a build has no business doing on a shared kernel fails
//! with `EPERM` (mounts, new namespaces, kernel modules, kexec, BPF, keyrings,
//! `open_by_handle_at`, the clock, swap, reboot, `perf_event_open`, io_uring,
//! pushing input into a terminal). System calls of another ABI than the
//! host's (i386 or x32 on x86_64) fail with `ENOSYS`: the deny list is written
//! in native numbers and would not hold for them. `clone3` fails with `ENOSYS`
//! so that libc falls back to `clone`, whose flags the filter can read.
//!
//! The program is built before the fork (it allocates) and installed by the
//! child after `no_new_privs`, just before `execve`.

/// Capabilities (bit numbers from `linux/capability.h`) kept by bake steps:
/// what a package manager needs to unpack files with their owners and
/// modes, run maintainer scripts that add users, and drop to `_apt`. The OCI
/// runtimes' default set, without `MKNOD` and `NET_RAW`.
pub const PACKAGE_CAPS: u64 = (1 << 0) // CHOWN
    | (1 << 1) // DAC_OVERRIDE
    | (1 << 3) // FOWNER
    | (1 << 4) // FSETID
    | (1 << 5) // KILL
    | (1 << 6) // SETGID
    | (1 << 7) // SETUID
    | (1 << 8) // SETPCAP
    | (1 << 10) // NET_BIND_SERVICE
    | (1 << 18) // SYS_CHROOT
    | (1 << 29) // AUDIT_WRITE
    | (1 << 31); // SETFCAP

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// System calls that fail with `EPERM`, whatever their arguments.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn denied() -> Vec<libc::c_long> {
    let mut v = vec![
        // Mounts, in both APIs, and the root.
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        // New namespaces (clone's flags are checked apart).
        libc::SYS_unshare,
        libc::SYS_setns,
        // The kernel itself.
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_syslog,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_lookup_dcookie,
        libc::SYS_vhangup,
        // Keyrings are not namespaced.
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_keyctl,
        // File handles reach outside the root (the "shocker" escape).
        libc::SYS_open_by_handle_at,
        // The clock is the host's.
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        // Asynchronous I/O that bypasses this very filter.
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_userfaultfd,
        libc::SYS_fanotify_init,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS__sysctl,
        libc::SYS_nfsservctl,
    ]);
    v
}

/// `clone` flags that make namespaces.
const NEW_NAMESPACES: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
const fn arg_low(i: u32) -> u32 {
    // Little-endian: the low 32 bits of argument i.
    16 + 8 * i
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

const LOAD: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const JGE: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
const JSET: u32 = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;
const RET: u32 = libc::BPF_RET | libc::BPF_K;

fn errno(e: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA)
}

/// The filter program; empty on architectures slate has no table for.
pub fn program() -> Vec<libc::sock_filter> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let allow = stmt(RET, libc::SECCOMP_RET_ALLOW);
        let eperm = stmt(RET, errno(libc::EPERM));
        let enosys = stmt(RET, errno(libc::ENOSYS));
        let mut p = vec![
            stmt(LOAD, ARCH),
            jump(JEQ, AUDIT_ARCH, 1, 0),
            enosys,
            stmt(LOAD, NR),
        ];
        #[cfg(target_arch = "x86_64")]
        p.extend([jump(JGE, 0x4000_0000, 0, 1), enosys]);
        p.extend([jump(JEQ, libc::SYS_clone3 as u32, 0, 1), enosys]);
        for nr in denied() {
            p.extend([jump(JEQ, nr as u32, 0, 1), eperm]);
        }
        // clone: refuse namespace flags (argument 0 on both architectures).
        p.extend([
            jump(JEQ, libc::SYS_clone as u32, 0, 3),
            stmt(LOAD, arg_low(0)),
            jump(JSET, NEW_NAMESPACES, 0, 1),
            eperm,
        ]);
        // ioctl: no typing into the terminal the command shares with its
        // caller (TIOCSTI), no console tricks (TIOCLINUX). The command is an
        // unsigned int: the low 32 bits are what the kernel reads.
        p.extend([
            stmt(LOAD, NR),
            jump(JEQ, libc::SYS_ioctl as u32, 0, 4),
            stmt(LOAD, arg_low(1)),
            jump(JEQ, libc::TIOCSTI as u32, 1, 0),
            jump(JEQ, libc::TIOCLINUX as u32, 0, 1),
            eperm,
        ]);
        p.push(allow);
        p
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child under the filter and `no_new_privs`;
    /// returns what it wrote to the pipe (an errno, or 0 for success).
    fn in_child(f: fn() -> i32) -> i32 {
        let prog = program();
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut _,
        };
        let mut fds = [0; 2];
        // SAFETY: a plain fork of a test process; the child only makes raw
        // syscalls and exits with _exit.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let r = libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &fprog as *const _ as libc::c_ulong,
                );
                let v: i32 = if r != 0 { -1 } else { f() };
                libc::write(fds[1], (&v as *const i32).cast(), 4);
                libc::_exit(0);
            }
            let mut v = 0i32;
            libc::close(fds[1]);
            assert_eq!(libc::read(fds[0], (&mut v as *mut i32).cast(), 4), 4);
            libc::close(fds[0]);
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            v
        }
    }

    fn errno_of(r: libc::c_long) -> i32 {
        if r == -1 {
            // SAFETY: reading errno right after the failed call.
            unsafe { *libc::__errno_location() }
        } else {
            0
        }
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    // One SAFETY note for the many small blocks below.
    #[allow(clippy::undocumented_unsafe_blocks)]
    fn the_filter_refuses_what_builds_must_not_do_and_allows_the_rest() {
        // SAFETY (all closures): raw syscalls with valid or null arguments,
        // each in a forked child.
        assert_eq!(
            in_child(|| errno_of(unsafe { libc::syscall(libc::SYS_unshare, 0) })),
            libc::EPERM,
            "unshare"
        );
        assert_eq!(
            in_child(|| errno_of(unsafe { libc::syscall(libc::SYS_keyctl, 0, 0) })),
            libc::EPERM,
            "keyctl"
        );
        assert_eq!(
            in_child(|| errno_of(unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                    0,
                    0,
                    0,
                    0,
                )
            })),
            libc::EPERM,
            "clone with CLONE_NEWUSER"
        );
        assert_eq!(
            in_child(|| errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) })),
            libc::ENOSYS,
            "clone3"
        );
        assert_eq!(
            in_child(|| errno_of(
                unsafe { libc::ioctl(0, libc::TIOCSTI, c"x".as_ptr()) } as libc::c_long
            )),
            libc::EPERM,
            "TIOCSTI"
        );
        // What every build does still works: a fork, a pipe, a getpid.
        assert_eq!(
            in_child(|| {
                // SAFETY: fork then immediate _exit in the child.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    unsafe { libc::_exit(0) }
                }
                let mut st = 0;
                let r = unsafe { libc::waitpid(pid, &mut st, 0) };
                if r == pid {
                    0
                } else {
                    errno_of(-1)
                }
            }),
            0,
            "fork"
        );
        assert_eq!(
            in_child(|| {
                let r = unsafe { libc::syscall(libc::SYS_getpid) };
                if r > 0 {
                    0
                } else {
                    errno_of(-1)
                }
            }),
            0,
            "getpid"
        );
    }
}
