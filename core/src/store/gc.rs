//! Garbage collection: remove chunks that no checkpoint references.
//!
//! GC holds the store lock exclusively for its whole run; checkpoint writers hold it
//! shared. So GC never runs while a checkpoint is being written: a writer may reference
//! chunks that no finished manifest does yet (new ones, and existing ones it found by
//! deduplication), and only the writer knows them. Writers wait for a running GC and GC
//! waits for running writers (both cancellably). Marking is complete before the first
//! deletion, and GC refuses to delete anything if any manifest or index page cannot be
//! read, so GC killed at any instant removes only unreferenced chunks.

use std::collections::HashSet;
use std::fs;

use serde::Serialize;

use super::chunk::ChunkId;
use super::error::StoreError;
use super::index::HOLE;
use super::{LockMode, Store, StoreLock, fsutil};
use crate::progress::Control;

/// What garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Chunks still referenced.
    pub chunks_kept: u64,
    /// Chunks removed.
    pub chunks_removed: u64,
    /// Bytes freed.
    pub bytes_removed: u64,
    /// Temporary files of killed writers removed.
    pub leftovers_removed: u64,
}

impl Store {
    /// Removes every chunk no checkpoint references, and leftovers of killed writers.
    pub fn gc(&self, control: &Control) -> Result<GcReport, StoreError> {
        let lock = StoreLock::acquire(
            self.root(),
            LockMode::Exclusive,
            "removing unused chunks",
            Some(control),
        )?;
        let mut report = GcReport {
            leftovers_removed: self.clean_leftovers(&lock)?,
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
                    let entries =
                        self.read_page(idx, p as u64)
                            .map_err(|e| StoreError::GcUnsafe {
                                detail: format!(
                                    "an index page of checkpoint {} of {} is unreadable ({e})",
                                    m.id, m.vm.name
                                ),
                                store: self.root().to_path_buf(),
                            })?;
                    marked.extend(entries.into_iter().filter(|e| *e != HOLE));
                }
            }
        }
        for prefix in fsutil::list_dir(&self.root().join("chunks"))? {
            control.check()?;
            for path in fsutil::list_dir(&prefix)? {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let Some(id) = ChunkId::from_hex(&name) else {
                    continue;
                };
                if marked.contains(&id) {
                    report.chunks_kept += 1;
                    continue;
                }
                let size = fs::metadata(&path).map_or(0, |m| m.len());
                if fs::remove_file(&path).is_ok() {
                    report.chunks_removed += 1;
                    report.bytes_removed += size;
                }
            }
        }
        Ok(report)
    }
}
