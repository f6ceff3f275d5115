//! Garbage collection: remove chunks that no checkpoint references, and flat copies of
//! patches that none holds.
//!
//! GC holds the store lock exclusively for its whole run; checkpoint writers hold it
//! shared. So GC never runs while a checkpoint is being written: a writer may reference
//! chunks that no finished manifest does yet (new ones, and existing ones it found by
//! deduplication), and only the writer knows them. Writers wait for a running GC and GC
//! waits for running writers (both cancellably). Marking is complete before the first
//! deletion, and GC refuses to delete anything if any manifest or index page cannot be
//! read, so GC killed at any instant removes only unreferenced chunks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::backend::is_remote_failure;
use super::chunk::ChunkId;
use super::error::StoreError;
use super::error::io_error;
use super::index::HOLE;
use super::{LockMode, Store};
use crate::progress::Control;

/// What garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Chunks still referenced.
    pub chunks_kept: u64,
    /// Chunks removed.
    pub chunks_removed: u64,
    /// Bytes freed (by chunks and leftovers).
    pub bytes_removed: u64,
    /// Temporary files of killed writers removed.
    pub leftovers_removed: u64,
    /// Flat copies removed: those of patches no checkpoint holds any more (their bytes
    /// are in `bytes_removed`).
    #[serde(default)]
    pub flat_copies_removed: u64,
}

impl Store {
    /// Removes every chunk no checkpoint references, and leftovers of killed writers.
    pub fn gc(&self, control: &Control) -> Result<GcReport, StoreError> {
        let lock = self.lock(LockMode::Exclusive, "removing unused chunks", Some(control))?;
        let (leftovers_removed, leftover_bytes) = self.clean_leftovers(&lock)?;
        let mut report = GcReport {
            leftovers_removed,
            bytes_removed: leftover_bytes,
            ..GcReport::default()
        };
        let catalog = self.catalog()?;
        if let Some((path, error)) = catalog.unreadable.first() {
            return Err(StoreError::GcUnsafe {
                detail: format!("{} is unreadable ({error})", path.display()),
                store: self.root().to_path_buf(),
            });
        }
        let mut marked: HashSet<ChunkId> = HashSet::new();
        for m in &catalog.checkpoints {
            for idx in m.indexes() {
                for (p, page) in idx.pages.iter().enumerate() {
                    control.check()?;
                    let Some(page) = page else { continue };
                    if !marked.insert(*page) {
                        continue; // a shared page: its entries are marked already
                    }
                    let entries = self.read_page_with_bases(idx, p as u64).map_err(|e| {
                        StoreError::GcUnsafe {
                            detail: format!(
                                "an index page of checkpoint {} of {} is unreadable ({e})",
                                m.id, m.vm.name
                            ),
                            store: self.root().to_path_buf(),
                        }
                    })?;
                    // A patch's chain of bases is kept as long as the patch.
                    marked.extend(
                        entries
                            .ids
                            .into_iter()
                            .chain(entries.chains.into_iter().flatten())
                            .filter(|e| *e != HOLE),
                    );
                }
            }
        }
        // Nothing is deleted by a holder whose lock was taken over (remote stores).
        lock.check_held()?;
        let chunks = Path::new("chunks");
        for prefix in self.fs.list_names(chunks)? {
            control.check()?;
            let prefix = chunks.join(prefix);
            // A listing over SFTP carries the lengths; locally, only unused chunks are
            // looked at.
            let entries: Vec<(String, Option<u64>)> = if self.fs.is_local() {
                let names = self.fs.list_names(&prefix)?;
                names.into_iter().map(|n| (n, None)).collect()
            } else {
                let listed = self.fs.list(&prefix)?;
                listed.into_iter().map(|e| (e.name, Some(e.len))).collect()
            };
            let mut unused: Vec<(PathBuf, u64)> = Vec::new();
            for (name, len) in entries {
                let Some(id) = ChunkId::from_hex(&name) else {
                    continue;
                };
                if marked.contains(&id) {
                    report.chunks_kept += 1;
                    continue;
                }
                let path = prefix.join(&name);
                let size = len.unwrap_or_else(|| self.fs.len(&path).unwrap_or(0));
                unused.push((path, size));
            }
            let paths: Vec<PathBuf> = unused.iter().map(|(p, _)| p.clone()).collect();
            for ((path, size), result) in unused.iter().zip(self.fs.remove_files(&paths)) {
                match result {
                    Ok(()) => {
                        report.chunks_removed += 1;
                        report.bytes_removed += size;
                    }
                    Err(e) if is_remote_failure(&e) => {
                        return Err(io_error("remove", self.root().join(path), e));
                    }
                    Err(_) => {}
                }
            }
        }
        // Flat copies of patches no checkpoint holds (see `flat.rs`).
        let (removed, bytes) = self.remove_flat_except(|id| marked.contains(id), control)?;
        report.flat_copies_removed = removed;
        report.bytes_removed += bytes;
        Ok(report)
    }
}
