//! Restoring files and folders from a checkpoint's volume to a folder of the host.
//!
//! What a volume says is input anyone may have written: names that the host cannot hold
//! (`..`, a `/`) are skipped, never joined to a path; links are made as links and never
//! followed; nothing that exists is written over; and folders deeper than
//! [`MAX_DEPTH`](super::browse::MAX_DEPTH) are not followed.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::browse::{Browser, FilePath, MAX_DEPTH, Restored};
use super::{EntryKind, FileTree, FilesError, Timestamp, TreeError, usable_name};
use crate::progress::Control;

/// Runs of zeros at least this long (and aligned to it) are left as holes.
const HOLE_BLOCK: usize = 64 << 10;

pub(super) fn restore(
    browser: &mut Browser,
    paths: &[FilePath],
    to: &Path,
    owner: Option<(u32, u32)>,
    control: &Control,
) -> Result<Restored, FilesError> {
    let output = |source: io::Error, path: &Path| FilesError::Output {
        path: path.to_path_buf(),
        source,
    };
    if !to.is_dir() {
        return Err(output(
            io::Error::new(io::ErrorKind::NotFound, "no such folder"),
            to,
        ));
    }
    let plan = plan(browser, paths, to)?;
    // The bytes to write, for progress.
    let mut total = 0;
    for (path, _, entry) in &plan {
        total += match entry.kind {
            EntryKind::File => entry.size_bytes,
            EntryKind::Folder => folder_bytes(browser, path, control)?,
            _ => 0,
        };
    }
    control.add_total_bytes(total);

    let staging = staging_folder(to).map_err(|e| output(e, to))?;
    let mut moved: Vec<PathBuf> = Vec::new();
    let result = (|| {
        let mut done = Restored::default();
        for (path, name, entry) in &plan {
            let shown = browser.display(path.volume, &path.names);
            let tree = browser.tree(path.volume)?;
            let mut job = Job {
                tree,
                shown: &shown,
                control,
                done: &mut done,
                stream: path.stream.as_deref(),
            };
            job.copy(
                &path.names,
                entry.kind,
                entry.modified,
                &staging.join(name),
                0,
            )?;
        }
        if let Some(owner) = owner {
            for (_, name, _) in &plan {
                hand_over(&staging.join(name), owner).map_err(|e| output(e, &to.join(name)))?;
            }
        }
        for (_, name, _) in &plan {
            let target = to.join(name);
            rename_no_replace(&staging.join(name), &target).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    FilesError::Exists {
                        path: target.clone(),
                    }
                } else {
                    output(e, &target)
                }
            })?;
            moved.push(target);
        }
        done.written.clone_from(&moved);
        Ok(done)
    })();
    if result.is_err() {
        // All or nothing: what was already moved in place goes too.
        for path in &moved {
            if let Err(e) = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path)) {
                tracing::warn!("could not remove {}: {e}", path.display());
            }
        }
    }
    if let Err(e) = fs::remove_dir_all(&staging) {
        tracing::warn!("could not remove {}: {e}", staging.display());
    }
    result
}

/// What each path is, and the name it gets in `to`: an error if a name is taken there.
fn plan(
    browser: &mut Browser,
    paths: &[FilePath],
    to: &Path,
) -> Result<Vec<(FilePath, String, super::Entry)>, FilesError> {
    let mut plan = Vec::new();
    for path in paths {
        let entry = browser.entry(path)?;
        let name = match path.names.last() {
            // A data stream is restored as `file:stream`, as ntfs-3g names it.
            Some(_) if path.stream.is_some() => entry.name.clone(),
            Some(name) => name.clone(),
            None => browser
                .volume(path.volume)
                .and_then(|v| v.label.clone())
                .filter(|l| usable_name(l))
                .unwrap_or_else(|| browser.volume_name(path.volume).replace('/', "-")),
        };
        if !usable_name(&name) {
            return Err(FilesError::Output {
                path: to.join(&name),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the name cannot be used on this computer",
                ),
            });
        }
        if plan
            .iter()
            .any(|(_, n, _): &(FilePath, String, _)| *n == name)
            || fs::symlink_metadata(to.join(&name)).is_ok()
        {
            return Err(FilesError::Exists {
                path: to.join(&name),
            });
        }
        plan.push((path.clone(), name, entry));
    }
    Ok(plan)
}

/// The bytes of the files below `path`.
fn folder_bytes(
    browser: &mut Browser,
    path: &FilePath,
    control: &Control,
) -> Result<u64, FilesError> {
    let mut total = 0;
    let mut pending = vec![(path.names.clone(), 0)];
    while let Some((names, depth)) = pending.pop() {
        control.check().map_err(|e| FilesError::Tree {
            path: browser.display(path.volume, &names),
            source: e.into(),
        })?;
        let at = FilePath {
            volume: path.volume,
            names,
            stream: None,
        };
        for entry in browser.list(&at)? {
            match entry.kind {
                EntryKind::File => total += entry.size_bytes,
                EntryKind::Folder if depth + 1 < MAX_DEPTH && usable_name(&entry.name) => {
                    let mut names = at.names.clone();
                    names.push(entry.name);
                    pending.push((names, depth + 1));
                }
                _ => {}
            }
        }
    }
    Ok(total)
}

/// A hidden, private folder in `to` to write into before moving in place.
fn staging_folder(to: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    for n in 0..1000 {
        let path = to.join(format!(".rewind-restore-{}-{n}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free name for a temporary folder",
    ))
}

/// Gives `path` and everything below it to `owner`, links themselves never followed.
/// `path` is in the private staging folder, which only its writer can enter.
fn hand_over(path: &Path, owner: (u32, u32)) -> io::Result<()> {
    let (uid, gid) = (
        rustix::fs::Uid::from_raw(owner.0),
        rustix::fs::Gid::from_raw(owner.1),
    );
    let mut pending = vec![path.to_path_buf()];
    while let Some(p) = pending.pop() {
        let meta = fs::symlink_metadata(&p)?;
        rustix::fs::chownat(
            rustix::fs::CWD,
            &p,
            Some(uid),
            Some(gid),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if meta.is_dir() {
            for e in fs::read_dir(&p)? {
                pending.push(e?.path());
            }
        }
    }
    Ok(())
}

/// Moves `from` to `to`, failing if `to` exists.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(io::Error::from)
}

fn system_time(t: Timestamp) -> Option<SystemTime> {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    if t.seconds >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t.seconds.unsigned_abs()) + nanos)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.seconds.unsigned_abs()))?
            .checked_add(nanos)
    }
}

/// One restore's walk through a volume.
struct Job<'a> {
    tree: &'a mut dyn FileTree,
    shown: &'a str,
    control: &'a Control,
    done: &'a mut Restored,
    /// The data stream to restore of the file at the top, if one was named.
    stream: Option<&'a str>,
}

impl Job<'_> {
    fn tree_error(&self, names: &[String], base: usize, source: TreeError) -> FilesError {
        let mut path = self.shown.to_owned();
        for n in &names[base..] {
            path.push('/');
            path.push_str(n);
        }
        FilesError::Tree { path, source }
    }

    fn copy(
        &mut self,
        names: &[String],
        kind: EntryKind,
        modified: Option<Timestamp>,
        dest: &Path,
        depth: usize,
    ) -> Result<(), FilesError> {
        let base = names.len() - depth.min(names.len());
        let output = |source, path: &Path| FilesError::Output {
            path: path.to_path_buf(),
            source,
        };
        self.control
            .check()
            .map_err(|e| self.tree_error(names, base, e.into()))?;
        match kind {
            EntryKind::File => {
                let file = File::options()
                    .write(true)
                    .create_new(true)
                    .open(dest)
                    .map_err(|e| output(e, dest))?;
                let mut sparse = SparseFile { file, at: 0 };
                let n = self
                    .tree
                    .read(
                        names,
                        self.stream.filter(|_| depth == 0),
                        &mut sparse,
                        self.control,
                    )
                    .map_err(|e| self.tree_error(names, base, e))?;
                sparse.finish(modified).map_err(|e| output(e, dest))?;
                self.done.files += 1;
                self.done.bytes += n;
            }
            EntryKind::Folder => {
                fs::create_dir(dest).map_err(|e| output(e, dest))?;
                self.done.folders += 1;
                let entries = self
                    .tree
                    .list(names)
                    .map_err(|e| self.tree_error(names, base, e))?;
                for entry in entries {
                    let mut child = names.to_vec();
                    child.push(entry.name.clone());
                    let shown = || {
                        let mut p = self.shown.to_owned();
                        for n in &child[base..] {
                            p.push('/');
                            p.push_str(n);
                        }
                        p
                    };
                    if !usable_name(&entry.name) {
                        self.done
                            .skipped
                            .push((shown(), "its name cannot be used on this computer".into()));
                        continue;
                    }
                    if entry.kind == EntryKind::Folder && depth + 1 >= MAX_DEPTH {
                        self.done
                            .skipped
                            .push((shown(), format!("it is more than {MAX_DEPTH} folders deep")));
                        continue;
                    }
                    if entry.kind == EntryKind::Other {
                        self.done
                            .skipped
                            .push((shown(), "it is not a file, a folder or a link".into()));
                        continue;
                    }
                    self.copy(
                        &child,
                        entry.kind,
                        entry.modified,
                        &dest.join(&entry.name),
                        depth + 1,
                    )?;
                }
                if let Some(t) = modified.and_then(system_time) {
                    File::open(dest)
                        .and_then(|f| f.set_modified(t))
                        .map_err(|e| output(e, dest))?;
                }
            }
            EntryKind::Symlink => {
                let target = self
                    .tree
                    .read_link(names)
                    .map_err(|e| self.tree_error(names, base, e))?;
                std::os::unix::fs::symlink(&target, dest).map_err(|e| output(e, dest))?;
                self.done.links += 1;
            }
            EntryKind::Other => {
                return Err(self.tree_error(
                    names,
                    base,
                    TreeError::NotAFile {
                        path: names.join("/"),
                    },
                ));
            }
        }
        Ok(())
    }
}

/// A new file written from its start, where aligned runs of zeros are skipped (holes).
struct SparseFile {
    file: File,
    at: u64,
}

impl SparseFile {
    /// Sets the length (a hole at the end) and the modification time.
    fn finish(self, modified: Option<Timestamp>) -> io::Result<()> {
        self.file.set_len(self.at)?;
        if let Some(t) = modified.and_then(system_time) {
            self.file.set_modified(t)?;
        }
        Ok(())
    }
}

impl Write for SparseFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            // Up to the next HOLE_BLOCK boundary of the file.
            let within = usize::try_from(self.at % HOLE_BLOCK as u64).expect("small");
            let n = (HOLE_BLOCK - within).min(buf.len() - done);
            let piece = &buf[done..done + n];
            if !(n == HOLE_BLOCK && piece.iter().all(|b| *b == 0)) {
                self.file.write_all_at(piece, self.at)?;
            }
            self.at += n as u64;
            done += n;
        }
        Ok(done)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
