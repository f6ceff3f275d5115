//! Browsing a checkpoint's files: its disks and volumes, paths that start with a volume
//! (`p2/Users/me`, `Windows/Users/me`, `vdb/p1/home`), listing, searching by name, and
//! restoring files and folders to a folder of the host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    Disk, Entry, EntryKind, FileSystem, FileTree, FilesError, PartitionTable, Volume, open_tree,
    volumes,
};
use crate::progress::Control;
use crate::store::Store;
use crate::store::manifest::Manifest;
use crate::store::random::{DEFAULT_CACHE_BYTES, DEFAULT_READ_AHEAD_BYTES};

/// Folders deeper than this are not followed (a damaged file system can loop).
pub const MAX_DEPTH: usize = 256;

/// One disk of a checkpoint and its volumes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskVolumes {
    /// The disk's target (`vda`).
    pub target: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// How it is divided.
    pub partition_table: PartitionTable,
    /// Its volumes, in the order of the table.
    pub volumes: Vec<Volume>,
}

/// A volume of a checkpoint: which disk, which partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeRef {
    /// The disk's position in the checkpoint.
    pub disk: usize,
    /// The partition's number (0 for a file system on the whole disk).
    pub number: u32,
}

/// A path inside a checkpoint: a volume, and names from its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePath {
    /// The volume.
    pub volume: VolumeRef,
    /// The names from the volume's root (empty for the root).
    pub names: Vec<String>,
    /// A named data stream of the file (an NTFS alternate data stream, `file:stream`).
    pub stream: Option<String>,
}

/// What was found by [`Browser::find`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Found {
    /// Its full path, volume first, as [`Browser::resolve`] takes it.
    pub path: String,
    /// The entry.
    pub entry: Entry,
}

/// What [`Browser::restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Restored {
    /// Where each path given was restored to.
    pub written: Vec<PathBuf>,
    /// Files written.
    pub files: u64,
    /// Folders made.
    pub folders: u64,
    /// Symbolic links made.
    pub links: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// What was left out, and why (device nodes, names the host cannot hold).
    pub skipped: Vec<(String, String)>,
}

/// A checkpoint opened for browsing its files. Volumes are opened when first used, and
/// kept open (with their chunk caches) while the browser lives.
pub struct Browser {
    store: Arc<Store>,
    manifest: Manifest,
    disks: Vec<DiskVolumes>,
    trees: HashMap<VolumeRef, Box<dyn FileTree>>,
    cache_bytes: u64,
    read_ahead_bytes: u64,
    fetched: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("checkpoint", &self.manifest.id)
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// Reads the partition tables of `manifest`'s disks, from `store`.
    ///
    /// # Errors
    /// A disk could not be read, or its partition table is damaged.
    pub fn open(store: Arc<Store>, manifest: Manifest) -> Result<Self, FilesError> {
        Self::with_cache(store, manifest, DEFAULT_CACHE_BYTES)
    }

    /// [`Browser::open`], with a chunk cache of `cache_bytes` per volume.
    ///
    /// # Errors
    /// As [`Browser::open`].
    pub fn with_cache(
        store: Arc<Store>,
        manifest: Manifest,
        cache_bytes: u64,
    ) -> Result<Self, FilesError> {
        let mut disks = Vec::new();
        for disk in &manifest.disks {
            let mut cursor = store
                .object_cursor(&disk.index, cache_bytes.min(16 << 20))
                .map_err(|e| FilesError::Store(Box::new(e)))?;
            let (table, found) = volumes(&mut cursor, disk.index.size_bytes, &disk.target)?;
            disks.push(DiskVolumes {
                target: disk.target.clone(),
                size_bytes: disk.index.size_bytes,
                partition_table: table,
                volumes: found,
            });
        }
        Ok(Self {
            store,
            manifest,
            disks,
            trees: HashMap::new(),
            cache_bytes,
            read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
            fetched: Arc::default(),
        })
    }

    /// The store it reads.
    #[must_use]
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The checkpoint.
    #[must_use]
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// How many chunks the volumes opened so far fetched from the store (cache hits and
    /// holes not counted; the partition tables' reads neither).
    #[must_use]
    pub fn chunks_fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Its disks and their volumes.
    #[must_use]
    pub fn disks(&self) -> &[DiskVolumes] {
        &self.disks
    }

    /// The volume `at`.
    #[must_use]
    pub fn volume(&self, at: VolumeRef) -> Option<&Volume> {
        self.disks
            .get(at.disk)?
            .volumes
            .iter()
            .find(|v| v.number == at.number)
    }

    /// How a volume is named in paths: `p2` on the first disk, `vdb/p1` on another, the
    /// disk's target alone for a file system on the whole disk.
    #[must_use]
    pub fn volume_name(&self, at: VolumeRef) -> String {
        let target = self.disks.get(at.disk).map_or("?", |d| d.target.as_str());
        match (at.disk, at.number) {
            (_, 0) => target.to_owned(),
            (0, n) => format!("p{n}"),
            (_, n) => format!("{target}/p{n}"),
        }
    }

    /// Every volume's name, for messages.
    fn volume_names(&self) -> String {
        let mut names = Vec::new();
        for (d, disk) in self.disks.iter().enumerate() {
            for v in &disk.volumes {
                let at = VolumeRef {
                    disk: d,
                    number: v.number,
                };
                names.push(match &v.label {
                    Some(label) => format!("{} ({label})", self.volume_name(at)),
                    None => self.volume_name(at),
                });
            }
        }
        if names.is_empty() {
            "none: no disk of this checkpoint has a volume Rewind knows".into()
        } else {
            names.join(", ")
        }
    }

    /// The volume and names that `path` means: it starts with the volume (`p2`, a label
    /// such as `Windows`, or, for a disk other than the first, its target: `vdb/p1`,
    /// `vdb/Data`; `vdb` alone for a file system on the whole disk).
    ///
    /// # Errors
    /// No volume has that name, or a label names several.
    pub fn resolve(&self, path: &str) -> Result<FilePath, FilesError> {
        let mut at = self.resolve_names(path)?;
        // On NTFS (whose names cannot hold a `:`), `file:stream` names a file's data stream.
        if self
            .volume(at.volume)
            .is_some_and(|v| v.file_system == FileSystem::Ntfs)
            && let Some(last) = at.names.last_mut()
            && let Some((file, stream)) = last.split_once(':')
            && !file.is_empty()
            && !stream.is_empty()
        {
            at.stream = Some(stream.to_owned());
            *last = file.to_owned();
        }
        Ok(at)
    }

    /// [`Browser::resolve`] without looking for a data stream.
    fn resolve_names(&self, path: &str) -> Result<FilePath, FilesError> {
        let mut names: Vec<String> = path
            .split('/')
            .filter(|n| !n.is_empty() && *n != ".")
            .map(str::to_owned)
            .collect();
        let no_volume = || FilesError::NoVolume {
            name: path
                .split('/')
                .find(|n| !n.is_empty())
                .unwrap_or("")
                .to_owned(),
            known: self.volume_names(),
        };
        if names.is_empty() {
            return Err(no_volume());
        }
        let (disk, rest) = match self.disks.iter().position(|d| d.target == names[0]) {
            Some(d) => {
                names.remove(0);
                let whole = self.disks[d].volumes.iter().any(|v| v.number == 0);
                if whole {
                    return Ok(FilePath {
                        volume: VolumeRef { disk: d, number: 0 },
                        names,
                        stream: None,
                    });
                }
                (Some(d), names)
            }
            None => (None, names),
        };
        let Some(first) = rest.first() else {
            return Err(no_volume());
        };
        let candidates: Vec<usize> =
            disk.map_or_else(|| (0..self.disks.len()).collect(), |d| vec![d]);
        let by_number = first
            .strip_prefix('p')
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n > 0);
        let mut matches = Vec::new();
        for d in candidates {
            for v in &self.disks[d].volumes {
                let number_matches = by_number == Some(v.number) && (disk.is_some() || d == 0);
                let label_matches = v
                    .label
                    .as_deref()
                    .is_some_and(|l| l.trim().eq_ignore_ascii_case(first))
                    || v.partition_name
                        .as_deref()
                        .is_some_and(|l| l.eq_ignore_ascii_case(first));
                if number_matches || (by_number.is_none() && label_matches) {
                    matches.push(VolumeRef {
                        disk: d,
                        number: v.number,
                    });
                }
            }
        }
        matches.dedup();
        match matches.as_slice() {
            [one] => Ok(FilePath {
                volume: *one,
                names: rest[1..].to_vec(),
                stream: None,
            }),
            [] => Err(no_volume()),
            several => Err(FilesError::Ambiguous {
                name: first.clone(),
                volumes: several
                    .iter()
                    .map(|v| self.volume_name(*v))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The root of every volume whose files Rewind reads.
    #[must_use]
    pub fn readable_roots(&self) -> Vec<FilePath> {
        let mut roots = Vec::new();
        for (d, disk) in self.disks.iter().enumerate() {
            for v in disk.volumes.iter().filter(|v| readable(v.file_system)) {
                roots.push(FilePath {
                    volume: VolumeRef {
                        disk: d,
                        number: v.number,
                    },
                    names: Vec::new(),
                    stream: None,
                });
            }
        }
        roots
    }

    /// [`Browser::find`] below the folder `path`, or in every readable volume when `path`
    /// is empty (or `/`); a volume that cannot be read is then skipped with its error.
    ///
    /// # Errors
    /// The folder cannot be listed, or cancelled.
    pub fn find_in(
        &mut self,
        path: &str,
        pattern: &str,
        control: &Control,
    ) -> Result<(Vec<Found>, Vec<FilesError>), FilesError> {
        if !path.trim_matches('/').is_empty() {
            let at = self.resolve(path)?;
            return self.find(&at, pattern, control);
        }
        let mut found = Vec::new();
        let mut skipped = Vec::new();
        for root in self.readable_roots() {
            match self.find(&root, pattern, control) {
                Ok((f, e)) => {
                    found.extend(f);
                    skipped.extend(e);
                }
                Err(FilesError::Tree {
                    source: super::TreeError::Cancelled(c),
                    path,
                }) => {
                    return Err(FilesError::Tree {
                        source: super::TreeError::Cancelled(c),
                        path,
                    });
                }
                Err(e) => skipped.push(e),
            }
        }
        Ok((found, skipped))
    }

    /// What `path` shows: a folder's entries, or the one entry of a file; and the path as
    /// [`Browser::display`] writes it.
    ///
    /// # Errors
    /// As [`Browser::resolve`] and [`Browser::list`].
    pub fn show(&mut self, path: &str) -> Result<(String, Vec<Entry>), FilesError> {
        let at = self.resolve(path)?;
        let entry = self.entry(&at)?;
        let entries = if entry.kind == EntryKind::Folder {
            self.list(&at)?
        } else {
            vec![entry]
        };
        Ok((self.display(at.volume, &at.names), entries))
    }

    /// The full path of `names` in `volume`, as [`Browser::resolve`] takes it.
    #[must_use]
    pub fn display(&self, volume: VolumeRef, names: &[String]) -> String {
        let mut path = self.volume_name(volume);
        for n in names {
            path.push('/');
            path.push_str(n);
        }
        path
    }

    /// The file system of `at`, opened on first use.
    ///
    /// # Errors
    /// How far ahead of a sequential read the volumes opened from now on hint the chunk
    /// files ([`ObjectCursor::with_read_ahead`](crate::store::random::ObjectCursor::with_read_ahead)):
    /// the benchmark's lever.
    #[doc(hidden)]
    pub fn set_read_ahead(&mut self, bytes: u64) {
        self.read_ahead_bytes = bytes;
    }

    /// No such volume, a volume Rewind cannot read (BitLocker, unknown), or a damaged file
    /// system.
    pub fn tree(&mut self, at: VolumeRef) -> Result<&mut dyn FileTree, FilesError> {
        if !self.trees.contains_key(&at) {
            let volume = self
                .volume(at)
                .cloned()
                .ok_or_else(|| FilesError::NoVolume {
                    name: self.volume_name(at),
                    known: self.volume_names(),
                })?;
            let index = &self.manifest.disks[at.disk].index;
            let cursor = self
                .store
                .object_cursor_shared(index, self.cache_bytes)
                .map_err(|e| FilesError::Store(Box::new(e)))?
                .with_read_ahead(self.read_ahead_bytes)
                .counting_into(self.fetched.clone());
            let disk: Box<dyn Disk + Send> = Box::new(cursor);
            let tree = open_tree(disk, &volume).map_err(|source| FilesError::Tree {
                path: self.volume_name(at),
                source,
            })?;
            self.trees.insert(at, tree);
        }
        Ok(self.trees.get_mut(&at).expect("inserted above").as_mut())
    }

    /// The entries of the folder at `path`, sorted folders first, then by name.
    ///
    /// # Errors
    /// As [`Browser::resolve`] and [`FileTree::list`].
    pub fn list(&mut self, path: &FilePath) -> Result<Vec<Entry>, FilesError> {
        let shown = self.display(path.volume, &path.names);
        let mut entries = self
            .tree(path.volume)?
            .list(&path.names)
            .map_err(|source| FilesError::Tree {
                path: shown,
                source,
            })?;
        sort(&mut entries);
        Ok(entries)
    }

    /// The entry at `path`.
    ///
    /// # Errors
    /// As [`FileTree::entry`].
    /// For a data stream (`file:stream`), an entry for the stream alone: a file of that
    /// name and size.
    pub fn entry(&mut self, path: &FilePath) -> Result<Entry, FilesError> {
        let mut shown = self.display(path.volume, &path.names);
        let entry = self
            .tree(path.volume)?
            .entry(&path.names)
            .map_err(|source| FilesError::Tree {
                path: shown.clone(),
                source,
            })?;
        let Some(stream) = &path.stream else {
            return Ok(entry);
        };
        shown.push(':');
        shown.push_str(stream);
        let found = entry
            .streams
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(stream));
        match found {
            Some(s) if entry.kind == EntryKind::File => Ok(Entry {
                name: format!("{}:{}", entry.name, s.name),
                size_bytes: s.size_bytes,
                streams: Vec::new(),
                ..entry
            }),
            _ => Err(FilesError::Tree {
                path: shown,
                source: super::TreeError::NotFound {
                    path: format!("{}:{stream}", path.names.join("/")),
                },
            }),
        }
    }

    /// Everything below the folder `path` whose name contains `pattern` (ignoring case;
    /// `*` and `?` work as in a shell when the pattern has them), folders first at each
    /// level. Folders that cannot be read are skipped and their errors returned beside.
    ///
    /// # Errors
    /// The folder itself cannot be listed, or cancelled.
    pub fn find(
        &mut self,
        path: &FilePath,
        pattern: &str,
        control: &Control,
    ) -> Result<(Vec<Found>, Vec<FilesError>), FilesError> {
        let matcher = NameMatcher::new(pattern);
        let mut found = Vec::new();
        let mut errors = Vec::new();
        let mut pending = vec![(path.names.clone(), self.list(path)?)];
        while let Some((folder, entries)) = pending.pop() {
            control.check().map_err(|e| FilesError::Tree {
                path: self.display(path.volume, &folder),
                source: e.into(),
            })?;
            let mut deeper = Vec::new();
            for entry in entries {
                let mut names = folder.clone();
                names.push(entry.name.clone());
                if entry.kind == EntryKind::Folder && names.len() < MAX_DEPTH {
                    deeper.push(names.clone());
                }
                if matcher.matches(&entry.name) {
                    found.push(Found {
                        path: self.display(path.volume, &names),
                        entry,
                    });
                }
            }
            for names in deeper.into_iter().rev() {
                let at = FilePath {
                    volume: path.volume,
                    names,
                    stream: None,
                };
                match self.list(&at) {
                    Ok(entries) => pending.push((at.names, entries)),
                    Err(e) => errors.push(e),
                }
            }
        }
        Ok((found, errors))
    }

    /// Restores each of `paths` (files, folders with all they hold, links) into the folder
    /// `to`, under its own name, keeping modification times; files' holes and zero runs
    /// stay holes. Nothing is written over: a name already in `to` is an error before
    /// anything is written. Everything is written into a hidden folder in `to` first and
    /// moved in place at the end, so a cancel or a failure leaves `to` as it was.
    ///
    /// # Errors
    /// A path names nothing, a name is taken in `to`, reading or writing failed, or
    /// cancelled.
    pub fn restore(
        &mut self,
        paths: &[FilePath],
        to: &Path,
        control: &Control,
    ) -> Result<Restored, FilesError> {
        super::restore::restore(self, paths, to, None, control)
    }

    /// [`Browser::restore`], giving everything written to `owner` (user and group ids)
    /// before it is moved in place: what a service running as root restores for a user.
    ///
    /// # Errors
    /// As [`Browser::restore`].
    pub fn restore_for(
        &mut self,
        paths: &[FilePath],
        to: &Path,
        owner: (u32, u32),
        control: &Control,
    ) -> Result<Restored, FilesError> {
        super::restore::restore(self, paths, to, Some(owner), control)
    }
}

/// Sorts entries as a file manager shows them: folders first, then by name, ignoring
/// case.
pub fn sort(entries: &mut [Entry]) {
    entries.sort_by(|a, b| {
        (b.kind == EntryKind::Folder)
            .cmp(&(a.kind == EntryKind::Folder))
            .then_with(|| a.name.to_lowercase().cmp(&b.name.to_lowercase()))
            .then_with(|| a.name.cmp(&b.name))
    });
}

/// A name pattern: a piece of a name, or a shell pattern with `*` and `?`; case is
/// ignored.
#[derive(Debug, Clone)]
pub struct NameMatcher {
    pattern: Vec<char>,
    glob: bool,
}

impl NameMatcher {
    /// The matcher of `pattern`.
    #[must_use]
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.to_lowercase().chars().collect(),
            glob: pattern.contains(['*', '?']),
        }
    }

    /// Whether `name` matches.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.to_lowercase().chars().collect();
        if self.glob {
            glob(&self.pattern, &name)
        } else {
            self.pattern.is_empty()
                || name
                    .windows(self.pattern.len())
                    .any(|w| w == self.pattern.as_slice())
        }
    }
}

/// Shell-style matching of `*` and `?`, in linear time (one backtrack point).
fn glob(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some('?') => {
                p += 1;
                n += 1;
            }
            Some(c) if *c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// Whether `file_system` has files Rewind can list.
#[must_use]
pub fn readable(file_system: FileSystem) -> bool {
    !matches!(file_system, FileSystem::Bitlocker | FileSystem::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_by_piece_or_pattern_ignoring_case() {
        assert!(NameMatcher::new("thesis").matches("My Thesis.docx"));
        assert!(!NameMatcher::new("thesis").matches("notes.txt"));
        assert!(NameMatcher::new("*.DOCX").matches("thesis.docx"));
        assert!(!NameMatcher::new("*.docx").matches("thesis.docx.bak"));
        assert!(NameMatcher::new("th?sis*").matches("thesis-final.docx"));
        assert!(NameMatcher::new("größe").matches("GRÖSSE-größe"));
        assert!(NameMatcher::new("").matches("anything"));
        assert!(NameMatcher::new("*a*a*a*a*b").matches(&"a".repeat(60).replace("aa", "ab")));
        assert!(!NameMatcher::new("*a*a*a*a*c").matches(&"a".repeat(5000)));
    }

    #[test]
    fn folders_sort_first_then_names_ignoring_case() {
        let e = |name: &str, kind| Entry {
            name: name.into(),
            kind,
            size_bytes: 0,
            modified: None,
            id: None,
            streams: Vec::new(),
        };
        let mut v = vec![
            e("b.txt", EntryKind::File),
            e("Zeta", EntryKind::Folder),
            e("A.txt", EntryKind::File),
            e("alpha", EntryKind::Folder),
        ];
        sort(&mut v);
        let names: Vec<&str> = v.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["alpha", "Zeta", "A.txt", "b.txt"]);
    }
}
