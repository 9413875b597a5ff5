//! Unpacks tar archives that slate did not write — layers of OCI images from
//! a registry, `tar:` bases — into a root folder, as root, without touching
//! anything outside it.
//!
//! Every path, whiteouts and hard-link targets included, is resolved under
//! the root one component at a time with `openat(O_NOFOLLOW)`: a leading `/`
//! is dropped, `..` is an error, and so is a path whose parent is a symlink
//! ("goes through the symlink"). Symlinks are written as they are and never
//! followed while unpacking. Layers that image tools write from a real
//! filesystem never name a path through a symlink, so refusing costs only
//! hostile archives; skipping instead would leave an image silently short of
//! files.
//!
//! What is kept depends on where the archive comes from ([`Source`]); what
//! is left out is returned ([`Dropped`]) for the caller to warn about.

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{self, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot read the archive")]
    Read(#[source] io::Error),
    #[error("cannot open the root folder `{}`", path.display())]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer entry `{entry}` climbs out of the root with `..`")]
    DotDot { entry: String },
    #[error("layer entry `{entry}` is a whiteout for `.` or `..`")]
    Whiteout { entry: String },
    #[error("layer entry `{entry}` goes through the symlink `{link}`")]
    Symlink { entry: String, link: String },
    #[error("hard link `{entry}` points at `{target}`, which is not in the root")]
    LinkTarget { entry: String, target: String },
    #[error("cannot {op} `{entry}`")]
    Io {
        op: &'static str,
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run `{tool}` to decompress `{}` (install it)", path.display())]
    Decompressor {
        tool: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{tool}` could not decompress `{}`: {why}", path.display())]
    Decompress {
        tool: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// Where an archive comes from, which decides what of it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A layer of an OCI image: whiteouts applied; device nodes and fifos left
    /// out; setuid and setgid kept, as base images need them (`su`) and
    /// sandboxes mount layers nosuid and run with no_new_privs.
    OciLayer,
    /// A `tar:` base: device nodes and fifos left out, setuid and setgid bits
    /// cleared on files; `.wh.` names are plain files, as a base has nothing
    /// below it to hide.
    TarBase,
    /// A tarball slate wrote itself from its own layers (the merged rootfs of
    /// a disk export): kept whole, device nodes and fifos included.
    Slate,
}

/// What an archive had that was not unpacked as it was.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dropped {
    /// Device nodes, fifos and entries of unknown types, left out.
    pub special: Vec<String>,
    /// Files whose setuid or setgid bit was cleared.
    pub setid: Vec<String>,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.special.is_empty() && self.setid.is_empty()
    }

    pub fn extend(&mut self, other: Dropped) {
        self.special.extend(other.special);
        self.setid.extend(other.setid);
    }

    /// One line for the user, naming the first few paths; `None` when
    /// nothing was dropped.
    pub fn describe(&self) -> Option<String> {
        fn names(v: &[String]) -> String {
            let mut s: Vec<String> = v.iter().take(5).map(|n| format!("`{n}`")).collect();
            if v.len() > 5 {
                s.push(format!("and {} more", v.len() - 5));
            }
            s.join(", ")
        }
        let mut parts = Vec::new();
        if !self.special.is_empty() {
            parts.push(format!(
                "left out {} device node(s), fifo(s) or entries of unknown type ({})",
                self.special.len(),
                names(&self.special)
            ));
        }
        if !self.setid.is_empty() {
            parts.push(format!(
                "cleared setuid/setgid bits on {} file(s) ({})",
                self.setid.len(),
                names(&self.setid)
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Unpacks the tar stream `reader` into the existing folder `root`.
pub fn unpack(reader: impl Read, root: &Path, source: Source) -> Result<Dropped, UnpackError> {
    let root_fd = File::open(root)
        .map(OwnedFd::from)
        .map_err(|e| UnpackError::Root {
            path: root.to_path_buf(),
            source: e,
        })?;
    let mut u = Unpacker {
        root: root_fd,
        source,
        as_root: unistd::geteuid().is_root(),
        written: HashSet::new(),
        dropped: Dropped::default(),
    };
    let mut ar = tar::Archive::new(reader);
    for entry in ar.entries().map_err(UnpackError::Read)? {
        u.entry(&mut entry.map_err(UnpackError::Read)?)?;
    }
    Ok(u.dropped)
}

/// Unpacks the `tar:` base at `path` — plain, or compressed with gzip, xz,
/// zstd or bzip2 (the last three through their command-line tools) — into
/// `root`.
pub fn unpack_tar_base(path: &Path, root: &Path) -> Result<Dropped, UnpackError> {
    let mut f = File::open(path).map_err(UnpackError::Read)?;
    let mut magic = [0u8; 6];
    let mut n = 0;
    while n < magic.len() {
        match f.read(&mut magic[n..]).map_err(UnpackError::Read)? {
            0 => break,
            k => n += k,
        }
    }
    f.rewind().map_err(UnpackError::Read)?;
    let tool = match &magic[..n] {
        [0x1f, 0x8b, ..] => {
            let gz = flate2::read::MultiGzDecoder::new(io::BufReader::new(f));
            return unpack(gz, root, Source::TarBase);
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0xfd, b'7', b'z', b'X', b'Z', 0] => "xz",
        [b'B', b'Z', b'h', ..] => "bzip2",
        _ => return unpack(io::BufReader::new(f), root, Source::TarBase),
    };
    let mut child = Command::new(tool)
        .args(["-d", "-c", "-q"])
        .stdin(f)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| UnpackError::Decompressor {
            tool,
            path: path.to_path_buf(),
            source,
        })?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let (res, stderr, status) = std::thread::scope(|s| {
        let errors = s.spawn(move || {
            let mut text = Vec::new();
            let _ = err.read_to_end(&mut text);
            String::from_utf8_lossy(&text).trim().to_string()
        });
        let mut res = unpack(&mut out, root, Source::TarBase);
        if res.is_ok() {
            // What follows the end of the archive, so the tool can finish.
            if let Err(e) = io::copy(&mut out, &mut io::sink()) {
                res = Err(UnpackError::Read(e));
            }
        } else {
            let _ = child.kill();
        }
        drop(out);
        let status = child.wait();
        (res, errors.join().unwrap_or_default(), status)
    });
    // A tool that said why it failed has the first word: what the archive
    // reader then saw was only a cut stream.
    let dropped = match res {
        Err(_) if !stderr.is_empty() => {
            return Err(UnpackError::Decompress {
                tool,
                path: path.to_path_buf(),
                why: stderr,
            })
        }
        r => r?,
    };
    match status {
        Ok(st) if st.success() => Ok(dropped),
        Ok(st) => Err(UnpackError::Decompress {
            tool,
            path: path.to_path_buf(),
            why: if stderr.is_empty() {
                st.to_string()
            } else {
                stderr
            },
        }),
        Err(e) => Err(UnpackError::Decompress {
            tool,
            path: path.to_path_buf(),
            why: e.to_string(),
        }),
    }
}

struct Unpacker {
    root: OwnedFd,
    source: Source,
    as_root: bool,
    /// Paths this archive wrote, with their parents: a whiteout in a layer
    /// hides what lower layers had, not the layer's own files.
    written: HashSet<PathBuf>,
    dropped: Dropped,
}

/// What a header says about an entry besides its name, type and link.
struct Meta {
    mode: u32,
    owner: (u32, u32),
    mtime: i64,
    device: (u32, u32),
}

impl Meta {
    fn read(header: &tar::Header, name: &str) -> Result<Meta, UnpackError> {
        let io = |op| io_error(op, name);
        let mode = header.mode().map_err(io("read the mode of"))? & 0o7777;
        let owner = (
            header.uid().map_err(io("read the owner of"))?,
            header.gid().map_err(io("read the owner of"))?,
        );
        let owner = (
            u32::try_from(owner.0).map_err(|_| io("own")(invalid("uid out of range")))?,
            u32::try_from(owner.1).map_err(|_| io("own")(invalid("gid out of range")))?,
        );
        let mtime = header.mtime().unwrap_or(0).min(i64::MAX as u64) as i64;
        let device = (
            header.device_major().ok().flatten().unwrap_or(0),
            header.device_minor().ok().flatten().unwrap_or(0),
        );
        Ok(Meta {
            mode,
            owner,
            mtime,
            device,
        })
    }
}

impl Unpacker {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        // Old archives mark folders by a trailing slash only.
        let kind = match kind {
            T::Regular if raw.ends_with(b"/") && entry.header().as_ustar().is_none() => {
                T::Directory
            }
            k => k,
        };
        let name = String::from_utf8_lossy(&raw).into_owned();
        let parts = components(&raw, &name)?;
        let Some((last, parents)) = parts.split_last() else {
            return Ok(()); // the root itself
        };
        let rel: PathBuf = parts.iter().collect();
        if self.source == Source::OciLayer && self.apply_marker(parents, last, &name)? {
            return Ok(());
        }
        let meta = Meta::read(entry.header(), &name)?;
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let dir = self.open_dir(parents, true, &name)?.expect("created");
        let last = cstring(last).map_err(io_error("unpack", &name))?;
        let d = dir.as_fd();
        match kind {
            T::Directory => self.create_dir(d, &last, &meta, &name)?,
            T::Regular | T::Continuous | T::GNUSparse => {
                self.write_file(d, &last, entry, &meta, &rel, &name)?
            }
            T::Symlink => self.create_symlink(d, &last, link, &meta, &name)?,
            T::Link => self.create_hard_link(d, &last, link, &name)?,
            T::Char | T::Block | T::Fifo if self.source == Source::Slate => {
                self.create_node(d, &last, kind, &meta, &name)?
            }
            _ => {
                self.dropped
                    .special
                    .push(rel.to_string_lossy().into_owned());
                return Ok(());
            }
        }
        self.written.extend(rel.ancestors().map(Path::to_path_buf));
        Ok(())
    }

    /// Applies `last` when it is a whiteout or an opaque marker, and skips
    /// other aufs bookkeeping; `false` when it is an ordinary name.
    fn apply_marker(
        &mut self,
        parents: &[OsString],
        last: &OsStr,
        name: &str,
    ) -> Result<bool, UnpackError> {
        let l = last.as_bytes();
        if l == b".wh..wh..opq" {
            self.opaque(parents, name)?;
            return Ok(true);
        }
        if l.starts_with(b".wh..wh.") {
            return Ok(true); // aufs bookkeeping, not a whiteout
        }
        if let Some(hidden) = l.strip_prefix(b".wh.") {
            self.whiteout(parents, OsStr::from_bytes(hidden), name)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A folder: one already there is kept, anything else in its place is
    /// replaced.
    fn create_dir(
        &self,
        d: BorrowedFd,
        last: &CStr,
        meta: &Meta,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io = |op| io_error(op, name);
        let fd = match lstat_at(d, last).map_err(io("inspect"))? {
            Some(st) if is_dir(&st) => open_dir_at(d, last),
            other => {
                if other.is_some() {
                    remove_at(d, last).map_err(io("replace"))?;
                }
                stat::mkdirat(d, last, Mode::S_IRWXU)
                    .map_err(io::Error::from)
                    .and_then(|()| open_dir_at(d, last))
            }
        }
        .map_err(io("create the folder"))?;
        self.set_owner_mode(fd.as_fd(), meta.owner, meta.mode)
            .map_err(io("set the owner and mode of"))
    }

    /// A regular file, written from `data` in place of whatever was there.
    fn write_file<R: Read>(
        &mut self,
        d: BorrowedFd,
        last: &CStr,
        data: &mut tar::Entry<R>,
        meta: &Meta,
        rel: &Path,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io = |op| io_error(op, name);
        let mut mode = meta.mode;
        if self.source == Source::TarBase && mode & 0o6000 != 0 {
            mode &= !0o6000;
            self.dropped.setid.push(rel.to_string_lossy().into_owned());
        }
        remove_at(d, last).map_err(io("replace"))?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
        let mut f = File::from(
            open_at(d, last, flags, Mode::S_IRUSR | Mode::S_IWUSR).map_err(io("create"))?,
        );
        io::copy(data, &mut f).map_err(io("write"))?;
        self.set_owner_mode(f.as_fd(), meta.owner, mode)
            .map_err(io("set the owner and mode of"))?;
        let t = TimeSpec::new(meta.mtime, 0);
        stat::futimens(&f, &t, &t)
            .map_err(io::Error::from)
            .map_err(io("set the time of"))?;
        Ok(())
    }

    /// A symlink to `link`, written as it is and never followed.
    fn create_symlink(
        &self,
        d: BorrowedFd,
        last: &CStr,
        link: Option<Vec<u8>>,
        meta: &Meta,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io = |op| io_error(op, name);
        let target = match link {
            Some(t) if !t.is_empty() => t,
            _ => return Err(io("link")(invalid("a symlink without a target"))),
        };
        let target = CString::new(target).map_err(|_| io("link")(invalid("NUL")))?;
        remove_at(d, last).map_err(io("replace"))?;
        unistd::symlinkat(target.as_c_str(), d, last)
            .map_err(io::Error::from)
            .map_err(io("create the symlink"))?;
        if self.as_root {
            chown_at(d, last, meta.owner).map_err(io("set the owner of"))?;
        }
        // The link itself, not its target.
        let t = TimeSpec::new(meta.mtime, 0);
        stat::utimensat(d, last, &t, &t, UtimensatFlags::NoFollowSymlink)
            .map_err(io::Error::from)
            .map_err(io("set the time of"))?;
        Ok(())
    }

    /// A hard link to `link`: a path under the root that is not a folder,
    /// reached without following a symlink.
    fn create_hard_link(
        &self,
        d: BorrowedFd,
        last: &CStr,
        link: Option<Vec<u8>>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io = |op| io_error(op, name);
        let target = link.unwrap_or_default();
        let shown = String::from_utf8_lossy(&target).into_owned();
        let not_there = || UnpackError::LinkTarget {
            entry: name.to_string(),
            target: shown.clone(),
        };
        let tparts = components(&target, name)?;
        let (tlast, tparents) = tparts.split_last().ok_or_else(not_there)?;
        let tdir = self
            .open_dir(tparents, false, name)?
            .ok_or_else(not_there)?;
        let tlast = cstring(tlast).map_err(io("link"))?;
        match lstat_at(tdir.as_fd(), &tlast).map_err(io("inspect"))? {
            Some(st) if !is_dir(&st) => {}
            _ => return Err(not_there()),
        }
        remove_at(d, last).map_err(io("replace"))?;
        // No AT_SYMLINK_FOLLOW: a symlink is linked itself, not what it
        // points at.
        unistd::linkat(&tdir, tlast.as_c_str(), d, last, AtFlags::empty())
            .map_err(io::Error::from)
            .map_err(io("create the hard link"))?;
        Ok(())
    }

    /// A device node or fifo, for archives slate wrote itself.
    fn create_node(
        &self,
        d: BorrowedFd,
        last: &CStr,
        kind: tar::EntryType,
        meta: &Meta,
        name: &str,
    ) -> Result<(), UnpackError> {
        let io = |op| io_error(op, name);
        let mode = mode_of(meta.mode);
        let ft = match kind {
            tar::EntryType::Char => SFlag::S_IFCHR,
            tar::EntryType::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        remove_at(d, last).map_err(io("replace"))?;
        let dev = stat::makedev(meta.device.0.into(), meta.device.1.into());
        stat::mknodat(d, last, ft, mode, dev)
            .map_err(io::Error::from)
            .map_err(io("create the node"))?;
        if self.as_root {
            chown_at(d, last, meta.owner).map_err(io("set the owner of"))?;
        }
        // mknod applied the umask; the node was made just now, so
        // this follows no symlink.
        stat::fchmodat(d, last, mode, FchmodatFlags::FollowSymlink)
            .map_err(io::Error::from)
            .map_err(io("set the mode of"))?;
        Ok(())
    }

    /// `.wh.NAME`: removes NAME from what lower layers left in the folder.
    fn whiteout(
        &mut self,
        parents: &[OsString],
        hidden: &OsStr,
        entry: &str,
    ) -> Result<(), UnpackError> {
        if matches!(hidden.as_bytes(), b"" | b"." | b"..") {
            return Err(UnpackError::Whiteout {
                entry: entry.into(),
            });
        }
        let rel: PathBuf = parents
            .iter()
            .map(OsString::as_os_str)
            .chain([hidden])
            .collect();
        if self.written.contains(&rel) {
            return Ok(());
        }
        let Some(dir) = self.open_dir(parents, false, entry)? else {
            return Ok(()); // nothing below to hide
        };
        let io = |source| UnpackError::Io {
            op: "apply the whiteout",
            entry: entry.into(),
            source,
        };
        remove_at(dir.as_fd(), &cstring(hidden).map_err(io)?).map_err(io)
    }

    /// `.wh..wh..opq`: empties the folder of what lower layers left in it.
    fn opaque(&mut self, parents: &[OsString], entry: &str) -> Result<(), UnpackError> {
        let Some(dir) = self.open_dir(parents, false, entry)? else {
            return Ok(());
        };
        let io = |source| UnpackError::Io {
            op: "apply the opaque whiteout",
            entry: entry.into(),
            source,
        };
        let base: PathBuf = parents.iter().collect();
        for child in list(dir.as_fd()).map_err(io)? {
            if !self
                .written
                .contains(&base.join(OsStr::from_bytes(child.as_bytes())))
            {
                remove_at(dir.as_fd(), &child).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Opens the folder `parts` under the root, never following a symlink.
    /// Missing folders are created (mode 0755) when `create`, else `None`.
    fn open_dir(
        &self,
        parts: &[OsString],
        create: bool,
        entry: &str,
    ) -> Result<Option<OwnedFd>, UnpackError> {
        let io = |op| {
            move |source| UnpackError::Io {
                op,
                entry: entry.into(),
                source,
            }
        };
        let mut fd = self.root.try_clone().map_err(io("open the root for"))?;
        for (i, part) in parts.iter().enumerate() {
            let c = cstring(part).map_err(io("unpack"))?;
            let open_err = match open_dir_at(fd.as_fd(), &c) {
                Ok(next) => {
                    fd = next;
                    continue;
                }
                Err(e) => e,
            };
            match lstat_at(fd.as_fd(), &c).map_err(io("inspect the folders of"))? {
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                    let link: PathBuf = parts[..=i].iter().collect();
                    return Err(UnpackError::Symlink {
                        entry: entry.into(),
                        link: link.to_string_lossy().into_owned(),
                    });
                }
                None if create => {
                    stat::mkdirat(&fd, c.as_c_str(), mode_of(0o755))
                        .map_err(io::Error::from)
                        .and_then(|()| open_dir_at(fd.as_fd(), &c))
                        .and_then(|next| {
                            // The umask is not the image's business.
                            stat::fchmod(&next, mode_of(0o755))?;
                            Ok(next)
                        })
                        .map(|next| fd = next)
                        .map_err(io("create the folders of"))?;
                }
                None => return Ok(None),
                Some(_) if !create => return Ok(None),
                Some(_) => return Err(io("create the folders of")(open_err)),
            }
        }
        Ok(Some(fd))
    }

    fn set_owner_mode(&self, fd: BorrowedFd, owner: (u32, u32), mode: u32) -> io::Result<()> {
        // The owner first: changing it clears setuid and setgid.
        if self.as_root {
            unistd::fchown(
                fd,
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
            )?;
        }
        Ok(stat::fchmod(fd, mode_of(mode))?)
    }
}

/// The components of an archive path under the root: `/` and `.` dropped,
/// `..` refused.
fn components(raw: &[u8], entry: &str) -> Result<Vec<OsString>, UnpackError> {
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::DotDot {
                    entry: entry.into(),
                })
            }
            p => out.push(OsString::from_vec(p.to_vec())),
        }
    }
    Ok(out)
}

/// Turns an I/O error on the archive entry `entry` into [`UnpackError::Io`].
fn io_error<'a>(op: &'static str, entry: &'a str) -> impl Fn(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        op,
        entry: entry.to_string(),
        source,
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| invalid("a name with a NUL byte"))
}

/// The permission bits of `mode` (setuid, setgid and sticky included).
fn mode_of(mode: u32) -> Mode {
    Mode::from_bits_truncate(mode as libc::mode_t)
}

fn open_at(dir: BorrowedFd, name: &CStr, flags: OFlag, mode: Mode) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::openat(
        dir,
        name,
        flags | OFlag::O_CLOEXEC,
        mode,
    )?)
}

fn open_dir_at(dir: BorrowedFd, name: &CStr) -> io::Result<OwnedFd> {
    open_at(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
}

fn lstat_at(dir: BorrowedFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    match stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Sets the owner of `name` in `dir` itself (a symlink, not its target).
fn chown_at(dir: BorrowedFd, name: &CStr, owner: (u32, u32)) -> io::Result<()> {
    Ok(unistd::fchownat(
        dir,
        name,
        Some(Uid::from_raw(owner.0)),
        Some(Gid::from_raw(owner.1)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?)
}

/// Removes `name` in `dir`, a folder with all it holds; nothing there is fine.
/// No symlink is followed.
fn remove_at(dir: BorrowedFd, name: &CStr) -> io::Result<()> {
    use nix::errno::Errno;
    match unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(e @ (Errno::EISDIR | Errno::EPERM)) => {
            if !lstat_at(dir, name)?.is_some_and(|st| is_dir(&st)) {
                return Err(e.into());
            }
        }
        Err(e) => return Err(e.into()),
    }
    let sub = open_dir_at(dir, name)?;
    for child in list(sub.as_fd())? {
        remove_at(sub.as_fd(), &child)?;
    }
    Ok(unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir)?)
}

/// The names in the folder `dir`, without `.` and `..`.
fn list(dir: BorrowedFd) -> io::Result<Vec<CString>> {
    let mut d = nix::dir::Dir::openat(
        dir,
        c".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for ent in d.iter() {
        let ent = ent?;
        let name = ent.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    /// One entry of a test archive. Names and link names are written into the
    /// header as given, absolute or not: `tar::Builder` would refuse them.
    enum E<'a> {
        File(&'a str, &'a str, u32),
        Dir(&'a str, u32),
        Symlink(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Char(&'a str, u32, u32),
        Fifo(&'a str),
    }

    fn archive(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (name, link, data, kind, mode) = match e {
                E::File(n, d, m) => (*n, "", d.as_bytes(), tar::EntryType::Regular, *m),
                E::Dir(n, m) => (*n, "", &b""[..], tar::EntryType::Directory, *m),
                E::Symlink(n, l) => (*n, *l, &b""[..], tar::EntryType::Symlink, 0o777),
                E::Hard(n, l) => (*n, *l, &b""[..], tar::EntryType::Link, 0o644),
                E::Char(n, ..) => (*n, "", &b""[..], tar::EntryType::Char, 0o666),
                E::Fifo(n) => (*n, "", &b""[..], tar::EntryType::Fifo, 0o644),
            };
            assert!(
                name.len() < 100 && link.len() < 100,
                "`{name}`: use a shorter TMPDIR"
            );
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            if let E::Char(_, major, minor) = e {
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
            }
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A destination root, and beside it a victim folder with a file and a
    /// subfolder that no archive may touch.
    struct Scene {
        _outer: tempfile::TempDir,
        outer: PathBuf,
        dest: PathBuf,
        victim: PathBuf,
    }

    fn scene() -> Scene {
        let t = tempfile::tempdir().unwrap();
        let outer = t.path().to_path_buf();
        let dest = outer.join("root");
        let victim = outer.join("victim");
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(victim.join("keep")).unwrap();
        fs::write(victim.join("secret"), "secret").unwrap();
        fs::write(victim.join("keep/inner"), "inner").unwrap();
        Scene {
            _outer: t,
            outer,
            dest,
            victim,
        }
    }

    impl Scene {
        fn v(&self, rel: &str) -> String {
            self.victim.join(rel).to_str().unwrap().to_string()
        }

        fn assert_victim_intact(&self) {
            assert_eq!(
                fs::read_to_string(self.victim.join("secret"))
                    .ok()
                    .as_deref(),
                Some("secret"),
                "the victim file beside the root was deleted or changed"
            );
            assert_eq!(
                fs::read_to_string(self.victim.join("keep/inner"))
                    .ok()
                    .as_deref(),
                Some("inner"),
                "the victim folder beside the root was deleted or changed"
            );
            let names: Vec<_> = fs::read_dir(&self.victim).unwrap().flatten().collect();
            assert_eq!(
                names.len(),
                2,
                "something was written into the victim folder"
            );
            assert_eq!(fs::metadata(self.victim.join("secret")).unwrap().nlink(), 1);
        }

        /// Unpacks `entries` as an OCI layer.
        fn oci(&self, entries: &[E]) -> Result<Dropped, String> {
            let bytes = archive(entries);
            unpack(&bytes[..], &self.dest, Source::OciLayer).map_err(|e| e.to_string())
        }
    }

    #[test]
    fn an_absolute_whiteout_stays_inside_the_root() {
        let s = scene();
        // The same path inside the root is what the whiteout hides.
        let inside = s.dest.join(s.victim.strip_prefix("/").unwrap());
        fs::create_dir_all(&inside).unwrap();
        fs::write(inside.join("secret"), "inside").unwrap();
        let r = s.oci(&[E::File(&s.v(".wh.secret"), "", 0o644)]);
        s.assert_victim_intact();
        r.unwrap();
        assert!(!inside.join("secret").exists());
    }

    #[test]
    fn an_absolute_opaque_marker_stays_inside_the_root() {
        let s = scene();
        let r = s.oci(&[E::File(&s.v(".wh..wh..opq"), "", 0o644)]);
        s.assert_victim_intact();
        r.unwrap();
    }

    #[test]
    fn a_whiteout_through_a_symlink_is_refused() {
        let s = scene();
        let victim = s.v("");
        let r = s.oci(&[
            E::Symlink("link", &victim),
            E::File("link/.wh.secret", "", 0o644),
        ]);
        s.assert_victim_intact();
        let e = r.unwrap_err();
        assert!(
            e.contains("`link/.wh.secret` goes through the symlink `link`"),
            "{e}"
        );
    }

    #[test]
    fn an_opaque_marker_through_a_symlink_is_refused() {
        let s = scene();
        let victim = s.v("");
        let r = s.oci(&[
            E::Symlink("link", &victim),
            E::File("link/.wh..wh..opq", "", 0o644),
        ]);
        s.assert_victim_intact();
        assert!(r.unwrap_err().contains("goes through the symlink `link`"));
    }

    #[test]
    fn whiteouts_of_dot_and_dot_dot_are_refused() {
        for name in [".wh...", ".wh..", "sub/.wh...", "sub/.wh.."] {
            let s = scene();
            fs::create_dir(s.dest.join("sub")).unwrap();
            fs::write(s.dest.join("sub/kept"), "").unwrap();
            let r = s.oci(&[E::File(name, "", 0o644)]);
            s.assert_victim_intact();
            assert!(s.dest.join("sub/kept").exists(), "{name}");
            assert!(
                r.unwrap_err().contains("a whiteout for `.` or `..`"),
                "{name}"
            );
        }
    }

    #[test]
    fn a_file_through_a_symlink_to_the_host_root_is_refused() {
        let s = scene();
        let through = format!("l/{}", s.v("x").trim_start_matches('/'));
        let r = s.oci(&[E::Symlink("l", "/"), E::File(&through, "pwned", 0o644)]);
        assert!(
            !s.victim.join("x").exists(),
            "a file was written outside the root"
        );
        s.assert_victim_intact();
        assert!(r.unwrap_err().contains("goes through the symlink `l`"));
    }

    #[test]
    fn a_file_over_a_folder_behind_a_symlink_is_refused() {
        let s = scene();
        let outer = s.outer.to_str().unwrap().to_string();
        let r = s.oci(&[E::Symlink("l", &outer), E::File("l/victim", "", 0o644)]);
        s.assert_victim_intact();
        assert!(r.unwrap_err().contains("goes through the symlink `l`"));
    }

    #[test]
    fn an_absolute_file_over_a_host_folder_lands_inside_the_root() {
        let s = scene();
        let victim = s.v("");
        let r = s.oci(&[E::File(victim.trim_end_matches('/'), "mine", 0o644)]);
        s.assert_victim_intact();
        r.unwrap();
        let inside = s.dest.join(s.victim.strip_prefix("/").unwrap());
        assert_eq!(fs::read_to_string(inside).unwrap(), "mine");
    }

    #[test]
    fn a_file_over_a_symlink_replaces_the_link() {
        let s = scene();
        let secret = s.v("secret");
        let r = s.oci(&[E::Symlink("s", &secret), E::File("s", "pwned", 0o644)]);
        s.assert_victim_intact();
        r.unwrap();
        assert_eq!(fs::read_to_string(s.dest.join("s")).unwrap(), "pwned");
        assert!(!fs::symlink_metadata(s.dest.join("s")).unwrap().is_symlink());
    }

    #[test]
    fn dot_dot_is_refused() {
        let s = scene();
        let r = s.oci(&[E::File("../victim/added", "pwned", 0o644)]);
        assert!(!s.victim.join("added").exists());
        s.assert_victim_intact();
        assert!(r.unwrap_err().contains("`..`"));
    }

    #[test]
    fn hard_links_cannot_reach_outside() {
        let s = scene();
        let secret = s.v("secret");
        let r = s.oci(&[E::Hard("h", &secret)]);
        s.assert_victim_intact();
        assert!(r.is_err(), "a hard link to a host path was made");
        assert!(!s.dest.join("h").exists());

        let s = scene();
        let victim = s.v("");
        let r = s.oci(&[E::Symlink("l", &victim), E::Hard("h", "l/secret")]);
        s.assert_victim_intact();
        assert!(r.unwrap_err().contains("goes through the symlink `l`"));

        let s = scene();
        let r = s.oci(&[E::Hard("h", "../victim/secret")]);
        s.assert_victim_intact();
        assert!(r.unwrap_err().contains("`..`"));
    }

    #[test]
    fn devices_and_fifos_are_left_out_of_oci_layers_and_setuid_stays() {
        let s = scene();
        let r = s.oci(&[
            E::Char("dev/null", 1, 3),
            E::Fifo("run/pipe"),
            E::File("usr/bin/su", "su", 0o4755),
        ]);
        assert_eq!(r.unwrap().special, ["dev/null", "run/pipe"]);
        assert!(fs::symlink_metadata(s.dest.join("dev/null")).is_err());
        assert!(fs::symlink_metadata(s.dest.join("run/pipe")).is_err());
        let mode = fs::metadata(s.dest.join("usr/bin/su"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o4755);
    }

    #[test]
    fn whiteouts_and_opaque_folders_apply_inside_the_root() {
        let s = scene();
        for (p, d) in [
            ("etc/a", "a"),
            ("etc/b", "b"),
            ("var/x/old", "old"),
            ("opt/d/f", "f"),
        ] {
            fs::create_dir_all(s.dest.join(p).parent().unwrap()).unwrap();
            fs::write(s.dest.join(p), d).unwrap();
        }
        s.oci(&[
            E::File("etc/.wh.a", "", 0o644),
            E::File("opt/.wh.d", "", 0o644),
            E::Dir("var/x", 0o755),
            E::File("var/x/early", "early", 0o644),
            E::File("var/x/.wh..wh..opq", "", 0o644),
            E::File("var/x/new", "new", 0o644),
        ])
        .unwrap();
        assert!(!s.dest.join("etc/a").exists());
        assert!(s.dest.join("etc/b").exists());
        assert!(!s.dest.join("opt/d").exists());
        assert!(!s.dest.join("var/x/old").exists());
        // A whiteout hides only what lower layers had, not its own layer's files.
        assert!(s.dest.join("var/x/early").exists());
        assert!(s.dest.join("var/x/new").exists());
        s.assert_victim_intact();
    }

    #[test]
    fn folders_and_files_replace_each_other_and_links_stay_as_written() {
        let s = scene();
        fs::create_dir_all(s.dest.join("a/sub")).unwrap();
        fs::write(s.dest.join("b"), "b").unwrap();
        let secret = s.v("secret");
        s.oci(&[
            E::File("a", "now a file", 0o640),
            E::Dir("b", 0o755),
            E::File("b/c", "c", 0o644),
            E::Hard("b/d", "b/c"),
            E::Symlink("abs", &secret),
        ])
        .unwrap();
        assert_eq!(fs::read_to_string(s.dest.join("a")).unwrap(), "now a file");
        let m = fs::metadata(s.dest.join("a")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert_eq!(m.mtime(), 1_700_000_000);
        let (c, d) = (
            fs::metadata(s.dest.join("b/c")).unwrap(),
            fs::metadata(s.dest.join("b/d")).unwrap(),
        );
        assert_eq!((c.ino(), c.nlink()), (d.ino(), 2));
        assert_eq!(
            fs::read_link(s.dest.join("abs")).unwrap(),
            Path::new(&secret)
        );
        s.assert_victim_intact();
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    fn tar_base(path: &Path, dest: &Path) -> Result<Dropped, String> {
        unpack_tar_base(path, dest).map_err(|e| e.to_string())
    }

    #[test]
    fn tar_bases_lose_devices_and_setuid_bits_but_not_folder_setgid() {
        let s = scene();
        let path = s.outer.join("base.tar.gz");
        fs::write(
            &path,
            gzip(&archive(&[
                E::Char("./dev/null", 1, 3),
                E::File("/bin/su", "su", 0o4755),
                E::File("bin/wall", "wall", 0o2755),
                E::File("bin/sh", "sh", 0o1755),
                E::Dir("var", 0o755),
                E::Dir("var/mail", 0o2775),
                E::File("var/.wh.x", "", 0o644),
            ])),
        )
        .unwrap();
        let dropped = tar_base(&path, &s.dest).unwrap();
        assert_eq!(dropped.special, ["dev/null"]);
        assert_eq!(dropped.setid, ["bin/su", "bin/wall"]);
        let said = dropped.describe().unwrap();
        assert!(
            said.contains("`dev/null`") && said.contains("`bin/su`, `bin/wall`"),
            "{said}"
        );
        let mode = |p: &str| {
            fs::symlink_metadata(s.dest.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert!(fs::symlink_metadata(s.dest.join("dev/null")).is_err());
        assert_eq!(mode("bin/su"), 0o755);
        assert_eq!(mode("bin/wall"), 0o755);
        assert_eq!(mode("bin/sh"), 0o1755);
        assert_eq!(mode("var/mail"), 0o2775);
        // Whiteouts mean nothing in a base: the file is kept as it is.
        assert!(s.dest.join("var/.wh.x").exists());
    }

    #[test]
    fn tar_bases_stay_inside_the_root() {
        let s = scene();
        let path = s.outer.join("base.tar");
        let through = format!("l/{}", s.v("x").trim_start_matches('/'));
        fs::write(
            &path,
            archive(&[
                E::Symlink("l", "/"),
                E::File(&through, "pwned", 0o644),
                E::File(&s.v(".wh.secret"), "", 0o644),
                E::File("../victim/y", "pwned", 0o644),
            ]),
        )
        .unwrap();
        let r = tar_base(&path, &s.dest);
        assert!(!s.victim.join("x").exists());
        assert!(!s.victim.join("y").exists());
        s.assert_victim_intact();
        assert!(r.is_err());
    }

    #[test]
    fn slates_own_tarballs_keep_fifos_and_setuid() {
        let s = scene();
        let bytes = archive(&[E::Fifo("run/pipe"), E::File("bin/su", "su", 0o4755)]);
        let dropped = unpack(&bytes[..], &s.dest, Source::Slate).unwrap();
        assert!(dropped.is_empty() && dropped.describe().is_none());
        let pipe = fs::symlink_metadata(s.dest.join("run/pipe")).unwrap();
        assert!(pipe.file_type().is_fifo());
        assert_eq!(pipe.permissions().mode() & 0o7777, 0o644);
        let su = fs::metadata(s.dest.join("bin/su")).unwrap();
        assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
        // Whiteouts mean nothing in a merged tree.
        let bytes = archive(&[E::File("bin/.wh.su", "", 0o644)]);
        unpack(&bytes[..], &s.dest, Source::Slate).unwrap();
        assert!(s.dest.join("bin/su").exists() && s.dest.join("bin/.wh.su").exists());
    }

    #[test]
    #[ignore = "needs xz, zstd and bzip2: scripts/test.sh runs it"]
    fn tar_bases_compressed_with_xz_zstd_or_bzip2_unpack() {
        let s = scene();
        let plain = s.outer.join("base.tar");
        fs::write(
            &plain,
            archive(&[E::File("etc/os-release", "ID=test", 0o644)]),
        )
        .unwrap();
        for (tool, ext) in [("xz", "xz"), ("zstd", "zst"), ("bzip2", "bz2")] {
            let st = std::process::Command::new(tool)
                .args(["-k", "-f", "-q"])
                .arg(&plain)
                .status()
                .unwrap_or_else(|e| panic!("this test needs `{tool}`: {e}"));
            assert!(st.success(), "{tool}");
            let dest = s.outer.join(format!("root-{ext}"));
            fs::create_dir(&dest).unwrap();
            tar_base(&s.outer.join(format!("base.tar.{ext}")), &dest).unwrap();
            assert_eq!(
                fs::read_to_string(dest.join("etc/os-release")).unwrap(),
                "ID=test"
            );
        }
        // A stream the tool cannot read is an error naming the tool.
        let bad = s.outer.join("bad.tar.zst");
        let mut bytes = fs::read(s.outer.join("base.tar.zst")).unwrap();
        bytes.truncate(bytes.len() / 2);
        fs::write(&bad, bytes).unwrap();
        let e = tar_base(&bad, &s.dest).unwrap_err();
        assert!(e.contains("`zstd` could not decompress"), "{e}");
    }

    #[test]
    fn an_old_style_folder_entry_is_a_folder() {
        let s = scene();
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..4].copy_from_slice(b"etc/");
        h.set_mode(0o750);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b""[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        unpack(&bytes[..], &s.dest, Source::OciLayer).unwrap();
        let m = fs::symlink_metadata(s.dest.join("etc")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    }
}
