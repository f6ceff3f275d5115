//! Reading and writing data a piece at a time (store format 3): patches over bases, and
//! what an incremental needs to store only the pieces that changed.
//!
//! Every data entry of an index is a whole chunk or a patch ([`super::patch`]); its
//! content is the same either way, and everything that reads data ([`Store::read_chunk`],
//! [`Store::read_chunk_ranges`]) resolves a patch over its base by itself.

use std::fs::File;

use super::Store;
use super::backend::is_remote_failure;
use super::chunk::{self, ChunkId, ChunkKind, ChunkProblem, Cv, PIECE_BYTES, ReadAt};
use super::error::{StoreError, io_error};
use super::index::HOLE;
use super::local;
use super::patch::{self, Patch};

/// A chunk file opened for reading: on a local drive an open file, over SFTP its bytes.
pub(crate) enum ChunkFile {
    /// An open file and its length.
    Local(File, u64),
    /// The whole file.
    Bytes(Vec<u8>),
}

impl ReadAt for ChunkFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            Self::Local(file, _) => file.read_exact_at(buf, offset),
            Self::Bytes(bytes) => bytes[..].read_exact_at(buf, offset),
        }
    }
}

impl ChunkFile {
    /// The file's length.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Self::Local(_, len) => *len,
            Self::Bytes(bytes) => bytes.len() as u64,
        }
    }

    /// Whether it is a patch.
    pub(crate) fn is_patch(&self) -> bool {
        let mut head = [0; 5];
        self.read_exact_at(&mut head, 0).is_ok() && chunk::is_patch(&head)
    }

    /// The whole file (a patch is at most half a chunk and some).
    pub(crate) fn into_bytes(self) -> Result<Vec<u8>, ChunkProblem> {
        match self {
            Self::Bytes(bytes) => Ok(bytes),
            Self::Local(file, len) => {
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&n| n <= chunk::HEADER_BYTES + 2 * chunk::MAX_CHUNK_BYTES)
                    .ok_or_else(|| ChunkProblem::BadHeader(format!("{len} bytes is too long")))?;
                let mut bytes = vec![0; len];
                file.read_exact_at(&mut bytes, 0)
                    .map_err(|e| ChunkProblem::Unreadable(e.to_string()))?;
                Ok(bytes)
            }
        }
    }
}

/// What the writer knows of a data entry it may store the next content of a slot over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Known {
    /// The entry: a whole chunk's name, or a patch's.
    pub entry: ChunkId,
    /// Its chain of bases, nearest first (empty for a whole chunk).
    pub chain: Vec<ChunkId>,
    /// The name of the content.
    pub content: ChunkId,
    /// The content's piece tree.
    pub tree: Vec<Cv>,
}

/// Where a slot's content was stored, and what that added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    /// The entry ([`HOLE`] for zeros).
    pub id: ChunkId,
    /// Its chain of bases if it is a patch, nearest first; empty otherwise.
    pub chain: Vec<ChunkId>,
    /// Bytes added to the store (0 when it was there).
    pub added: u64,
}

impl Stored {
    pub(crate) fn hole() -> Self {
        Self::whole(HOLE, 0)
    }

    fn whole(id: ChunkId, added: u64) -> Self {
        Self {
            id,
            chain: Vec::new(),
            added,
        }
    }

    fn kept(known: &Known) -> Self {
        Self {
            id: known.entry,
            chain: known.chain.clone(),
            added: 0,
        }
    }
}

/// The longest chain of patches the writer makes: a patch over a patch over … over a whole
/// chunk, at most this many patches; the next change to the slot stores it whole. A read
/// of a slot opens at most this many patches and one whole chunk (measured in
/// `core/BENCHMARKS.md`, "Patches").
pub const WRITE_CHAIN: usize = 8;

impl Store {
    /// Opens chunk `id` for reading. The inner error is the chunk's problem (missing,
    /// unreadable); the outer one a failure to reach the store, or something in the store
    /// to refuse (a link where the chunk should be).
    pub(crate) fn open_chunk(
        &self,
        id: &ChunkId,
    ) -> Result<Result<ChunkFile, ChunkProblem>, StoreError> {
        self.open_data_file(&Self::chunk_rel(id))
    }

    /// Opens data file `rel` (a chunk, or a flat copy) for reading, as
    /// [`Store::open_chunk`] does.
    pub(crate) fn open_data_file(
        &self,
        rel: &std::path::Path,
    ) -> Result<Result<ChunkFile, ChunkProblem>, StoreError> {
        if let Some(root) = self.fs.local_root() {
            let opened = match root.open_read(rel) {
                Err(e) if local::Refusal::of(&e).is_some() => {
                    return Err(io_error("read", self.root.join(rel), e));
                }
                other => other,
            };
            Ok(opened
                .and_then(|f| {
                    let len = f.metadata()?.len();
                    Ok(ChunkFile::Local(f, len))
                })
                .map_err(|e| super::file_problem(&e)))
        } else {
            let max = (chunk::HEADER_BYTES + chunk::MAX_CHUNK_BYTES * 2) as u64;
            match self.fs.read(rel, max) {
                Ok(bytes) => Ok(Ok(ChunkFile::Bytes(bytes))),
                Err(e) if is_remote_failure(&e) => Err(io_error("read", self.root.join(rel), e)),
                Err(e) => Ok(Err(super::file_problem(&e))),
            }
        }
    }

    /// Reads the pieces `wanted` (sorted; all when `None`) of the content of patch `id`
    /// (its whole `file`) into `out`, set to the content's length: those the patch holds
    /// from it, the others from its base (a patch in turn, or a whole chunk), each checked
    /// against the content's tree. The inner error is the patch's problem; a problem of a
    /// base is the outer error, which names the base.
    pub(crate) fn read_patch(
        &self,
        file: &[u8],
        id: &ChunkId,
        wanted: Option<&[usize]>,
        out: &mut Vec<u8>,
    ) -> Result<Result<Patch, ChunkProblem>, StoreError> {
        self.read_patch_at(file, id, wanted, out, 0)
    }

    fn read_patch_at(
        &self,
        file: &[u8],
        id: &ChunkId,
        wanted: Option<&[usize]>,
        out: &mut Vec<u8>,
        depth: usize,
    ) -> Result<Result<Patch, ChunkProblem>, StoreError> {
        let patch = match Patch::parse(file, id, self.keys.as_ref()) {
            Ok(patch) => patch,
            Err(problem) => return Ok(Err(problem)),
        };
        if depth >= super::index::MAX_CHAIN {
            return Ok(Err(ChunkProblem::BadHeader(format!(
                "it is over a chain of more than {} patches",
                super::index::MAX_CHAIN
            ))));
        }
        out.resize(patch.content_len(), 0);
        let all: Vec<usize> = (0..patch.tree.len()).collect();
        let wanted = wanted.unwrap_or(&all);
        if wanted.iter().any(|&k| k >= patch.tree.len()) {
            return Ok(Err(ChunkProblem::BadHeader(format!(
                "it holds {} bytes, fewer than the pieces to read need",
                patch.content_len()
            ))));
        }
        let missing = match patch.read_pieces(wanted, out) {
            Ok(missing) => missing,
            Err(problem) => return Ok(Err(problem)),
        };
        if missing.is_empty() {
            return Ok(Ok(patch));
        }
        let base_problem = |problem| StoreError::BadChunk {
            chunk: patch.base.to_hex(),
            problem,
            store: self.root.clone(),
        };
        let base = self.open_chunk(&patch.base)?.map_err(base_problem)?;
        let base_tree = if base.is_patch() {
            let bytes = base.into_bytes().map_err(base_problem)?;
            let inner = self.read_patch_at(&bytes, &patch.base, Some(&missing), out, depth + 1)?;
            let inner = inner.map_err(base_problem)?;
            if inner.content_len() != patch.content_len() {
                return Err(base_problem(ChunkProblem::BadHeader(
                    "it is not as long as the patch over it".into(),
                )));
            }
            inner.tree
        } else {
            let mut head = [0; chunk::HEADER_BYTES];
            base.read_exact_at(&mut head, 0)
                .map_err(|e| base_problem(ChunkProblem::Truncated(e.to_string())))?;
            let header = chunk::Header::parse(&head, base.len()).map_err(base_problem)?;
            if header.plain_len as usize != patch.content_len() || header.kind != ChunkKind::Data {
                return Err(base_problem(ChunkProblem::BadHeader(
                    "it is not a data chunk of its patch's length".into(),
                )));
            }
            chunk::read_tree_pieces(
                &base,
                header,
                &patch.base,
                self.keys.as_ref(),
                &missing,
                out,
            )
            .map_err(base_problem)?
        };
        // The pieces the patch does not hold must be its base's: otherwise the patch is
        // wrong about them.
        if missing.iter().any(|&k| base_tree[k] != patch.tree[k]) {
            return Ok(Err(ChunkProblem::HashMismatch));
        }
        Ok(Ok(patch))
    }

    /// Checks a data chunk file by itself (as verification does): a whole chunk decoded
    /// and checked against its name; a patch parsed and every piece it holds checked,
    /// without its base. Returns the patch's base ([`HOLE`] for a whole chunk).
    pub(crate) fn check_data_chunk(
        &self,
        id: &ChunkId,
    ) -> Result<Result<ChunkId, ChunkProblem>, StoreError> {
        let file = match self.open_chunk(id)?.and_then(ChunkFile::into_bytes) {
            Ok(file) => file,
            Err(problem) => return Ok(Err(problem)),
        };
        if !chunk::is_patch(&file) {
            return Ok(chunk::decode(file, ChunkKind::Data, id, self.keys.as_ref()).map(|_| HOLE));
        }
        Ok(
            Patch::parse(&file, id, self.keys.as_ref()).and_then(|patch| {
                let mut out = vec![0; patch.content_len()];
                patch.read_pieces(&patch.held, &mut out)?;
                Ok(patch.base)
            }),
        )
    }

    /// What the writer needs of entry `id` (with its chain of bases `chain`, from its
    /// index page) to store a slot's next content over it: its content's name and tree.
    /// `None` for a hole, a chunk without a tree (of an older format, encrypted, or shorter
    /// than two pieces), or one that cannot be read as it should, or whose base is not the
    /// one its page says: the writer then stores the next content whole.
    pub(crate) fn known(
        &self,
        id: &ChunkId,
        chain: &[ChunkId],
    ) -> Result<Option<Known>, StoreError> {
        if *id == HOLE || !self.takes_patches() {
            return Ok(None);
        }
        let Ok(file) = self.open_chunk(id)? else {
            return Ok(None);
        };
        if file.is_patch() {
            let Ok(bytes) = file.into_bytes() else {
                return Ok(None);
            };
            return Ok(Patch::parse(&bytes, id, self.keys.as_ref())
                .ok()
                .filter(|patch| chain.first() == Some(&patch.base))
                .map(|patch| Known {
                    entry: *id,
                    chain: chain.to_vec(),
                    content: patch.content,
                    tree: patch.tree,
                }));
        }
        if !chain.is_empty() {
            return Ok(None);
        }
        let mut head = [0; chunk::HEADER_BYTES];
        if file.read_exact_at(&mut head, 0).is_err() {
            return Ok(None);
        }
        let Ok(header) = chunk::Header::parse(&head, file.len()) else {
            return Ok(None);
        };
        Ok(chunk::read_tree(&file, header, id, self.keys.as_ref())
            .ok()
            .map(|tree| Known {
                entry: *id,
                chain: Vec::new(),
                content: *id,
                tree,
            }))
    }

    /// The name of the content of each of `entries` (with their `chains` of bases, in slot
    /// order): the entry itself for a whole chunk or a hole, the content id a patch names
    /// (checked against the patch's own name) for a patch. What a disk read and hashed is
    /// compared with.
    pub(crate) fn content_ids(&self, entries: &[ChunkId], chains: &[Vec<ChunkId>]) -> Vec<ChunkId> {
        let mut out = entries.to_vec();
        for (slot, chain) in chains.iter().enumerate() {
            let (Some(base), Some(id)) = (chain.first(), entries.get(slot)) else {
                continue;
            };
            let Ok((head, _)) = self
                .fs
                .read_prefix(&Self::chunk_rel(id), chunk::HEADER_BYTES + 64)
            else {
                continue; // unreadable: it is written, and its read fails then
            };
            if head.len() == chunk::HEADER_BYTES + 64 && chunk::is_patch(&head) {
                let content = ChunkId(
                    head[chunk::HEADER_BYTES..chunk::HEADER_BYTES + 32]
                        .try_into()
                        .expect("32 bytes"),
                );
                if patch::name(&content, base, self.keys.as_ref()) == *id {
                    out[slot] = content;
                }
            }
        }
        out
    }

    /// When `to` is on the chain of bases of patch `from`: the pieces (sorted) that the
    /// patches of the chain above `to` hold, the only ones in which the contents of `from`
    /// and `to` can differ. `None` when `from` is not a patch, `to` is not on its chain, or
    /// a patch on the way cannot be read (the caller then treats the whole chunk).
    pub(crate) fn pieces_above(
        &self,
        from: &ChunkId,
        to: &ChunkId,
    ) -> Result<Option<Vec<usize>>, StoreError> {
        let mut at = *from;
        let mut pieces: Vec<usize> = Vec::new();
        for _ in 0..super::index::MAX_CHAIN {
            let Ok(file) = self.open_chunk(&at)? else {
                return Ok(None);
            };
            if !file.is_patch() {
                return Ok(None);
            }
            let Ok(bytes) = file.into_bytes() else {
                return Ok(None);
            };
            let Ok(patch) = Patch::parse(&bytes, &at, self.keys.as_ref()) else {
                return Ok(None);
            };
            pieces.extend(&patch.held);
            if patch.base == *to {
                pieces.sort_unstable();
                pieces.dedup();
                return Ok(Some(pieces));
            }
            at = patch.base;
        }
        Ok(None)
    }

    /// The name of an all-zero chunk of the store's chunk size.
    fn zero_id(&self) -> ChunkId {
        *self.zero_id.get_or_init(|| {
            let zeros = vec![0; self.chunk_size_bytes() as usize];
            if chunk::takes_tree(zeros.len()) {
                chunk::tree_root(&chunk::piece_tree(&zeros, self.tree_key()), self.tree_key())
            } else {
                self.chunk_id(&zeros)
            }
        })
    }

    /// What storing a slot's new content (tree `tree`) over `parent` comes to without
    /// storing anything: the parent's entry when the content is the same, a hole when it
    /// is all zeros, the whole chunk the store has when it has one; `None` otherwise.
    pub(crate) fn settled(&self, parent: &Known, tree: &[Cv]) -> Option<Stored> {
        let id = chunk::tree_root(tree, self.tree_key());
        if id == parent.content {
            Some(Stored::kept(parent))
        } else if id == self.zero_id() {
            Some(Stored::hole())
        } else if self.has_chunk(&id) {
            Some(Stored::whole(id, 0))
        } else {
            None
        }
    }

    /// Stores the new content of a slot (its tree `tree`; in `data`, at least the pieces
    /// in which it differs from `parent`'s) as a patch over `parent`, if that is worth it:
    /// at most half its pieces differ, and the chain stays at most [`WRITE_CHAIN`] long.
    /// `None` when it is not (the content is then stored whole).
    pub(crate) fn put_patch_over(
        &self,
        parent: &Known,
        tree: &[Cv],
        data: &[u8],
    ) -> Result<Option<Stored>, StoreError> {
        let differ = patch::differing(tree, &parent.tree);
        if !self.takes_patches()
            || parent.chain.len() >= WRITE_CHAIN
            || !patch::worth_it(differ.len(), tree.len())
        {
            return Ok(None);
        }
        let content = chunk::tree_root(tree, self.tree_key());
        let held: Vec<(usize, &[u8])> = differ
            .iter()
            .map(|&k| (k, &data[k * PIECE_BYTES..(k + 1) * PIECE_BYTES]))
            .collect();
        let id = patch::name(&content, &parent.entry, self.keys.as_ref());
        let added = self.put_encoded(&id, || {
            patch::encode(&content, &parent.entry, tree, &held, self.keys.as_ref())
        })?;
        let mut chain = Vec::with_capacity(parent.chain.len() + 1);
        chain.push(parent.entry);
        chain.extend_from_slice(&parent.chain);
        Ok(Some(Stored { id, chain, added }))
    }

    /// Stores `data`, the whole new content of a slot whose previous content was `parent`
    /// (`None`: none known, a full capture, or a hole): unchanged, it keeps the parent's
    /// entry; a content the store has whole is shared; one that differs in at most half
    /// its pieces from the parent is kept as a patch over it (see
    /// [`Store::put_patch_over`]); anything else is stored whole. All-zero data is a hole.
    pub(crate) fn put_data_over(
        &self,
        parent: Option<&Known>,
        data: &[u8],
    ) -> Result<Stored, StoreError> {
        if data.iter().all(|&b| b == 0) {
            return Ok(Stored::hole());
        }
        let Some(parent) =
            parent.filter(|p| self.takes_patches() && p.tree.len() * PIECE_BYTES == data.len())
        else {
            let (id, added) = self.put_chunk(ChunkKind::Data, data)?;
            return Ok(Stored::whole(id, added));
        };
        let tree = chunk::piece_tree(data, self.tree_key());
        if let Some(done) = self.settled(parent, &tree) {
            return Ok(done);
        }
        if let Some(done) = self.put_patch_over(parent, &tree, data)? {
            return Ok(done);
        }
        let id = chunk::tree_root(&tree, self.tree_key());
        let added = self.put_encoded(&id, || {
            chunk::encode(ChunkKind::Data, &id, data, self.keys.as_ref(), Some(&tree))
        })?;
        Ok(Stored::whole(id, added))
    }
}
