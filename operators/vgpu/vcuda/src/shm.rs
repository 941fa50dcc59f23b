//! The account file: creation, mapping, locking, and process liveness.
//!
//! Locking uses `flock(2)` on the file: the kernel drops the lock when its holder dies, so a
//! crash inside the critical section cannot wedge the container (a process-shared pthread
//! mutex would need the robust-mutex protocol and a consistency repair instead). `flock`
//! excludes other open file descriptions only, so threads of one process are serialised by a
//! process-local mutex first, and a forked child opens the file anew.

#![cfg_attr(test, allow(dead_code))]

use crate::account::{TABLE_BYTES, Table};
use std::ffi::CString;
use std::sync::{Mutex, MutexGuard};

/// One process's view of the shared table.
pub struct Account {
    fd: libc::c_int,
    table: &'static Table,
    local: Mutex<()>,
}

/// Holds the file lock; the table may be read and written while it lives.
pub struct Locked<'a> {
    account: &'a Account,
    _local: MutexGuard<'a, ()>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Table;
    fn deref(&self) -> &Table {
        self.account.table
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        flock(self.account.fd, libc::LOCK_UN);
    }
}

fn flock(fd: libc::c_int, op: libc::c_int) {
    loop {
        // SAFETY: plain syscall on a descriptor this module owns.
        let r = unsafe { libc::flock(fd, op) };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

fn os_err(what: &str, path: &str) -> String {
    format!("{what} {path}: {}", std::io::Error::last_os_error())
}

impl Account {
    /// Opens (creating if needed) and maps the account file.
    pub fn open(path: &str) -> Result<Account, String> {
        let cpath = CString::new(path).map_err(|_| format!("bad account path {path:?}"))?;
        // SAFETY: NUL-terminated path; the flags and mode are plain integers.
        let fd = unsafe {
            libc::open(
                cpath.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o666 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(os_err("cannot open account file", path));
        }
        let fail = |msg: String| {
            // SAFETY: closing the descriptor opened above, once.
            unsafe { libc::close(fd) };
            Err(msg)
        };
        // every process of the container, whatever its uid, shares the file (umask aside)
        // SAFETY: plain syscall on our descriptor.
        unsafe { libc::fchmod(fd, 0o666) };
        flock(fd, libc::LOCK_EX);
        // SAFETY: `st` is a valid out-parameter for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            flock(fd, libc::LOCK_UN);
            return fail(os_err("cannot stat account file", path));
        }
        let fresh = st.st_size == 0;
        if fresh {
            // SAFETY: plain syscall on our descriptor.
            if unsafe { libc::ftruncate(fd, TABLE_BYTES as libc::off_t) } != 0 {
                flock(fd, libc::LOCK_UN);
                return fail(os_err("cannot size account file", path));
            }
        } else if st.st_size as usize != TABLE_BYTES {
            flock(fd, libc::LOCK_UN);
            return fail(format!(
                "account file {path} has {} bytes, expected {TABLE_BYTES}",
                st.st_size
            ));
        }
        // SAFETY: maps TABLE_BYTES of a file that is exactly that long, shared and writable.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                TABLE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            flock(fd, libc::LOCK_UN);
            return fail(os_err("cannot map account file", path));
        }
        // SAFETY: the mapping is TABLE_BYTES long, page aligned, never unmapped, and `Table`
        // consists of atomics valid for any bit pattern.
        let table: &'static Table = unsafe { &*p.cast::<Table>() };
        // a creator that died between sizing and writing the header left a zero magic
        if fresh
            || table
                .header
                .magic
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
        {
            table.init();
        }
        let checked = table.check_header();
        flock(fd, libc::LOCK_UN);
        if let Err(e) = checked {
            return fail(format!("{path}: {e}"));
        }
        Ok(Account {
            fd,
            table,
            local: Mutex::new(()),
        })
    }

    /// Takes the process-local and the file lock.
    pub fn lock(&self) -> Locked<'_> {
        let g = self.local.lock().unwrap_or_else(|e| e.into_inner());
        flock(self.fd, libc::LOCK_EX);
        Locked {
            account: self,
            _local: g,
        }
    }

    /// The mapped table, for lock-free atomics (the throttle's clock).
    pub fn table(&self) -> &'static Table {
        self.table
    }
}

/// Start time of a process in clock ticks since boot (`/proc/<pid>/stat` field 22), and
/// whether it is a zombie.
fn stat_of(pid: i32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name may contain anything, including ") ": parse after the last ')'
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    // after the state come fields 4.. ; starttime is field 22, i.e. 19 further on
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

/// Start time of a process, 0 if unknown.
pub fn start_time(pid: i32) -> u64 {
    stat_of(pid).map_or(0, |(s, _)| s)
}

/// Whether the process that claimed a slot as `(pid, start)` still runs.
pub fn alive(pid: i32, start: u64) -> bool {
    match stat_of(pid) {
        Some((_, true)) => false,
        Some((s, false)) => start == 0 || s == start,
        None => {
            // no /proc (or hidden): fall back to signal 0
            // SAFETY: signal 0 only checks for existence.
            let r = unsafe { libc::kill(pid, 0) };
            r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_of_self_and_of_a_dead_child() {
        let me = std::process::id() as i32;
        let st = start_time(me);
        assert!(st > 0);
        assert!(alive(me, st));
        assert!(!alive(me, st + 1), "pid reuse detected by start time");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id() as i32;
        child.wait().expect("wait");
        assert!(!alive(pid, 0));
    }

    #[test]
    fn open_create_lock_and_share() {
        let path = std::env::temp_dir().join(format!("vcuda-acct-{}", std::process::id()));
        let p = path.to_string_lossy().into_owned();
        let _ = std::fs::remove_file(&path);
        let a = Account::open(&p).expect("create");
        let b = Account::open(&p).expect("reopen");
        {
            let t = a.lock();
            let s = t.claim(1, 1, &|_, _| true).expect("slot");
            t.try_charge(s, 3, 77, 100).expect("fits");
        }
        assert_eq!(
            b.lock().used(3),
            77,
            "second mapping sees the first's charge"
        );
        std::fs::write(&path, b"short").expect("write");
        assert!(
            Account::open(&p)
                .err()
                .expect("bad size")
                .contains("expected")
        );
        std::fs::remove_file(&path).ok();
    }
}
