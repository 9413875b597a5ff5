//! cpu, memory and pids limits through cgroups, v2 or v1 (hybrid hosts).

use slate_provider::Limits;
use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
const GROUP: &str = "slate";
const PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V2,
    V1,
    Missing,
}

pub fn detect() -> CgroupVersion {
    detect_at(Path::new(ROOT))
}

fn detect_at(root: &Path) -> CgroupVersion {
    if root.join("cgroup.controllers").exists() {
        CgroupVersion::V2
    } else if root.join("memory").is_dir() && root.join("pids").is_dir() {
        CgroupVersion::V1
    } else {
        CgroupVersion::Missing
    }
}

/// One environment's cgroup(s): one folder on v2, one per controller on v1.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs_err::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write `{value}` to `{}`: {e}", path.display()),
        )
    })
}

impl Cgroup {
    pub fn create(id: &str, limits: &Limits) -> io::Result<Cgroup> {
        match detect() {
            CgroupVersion::V2 => Self::create_v2(Path::new(ROOT), id, limits),
            CgroupVersion::V1 => Self::create_v1(Path::new(ROOT), id, limits),
            CgroupVersion::Missing => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no cgroup hierarchy under {ROOT}; mount cgroup2 there to enforce cpus/memory/pids"),
            )),
        }
    }

    fn create_v2(root: &Path, id: &str, l: &Limits) -> io::Result<Cgroup> {
        let base = root.join(GROUP);
        fs_err::create_dir_all(&base)?;
        // Controllers must be enabled top-down; "already enabled" is fine.
        let _ = write(&root.join("cgroup.subtree_control"), "+cpu +memory +pids");
        let _ = write(&base.join("cgroup.subtree_control"), "+cpu +memory +pids");
        let dir = base.join(id);
        fs_err::create_dir(&dir)?;
        let cg = Cgroup {
            dirs: vec![dir.clone()],
        };
        if let Some(m) = l.memory {
            write(&dir.join("memory.max"), &m.to_string())?;
            let _ = write(&dir.join("memory.swap.max"), "0");
        }
        if let Some(p) = l.pids {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        if let Some(c) = l.cpus {
            let quota = (c * PERIOD_US as f64) as u64;
            write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
        }
        Ok(cg)
    }

    fn create_v1(root: &Path, id: &str, l: &Limits) -> io::Result<Cgroup> {
        let mut cg = Cgroup { dirs: Vec::new() };
        let mut make = |ctrl: &str| -> io::Result<PathBuf> {
            let dir = root.join(ctrl).join(GROUP).join(id);
            fs_err::create_dir_all(&dir)?;
            cg.dirs.push(dir.clone());
            Ok(dir)
        };
        // Always join pids: it is how teardown finds every process.
        let pids = make("pids")?;
        if let Some(p) = l.pids {
            write(&pids.join("pids.max"), &p.to_string())?;
        }
        if let Some(m) = l.memory {
            let dir = make("memory")?;
            write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
        }
        if let Some(c) = l.cpus {
            let dir = make("cpu")?;
            write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(
                &dir.join("cpu.cfs_quota_us"),
                &((c * PERIOD_US as f64) as u64).to_string(),
            )?;
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    pub fn pids(&self) -> Vec<i32> {
        let Some(d) = self.dirs.first() else {
            return vec![];
        };
        fs_err::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process left in the group, then removes the group.
    pub fn destroy(&self) -> io::Result<()> {
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::yield_now();
        }
        let mut first_err = None;
        for d in &self.dirs {
            // A group empties a moment after its last process is reaped.
            let mut res = std::fs::remove_dir(d);
            for _ in 0..200 {
                match &res {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        res = std::fs::remove_dir(d);
                    }
                    _ => break,
                }
            }
            if let Err(e) = res {
                if e.kind() != io::ErrorKind::NotFound && first_err.is_none() {
                    first_err = Some(io::Error::new(
                        e.kind(),
                        format!("remove cgroup `{}`: {e}", d.display()),
                    ));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn bases() -> Vec<PathBuf> {
    match detect() {
        CgroupVersion::V2 => vec![Path::new(ROOT).join(GROUP)],
        CgroupVersion::V1 => ["pids", "memory", "cpu"]
            .iter()
            .map(|c| Path::new(ROOT).join(c).join(GROUP))
            .collect(),
        CgroupVersion::Missing => vec![],
    }
}

/// Kills what is left in the cgroup of a dead environment `id`, and removes it.
pub fn reap_env(id: &str) -> bool {
    let dirs: Vec<PathBuf> = bases()
        .into_iter()
        .map(|b| b.join(id))
        .filter(|d| d.is_dir())
        .collect();
    !dirs.is_empty() && Cgroup { dirs }.destroy().is_ok()
}

/// Removes slate's *empty* leftover cgroups. Never kills: a group with
/// processes belongs to a live environment, possibly of another slate. An
/// empty group whose owner still runs is kept too: it is an environment
/// between its creation and its first command, or between two commands.
pub fn reap_leftovers() -> usize {
    let mut n = 0;
    for b in bases() {
        let Ok(rd) = fs_err::read_dir(&b) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            if owner_alive(&name.to_string_lossy()) {
                continue;
            }
            if e.path().is_dir() && fs_err::remove_dir(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// Whether the slate process named in an environment id (`NAME-PID-N`)
/// still runs. An id that names no process counts as alive: never remove
/// what cannot be told apart from a live environment.
fn owner_alive(id: &str) -> bool {
    let mut parts = id.rsplit('-');
    let (Some(_n), Some(pid)) = (parts.next(), parts.next()) else {
        return true;
    };
    let Ok(pid) = pid.parse::<libc::pid_t>() else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_environment_of_a_running_slate_is_alive() {
        let me = std::process::id();
        assert!(owner_alive(&format!("build-x-{me}-3")));
        assert!(owner_alive("no-pid-here"));
        // The largest pid the kernel hands out is below 2^22.
        assert!(!owner_alive("build-x-99999999-0"));
    }

    #[test]
    fn detects_versions_from_layout() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(detect_at(t.path()), CgroupVersion::Missing);
        std::fs::create_dir(t.path().join("memory")).unwrap();
        std::fs::create_dir(t.path().join("pids")).unwrap();
        assert_eq!(detect_at(t.path()), CgroupVersion::V1);
        std::fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert_eq!(detect_at(t.path()), CgroupVersion::V2);
    }

    #[test]
    fn v2_limits_written_in_v2_syntax() {
        let t = tempfile::tempdir().unwrap();
        let l = Limits {
            cpus: Some(1.5),
            memory: Some(1 << 30),
            pids: Some(100),
            ..Default::default()
        };
        let cg = Cgroup::create_v2(t.path(), "env1", &l).unwrap();
        let d = t.path().join("slate/env1");
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("memory.max")).unwrap(),
            "1073741824"
        );
        assert_eq!(std::fs::read_to_string(d.join("pids.max")).unwrap(), "100");
        assert_eq!(cg.procs_files(), [d.join("cgroup.procs")]);
    }

    #[test]
    fn v1_limits_one_group_per_controller() {
        let t = tempfile::tempdir().unwrap();
        let l = Limits {
            cpus: Some(2.0),
            memory: Some(4096),
            pids: None,
            ..Default::default()
        };
        let cg = Cgroup::create_v1(t.path(), "env1", &l).unwrap();
        assert_eq!(cg.procs_files().len(), 3);
        assert_eq!(
            std::fs::read_to_string(t.path().join("cpu/slate/env1/cpu.cfs_quota_us")).unwrap(),
            "200000"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("memory/slate/env1/memory.limit_in_bytes"))
                .unwrap(),
            "4096"
        );
    }
}
