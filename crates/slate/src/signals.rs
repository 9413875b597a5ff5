//! Ctrl-C: the first one cancels cleanly (every environment is destroyed), a
//! second one exits at once (the parent-death signal still takes every
//! sandbox down; the next run or `slate gc` removes what is left on disk).

use slate_provider::Cancel;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

static HITS: AtomicUsize = AtomicUsize::new(0);
/// The write end of the pipe that wakes the watcher (-1: none yet).
static WAKE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    if HITS.fetch_add(1, Ordering::SeqCst) >= 1 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    let fd = WAKE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write is async-signal-safe; one byte from a static.
        unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
    }
}

/// Installs the handlers and a watcher that turns a signal into `cancel`:
/// the handler writes to a pipe the watcher waits on, so the cancel starts
/// at once (no polling).
pub fn install(cancel: Cancel, on_first: impl Fn() + Send + 'static) {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 fills the two descriptors we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        WAKE.store(fds[1], Ordering::SeqCst);
    }
    // SAFETY: installing a handler that only touches atomics, writes one
    // byte and calls _exit.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    let wake = fds[0];
    std::thread::spawn(move || {
        while HITS.load(Ordering::SeqCst) == 0 {
            if wake < 0 {
                // No pipe: look now and then instead.
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            let mut byte = [0u8; 1];
            // SAFETY: one byte from our own pipe into a local buffer.
            let n = unsafe { libc::read(wake, byte.as_mut_ptr().cast(), 1) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
        }
        on_first();
        cancel.cancel();
    });
}

pub fn interrupted() -> bool {
    HITS.load(Ordering::SeqCst) > 0
}

/// Ignores Ctrl-C while an interactive command owns the terminal.
pub fn ignore_interrupts() {
    // SAFETY: setting a signal disposition.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}
