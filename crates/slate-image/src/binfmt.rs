//! Foreign architectures: images of another arch run through qemu-user,
//! registered with the kernel's binfmt_misc (with the fix-binary flag, so the
//! interpreter works inside sandboxes that do not contain it).

use std::path::Path;
use std::process::Command;

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

fn runs_natively(arch: &str) -> bool {
    let host = host_arch();
    arch == host || (host == "amd64" && arch == "i386") || (host == "arm64" && arch == "armhf")
}

fn registered(q: &str) -> bool {
    std::fs::read_to_string(Path::new(BINFMT).join(format!("qemu-{q}")))
        .is_ok_and(|s| s.starts_with("enabled"))
}

/// Makes sure binaries of `arch` can run here; registers qemu-user when it
/// is installed but not registered. The error says what to install.
pub fn ensure(arch: &str) -> Result<(), String> {
    if runs_natively(arch) {
        return Ok(());
    }
    let q =
        qemu_name(arch).ok_or_else(|| format!("slate does not know how to emulate `{arch}`"))?;
    if registered(q) {
        return Ok(());
    }
    if !Path::new(BINFMT).join("status").exists() {
        // SAFETY: mounting binfmt_misc at its usual place; plain C strings.
        unsafe {
            libc::mount(
                c"binfmt_misc".as_ptr(),
                c"/proc/sys/fs/binfmt_misc".as_ptr(),
                c"binfmt_misc".as_ptr(),
                0,
                std::ptr::null(),
            );
        }
    }
    if !registered(q) && Path::new(&format!("/usr/share/binfmts/qemu-{q}")).exists() {
        let _ = Command::new("update-binfmts")
            .args(["--enable", &format!("qemu-{q}")])
            .output();
    }
    if registered(q) {
        Ok(())
    } else {
        Err(format!(
            "`{arch}` binaries cannot run on this `{}` host: qemu-{q} is not registered with binfmt_misc; install `qemu-user-static` and `binfmt-support` (apt-get install qemu-user-static binfmt-support)",
            host_arch()
        ))
    }
}
