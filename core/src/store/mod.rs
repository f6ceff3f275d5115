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

mod backend;
pub(crate) mod chunk;
pub mod config;
pub(crate) mod crypto;
pub(crate) mod dirblob;
pub mod error;
pub mod flat;
pub mod gc;
pub(crate) mod index;
pub(crate) mod local;
pub mod location;
pub mod lock;
pub(crate) mod lockfile;
pub mod manifest;
pub(crate) mod patch;
mod pieces;
mod pipeline;
pub mod prune;
pub mod random;
pub mod reader;
pub mod retention;
mod sftp;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};

use chrono::Utc;
use uuid::Uuid;

pub use chunk::{ChunkId, ChunkKind, ChunkProblem, PIECE_BYTES};
pub use config::StoreConfig;
pub use crypto::KdfCost;
pub use dirblob::{PackedFile, unpack as unpack_files};
pub use error::StoreError;
pub use index::ObjectIndex;
pub use location::{Location, SshLocation};
pub use lock::{LockMode, StoreLock};
pub use manifest::{
    BlobEntry, CheckpointKind, Consistency, DiskEntry, Manifest, SAFETY_LABEL, VmRef,
};
pub use pipeline::{for_each_slot, reader_count};
pub use sftp::SSH_CONFIG_ENV;
pub use writer::{CheckpointWriter, FinishedObject, NewCheckpoint, ObjectWriter};

use backend::{Backend, Durability, is_remote_failure};
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
    /// How the store is named in messages: its folder, or `ssh://…` for a remote one.
    root: PathBuf,
    location: Location,
    fs: Backend,
    config: StoreConfig,
    keys: Option<Keys>,
    /// Manifest files read through this handle (see [`Store::manifests_read`]).
    manifests_read: std::sync::atomic::AtomicU64,
    /// Chunks written under `tmp/` and not yet named (see [`Store::publish_chunks`]).
    pending: std::sync::Mutex<Pending>,
    /// The format version written: the header's, or [`config::FORMAT_VERSION`] once an
    /// older store was upgraded by this handle (see [`Store::upgrade_format`]).
    version: std::sync::atomic::AtomicU32,
    /// The name of an all-zero chunk of the store's chunk size (not a chunk: a hole).
    zero_id: std::sync::OnceLock<ChunkId>,
}

/// Chunk files written but not yet renamed to their names: a chunk gets its name only once
/// its content is on the drive, so that no name ever stands for a torn file.
#[derive(Debug, Default)]
struct Pending {
    /// Which chunks (so that one written twice in a job is written once).
    ids: std::collections::HashSet<ChunkId>,
    /// Their files under `tmp/`, and their names.
    files: Vec<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location.to_string())
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
        Self::init_in(Location::from(root), Backend::local(root), options)
    }

    /// Creates a store at `location` (a folder here or on another host), which must be new
    /// or empty.
    pub fn init_at(location: &Location, options: &InitOptions) -> Result<Self, StoreError> {
        Self::init_in(location.clone(), Self::connect(location)?, options)
    }

    fn init_in(location: Location, fs: Backend, options: &InitOptions) -> Result<Self, StoreError> {
        let root = fs.display(Path::new(""));
        let here = Path::new("");
        let look = |e| io_error("look at", &root, e);
        if fs.exists(Path::new(config::CONFIG_FILE)).map_err(look)? {
            return Err(StoreError::AlreadyExists { path: root });
        }
        if fs.exists(here).map_err(look)? {
            if !fs.is_dir(here).map_err(look)? {
                return Err(StoreError::Invalid(format!(
                    "{} exists and is not a folder",
                    root.display()
                )));
            }
            if !fs.list_names(here)?.is_empty() {
                return Err(StoreError::NotEmpty {
                    suggestion: root.join("rewind"),
                    path: root,
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
        fs.create_dir_durable(here)?;
        for dir in DIRS {
            fs.create_dir_durable(Path::new(dir))?;
        }
        let id = Uuid::new_v4();
        let keys = match &options.passphrase {
            Some(_) => Some(Keys::generate().map_err(|e| StoreError::Random(e.to_string()))?),
            None => None,
        };
        let encryption = match (&keys, &options.passphrase) {
            (Some(keys), Some(pass)) => Some(
                keys.wrap(pass, &key_context(&id, true), options.kdf_cost)
                    .map_err(|e| match e {
                        crypto::CryptoError::Random(detail) => StoreError::Random(detail),
                        other => StoreError::Invalid(format!(
                            "cannot derive the store's key from the passphrase: {other}"
                        )),
                    })?,
            ),
            _ => None,
        };
        let mut config = StoreConfig {
            format: config::FORMAT_NAME.into(),
            version: config::FORMAT_VERSION,
            id,
            created: Utc::now(),
            chunk_size_bytes: options.chunk_size_bytes,
            encryption,
            mac_hex: None,
        };
        if let Some(keys) = &keys {
            config.mac_hex = Some(hex::encode(keys.header_mac(&config.authenticated_bytes())));
        }
        let tmp = Path::new("tmp");
        fs.write_atomic(tmp, Path::new("README.txt"), README.as_bytes())?;
        // The config is written last: a folder is a store only once it is complete.
        fs.write_atomic(tmp, Path::new(config::CONFIG_FILE), &config.to_json())?;
        Ok(Self {
            root,
            location,
            fs,
            config,
            keys,
            manifests_read: std::sync::atomic::AtomicU64::new(0),
            pending: std::sync::Mutex::default(),
            version: std::sync::atomic::AtomicU32::new(config::FORMAT_VERSION),
            zero_id: std::sync::OnceLock::new(),
        })
    }

    /// The backend for `location`: the folder, or a new SSH connection to its host.
    fn connect(location: &Location) -> Result<Backend, StoreError> {
        match location {
            Location::Local(path) => Ok(Backend::local(path)),
            Location::Ssh(ssh) => Ok(Backend::Sftp(sftp::Remote::connect(ssh)?)),
        }
    }

    /// Reads a store's config without opening it (to learn whether it needs a passphrase).
    pub fn probe(root: &Path) -> Result<StoreConfig, StoreError> {
        StoreConfig::read(root)
    }

    /// [`Store::probe`] of a store here or on another host.
    pub fn probe_at(location: &Location) -> Result<StoreConfig, StoreError> {
        let fs = Self::connect(location)?;
        StoreConfig::read_in(&fs)
    }

    /// Opens the store at `root`; an encrypted store needs its passphrase.
    pub fn open(root: &Path, passphrase: Option<&[u8]>) -> Result<Self, StoreError> {
        Self::open_in(Location::from(root), Backend::local(root), passphrase)
    }

    /// Opens the store at `location` (a folder here or on another host); an encrypted store
    /// needs its passphrase.
    pub fn open_at(location: &Location, passphrase: Option<&[u8]>) -> Result<Self, StoreError> {
        Self::open_in(location.clone(), Self::connect(location)?, passphrase)
    }

    fn open_in(
        location: Location,
        fs: Backend,
        passphrase: Option<&[u8]>,
    ) -> Result<Self, StoreError> {
        let root = fs.display(Path::new(""));
        let config = StoreConfig::read_in(&fs)?;
        for dir in DIRS {
            if !fs
                .is_dir(Path::new(dir))
                .map_err(|e| io_error("look at", fs.display(Path::new(dir)), e))?
            {
                return Err(StoreError::Damaged {
                    path: root.join(dir),
                    detail: "the folder is missing".into(),
                    store: root.clone(),
                });
            }
        }
        let (keys, legacy) = match (&config.encryption, passphrase) {
            (None, None) => (None, false),
            // Ignoring it would let a header edited to "not encrypted" turn the next
            // checkpoint into plaintext.
            (None, Some(_)) => return Err(StoreError::NotEncrypted { path: root }),
            (Some(_), None) => {
                return Err(StoreError::PassphraseRequired { path: root });
            }
            (Some(enc), Some(pass)) => {
                // A store made since headers have a MAC wraps its key with a context that
                // says so, which nobody without the passphrase can undo: its header's MAC
                // cannot simply be removed. A store made before takes the older context.
                let (keys, context) = Keys::unwrap_either(
                    enc,
                    pass,
                    &[
                        &key_context(&config.id, true),
                        &key_context(&config.id, false),
                    ],
                )
                .map_err(|e| match e {
                    crypto::CryptoError::WrongPassphrase => {
                        StoreError::WrongPassphrase { path: root.clone() }
                    }
                    crypto::CryptoError::BadConfig(detail) => StoreError::BadEncryptionConfig {
                        path: root.clone(),
                        detail,
                    },
                    other => StoreError::BadEncryptionConfig {
                        path: root.clone(),
                        detail: other.to_string(),
                    },
                })?;
                (Some(keys), context == 1)
            }
        };
        if let Some(keys) = &keys {
            check_header_mac(&config, keys, &root, !legacy)?;
        }
        let version = config.version;
        let mut store = Self {
            root,
            location,
            fs,
            config,
            keys,
            manifests_read: std::sync::atomic::AtomicU64::new(0),
            pending: std::sync::Mutex::default(),
            version: std::sync::atomic::AtomicU32::new(version),
            zero_id: std::sync::OnceLock::new(),
        };
        if let (true, Some(pass)) = (legacy, passphrase) {
            store.authenticate_legacy_header(pass);
        }
        Ok(store)
    }

    /// Where the store is.
    #[must_use]
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The store's folder (for a store on another host: `ssh://user@host:port/path`, which
    /// names it in messages and is no path on this machine).
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

    /// Path of a chunk's file (as [`Store::root`] names the store).
    #[must_use]
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.root.join(Self::chunk_rel(id))
    }

    /// A chunk's file, inside the store.
    fn chunk_rel(id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        Path::new("chunks").join(&hex[..4]).join(hex)
    }

    fn tmp_dir() -> &'static Path {
        Path::new("tmp")
    }

    /// Whether a chunk file is present with a sound header and the length it announces
    /// (a file cut short by a power loss does not count: it gets rewritten).
    fn chunk_file_is_whole(&self, rel: &Path) -> bool {
        let Ok((header, len)) = self.fs.read_prefix(rel, chunk::HEADER_BYTES) else {
            return false;
        };
        header.len() == chunk::HEADER_BYTES && chunk::Header::parse(&header, len).is_ok()
    }

    /// The format version this handle writes: the header's, or the current one once it
    /// upgraded the store.
    #[must_use]
    pub fn format_version(&self) -> u32 {
        self.version.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether data chunks get a tree of their pieces (unencrypted stores of format 2 on,
    /// encrypted ones of format 3 on).
    fn takes_trees(&self) -> bool {
        let since = if self.keys.is_some() {
            config::PATCHES_SINCE_VERSION
        } else {
            config::TREES_SINCE_VERSION
        };
        self.format_version() >= since
    }

    /// Whether the writer may keep data as patches (stores of format 3 on).
    pub(crate) fn takes_patches(&self) -> bool {
        self.format_version() >= config::PATCHES_SINCE_VERSION
    }

    /// The key of this store's chunk names and piece trees (`None`: unencrypted).
    pub(crate) fn tree_key(&self) -> chunk::TreeKey<'_> {
        chunk::tree_key(self.keys.as_ref())
    }

    /// Whether the store has chunk `id`: written by this handle for the coming commit, or
    /// present with a sound header and the length it announces.
    fn has_chunk(&self, id: &ChunkId) -> bool {
        self.pending().ids.contains(id) || self.chunk_file_is_whole(&Self::chunk_rel(id))
    }

    /// Stores a chunk unless the store has it. Returns its id and the bytes it added (0 if
    /// it was there). Not durable until the commit.
    pub(crate) fn put_chunk(
        &self,
        kind: ChunkKind,
        data: &[u8],
    ) -> Result<(ChunkId, u64), StoreError> {
        // A data chunk gets a tree where the store's format has them: the id then comes
        // from the pieces' hashes (the same BLAKE3, computed piece by piece).
        let tree = (kind == ChunkKind::Data && self.takes_trees() && chunk::takes_tree(data.len()))
            .then(|| chunk::piece_tree(data, self.tree_key()));
        let id = match &tree {
            Some(tree) => chunk::tree_root(tree, self.tree_key()),
            None => self.chunk_id(data),
        };
        let added = self.put_encoded(&id, || {
            chunk::encode(kind, &id, data, self.keys.as_ref(), tree.as_deref())
        })?;
        Ok((id, added))
    }

    /// Stores the file `encode` makes under the name `id`, unless the store has it.
    /// Returns the bytes it added (0 if it was there). Not durable until the commit.
    fn put_encoded(
        &self,
        id: &ChunkId,
        encode: impl FnOnce() -> Result<Vec<u8>, StoreError>,
    ) -> Result<u64, StoreError> {
        let rel = Self::chunk_rel(id);
        // A chunk written earlier in the same commit (the same content in two slots) is
        // not encoded again: compressing it is most of a chunk's cost.
        if self.has_chunk(id) {
            return Ok(0);
        }
        let bytes = encode()?;
        let tmp = Self::tmp_dir().join(self.fs.temp_name("chunk"));
        match &self.fs {
            // Written under tmp/ now, named at the commit once it is on the drive.
            Backend::Local(_) => {
                if !self.pending().ids.insert(*id) {
                    return Ok(0);
                }
                if let Err(e) = self.fs.write_new(&tmp, &bytes, Durability::AtCommit) {
                    self.pending().ids.remove(id);
                    return Err(e);
                }
                self.pending().files.push((tmp, rel));
            }
            // Written, fsynced, renamed into place and fsynced again in one go (no syncfs
            // over SFTP).
            Backend::Sftp(remote) => remote
                .put_file(&tmp, &rel, &bytes, true)
                .map_err(|e| io_error("store chunk", self.chunk_path(id), e))?,
        }
        Ok(bytes.len() as u64)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes every chunk stored so far durable and gives each its name: flushes the drive
    /// (`syncfs`, which also reports any write error since the store was opened), renames
    /// each file from `tmp/` into place, and flushes again so the names are durable too.
    /// A chunk's name therefore never stands for a file a power cut could have torn, and
    /// nothing refers to a chunk before this returns (the commit writes the manifest after).
    pub(crate) fn publish_chunks(
        &self,
        control: &crate::progress::Control,
    ) -> Result<(), StoreError> {
        let files = {
            let mut pending = self.pending();
            pending.ids.clear();
            std::mem::take(&mut pending.files)
        };
        self.fs.sync_all()?;
        if files.is_empty() {
            return Ok(());
        }
        for (tmp, rel) in &files {
            control.check()?;
            let renamed = self.fs.rename(tmp, rel).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    let dir = rel.parent().expect("chunk paths have a parent");
                    match self.fs.create_dir(dir) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                    self.fs.rename(tmp, rel)
                } else {
                    Err(e)
                }
            });
            if let Err(e) = renamed {
                // What is left under tmp/ goes with the next writer's clean-up.
                return Err(io_error("store chunk", self.root.join(rel), e));
            }
        }
        self.fs.sync_all()
    }

    /// Reads a chunk back, checking it against its name.
    pub fn read_chunk(&self, id: &ChunkId, kind: ChunkKind) -> Result<Vec<u8>, StoreError> {
        self.load_chunk(id, kind)?
            .map_err(|problem| StoreError::BadChunk {
                chunk: id.to_hex(),
                problem,
                store: self.root.clone(),
            })
    }

    /// Asks the kernel to start reading a chunk's file now (for a reader that knows what it
    /// will read next: a cold store on a spinning or USB drive then streams). Only a hint.
    pub(crate) fn prefetch_chunk(&self, id: &ChunkId) {
        self.fs.prefetch(&Self::chunk_rel(id));
    }

    /// Like [`Store::read_chunk`], with the bare problem; the outer error is a failure to
    /// reach the store at all (a lost connection), which says nothing about the chunk.
    pub(crate) fn load_chunk(
        &self,
        id: &ChunkId,
        kind: ChunkKind,
    ) -> Result<Result<Vec<u8>, ChunkProblem>, StoreError> {
        let rel = Self::chunk_rel(id);
        let max = (chunk::HEADER_BYTES + chunk::MAX_CHUNK_BYTES * 2) as u64;
        let file = match self.fs.read(&rel, max) {
            Ok(bytes) => bytes,
            // A lost connection, or a link or device where the chunk should be: not the
            // chunk's damage (which a later checkpoint heals), but something to refuse.
            Err(e) if is_remote_failure(&e) || local::Refusal::of(&e).is_some() => {
                return Err(io_error("read", self.chunk_path(id), e));
            }
            Err(e) => return Ok(Err(file_problem(&e))),
        };
        if kind == ChunkKind::Data && chunk::is_patch(&file) {
            let mut out = Vec::new();
            return Ok(self.read_patch(&file, id, None, &mut out)?.map(|_| out));
        }
        Ok(chunk::decode(file, kind, id, self.keys.as_ref()))
    }

    /// Reads what `ranges` (byte ranges of the content, not empty) need of data chunk `id`
    /// into `out`, which is set to the chunk's length: where the chunk has a tree, only the
    /// pieces the ranges touch are read and checked (see [`chunk::decode_ranges`]); the
    /// rest of `out` is then left as it was. Otherwise the whole chunk is read and checked.
    pub(crate) fn read_chunk_ranges(
        &self,
        id: &ChunkId,
        ranges: &[(u64, u64)],
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let keys = self.keys.as_ref();
        let decoded = match self.open_chunk(id)? {
            Err(problem) => Err(problem),
            Ok(file) if file.is_patch() => {
                let pieces = chunk::pieces_of(ranges);
                match file.into_bytes() {
                    Ok(bytes) => self.read_patch(&bytes, id, Some(&pieces), out)?.map(drop),
                    Err(problem) => Err(problem),
                }
            }
            Ok(file) => {
                let len = file.len();
                chunk::decode_ranges(&file, len, id, keys, ranges, out).map(drop)
            }
        };
        decoded.map_err(|problem| StoreError::BadChunk {
            chunk: id.to_hex(),
            problem,
            store: self.root.clone(),
        })
    }

    /// Checks only that a chunk file is there with a sound header (quick verify).
    pub(crate) fn probe_chunk(&self, id: &ChunkId) -> Result<Result<(), ChunkProblem>, StoreError> {
        let rel = Self::chunk_rel(id);
        let (header, len) = match self.fs.read_prefix(&rel, chunk::HEADER_BYTES) {
            Ok(found) => found,
            Err(e) if is_remote_failure(&e) || local::Refusal::of(&e).is_some() => {
                return Err(io_error("read", self.chunk_path(id), e));
            }
            Err(e) => return Ok(Err(file_problem(&e))),
        };
        Ok(chunk::Header::parse(&header, len).map(|_| ()))
    }

    /// The entries of index page `page` of `index`.
    pub fn read_page(&self, index: &ObjectIndex, page: u64) -> Result<Vec<ChunkId>, StoreError> {
        let entries = index.entries_in_page(page);
        let Some(Some(id)) = usize::try_from(page).ok().and_then(|p| index.pages.get(p)) else {
            return Ok(vec![index::HOLE; usize::try_from(entries).unwrap_or(0)]);
        };
        let bytes = self.read_chunk(id, ChunkKind::IndexPage)?;
        index::decode_page(&bytes, entries).map_err(|e| StoreError::Damaged {
            path: self.chunk_path(id),
            detail: e.to_string(),
            store: self.root.clone(),
        })
    }

    /// The entries of index page `page` of `index`, with their bases (store format 3).
    pub(crate) fn read_page_with_bases(
        &self,
        index: &ObjectIndex,
        page: u64,
    ) -> Result<index::Page, StoreError> {
        let entries = index.entries_in_page(page);
        let Some(Some(id)) = usize::try_from(page).ok().and_then(|p| index.pages.get(p)) else {
            return Ok(index::Page::holes(usize::try_from(entries).unwrap_or(0)));
        };
        let bytes = self.read_chunk(id, ChunkKind::IndexPage)?;
        index::decode_page_with_bases(&bytes, entries).map_err(|e| StoreError::Damaged {
            path: self.chunk_path(id),
            detail: e.to_string(),
            store: self.root.clone(),
        })
    }

    /// A VM's manifest folder, inside the store.
    fn manifest_dir_rel(vm_uuid: &Uuid) -> PathBuf {
        Path::new("manifests").join(vm_uuid.hyphenated().to_string())
    }

    /// A manifest, inside the store.
    fn manifest_rel(vm_uuid: &Uuid, id: &str) -> PathBuf {
        Self::manifest_dir_rel(vm_uuid).join(format!("{id}.manifest"))
    }

    /// Path of a VM's manifest folder (as [`Store::root`] names the store).
    #[cfg(test)]
    fn manifest_dir(&self, vm_uuid: &Uuid) -> PathBuf {
        self.root.join(Self::manifest_dir_rel(vm_uuid))
    }

    /// Path of a manifest's file (as [`Store::root`] names the store).
    #[cfg(test)]
    fn manifest_path(&self, vm_uuid: &Uuid, id: &str) -> PathBuf {
        self.root.join(Self::manifest_rel(vm_uuid, id))
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
        rel: &Path,
        vm_uuid: &Uuid,
        id: &str,
    ) -> Result<Manifest, StoreError> {
        self.manifests_read
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.root.join(rel);
        let damaged = |detail: String| StoreError::Damaged {
            path: path.clone(),
            detail,
            store: self.root.clone(),
        };
        let bytes = self
            .fs
            .read_bounded(rel, manifest::MAX_MANIFEST_BYTES, &self.root)?;
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
            .map_err(|e| damaged(e.to_string()))?;
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
        let manifests = Path::new("manifests");
        for name in self.fs.list_names(manifests)? {
            let vm_dir = manifests.join(&name);
            let Ok(vm_uuid) = Uuid::parse_str(&name) else {
                catalog.unreadable.push((
                    self.root.join(&vm_dir),
                    StoreError::Damaged {
                        path: self.root.join(&vm_dir),
                        detail: "not a VM UUID".into(),
                        store: self.root.clone(),
                    },
                ));
                continue;
            };
            self.read_vm_dir(&vm_dir, &vm_uuid, &mut catalog)?;
        }
        catalog
            .checkpoints
            .sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(catalog)
    }

    /// The checkpoints of one VM (the part of [`Store::catalog`] that is about it): one
    /// folder read instead of all. A VM with no checkpoints here has an empty catalog.
    pub fn vm_catalog(&self, vm_uuid: &Uuid) -> Result<Catalog, StoreError> {
        let mut catalog = Catalog::default();
        let vm_dir = Path::new("manifests").join(vm_uuid.hyphenated().to_string());
        let there = self
            .fs
            .exists(&vm_dir)
            .map_err(|e| io_error("look at", self.root.join(&vm_dir), e))?;
        if there {
            self.read_vm_dir(&vm_dir, vm_uuid, &mut catalog)?;
        }
        catalog
            .checkpoints
            .sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(catalog)
    }

    /// Reads the manifests in one VM's folder into `catalog`.
    fn read_vm_dir(
        &self,
        vm_dir: &Path,
        vm_uuid: &Uuid,
        catalog: &mut Catalog,
    ) -> Result<(), StoreError> {
        for file_name in self.fs.list_names(vm_dir)? {
            let Some(id) = file_name.strip_suffix(".manifest") else {
                continue;
            };
            let file = vm_dir.join(&file_name);
            match self.read_manifest_file(&file, vm_uuid, id) {
                Ok(m) => catalog.checkpoints.push(m),
                // Not the manifest's fault: the whole listing fails.
                Err(e) if e.is_connection_failure() => return Err(e),
                Err(e) => catalog.unreadable.push((self.root.join(&file), e)),
            }
        }
        Ok(())
    }

    /// How many manifest files this handle has read: every one costs a read (a round trip
    /// over SSH), so jobs read each once. For diagnostics and tests.
    #[must_use]
    pub fn manifests_read(&self) -> u64 {
        self.manifests_read
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One checkpoint of one VM.
    pub fn manifest(&self, vm_uuid: &Uuid, id: &str) -> Result<Manifest, StoreError> {
        manifest::check_name("checkpoint id", id)?;
        let rel = Self::manifest_rel(vm_uuid, id);
        if !self
            .fs
            .exists(&rel)
            .map_err(|e| io_error("look at", self.root.join(&rel), e))?
        {
            return Err(StoreError::NoSuchCheckpoint {
                id: id.to_owned(),
                store: self.root.clone(),
            });
        }
        self.read_manifest_file(&rel, vm_uuid, id)
    }

    /// Removes a checkpoint's manifest (its chunks go at the next garbage collection).
    pub fn delete_checkpoint(&self, vm_uuid: &Uuid, id: &str) -> Result<(), StoreError> {
        manifest::check_name("checkpoint id", id)?;
        let rel = Self::manifest_rel(vm_uuid, id);
        match self.fs.remove_file(&rel) {
            Ok(()) => self.fs.sync_dir(&Self::manifest_dir_rel(vm_uuid)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::NoSuchCheckpoint {
                    id: id.to_owned(),
                    store: self.root.clone(),
                })
            }
            Err(e) => Err(io_error("remove", self.root.join(&rel), e)),
        }
    }

    /// Removes what killed writers left in `tmp/`. Needs the exclusive lock.
    fn clean_leftovers(&self, _exclusive: &StoreLock) -> Result<(u64, u64), StoreError> {
        // Chunks that a writer dropped without its commit left through this handle go too.
        *self.pending() = Pending::default();
        let tmp = Self::tmp_dir();
        let entries = self.fs.list(tmp)?;
        let files: Vec<PathBuf> = entries.iter().map(|e| tmp.join(&e.name)).collect();
        let (mut removed, mut bytes) = (0, 0);
        for (entry, result) in entries.iter().zip(self.fs.remove_files(&files)) {
            match result {
                Ok(()) => {
                    removed += 1;
                    bytes += entry.len;
                }
                Err(e) if is_remote_failure(&e) => {
                    return Err(io_error("remove", self.root.join(tmp), e));
                }
                Err(e) => tracing::warn!(
                    "could not remove {}: {e}",
                    self.root.join(tmp).join(&entry.name).display()
                ),
            }
        }
        Ok((removed, bytes))
    }

    /// Takes the store lock (see [`StoreLock`]; on another host, lock files). With `wait`,
    /// a lock held by others is waited for, unless that control fails when busy.
    pub(crate) fn lock(
        &self,
        mode: LockMode,
        purpose: &str,
        wait: Option<&crate::progress::Control>,
    ) -> Result<StoreLock, StoreError> {
        let wait = wait.filter(|control| control.waits_when_busy());
        StoreLock::acquire_in(&self.fs, &self.root, mode, purpose, wait)
    }

    /// Takes the shared lock for writing, first cleaning leftovers if nobody else is in.
    pub(crate) fn lock_for_writing(
        &self,
        purpose: &str,
        control: &crate::progress::Control,
    ) -> Result<StoreLock, StoreError> {
        self.refuse_plaintext_into_encrypted()?;
        self.upgrade_format()?;
        if let Some(mut lock) = StoreLock::try_exclusive_in(&self.fs, &self.root, purpose)? {
            let (removed, bytes) = self.clean_leftovers(&lock)?;
            if removed > 0 {
                tracing::info!("removed {removed} files ({bytes} bytes) that killed writers left");
            }
            lock.downgrade()?;
            return Ok(lock);
        }
        self.lock(LockMode::Shared, purpose, Some(control))
    }
}

impl Store {
    /// Writes `config` as the store's header, atomically, with its MAC (computed here) in
    /// an encrypted store.
    fn write_header(&self, config: &mut StoreConfig) -> Result<(), StoreError> {
        if let Some(keys) = &self.keys {
            config.mac_hex = Some(hex::encode(keys.header_mac(&config.authenticated_bytes())));
        }
        self.fs.write_atomic(
            Self::tmp_dir(),
            Path::new(config::CONFIG_FILE),
            &config.to_json(),
        )
    }

    /// Upgrades a store of an older format to the current one before it is first written
    /// to: only the header's version changes (written atomically; an encrypted header gets
    /// its MAC again), since everything the older format holds is read as it is. From then
    /// on an older Rewind refuses the store (asking to be updated) instead of misreading a
    /// patch.
    fn upgrade_format(&self) -> Result<(), StoreError> {
        if self.format_version() >= config::FORMAT_VERSION {
            return Ok(());
        }
        let mut config = self.config.clone();
        let from = config.version;
        config.version = config::FORMAT_VERSION;
        // An encrypted header keeps its MAC (recomputed). One from before headers had a MAC
        // (that could not be given one when opened) stays as it is until it has one.
        if self.keys.is_some() && config.mac_hex.is_none() {
            return Ok(());
        }
        self.write_header(&mut config)?;
        self.version
            .store(config::FORMAT_VERSION, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            "upgraded the store at {} from format {from} to {}",
            self.root.display(),
            config::FORMAT_VERSION
        );
        Ok(())
    }
}

/// What an encrypted store's key is wrapped with (besides the passphrase): its ID, and for a
/// store whose header has a MAC a mark of it (`FORMAT.md`, "Encryption").
fn key_context(id: &Uuid, header_mac: bool) -> Vec<u8> {
    let mut context = id.as_bytes().to_vec();
    if header_mac {
        context.extend_from_slice(b" rewind-store header mac");
    }
    context
}

/// Checks an encrypted store's header against its MAC. A header without one is refused when
/// the key says the store has one (`required`); otherwise it is from a Rewind that did not
/// write one yet (it gets one, see [`Store::authenticate_legacy_header`]).
fn check_header_mac(
    config: &StoreConfig,
    keys: &Keys,
    root: &Path,
    required: bool,
) -> Result<(), StoreError> {
    let tampered = |detail: &str| StoreError::HeaderTampered {
        path: root.to_path_buf(),
        detail: detail.to_owned(),
    };
    let Some(mac_hex) = &config.mac_hex else {
        if required {
            return Err(tampered("its MAC was removed"));
        }
        tracing::info!(
            "the header of the store at {} has no MAC yet (made by an older Rewind)",
            root.display()
        );
        return Ok(());
    };
    let found: [u8; 32] = hex::decode(mac_hex)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| tampered("its MAC is not 64 hexadecimal digits"))?;
    let expected = keys.header_mac(&config.authenticated_bytes());
    // Constant time is not needed (the MAC is no secret), but costs nothing.
    if blake3::Hash::from(found) == blake3::Hash::from(expected) {
        Ok(())
    } else {
        Err(tampered(
            "its MAC does not match its content (format, version, ID, chunk size or encryption \
             settings were changed)",
        ))
    }
}

impl Store {
    /// Gives the header of an encrypted store made before headers had a MAC its MAC, and
    /// wraps its key again with the context that says so (same passphrase, same cost, a new
    /// salt), written atomically. Best effort: a store that cannot be written now (a
    /// read-only drive) stays as it was and gets it another time.
    fn authenticate_legacy_header(&mut self, passphrase: &[u8]) {
        let Some(keys) = &self.keys else {
            return;
        };
        let Some(enc) = &self.config.encryption else {
            return;
        };
        let cost = KdfCost {
            memory_kib: enc.kdf_memory_kib,
            iterations: enc.kdf_iterations,
            parallelism: enc.kdf_parallelism,
        };
        let upgraded = keys
            .wrap(passphrase, &key_context(&self.config.id, true), cost)
            .map_err(|e| StoreError::Invalid(e.to_string()))
            .and_then(|encryption| {
                let mut config = self.config.clone();
                config.encryption = Some(encryption);
                self.write_header(&mut config)?;
                Ok(config)
            });
        match upgraded {
            Ok(config) => {
                self.config = config;
                tracing::info!(
                    "added a MAC to the header of the store at {}",
                    self.root.display()
                );
            }
            Err(e) => tracing::warn!(
                "the header of the store at {} keeps no MAC for now: {e}",
                self.root.display()
            ),
        }
    }

    /// Refuses to write into a store whose header says "not encrypted" when its manifests
    /// (or, with none, a chunk) are encrypted: a header edited to downgrade the store must
    /// not turn the next checkpoint into plaintext.
    fn refuse_plaintext_into_encrypted(&self) -> Result<(), StoreError> {
        if self.keys.is_some() {
            return Ok(());
        }
        let encrypted = |found: &Path| StoreError::EncryptedContent {
            path: self.root.clone(),
            found: self.root.join(found),
        };
        let manifests = Path::new("manifests");
        let mut any_manifest = false;
        for vm in self.fs.list_names(manifests)? {
            let dir = manifests.join(vm);
            let Some(name) = self
                .fs
                .list_names(&dir)?
                .into_iter()
                .find(|n| n.ends_with(".manifest"))
            else {
                continue;
            };
            any_manifest = true;
            let file = dir.join(name);
            let (prefix, _) = self
                .fs
                .read_prefix(&file, 4)
                .map_err(|e| io_error("read", self.root.join(&file), e))?;
            if prefix == b"RWME" {
                return Err(encrypted(&file));
            }
        }
        if any_manifest {
            return Ok(());
        }
        let chunks = Path::new("chunks");
        let Some(prefix) = self.fs.list_names(chunks)?.into_iter().next() else {
            return Ok(());
        };
        let dir = chunks.join(prefix);
        let Some(name) = self.fs.list_names(&dir)?.into_iter().next() else {
            return Ok(());
        };
        let file = dir.join(name);
        let (header, len) = self
            .fs
            .read_prefix(&file, chunk::HEADER_BYTES)
            .map_err(|e| io_error("read", self.root.join(&file), e))?;
        match chunk::Header::parse(&header, len) {
            Ok(h) if h.encrypted => Err(encrypted(&file)),
            _ => Ok(()),
        }
    }

    /// The file that holds the proof of destination secret `secret`, inside the store.
    fn proof_rel(secret: &[u8]) -> PathBuf {
        let name = blake3::derive_key("rewind-store 2026-12 proof name", secret);
        Path::new(PROOFS_DIR).join(hex::encode(&name[..8]))
    }

    /// What the proof of `secret` for this store is.
    fn proof_of(&self, secret: &[u8]) -> String {
        let key = zeroize::Zeroizing::new(blake3::derive_key("rewind-store 2026-12 proof", secret));
        hex::encode(blake3::keyed_hash(&key, self.config.id.as_bytes()).as_bytes()) + "\n"
    }

    /// Writes the proof that a destination with secret `secret` knows this store (see
    /// `FORMAT.md`, "Proofs"): another store given this one's ID lacks it.
    pub fn write_proof(&self, secret: &[u8]) -> Result<(), StoreError> {
        self.fs.create_dir_durable(Path::new(PROOFS_DIR))?;
        self.fs.write_atomic(
            Self::tmp_dir(),
            &Self::proof_rel(secret),
            self.proof_of(secret).as_bytes(),
        )
    }

    /// Whether this store holds the proof of `secret`: `Err` with what is wrong if not.
    pub fn check_proof(&self, secret: &[u8]) -> Result<(), String> {
        let rel = Self::proof_rel(secret);
        match self.fs.read_bounded(&rel, 1024, &self.root) {
            Ok(found) if found == self.proof_of(secret).as_bytes() => Ok(()),
            Ok(_) => Err(format!("{} does not match", self.root.join(&rel).display())),
            Err(e) => Err(format!("{e}")),
        }
    }
}

/// Where proofs of destinations are kept (`FORMAT.md`, "Proofs").
const PROOFS_DIR: &str = "proofs";

/// What a failure to open or read a chunk's file says about the chunk.
fn file_problem(e: &std::io::Error) -> ChunkProblem {
    if e.kind() == std::io::ErrorKind::NotFound {
        ChunkProblem::Missing
    } else {
        ChunkProblem::Unreadable(e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests;
