//! Finding a destination's store right now. A store is recognised by its ID
//! (`rewind-store.json`), not by where it is mounted: a removable drive may come back
//! under another path (`/media/me/BACKUP1` instead of `/media/me/BACKUP`), and a folder that
//! holds no store with that ID — above all an empty mount point while the drive is
//! unplugged — is never written to (that would fill the system disk, and the checkpoints
//! would not be on the drive).
//!
//! Drives appear under `/media/$USER`, `/run/media/$USER` and `/mnt` (what udisks2 and
//! people use) and under the folders the configuration adds; they are searched two levels
//! deep.

use std::path::{Path, PathBuf};

use uuid::Uuid;
use zeroize::Zeroizing;

use crate::config::{Config, Destination};
use crate::store::{Location, Store, StoreError};

/// Where a destination's store is now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Availability {
    /// A store with the right ID, in this folder.
    Folder(PathBuf),
    /// A store on another host (`ssh://…`): reachable or not shows when it is opened.
    Remote(String),
    /// Not there now.
    Missing {
        /// What is missing and what to do, for the user.
        reason: String,
    },
}

/// The folders searched for removable drives: the user's own (`/media/$USER`,
/// `/run/media/$USER`), `/mnt`, and the configuration's. Root (the protection service, which
/// protects for every user) searches every user's folder under `/media` and `/run/media`,
/// where the desktop mounts each user's drives.
#[must_use]
pub fn watch_roots(config: &Config) -> Vec<PathBuf> {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".into());
    let mut roots = vec![
        Path::new("/media").join(&user),
        Path::new("/run/media").join(&user),
        PathBuf::from("/mnt"),
    ];
    if rustix::process::geteuid().is_root() {
        for base in ["/media", "/run/media"] {
            for dir in user_media_dirs(Path::new(base)) {
                if !roots.contains(&dir) {
                    roots.push(dir);
                }
            }
        }
    }
    roots.extend(config.watch_paths.iter().cloned());
    roots
}

/// The folders right below `base` (`/media/alice`, `/media/bob`), sorted; none if `base`
/// cannot be read. Links are not followed.
fn user_media_dirs(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// Whether `dir` holds the store `id` (or any store, for `None`).
fn holds(dir: &Path, id: Option<Uuid>) -> bool {
    Store::probe(dir).is_ok_and(|c| id.is_none_or(|id| c.id == id))
}

/// Looks for the store of `dest` now.
#[must_use]
pub fn locate(dest: &Destination, roots: &[PathBuf]) -> Availability {
    if dest.location.starts_with("ssh://") {
        return Availability::Remote(dest.location.clone());
    }
    let configured = PathBuf::from(&dest.location);
    if holds(&configured, dest.store_id) {
        return Availability::Folder(configured);
    }
    if let Some(id) = dest.store_id {
        // The same drive under another mount point: the store keeps its place in the
        // drive, so look for the same relative place below each root, then anywhere two
        // levels down.
        for root in roots {
            for candidate in candidates(root) {
                if holds(&candidate, Some(id)) {
                    return Availability::Folder(candidate);
                }
            }
        }
    }
    let reason = match dest.store_id {
        Some(id) if configured.exists() => format!(
            "the backup drive is not plugged in: {} holds no Rewind store with ID {id}. Plug in the drive; Rewind finds it wherever it is mounted",
            configured.display()
        ),
        Some(id) => format!(
            "the backup drive is not plugged in: no Rewind store with ID {id} at {} or under {}. Plug in the drive",
            configured.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => format!(
            "there is no Rewind store at {}; create one with `rewind protect` or `rewind init`",
            configured.display()
        ),
    };
    Availability::Missing { reason }
}

/// Why a destination could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The store could not be opened or created.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The folder holds an encrypted store and no passphrase was given.
    #[error(
        "the store at {path} is encrypted: give its passphrase (a file only you can read, with --passphrase-file, or type it in the window)"
    )]
    NeedsPassphrase {
        /// The store's folder.
        path: PathBuf,
    },
    /// A passphrase file could not be read or written.
    #[error("could not {action} the passphrase file {}: {source}", path.display())]
    PassphraseFile {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not an absolute path.
    #[error("{0} is not a full path to a folder; choose the folder again (it must start with /)")]
    NotAbsolute(String),
}

/// A destination added to (or found in) a configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Added {
    /// Its name in the configuration.
    pub name: String,
    /// Where its store is.
    pub location: String,
    /// A new store was created.
    pub created: bool,
    /// It was in the configuration already (recognised by its store's ID).
    pub existed: bool,
}

/// What the passphrase of a folder store comes from.
#[derive(Debug, Clone, Copy)]
pub enum Passphrase<'a> {
    /// None: a plain store, or fail if the folder holds an encrypted one.
    None,
    /// A file holding it (one line), kept as the destination's passphrase file.
    File(&'a Path),
    /// Typed in: a new store is encrypted with it, an existing one opened with it; it is
    /// kept in a file only the user can read in `keys_dir` so checkpoints can run by
    /// themselves.
    Typed {
        /// The passphrase.
        passphrase: &'a [u8],
        /// Where the passphrase file goes.
        keys_dir: &'a Path,
    },
}

fn read_passphrase_file(file: &Path) -> Result<Zeroizing<Vec<u8>>, AddError> {
    passphrase_from(file).map_err(|source| AddError::PassphraseFile {
        action: "read",
        path: file.to_path_buf(),
        source,
    })
}

/// The passphrase in `file`: its first line, without the line break.
fn passphrase_from(file: &Path) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let text = Zeroizing::new(std::fs::read(file)?);
    let end = text
        .iter()
        .rposition(|b| *b != b'\n' && *b != b'\r')
        .map_or(0, |i| i + 1);
    Ok(Zeroizing::new(text[..end].to_vec()))
}

/// Writes `passphrase` to a new file only the user can read (mode 0600, written then
/// renamed into place).
fn write_passphrase_file(
    keys_dir: &Path,
    id: Uuid,
    passphrase: &[u8],
) -> Result<PathBuf, AddError> {
    let path = keys_dir.join(format!("{id}.passphrase"));
    let fail = |source: std::io::Error| AddError::PassphraseFile {
        action: "write",
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(keys_dir).map_err(fail)?;
    std::fs::set_permissions(
        keys_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(fail)?;
    crate::atomic_file::write(&path, passphrase, 0o600).map_err(fail)?;
    Ok(path)
}

/// The store in folder `dir`: opened if there is one, created if the folder is missing or
/// empty (encrypted when a passphrase is given). Returns it and whether it is new.
///
/// # Errors
/// The folder holds something else, the store cannot be opened (wrong passphrase,
/// newer format) or created, or it is encrypted and no passphrase was given.
pub fn open_or_create_folder(
    dir: &Path,
    passphrase: Option<&[u8]>,
) -> Result<(crate::store::Store, bool), AddError> {
    open_or_create(&Location::Local(dir.to_path_buf()), passphrase)
}

/// [`open_or_create_folder`] for a folder here or on another host (`ssh://…`).
///
/// # Errors
/// As [`open_or_create_folder`]; for another host also when it cannot be reached or its
/// host key is not accepted.
pub fn open_or_create(
    location: &Location,
    passphrase: Option<&[u8]>,
) -> Result<(crate::store::Store, bool), AddError> {
    use crate::store::{InitOptions, StoreError};
    let init = || {
        let options = InitOptions {
            passphrase: passphrase.map(|p| Zeroizing::new(p.to_vec())),
            ..InitOptions::default()
        };
        Store::init_at(location, &options).map(|s| (s, true))
    };
    let empty_here = |dir: &Path| std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    match Store::probe_at(location) {
        Err(StoreError::Missing { .. }) => Ok(init()?),
        // An empty folder here becomes a store; on another host, creating it refuses a
        // folder that is not empty.
        Err(StoreError::NotAStore { .. })
            if match location {
                Location::Local(dir) => empty_here(dir),
                Location::Ssh(_) => true,
            } =>
        {
            Ok(init()?)
        }
        Err(e) => Err(e.into()),
        Ok(c) if c.encryption.is_some() => match passphrase {
            Some(p) => Ok((Store::open_at(location, Some(p))?, false)),
            None => Err(AddError::NeedsPassphrase {
                path: PathBuf::from(location.to_string()),
            }),
        },
        Ok(_) => Ok((Store::open_at(location, None)?, false)),
    }
}

/// Opens the store of remote destination `dest` (`ssh://…`) and checks that it is the
/// store the destination was made for.
///
/// # Errors
/// The location is malformed, the host cannot be reached, or the store there is another
/// one (or cannot be opened).
pub fn open_remote(dest: &Destination, passphrase: Option<&[u8]>) -> Result<Store, StoreError> {
    let location = Location::parse(&dest.location)?;
    let store = Store::open_at(&location, passphrase)?;
    if let Some(id) = dest.store_id
        && store.config().id != id
    {
        return Err(StoreError::Invalid(format!(
            "{} holds another store (ID {}) than destination {:?} was made for (ID {id}); \
             point the destination at its own store, or remove it and add this one",
            dest.location,
            store.config().id,
            dest.name
        )));
    }
    Ok(store)
}

/// Why a configured destination's store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Its passphrase file could not be read.
    #[error(
        "could not read the passphrase of destination {destination:?} from {}: {source}; \
         check the file, or add the destination again with its passphrase",
        file.display()
    )]
    PassphraseFile {
        /// The destination.
        destination: String,
        /// The passphrase file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store is away for now ([`Availability::Missing`]).
    #[error("{reason}")]
    Missing {
        /// What is missing and what to do.
        reason: String,
    },
    /// The store did not open.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OpenError {
    /// Whether opening it later can succeed without the user changing anything: the
    /// drive or host comes back.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Missing { .. } => true,
            Self::Store(e) => e.is_retryable(),
            Self::PassphraseFile { .. } => false,
        }
    }
}

/// Opens the store of destination `dest`, found at `found`, with its passphrase file.
///
/// # Errors
/// The store is not there now, its passphrase file cannot be read, or it does not open.
pub fn open(dest: &Destination, found: &Availability) -> Result<Store, OpenError> {
    let pass = match &dest.passphrase_file {
        Some(file) => Some(
            passphrase_from(file).map_err(|source| OpenError::PassphraseFile {
                destination: dest.name.clone(),
                file: file.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let store = match found {
        Availability::Folder(path) => Store::open(path, pass.as_deref().map(|p| &p[..])),
        Availability::Remote(_) => open_remote(dest, pass.as_deref().map(|p| &p[..])),
        Availability::Missing { reason } => {
            return Err(OpenError::Missing {
                reason: reason.clone(),
            });
        }
    }
    .map_err(|e| match e {
        // The destination's own passphrase does not open a store with its ID: not its store.
        StoreError::WrongPassphrase { path } if dest.store_id.is_some() => {
            StoreError::NotTheStore {
                path,
                destination: dest.name.clone(),
                detail: "the destination's passphrase does not open it".into(),
            }
        }
        other => other,
    })?;
    check_proof(dest, &store)?;
    Ok(store)
}

/// Gives destination `name` of `config`, added by an older Rewind (known by its store's ID
/// alone), a secret and writes its proof into its store, if that store is here now. Returns
/// whether it did (the caller then saves `config`). A destination with a secret, or whose
/// store is away or does not open, is left as it is.
///
/// # Errors
/// The proof cannot be written.
pub fn add_missing_proof(config: &mut Config, name: &str) -> Result<bool, OpenError> {
    let roots = watch_roots(config);
    let Some(dest) = config.destination(name).cloned() else {
        return Ok(false);
    };
    if dest.store_secret.is_some() || dest.store_id.is_none() {
        return Ok(false);
    }
    let found = locate(&dest, &roots);
    if matches!(found, Availability::Missing { .. }) {
        return Ok(false);
    }
    let store = open(&dest, &found)?;
    let secret = new_proof(&store)?;
    if let Some(d) = config.destinations.iter_mut().find(|d| d.name == name) {
        d.store_secret = Some(secret);
    }
    tracing::info!("destination {name:?} now knows its store by a proof, not by its ID alone");
    Ok(true)
}

/// A new destination secret, whose proof is written into `store` (a store that copies the
/// ID lacks it); as hex, for [`Destination::store_secret`].
fn new_proof(store: &Store) -> Result<String, StoreError> {
    let mut secret = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *secret).map_err(|e| StoreError::Random(e.to_string()))?;
    store.write_proof(&*secret)?;
    Ok(hex::encode(*secret))
}

/// Checks that `store` holds the proof of `dest`'s secret. A destination added by an older
/// Rewind has none: its store is recognised by ID alone, as it was.
fn check_proof(dest: &Destination, store: &Store) -> Result<(), StoreError> {
    if dest.passphrase_file.is_some() && !store.is_encrypted() {
        // Not reached through Store::open (a passphrase for a plain store is refused there),
        // kept so that no path lets an encrypted destination write in plaintext.
        return Err(StoreError::NotEncrypted {
            path: store.root().to_path_buf(),
        });
    }
    let Some(secret) = dest.secret_bytes() else {
        if dest.store_secret.is_some() {
            return Err(StoreError::NotTheStore {
                path: store.root().to_path_buf(),
                destination: dest.name.clone(),
                detail: "the destination's secret in the configuration is malformed".into(),
            });
        }
        tracing::debug!(
            "destination {:?} has no secret (added by an older Rewind): its store is known by ID alone",
            dest.name
        );
        return Ok(());
    };
    store
        .check_proof(&secret)
        .map_err(|detail| StoreError::NotTheStore {
            path: store.root().to_path_buf(),
            destination: dest.name.clone(),
            detail,
        })
}

/// Adds the store in folder `dir` to `config` as a destination (creating the store if the
/// folder is missing or empty), or finds it there already by its store ID. The name is
/// the folder's (or its drive's) name, made unique.
///
/// # Errors
/// See [`open_or_create_folder`]; also when a passphrase file cannot be read or written.
pub fn add_folder(
    config: &mut Config,
    dir: &Path,
    passphrase: Passphrase<'_>,
) -> Result<Added, AddError> {
    if !dir.is_absolute() {
        return Err(AddError::NotAbsolute(dir.display().to_string()));
    }
    add_at(config, &Location::Local(dir.to_path_buf()), passphrase)
}

/// [`add_folder`] for a folder here or on another host (`ssh://[user@]host[:port]/path`);
/// a remote destination is named after its host.
///
/// # Errors
/// As [`add_folder`]; for another host also when it cannot be reached or its host key is
/// not accepted.
pub fn add_at(
    config: &mut Config,
    location: &Location,
    passphrase: Passphrase<'_>,
) -> Result<Added, AddError> {
    let pass = match passphrase {
        Passphrase::None => None,
        Passphrase::File(f) => Some(read_passphrase_file(f)?),
        Passphrase::Typed { passphrase, .. } => Some(Zeroizing::new(passphrase.to_vec())),
    };
    let (store, created) = open_or_create(location, pass.as_deref().map(Vec::as_slice))?;
    let store_id = store.config().id;
    let encrypted = store.config().encryption.is_some();
    let place = location;
    let location = place.to_string();
    if let Some(d) = config
        .destinations
        .iter_mut()
        .find(|d| d.store_id == Some(store_id))
    {
        location.clone_into(&mut d.location);
        // Added again: one added by an older Rewind (known by ID alone) gets its proof.
        if d.store_secret.is_none() {
            d.store_secret = Some(new_proof(&store)?);
        }
        return Ok(Added {
            name: d.name.clone(),
            location,
            created,
            existed: true,
        });
    }
    let passphrase_file = match (encrypted, passphrase) {
        (false, _) | (true, Passphrase::None) => None,
        (true, Passphrase::File(f)) => Some(f.to_path_buf()),
        (
            true,
            Passphrase::Typed {
                passphrase,
                keys_dir,
            },
        ) => Some(write_passphrase_file(keys_dir, store_id, passphrase)?),
    };
    let name = match place {
        Location::Local(dir) => unique_name(config, dir),
        Location::Ssh(ssh) => unique_name(config, &Path::new("/").join(&ssh.host)),
    };
    let store_secret = Some(new_proof(&store)?);
    config.destinations.push(Destination {
        name: name.clone(),
        location: location.clone(),
        store_id: Some(store_id),
        passphrase_file,
        store_secret,
    });
    Ok(Added {
        name,
        location,
        created,
        existed: false,
    })
}

/// A destination name from the folder (`/media/me/BACKUP/rewind` → `BACKUP`), unique in
/// `config`.
fn unique_name(config: &Config, dir: &Path) -> String {
    let stem = dir
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .rfind(|c| *c != "rewind" && *c != "/")
        .unwrap_or("backup")
        .to_owned();
    let mut name = stem.clone();
    let mut n = 2;
    while config.destination(&name).is_some() {
        name = format!("{stem}-{n}");
        n += 1;
    }
    name
}

/// Whether two paths are on the same file system (a store on the VM's own disk does not
/// survive that disk's failure). Paths that do not exist yet are judged by their nearest
/// existing parent.
#[must_use]
pub fn same_device(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let dev = |p: &Path| {
        p.ancestors()
            .find_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.dev())
    };
    matches!((dev(a), dev(b)), (Some(a), Some(b)) if a == b)
}

/// The folders a removable drive is usually mounted under that hold a folder now (the
/// drives plugged in), for the first-run guide to suggest.
#[must_use]
pub fn removable_drives(config: &Config) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = watch_roots(config)
        .iter()
        .filter_map(|r| std::fs::read_dir(r).ok())
        .flat_map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out
}

/// The folders one and two levels below `root`, and a `rewind` folder in each (where
/// `rewind protect` suggests putting a store on a drive).
fn candidates(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(first) = std::fs::read_dir(root) else {
        return out;
    };
    for a in first.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        out.push(a.clone());
        if let Ok(second) = std::fs::read_dir(&a) {
            out.extend(second.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_users_media_folder_is_a_root_and_links_are_not() {
        let dir = tempfile::tempdir().unwrap();
        for user in ["bob", "alice"] {
            std::fs::create_dir(dir.path().join(user)).unwrap();
        }
        std::fs::write(dir.path().join("a-file"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        assert_eq!(
            user_media_dirs(dir.path()),
            [dir.path().join("alice"), dir.path().join("bob")]
        );
        assert!(user_media_dirs(&dir.path().join("none")).is_empty());
    }
    use crate::store::InitOptions;

    #[test]
    fn adding_a_folder_creates_a_store_and_adding_it_again_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        let folder = dir.path().join("BACKUP/rewind");
        let added = add_folder(&mut config, &folder, Passphrase::None).unwrap();
        assert!(added.created && !added.existed);
        assert_eq!(added.name, "BACKUP");
        assert!(Store::probe(&folder).is_ok());
        let again = add_folder(&mut config, &folder, Passphrase::None).unwrap();
        assert!(!again.created && again.existed);
        assert_eq!(config.destinations.len(), 1);
        // Another store under the same name gets a number.
        let other = dir.path().join("x/BACKUP");
        assert_eq!(
            add_folder(&mut config, &other, Passphrase::None)
                .unwrap()
                .name,
            "BACKUP-2"
        );
        // A folder holding other things is refused, not taken over.
        let busy = dir.path().join("busy");
        std::fs::create_dir_all(&busy).unwrap();
        std::fs::write(busy.join("photo.jpg"), b"x").unwrap();
        let e = add_folder(&mut config, &busy, Passphrase::None).unwrap_err();
        assert!(e.to_string().contains(&busy.display().to_string()), "{e}");
        assert!(matches!(
            add_folder(&mut config, Path::new("relative"), Passphrase::None),
            Err(AddError::NotAbsolute(_))
        ));
    }

    /// A folder holding a copy of `store`'s header and folders, and nothing else: a store
    /// with a copied ID.
    fn impostor_of(store: &Path, at: &Path) {
        for dir in ["chunks", "manifests", "tmp", "damaged", "locks"] {
            std::fs::create_dir_all(at.join(dir)).unwrap();
        }
        std::fs::copy(
            store.join("rewind-store.json"),
            at.join("rewind-store.json"),
        )
        .unwrap();
    }

    #[test]
    fn a_store_that_copies_a_destinations_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        let folder = dir.path().join("REAL");
        add_folder(&mut config, &folder, Passphrase::None).unwrap();
        let dest = config.destinations[0].clone();
        assert!(dest.secret_bytes().is_some());
        open(&dest, &Availability::Folder(folder.clone())).unwrap();
        let fake = dir.path().join("FAKE");
        impostor_of(&folder, &fake);
        assert_eq!(Store::probe(&fake).unwrap().id, dest.store_id.unwrap());
        let err = open(&dest, &Availability::Folder(fake.clone())).unwrap_err();
        assert!(
            matches!(err, OpenError::Store(StoreError::NotTheStore { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("copied ID"), "{err}");
        // Nothing was written into it.
        assert_eq!(std::fs::read_dir(fake.join("chunks")).unwrap().count(), 0);

        // A destination added by an older Rewind has no secret: found by ID, as before, and
        // gets its proof the first time its store is here (or when added again).
        let mut legacy = dest.clone();
        legacy.store_secret = None;
        open(&legacy, &Availability::Folder(fake.clone())).unwrap();
        config.destinations[0].store_secret = None;
        add_folder(&mut config, &folder, Passphrase::None).unwrap();
        let upgraded = config.destinations[0].clone();
        assert!(upgraded.store_secret.is_some());
        open(&upgraded, &Availability::Folder(folder.clone())).unwrap();
        assert!(open(&upgraded, &Availability::Folder(fake.clone())).is_err());
        // ...or by itself, the first time its store is here.
        config.destinations[0].store_secret = None;
        assert!(add_missing_proof(&mut config, "REAL").unwrap());
        let upgraded = config.destinations[0].clone();
        assert!(upgraded.store_secret.is_some());
        open(&upgraded, &Availability::Folder(folder)).unwrap();
        assert!(open(&upgraded, &Availability::Folder(fake)).is_err());
        assert!(
            !add_missing_proof(&mut config, "REAL").unwrap(),
            "only once"
        );
    }

    #[test]
    fn an_encrypted_destination_refuses_a_store_with_its_id_but_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let mut config = Config::default();
        let folder = dir.path().join("REAL");
        let typed = Passphrase::Typed {
            passphrase: b"correct horse",
            keys_dir: &keys,
        };
        add_folder(&mut config, &folder, typed).unwrap();
        let dest = config.destinations[0].clone();
        // Someone makes their own encrypted store and gives it the destination's ID.
        let fake = dir.path().join("FAKE");
        Store::init(
            &fake,
            &InitOptions {
                passphrase: Some(Zeroizing::new(b"theirs".to_vec())),
                kdf_cost: crate::store::KdfCost::FAST_FOR_TESTS,
                ..InitOptions::default()
            },
        )
        .unwrap();
        let header = fake.join("rewind-store.json");
        let text = std::fs::read_to_string(&header).unwrap();
        let theirs = Store::probe(&fake).unwrap().id.to_string();
        std::fs::write(
            &header,
            text.replace(&theirs, &dest.store_id.unwrap().to_string()),
        )
        .unwrap();
        let err = open(&dest, &Availability::Folder(fake)).unwrap_err();
        assert!(
            matches!(err, OpenError::Store(StoreError::NotTheStore { .. })),
            "{err:?}"
        );
        open(&dest, &Availability::Folder(folder)).unwrap();
    }

    #[test]
    fn a_typed_passphrase_encrypts_the_new_store_and_is_kept_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let folder = dir.path().join("enc");
        let mut config = Config::default();
        let typed = Passphrase::Typed {
            passphrase: b"correct horse",
            keys_dir: &keys,
        };
        add_folder(&mut config, &folder, typed).unwrap();
        assert!(Store::probe(&folder).unwrap().encryption.is_some());
        let file = config.destinations[0].passphrase_file.clone().unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"correct horse");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Without it, or with a wrong one, the store is not added.
        let mut fresh = Config::default();
        assert!(matches!(
            add_folder(&mut fresh, &folder, Passphrase::None),
            Err(AddError::NeedsPassphrase { .. })
        ));
        let wrong = Passphrase::Typed {
            passphrase: b"wrong",
            keys_dir: &keys,
        };
        assert!(add_folder(&mut fresh, &folder, wrong).is_err());
        assert!(fresh.destinations.is_empty());
        // With the file, it is.
        add_folder(&mut fresh, &folder, Passphrase::File(&file)).unwrap();
        assert_eq!(
            fresh.destinations[0].passphrase_file.as_deref(),
            Some(file.as_path())
        );
    }

    #[test]
    fn a_store_is_found_by_its_id_wherever_the_drive_is_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let drive = dir.path().join("media/BACKUP");
        let store = Store::init(&drive.join("rewind"), &InitOptions::default()).unwrap();
        let id = store.config().id;
        let dest = Destination {
            name: "usb".into(),
            location: drive.join("rewind").display().to_string(),
            store_id: Some(id),
            passphrase_file: None,
            store_secret: None,
        };
        let roots = vec![dir.path().join("media")];
        assert_eq!(
            locate(&dest, &roots),
            Availability::Folder(drive.join("rewind"))
        );

        // Unplugged: the mount point is an empty folder, which is never taken for it.
        std::fs::rename(&drive, dir.path().join("elsewhere")).unwrap();
        std::fs::create_dir_all(&drive).unwrap();
        let Availability::Missing { reason } = locate(&dest, &roots) else {
            panic!("found a store that is not there")
        };
        assert!(
            reason.contains("not plugged in") && reason.contains(&id.to_string()),
            "{reason}"
        );

        // Plugged in again under another name.
        let again = dir.path().join("media/BACKUP1");
        std::fs::rename(dir.path().join("elsewhere"), &again).unwrap();
        assert_eq!(
            locate(&dest, &roots),
            Availability::Folder(again.join("rewind"))
        );

        // Another store in the configured place does not count.
        let other = Store::init(&drive.join("rewind"), &InitOptions::default()).unwrap();
        assert_ne!(other.config().id, id);
        assert_eq!(
            locate(&dest, &roots),
            Availability::Folder(again.join("rewind"))
        );
    }
}
