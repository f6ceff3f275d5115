//! Flat copies (store format 3): the newest checkpoint of each VM kept readable one file
//! per slot, however long its chains of patches are.
//!
//! An incremental stores a slot that changed a little as a patch over the slot's previous
//! entry ([`super::patch`]), so reading the newest checkpoint of a long series opens, for
//! such a slot, the patch and every base under it (up to [`super::pieces::WRITE_CHAIN`]
//! patches and a whole chunk). [`Store::compact`] writes, for every patch that the newest
//! checkpoint of some VM holds, a *flat copy*: the patch's whole content as an ordinary
//! data chunk, in `flat/`, named after the patch. Reads of a patch take its flat copy when
//! there is a sound one, and its chain otherwise; nothing else refers to a flat copy, so
//! one that is missing, damaged or stale costs only time. Flat copies are a cache: the
//! next compaction removes those no newest checkpoint holds any more, and garbage
//! collection those of patches no checkpoint holds. See `FORMAT.md`, "Flat copies".

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::backend::{Backend, Durability, is_remote_failure};
use super::chunk::{self, ChunkId, ChunkKind, ChunkProblem, ReadAt};
use super::error::{StoreError, io_error};
use super::patch;
use super::pieces::ChunkFile;
use super::{LockMode, Store};
use crate::progress::Control;

/// The first bytes of a flat copy: what it is, and the version of its layout.
const MAGIC: &[u8; 8] = b"RWFLAT\x00\x01";

/// The flat copy's prefix: [`MAGIC`] and the content's name, then the chunk file.
const PREFIX_BYTES: usize = MAGIC.len() + 32;

/// The folder of flat copies, inside the store.
const DIR: &str = "flat";

/// The shortest chain of bases a patch must have for [`Store::compact`] to keep a flat
/// copy of it: every patch (a patch over a whole chunk is read from two files, its flat
/// copy from one). Measured in `core/BENCHMARKS.md`, "Flat copies".
pub const FLAT_FROM_DEPTH: usize = 1;

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactReport {
    /// Patches of the newest checkpoints that have a flat copy now.
    pub copies: u64,
    /// Flat copies written by this compaction.
    pub written: u64,
    /// Bytes those added.
    pub bytes_written: u64,
    /// Flat copies removed (no newest checkpoint holds their patch any more).
    pub removed: u64,
    /// Bytes those held.
    pub bytes_removed: u64,
    /// Patches left without a flat copy because they (or a base) could not be read:
    /// verification says more.
    pub unreadable: u64,
}

/// A flat copy's file seen from past its prefix, as the chunk file it holds.
struct Inner<'a>(&'a ChunkFile);

impl ReadAt for Inner<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset + PREFIX_BYTES as u64)
    }
}

impl Store {
    /// The flat copy of patch `id`, inside the store.
    fn flat_rel(id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        Path::new(DIR).join(&hex[..4]).join(hex)
    }

    /// Opens the flat copy of patch `id` (over `base`): the file and the content's name,
    /// checked to be the content of `id` (a patch's name binds its content and its base).
    /// `None` when there is none, or it is not what it should be (then the patch is read).
    fn open_flat(&self, id: &ChunkId, base: &ChunkId) -> Option<(ChunkFile, ChunkId)> {
        let rel = Self::flat_rel(id);
        let file = match self.open_data_file(&rel) {
            Ok(Ok(file)) => file,
            Ok(Err(ChunkProblem::Missing)) => return None,
            Ok(Err(problem)) => {
                tracing::warn!("flat copy {}: {problem}; reading the patch", rel.display());
                return None;
            }
            Err(e) => {
                tracing::warn!("flat copy {}: {e}; reading the patch", rel.display());
                return None;
            }
        };
        let mut prefix = [0; PREFIX_BYTES];
        if file.len() < PREFIX_BYTES as u64
            || file.read_exact_at(&mut prefix, 0).is_err()
            || !prefix.starts_with(MAGIC)
        {
            tracing::warn!("flat copy {} is not one; reading the patch", rel.display());
            return None;
        }
        let Some(content) = flat_content(&prefix, id, base, self.keys.as_ref()) else {
            tracing::warn!(
                "flat copy {} holds another content; reading the patch",
                rel.display()
            );
            return None;
        };
        Some((file, content))
    }

    /// Reads what `ranges` need (all of it when empty) of the content of patch `id` (over
    /// `base`) from its flat copy into `out`, as [`chunk::decode_ranges`] does. False when
    /// there is no sound flat copy: the caller reads the patch.
    fn read_flat(
        &self,
        id: &ChunkId,
        base: &ChunkId,
        ranges: &[(u64, u64)],
        out: &mut Vec<u8>,
    ) -> bool {
        let Some((file, content)) = self.open_flat(id, base) else {
            return false;
        };
        match decode_flat(&file, &content, self.keys.as_ref(), ranges, out) {
            Ok(()) => true,
            Err(problem) => {
                tracing::warn!(
                    "flat copy {}: {problem}; reading the patch",
                    Self::flat_rel(id).display()
                );
                false
            }
        }
    }

    /// Checks the flat copy of patch `id` (over `base`) whole, as a read would, and removes
    /// it when it fails (the next compaction writes it again). Whether there was one that
    /// failed, and was removed.
    pub(crate) fn check_flat(&self, id: &ChunkId, base: &ChunkId) -> Result<bool, StoreError> {
        let rel = Self::flat_rel(id);
        if !self.fs.exists(&rel).unwrap_or(false) || self.read_flat(id, base, &[], &mut Vec::new())
        {
            return Ok(false);
        }
        match self.fs.remove_file(&rel) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("remove", self.root.join(&rel), e)),
        }
    }

    /// Reads the whole content of data entry `id` (with its chain of bases `chain`, from
    /// its index page): from the patch's flat copy when it has a sound one, otherwise as
    /// [`Store::read_chunk`] does.
    pub(crate) fn read_entry(
        &self,
        id: &ChunkId,
        chain: &[ChunkId],
    ) -> Result<Vec<u8>, StoreError> {
        if let Some(base) = chain.first() {
            let mut out = Vec::new();
            if self.read_flat(id, base, &[], &mut out) {
                return Ok(out);
            }
        }
        self.read_chunk(id, ChunkKind::Data)
    }

    /// [`Store::read_chunk_ranges`] for data entry `id` with its chain of bases `chain`:
    /// from the patch's flat copy when it has a sound one.
    pub(crate) fn read_entry_ranges(
        &self,
        id: &ChunkId,
        chain: &[ChunkId],
        ranges: &[(u64, u64)],
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        if let Some(base) = chain.first()
            && !ranges.is_empty()
            && self.read_flat(id, base, ranges, out)
        {
            return Ok(());
        }
        self.read_chunk_ranges(id, ranges, out)
    }

    /// Has the kernel fetch the files a read of entry `id` (chain `chain`) will open: the
    /// flat copy of a patch that has one, otherwise the entry and its chain. Only a hint.
    pub(crate) fn prefetch_entry(&self, id: &ChunkId, chain: &[ChunkId]) {
        if !chain.is_empty() && self.fs.prefetch(&Self::flat_rel(id)) {
            return;
        }
        for id in std::iter::once(id).chain(chain) {
            self.prefetch_chunk(id);
        }
    }

    /// Keeps a flat copy of every patch the newest checkpoint of each VM holds
    /// ([`FLAT_FROM_DEPTH`]), so that restoring it reads one file per slot, and removes
    /// the flat copies of patches no newest checkpoint holds any more. Holds the store
    /// lock as a writer does; cancellable. Never touches a chunk, an index or a manifest.
    pub fn compact(&self, control: &Control) -> Result<CompactReport, StoreError> {
        self.compact_from_depth(FLAT_FROM_DEPTH, control)
    }

    /// [`Store::compact`], for patches at least `depth` (≥ 1) deep only: the benchmark's
    /// lever.
    #[doc(hidden)]
    pub fn compact_from_depth(
        &self,
        depth: usize,
        control: &Control,
    ) -> Result<CompactReport, StoreError> {
        let lock = self.lock(
            LockMode::Shared,
            "keeping flat copies of the newest checkpoints",
            Some(control),
        )?;
        let mut report = CompactReport::default();
        if !self.takes_patches() {
            return Ok(report); // no patches before store format 3
        }
        let wanted = self.newest_patches(depth.max(1), control)?;
        report.copies = wanted.len() as u64;
        if !wanted.is_empty() {
            match self.fs.create_dir(Path::new(DIR)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("create", self.root.join(DIR), e)),
            }
        }
        control.add_total_bytes(wanted.len() as u64 * u64::from(self.chunk_size_bytes()));
        let mut content = Vec::new();
        for (id, base) in &wanted {
            control.check()?;
            if self.flat_is_whole(id, base) {
                control.add_done_bytes(u64::from(self.chunk_size_bytes()));
                continue;
            }
            let read = match self.open_chunk(id)?.and_then(ChunkFile::into_bytes) {
                Ok(file) => self.read_patch(&file, id, None, &mut content),
                Err(problem) => Ok(Err(problem)),
            };
            let patch = match read {
                Ok(Ok(patch)) if patch.base == *base => patch,
                // A damaged patch or base: no flat copy (verification says more).
                Ok(Ok(_) | Err(_)) | Err(StoreError::BadChunk { .. }) => {
                    report.unreadable += 1;
                    report.copies -= 1;
                    continue;
                }
                // The store is out of reach, or refuses something: that ends it.
                Err(e) => return Err(e),
            };
            let mut bytes = Vec::with_capacity(PREFIX_BYTES + content.len() / 2);
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&patch.content.0);
            bytes.extend(chunk::encode(
                ChunkKind::Data,
                &patch.content,
                &content,
                self.keys.as_ref(),
                Some(&patch.tree),
            )?);
            self.put_flat(id, &bytes)?;
            report.written += 1;
            report.bytes_written += bytes.len() as u64;
            control.add_done_bytes(u64::from(self.chunk_size_bytes()));
        }
        lock.check_held()?;
        self.publish_chunks(control)?;
        let (removed, bytes_removed) =
            self.remove_flat_except(|id| wanted.contains_key(id), control)?;
        report.removed = removed;
        report.bytes_removed = bytes_removed;
        Ok(report)
    }

    /// The patches (with their nearest base) that the newest checkpoint of each VM holds
    /// over a chain at least `depth` deep.
    fn newest_patches(
        &self,
        depth: usize,
        control: &Control,
    ) -> Result<BTreeMap<ChunkId, ChunkId>, StoreError> {
        let catalog = self.catalog()?;
        // The catalog is in time order: the last of each VM is its newest.
        let mut newest = HashMap::new();
        for m in &catalog.checkpoints {
            newest.insert(m.vm.uuid, m);
        }
        let mut wanted = BTreeMap::new();
        for m in newest.values() {
            for index in m.indexes() {
                for page in 0..index.page_count() {
                    control.check()?;
                    let page = self.read_page_with_bases(index, page)?;
                    for (id, chain) in page.ids.iter().zip(&page.chains) {
                        if chain.len() >= depth {
                            wanted.insert(*id, chain[0]);
                        }
                    }
                }
            }
        }
        Ok(wanted)
    }

    /// Whether the flat copy of patch `id` (over `base`) is there, for that patch, with a
    /// sound chunk header and the length it announces (its pieces are checked as read).
    fn flat_is_whole(&self, id: &ChunkId, base: &ChunkId) -> bool {
        let Ok((head, len)) = self
            .fs
            .read_prefix(&Self::flat_rel(id), PREFIX_BYTES + chunk::HEADER_BYTES)
        else {
            return false;
        };
        head.len() == PREFIX_BYTES + chunk::HEADER_BYTES
            && flat_content(&head, id, base, self.keys.as_ref()).is_some()
            && chunk::Header::parse(&head[PREFIX_BYTES..], len - PREFIX_BYTES as u64).is_ok()
    }

    /// Writes the flat copy `bytes` of patch `id`: locally under `tmp/`, named at
    /// [`Store::publish_chunks`]; over SFTP durable and named at once.
    fn put_flat(&self, id: &ChunkId, bytes: &[u8]) -> Result<(), StoreError> {
        let rel = Self::flat_rel(id);
        let tmp = Path::new("tmp").join(self.fs.temp_name("flat"));
        match &self.fs {
            Backend::Local(_) => {
                self.fs.write_new(&tmp, bytes, Durability::AtCommit)?;
                self.pending().files.push((tmp, rel));
            }
            Backend::Sftp(remote) => remote
                .put_file(&tmp, &rel, bytes, true)
                .map_err(|e| io_error("store flat copy", self.root.join(&rel), e))?,
        }
        Ok(())
    }

    /// Removes every flat copy but those of the patches `keep` says, and anything else in
    /// `flat/` that is not a flat copy's name. Returns how many files, and their bytes.
    pub(crate) fn remove_flat_except(
        &self,
        keep: impl Fn(&ChunkId) -> bool,
        control: &Control,
    ) -> Result<(u64, u64), StoreError> {
        let dir = Path::new(DIR);
        if !self.fs.is_dir(dir).unwrap_or(false) {
            return Ok((0, 0));
        }
        let (mut removed, mut bytes) = (0, 0);
        for prefix in self.fs.list_names(dir)? {
            control.check()?;
            let prefix = dir.join(prefix);
            if !self.fs.is_dir(&prefix).unwrap_or(false) {
                continue;
            }
            let mut gone = Vec::new();
            for name in self.fs.list_names(&prefix)? {
                if ChunkId::from_hex(&name).is_some_and(|id| keep(&id)) {
                    continue;
                }
                let path = prefix.join(&name);
                let len = self.fs.len(&path).unwrap_or(0);
                gone.push((path, len));
            }
            let paths: Vec<PathBuf> = gone.iter().map(|(p, _)| p.clone()).collect();
            for ((path, len), result) in gone.iter().zip(self.fs.remove_files(&paths)) {
                match result {
                    Ok(()) => {
                        removed += 1;
                        bytes += len;
                    }
                    Err(e) if is_remote_failure(&e) => {
                        return Err(io_error("remove", self.root.join(path), e));
                    }
                    Err(e) => tracing::warn!("could not remove {}: {e}", path.display()),
                }
            }
        }
        Ok((removed, bytes))
    }
}

/// The content id a flat copy's first bytes `prefix` name, if they are a flat copy's
/// prefix and the content is that of patch `id` over `base` (whose name binds the two).
fn flat_content(
    prefix: &[u8],
    id: &ChunkId,
    base: &ChunkId,
    keys: Option<&super::crypto::Keys>,
) -> Option<ChunkId> {
    let content = ChunkId(prefix.get(MAGIC.len()..PREFIX_BYTES)?.try_into().ok()?);
    (prefix.starts_with(MAGIC) && patch::name(&content, base, keys) == *id).then_some(content)
}

/// Decodes what `ranges` need (all of it when empty) of flat copy `file`, whose prefix
/// names `content` (checked by [`flat_content`]), into `out`: the chunk after the prefix,
/// read and checked as a whole data chunk named `content` is.
fn decode_flat(
    file: &ChunkFile,
    content: &ChunkId,
    keys: Option<&super::crypto::Keys>,
    ranges: &[(u64, u64)],
    out: &mut Vec<u8>,
) -> Result<(), ChunkProblem> {
    let len = file
        .len()
        .checked_sub(PREFIX_BYTES as u64)
        .ok_or_else(|| ChunkProblem::Truncated("shorter than a flat copy's prefix".into()))?;
    chunk::decode_ranges(&Inner(file), len, content, keys, ranges, out).map(drop)
}

/// A flat copy's file as the fuzzer gives it (`fuzzing.rs`), read as the copy of patch
/// `id` over `base` (`None`: of the patch its prefix names over `base`, as whoever wrote
/// the store could name it). Whether it decoded.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_flat(
    file: &[u8],
    id: Option<&ChunkId>,
    base: &ChunkId,
    keys: Option<&super::crypto::Keys>,
) -> bool {
    let named = file
        .get(MAGIC.len()..PREFIX_BYTES)
        .and_then(|c| c.try_into().ok())
        .map(|c| patch::name(&ChunkId(c), base, keys));
    let Some(id) = id.copied().or(named) else {
        return false;
    };
    let Some(content) = flat_content(file, &id, base, keys) else {
        return false;
    };
    decode_flat(
        &ChunkFile::Bytes(file.to_vec()),
        &content,
        keys,
        &[],
        &mut Vec::new(),
    )
    .is_ok()
}
