//! Moving an older Rewind's settings to the protection service, on its first start.
//!
//! Before the service, Rewind kept its configuration (what is protected where, with the
//! store passphrase files) in the XDG folders of whoever ran it: `~/.config/rewind` and
//! `~/.local/state/rewind` (the job history), root's for a checkpoint to work at all. When
//! the service starts with no configuration of its own, it takes the newest such
//! configuration of a user who may manage VMs (root, or a member of the `libvirt` group:
//! anyone else could not have configured the service either), and:
//! - copies each store passphrase file it names into the service's `keys/` folder (root
//!   only, mode 0600), and points the configuration there, so that no key is needed from a
//!   user's home any more;
//! - copies the job history, so that the timeline, `rewind status` and retry policy go on
//!   where they were;
//! - leaves the stores alone: the same destinations with the same store IDs, so every
//!   protected VM's next checkpoint is an incremental in its old chain.
//!
//! The old files stay where they are (the service writes nothing in a home). A passphrase
//! file that is a symbolic link or is not the user's own is not copied (the service must
//! not become a way to read another file as root); its destination keeps the old path and
//! the log says so.

use std::path::{Path, PathBuf};

use rewind_core::config::Config;
use rewind_core::scheduler::Paths;

use crate::access::{Peer, authorise};

/// Where to look instead of the user database's homes (colon-separated homes; tests).
pub const LEGACY_HOMES_ENV: &str = "REWIND_LEGACY_HOMES";

/// An older Rewind's folders of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Legacy {
    /// Whose they are.
    pub owner: String,
    /// Their user ID.
    pub uid: u32,
    /// `~/.config/rewind`.
    pub config_dir: PathBuf,
    /// `~/.local/state/rewind`.
    pub state_dir: PathBuf,
}

/// The places of the users in `passwd` (the user database's text) who may manage VMs:
/// root and the human users (UID 1000 and up, not `nobody`), filtered by `may_manage`.
#[must_use]
pub fn legacy_places(passwd: &str, may_manage: impl Fn(&Peer) -> bool) -> Vec<Legacy> {
    passwd
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let [name, _, uid, gid, _, home, ..] = fields[..] else {
                return None;
            };
            let (uid, gid) = (uid.parse::<u32>().ok()?, gid.parse::<u32>().ok()?);
            let human = uid == 0 || (1000..65534).contains(&uid);
            let peer = Peer {
                pid: 0,
                uid,
                gid,
                name: Some(name.to_owned()),
            };
            (human && home.starts_with('/') && may_manage(&peer)).then(|| Legacy {
                owner: name.to_owned(),
                uid,
                config_dir: Path::new(home).join(".config/rewind"),
                state_dir: Path::new(home).join(".local/state/rewind"),
            })
        })
        .collect()
}

/// The places to look on this host: `$REWIND_LEGACY_HOMES`, else every home in
/// `/etc/passwd` of a user who may manage VMs.
#[must_use]
pub fn places_on_this_host() -> Vec<Legacy> {
    if let Some(homes) = std::env::var_os(LEGACY_HOMES_ENV) {
        return std::env::split_paths(&homes)
            .map(|home| {
                let uid =
                    std::fs::metadata(&home).map_or(0, |m| std::os::unix::fs::MetadataExt::uid(&m));
                Legacy {
                    owner: home.display().to_string(),
                    uid,
                    config_dir: home.join(".config/rewind"),
                    state_dir: home.join(".local/state/rewind"),
                }
            })
            .collect();
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    legacy_places(&passwd, |peer| authorise(peer).is_ok())
}

/// What was moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// Whose configuration.
    pub from: Legacy,
    /// The VMs it protects.
    pub vms: usize,
    /// Passphrase files copied into the service's `keys/`.
    pub keys: usize,
    /// History records copied.
    pub records: usize,
    /// What was left as it was, and why (for the log).
    pub notes: Vec<String>,
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// A file could not be read or written.
    #[error("could not {action} {} while moving the older configuration ({source}); fix that and restart the service, or move it by hand", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration could not be saved.
    #[error(transparent)]
    Config(#[from] rewind_core::config::ConfigError),
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> UpgradeError + 'a {
    move |source| UpgradeError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// With no configuration at `paths.config` yet: adopts the newest configuration among
/// `places` that loads and protects or names something (see the module's notes). `None`:
/// the service has one already, or there is nothing to move.
///
/// # Errors
/// A file could not be copied or the configuration saved; nothing is half-adopted then
/// (the configuration is written last).
pub fn adopt_if_new(paths: &Paths, places: &[Legacy]) -> Result<Option<Adopted>, UpgradeError> {
    if paths.config.exists() {
        return Ok(None);
    }
    let mut found: Vec<(std::time::SystemTime, &Legacy, Config)> = places
        .iter()
        .filter_map(|place| {
            let file = place.config_dir.join("config.ron");
            let modified = std::fs::metadata(&file).and_then(|m| m.modified()).ok()?;
            let config = Config::load(&file)
                .inspect_err(|e| tracing::warn!("not moving {}: {e}", file.display()))
                .ok()?;
            (!config.vms.is_empty() || !config.destinations.is_empty())
                .then_some((modified, place, config))
        })
        .collect();
    found.sort_by_key(|(modified, ..)| *modified);
    let Some((_, place, mut config)) = found.pop() else {
        return Ok(None);
    };
    let mut notes: Vec<String> = found
        .iter()
        .map(|(_, other, _)| {
            format!(
                "{}'s older configuration in {} was not moved (only the newest is); add what it protects in Settings",
                other.owner,
                other.config_dir.display()
            )
        })
        .collect();
    let config_dir = paths
        .config
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let keys_dir = config_dir.join("keys");
    let mut keys = 0;
    for dest in &mut config.destinations {
        let Some(old) = dest.passphrase_file.clone() else {
            continue;
        };
        let old = if old.is_relative() {
            place.config_dir.join(old)
        } else {
            old
        };
        let own = std::fs::symlink_metadata(&old).is_ok_and(|m| {
            m.file_type().is_file() && std::os::unix::fs::MetadataExt::uid(&m) == place.uid
        });
        if !own {
            notes.push(format!(
                "the passphrase file {} of destination {} is not a file of {}'s own: it was not copied, and the destination still names it",
                old.display(),
                dest.name,
                place.owner
            ));
            continue;
        }
        let bytes = zeroize::Zeroizing::new(std::fs::read(&old).map_err(io("read", &old))?);
        let name = dest
            .store_id
            .map_or_else(|| dest.name.clone(), |id| id.to_string());
        let new = keys_dir.join(format!("{name}.passphrase"));
        std::fs::create_dir_all(&keys_dir).map_err(io("create", &keys_dir))?;
        std::fs::set_permissions(
            &keys_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io("make private", &keys_dir))?;
        rewind_core::atomic_file::write(&new, &bytes, 0o600).map_err(io("write", &new))?;
        dest.passphrase_file = Some(new);
        keys += 1;
    }
    let mut records = 0;
    if !paths.history.exists() {
        for (old, new) in [
            ("history.1.jsonl", "history.1.jsonl"),
            ("history.jsonl", "history.jsonl"),
        ] {
            let old = place.state_dir.join(old);
            let new = paths.history.with_file_name(new);
            if let Ok(bytes) = std::fs::read(&old) {
                if let Some(dir) = new.parent() {
                    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
                }
                rewind_core::atomic_file::write(&new, &bytes, 0o600).map_err(io("write", &new))?;
                records += bytes
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .count();
            }
        }
    }
    config.save(&paths.config)?;
    Ok(Some(Adopted {
        from: place.clone(),
        vms: config.vms.len(),
        keys,
        records,
        notes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/bash\n\
        bob:x:1001:1001:Bob:/home/bob:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        broken line\n";

    #[test]
    fn the_places_are_those_of_root_and_the_people_who_may_manage_vms() {
        let places = legacy_places(PASSWD, |peer| peer.name.as_deref() != Some("bob"));
        let owners: Vec<_> = places.iter().map(|p| p.owner.as_str()).collect();
        assert_eq!(owners, ["root", "alice"]);
        assert_eq!(
            places[1].config_dir,
            Path::new("/home/alice/.config/rewind")
        );
        assert_eq!(
            places[1].state_dir,
            Path::new("/home/alice/.local/state/rewind")
        );
    }

    fn paths_in(dir: &Path) -> Paths {
        Paths {
            config: dir.join("config.ron"),
            history: dir.join("state/history.jsonl"),
            status: dir.join("state/status.json"),
        }
    }

    fn legacy_in(home: &Path) -> Legacy {
        Legacy {
            owner: "alice".into(),
            uid: rustix::process::getuid().as_raw(),
            config_dir: home.join(".config/rewind"),
            state_dir: home.join(".local/state/rewind"),
        }
    }

    #[test]
    fn the_newest_configuration_moves_with_its_keys_and_history_once() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        let place = legacy_in(&old);
        let key = place.config_dir.join("keys/k.passphrase");
        std::fs::create_dir_all(key.parent().unwrap()).unwrap();
        std::fs::write(&key, "correct horse\n").unwrap();
        let mut config = Config::default();
        config.destinations.push(rewind_core::config::Destination {
            name: "usb".into(),
            location: "/media/alice/usb/rewind".into(),
            store_id: Some(uuid::Uuid::from_bytes([3; 16])),
            passphrase_file: Some(key.clone()),
            store_secret: None,
        });
        config.save(&place.config_dir.join("config.ron")).unwrap();
        std::fs::create_dir_all(&place.state_dir).unwrap();
        std::fs::write(place.state_dir.join("history.jsonl"), "{}\n{}\n").unwrap();
        let paths = paths_in(&new);

        let adopted = adopt_if_new(&paths, std::slice::from_ref(&place))
            .unwrap()
            .unwrap();
        assert_eq!((adopted.keys, adopted.records), (1, 2));
        let moved = Config::load(&paths.config).unwrap();
        let new_key = moved.destinations[0].passphrase_file.clone().unwrap();
        assert!(new_key.starts_with(new.join("keys")), "{new_key:?}");
        assert_eq!(std::fs::read(&new_key).unwrap(), b"correct horse\n");
        let mode = std::fs::metadata(&new_key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert_eq!(
            moved.destinations[0].store_id,
            config.destinations[0].store_id
        );
        assert_eq!(std::fs::read_to_string(&paths.history).unwrap(), "{}\n{}\n");
        // The old files stay; a second start moves nothing.
        assert!(key.exists());
        assert_eq!(adopt_if_new(&paths, &[place]).unwrap(), None);
    }

    #[test]
    fn a_passphrase_file_that_is_a_link_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let place = legacy_in(&dir.path().join("old"));
        std::fs::create_dir_all(&place.config_dir).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "not theirs").unwrap();
        let link = place.config_dir.join("key");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let mut config = Config::default();
        config.destinations.push(rewind_core::config::Destination {
            name: "usb".into(),
            location: "/media/alice/usb/rewind".into(),
            store_id: None,
            passphrase_file: Some(link.clone()),
            store_secret: None,
        });
        config.save(&place.config_dir.join("config.ron")).unwrap();
        let paths = paths_in(&dir.path().join("new"));
        let adopted = adopt_if_new(&paths, &[place]).unwrap().unwrap();
        assert_eq!(adopted.keys, 0);
        assert!(
            adopted.notes[0].contains("not a file of"),
            "{:?}",
            adopted.notes
        );
        assert!(!dir.path().join("new/keys").exists());
        let moved = Config::load(&paths.config).unwrap();
        assert_eq!(moved.destinations[0].passphrase_file, Some(link));
    }
}
