//! The hidden temporary folder (`.rewind-restore-…`, `.rewind-export-…`) that a file
//! restore or a disk export fills in the target folder before it moves what it made in
//! place, and what removes one that a killed process left there.
//!
//! While the folder exists, a note in Rewind's state folder (`staging/*.json`) says where
//! it is: the target folder's path, the device and inode numbers of the target folder and
//! of the temporary folder, and the user it was made for. The process holds an exclusive
//! `flock` on its note; the kernel drops the lock when the process ends, however it ends.
//! So a note that can be locked belongs to a process that is gone, and
//! [`remove_left`] removes its folder, but only if the target folder and the temporary
//! folder in it are still the very ones made (device and inode), opened as the user they
//! were made for, and everything inside removed relative to folders held open, links never
//! followed. It runs before each new temporary folder is made and when the service starts.
//!
//! Note format (version 1), JSON: `{"version": 1, "target": [bytes of the path],
//! "target_dev": n, "target_ino": n, "name": "…", "dev": n, "ino": n, "owner": [uid, gid] |
//! null}`.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::restore::{Made, remove_contents, remove_made, staging_folder};

/// The folder of notes in a state folder.
const NOTES: &str = "staging";

/// The version of the note's format.
const VERSION: u32 = 1;

/// A temporary file of a note being written is left this long before a sweep removes it
/// (it is locked just after it is made).
const UNFINISHED_NOTE_GRACE: std::time::Duration = std::time::Duration::from_mins(1);

#[derive(Debug, Serialize, Deserialize)]
struct Note {
    version: u32,
    target: Vec<u8>,
    target_dev: u64,
    target_ino: u64,
    name: String,
    dev: u64,
    ino: u64,
    owner: Option<(u32, u32)>,
}

/// A temporary folder made in a target folder, noted (when the note could be written) so
/// that it is removed even if this process is killed.
pub(crate) struct Staging {
    name: String,
    folder: OwnedFd,
    made: Made,
    /// The note and its lock; removed after the folder.
    note: Option<(PathBuf, File)>,
}

impl Staging {
    /// Makes a temporary folder named `prefix…` in `target` (the folder `target_path`, held
    /// open), given to `owner` at once ([`staging_folder`]), noted in the state folder
    /// `state_dir`. Folders that killed processes left are removed first.
    pub(crate) fn make(
        state_dir: &Path,
        target: BorrowedFd<'_>,
        target_path: &Path,
        prefix: &str,
        owner: Option<(u32, u32)>,
    ) -> io::Result<Self> {
        remove_left(state_dir);
        let (name, folder) = staging_folder(target, prefix, owner)?;
        let made = Made::of(&rustix::fs::fstat(&folder)?);
        let target_made = Made::of(&rustix::fs::fstat(target)?);
        // Another process, in another working folder, reads the note.
        let target_path =
            std::path::absolute(target_path).unwrap_or_else(|_| target_path.to_path_buf());
        let note = Note {
            version: VERSION,
            target: target_path.as_os_str().as_bytes().to_vec(),
            target_dev: target_made.dev,
            target_ino: target_made.ino,
            name: name.clone(),
            dev: made.dev,
            ino: made.ino,
            owner,
        };
        // Without a note the restore still works; only a killed one's folder stays.
        let note = write_note(state_dir, &note)
            .inspect_err(|e| {
                tracing::warn!(
                    "could not note the temporary folder {} in {}: {e}",
                    name,
                    state_dir.display()
                );
            })
            .ok();
        Ok(Self {
            name,
            folder,
            made,
            note,
        })
    }

    /// The folder, held open.
    pub(crate) fn folder(&self) -> BorrowedFd<'_> {
        self.folder.as_fd()
    }

    /// Its name in the target folder.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Removes it, with everything in it, from `target` (the folder it was made in), then
    /// its note.
    pub(crate) fn remove(self, target: BorrowedFd<'_>) -> io::Result<()> {
        let Self {
            name,
            folder,
            made,
            note,
        } = self;
        remove_contents(folder.as_fd(), 0)?;
        drop(folder);
        let removed = remove_made(target, name.as_ref(), made);
        if let Some((path, lock)) = note {
            crate::cleanup::remove_file(&path);
            drop(lock);
        }
        removed
    }

    /// Drops the note's lock and the folder without removing either, as a killed process
    /// would.
    #[cfg(test)]
    pub(crate) fn abandon(self) {
        drop(self);
    }
}

/// Writes `note` in `state_dir` and locks it: first under a temporary name, locked, then
/// renamed, so that a sweep never reads a note whose process has not locked it yet.
fn write_note(state_dir: &Path, note: &Note) -> io::Result<(PathBuf, File)> {
    let dir = state_dir.join(NOTES);
    crate::paths::private_dir(&dir, 0o700)?;
    let stem = format!("{}-{}-{}", std::process::id(), note.dev, note.ino);
    let unfinished = dir.join(format!("{stem}.tmp"));
    let fd = rustix::fs::open(
        &unfinished,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive)?;
    let mut file = File::from(fd);
    let written = serde_json::to_vec(note)
        .map_err(io::Error::other)
        .and_then(|bytes| file.write_all(&bytes))
        .and_then(|()| file.sync_all());
    let path = dir.join(format!("{stem}.json"));
    let placed = written.and_then(|()| std::fs::rename(&unfinished, &path));
    if let Err(e) = placed {
        crate::cleanup::remove_file(&unfinished);
        return Err(e);
    }
    Ok((path, file))
}

/// Removes the temporary folders that processes now gone left, as their notes in
/// `state_dir` say, and the notes; returns how many folders were removed. Whatever is not
/// still what the note says is left alone; problems are logged.
pub fn remove_left(state_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir.join(NOTES)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let unfinished = path.extension().is_some_and(|e| e == "tmp");
        if unfinished {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > UNFINISHED_NOTE_GRACE);
            if old && lock_if_free(&path).is_some() {
                crate::cleanup::remove_file(&path);
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        // Locked: its process still runs.
        let Some(file) = lock_if_free(&path) else {
            continue;
        };
        let note = read_note(&file);
        // The note goes first (while locked): should its folder's file system hang (a
        // network share that is gone), only this sweep waits, not every restore after it.
        crate::cleanup::remove_file(&path);
        drop(file);
        match note.and_then(|note| remove_noted(&note)) {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "could not remove a temporary folder that a killed restore or export left \
                 ({}): {e}",
                path.display()
            ),
        }
    }
    if removed > 0 {
        tracing::info!(
            "removed {removed} temporary folder(s) that killed restores or exports left"
        );
    }
    removed
}

/// The note at `path`, opened and locked, unless a process holds its lock.
fn lock_if_free(path: &Path) -> Option<File> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(File::from(fd))
}

fn read_note(file: &File) -> io::Result<Note> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    file.take(64 << 10).read_to_end(&mut bytes)?;
    let note: Note = serde_json::from_slice(&bytes).map_err(io::Error::other)?;
    if note.version != VERSION {
        return Err(io::Error::other(format!(
            "a note of version {} (this Rewind reads version {VERSION})",
            note.version
        )));
    }
    Ok(note)
}

/// Removes the folder `note` names, if the target folder and it are still the ones made;
/// whether it did.
fn remove_noted(note: &Note) -> io::Result<bool> {
    let target_path = PathBuf::from(std::ffi::OsString::from_vec(note.target.clone()));
    let target = match super::restore::open_target(&target_path, note.owner, false, "") {
        Ok(target) => target,
        // The folder is gone (a drive unplugged, or removed): nothing of it to remove.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let stat = rustix::fs::fstat(&target)?;
    if Made::of(&stat) != Made::of_numbers(note.target_dev, note.target_ino) {
        return Ok(false);
    }
    match remove_made(
        target.as_fd(),
        note.name.as_ref(),
        Made::of_numbers(note.dev, note.ino),
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> OwnedFd {
        rustix::fs::open(path, super::super::restore::FOLDER, Mode::empty()).unwrap()
    }

    fn notes(state: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(state.join(NOTES))
            .map(|e| e.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    /// A temporary folder with a file and a folder in it, as a restore fills it.
    fn filled(state: &Path, target: &Path) -> (Staging, PathBuf) {
        let held = open(target);
        let staging = Staging::make(state, held.as_fd(), target, ".rewind-test-", None).unwrap();
        let path = target.join(staging.name());
        std::fs::create_dir(path.join("docs")).unwrap();
        std::fs::write(path.join("docs/thesis.txt"), b"words").unwrap();
        (staging, path)
    }

    #[test]
    fn a_folder_is_noted_while_it_exists_and_removed_with_its_note() {
        let state = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        let (staging, path) = filled(state.path(), target.path());
        assert_eq!(notes(state.path()).len(), 1);
        // Its process runs: a sweep leaves it.
        assert_eq!(remove_left(state.path()), 0);
        assert!(path.join("docs/thesis.txt").exists());
        staging.remove(open(target.path()).as_fd()).unwrap();
        assert!(!path.exists());
        assert!(notes(state.path()).is_empty());
    }

    #[test]
    fn what_a_killed_process_left_is_removed_by_the_next_and_nothing_else() {
        let state = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        std::fs::write(target.path().join("mine.txt"), b"keep").unwrap();
        let (staging, path) = filled(state.path(), target.path());
        std::fs::write(path.join("left.txt"), b"half").unwrap();
        staging.abandon();
        // The next temporary folder removes it first (and may take its free name).
        let (next, next_path) = filled(state.path(), target.path());
        assert!(
            !path.join("left.txt").exists(),
            "the killed one's folder is removed"
        );
        assert!(
            next_path.join("docs/thesis.txt").exists(),
            "the live one stays"
        );
        assert_eq!(notes(state.path()).len(), 1);
        next.remove(open(target.path()).as_fd()).unwrap();
        let left: Vec<_> = std::fs::read_dir(target.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["mine.txt"]);
        assert!(notes(state.path()).is_empty());
    }

    #[test]
    fn a_folder_swapped_in_under_the_noted_name_or_target_is_left_alone() {
        let state = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        // Another folder under the temporary folder's name.
        let (staging, path) = filled(state.path(), target.path());
        staging.abandon();
        std::fs::rename(&path, target.path().join("moved")).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("other.txt"), b"someone's").unwrap();
        assert_eq!(remove_left(state.path()), 0);
        assert!(path.join("other.txt").exists());
        assert!(notes(state.path()).is_empty(), "the note goes");
        // The target folder swapped for a link to another folder holding the same name.
        let elsewhere = tempfile::tempdir().unwrap();
        let real = target.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let (staging, path) = filled(state.path(), &real);
        staging.abandon();
        let name = path.file_name().unwrap().to_owned();
        std::fs::rename(&real, target.path().join("real-moved")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &real).unwrap();
        std::fs::create_dir(elsewhere.path().join(&name)).unwrap();
        std::fs::write(elsewhere.path().join(&name).join("x"), b"x").unwrap();
        assert_eq!(remove_left(state.path()), 0);
        assert!(elsewhere.path().join(&name).join("x").exists());
        assert!(target.path().join("real-moved").join(&name).exists());
    }

    /// A service (root) removes what it left in a user's folder as that user would find it:
    /// the folder is opened as the user.
    #[test]
    fn what_a_killed_service_left_in_a_users_folder_is_removed() {
        use std::os::unix::fs::PermissionsExt as _;
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let theirs = base.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        let user = (65534, 65534);
        std::os::unix::fs::chown(&theirs, Some(user.0), Some(user.1)).unwrap();
        let held = super::super::restore::open_target(&theirs, Some(user), false, "").unwrap();
        let staging = Staging::make(
            state.path(),
            held.as_fd(),
            &theirs,
            ".rewind-test-",
            Some(user),
        )
        .unwrap();
        let path = theirs.join(staging.name());
        std::fs::write(path.join("half.bin"), b"half").unwrap();
        staging.abandon();
        assert_eq!(remove_left(state.path()), 1);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    }

    #[test]
    fn a_damaged_or_foreign_note_is_removed_and_touches_nothing() {
        let state = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        std::fs::create_dir(state.path().join(NOTES)).unwrap();
        std::fs::write(state.path().join(NOTES).join("1-2-3.json"), b"{not json").unwrap();
        let note = Note {
            version: 99,
            target: target.path().as_os_str().as_bytes().to_vec(),
            target_dev: 0,
            target_ino: 0,
            name: "x".into(),
            dev: 0,
            ino: 0,
            owner: None,
        };
        std::fs::write(
            state.path().join(NOTES).join("4-5-6.json"),
            serde_json::to_vec(&note).unwrap(),
        )
        .unwrap();
        std::fs::create_dir(target.path().join("x")).unwrap();
        assert_eq!(remove_left(state.path()), 0);
        assert!(notes(state.path()).is_empty());
        assert!(target.path().join("x").exists());
    }
}
