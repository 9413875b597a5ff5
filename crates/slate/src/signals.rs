//! Ctrl-C: the first one cancels cleanly (every environment is destroyed), a
//! second one exits at once (the parent-death signal still takes every
//! sandbox down; the next run or `slate gc` removes what is left on disk).

use slate_provider::Cancel;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static HITS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    if HITS.fetch_add(1, Ordering::SeqCst) >= 1 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Installs the handlers and a watcher that turns a signal into `cancel`.
pub fn install(cancel: Cancel, on_first: impl Fn() + Send + 'static) {
    // SAFETY: installing a handler that only touches an atomic and calls _exit.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    std::thread::spawn(move || loop {
        if HITS.load(Ordering::SeqCst) > 0 {
            on_first();
            cancel.cancel();
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
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
