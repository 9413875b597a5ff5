//! What runs between `fork` and `execve`: namespaces, mounts, pivot_root.
//!
//! This code runs in the child of a multi-threaded process, so it may only make
//! async-signal-safe calls: no allocation, no locks. Everything it needs — paths,
//! option strings, argv, envp — is prepared in a [`Plan`] before the fork.
//!
//! Three processes are involved. The *outer* process joins the cgroup, unshares
//! the namespaces and forks; it stays in the host PID namespace and relays the
//! exit code. Its child is *init*, PID 1 of the new PID namespace: it builds the
//! root filesystem, pivots into it, forks the command and reaps zombies until the
//! command ends. When init exits the kernel kills everything left in the
//! namespace, and when the mount namespace loses its last process every mount
//! goes with it: nothing can leak onto the host. Both carry a parent-death
//! signal, so a SIGKILL of slate takes the whole tree down.

use std::ffi::CString;
use std::ptr;

pub struct Mount {
    pub source: CString,
    pub target: CString,
    pub fstype: CString,
    pub flags: libc::c_ulong,
    pub data: Option<CString>,
    /// A mount that may fail without failing the environment (e.g. sysfs).
    pub optional: bool,
}

pub enum Prep {
    Mkdir(CString, libc::mode_t),
    /// Create an empty file, to bind a host file over it.
    Touch(CString),
    Symlink(CString, CString),
    Mount(Mount),
    /// The root overlay. Its folders are opened first and named to the
    /// kernel as `/proc/self/fd/N`: the mount options, which anyone inside
    /// can read in `/proc/self/mountinfo`, then show no host path.
    Overlay {
        target: CString,
        /// Lowest first is the caller's order; the kernel wants top first,
        /// which is how they are stored here.
        lower: Vec<CString>,
        upper: CString,
        work: CString,
        flags: libc::c_ulong,
    },
    /// Remount a bind mount read-only, with these flags besides.
    RemountRo(CString, libc::c_ulong),
}

pub struct Plan {
    pub parent_pid: libc::pid_t,
    pub status_fd: libc::c_int,
    pub cgroup_procs: Vec<CString>,
    pub unshare_flags: libc::c_int,
    pub root: CString,
    pub preps: Vec<Prep>,
    pub hostname: CString,
    pub loopback_up: bool,
    pub cwd: CString,
    /// Candidate paths for argv[0] (PATH search done in advance).
    pub exe_candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub new_session: bool,
    /// Capabilities (a bit per capability) the command keeps; all others
    /// leave the bounding, permitted, effective, inheritable and ambient sets.
    pub caps_keep: u64,
    /// The seccomp filter, installed after `no_new_privs`.
    pub seccomp: Vec<libc::sock_filter>,
}

/// Reports a failed setup step to the parent and exits.
fn fail(plan: &Plan, step: &[u8]) -> ! {
    // SAFETY: errno read and raw writes of stack buffers are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 160];
        let mut n = 0;
        for &b in step.iter().take(120) {
            buf[n] = b;
            n += 1;
        }
        buf[n] = 0;
        n += 1;
        n += write_int(&mut buf[n..], errno as i64);
        libc::write(plan.status_fd, buf.as_ptr().cast(), n);
        libc::_exit(125)
    }
}

fn write_int(buf: &mut [u8], mut v: i64) -> usize {
    let mut tmp = [0u8; 20];
    let mut i = 0;
    let neg = v < 0;
    if neg {
        v = -v;
    }
    loop {
        tmp[i] = b'0' + (v % 10) as u8;
        i += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let mut n = 0;
    if neg {
        buf[0] = b'-';
        n = 1;
    }
    while i > 0 {
        i -= 1;
        buf[n] = tmp[i];
        n += 1;
    }
    n
}

fn bytes(c: &CString) -> &[u8] {
    c.as_bytes()
}

/// Runs in the outer process; never returns.
///
/// # Safety
/// Must only be called in a freshly forked child.
pub unsafe fn outer(plan: &Plan) -> ! {
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    if libc::getppid() != plan.parent_pid {
        libc::_exit(125);
    }
    // Emulate close-on-exec now: we never exec here, and a held copy of the
    // spawner's own status pipe would make it wait for the whole build.
    let fd = plan.status_fd as libc::c_uint;
    close_range(3, fd - 1);
    close_range(fd + 1, libc::c_uint::MAX);

    for procs in &plan.cgroup_procs {
        let f = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if f < 0 {
            fail(plan, b"join cgroup");
        }
        let mut buf = [0u8; 24];
        let n = write_int(&mut buf, libc::getpid() as i64);
        if libc::write(f, buf.as_ptr().cast(), n) < 0 {
            fail(plan, b"join cgroup");
        }
        libc::close(f);
    }
    if libc::unshare(plan.unshare_flags) != 0 {
        fail(plan, b"unshare namespaces");
    }
    let pid = libc::fork();
    if pid < 0 {
        fail(plan, b"fork init");
    }
    if pid == 0 {
        init(plan);
    }
    libc::close(plan.status_fd);
    libc::_exit(wait_for(pid))
}

unsafe fn close_range(first: libc::c_uint, last: libc::c_uint) {
    if first > last {
        return;
    }
    if libc::syscall(libc::SYS_close_range, first, last, 0) != 0 {
        let last = last.min(65536);
        for fd in first..=last {
            libc::close(fd as libc::c_int);
        }
    }
}

/// Waits for `pid`, reaping any other child on the way; returns a shell-style code.
unsafe fn wait_for(pid: libc::pid_t) -> libc::c_int {
    loop {
        let mut status = 0;
        let r = libc::waitpid(-1, &mut status, 0);
        if r < 0 {
            if *libc::__errno_location() == libc::EINTR {
                continue;
            }
            return 125;
        }
        if r == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        }
    }
}

unsafe fn init(plan: &Plan) -> ! {
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    let none = c"none";
    if libc::mount(
        none.as_ptr(),
        c"/".as_ptr(),
        ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        ptr::null(),
    ) != 0
    {
        fail(plan, b"make mounts private");
    }
    // Paths inside the new root are walked one component at a time without
    // following symlinks: the image is untrusted, and a symlink such as
    // `/etc/resolv.conf -> /etc/nologin` followed from the host's root would
    // create or cover a host file.
    let mut root = Root(-1);
    for p in &plan.preps {
        prepare(plan, &mut root, p);
    }
    root.forget();
    if libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len()) != 0 {
        fail(plan, b"set hostname");
    }
    if plan.loopback_up {
        loopback_up(plan);
    }
    enter_root(plan);
    let pid = libc::fork();
    if pid < 0 {
        fail(plan, b"fork command");
    }
    if pid == 0 {
        command(plan);
    }
    libc::close(plan.status_fd);
    libc::_exit(wait_for(pid))
}

/// Carries out one step of building the root filesystem.
unsafe fn prepare(plan: &Plan, root: &mut Root, p: &Prep) {
    match p {
        Prep::Mkdir(path, mode) => prep_mkdir(plan, root, path, *mode),
        Prep::Touch(path) => prep_touch(plan, root, path),
        Prep::Symlink(target, link) => prep_symlink(plan, root, target, link),
        Prep::Mount(m) => prep_mount(plan, root, m),
        Prep::Overlay {
            target,
            lower,
            upper,
            work,
            flags,
        } => {
            root.forget();
            mount_overlay(plan, target, lower, upper, work, *flags);
        }
        Prep::RemountRo(target, extra) => prep_remount_ro(plan, root, target, *extra),
    }
}

/// The new root, opened once and walked from by every step below it.
///
/// A descriptor of a folder sees mounts made later on folders below it, so
/// one opening serves every step until something is mounted on the root
/// itself; such a step calls [`Root::forget`].
struct Root(libc::c_int);

impl Root {
    unsafe fn fd(&mut self, plan: &Plan) -> libc::c_int {
        if self.0 < 0 {
            self.0 = libc::open(
                plan.root.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if self.0 < 0 {
                fail(plan, b"open the new root");
            }
        }
        self.0
    }

    unsafe fn forget(&mut self) {
        if self.0 >= 0 {
            libc::close(self.0);
            self.0 = -1;
        }
    }
}

/// Makes a folder, walking to it when it is inside the new root.
unsafe fn prep_mkdir(plan: &Plan, root: &mut Root, path: &CString, mode: libc::mode_t) {
    match in_root(plan, path) {
        Some(rel) => {
            libc::close(walk(plan, root, path, rel, Create::Dir(mode)));
        }
        None => {
            if libc::mkdir(path.as_ptr(), mode) != 0 && *libc::__errno_location() != libc::EEXIST {
                fail2(plan, b"mkdir ", bytes(path));
            }
        }
    }
}

/// Creates an empty file inside the new root, to bind a host file over it.
unsafe fn prep_touch(plan: &Plan, root: &mut Root, path: &CString) {
    let Some(rel) = in_root(plan, path) else {
        fail2(plan, b"create outside the root ", bytes(path));
    };
    libc::close(walk(plan, root, path, rel, Create::File));
}

/// Makes `link` (inside the new root) point to `target`.
unsafe fn prep_symlink(plan: &Plan, root: &mut Root, target: &CString, link: &CString) {
    let Some(rel) = in_root(plan, link) else {
        fail2(plan, b"symlink outside the root ", bytes(link));
    };
    let (dir, name) = split_last(rel);
    let dfd = walk(plan, root, link, dir, Create::None);
    let mut buf = [0u8; COMPONENT_MAX + 1];
    let name = c_component(plan, link, name, &mut buf);
    if libc::symlinkat(target.as_ptr(), dfd, name) != 0 && *libc::__errno_location() != libc::EEXIST
    {
        fail2(plan, b"symlink ", bytes(link));
    }
    libc::close(dfd);
}

/// Mounts `m`, on a target inside the new root through its descriptor.
unsafe fn prep_mount(plan: &Plan, root: &mut Root, m: &Mount) {
    let data = m.data.as_ref().map_or(ptr::null(), |d| d.as_ptr().cast());
    let fd = in_root(plan, &m.target).map(|rel| {
        let create = if m.optional {
            Create::Maybe
        } else {
            Create::None
        };
        walk(plan, root, &m.target, rel, create)
    });
    if fd.is_none() {
        // Mounted on the root itself (or outside it): an opened root
        // would no longer show what is there.
        root.forget();
    }
    if fd == Some(-1) {
        // An optional mount whose target is not there.
        return;
    }
    let mut buf = [0u8; 40];
    let target = fd.map_or(m.target.as_ptr(), |fd| fd_path(fd, &mut buf));
    if libc::mount(m.source.as_ptr(), target, m.fstype.as_ptr(), m.flags, data) != 0 && !m.optional
    {
        fail2(plan, b"mount ", bytes(&m.target));
    }
    if let Some(fd) = fd {
        libc::close(fd);
    }
}

/// Remounts the bind mount on `target` read-only, with `extra` flags.
unsafe fn prep_remount_ro(plan: &Plan, root: &mut Root, target: &CString, extra: libc::c_ulong) {
    let none = c"none";
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC | extra;
    let fd = in_root(plan, target).map(|rel| walk(plan, root, target, rel, Create::None));
    let mut buf = [0u8; 40];
    let at = fd.map_or(target.as_ptr(), |fd| fd_path(fd, &mut buf));
    if libc::mount(none.as_ptr(), at, ptr::null(), flags, ptr::null()) != 0 {
        fail2(plan, b"remount read-only ", bytes(target));
    }
    if let Some(fd) = fd {
        libc::close(fd);
    }
}

/// Makes the new root the root and enters the command's folder; the old
/// root is detached.
unsafe fn enter_root(plan: &Plan) {
    if libc::chdir(plan.root.as_ptr()) != 0 {
        fail(plan, b"enter new root");
    }
    let dot = c".";
    if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
        fail(plan, b"pivot_root");
    }
    if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
        fail(plan, b"detach old root");
    }
    if libc::chdir(c"/".as_ptr()) != 0 {
        fail(plan, b"chdir /");
    }
    if libc::chdir(plan.cwd.as_ptr()) != 0 {
        fail2(plan, b"chdir to workdir ", bytes(&plan.cwd));
    }
}

/// The longest path component the walk handles (NAME_MAX).
const COMPONENT_MAX: usize = 255;

#[derive(Clone, Copy)]
enum Create {
    /// Every component must exist.
    None,
    /// Like `None`, but a missing component gives -1 instead of failing.
    Maybe,
    /// Missing folders are made, the last with this mode.
    Dir(libc::mode_t),
    /// Missing folders are made; the last component is an empty file.
    File,
}

/// The part of `path` below the new root, when `path` is strictly inside it.
fn in_root<'a>(plan: &Plan, path: &'a std::ffi::CStr) -> Option<&'a [u8]> {
    let (p, root) = (path.to_bytes(), plan.root.as_bytes());
    (p.len() > root.len() + 1 && p.starts_with(root) && p[root.len()] == b'/')
        .then(|| &p[root.len() + 1..])
}

fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

/// `name` NUL-terminated in `buf`; `.`, `..` and over-long names fail.
fn c_component(
    plan: &Plan,
    path: &CString,
    name: &[u8],
    buf: &mut [u8; COMPONENT_MAX + 1],
) -> *const libc::c_char {
    if name.is_empty() || name == b"." || name == b".." || name.len() > COMPONENT_MAX {
        fail2(plan, b"bad path ", bytes(path));
    }
    buf[..name.len()].copy_from_slice(name);
    buf[name.len()] = 0;
    buf.as_ptr().cast()
}

/// Opens `rel` under the new root (O_PATH) one component at a time,
/// refusing symlinks anywhere on the way, creating what `create` says.
unsafe fn walk(
    plan: &Plan,
    root: &mut Root,
    path: &CString,
    rel: &[u8],
    create: Create,
) -> libc::c_int {
    let root = root.fd(plan);
    if !matches!(create, Create::File) {
        let fd = open_beneath(root, rel);
        if fd >= 0 {
            return fd;
        }
    }
    let mut fd = libc::fcntl(root, libc::F_DUPFD_CLOEXEC, 0);
    if fd < 0 {
        fail(plan, b"open the new root");
    }
    let mut parts = rel
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .peekable();
    while let Some(name) = parts.next() {
        let last = parts.peek().is_none();
        let mut buf = [0u8; COMPONENT_MAX + 1];
        let cname = c_component(plan, path, name, &mut buf);
        match (create, last) {
            (Create::File, true) => {
                let f = libc::openat(
                    fd,
                    cname,
                    libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o644,
                );
                if f < 0 {
                    if *libc::__errno_location() == libc::ELOOP {
                        fail2(
                            plan,
                            b"symlink in the image where slate mounts (not followed): ",
                            bytes(path),
                        );
                    }
                    fail2(plan, b"create ", bytes(path));
                }
                libc::close(f);
            }
            (Create::Dir(mode), true) => {
                if libc::mkdirat(fd, cname, mode) != 0 && *libc::__errno_location() != libc::EEXIST
                {
                    fail2(plan, b"mkdir ", bytes(path));
                }
            }
            (Create::Dir(_) | Create::File, false) => {
                if libc::mkdirat(fd, cname, 0o755) != 0 && *libc::__errno_location() != libc::EEXIST
                {
                    fail2(plan, b"mkdir ", bytes(path));
                }
            }
            (Create::None | Create::Maybe, _) => {}
        }
        let next = libc::openat(fd, cname, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC);
        libc::close(fd);
        if next < 0 && matches!(create, Create::Maybe) {
            return -1;
        }
        if next < 0 {
            fail2(plan, b"open (not following symlinks) ", bytes(path));
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(next, &mut st) != 0 || (st.st_mode & libc::S_IFMT) == libc::S_IFLNK {
            fail2(
                plan,
                b"symlink in the image where slate mounts (not followed): ",
                bytes(path),
            );
        }
        fd = next;
    }
    fd
}

/// `rel` opened (O_PATH) below `root` in one call, refusing symlinks and
/// `..` anywhere on the way; -1 when that fails for any reason, and the
/// caller walks component by component to make what is missing or to say
/// which step failed.
unsafe fn open_beneath(root: libc::c_int, rel: &[u8]) -> libc::c_int {
    let mut buf = [0u8; 4096];
    if rel.is_empty() || rel.len() >= buf.len() || rel.contains(&0) {
        return -1;
    }
    buf[..rel.len()].copy_from_slice(rel);
    let mut how: libc::open_how = std::mem::zeroed();
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    let fd = libc::syscall(
        libc::SYS_openat2,
        root,
        buf.as_ptr(),
        &how as *const libc::open_how,
        std::mem::size_of::<libc::open_how>(),
    );
    fd as libc::c_int
}

/// Mounts the root overlay with its folders named by descriptor.
unsafe fn mount_overlay(
    plan: &Plan,
    target: &CString,
    lower: &[CString],
    upper: &CString,
    work: &CString,
    flags: libc::c_ulong,
) {
    let mut opts = [0u8; 4096];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        if n + s.len() >= opts.len() {
            fail(plan, b"the image has too many layers for one overlay mount");
        }
        opts[n..n + s.len()].copy_from_slice(s);
        n += s.len();
    };
    let mut opened = [0 as libc::c_int; 512];
    let mut count = 0;
    let dir = |p: &CString| {
        let fd = libc::open(
            p.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            fail2(plan, b"open layer ", bytes(p));
        }
        fd
    };
    let fd_name = |fd: libc::c_int, put: &mut dyn FnMut(&[u8])| {
        let mut buf = [0u8; 40];
        fd_path(fd, &mut buf);
        let len = buf.iter().position(|&b| b == 0).unwrap_or(0);
        put(&buf[..len]);
    };
    put(b"lowerdir=");
    for (i, l) in lower.iter().enumerate() {
        if i > 0 {
            put(b":");
        }
        if count == opened.len() {
            fail(plan, b"the image has too many layers for one overlay mount");
        }
        let fd = dir(l);
        opened[count] = fd;
        count += 1;
        fd_name(fd, &mut put);
    }
    for (key, p) in [(&b",upperdir="[..], upper), (&b",workdir="[..], work)] {
        put(key);
        let fd = dir(p);
        if count < opened.len() {
            opened[count] = fd;
            count += 1;
        }
        fd_name(fd, &mut put);
    }
    put(b"\0");
    if libc::mount(
        c"overlay".as_ptr(),
        target.as_ptr(),
        c"overlay".as_ptr(),
        flags,
        opts.as_ptr().cast(),
    ) != 0
    {
        fail2(plan, b"mount overlay on ", bytes(target));
    }
    for &fd in &opened[..count] {
        libc::close(fd);
    }
}

/// Drops every capability `plan.caps_keep` does not name, sets
/// `no_new_privs` and installs the seccomp filter. After `execve` a root
/// command gains nothing back: its permitted set is capped by the bounding
/// set and, with `no_new_privs`, by what it held before.
unsafe fn confine(plan: &Plan) {
    let keep = plan.caps_keep;
    for cap in 0..64u64 {
        if keep & (1 << cap) == 0
            && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            && *libc::__errno_location() != libc::EINVAL
        {
            fail(plan, b"drop capabilities from the bounding set");
        }
    }
    if libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        0,
        0,
    ) != 0
        && *libc::__errno_location() != libc::EINVAL
    {
        fail(plan, b"clear ambient capabilities");
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let hdr = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let (lo, hi) = (keep as u32, (keep >> 32) as u32);
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    if libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) != 0 {
        fail(plan, b"drop capabilities");
    }
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        fail(plan, b"set no_new_privs");
    }
    if !plan.seccomp.is_empty() {
        let prog = libc::sock_fprog {
            len: plan.seccomp.len() as libc::c_ushort,
            filter: plan.seccomp.as_ptr() as *mut libc::sock_filter,
        };
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog as libc::c_ulong,
        ) != 0
        {
            fail(plan, b"install the seccomp filter");
        }
    }
}

/// `/proc/self/fd/N` in `buf`: a mount on it lands on what `fd` opened.
fn fd_path(fd: libc::c_int, buf: &mut [u8; 40]) -> *const libc::c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let n = write_int(&mut buf[prefix.len()..], fd as i64);
    buf[prefix.len() + n] = 0;
    buf.as_ptr().cast()
}

fn fail2(plan: &Plan, what: &[u8], path: &[u8]) -> ! {
    let mut buf = [0u8; 120];
    let mut n = 0;
    for &b in what.iter().chain(path.iter()).take(buf.len()) {
        buf[n] = b;
        n += 1;
    }
    fail(plan, &buf[..n])
}

unsafe fn loopback_up(plan: &Plan) {
    let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    if s < 0 {
        fail(plan, b"socket for loopback");
    }
    let mut req: libc::ifreq = std::mem::zeroed();
    req.ifr_name[0] = b'l' as libc::c_char;
    req.ifr_name[1] = b'o' as libc::c_char;
    if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) != 0 {
        fail(plan, b"read loopback flags");
    }
    req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    if libc::ioctl(s, libc::SIOCSIFFLAGS, &req) != 0 {
        fail(plan, b"bring loopback up");
    }
    libc::close(s);
}

unsafe fn command(plan: &Plan) -> ! {
    // The status pipe stays open (close-on-exec) until `execve`, so that a
    // failure to confine the command is reported like any setup failure.
    // Dispositions slate set for itself survive fork and execve when they
    // are "ignore": Rust ignores SIGPIPE, and `slate run`/`shell` ignore
    // SIGINT while the command owns the terminal. The command starts with
    // every signal at its default and none blocked, as from a shell.
    for sig in 1..libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::sigprocmask(libc::SIG_SETMASK, &none, ptr::null_mut());
    if plan.new_session {
        libc::setsid();
    }
    confine(plan);
    let argv = ptrs_of(&plan.argv);
    let envp = ptrs_of(&plan.envp);
    for exe in &plan.exe_candidates {
        libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    let msg = b"slate: command not found: ";
    libc::write(2, msg.as_ptr().cast(), msg.len());
    let a0 = plan.argv[0].as_bytes();
    libc::write(2, a0.as_ptr().cast(), a0.len());
    libc::write(2, b"\n".as_ptr().cast(), 1);
    libc::_exit(127)
}

/// The null-terminated pointer array execve wants, on the stack (no allocation
/// after fork). The parent refuses more than `MAX_ARGS` entries.
fn ptrs_of(v: &[CString]) -> PtrArray {
    let mut a = PtrArray {
        p: [ptr::null(); MAX_ARGS + 1],
    };
    for (i, c) in v.iter().take(MAX_ARGS).enumerate() {
        a.p[i] = c.as_ptr();
    }
    a
}

pub const MAX_ARGS: usize = 4096;

struct PtrArray {
    p: [*const libc::c_char; MAX_ARGS + 1],
}

impl PtrArray {
    fn as_ptr(&self) -> *const *const libc::c_char {
        self.p.as_ptr()
    }
}
