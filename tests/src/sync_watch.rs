//! Sees the `syncfs(2)` and `sync(2)` calls of one thread (and of the threads it starts),
//! for the power-cut file system ([`crate::powercut`]).
//!
//! FUSE does not tell a user-space file system about `syncfs(2)`: the kernel sends
//! `FUSE_SYNCFS` only to virtiofs. Checked on this project's machines (Linux 6.18, FUSE
//! protocol 7.45): `syncfs` and `sync` on a `/dev/fuse` mount reach the server as nothing at
//! all, while `fsync` of a file or folder arrives as `FUSE_FSYNC` / `FUSE_FSYNCDIR`. Yet
//! `syncfs` is how a local store makes its chunks durable. A model that ignored it would
//! blame the store for the model's gap; one that guessed would not be a test.
//!
//! So the thread that drives the store runs under a seccomp filter that turns every
//! `syncfs` and `sync` into a user notification (`SECCOMP_RET_USER_NOTIF`, Linux 5.0; the
//! `CONTINUE` answer, Linux 5.5). The caller blocks until a supervisor thread, which is not
//! under the filter, has seen the call and answered: either let the real system call run
//! (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`), or fail it with an errno. The supervisor learns
//! which file system a `syncfs` is for from `/proc/<tid>/fd/<fd>`.
//!
//! This is the only unsafe code of the test harness: a few system calls that neither `std`
//! nor `rustix` wraps. Each block says why it is sound.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// A system call the filter stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncCall {
    /// `syncfs(fd)`, with what the descriptor names (`None` when it could not be read).
    Syncfs(Option<PathBuf>),
    /// `sync()`: every file system.
    Sync,
}

// Classic BPF, as seccomp takes it (linux/filter.h, linux/bpf_common.h).
/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K` (0x05 | 0x10 | 0x00).
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K` (0x06 | 0x00).
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
/// Offsets in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

/// `sync(2)`'s number; aarch64 has it too, under another number.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small positive numbers
const NR_SYNC: u32 = libc::SYS_sync as u32;
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
const NR_SYNCFS: u32 = libc::SYS_syncfs as u32;

/// `_IOWR('!', 0, struct seccomp_notif)` and `_IOWR('!', 1, struct seccomp_notif_resp)`
/// (checked against linux/seccomp.h).
const SECCOMP_IOCTL_NOTIF_RECV: libc::c_ulong = 0xc050_2100;
const SECCOMP_IOCTL_NOTIF_SEND: libc::c_ulong = 0xc018_2101;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// Puts the calling thread (and every thread it starts from now on) under a filter that
/// stops each `syncfs` and `sync` until the returned listener answers it (see [`serve`]).
/// The filter stays with the thread until it ends: call this on a thread of its own.
pub fn watch_this_thread() -> io::Result<OwnedFd> {
    let mut program = [
        stmt(BPF_LD_W_ABS, ARCH_OFFSET),
        // Another architecture's system call numbers mean other calls: let them be.
        jump(AUDIT_ARCH, 0, 3),
        stmt(BPF_LD_W_ABS, NR_OFFSET),
        jump(NR_SYNCFS, 2, 0),
        jump(NR_SYNC, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
        stmt(BPF_RET_K, libc::SECCOMP_RET_USER_NOTIF),
    ];
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).expect("a short program"),
        filter: program.as_mut_ptr(),
    };
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only; it affects this thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `prog` points to `program`, which lives until the call returns; the kernel
    // copies the filter. The result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &raw const prog,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).expect("descriptors fit an int");
    // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Answers the calls stopped by the filter of `listener` until every thread under it has
/// ended (or `stop` is set). `decide` sees each call and returns `Ok(())` to let it run or
/// `Err(errno)` to fail it.
pub fn serve(
    listener: &OwnedFd,
    stop: &AtomicBool,
    mut decide: impl FnMut(SyncCall) -> Result<(), i32>,
) -> io::Result<()> {
    loop {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the length given.
        let ready = unsafe { libc::poll(&raw mut pfd, 1, 50) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ready == 0 || pfd.revents & libc::POLLIN == 0 {
            // POLLHUP: no thread uses the filter any more.
            if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 || stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            continue;
        }
        // SAFETY: all-zero is a valid seccomp_notif (plain integers), and the kernel wants
        // it zeroed.
        let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV writes one seccomp_notif into the struct we pass.
        if unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                SECCOMP_IOCTL_NOTIF_RECV,
                &raw mut notif,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            // The caller died or was interrupted meanwhile: nothing to answer.
            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) {
                continue;
            }
            return Err(e);
        }
        #[allow(clippy::cast_sign_loss)] // syscall numbers are small and positive
        let call = if notif.data.nr as u32 == NR_SYNCFS {
            let fd = notif.data.args[0];
            SyncCall::Syncfs(std::fs::read_link(format!("/proc/{}/fd/{fd}", notif.pid)).ok())
        } else {
            SyncCall::Sync
        };
        let mut resp = libc::seccomp_notif_resp {
            id: notif.id,
            val: 0,
            error: 0,
            flags: 0,
        };
        match decide(call) {
            Ok(()) => {
                resp.flags =
                    u32::try_from(libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE).expect("a small flag");
            }
            Err(errno) => resp.error = -errno,
        }
        // SAFETY: SEND reads one seccomp_notif_resp from the struct we pass.
        if unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                SECCOMP_IOCTL_NOTIF_SEND,
                &raw mut resp,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `syncfs` on the watched thread reaches the supervisor before it runs, and an errno
    /// given back is what the caller sees.
    #[test]
    fn syncfs_is_seen_and_can_be_failed() {
        let dir = std::env::temp_dir();
        let stop = AtomicBool::new(false);
        let seen = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let worker = s.spawn(move || {
                tx.send(watch_this_thread().unwrap()).unwrap();
                let fd = std::fs::File::open(std::env::temp_dir()).unwrap();
                let first = rustix::fs::syncfs(&fd);
                let second = rustix::fs::syncfs(&fd);
                rustix::fs::sync();
                (first, second)
            });
            let listener = rx.recv().unwrap();
            let mut n = 0;
            let (stop, seen) = (&stop, &seen);
            let supervisor = s.spawn(move || {
                serve(&listener, stop, |call| {
                    seen.lock().unwrap().push(call);
                    n += 1;
                    if n == 2 { Err(libc::EIO) } else { Ok(()) }
                })
            });
            let (first, second) = worker.join().unwrap();
            stop.store(true, Ordering::SeqCst);
            supervisor.join().unwrap().unwrap();
            assert_eq!(first, Ok(()));
            assert_eq!(second, Err(rustix::io::Errno::IO));
        });
        let seen = seen.into_inner().unwrap();
        let here = std::fs::canonicalize(dir).unwrap();
        assert_eq!(
            seen,
            vec![
                SyncCall::Syncfs(Some(here.clone())),
                SyncCall::Syncfs(Some(here)),
                SyncCall::Sync
            ]
        );
    }
}
