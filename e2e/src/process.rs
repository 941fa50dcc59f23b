//! Host processes in their own process groups, remembered in pid files so that a later run can
//! reap what a crashed one left behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Starts `command` in a new process group (so that it and everything it starts can be
/// signalled together), with stdout and stderr appended to `log`. Returns the pid, which is
/// also the process group id.
pub fn spawn_group(command: &mut Command, log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt as _;
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone()?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    Ok(child.id())
}

/// Whether the process exists and is not a zombie. A zombie child of this process is reaped.
pub fn alive(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // Reap it if it is our exited child; harmless (ECHILD) otherwise.
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a specific pid has no memory-safety preconditions.
    let reaped = unsafe { libc::waitpid(pid_t, &mut status, libc::WNOHANG) };
    if reaped == pid_t {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The command line of a running process, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Sends `signal` to the process group `pgid`.
pub fn signal_group(pgid: u32, signal: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid)
        && pgid > 1
    {
        // SAFETY: kill has no memory-safety preconditions; a negative pid names the group.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Stops the process group led by `pid`: SIGTERM, then SIGKILL once `grace` has passed.
pub fn stop_group(pid: u32, grace: Duration) {
    signal_group(pid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Members other than the leader may still be alive; the group gets SIGKILL either way.
    signal_group(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pid files of the components of one cluster: `<dir>/<component>.pid`.
pub struct PidDir {
    dir: PathBuf,
}

impl PidDir {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Starts `command` as `component` in a process group of its own (see [`spawn_group`]),
    /// with its output appended to `log`, and records its pid.
    pub fn spawn(&self, component: &str, command: &mut Command, log: &Path) -> Result<u32> {
        let pid = spawn_group(command, log)?;
        self.record(component, pid)?;
        Ok(pid)
    }

    pub fn record(&self, component: &str, pid: u32) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(
            self.dir.join(format!("{component}.pid")),
            format!("{pid}\n"),
        )?;
        Ok(())
    }

    /// (component, pid) for every pid file.
    pub fn entries(&self) -> Vec<(String, u32)> {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in read.flatten() {
            let path = entry.path();
            let (Some(stem), Some("pid")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            if let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                out.push((stem.to_owned(), pid));
            }
        }
        out.sort();
        out
    }

    /// Stops every recorded process whose command line still mentions `marker` (the cluster's
    /// state directory: a recycled pid belonging to something else is left alone), in the
    /// order given by `order` (components not listed go first), then removes the pid files.
    pub fn stop_all(&self, marker: &str, order: &[&str]) -> Result<()> {
        let mut entries = self.entries();
        entries.sort_by_key(|(component, _)| order.iter().position(|c| c == component));
        for (component, pid) in entries {
            if alive(pid) && cmdline(pid).is_some_and(|c| c.contains(marker)) {
                tracing::debug!(component, pid, "stopping");
                stop_group(pid, Duration::from_secs(10));
                if alive(pid) {
                    bail!("{component} (pid {pid}) did not stop");
                }
            }
            let _ = std::fs::remove_file(self.dir.join(format!("{component}.pid")));
        }
        Ok(())
    }
}

/// An exclusive advisory lock on a file, held until dropped.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd as _;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own has no memory-safety preconditions.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { _file: file })
    }
}

/// Programs the harness starts against a cluster (operators under test), each in its own
/// process group, remembered in `<state>/operators/<name>.pid` together with the pid of the
/// test process that started it, so that a later run can stop what a crashed one left.
pub struct HostProcesses {
    state_dir: PathBuf,
}

/// Set in the environment of every host process, naming the cluster state directory: how a
/// later run recognises (and reaps) processes a crashed run left behind.
pub const OWNER_ENV: &str = "GANTRY_E2E_CLUSTER_DIR";

/// One started host process.
#[derive(Debug)]
pub struct Started {
    pub pid: u32,
    pub log: PathBuf,
    pub pid_file: PathBuf,
}

impl HostProcesses {
    pub fn of(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.state_dir.join("operators")
    }

    /// Starts `command` as `name` (unique per cluster): output to `<name>.log`, marked with
    /// [`OWNER_ENV`], recorded in `<name>.pid`.
    pub fn spawn(&self, name: &str, command: &mut Command) -> Result<Started> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("{name}.log"));
        let pid_file = dir.join(format!("{name}.pid"));
        command.env(OWNER_ENV, &self.state_dir);
        let pid = spawn_group(command, &log)?;
        std::fs::write(&pid_file, format!("{pid} {}\n", std::process::id()))?;
        Ok(Started { pid, log, pid_file })
    }

    /// Stops the recorded processes: all of them, or (`all == false`) those whose starting
    /// test process is gone.
    pub fn stop(&self, all: bool) {
        let Ok(read) = std::fs::read_dir(self.dir()) else {
            return;
        };
        let marker = format!("{OWNER_ENV}={}", self.state_dir.display());
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "pid") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let mut fields = text
                .split_whitespace()
                .filter_map(|f| f.parse::<u32>().ok());
            let (Some(pid), Some(owner)) = (fields.next(), fields.next()) else {
                continue;
            };
            if !all && alive(owner) {
                continue;
            }
            if alive(pid) && environ_contains(pid, &marker) {
                tracing::info!(pid, file = %path.display(), "stopping host process");
                stop_group(pid, Duration::from_secs(5));
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Whether the environment of process `pid` holds the entry `needle` (`NAME=value`).
pub fn environ_contains(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|raw| {
        raw.split(|b| *b == 0)
            .any(|entry| entry == needle.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_groups_are_recognised_and_stopped() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gantry-e2e-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new("sh");
        // A child of the leader too: stopping the group must stop both.
        cmd.args(["-c", "sleep 60 & sleep 60"])
            .env("GANTRY_TEST_MARKER", "yes");
        let pid = spawn_group(&mut cmd, &dir.join("log"))?;
        assert!(alive(pid));
        // Right after the spawn, /proc may still show the environment from before the exec.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !environ_contains(pid, "GANTRY_TEST_MARKER=yes") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(environ_contains(pid, "GANTRY_TEST_MARKER=yes"));
        assert!(!environ_contains(pid, "GANTRY_TEST_MARKER=no"));
        stop_group(pid, Duration::from_secs(5));
        assert!(!alive(pid));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn pid_dir_stops_only_processes_that_mention_the_marker() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gantry-e2e-piddir-{}", std::process::id()));
        let pids = PidDir::new(dir.join("pids"));
        let marker = dir.to_string_lossy().into_owned();
        let mut ours = Command::new("sh");
        // A second command keeps the shell from exec'ing sleep, which would drop the marker
        // from the command line.
        ours.args(["-c", &format!("sleep 60; exit 0 # {marker}")]);
        std::fs::create_dir_all(&dir)?;
        let ours = spawn_group(&mut ours, &dir.join("ours.log"))?;
        let mut other = Command::new("sleep");
        other.arg("60");
        let other = spawn_group(&mut other, &dir.join("other.log"))?;
        // Right after the spawn, /proc may still show the command line from before the exec.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cmdline(ours).is_some_and(|c| c.contains(&marker)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        pids.record("ours", ours)?;
        pids.record("other", other)?;
        pids.stop_all(&marker, &[])?;
        assert!(!alive(ours));
        assert!(
            alive(other),
            "a process not mentioning the marker must be left alone"
        );
        assert!(pids.entries().is_empty());
        stop_group(other, Duration::from_secs(5));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
