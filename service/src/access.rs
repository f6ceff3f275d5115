//! Who is on the other end of the socket, and what they may do.
//!
//! The rule is libvirt's own: root and the members of the `libvirt` group may manage VMs
//! (Debian's polkit rule for `org.libvirt.unix.manage`); anyone else is refused with a
//! message that names the group. Who the client is comes from the kernel (`SO_PEERCRED`),
//! and group membership from the user database, as polkit reads it, so a user added to the
//! group is let in at their next connection.
//!
//! A folder a client names (a new destination, an export's file) is used only if that user
//! could write there themselves: [`may_write`] asks the kernel as that user, on a thread of
//! its own that takes the user's identity and ends.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rewind_core::job_error::{ErrorKind, JobError};

/// The group whose members may manage VMs (libvirt's).
pub const GROUP: &str = "libvirt";

/// A connected client, as the kernel names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its process.
    pub pid: i32,
    /// Its user.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
    /// The user's name, if the user database knows it.
    pub name: Option<String>,
}

impl Peer {
    /// The peer of a connected Unix socket.
    ///
    /// # Errors
    /// The kernel would not say (not a Unix socket).
    pub fn of(socket: impl AsFd) -> std::io::Result<Self> {
        let cred = rustix::net::sockopt::socket_peercred(socket)?;
        let uid = cred.uid.as_raw();
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        Ok(Self {
            pid: cred.pid.as_raw_nonzero().get(),
            uid,
            gid: cred.gid.as_raw(),
            name,
        })
    }

    /// `alice (uid 1000)`, for logs and messages.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("{name} (uid {})", self.uid),
            None => format!("uid {}", self.uid),
        }
    }

    /// The user's groups, as the user database has them (primary group included).
    fn groups(&self) -> Vec<u32> {
        rewind_core::identity::groups_of_name(self.name.as_deref(), self.gid)
    }
}

/// Whether `peer` may manage VMs through the service: root, or a member of [`GROUP`].
///
/// # Errors
/// A refusal that says who was refused, why, and how to be let in.
pub fn authorise(peer: &Peer) -> Result<(), JobError> {
    if peer.uid == 0 {
        return Ok(());
    }
    let group = nix::unistd::Group::from_name(GROUP).ok().flatten();
    let Some(group) = group else {
        return Err(JobError::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} may not use Rewind: this host has no \"{GROUP}\" group, whose members \
                 may manage virtual machines (is libvirt installed?)",
                peer.describe()
            ),
        ));
    };
    if peer.groups().contains(&group.gid.as_raw()) {
        return Ok(());
    }
    Err(JobError::new(
        ErrorKind::PermissionDenied,
        format!(
            "{} may not manage virtual machines: only root and members of the \"{GROUP}\" \
             group may. Ask an administrator to run `usermod -aG {GROUP} {}`, then log in \
             again",
            peer.describe(),
            peer.name.as_deref().unwrap_or("USER")
        ),
    ))
}

/// The folder a new file or folder at `path` goes into, or `path` itself if it is a folder
/// that exists: the nearest folder that exists, walking up.
fn nearest_existing(path: &Path) -> PathBuf {
    let mut at = path.to_path_buf();
    loop {
        if at.is_dir() {
            return at;
        }
        match at.parent() {
            Some(parent) if parent != at => at = parent.to_path_buf(),
            _ => return PathBuf::from("/"),
        }
    }
}

/// Whether `folder` is one where libvirt itself lets its clients create disk images:
/// [`rewind_core::libvirt::volumes::LIBVIRT_IMAGES`] or the folder of an active storage pool of type
/// `dir` of `uri` (as libvirt says, never as a store says; the same folders a restore
/// confines a VM's files to, [`rewind_core::libvirt::Hypervisor::storage_folders`]). A user
/// in the `libvirt` group may have the service write a new VM's disks there: libvirt would
/// let them create volumes there themselves, and QEMU can reach them, which it cannot in a
/// private home folder.
#[must_use]
pub fn libvirt_image_folder(uri: &str, folder: &Path) -> bool {
    let Ok(folder) = folder.canonicalize() else {
        return false;
    };
    let allowed =
        match rewind_core::libvirt::Hypervisor::connect(uri).and_then(|hv| hv.storage_folders()) {
            Ok(folders) => folders,
            Err(e) => {
                tracing::warn!("could not list the storage pools of {uri}: {e}");
                vec![PathBuf::from(rewind_core::libvirt::volumes::LIBVIRT_IMAGES)]
            }
        };
    allowed
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .any(|p| p == folder)
}

/// Whether `peer` could create or write `path` themselves (for a path that does not exist:
/// whether they could create it in the nearest folder that does). Root may write anywhere.
///
/// The kernel answers, as that user: a short-lived thread takes the user's identity and
/// groups (they are per thread at the system-call level) and asks `faccessat` with
/// `AT_EACCESS`, so modes, ACLs and read-only mounts all count.
///
/// # Errors
/// A refusal that names the folder and the user.
pub fn may_write(peer: &Peer, path: &Path) -> Result<(), JobError> {
    if peer.uid == 0 {
        return Ok(());
    }
    if !path.is_absolute() {
        return Err(JobError::new(
            ErrorKind::Invalid,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    let folder = nearest_existing(path);
    let target = if path.exists() {
        path.to_path_buf()
    } else {
        folder.clone()
    };
    let probe = &target;
    let answer = rewind_core::identity::as_user(peer.uid, peer.gid, &peer.groups(), || {
        rustix::fs::accessat(
            rustix::fs::CWD,
            probe,
            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
            rustix::fs::AtFlags::EACCESS,
        )
        .or_else(|e| {
            // A file (an export's target) needs no search permission, only writing.
            if e == rustix::io::Errno::ACCESS && !probe.is_dir() {
                rustix::fs::accessat(
                    rustix::fs::CWD,
                    probe,
                    rustix::fs::Access::WRITE_OK,
                    rustix::fs::AtFlags::EACCESS,
                )
            } else {
                Err(e)
            }
        })
        .map_err(std::io::Error::from)
    });
    answer.map_err(|e| {
        JobError::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} may not write in {} ({e}): Rewind's service writes only where the user \
                 who asks could; choose a folder of yours",
                peer.describe(),
                target.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_let_in_and_may_write_anywhere() {
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
            name: Some("root".into()),
        };
        assert!(authorise(&root).is_ok());
        assert!(may_write(&root, Path::new("/proc/nowhere")).is_ok());
    }

    #[test]
    fn nobody_is_refused_with_the_group_named_and_may_not_write_in_roots_folder() {
        let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
            return; // no such user on this system
        };
        let peer = Peer {
            pid: 1,
            uid: nobody.uid.as_raw(),
            gid: nobody.gid.as_raw(),
            name: Some("nobody".into()),
        };
        if nix::unistd::Group::from_name(GROUP)
            .ok()
            .flatten()
            .is_some()
        {
            let refused = authorise(&peer).unwrap_err();
            assert_eq!(refused.kind, ErrorKind::PermissionDenied);
            assert!(refused.message.contains("\"libvirt\" group"), "{refused}");
            assert!(refused.message.contains("nobody"), "{refused}");
        }
        if rustix::process::geteuid().is_root() {
            let dir = tempfile::tempdir().unwrap();
            let refused = may_write(&peer, &dir.path().join("new/store")).unwrap_err();
            assert_eq!(refused.kind, ErrorKind::PermissionDenied);
            assert!(
                refused.message.contains(&dir.path().display().to_string()),
                "{refused}"
            );
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o777),
            )
            .unwrap();
            may_write(&peer, &dir.path().join("new/store")).unwrap();
        }
    }
}
