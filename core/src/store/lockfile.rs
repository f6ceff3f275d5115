//! Lock files: the store lock as every process sees it, on this host or another (where
//! `flock(2)` cannot reach).
//!
//! Every holder creates its own file in `locks/`, named for its mode and a random token:
//! `shared-<token>.lock` or `exclusive-<token>.lock`, holding a JSON [`Record`] (host,
//! machine and boot id, pid and its start time, purpose, since when). Taking the lock:
//!
//! 1. create one's own file (a new name, so this needs nothing atomic from the server);
//! 2. list `locks/` and read the files that conflict: every other file for an exclusive
//!    lock, the exclusive ones for a shared lock;
//! 3. remove those that are stale; if any other is left, remove one's own file and report
//!    busy (or wait and start again).
//!
//! The server carries out one client's requests in order, so of two processes that both
//! create and then list, at least one sees the other's file: two conflicting holders never
//! both go ahead (both may back off, and try again after a random pause). Turning an
//! exclusive lock into a shared one renames the file (`posix-rename`), so that the lock is
//! held throughout.
//!
//! A holder rewrites its file every [`REFRESH_INTERVAL`] without ever creating it: the
//! server's clock stamps the time, and a file that someone removed stays removed. A file is
//! *stale* when it has not been refreshed for [`STALE_AFTER`] (the server's clock: each
//! taker compares with the time of the file it has just created), or when it names this
//! machine and a process that no longer runs, a boot that is over, or a lock this process no
//! longer holds. A holder whose file was removed as stale (it was paused, cut off) finds out
//! at its next refresh or before committing, and fails instead of committing anything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::LockMode;
use super::backend::{Backend, Durability, is_remote_failure};
use super::error::{StoreError, io_error};
use crate::cleanup::OrWarn as _;
use crate::progress::Control;

/// How often a holder refreshes its lock file.
pub const REFRESH_INTERVAL: Duration = Duration::from_mins(1);
/// A lock file not refreshed for this long belongs to a holder that is gone.
pub const STALE_AFTER: Duration = Duration::from_mins(10);
/// Folder of the lock files, in the store.
const LOCKS: &str = "locks";
/// A lock record is small; anything larger is not one.
const MAX_RECORD_BYTES: u64 = 4096;

/// What a lock file says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Unique to this lock.
    pub token: String,
    /// Host name, for messages.
    pub host: String,
    /// `/etc/machine-id` of the holder's machine.
    #[serde(default)]
    pub machine_id: Option<String>,
    /// The boot of that machine (`/proc/sys/kernel/random/boot_id`).
    #[serde(default)]
    pub boot_id: Option<String>,
    /// The holder's process id.
    pub pid: u32,
    /// When that process started (clock ticks since boot), so that a reused pid is told
    /// apart.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// What it is doing.
    pub purpose: String,
    /// Since when (by the holder's clock).
    pub since: DateTime<Utc>,
    /// How long the file stays valid without a refresh (seconds); the holder refreshes it
    /// well within. Absent in files of an older Rewind: [`STALE_AFTER`].
    #[serde(default)]
    pub lease_secs: Option<u64>,
}

impl Record {
    /// "process 123 on host: writing a checkpoint of win11 (since 2026-05-01 10:00:00)".
    #[must_use]
    pub fn describe(&self) -> String {
        format!(
            "process {} on {}: {} (since {})",
            self.pid,
            self.host,
            self.purpose,
            self.since
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
        )
    }
}

/// This process, as its lock records name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    /// Host name.
    pub host: String,
    /// Machine id, if the machine has one.
    pub machine_id: Option<String>,
    /// Boot id.
    pub boot_id: Option<String>,
    /// Process id.
    pub pid: u32,
    /// Its start time.
    pub pid_start: Option<u64>,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// When process `pid` of this machine started (field 22 of `/proc/PID/stat`), or `None`
/// when there is no such process.
pub(crate) fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "(comm)", which may itself hold spaces and parentheses: state is field 3.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

impl Me {
    /// This process.
    pub fn current() -> &'static Me {
        static ME: OnceLock<Me> = OnceLock::new();
        ME.get_or_init(|| {
            let pid = std::process::id();
            Me {
                host: read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "a host".into()),
                machine_id: read_trimmed("/etc/machine-id")
                    .or_else(|| read_trimmed("/var/lib/dbus/machine-id")),
                boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
                pid,
                pid_start: process_start(pid),
            }
        })
    }
}

/// The tokens of the locks this process holds now.
fn live_tokens() -> &'static Mutex<BTreeSet<String>> {
    static LIVE: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(BTreeSet::new()))
}

fn is_live(token: &str) -> bool {
    live_tokens()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(token)
}

/// Whether a lock file is left over from a holder that is gone. `record` is what the file
/// holds (`None`: unreadable, or not written yet), `age` how long ago it was last refreshed,
/// `live` whether this process holds a lock of that token, `start_of` a process's start time
/// on this machine (`None`: no such process).
pub fn is_stale(
    record: Option<&Record>,
    age: Duration,
    me: &Me,
    live: &dyn Fn(&str) -> bool,
    start_of: &dyn Fn(u32) -> Option<u64>,
) -> bool {
    let lease = record
        .and_then(|r| r.lease_secs)
        .map_or(STALE_AFTER, Duration::from_secs)
        // A lease is no shorter than the refresh, and none keeps a store for more than a day.
        .clamp(REFRESH_INTERVAL * 2, Duration::from_hours(24));
    if age > lease {
        return true;
    }
    let Some(record) = record else {
        return false;
    };
    let same_machine = match (&record.machine_id, &me.machine_id) {
        (Some(theirs), Some(mine)) => theirs == mine,
        _ => false,
    };
    if !same_machine {
        return false;
    }
    if let (Some(theirs), Some(mine)) = (&record.boot_id, &me.boot_id)
        && theirs != mine
    {
        return true; // from before this machine's last boot
    }
    if record.pid == me.pid && record.pid_start == me.pid_start {
        return !live(&record.token); // ours, from a lock this process no longer holds
    }
    match start_of(record.pid) {
        None => true,
        Some(start) => record.pid_start.is_some_and(|s| s != start), // the pid was reused
    }
}

/// `shared-<token>.lock` or `exclusive-<token>.lock`.
#[must_use]
pub fn file_name(mode: LockMode, token: &str) -> String {
    match mode {
        LockMode::Shared => format!("shared-{token}.lock"),
        LockMode::Exclusive => format!("exclusive-{token}.lock"),
    }
}

/// The mode and token of a lock file's name.
#[must_use]
pub fn parse_file_name(name: &str) -> Option<(LockMode, &str)> {
    let stem = name.strip_suffix(".lock")?;
    let (mode, token) = if let Some(t) = stem.strip_prefix("shared-") {
        (LockMode::Shared, t)
    } else {
        (LockMode::Exclusive, stem.strip_prefix("exclusive-")?)
    };
    (!token.is_empty() && token.bytes().all(|b| b.is_ascii_hexdigit())).then_some((mode, token))
}

/// Whether a holder in mode `theirs` keeps a taker in mode `mine` out.
#[must_use]
pub fn conflicts(mine: LockMode, theirs: LockMode) -> bool {
    mine == LockMode::Exclusive || theirs == LockMode::Exclusive
}

fn lock_rel(name: &str) -> PathBuf {
    Path::new(LOCKS).join(name)
}

/// The holders of lock files that keep a taker in `mode` out, described; stale files are
/// removed on the way. `own` is the taker's own file (its time is the server's "now"); with
/// none, `now` is this machine's clock (a local store).
pub(crate) fn fresh_conflicts(
    fs: &Backend,
    mode: LockMode,
    own: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let entries = fs.list(Path::new(LOCKS))?;
    let now = match own {
        Some(own) => entries
            .iter()
            .find(|e| e.name == own)
            .and_then(|e| e.modified),
        None => Some(SystemTime::now()),
    };
    let me = Me::current();
    let mut busy = Vec::new();
    for entry in &entries {
        let Some((theirs, _)) = parse_file_name(&entry.name) else {
            continue;
        };
        if Some(entry.name.as_str()) == own || !conflicts(mode, theirs) {
            continue;
        }
        let rel = lock_rel(&entry.name);
        // A holder's file gets its name only once it is written whole (see `acquire`), so
        // one that reads but is no record was torn by a power cut (or written by hand):
        // nobody holds it.
        let (record, torn) = match fs.read(&rel, MAX_RECORD_BYTES) {
            Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(record) => (Some(record), false),
                Err(_) => (None, true),
            },
            Err(e) if is_remote_failure(&e) => return Err(io_error("read", fs.display(&rel), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // just released
            Err(_) => (None, false),
        };
        let age = match (now, entry.modified) {
            (Some(now), Some(then)) => now.duration_since(then).unwrap_or_default(),
            _ => Duration::ZERO,
        };
        if torn || is_stale(record.as_ref(), age, me, &is_live, &process_start) {
            tracing::warn!(
                "removed the stale lock {} of {} (last refreshed {} s ago)",
                fs.display(&rel).display(),
                record.as_ref().map_or_else(
                    || if torn {
                        "nobody (it is torn, as a power cut leaves a file never synced)".into()
                    } else {
                        "an unknown holder".into()
                    },
                    Record::describe
                ),
                age.as_secs()
            );
            match fs.remove_file(&rel) {
                Err(e) if is_remote_failure(&e) => {
                    return Err(io_error("remove", fs.display(&rel), e));
                }
                _ => continue,
            }
        }
        busy.push(record.map_or_else(
            || format!("another Rewind process ({} in the store)", rel.display()),
            |r| r.describe(),
        ));
    }
    Ok(busy)
}

/// Removes the `new-*.tmp` files that takers killed between writing and naming their lock
/// file left in `locks/` (under the exclusive lock; one younger than a minute may be a
/// taker's right now, and stays).
fn remove_abandoned_new_files(fs: &Backend, own: &str) -> Result<(), StoreError> {
    let entries = fs.list(Path::new(LOCKS))?;
    let now = entries
        .iter()
        .find(|e| e.name == own)
        .and_then(|e| e.modified);
    for entry in entries {
        // Exactly the names `acquire` gives (lowercase, as every name in a store).
        let ours = entry
            .name
            .strip_prefix("new-")
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .is_some_and(|token| token.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ours {
            continue;
        }
        let age = match (now, entry.modified) {
            (Some(now), Some(then)) => now.duration_since(then).unwrap_or_default(),
            _ => Duration::ZERO,
        };
        if age > REFRESH_INTERVAL {
            let rel = lock_rel(&entry.name);
            match fs.remove_file(&rel) {
                Err(e) if is_remote_failure(&e) => {
                    return Err(io_error("remove", fs.display(&rel), e));
                }
                other => other.or_warn(format_args!("remove {}", fs.display(&rel).display())),
            }
        }
    }
    Ok(())
}

/// A held lock file (of a store here or on another host); released on drop.
#[derive(Debug)]
pub(crate) struct FileLock {
    fs: Backend,
    store: PathBuf,
    token: String,
    /// The lock file's name now (it changes when the lock is downgraded).
    name: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

fn new_token() -> Result<String, StoreError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(hex::encode(bytes))
}

impl FileLock {
    /// Takes the lock (see the module documentation). Without `wait`, a lock held by others
    /// is [`StoreError::Busy`]; with it, waits (cancellably) until it is free.
    pub(crate) fn acquire(
        fs: &Backend,
        store: &Path,
        mode: LockMode,
        purpose: &str,
        wait: Option<&Control>,
    ) -> Result<Self, StoreError> {
        fs.create_dir_durable(Path::new(LOCKS))?;
        let me = Me::current();
        loop {
            let token = new_token()?;
            let record = Record {
                token: token.clone(),
                host: me.host.clone(),
                machine_id: me.machine_id.clone(),
                boot_id: me.boot_id.clone(),
                pid: me.pid,
                pid_start: me.pid_start,
                purpose: purpose.to_owned(),
                since: Utc::now(),
                lease_secs: Some(STALE_AFTER.as_secs()),
            };
            let bytes = serde_json::to_vec(&record).expect("records serialise");
            let name = file_name(mode, &token);
            let rel = lock_rel(&name);
            live_tokens()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(token.clone());
            let mut lock = Self {
                fs: fs.clone(),
                store: store.to_path_buf(),
                token: token.clone(),
                name: Arc::new(Mutex::new(name.clone())),
                lost: Arc::new(AtomicBool::new(false)),
                stop: None,
                refresher: None,
            };
            // Written whole under a name no taker reads, then renamed: a lock file that
            // is no record is therefore torn, never one being written. From here on,
            // dropping `lock` removes the file again.
            let new = lock_rel(&format!("new-{token}.tmp"));
            fs.write_new(&new, &bytes, Durability::AtCommit)?;
            if let Err(e) = fs.rename(&new, &rel) {
                fs.remove_file(&new)
                    .or_warn(format_args!("remove {}", fs.display(&new).display()));
                return Err(io_error("name the lock file", fs.display(&rel), e));
            }
            let busy = fresh_conflicts(fs, mode, Some(&name))?;
            if busy.is_empty() {
                if mode == LockMode::Exclusive {
                    remove_abandoned_new_files(fs, &name)?;
                }
                lock.start_refresher(bytes);
                return Ok(lock);
            }
            drop(lock);
            let Some(control) = wait else {
                return Err(StoreError::Busy {
                    path: store.to_path_buf(),
                    holder: busy.join("; "),
                });
            };
            // A random pause, so that two takers that keep meeting stop doing so.
            let pause_ms = 500 + u64::from(token.as_bytes()[0] % 16) * 60;
            for _ in 0..pause_ms / 100 {
                control.check()?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn start_refresher(&mut self, bytes: Vec<u8>) {
        let (stop, stopped) = mpsc::channel::<()>();
        let (fs, name, lost) = (self.fs.clone(), self.name.clone(), self.lost.clone());
        let thread = std::thread::Builder::new()
            .name("rewind-lock".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(REFRESH_INTERVAL)
                {
                    let rel = lock_rel(&name.lock().unwrap_or_else(PoisonError::into_inner));
                    match fs.rewrite_existing(&rel, &bytes) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                        // A broken connection: the operation holding the lock fails by
                        // itself; the next refresh tries again.
                        _ => {}
                    }
                }
            });
        if let Ok(thread) = thread {
            self.stop = Some(stop);
            self.refresher = Some(thread);
        }
    }

    /// Turns an exclusive lock into a shared one without letting go of it.
    pub(crate) fn downgrade(&mut self) -> Result<(), StoreError> {
        let shared = file_name(LockMode::Shared, &self.token);
        let mut name = self.name.lock().unwrap_or_else(PoisonError::into_inner);
        let (from, to) = (lock_rel(&name), lock_rel(&shared));
        self.fs
            .rename(&from, &to)
            .map_err(|e| io_error("rename", self.fs.display(&from), e))?;
        *name = shared;
        Ok(())
    }

    /// Fails if another process removed this lock as stale.
    pub(crate) fn check_held(&self) -> Result<(), StoreError> {
        let rel = lock_rel(&self.name.lock().unwrap_or_else(PoisonError::into_inner));
        let lost = self.lost.load(Ordering::Relaxed)
            || !self
                .fs
                .exists(&rel)
                .map_err(|e| io_error("look at", self.fs.display(&rel), e))?;
        if lost {
            self.lost.store(true, Ordering::Relaxed);
            return Err(StoreError::LockLost {
                path: self.store.clone(),
                detail: format!(
                    "its lock file was removed by another process, which took it as stale \
                     (not refreshed for {} minutes: this process was paused or cut off)",
                    STALE_AFTER.as_secs() / 60
                ),
            });
        }
        Ok(())
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.refresher.take()
            && thread.join().is_err()
        {
            tracing::warn!("the store lock's refresher thread panicked");
        }
        // With the connection gone, the file stays: it is stale for every taker at once on
        // this machine (this lock is no longer live), and for others after STALE_AFTER.
        if self.fs.is_connected() {
            let rel = lock_rel(&self.name.lock().unwrap_or_else(PoisonError::into_inner));
            self.fs
                .remove_file(&rel)
                .or_warn("remove the store's lock file on the remote host");
        }
        live_tokens()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Me {
        Me {
            host: "ws".into(),
            machine_id: Some("m1".into()),
            boot_id: Some("b1".into()),
            pid: 100,
            pid_start: Some(5000),
        }
    }

    fn record(machine: &str, boot: &str, pid: u32, start: u64, token: &str) -> Record {
        Record {
            token: token.into(),
            host: "somewhere".into(),
            machine_id: Some(machine.into()),
            boot_id: Some(boot.into()),
            pid,
            pid_start: Some(start),
            purpose: "writing a checkpoint of win11".into(),
            since: DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            lease_secs: None,
        }
    }

    /// Processes 200 (started at 7000) and 100 (this one) run on this machine.
    fn start_of(pid: u32) -> Option<u64> {
        match pid {
            100 => Some(5000),
            200 => Some(7000),
            _ => None,
        }
    }

    fn stale(record: Option<&Record>, age_s: u64, live: &[&str]) -> bool {
        let live = |t: &str| live.contains(&t);
        is_stale(record, Duration::from_secs(age_s), &me(), &live, &start_of)
    }

    #[test]
    fn another_machines_lock_is_stale_only_when_not_refreshed() {
        let theirs = record("m2", "b9", 200, 7000, "aa");
        assert!(!stale(Some(&theirs), 0, &[]));
        assert!(!stale(Some(&theirs), STALE_AFTER.as_secs(), &[]));
        assert!(stale(Some(&theirs), STALE_AFTER.as_secs() + 1, &[]));
        // Unreadable (or not written yet): judged by its age alone.
        assert!(!stale(None, 5, &[]));
        assert!(stale(None, STALE_AFTER.as_secs() + 60, &[]));
        // No machine id on either side: only the age counts.
        let mut anonymous = record("m1", "b1", 999, 1, "aa");
        anonymous.machine_id = None;
        assert!(!stale(Some(&anonymous), 30, &[]));
    }

    #[test]
    fn on_this_machine_a_dead_process_or_an_old_boot_is_stale_at_once() {
        assert!(
            !stale(Some(&record("m1", "b1", 200, 7000, "aa")), 1, &[]),
            "runs"
        );
        assert!(
            stale(Some(&record("m1", "b1", 300, 7000, "aa")), 1, &[]),
            "no such pid"
        );
        assert!(
            stale(Some(&record("m1", "b1", 200, 6999, "aa")), 1, &[]),
            "pid reused"
        );
        assert!(
            stale(Some(&record("m1", "b0", 200, 7000, "aa")), 1, &[]),
            "before the boot"
        );
    }

    #[test]
    fn this_processs_own_lock_is_stale_once_released() {
        let mine = record("m1", "b1", 100, 5000, "cafe");
        assert!(!stale(Some(&mine), 1, &["cafe"]));
        assert!(
            stale(Some(&mine), 1, &["beef"]),
            "left by a lost connection"
        );
    }

    #[test]
    fn names_and_conflicts() {
        assert_eq!(file_name(LockMode::Shared, "ab12"), "shared-ab12.lock");
        assert_eq!(
            parse_file_name("exclusive-ab12.lock"),
            Some((LockMode::Exclusive, "ab12"))
        );
        assert_eq!(
            parse_file_name("shared-ab12.lock"),
            Some((LockMode::Shared, "ab12"))
        );
        for odd in [
            "store.lock",
            "holder-1-2",
            "shared-.lock",
            "shared-xyz.lock",
            "x.lock",
        ] {
            assert_eq!(parse_file_name(odd), None, "{odd}");
        }
        assert!(!conflicts(LockMode::Shared, LockMode::Shared));
        assert!(conflicts(LockMode::Shared, LockMode::Exclusive));
        assert!(conflicts(LockMode::Exclusive, LockMode::Shared));
        assert!(conflicts(LockMode::Exclusive, LockMode::Exclusive));
    }

    #[test]
    fn records_describe_their_holder_and_this_process_is_known() {
        let r = record("m2", "b", 4242, 1, "aa");
        let text = r.describe();
        assert!(
            text.starts_with("process 4242 on somewhere: writing a checkpoint"),
            "{text}"
        );
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), r);
        let me = Me::current();
        assert_eq!(me.pid, std::process::id());
        assert_eq!(process_start(me.pid), me.pid_start);
        assert!(me.pid_start.is_some());
    }

    /// The protocol on a local folder (the same code as over SFTP): shared holders share,
    /// exclusive excludes, a downgrade keeps the lock, a stale file is cleared, and a
    /// released lock leaves nothing.
    #[test]
    fn protocol_on_a_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = Backend::local(tmp.path());
        let store = tmp.path();
        let first = FileLock::acquire(&fs, store, LockMode::Shared, "a", None).unwrap();
        let second = FileLock::acquire(&fs, store, LockMode::Shared, "b", None).unwrap();
        let err = FileLock::acquire(&fs, store, LockMode::Exclusive, "gc", None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("busy") && msg.contains(": a (since") && msg.contains(": b (since"),
            "{msg}"
        );
        drop((first, second));
        let mut gc = FileLock::acquire(&fs, store, LockMode::Exclusive, "gc", None).unwrap();
        assert!(FileLock::acquire(&fs, store, LockMode::Shared, "w", None).is_err());
        gc.downgrade().unwrap();
        gc.check_held().unwrap();
        let writer = FileLock::acquire(&fs, store, LockMode::Shared, "w", None).unwrap();
        drop((gc, writer));
        assert_eq!(
            fs.list(Path::new(LOCKS)).unwrap().len(),
            0,
            "released locks leave nothing"
        );

        // A file of a process that is gone (this machine, no such pid) is cleared.
        let mut dead = record("m", "b", u32::MAX - 1, 1, "dead");
        dead.machine_id = Me::current().machine_id.clone();
        dead.boot_id = Me::current().boot_id.clone();
        let dead_file = tmp
            .path()
            .join(LOCKS)
            .join(file_name(LockMode::Exclusive, "dead"));
        std::fs::write(&dead_file, serde_json::to_vec(&dead).unwrap()).unwrap();
        let s = FileLock::acquire(&fs, store, LockMode::Shared, "after a crash", None).unwrap();
        assert!(!dead_file.exists());
        // A holder whose file was removed finds out.
        let own = tmp
            .path()
            .join(LOCKS)
            .join(file_name(LockMode::Shared, &s.token));
        std::fs::remove_file(own).unwrap();
        assert!(matches!(s.check_held(), Err(StoreError::LockLost { .. })));
    }
}
