//! Where Rewind keeps its own files on this machine, in one place.
//!
//! | folder | what is in it | where |
//! |---|---|---|
//! | configuration | `config.ron` (what is protected where), store passphrase files | `$REWIND_CONFIG_DIR`, else `/etc/rewind` for root (the protection service's), else the XDG config folder (`~/.config/rewind`) |
//! | state | job history, the scheduler's status and lock, notes of restores under way, verify records, the log | `$REWIND_STATE_DIR`, else `/var/lib/rewind` for root, else the XDG state folder (`~/.local/state/rewind`) |
//! | work | one folder per job: the backup's socket and QEMU's scratch file (as large as what the guest writes during a checkpoint) | `$REWIND_WORK_DIR`, else `/var/lib/rewind/work` for root, else the XDG cache folder (`~/.cache/rewind/work`) |
//! | runtime | notes that a VM is frozen or saved right now (gone at a reboot, as the state they describe), ssh's control sockets; for root also the service's socket | `/run/rewind` for root, else `$XDG_RUNTIME_DIR/rewind`, else `<state>/run` |
//!
//! The work and runtime folders are private: made by Rewind's user with no write access for
//! anyone else (root's `/run/rewind` may be passed through by the service's clients, to its
//! socket; what is kept in it is in folders only root may enter), and refused (never followed) when something else is found there, such as a
//! link planted in a shared folder. Nothing goes to shared names in `/tmp`.
//!
//! The two variables override everything (tests, and several Rewinds on one machine). The
//! XDG folders come from the `directories` crate, which follows the Base Directory
//! specification (absolute `$XDG_…` values, else below `$HOME`).

use std::path::{Path, PathBuf};

/// The variable that overrides the configuration folder.
pub const CONFIG_DIR_ENV: &str = "REWIND_CONFIG_DIR";
/// The variable that overrides the state folder.
pub const STATE_DIR_ENV: &str = "REWIND_STATE_DIR";
/// The variable that overrides the work folder.
pub const WORK_DIR_ENV: &str = "REWIND_WORK_DIR";

fn project() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "rewind")
}

/// Rewind's configuration folder.
#[must_use]
pub fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CONFIG_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/etc/rewind");
    }
    project().map_or_else(
        || PathBuf::from(".rewind"),
        |dirs| dirs.config_dir().to_path_buf(),
    )
}

/// Rewind's folder for state that must survive a reboot.
#[must_use]
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STATE_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/rewind");
    }
    project()
        .and_then(|dirs| dirs.state_dir().map(std::path::Path::to_path_buf))
        .unwrap_or_else(|| std::env::temp_dir().join("rewind"))
}

/// Makes `dir` (and missing parents) a folder private to this user, with `mode`: a folder
/// already there must be a real folder (not a link) of this user that no one else may
/// write to, or it is refused, since someone else may have planted it.
///
/// # Errors
/// The folder cannot be made, or what is there is not such a folder.
pub fn private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private folder of this user (it is {}, owned by user {}, mode {:o}); \
                 someone else may have put it there. Remove it, and Rewind makes its own",
                dir.display(),
                if meta.file_type().is_symlink() {
                    "a symbolic link"
                } else if meta.is_dir() {
                    "a folder"
                } else {
                    "a file"
                },
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Rewind's work folder (see the table above), made private; QEMU may pass through it
/// (mode 0711) to the one folder of its job that it may write.
///
/// # Errors
/// See [`private_dir`].
pub fn work_dir() -> std::io::Result<PathBuf> {
    let dir = if let Some(dir) = std::env::var_os(WORK_DIR_ENV) {
        PathBuf::from(dir)
    } else if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/lib/rewind/work")
    } else {
        project().map_or_else(
            || state_dir().join("work"),
            |dirs| dirs.cache_dir().join("work"),
        )
    };
    private_dir(&dir, 0o711)?;
    Ok(dir)
}

/// Rewind's runtime folder (see the table above), made private: 0700, but for root's
/// `/run/rewind`, which also holds the protection service's socket that its clients must
/// reach: that one is 0755, as the service's unit makes it (`RuntimeDirectoryMode`). What
/// Rewind keeps in it goes into private folders of their own (the notes, ssh's control
/// sockets).
///
/// # Errors
/// See [`private_dir`].
pub fn runtime_dir() -> std::io::Result<PathBuf> {
    let (dir, mode) = if rustix::process::geteuid().is_root() && Path::new("/run").is_dir() {
        (PathBuf::from("/run/rewind"), 0o755)
    } else if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        (PathBuf::from(run).join("rewind"), 0o700)
    } else {
        (state_dir().join("run"), 0o700)
    };
    private_dir(&dir, mode)?;
    Ok(dir)
}

/// The user's XDG configuration folder (`~/.config`), where desktop files such as the
/// autostart entry go; `None` when neither `$XDG_CONFIG_HOME` nor `$HOME` says where.
#[must_use]
pub fn user_config_home() -> Option<PathBuf> {
    directories::BaseDirs::new().map(|dirs| dirs.config_dir().to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folders_are_absolute_and_apart() {
        let (config, state) = (config_dir(), state_dir());
        assert!(
            config.is_absolute() && state.is_absolute(),
            "{config:?} {state:?}"
        );
        assert_ne!(config, state);
        assert!(user_config_home().is_some_and(|h| h.is_absolute()));
    }

    #[test]
    fn a_private_folder_is_made_private_and_a_planted_one_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let work_folder = tmp.path().join("a/b/work");
        private_dir(&work_folder, 0o711).unwrap();
        assert_eq!(mode(&work_folder), 0o711);
        private_dir(&work_folder, 0o700).unwrap();
        assert_eq!(
            mode(&work_folder),
            0o700,
            "the same folder again, with its mode set"
        );

        // A link planted where the folder goes (as in a shared /tmp) is refused, and the
        // folder it points to is left as it was.
        let canary = tmp.path().join("canary");
        std::fs::create_dir(&canary).unwrap();
        std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&canary, &link).unwrap();
        let err = private_dir(&link, 0o700).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(mode(&canary), 0o755);
        assert_eq!(std::fs::read_dir(&canary).unwrap().count(), 0);

        // A folder others may write to is refused too.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(&open, 0o700).unwrap_err();
        assert!(err.to_string().contains("not a private folder"), "{err}");
        // A file in its place as well.
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(private_dir(&file, 0o700).is_err());
    }

    #[test]
    fn work_and_runtime_folders_are_private_and_not_shared_tmp_names() {
        use std::os::unix::fs::MetadataExt as _;
        for dir in [work_dir().unwrap(), runtime_dir().unwrap()] {
            let meta = std::fs::symlink_metadata(&dir).unwrap();
            assert!(meta.is_dir(), "{}", dir.display());
            assert_eq!(meta.uid(), rustix::process::geteuid().as_raw());
            assert_eq!(meta.mode() & 0o022, 0, "{}", dir.display());
            // Root's runtime folder holds the service's socket: its clients must reach it.
            if dir == Path::new("/run/rewind") {
                assert_eq!(meta.mode() & 0o777, 0o755);
            } else if dir == runtime_dir().unwrap() {
                assert_eq!(meta.mode() & 0o777, 0o700, "{}", dir.display());
            }
            assert!(
                !dir.starts_with(std::env::temp_dir()),
                "{} is in the shared temporary folder",
                dir.display()
            );
        }
    }
}
