//! Where Rewind keeps its own files on this machine, in one place.
//!
//! | folder | what is in it | where |
//! |---|---|---|
//! | configuration | `config.ron` (what is protected where), store passphrase files | `$REWIND_CONFIG_DIR`, else `/etc/rewind` for root (the protection service's), else the XDG config folder (`~/.config/rewind`) |
//! | state | job history, the scheduler's status and lock, notes of restores under way, verify records, the log | `$REWIND_STATE_DIR`, else `/var/lib/rewind` for root, else the XDG state folder (`~/.local/state/rewind`) |
//!
//! The two variables override everything (tests, and several Rewinds on one machine). The
//! XDG folders come from the `directories` crate, which follows the Base Directory
//! specification (absolute `$XDG_…` values, else below `$HOME`).

use std::path::PathBuf;

/// The variable that overrides the configuration folder.
pub const CONFIG_DIR_ENV: &str = "REWIND_CONFIG_DIR";
/// The variable that overrides the state folder.
pub const STATE_DIR_ENV: &str = "REWIND_STATE_DIR";

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
}
