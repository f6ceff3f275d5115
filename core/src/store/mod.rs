//! The backup store: a folder on a removable drive, a local disk or a remote host that
//! holds every checkpoint, deduplicated, compressed and optionally encrypted.
//!
//! The on-disk format is documented in `core/FORMAT.md`. In short:
//!
//! ```text
//! rewind-store.json            what the store is: format version, id, chunk size, encryption
//! chunks/<4 hex>/<64 hex>      content-addressed chunks (data and index pages)
//! manifests/<vm-uuid>/<id>.manifest   one per checkpoint, written last
//! tmp/                         files being written; leftovers removed on the next run
//! damaged/                     chunks that failed verification, moved aside
//! locks/                       the store lock and its holders
//! ```

pub mod chunk;
pub mod config;
pub mod crypto;
pub mod dirblob;
pub mod error;
mod fsutil;
pub mod gc;
pub mod index;
pub mod lock;
pub mod manifest;
mod pipeline;
pub mod prune;
pub mod reader;
pub mod retention;
pub mod verify;
pub mod writer;

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::Utc;
use uuid::Uuid;

pub use chunk::{ChunkId, ChunkKind, ChunkProblem};
pub use config::StoreConfig;
pub use crypto::KdfCost;
pub use error::StoreError;
pub use index::ObjectIndex;
pub use lock::{LockMode, StoreLock};
pub use manifest::{BlobEntry, CheckpointKind, Consistency, DiskEntry, Manifest, VmRef};
pub use pipeline::{for_each_slot, reader_count};
pub use writer::{CheckpointWriter, FinishedObject, NewCheckpoint, ObjectWriter};

use crypto::Keys;
use error::io_error;

/// Options for [`Store::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Chunk size for the new store.
    pub chunk_size_bytes: u32,
    /// Encrypt with a key wrapped by this passphrase.
    pub passphrase: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// Cost of deriving the wrapping key from the passphrase.
    pub kdf_cost: KdfCost,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunk_size_bytes: config::DEFAULT_CHUNK_SIZE_BYTES,
            passphrase: None,
            kdf_cost: KdfCost::DEFAULT,
        }
    }
}

/// An open store.
pub struct Store {
    root: PathBuf,
    config: StoreConfig,
    keys: Option<Keys>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("id", &self.config.id)
            .field("encrypted", &self.keys.is_some())
            .finish_non_exhaustive()
    }
}

/// Every checkpoint in a store, and the manifests that could not be read.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Readable checkpoints, oldest first.
    pub checkpoints: Vec<Manifest>,
    /// Manifest files that are damaged, with what is wrong.
    pub unreadable: Vec<(PathBuf, StoreError)>,
}

const DIRS: [&str; 5] = ["chunks", "manifests", "tmp", "damaged", "locks"];
const README: &str = "This folder is a Rewind backup store: checkpoints of virtual machines.\n\
Do not change files in it by hand. Point Rewind at this folder to list and restore them\n\
(`rewind checkpoints --in <this folder>`). The format is described in Rewind's FORMAT.md.\n";

impl Store {
    /// Creates a store in `root`, which must be new or empty.
    pub fn init(root: &Path, options: &InitOptions) -> Result<Self, StoreError> {
        if root.join(config::CONFIG_FILE).exists() {
            return Err(StoreError::AlreadyExists {
                path: root.to_path_buf(),
            });
        }
        if root.exists() {
            if !root.is_dir() {
                return Err(StoreError::Invalid(format!(
                    "{} exists and is not a folder",
                    root.display()
                )));
            }
            if fs::read_dir(root)
                .map_err(|e| io_error("list", root, e))?
                .next()
                .is_some()
            {
                return Err(StoreError::NotEmpty {
                    path: root.to_path_buf(),
                    suggestion: root.join("rewind"),
                });
            }
        }
        let (min, max) = config::CHUNK_SIZE_RANGE_BYTES;
        if !options.chunk_size_bytes.is_power_of_two()
            || !(min..=max).contains(&options.chunk_size_bytes)
        {
            return Err(StoreError::Invalid(format!(
                "chunk size {} is not a power of two between {min} and {max} bytes",
                options.chunk_size_bytes
            )));
        }
        fsutil::create_dir_durable(root)?;
        for dir in DIRS {
            fsutil::create_dir_durable(&root.join(dir))?;
        }
        let id = Uuid::new_v4();
        let keys = match &options.passphrase {
            Some(_) => Some(Keys::generate().map_err(|e| StoreError::Random(e.to_string()))?),
            None => None,
        };
        let encryption = match (&keys, &options.passphrase) {
            (Some(keys), Some(pass)) => Some(
                keys.wrap(pass, id.as_bytes(), options.kdf_cost)
                    .map_err(|e| match e {
                        crypto::CryptoError::Random(detail) => StoreError::Random(detail),
                        other => StoreError::Invalid(format!(
                            "cannot derive the store's key from the passphrase: {other}"
                        )),
                    })?,
            ),
            _ => None,
        };
        let config = StoreConfig {
            format: config::FORMAT_NAME.into(),
            version: config::FORMAT_VERSION,
            id,
            created: Utc::now(),
            chunk_size_bytes: options.chunk_size_bytes,
            encryption,
        };
        let tmp = root.join("tmp");
        fsutil::write_atomic(&tmp, &root.join("README.txt"), README.as_bytes())?;
        // The config is written last: a folder is a store only once it is complete.
        fsutil::write_atomic(&tmp, &root.join(config::CONFIG_FILE), &config.to_json())?;
        Ok(Self {
            root: root.to_path_buf(),
            config,
            keys,
        })
    }

    /// Reads a store's config without opening it (to learn whether it needs a passphrase).
    pub fn probe(root: &Path) -> Result<StoreConfig, StoreError> {
        StoreConfig::read(root)
    }

    /// Opens the store at `root`; an encrypted store needs its passphrase.
    pub fn open(root: &Path, passphrase: Option<&[u8]>) -> Result<Self, StoreError> {
        let config = StoreConfig::read(root)?;
        for dir in DIRS {
            if !root.join(dir).is_dir() {
                return Err(StoreError::Damaged {
                    path: root.join(dir),
                    detail: "the folder is missing".into(),
                    store: root.to_path_buf(),
                });
            }
        }
        let keys = match (&config.encryption, passphrase) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(StoreError::PassphraseRequired {
                    path: root.to_path_buf(),
                });
            }
            (Some(enc), Some(pass)) => Some(
                Keys::unwrap(enc, pass, config.id.as_bytes()).map_err(|e| match e {
                    crypto::CryptoError::WrongPassphrase => StoreError::WrongPassphrase {
                        path: root.to_path_buf(),
                    },
                    crypto::CryptoError::BadConfig(detail) => StoreError::BadEncryptionConfig {
                        path: root.to_path_buf(),
                        detail,
                    },
                    other => StoreError::BadEncryptionConfig {
                        path: root.to_path_buf(),
                        detail: other.to_string(),
                    },
                })?,
            ),
        };
        Ok(Self {
            root: root.to_path_buf(),
            config,
            keys,
        })
    }

    /// The store's folder.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store's config.
    #[must_use]
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Whether chunks and manifests are encrypted.
    #[must_use]
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// The store's chunk size.
    #[must_use]
    pub fn chunk_size_bytes(&self) -> u32 {
        self.config.chunk_size_bytes
    }

    /// The name a chunk with this content has in this store.
    #[must_use]
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        match &self.keys {
            Some(keys) => ChunkId(keys.chunk_id(data)),
            None => ChunkId(*blake3::hash(data).as_bytes()),
        }
    }

    /// Path of a chunk's file.
    #[must_use]
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..4]).join(hex)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Whether a chunk file is present with a sound header and the length it announces
    /// (a file cut short by a power loss does not count: it gets rewritten).
    fn chunk_file_is_whole(path: &Path) -> bool {
        let Ok(mut file) = File::open(path) else {
            return false;
        };
        let Ok(meta) = file.metadata() else {
            return false;
        };
        let mut header = [0u8; chunk::HEADER_BYTES];
        file.read_exact(&mut header).is_ok() && chunk::Header::parse(&header, meta.len()).is_ok()
    }

    /// Stores a chunk unless the store has it. Returns its id and the bytes it added (0 if
    /// it was there). Not durable until [`fsutil::sync_filesystem`] — commit does that.
    pub(crate) fn put_chunk(
        &self,
        kind: ChunkKind,
        data: &[u8],
    ) -> Result<(ChunkId, u64), StoreError> {
        let id = self.chunk_id(data);
        let path = self.chunk_path(&id);
        if Self::chunk_file_is_whole(&path) {
            return Ok((id, 0));
        }
        let bytes = chunk::encode(kind, &id, data, self.keys.as_ref())?;
        let tmp = self.tmp_dir().join(fsutil::temp_name("chunk"));
        fsutil::write_new_file(&tmp, &bytes, false)?;
        let renamed = fs::rename(&tmp, &path).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                let dir = path.parent().expect("chunk paths have a parent");
                match fs::create_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                fs::rename(&tmp, &path)
            } else {
                Err(e)
            }
        });
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("store chunk", &path, e));
        }
        Ok((id, bytes.len() as u64))
    }

    /// Reads a chunk back, checking it against its name.
    pub fn read_chunk(&self, id: &ChunkId, kind: ChunkKind) -> Result<Vec<u8>, StoreError> {
        self.load_chunk(id, kind)
            .map_err(|problem| StoreError::BadChunk {
                chunk: id.to_hex(),
                problem,
                store: self.root.clone(),
            })
    }

    /// Asks the kernel to start reading a chunk's file now (for a reader that knows what it
    /// will read next: a cold store on a spinning or USB drive then streams). Only a hint.
    pub(crate) fn prefetch_chunk(&self, id: &ChunkId) {
        if let Ok(file) = File::open(self.chunk_path(id)) {
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::WillNeed);
        }
    }

    /// Like [`Store::read_chunk`], with the bare problem.
    pub(crate) fn load_chunk(
        &self,
        id: &ChunkId,
        kind: ChunkKind,
    ) -> Result<Vec<u8>, ChunkProblem> {
        let path = self.chunk_path(id);
        let file = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ChunkProblem::Missing);
            }
            Err(e) => return Err(ChunkProblem::Unreadable(e.to_string())),
        };
        chunk::decode(&file, kind, id, self.keys.as_ref())
    }

    /// Checks only that a chunk file is there with a sound header (quick verify).
    pub(crate) fn probe_chunk(&self, id: &ChunkId) -> Result<(), ChunkProblem> {
        let path = self.chunk_path(id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ChunkProblem::Missing);
            }
            Err(e) => return Err(ChunkProblem::Unreadable(e.to_string())),
        };
        let len = file
            .metadata()
            .map_err(|e| ChunkProblem::Unreadable(e.to_string()))?
            .len();
        let mut header = [0u8; chunk::HEADER_BYTES];
        let n = file
            .read(&mut header)
            .map_err(|e| ChunkProblem::Unreadable(e.to_string()))?;
        chunk::Header::parse(&header[..n], len).map(|_| ())
    }

    /// The entries of index page `page` of `index`.
    pub fn read_page(&self, index: &ObjectIndex, page: u64) -> Result<Vec<ChunkId>, StoreError> {
        let entries = index.entries_in_page(page);
        let Some(Some(id)) = usize::try_from(page).ok().and_then(|p| index.pages.get(p)) else {
            return Ok(vec![index::HOLE; usize::try_from(entries).unwrap_or(0)]);
        };
        let bytes = self.read_chunk(id, ChunkKind::IndexPage)?;
        index::decode_page(&bytes, entries).map_err(|detail| StoreError::Damaged {
            path: self.chunk_path(id),
            detail,
            store: self.root.clone(),
        })
    }

    fn manifest_dir(&self, vm_uuid: &Uuid) -> PathBuf {
        self.root
            .join("manifests")
            .join(vm_uuid.hyphenated().to_string())
    }

    fn manifest_path(&self, vm_uuid: &Uuid, id: &str) -> PathBuf {
        self.manifest_dir(vm_uuid).join(format!("{id}.manifest"))
    }

    fn manifest_aad(vm_uuid: &Uuid, id: &str) -> Vec<u8> {
        format!("rewind manifest {vm_uuid}/{id}").into_bytes()
    }

    fn encode_manifest(&self, manifest: &Manifest) -> Result<Vec<u8>, StoreError> {
        let mut json = serde_json::to_vec(manifest).expect("manifests serialise");
        json.push(b'\n');
        match &self.keys {
            None => Ok(json),
            Some(keys) => {
                let sealed = keys
                    .seal(&json, &Self::manifest_aad(&manifest.vm.uuid, &manifest.id))
                    .map_err(|e| StoreError::Random(e.to_string()))?;
                let mut out = b"RWME".to_vec();
                out.extend_from_slice(&sealed);
                Ok(out)
            }
        }
    }

    fn read_manifest_file(
        &self,
        path: &Path,
        vm_uuid: &Uuid,
        id: &str,
    ) -> Result<Manifest, StoreError> {
        let damaged = |detail: String| StoreError::Damaged {
            path: path.to_path_buf(),
            detail,
            store: self.root.clone(),
        };
        let bytes = fsutil::read_bounded(path, manifest::MAX_MANIFEST_BYTES, &self.root)?;
        let json = match &self.keys {
            None => bytes,
            Some(keys) => {
                let sealed = bytes
                    .strip_prefix(b"RWME")
                    .ok_or_else(|| damaged("it is not an encrypted manifest".into()))?;
                keys.open(sealed, &Self::manifest_aad(vm_uuid, id))
                    .map_err(|_| {
                        damaged(
                            "it fails authentication (modified, damaged, or moved from elsewhere)"
                                .into(),
                        )
                    })?
            }
        };
        let manifest: Manifest =
            serde_json::from_slice(&json).map_err(|e| damaged(e.to_string()))?;
        manifest
            .validate(self.config.chunk_size_bytes)
            .map_err(damaged)?;
        if manifest.vm.uuid != *vm_uuid || manifest.id != id {
            return Err(damaged(format!(
                "it describes checkpoint {} of VM {}, not what its file name says",
                manifest.id, manifest.vm.uuid
            )));
        }
        Ok(manifest)
    }

    /// Every checkpoint in the store (the store's own catalog), oldest first.
    pub fn catalog(&self) -> Result<Catalog, StoreError> {
        let mut catalog = Catalog::default();
        for vm_dir in fsutil::list_dir(&self.root.join("manifests"))? {
            let name = vm_dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let Ok(vm_uuid) = Uuid::parse_str(&name) else {
                catalog.unreadable.push((
                    vm_dir.clone(),
                    StoreError::Damaged {
                        path: vm_dir,
                        detail: "not a VM UUID".into(),
                        store: self.root.clone(),
                    },
                ));
                continue;
            };
            for file in fsutil::list_dir(&vm_dir)? {
                let file_name = file
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let Some(id) = file_name.strip_suffix(".manifest") else {
                    continue;
                };
                match self.read_manifest_file(&file, &vm_uuid, id) {
                    Ok(m) => catalog.checkpoints.push(m),
                    Err(e) => catalog.unreadable.push((file, e)),
                }
            }
        }
        catalog
            .checkpoints
            .sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(catalog)
    }

    /// One checkpoint of one VM.
    pub fn manifest(&self, vm_uuid: &Uuid, id: &str) -> Result<Manifest, StoreError> {
        manifest::check_name("checkpoint id", id)?;
        let path = self.manifest_path(vm_uuid, id);
        if !path.exists() {
            return Err(StoreError::NoSuchCheckpoint {
                id: id.to_owned(),
                store: self.root.clone(),
            });
        }
        self.read_manifest_file(&path, vm_uuid, id)
    }

    /// Removes a checkpoint's manifest (its chunks go at the next garbage collection).
    pub fn delete_checkpoint(&self, vm_uuid: &Uuid, id: &str) -> Result<(), StoreError> {
        manifest::check_name("checkpoint id", id)?;
        let path = self.manifest_path(vm_uuid, id);
        match fs::remove_file(&path) {
            Ok(()) => fsutil::sync_dir(&self.manifest_dir(vm_uuid)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::NoSuchCheckpoint {
                    id: id.to_owned(),
                    store: self.root.clone(),
                })
            }
            Err(e) => Err(io_error("remove", &path, e)),
        }
    }

    /// Removes what killed writers left in `tmp/`. Needs the exclusive lock.
    fn clean_leftovers(&self, _exclusive: &StoreLock) -> Result<u64, StoreError> {
        let mut removed = 0;
        for path in fsutil::list_dir(&self.tmp_dir())? {
            if fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Takes the shared lock for writing, first cleaning leftovers if nobody else is in.
    pub(crate) fn lock_for_writing(
        &self,
        purpose: &str,
        control: &crate::progress::Control,
    ) -> Result<StoreLock, StoreError> {
        if let Some(mut lock) = StoreLock::try_exclusive(&self.root, purpose)? {
            self.clean_leftovers(&lock)?;
            lock.downgrade()?;
            return Ok(lock);
        }
        StoreLock::acquire(&self.root, LockMode::Shared, purpose, Some(control))
    }
}

#[cfg(test)]
mod tests;
