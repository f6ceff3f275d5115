//! Verification: re-read and re-hash every chunk a checkpoint needs (or, quick, check that
//! each is present), and say which checkpoints each damaged chunk breaks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::backend::Durability;
use super::chunk::{ChunkId, ChunkKind, ChunkProblem};
use super::error::StoreError;
use super::index::{self, HOLE};
use super::{LockMode, Manifest, Store};
use crate::progress::Control;

/// A checkpoint named in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CheckpointRef {
    /// VM name when the checkpoint was taken.
    pub vm: String,
    /// VM UUID.
    pub vm_uuid: Uuid,
    /// Checkpoint id.
    pub id: String,
    /// Its time.
    pub time: DateTime<Utc>,
}

impl CheckpointRef {
    /// The reference to `m`.
    #[must_use]
    pub fn of(m: &Manifest) -> Self {
        Self {
            vm: m.vm.name.clone(),
            vm_uuid: m.vm.uuid,
            id: m.id.clone(),
            time: m.time,
        }
    }
}

/// One damaged or missing chunk.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Damage {
    /// The chunk's name.
    pub chunk: String,
    /// `data` or `index_page`.
    pub kind: String,
    /// What is wrong.
    pub problem: String,
    /// Where the damaged file was moved (missing chunks have none).
    pub moved_to: Option<PathBuf>,
    /// The checkpoints that cannot be restored completely because of it.
    pub checkpoints: Vec<CheckpointRef>,
}

/// What verification found.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// Whether only presence was checked.
    pub quick: bool,
    /// Readable checkpoints checked.
    pub checkpoints: usize,
    /// Distinct chunks checked (index pages and data).
    pub chunks_checked: u64,
    /// Bytes of data those chunks hold.
    pub bytes_checked: u64,
    /// Damaged or missing chunks.
    pub damaged: Vec<Damage>,
    /// Manifests that could not be read, with the reason.
    pub unreadable_manifests: Vec<(PathBuf, String)>,
    /// For a rotating check: which share of the data chunks was re-hashed, and of how many
    /// (`None`: all of them).
    #[serde(default)]
    pub share: Option<(u32, u32)>,
    /// Flat copies of patches found damaged and removed (a cache: the next compaction
    /// writes them again; no checkpoint needs them).
    #[serde(default)]
    pub flat_copies_removed: u64,
}

/// The share (of `of`) that data chunk `id` belongs to in a rotating check: chunk names are
/// uniform, so each share holds about `1/of` of the data.
#[must_use]
pub fn share_of(id: &ChunkId, of: u32) -> u32 {
    u32::from(u16::from_le_bytes([id.0[0], id.0[1]])) % of.max(1)
}

impl VerifyReport {
    /// True when nothing is wrong.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.unreadable_manifests.is_empty()
    }

    /// Every checkpoint affected by some damage, each once.
    #[must_use]
    pub fn broken_checkpoints(&self) -> Vec<CheckpointRef> {
        let mut out: Vec<CheckpointRef> = self
            .damaged
            .iter()
            .flat_map(|d| d.checkpoints.iter().cloned())
            .collect();
        out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        out.dedup();
        out
    }
}

/// Page id → (entries it holds, lengths of its slots, indexes of the checkpoints using it).
type PageUse = HashMap<ChunkId, (u64, Vec<u64>, Vec<u32>)>;

/// Every index page the checkpoints use, each once.
fn pages_in_use(checkpoints: &[Manifest]) -> PageUse {
    let mut pages = PageUse::new();
    for (n, m) in checkpoints.iter().enumerate() {
        let n = u32::try_from(n).expect("fewer than 4 billion checkpoints");
        for idx in m.indexes() {
            for (p, page) in idx.pages.iter().enumerate() {
                let Some(page) = page else { continue };
                let p = p as u64;
                let entry = pages.entry(*page).or_insert_with(|| {
                    let lens = (0..idx.entries_in_page(p))
                        .map(|e| idx.chunk_len(p * index::ENTRIES_PER_PAGE + e))
                        .collect();
                    (idx.entries_in_page(p), lens, Vec::new())
                });
                if entry.2.last() != Some(&n) {
                    entry.2.push(n);
                }
            }
        }
    }
    pages
}

/// Data chunk → (length, pages referring to it, the base they name for it).
type DataUse = HashMap<ChunkId, (u64, Vec<ChunkId>, ChunkId)>;
/// A chunk found damaged, and which checkpoints (by number) need it.
type Problem = (ChunkId, ChunkKind, ChunkProblem, Vec<u32>);

/// Notes the data chunks index page `page_id` (`page`, with slots of `lens`) needs, and a
/// patch's chain of bases with it: each is checked as a chunk of the same checkpoints. Two
/// pages that disagree on a patch's base are a problem of the page.
fn note_data(
    data: &mut DataUse,
    problems: &mut Vec<Problem>,
    page_id: &ChunkId,
    page: &index::Page,
    lens: &[u64],
    users: &[u32],
) {
    let mut needed = Vec::new();
    for ((id, chain), len) in page.ids.iter().zip(&page.chains).zip(lens) {
        if *id == HOLE {
            continue;
        }
        // Each link of the chain is over the next; the last is whole.
        let links: Vec<&ChunkId> = std::iter::once(id).chain(chain).collect();
        for (n, link) in links.iter().enumerate() {
            needed.push((**link, links.get(n + 1).map_or(HOLE, |b| **b), *len));
        }
    }
    for (id, base, len) in needed {
        let e = data.entry(id).or_insert_with(|| (len, Vec::new(), base));
        if e.1.last() != Some(page_id) {
            e.1.push(*page_id);
        }
        if e.2 != base {
            problems.push((
                *page_id,
                ChunkKind::IndexPage,
                ChunkProblem::BadHeader(format!(
                    "it names another base for chunk {id} than another page does"
                )),
                users.to_vec(),
            ));
        }
    }
}

/// That a data chunk's base (`found`: [`HOLE`] for a whole chunk) is the one its index
/// pages name (`named`): garbage collection keeps what the pages name.
fn same_base(found: ChunkId, named: ChunkId) -> Result<(), ChunkProblem> {
    let say = |id: ChunkId| {
        if id == HOLE {
            "none".to_owned()
        } else {
            id.to_hex()
        }
    };
    if found == named {
        Ok(())
    } else {
        Err(ChunkProblem::BadHeader(format!(
            "its base is {}, its index pages say {}",
            say(found),
            say(named)
        )))
    }
}

impl Store {
    /// Verifies the store. Damaged chunks are moved to `damaged/`, not deleted, so that a
    /// later checkpoint of the same data writes them again ("heals" them).
    pub fn verify(&self, quick: bool, control: &Control) -> Result<VerifyReport, StoreError> {
        self.verify_in(quick, None, control)
    }

    /// Verifies share `share` of `of` of the store's data chunks (see [`share_of`]), and
    /// every index page: the step of a rotating check that re-hashes all data over `of`
    /// runs. Damage is handled as [`Store::verify`] does.
    pub fn verify_share(
        &self,
        share: u32,
        of: u32,
        control: &Control,
    ) -> Result<VerifyReport, StoreError> {
        if of == 0 || share >= of {
            return Err(StoreError::Invalid(format!(
                "share {share} of {of} does not exist"
            )));
        }
        self.verify_in(false, Some((share, of)), control)
    }

    fn verify_in(
        &self,
        quick: bool,
        share: Option<(u32, u32)>,
        control: &Control,
    ) -> Result<VerifyReport, StoreError> {
        let _lock = self.lock(LockMode::Shared, "verifying", Some(control))?;
        let catalog = self.catalog()?;
        let mut report = VerifyReport {
            quick,
            checkpoints: catalog.checkpoints.len(),
            unreadable_manifests: catalog
                .unreadable
                .iter()
                .map(|(p, e)| (p.clone(), e.to_string()))
                .collect(),
            share,
            ..VerifyReport::default()
        };
        let pages = pages_in_use(&catalog.checkpoints);
        let mut data = DataUse::new();
        let mut problems: Vec<Problem> = Vec::new();
        let mut page_ids: Vec<&ChunkId> = pages.keys().collect();
        page_ids.sort();
        for page_id in page_ids {
            control.check()?;
            let (entries, lens, users) = &pages[page_id];
            report.chunks_checked += 1;
            let decoded = self
                .load_chunk(page_id, ChunkKind::IndexPage)?
                .and_then(|bytes| {
                    index::decode_page_with_bases(&bytes, *entries)
                        .map_err(|e| ChunkProblem::BadHeader(e.to_string()))
                });
            match decoded {
                Ok(page) => note_data(&mut data, &mut problems, page_id, &page, lens, users),
                Err(problem) => {
                    problems.push((*page_id, ChunkKind::IndexPage, problem, users.clone()));
                }
            }
        }
        if let Some((k, of)) = share {
            data.retain(|id, _| share_of(id, of) == k);
        }
        control.add_total_bytes(data.values().map(|(len, _, _)| len).sum());
        let mut data_ids: Vec<&ChunkId> = data.keys().collect();
        data_ids.sort();
        for id in data_ids {
            control.check()?;
            let (len, via_pages, base) = &data[id];
            let result = if quick {
                self.probe_chunk(id)?
            } else {
                self.check_data_chunk(id)?
                    .and_then(|found| same_base(found, *base))
            };
            // A patch's flat copy, if it has one, is checked with it.
            if !quick && *base != HOLE && self.check_flat(id, base)? {
                report.flat_copies_removed += 1;
            }
            report.chunks_checked += 1;
            report.bytes_checked += len;
            control.add_done_bytes(*len);
            if let Err(problem) = result {
                let mut users: Vec<u32> = via_pages
                    .iter()
                    .flat_map(|p| pages[p].2.iter().copied())
                    .collect();
                users.sort_unstable();
                users.dedup();
                problems.push((*id, ChunkKind::Data, problem, users));
            }
        }
        for (id, kind, problem, users) in problems {
            let moved_to = match problem {
                ChunkProblem::Missing | ChunkProblem::Unreadable(_) => {
                    self.note_missing(&id)?;
                    None
                }
                _ => self.move_aside(&id)?,
            };
            report.damaged.push(Damage {
                chunk: id.to_hex(),
                kind: match kind {
                    ChunkKind::Data | ChunkKind::Patch => "data",
                    ChunkKind::IndexPage => "index_page",
                }
                .into(),
                problem: problem.to_string(),
                moved_to,
                checkpoints: users
                    .iter()
                    .map(|&n| CheckpointRef::of(&catalog.checkpoints[n as usize]))
                    .collect(),
            });
        }
        Ok(report)
    }

    /// Leaves an empty `damaged/<chunk>-missing` file for a chunk that is missing or
    /// unreadable, so that [`Store::unhealed_damage`] knows of it too.
    fn note_missing(&self, id: &ChunkId) -> Result<(), StoreError> {
        let rel = Path::new("damaged").join(format!("{}-missing", id.to_hex()));
        match self.fs.write_new(&rel, b"", Durability::AtCommit) {
            Err(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// The chunks that `verify` found damaged or missing and that are still not whole in
    /// the store (a later checkpoint holding the same data rewrites — heals — them), among
    /// those that checkpoint `m` needs. An incremental must not be taken from a checkpoint
    /// with such damage: it would share the damage. Cheap when nothing was ever damaged.
    pub fn unhealed_damage(&self, m: &Manifest) -> Result<Vec<ChunkId>, StoreError> {
        let mut unhealed = std::collections::HashSet::new();
        for name in self.fs.list_names(Path::new("damaged"))? {
            let Some(id) = name.split('-').next().and_then(ChunkId::from_hex) else {
                continue;
            };
            if !self.chunk_file_is_whole(&Self::chunk_rel(&id)) {
                unhealed.insert(id);
            }
        }
        if unhealed.is_empty() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for idx in m.indexes() {
            for (p, page) in idx.pages.iter().enumerate() {
                let Some(page) = page else { continue };
                if unhealed.contains(page) {
                    found.push(*page);
                    continue;
                }
                match self.read_page_with_bases(idx, p as u64) {
                    Ok(page) => found.extend(
                        page.ids
                            .into_iter()
                            .chain(page.chains.into_iter().flatten())
                            .filter(|id| unhealed.contains(id)),
                    ),
                    // A page that cannot be read is damage of its own.
                    Err(_) => found.push(*page),
                }
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    fn move_aside(&self, id: &ChunkId) -> Result<Option<PathBuf>, StoreError> {
        let from = Self::chunk_rel(id);
        let to = Path::new("damaged").join(format!(
            "{}-{}",
            id.to_hex(),
            Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        ));
        match self.fs.rename(&from, &to) {
            Ok(()) => {
                self.fs
                    .sync_dir(from.parent().expect("chunk path has a parent"))?;
                Ok(Some(self.root().join(to)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(super::error::io_error("move aside", self.chunk_path(id), e)),
        }
    }
}
