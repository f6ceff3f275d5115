//! Restoring files and folders from a checkpoint's volume to a folder of the host.
//!
//! What a volume says is input anyone may have written: names that the host cannot hold
//! (`..`, a `/`) are skipped, never joined to a path; links are made as links and never
//! followed; nothing that exists is written over; and folders deeper than
//! [`MAX_DEPTH`](super::browse::MAX_DEPTH) are not followed.
//!
//! The host's folders are not to be trusted either: a service running as root restores
//! into a folder of the user who asked, and that user could swap the folder, or anything
//! in it, for a link while the restore runs. So the target folder is opened once (never
//! through a link at its end; for a user, as that user, and only if they may write in it),
//! and everything after is done relative to folders held open: the staging folder is made
//! in the target's, each new folder is opened in its parent, files are created there and
//! never through a link, owners and times are set on what is held open, and the finished
//! items are moved from the staging folder's handle to the target's. What is removed after
//! a failure or a cancel is removed only if it is still what the restore made (its device
//! and inode numbers), through folders held open, links never followed.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::browse::{Browser, FilePath, MAX_DEPTH, Restored};
use super::staging::Staging;
use super::{EntryKind, FileTree, FilesError, Timestamp, TreeError, usable_name};
use crate::progress::Control;

/// Runs of zeros at least this long (and aligned to it) are left as holes.
const HOLE_BLOCK: usize = 64 << 10;

/// How a folder is opened: for reading its entries, never through a link.
pub(crate) const FOLDER: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

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
    let target = open_target(to, owner, false, "to restore into").map_err(|e| output(e, to))?;
    let plan = plan(browser, paths, to, target.as_fd())?;
    // The bytes to write, for progress. This walks each folder's listings once more than
    // the copy needs; the copy's walk is not given them because it costs little: the chunks
    // the first walk fetched are in the cursor's cache, and listing 10,000 files in 100
    // folders again took 13 ms where restoring them took 1.8 to 7 s (release build,
    // `restoring_ten_thousand_files_timing` in tests.rs). Where files are large enough to
    // push the folders' chunks out of the cache, copying them costs far more still.
    let mut total = 0;
    for (path, _, entry) in &plan {
        total += match entry.kind {
            EntryKind::File => entry.size_bytes,
            EntryKind::Folder => folder_bytes(browser, path, control)?,
            _ => 0,
        };
    }
    control.add_total_bytes(total);

    let staging = Staging::make(
        &crate::paths::state_dir(),
        target.as_fd(),
        to,
        ".rewind-restore-",
        owner,
    )
    .map_err(|e| output(e, to))?;
    let staging_path = to.join(staging.name());
    let mut moved: Vec<(&str, Made)> = Vec::new();
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
                owner,
            };
            job.copy(
                &path.names,
                entry.kind,
                entry.modified,
                Dest {
                    parent: staging.folder(),
                    name,
                    path: &staging_path.join(name),
                },
                0,
            )?;
        }
        crate::fault::point("files-staged").map_err(|e| output(io::Error::other(e), to))?;
        for (_, name, _) in &plan {
            let path = to.join(name);
            let made =
                rustix::fs::statat(staging.folder(), name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| output(e.into(), &staging_path.join(name)))?;
            rustix::fs::renameat_with(
                staging.folder(),
                name.as_str(),
                &target,
                name.as_str(),
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(|e| match e {
                Errno::EXIST => FilesError::Exists { path: path.clone() },
                e => output(e.into(), &path),
            })?;
            moved.push((name, Made::of(&made)));
            done.written.push(path);
        }
        Ok(done)
    })();
    if result.is_err() {
        // All or nothing: what was already moved in place goes too.
        for (name, made) in &moved {
            if let Err(e) = remove_made(target.as_fd(), OsStr::new(name), *made) {
                tracing::warn!("could not remove {}: {e}", to.join(name).display());
            }
        }
    }
    if let Err(e) = staging.remove(target.as_fd()) {
        tracing::warn!("could not remove {}: {e}", staging_path.display());
    }
    result
}

/// What tells one file from another, whatever its name: its device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Made {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl Made {
    pub(crate) fn of(stat: &rustix::fs::Stat) -> Self {
        Self::of_numbers(stat.st_dev, stat.st_ino)
    }

    pub(crate) fn of_numbers(dev: u64, ino: u64) -> Self {
        Self { dev, ino }
    }
}

/// Opens the folder `to` (first made with the folders above it if `make`), never through a
/// link at its end. For a service writing for a user (`owner`, when this process is root),
/// it is made and opened as that user, and only if that user may write in it: the folder
/// checked is the folder written in. `purpose` ends the message for a file that is not a
/// folder ("to restore into").
pub(crate) fn open_target(
    to: &Path,
    owner: Option<(u32, u32)>,
    make: bool,
    purpose: &str,
) -> io::Result<OwnedFd> {
    let open = || {
        if make {
            std::fs::create_dir_all(to)?;
        }
        rustix::fs::openat(rustix::fs::CWD, to, FOLDER, Mode::empty()).map_err(|e| match e {
            Errno::NOENT => io::Error::new(io::ErrorKind::NotFound, "no such folder"),
            // O_NOFOLLOW with O_DIRECTORY says ENOTDIR for a link.
            Errno::LOOP | Errno::NOTDIR
                if rustix::fs::statat(rustix::fs::CWD, to, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|s| rustix::fs::FileType::from_raw_mode(s.st_mode).is_symlink()) =>
            {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "it is a symbolic link: choose the folder it points to",
                )
            }
            Errno::NOTDIR => io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("it is not a folder: choose a folder {purpose}"),
            ),
            e => e.into(),
        })
    };
    match owner {
        Some((uid, gid)) if uid != 0 && rustix::process::geteuid().is_root() => {
            let groups = crate::identity::groups_of(uid, gid);
            crate::identity::as_user(uid, gid, &groups, || {
                let folder = open()?;
                rustix::fs::accessat(
                    &folder,
                    ".",
                    rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
                    AtFlags::EACCESS,
                )?;
                Ok(folder)
            })
        }
        _ => open(),
    }
}

/// What each path is, and the name it gets in `to` (held open as `target`): an error if a
/// name is taken there.
fn plan(
    browser: &mut Browser,
    paths: &[FilePath],
    to: &Path,
    target: BorrowedFd<'_>,
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
            || rustix::fs::statat(target, name.as_str(), AtFlags::SYMLINK_NOFOLLOW).is_ok()
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

/// A hidden, private folder in `target` to write into before moving in place (named
/// `prefix`, this process's id and a number): its name, and the folder held open. For a
/// service writing for a user, the folder is given to `owner` at once (as everything made
/// in it is), so that what a killed service leaves in the user's folder is theirs to
/// remove: everything after is done relative to folders held open, so the user gains
/// nothing over the restore by owning it.
pub(crate) fn staging_folder(
    target: BorrowedFd<'_>,
    prefix: &str,
    owner: Option<(u32, u32)>,
) -> io::Result<(String, OwnedFd)> {
    for n in 0..1000 {
        let name = format!("{prefix}{}-{n}", std::process::id());
        match rustix::fs::mkdirat(target, name.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
        let folder = rustix::fs::openat(target, name.as_str(), FOLDER, Mode::empty())?;
        // Whoever may write in the target folder could have put a folder of someone else's
        // in the new one's place (renamed within the target folder; into it from elsewhere
        // needs write permission on the folder itself). The one made here is empty; so the
        // worst a swap can do is have the restore write into, and remove, an empty folder,
        // which that user could remove themselves. (Its owner is no test: on FAT, exFAT and
        // NTFS a mount option gives every file one owner.)
        if !entries(folder.as_fd())?.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the temporary folder {name} was replaced while in use"),
            ));
        }
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(
                &folder,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )?;
        }
        return Ok((name, folder));
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free name for a temporary folder",
    ))
}

/// The names in `folder`, without `.` and `..`.
fn entries(folder: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(folder)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name));
        }
    }
    Ok(names)
}

/// Removes `name` in `parent`, which this restore made as `made` (and, if it is a folder,
/// everything in it), unless it is no longer that: a user who swapped something else in
/// under its name does not have it removed.
pub(crate) fn remove_made(parent: BorrowedFd<'_>, name: &OsStr, made: Made) -> io::Result<()> {
    let replaced = || io::Error::other("it was replaced by something else, which is left alone");
    let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if Made::of(&stat) != made {
        return Err(replaced());
    }
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Directory {
        return rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(io::Error::from);
    }
    let folder = rustix::fs::openat(parent, name, FOLDER, Mode::empty())?;
    if Made::of(&rustix::fs::fstat(&folder)?) != made {
        return Err(replaced());
    }
    remove_contents(folder.as_fd(), 0)?;
    // Were it swapped again now, for a folder that is not empty, this fails.
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR).map_err(io::Error::from)
}

/// Removes everything in `folder`, relative to folders held open: links are removed,
/// never followed.
pub(crate) fn remove_contents(folder: BorrowedFd<'_>, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other("the folder is too deep to remove"));
    }
    for name in entries(folder)? {
        match rustix::fs::unlinkat(folder, &name, AtFlags::empty()) {
            Err(Errno::ISDIR) => {}
            other => {
                other?;
                continue;
            }
        }
        let child = rustix::fs::openat(folder, &name, FOLDER, Mode::empty())?;
        remove_contents(child.as_fd(), depth + 1)?;
        rustix::fs::unlinkat(folder, &name, AtFlags::REMOVEDIR)?;
    }
    Ok(())
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
    /// Who gets everything written (user and group), if not this process's user.
    owner: Option<(u32, u32)>,
}

/// Where one item is written: a name in a folder held open (its path, for messages).
#[derive(Clone, Copy)]
struct Dest<'a> {
    parent: BorrowedFd<'a>,
    name: &'a str,
    path: &'a Path,
}

impl Dest<'_> {
    /// Writing it failed.
    fn error(&self, source: impl Into<io::Error>) -> FilesError {
        FilesError::Output {
            path: self.path.to_path_buf(),
            source: source.into(),
        }
    }
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

    fn owner_ids(&self) -> Option<(rustix::fs::Uid, rustix::fs::Gid)> {
        self.owner.map(|(uid, gid)| {
            (
                rustix::fs::Uid::from_raw(uid),
                rustix::fs::Gid::from_raw(gid),
            )
        })
    }

    fn copy(
        &mut self,
        names: &[String],
        kind: EntryKind,
        modified: Option<Timestamp>,
        dest: Dest<'_>,
        depth: usize,
    ) -> Result<(), FilesError> {
        let base = names.len() - depth.min(names.len());
        self.control
            .check()
            .map_err(|e| self.tree_error(names, base, e.into()))?;
        match kind {
            EntryKind::File => self.copy_file(names, modified, dest, depth, base)?,
            EntryKind::Folder => self.copy_folder(names, modified, dest, depth, base)?,
            EntryKind::Symlink => {
                let target = self
                    .tree
                    .read_link(names)
                    .map_err(|e| self.tree_error(names, base, e))?;
                rustix::fs::symlinkat(target.as_str(), dest.parent, dest.name)
                    .map_err(|e| dest.error(e))?;
                if let Some((uid, gid)) = self.owner_ids() {
                    rustix::fs::chownat(
                        dest.parent,
                        dest.name,
                        Some(uid),
                        Some(gid),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| dest.error(e))?;
                }
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

    /// Writes the file at `names` (or its stream) as `dest`.
    fn copy_file(
        &mut self,
        names: &[String],
        modified: Option<Timestamp>,
        dest: Dest<'_>,
        depth: usize,
        base: usize,
    ) -> Result<(), FilesError> {
        let file = rustix::fs::openat(
            dest.parent,
            dest.name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        )
        .map_err(|e| dest.error(e))?;
        let mut sparse = SparseFile {
            file: File::from(file),
            at: 0,
        };
        let n = self
            .tree
            .read(
                names,
                self.stream.filter(|_| depth == 0),
                &mut sparse,
                self.control,
            )
            .map_err(|e| self.tree_error(names, base, e))?;
        if let Some((uid, gid)) = self.owner_ids() {
            rustix::fs::fchown(&sparse.file, Some(uid), Some(gid)).map_err(|e| dest.error(e))?;
        }
        sparse.finish(modified).map_err(|e| dest.error(e))?;
        self.done.files += 1;
        self.done.bytes += n;
        Ok(())
    }

    /// Makes the folder `dest` and copies what the folder at `names` holds into it.
    fn copy_folder(
        &mut self,
        names: &[String],
        modified: Option<Timestamp>,
        dest: Dest<'_>,
        depth: usize,
        base: usize,
    ) -> Result<(), FilesError> {
        rustix::fs::mkdirat(dest.parent, dest.name, Mode::from_raw_mode(0o777))
            .map_err(|e| dest.error(e))?;
        let folder = File::from(
            rustix::fs::openat(dest.parent, dest.name, FOLDER, Mode::empty())
                .map_err(|e| dest.error(e))?,
        );
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
                Dest {
                    parent: folder.as_fd(),
                    name: &entry.name,
                    path: &dest.path.join(&entry.name),
                },
                depth + 1,
            )?;
        }
        if let Some((uid, gid)) = self.owner_ids() {
            rustix::fs::fchown(&folder, Some(uid), Some(gid)).map_err(|e| dest.error(e))?;
        }
        if let Some(t) = modified.and_then(system_time) {
            folder.set_modified(t).map_err(|e| dest.error(e))?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn open(path: &Path) -> OwnedFd {
        rustix::fs::openat(rustix::fs::CWD, path, FOLDER, Mode::empty()).unwrap()
    }

    #[test]
    fn a_staging_folder_for_a_user_is_theirs_from_the_start() {
        use std::os::unix::fs::MetadataExt as _;
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: giving a folder to another user needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let target = open(tmp.path());
        let (name, _held) =
            staging_folder(target.as_fd(), ".rewind-test-", Some((65534, 65533))).unwrap();
        let made = std::fs::metadata(tmp.path().join(&name)).unwrap();
        assert_eq!((made.uid(), made.gid()), (65534, 65533));
        assert_eq!(made.mode() & 0o777, 0o700);
        // Without a user, it stays this process's.
        let (mine, _held) = staging_folder(target.as_fd(), ".rewind-test-", None).unwrap();
        let made = std::fs::metadata(tmp.path().join(mine)).unwrap();
        assert_eq!(made.uid(), rustix::process::geteuid().as_raw());
    }

    #[test]
    fn what_a_restore_made_is_removed_without_following_links_and_a_swapped_in_folder_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        let to = tmp.path().join("to");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(to.join("made/inner")).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep.txt"), b"keep").unwrap();
        std::fs::write(to.join("made/inner/file"), b"x").unwrap();
        symlink(&elsewhere, to.join("made/inner/link")).unwrap();
        let target = open(&to);
        let made =
            Made::of(&rustix::fs::statat(&target, "made", AtFlags::SYMLINK_NOFOLLOW).unwrap());

        // Swapped for another folder: that one stays, with what it holds.
        std::fs::rename(to.join("made"), to.join("moved away")).unwrap();
        std::fs::create_dir(to.join("made")).unwrap();
        std::fs::write(to.join("made/theirs.txt"), b"theirs").unwrap();
        remove_made(target.as_fd(), OsStr::new("made"), made).unwrap_err();
        assert_eq!(
            std::fs::read(to.join("made/theirs.txt")).unwrap(),
            b"theirs"
        );
        // So does a link put in its place.
        std::fs::remove_dir_all(to.join("made")).unwrap();
        symlink(&elsewhere, to.join("made")).unwrap();
        remove_made(target.as_fd(), OsStr::new("made"), made).unwrap_err();
        assert!(elsewhere.join("keep.txt").exists());

        // The folder it made goes, with everything in it; a link in it is not followed.
        std::fs::remove_file(to.join("made")).unwrap();
        std::fs::rename(to.join("moved away"), to.join("made")).unwrap();
        remove_made(target.as_fd(), OsStr::new("made"), made).unwrap();
        assert!(!to.join("made").exists());
        assert_eq!(std::fs::read(elsewhere.join("keep.txt")).unwrap(), b"keep");
    }
}
