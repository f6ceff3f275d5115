//! What changed in a checkpoint's files since another checkpoint, by the file systems' own
//! records: names, kinds, sizes, modification times and file numbers. No file's content
//! is read.

use std::collections::BTreeMap;

use super::browse::{Browser, FilePath, MAX_DEPTH, VolumeRef, readable};
use super::{Entry, EntryKind, FilesError};
use crate::progress::Control;

/// How an entry changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// It is new.
    Added,
    /// Its content, size or modification time changed, or it was replaced.
    Modified,
    /// It is gone.
    Deleted,
}

/// One changed entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    /// Its path, volume first.
    pub path: String,
    /// How it changed.
    pub change: ChangeKind,
    /// The entry: as it is in the newer checkpoint, or as it was for one deleted.
    pub entry: Entry,
}

/// What changed between the checkpoint `old` and the checkpoint `new`, volume by volume
/// (a volume is the same when its disk's target and its partition number are). Files,
/// links and added or deleted folders are named; a folder that only holds changes is not.
/// Everything inside an added or deleted folder is named too. Folders that cannot be read
/// are skipped, and their errors returned beside.
///
/// # Errors
/// Cancelled.
pub fn changes(
    old: &mut Browser,
    new: &mut Browser,
    control: &Control,
) -> Result<(Vec<Change>, Vec<FilesError>), FilesError> {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    let mut pairs = Vec::new();
    for (d, disk) in new.disks().iter().enumerate() {
        for v in disk.volumes.iter().filter(|v| readable(v.file_system)) {
            let at = VolumeRef {
                disk: d,
                number: v.number,
            };
            let before = old
                .disks()
                .iter()
                .position(|o| o.target == disk.target)
                .map(|od| VolumeRef {
                    disk: od,
                    number: v.number,
                })
                .filter(|b| old.volume(*b).is_some_and(|ov| readable(ov.file_system)));
            pairs.push((before, at));
        }
    }
    for (before, at) in pairs {
        match before {
            Some(before) => compare_volume(old, new, before, at, control, &mut found, &mut errors)?,
            None => everything(
                new,
                &FilePath {
                    volume: at,
                    names: Vec::new(),
                    stream: None,
                },
                ChangeKind::Added,
                control,
                &mut found,
                &mut errors,
            )?,
        }
    }
    // Paths of the old checkpoint are named as in the new one.
    Ok((found, errors))
}

/// The changes in one volume, `before` in `old` and `at` in `new`.
#[allow(clippy::too_many_arguments, clippy::too_many_lines)] // one walk, with its state
fn compare_volume(
    old: &mut Browser,
    new: &mut Browser,
    before: VolumeRef,
    at: VolumeRef,
    control: &Control,
    found: &mut Vec<Change>,
    errors: &mut Vec<FilesError>,
) -> Result<(), FilesError> {
    let mut pending = vec![(Vec::<String>::new(), 0usize)];
    while let Some((names, depth)) = pending.pop() {
        cancelled(control, new, at, &names)?;
        let (o, n) = (
            old.list(&FilePath {
                volume: before,
                names: names.clone(),
                stream: None,
            }),
            new.list(&FilePath {
                volume: at,
                names: names.clone(),
                stream: None,
            }),
        );
        let (o, n) = match (o, n) {
            (Ok(o), Ok(n)) => (o, n),
            (Err(e), _) | (_, Err(e)) => {
                errors.push(e);
                continue;
            }
        };
        let o: BTreeMap<String, Entry> = o.into_iter().map(|e| (e.name.clone(), e)).collect();
        let n: BTreeMap<String, Entry> = n.into_iter().map(|e| (e.name.clone(), e)).collect();
        let mut deeper = Vec::new();
        for (name, entry) in &n {
            let mut child = names.clone();
            child.push(name.clone());
            let path = FilePath {
                volume: at,
                names: child.clone(),
                stream: None,
            };
            match o.get(name) {
                None => {
                    everything_below(
                        new,
                        &path,
                        entry,
                        ChangeKind::Added,
                        depth,
                        control,
                        found,
                        errors,
                    )?;
                }
                Some(was) if was.kind != entry.kind => {
                    let old_path = FilePath {
                        volume: before,
                        names: child.clone(),
                        stream: None,
                    };
                    everything_below(
                        old,
                        &old_path,
                        was,
                        ChangeKind::Deleted,
                        depth,
                        control,
                        found,
                        errors,
                    )?;
                    everything_below(
                        new,
                        &path,
                        entry,
                        ChangeKind::Added,
                        depth,
                        control,
                        found,
                        errors,
                    )?;
                }
                Some(_) if entry.kind == EntryKind::Folder => {
                    if depth + 1 < MAX_DEPTH {
                        deeper.push((child, depth + 1));
                    }
                }
                Some(was) => {
                    let replaced = matches!((was.id, entry.id), (Some(a), Some(b)) if a != b);
                    if replaced
                        || was.size_bytes != entry.size_bytes
                        || was.modified != entry.modified
                        || was.streams != entry.streams
                    {
                        found.push(Change {
                            path: new.display(at, &child),
                            change: ChangeKind::Modified,
                            entry: entry.clone(),
                        });
                    }
                }
            }
        }
        for (name, was) in &o {
            if !n.contains_key(name) {
                let mut child = names.clone();
                child.push(name.clone());
                let old_path = FilePath {
                    volume: before,
                    names: child,
                    stream: None,
                };
                everything_below(
                    old,
                    &old_path,
                    was,
                    ChangeKind::Deleted,
                    depth,
                    control,
                    found,
                    errors,
                )?;
            }
        }
        pending.extend(deeper.into_iter().rev());
    }
    Ok(())
}

/// The checkpoint of the same VM just before `m` in `store`, if there is one.
///
/// # Errors
/// The store's catalog could not be read.
pub fn previous_checkpoint(
    store: &crate::store::Store,
    m: &crate::store::manifest::Manifest,
) -> Result<Option<crate::store::manifest::Manifest>, crate::store::StoreError> {
    Ok(store
        .vm_catalog(&m.vm.uuid)?
        .checkpoints
        .into_iter()
        .filter(|c| c.time < m.time)
        .max_by_key(|c| c.time))
}

fn cancelled(
    control: &Control,
    browser: &Browser,
    at: VolumeRef,
    names: &[String],
) -> Result<(), FilesError> {
    control.check().map_err(|e| FilesError::Tree {
        path: browser.display(at, names),
        source: e.into(),
    })
}

/// `entry` at `path` as a change of `kind`, and for a folder everything below it.
#[allow(clippy::too_many_arguments)] // a walk's state, passed down
fn everything_below(
    browser: &mut Browser,
    path: &FilePath,
    entry: &Entry,
    kind: ChangeKind,
    depth: usize,
    control: &Control,
    found: &mut Vec<Change>,
    errors: &mut Vec<FilesError>,
) -> Result<(), FilesError> {
    found.push(Change {
        path: browser.display(path.volume, &path.names),
        change: kind,
        entry: entry.clone(),
    });
    if entry.kind == EntryKind::Folder && depth + 1 < MAX_DEPTH {
        everything(browser, path, kind, control, found, errors)?;
    }
    Ok(())
}

/// Everything below the folder `path`, as changes of `kind`.
fn everything(
    browser: &mut Browser,
    path: &FilePath,
    kind: ChangeKind,
    control: &Control,
    found: &mut Vec<Change>,
    errors: &mut Vec<FilesError>,
) -> Result<(), FilesError> {
    let mut pending = vec![(path.names.clone(), path.names.len())];
    while let Some((names, depth)) = pending.pop() {
        cancelled(control, browser, path.volume, &names)?;
        let at = FilePath {
            volume: path.volume,
            names,
            stream: None,
        };
        let entries = match browser.list(&at) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for entry in entries {
            let mut child = at.names.clone();
            child.push(entry.name.clone());
            if entry.kind == EntryKind::Folder && depth + 1 < MAX_DEPTH {
                pending.push((child.clone(), depth + 1));
            }
            found.push(Change {
                path: browser.display(path.volume, &child),
                change: kind,
                entry,
            });
        }
    }
    Ok(())
}
