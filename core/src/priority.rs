//! Background priority: automatic work yields the CPU and the disk to the user's VMs.
//!
//! A scheduled checkpoint (and the rotating check of a store) runs on a thread of its own
//! at a low CPU and I/O priority ([`Priority::BACKGROUND`]: nice 19, best-effort I/O level 7),
//! so that a guest the user works in stays responsive while Rewind hashes and compresses
//! its disks. A checkpoint the user asked for now and a restore keep their priority: the
//! user is waiting for them.
//!
//! How it reaches everything the job does: Linux keeps the nice value, the scheduling
//! policy and the I/O priority per thread, and a new thread or process starts with those of
//! the thread that created it. So [`run_at`] lowers its own fresh thread first, and every
//! thread the job starts after that (the store's `rewind-chunks` workers) and every process
//! (`qemu-nbd` for a shut-off VM, `qemu-img`, `ssh`) inherits the low priority. A running
//! VM's disks are read through QEMU's own NBD export, inside the VM's QEMU process: that is
//! the user's VM and keeps its priority.
//!
//! Lowering is for good: without `CAP_SYS_NICE` a thread cannot raise its nice value
//! again. That is why it is only ever applied to a thread [`run_at`] starts for the job and
//! that ends with it — never to a pooled thread (tokio's blocking threads) that other work
//! reuses later. Lowering that fails (a sandbox that forbids it) is logged and the job runs
//! anyway, at the priority it has.
//!
//! Not used: cgroup v2 CPU and I/O weights. Without systemd to delegate a subtree, an
//! unprivileged process (the window, `rewind daemon`) has no cgroup it may create or move
//! threads into, and CPU weights apply per cgroup (threads only in a "threaded" subtree);
//! nice and the I/O priority work everywhere, per thread, without privilege.
//!
//! What the I/O priority does depends on the drive's I/O scheduler: BFQ honours the
//! best-effort levels; mq-deadline only the classes (real-time, best-effort, idle); `none`
//! (most `NVMe` drives) none of it. Best-effort 7 rather than the idle class: the idle class
//! only gets a disk nobody else uses, and a VM that writes all the time would hold a
//! checkpoint back for as long as it does.
//!
//! This module and [`crate::libvirt`]'s FFI are the only ones with `unsafe`: the
//! `ioprio_get`/`ioprio_set` system calls and `sched_getscheduler`/`sched_setscheduler`
//! have no safe binding in `rustix`.

#![allow(unsafe_code)]

use std::io;
use std::sync::Mutex;

/// How busy the CPU is allowed to be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuPriority {
    /// This nice value (−20 first … 19 last), under the normal scheduling policy.
    Nice(i32),
    /// Linux's `SCHED_IDLE` policy: runs only on a CPU nothing else wants.
    Idle,
}

/// How the drive is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPriority {
    /// The best-effort class at this level (0 first … 7 last).
    BestEffort(u8),
    /// The idle class: served when no one else uses the drive.
    Idle,
}

/// A thread's CPU and I/O priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    /// The CPU's.
    pub cpu: CpuPriority,
    /// The drive's.
    pub io: IoPriority,
}

impl Priority {
    /// Automatic work: last in line for the CPU among normal threads, and for the drive
    /// among normal I/O, without ever being starved.
    pub const BACKGROUND: Self = Self {
        cpu: CpuPriority::Nice(19),
        io: IoPriority::BestEffort(7),
    };

    /// The lowest there is: `SCHED_IDLE` and the idle I/O class (measured against
    /// [`Priority::BACKGROUND`] by the checkpoint benchmark).
    pub const IDLE: Self = Self {
        cpu: CpuPriority::Idle,
        io: IoPriority::Idle,
    };
}

/// A priority could not be lowered (the work runs anyway, at the priority it has).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PriorityError {
    /// The CPU priority.
    #[error("could not lower the CPU priority of Rewind's background work to {wanted:?}: {source}")]
    Cpu {
        /// What was asked for.
        wanted: CpuPriority,
        /// The OS's words.
        #[source]
        source: io::Error,
    },
    /// The I/O priority.
    #[error("could not lower the I/O priority of Rewind's background work to {wanted:?}: {source}")]
    Io {
        /// What was asked for.
        wanted: IoPriority,
        /// The OS's words.
        #[source]
        source: io::Error,
    },
}

/// What a thread runs at now, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPriority {
    /// Its nice value.
    pub nice: i32,
    /// Whether its scheduling policy is `SCHED_IDLE`.
    pub sched_idle: bool,
    /// Its I/O priority class: 0 none (derived from the nice value), 1 real-time, 2
    /// best-effort, 3 idle.
    pub io_class: u8,
    /// Its level in that class (0 first … 7 last).
    pub io_level: u8,
}

impl ThreadPriority {
    /// Whether it runs at `wanted` or lower.
    #[must_use]
    pub fn at_most(&self, wanted: Priority) -> bool {
        let cpu = match wanted.cpu {
            CpuPriority::Nice(n) => self.sched_idle || self.nice >= n,
            CpuPriority::Idle => self.sched_idle,
        };
        let io = match wanted.io {
            IoPriority::BestEffort(level) => {
                self.io_class == IOPRIO_CLASS_IDLE
                    || (self.io_class == IOPRIO_CLASS_BE && self.io_level >= level)
            }
            IoPriority::Idle => self.io_class == IOPRIO_CLASS_IDLE,
        };
        cpu && io
    }
}

const IOPRIO_CLASS_SHIFT: u32 = 13;
const IOPRIO_CLASS_BE: u8 = 2;
const IOPRIO_CLASS_IDLE: u8 = 3;
const IOPRIO_WHO_PROCESS: libc::c_int = 1;

/// The priority of thread `tid` (a thread or process id; `None`: the calling thread).
pub fn of_thread(tid: Option<i32>) -> io::Result<ThreadPriority> {
    let who = tid.unwrap_or(0);
    let pid = tid.and_then(rustix::process::Pid::from_raw);
    let nice = rustix::process::getpriority_process(pid)?;
    // SAFETY: `sched_getscheduler` only reads the scheduling policy of thread `who` (0: the
    // caller); it takes no pointers.
    let policy = unsafe { libc::sched_getscheduler(who) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ioprio_get(IOPRIO_WHO_PROCESS, who)` only reads thread `who`'s I/O priority
    // (0: the caller) and returns it; it takes no pointers.
    let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, who) };
    if ioprio < 0 {
        return Err(io::Error::last_os_error());
    }
    let ioprio = u32::try_from(ioprio).unwrap_or(0);
    Ok(ThreadPriority {
        nice,
        sched_idle: policy == libc::SCHED_IDLE,
        io_class: u8::try_from(ioprio >> IOPRIO_CLASS_SHIFT).unwrap_or(0),
        io_level: u8::try_from(ioprio & 0x7).unwrap_or(0),
    })
}

/// Lowers the calling thread to `wanted`, for the rest of its life (and what it starts
/// from now on). Never raises: a part already at or below `wanted` stays as it is. Returns
/// what could not be lowered (empty: all of it was).
///
/// Call it only on a thread that ends with the work (see [`run_at`]).
#[must_use = "what could not be lowered is to be logged"]
pub fn lower_current_thread(wanted: Priority) -> Vec<PriorityError> {
    let now = of_thread(None).ok();
    let mut failed = Vec::new();
    if let Err(source) = lower_cpu(wanted.cpu, now) {
        failed.push(PriorityError::Cpu {
            wanted: wanted.cpu,
            source,
        });
    }
    if let Err(source) = lower_io(wanted.io, now) {
        failed.push(PriorityError::Io {
            wanted: wanted.io,
            source,
        });
    }
    failed
}

fn lower_cpu(wanted: CpuPriority, now: Option<ThreadPriority>) -> io::Result<()> {
    match wanted {
        CpuPriority::Nice(nice) => {
            if now.is_some_and(|p| p.sched_idle || p.nice >= nice) {
                return Ok(());
            }
            // `None`: the calling thread (Linux keeps the nice value per thread).
            Ok(rustix::process::setpriority_process(None, nice)?)
        }
        CpuPriority::Idle => {
            if now.is_some_and(|p| p.sched_idle) {
                return Ok(());
            }
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: `param` is a valid `sched_param` that lives across the call, which
            // only reads it; thread 0 is the caller.
            let done = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) };
            if done < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

fn lower_io(wanted: IoPriority, now: Option<ThreadPriority>) -> io::Result<()> {
    let (class, level) = match wanted {
        // Bits above the level's three are hints to the drive (Linux 6.5 and later).
        IoPriority::BestEffort(level @ 8..) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("there is no I/O priority level {level} (0 to 7)"),
            ));
        }
        IoPriority::BestEffort(level) => (IOPRIO_CLASS_BE, level),
        IoPriority::Idle => (IOPRIO_CLASS_IDLE, 0),
    };
    let already = now.is_some_and(|p| {
        p.io_class == IOPRIO_CLASS_IDLE || (p.io_class == class && p.io_level >= level)
    });
    if already {
        return Ok(());
    }
    let ioprio = (libc::c_int::from(class) << IOPRIO_CLASS_SHIFT) | libc::c_int::from(level);
    // SAFETY: `ioprio_set(IOPRIO_WHO_PROCESS, 0, ioprio)` only sets the calling thread's
    // I/O priority; it takes no pointers, and the kernel refuses values out of range.
    let done = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, ioprio) };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `work` and returns what it returns: at `priority` on a new thread named `name`
/// (waited for) when there is one, else on the calling thread as it is. Lowering that
/// fails is logged and `work` runs anyway; so it does, on the calling thread, when no
/// thread can be started. A panic in `work` goes on in the caller.
pub fn run_at<T: Send>(
    priority: Option<Priority>,
    name: &str,
    work: impl FnOnce() -> T + Send,
) -> T {
    let Some(priority) = priority else {
        return work();
    };
    // Taken by whichever thread runs it: the new one, or this one if none starts.
    let work = Mutex::new(Some(work));
    let take = || {
        work.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .expect("the work is run once")
    };
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(scope, || {
                for e in lower_current_thread(priority) {
                    tracing::warn!("{e}; it runs at its usual priority");
                }
                take()()
            });
        match spawned {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(e) => {
                tracing::warn!(
                    "could not start a thread for background work ({e}); it runs at its usual priority"
                );
                take()()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of thread `tid` of this process as `/proc` shows it (field 19 of
    /// `stat`), to check `of_thread` against the kernel's other account.
    fn proc_nice(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = stat.rsplit_once(") ").unwrap().1;
        // Field 3 is the first after the name; nice is field 19.
        rest.split(' ').nth(19 - 3).unwrap().parse().unwrap()
    }

    fn tid() -> i32 {
        // `/proc/thread-self` links to `<pid>/task/<tid>`.
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        link.file_name().unwrap().to_str().unwrap().parse().unwrap()
    }

    #[test]
    fn background_work_and_what_it_starts_run_low_and_the_caller_keeps_its_priority() {
        // On a thread of its own, so the test harness's threads stay as they are.
        std::thread::spawn(|| {
            let before = of_thread(None).unwrap();
            assert!(!before.at_most(Priority::BACKGROUND), "{before:?}");
            let caller = tid();
            let (inside, spawned, child) =
                run_at(Some(Priority::BACKGROUND), "rewind-test", || {
                    let me = of_thread(None).unwrap();
                    assert_eq!(proc_nice(tid()), 19);
                    assert_ne!(tid(), caller, "it runs on a thread of its own");
                    let spawned = std::thread::spawn(|| {
                        assert_eq!(proc_nice(tid()), 19);
                        of_thread(None).unwrap()
                    })
                    .join()
                    .unwrap();
                    // A process it starts (as `qemu-nbd` for a shut-off VM).
                    let mut sleeper = std::process::Command::new("sleep")
                        .arg("30")
                        .spawn()
                        .unwrap();
                    let child = of_thread(Some(i32::try_from(sleeper.id()).unwrap()));
                    sleeper.kill().unwrap();
                    sleeper.wait().unwrap();
                    (me, spawned, child.unwrap())
                });
            for p in [inside, spawned, child] {
                assert_eq!(
                    p,
                    ThreadPriority {
                        nice: 19,
                        sched_idle: false,
                        io_class: IOPRIO_CLASS_BE,
                        io_level: 7
                    }
                );
            }
            assert_eq!(
                of_thread(None).unwrap(),
                before,
                "the caller is not lowered"
            );
            assert_eq!(proc_nice(caller), before.nice);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_idle_priority_is_sched_idle_and_the_idle_io_class() {
        let p = run_at(Some(Priority::IDLE), "rewind-test", || {
            let p = of_thread(None).unwrap();
            let spawned = std::thread::spawn(|| of_thread(None).unwrap())
                .join()
                .unwrap();
            assert_eq!(spawned, p);
            p
        });
        assert!(p.sched_idle && p.io_class == IOPRIO_CLASS_IDLE, "{p:?}");
        assert!(p.at_most(Priority::BACKGROUND) && p.at_most(Priority::IDLE));
    }

    #[test]
    fn lowering_never_raises_and_says_what_failed() {
        std::thread::spawn(|| {
            // Already idle for I/O: asking for best-effort leaves it idle.
            assert!(lower_current_thread(Priority::IDLE).is_empty());
            assert!(lower_current_thread(Priority::BACKGROUND).is_empty());
            let p = of_thread(None).unwrap();
            assert!(p.sched_idle && p.io_class == IOPRIO_CLASS_IDLE, "{p:?}");
        })
        .join()
        .unwrap();
        std::thread::spawn(|| {
            // A level there is not: the CPU part is still lowered, the I/O part is reported.
            let failed = lower_current_thread(Priority {
                cpu: CpuPriority::Nice(10),
                io: IoPriority::BestEffort(8),
            });
            assert!(
                matches!(failed.as_slice(), [PriorityError::Io { .. }]),
                "{failed:?}"
            );
            assert!(
                failed[0].to_string().contains("I/O priority"),
                "{}",
                failed[0]
            );
            assert_eq!(of_thread(None).unwrap().nice, 10);
            // Nice 5 would raise it: left at 10.
            assert!(
                lower_current_thread(Priority {
                    cpu: CpuPriority::Nice(5),
                    io: IoPriority::BestEffort(7),
                })
                .is_empty()
            );
            assert_eq!(of_thread(None).unwrap().nice, 10);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn without_a_priority_the_work_runs_on_the_calling_thread() {
        let caller = tid();
        assert_eq!(run_at(None, "rewind-test", tid), caller);
    }
}
