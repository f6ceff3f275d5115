//! Doing one thing as another user: what a service running as root uses to let the kernel
//! decide whether the user who asked could do it themselves.
//!
//! Linux keeps a process's user and groups per thread at the system-call level, so a
//! short-lived thread takes the user's identity, does its one thing, and ends; the rest of
//! the process keeps its own.

use std::ffi::CString;
use std::io;

/// The groups of the user `uid` as the user database has them (polkit and `login` read
/// the same), with `gid` among them; only `gid` if the database does not know the user.
#[must_use]
pub fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    groups_of_name(name.as_deref(), gid)
}

/// The groups of the user named `name` (with `gid` among them); only `gid` without a name
/// or if the user database does not know it.
#[must_use]
pub fn groups_of_name(name: Option<&str>, gid: u32) -> Vec<u32> {
    let Some(name) = name.and_then(|n| CString::new(n).ok()) else {
        return vec![gid];
    };
    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).map_or_else(
        |_| vec![gid],
        |groups| groups.into_iter().map(nix::unistd::Gid::as_raw).collect(),
    )
}

/// Runs `work` on a thread of its own that has taken the user `uid`, the group `gid` and
/// the supplementary `groups`, and returns what it returns. Taking another identity needs
/// root.
///
/// # Errors
/// The thread could not be made or could not take the identity, it panicked, or `work`
/// failed.
pub fn as_user<T: Send>(
    uid: u32,
    gid: u32,
    groups: &[u32],
    work: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("rewind-as-user".into())
            .spawn_scoped(scope, || {
                let groups: Vec<_> = groups
                    .iter()
                    .map(|g| rustix::process::Gid::from_raw(*g))
                    .collect();
                set_thread_groups(&groups)?;
                let gid = rustix::process::Gid::from_raw(gid);
                set_thread_res_gid(gid, gid, gid)?;
                let uid = rustix::process::Uid::from_raw(uid);
                set_thread_res_uid(uid, uid, uid)?;
                work()
            })?
            .join()
            .map_err(|_| io::Error::other("a thread acting as another user panicked"))?
    })
}
