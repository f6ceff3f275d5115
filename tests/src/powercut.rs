//! The power-cut harness of issue 19: a drive that forgets what was not made durable.
//!
//! [`Drive`] mounts a FUSE file system ([`fuser`]) that keeps every file and folder in
//! memory twice: as programs see it now, and as it would come back after a power cut. The
//! second copy moves forward only when something is made durable:
//!
//! - `fsync` / `fdatasync` of a file: that file's content (and length);
//! - `fsync` of a folder: that folder's entries (creations, renames, removals in it);
//! - `syncfs` of the mount, or `sync`: everything. FUSE does not pass these on, so the
//!   thread that drives the store runs under a seccomp filter that stops them until the
//!   drive has taken note ([`crate::sync_watch`]); see [`Drive::run`].
//!
//! Nothing else is durable: not a `write`, not a `rename` or `unlink`, not a `close`.
//!
//! The power is cut at the Nth mutating operation (create, mkdir, write, truncate, rename,
//! unlink, rmdir, fsync, fsync of a folder, syncfs): that one and every later operation
//! fails with `EIO`, as if the drive had gone. [`Model::write_image`] then writes what the
//! drive would show after power comes back into a real folder, in one of three ways
//! ([`Survivors`]), from the strict "only what was synced" to "every name change made it,
//! but unsynced contents are torn" (empty, zeros, a prefix, or with pages of zeros). All
//! of them are states a real file system may leave (ext4, XFS, btrfs and FAT each show
//! some), so a store has to survive every one.
//!
//! Limits of the model: a file's content is durable as a whole at an fsync (a real drive
//! may tear a single write in the middle of a sector; the torn variants cover what a
//! program can tell apart); metadata such as modes and times is not modelled; hard links
//! and symlinks are refused; reads after the cut fail even where a real kernel would serve
//! its cache.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};

use crate::HarnessError;
use crate::sync_watch::{self, SyncCall};

/// The file system's name in `/proc/self/mountinfo` (how leftovers are recognised).
const FS_NAME: &str = "rewind-powercut";
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;
/// How many operations before a cut its report lists.
const RECENT: usize = 6;

/// What comes back after the power does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survivors {
    /// Only what was made durable: unsynced entries are gone, unsynced contents are the
    /// last synced ones (empty for a file never synced).
    SyncedOnly,
    /// Every name change made it (as on a file system that journals names but not data),
    /// while every content not synced since it last changed is torn: zeros, a prefix, or
    /// pages of zeros in it.
    AllNames,
    /// Each folder at random one way or the other, and each unsynced content at random
    /// anything from "as last synced" to "as last written" through torn.
    Mixed,
}

impl Survivors {
    /// The three, for campaigns that rotate through them.
    pub const ALL: [Self; 3] = [Self::SyncedOnly, Self::AllNames, Self::Mixed];
}

impl std::fmt::Display for Survivors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SyncedOnly => "synced-only",
            Self::AllNames => "all-names",
            Self::Mixed => "mixed",
        })
    }
}

/// Where and when the power was cut.
#[derive(Debug, Clone)]
pub struct Cut {
    /// The operation that failed first (1 = the first mutating operation after mounting).
    pub op: u64,
    /// The phase the program had announced ([`Model::set_phase`]).
    pub phase: String,
    /// What that operation was.
    pub what: String,
    /// The operations just before it, oldest first.
    pub before: Vec<String>,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "op {} in phase {:?}: {} (after: {})",
            self.op,
            self.phase,
            self.what,
            self.before.join("; ")
        )
    }
}

/// The operations one phase of a program made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseSpan {
    /// The phase's name.
    pub name: String,
    /// Its first mutating operation.
    pub first: u64,
    /// Its last one (`first - 1` when it made none).
    pub last: u64,
}

impl PhaseSpan {
    /// How many mutating operations it made.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.last + 1 - self.first
    }

    /// Whether it made none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the image of the drive holds that the program did not leave that way.
#[derive(Debug, Clone, Default)]
pub struct ImageStats {
    /// Files written.
    pub files: usize,
    /// Files whose content is not what the program last wrote, and how.
    pub torn: Vec<String>,
    /// Names the program had made (or kept) that the image lacks.
    pub names_lost: usize,
}

#[derive(Debug, Clone)]
enum Content {
    File {
        data: Arc<Vec<u8>>,
        /// As of the last fsync or syncfs; `None` when it never was.
        durable: Option<Arc<Vec<u8>>>,
        /// Changed since then.
        dirty: bool,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
        durable: Option<BTreeMap<OsString, u64>>,
    },
}

#[derive(Debug, Clone)]
struct Node {
    content: Content,
    perm: u16,
    mtime: SystemTime,
    /// Where it was last named (for messages).
    parent: u64,
    name: OsString,
}

#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    ops: u64,
    cut_at: Option<u64>,
    cut: Option<Cut>,
    phase: String,
    phases: Vec<PhaseSpan>,
    recent: VecDeque<String>,
    syncs: u64,
}

/// The drive's contents, shared by the FUSE server, the syncfs watcher and the test.
#[derive(Debug)]
pub struct Model {
    state: Mutex<State>,
}

fn eio() -> Errno {
    Errno::EIO
}

impl State {
    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.node(dir)?.content {
            Content::Dir { entries, .. } => Ok(entries),
            Content::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.node_mut(dir)?.content {
            Content::Dir { entries, .. } => Ok(entries),
            Content::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    /// Where `ino` was last named, inside the drive.
    fn path(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT && parts.len() < 64 {
            let Some(node) = self.nodes.get(&at) else {
                break;
            };
            parts.push(node.name.to_string_lossy().into_owned());
            at = node.parent;
        }
        parts.reverse();
        parts.join("/")
    }

    fn child_path(&self, dir: u64, name: &OsStr) -> String {
        let parent = self.path(dir);
        if parent.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{parent}/{}", name.to_string_lossy())
        }
    }

    /// Fails after the cut.
    fn alive(&self) -> Result<(), Errno> {
        if self.cut.is_some() {
            Err(eio())
        } else {
            Ok(())
        }
    }

    /// Counts a mutating operation; it fails if the power is cut at it (or was before).
    fn mutate(&mut self, what: impl FnOnce(&Self) -> String) -> Result<(), Errno> {
        self.alive()?;
        self.ops += 1;
        if self.cut_at == Some(self.ops) {
            self.cut = Some(Cut {
                op: self.ops,
                phase: self.phase.clone(),
                what: what(self),
                before: self.recent.iter().cloned().collect(),
            });
            return Err(eio());
        }
        if let Some(span) = self.phases.last_mut() {
            span.last = self.ops;
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        let line = format!("#{} {}", self.ops, what(self));
        self.recent.push_back(line);
        Ok(())
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.node(ino)?;
        let (kind, size, nlink) = match &node.content {
            Content::File { data, .. } => (FileType::RegularFile, data.len() as u64, 1),
            Content::Dir { .. } => (FileType::Directory, 0, 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn add(&mut self, parent: u64, name: &OsStr, content: Content, perm: u16) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                content,
                perm,
                mtime: SystemTime::now(),
                parent,
                name: name.to_owned(),
            },
        );
        self.entries_mut(parent)
            .expect("checked to be a folder")
            .insert(name.to_owned(), ino);
        ino
    }

    /// Everything as it is now becomes what survives.
    fn sync_all(&mut self) {
        self.syncs += 1;
        for node in self.nodes.values_mut() {
            match &mut node.content {
                Content::File {
                    data,
                    durable,
                    dirty,
                } => {
                    *durable = Some(Arc::clone(data));
                    *dirty = false;
                }
                Content::Dir { entries, durable } => *durable = Some(entries.clone()),
            }
        }
    }
}

impl Model {
    fn new(cut_at: Option<u64>) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                content: Content::Dir {
                    entries: BTreeMap::new(),
                    durable: None,
                },
                perm: 0o755,
                mtime: SystemTime::now(),
                parent: ROOT,
                name: OsString::new(),
            },
        );
        Self {
            state: Mutex::new(State {
                nodes,
                next_ino: ROOT + 1,
                ops: 0,
                cut_at,
                cut: None,
                phase: String::from("start"),
                phases: Vec::new(),
                recent: VecDeque::new(),
                syncs: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Names the phase the program enters: cuts and counts are reported by phase.
    pub fn set_phase(&self, name: &str) {
        let mut state = self.lock();
        name.clone_into(&mut state.phase);
        let first = state.ops + 1;
        state.phases.push(PhaseSpan {
            name: name.to_owned(),
            first,
            last: first - 1,
        });
    }

    /// The phases so far, with their operations.
    #[must_use]
    pub fn phases(&self) -> Vec<PhaseSpan> {
        self.lock().phases.clone()
    }

    /// Mutating operations so far (those that succeeded).
    #[must_use]
    pub fn ops(&self) -> u64 {
        let state = self.lock();
        state.ops - u64::from(state.cut.is_some())
    }

    /// How many times everything was made durable (`syncfs` or `sync`).
    #[must_use]
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// The cut, once it happened.
    #[must_use]
    pub fn cut(&self) -> Option<Cut> {
        self.lock().cut.clone()
    }

    /// A `syncfs` of the drive or a `sync`: a mutating operation like the others.
    fn syncfs(&self, what: &str) -> Result<(), Errno> {
        let mut state = self.lock();
        state.mutate(|_| what.to_owned())?;
        state.sync_all();
        Ok(())
    }

    /// Writes what the drive would show after the power comes back into `dest` (a new
    /// folder). `seed` picks the random choices of [`Survivors::AllNames`] and
    /// [`Survivors::Mixed`].
    pub fn write_image(
        &self,
        dest: &Path,
        how: Survivors,
        seed: u64,
    ) -> Result<ImageStats, HarnessError> {
        let state = self.lock();
        let mut writer = ImageWriter {
            state: &state,
            how,
            rng: Rng::new(seed),
            stats: ImageStats::default(),
            contents: HashMap::new(),
            seen_dirs: HashSet::new(),
        };
        std::fs::create_dir_all(dest).map_err(|e| HarnessError::io("create", dest, &e))?;
        writer.dir(ROOT, dest)?;
        Ok(writer.stats)
    }
}

/// A small deterministic generator (splitmix64): the same seed gives the same image.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x5eed_cafe_f00d_d00d)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (> 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct ImageWriter<'a> {
    state: &'a State,
    how: Survivors,
    rng: Rng,
    stats: ImageStats,
    /// Contents chosen per file (a file may show under two names in a mixed image).
    contents: HashMap<u64, Arc<Vec<u8>>>,
    seen_dirs: HashSet<u64>,
}

impl ImageWriter<'_> {
    fn dir(&mut self, ino: u64, dest: &Path) -> Result<(), HarnessError> {
        if !self.seen_dirs.insert(ino) {
            return Ok(()); // a folder under two names: once is enough
        }
        let Some(Content::Dir { entries, durable }) =
            self.state.nodes.get(&ino).map(|n| &n.content)
        else {
            return Ok(());
        };
        let empty = BTreeMap::new();
        let synced = durable.as_ref().unwrap_or(&empty);
        let current = match self.how {
            Survivors::SyncedOnly => false,
            Survivors::AllNames => true,
            Survivors::Mixed => self.rng.below(2) == 0,
        };
        let shown = if current { entries } else { synced };
        self.stats.names_lost += entries
            .iter()
            .filter(|(name, child)| shown.get(*name) != Some(child))
            .count();
        for (name, child) in shown {
            let path = dest.join(name);
            match self.state.nodes.get(child).map(|n| &n.content) {
                Some(Content::Dir { .. }) => {
                    std::fs::create_dir(&path)
                        .map_err(|e| HarnessError::io("create", &path, &e))?;
                    self.dir(*child, &path)?;
                }
                Some(Content::File { .. }) => {
                    let bytes = self.content(*child);
                    std::fs::write(&path, &*bytes)
                        .map_err(|e| HarnessError::io("write", &path, &e))?;
                    self.stats.files += 1;
                }
                None => {}
            }
        }
        Ok(())
    }

    fn content(&mut self, ino: u64) -> Arc<Vec<u8>> {
        if let Some(known) = self.contents.get(&ino) {
            return Arc::clone(known);
        }
        let Some(Content::File {
            data,
            durable,
            dirty,
        }) = self.state.nodes.get(&ino).map(|n| &n.content)
        else {
            return Arc::new(Vec::new());
        };
        let synced = durable.clone().unwrap_or_default();
        let chosen = if !*dirty && durable.is_some() {
            Arc::clone(data)
        } else {
            let way = match self.how {
                Survivors::SyncedOnly => 0,
                Survivors::AllNames => 1 + self.rng.below(3),
                Survivors::Mixed => self.rng.below(5),
            };
            let torn: (Vec<u8>, &str) = match way {
                0 => ((*synced).clone(), "as last synced"),
                1 => (vec![0; data.len()], "zeros"),
                2 => {
                    let len = usize::try_from(self.rng.below(data.len() as u64 + 1))
                        .expect("fits memory");
                    (data[..len].to_vec(), "a prefix")
                }
                3 => {
                    let mut bytes = (**data).clone();
                    for page in bytes.chunks_mut(4096) {
                        if self.rng.below(2) == 0 {
                            page.fill(0);
                        }
                    }
                    (bytes, "pages of zeros")
                }
                _ => ((**data).clone(), "as last written"),
            };
            if torn.0 != **data {
                self.stats.torn.push(format!(
                    "{} ({}, {} of {} bytes)",
                    self.state.path(ino),
                    torn.1,
                    torn.0.len(),
                    data.len()
                ));
            }
            Arc::new(torn.0)
        };
        self.contents.insert(ino, Arc::clone(&chosen));
        chosen
    }
}

/// The FUSE side of the model.
#[derive(Debug)]
struct PowerCutFs {
    model: Arc<Model>,
}

impl PowerCutFs {
    fn entry(state: &State, ino: u64, reply: ReplyEntry) {
        match state.attr(ino) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

fn perm_of(mode: u32) -> u16 {
    u16::try_from(mode & 0o7777).expect("masked")
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.model.lock();
        let found = state
            .alive()
            .and_then(|()| state.entries(parent.0))
            .and_then(|e| e.get(name).copied().ok_or(Errno::ENOENT));
        match found {
            Ok(ino) => Self::entry(&state, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let state = self.model.lock();
        match state.alive().and_then(|()| state.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.model.lock();
        let result = (|| {
            state.alive()?;
            state.node(ino.0)?;
            if let Some(size) = size {
                state.mutate(|s| format!("truncate {} to {size}", s.path(ino.0)))?;
                let node = state.node_mut(ino.0)?;
                let Content::File { data, dirty, .. } = &mut node.content else {
                    return Err(Errno::EISDIR);
                };
                Arc::make_mut(data).resize(usize::try_from(size).map_err(|_| Errno::EFBIG)?, 0);
                *dirty = true;
                node.mtime = SystemTime::now();
            }
            if let Some(mode) = mode {
                state.node_mut(ino.0)?.perm = perm_of(mode);
            }
            state.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.model.lock();
        let result = (|| {
            state.alive()?;
            if state.entries(parent.0)?.contains_key(name) {
                return Err(Errno::EEXIST);
            }
            state.mutate(|s| format!("mkdir {}", s.child_path(parent.0, name)))?;
            let content = Content::Dir {
                entries: BTreeMap::new(),
                durable: None,
            };
            Ok(state.add(parent.0, name, content, perm_of(mode & !umask)))
        })();
        match result {
            Ok(ino) => Self::entry(&state, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        let mut state = self.model.lock();
        match create_file(&mut state, parent.0, name, perm_of(mode & !umask)) {
            Ok(ino) => Self::entry(&state, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.model.lock();
        let existing = state
            .alive()
            .and_then(|()| state.entries(parent.0))
            .map(|e| e.get(name).copied());
        let result = match existing {
            Err(e) => Err(e),
            Ok(Some(_)) if flags & libc::O_EXCL != 0 => Err(Errno::EEXIST),
            Ok(Some(ino)) => Ok(ino),
            Ok(None) => create_file(&mut state, parent.0, name, perm_of(mode & !umask)),
        };
        match result.and_then(|ino| state.attr(ino)) {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.model.lock();
        let result = (|| {
            state.alive()?;
            let ino = *state.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if matches!(state.node(ino)?.content, Content::Dir { .. }) {
                return Err(Errno::EISDIR);
            }
            state.mutate(|s| format!("unlink {}", s.child_path(parent.0, name)))?;
            state.entries_mut(parent.0)?.remove(name);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.model.lock();
        let result = (|| {
            state.alive()?;
            let ino = *state.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if !state.entries(ino)?.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            state.mutate(|s| format!("rmdir {}", s.child_path(parent.0, name)))?;
            state.entries_mut(parent.0)?.remove(name);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = self.model.lock();
        let result = (|| {
            state.alive()?;
            if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
                return Err(Errno::EINVAL);
            }
            let ino = *state.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            let is_dir = matches!(state.node(ino)?.content, Content::Dir { .. });
            if let Some(&target) = state.entries(newparent.0)?.get(newname) {
                if target == ino {
                    return Ok(());
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                match (&state.node(target)?.content, is_dir) {
                    (Content::Dir { .. }, false) => return Err(Errno::EISDIR),
                    (Content::File { .. }, true) => return Err(Errno::ENOTDIR),
                    (Content::Dir { entries, .. }, true) if !entries.is_empty() => {
                        return Err(Errno::ENOTEMPTY);
                    }
                    _ => {}
                }
            }
            state.mutate(|s| {
                format!(
                    "rename {} to {}",
                    s.child_path(parent.0, name),
                    s.child_path(newparent.0, newname)
                )
            })?;
            state.entries_mut(parent.0)?.remove(name);
            state
                .entries_mut(newparent.0)?
                .insert(newname.to_owned(), ino);
            let node = state.node_mut(ino)?;
            node.parent = newparent.0;
            newname.clone_into(&mut node.name);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let state = self.model.lock();
        match state.alive().and_then(|()| state.node(ino.0).map(drop)) {
            // Every read and write comes here, none is served from the kernel's cache.
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.model.lock();
        let result = (|| {
            state.alive()?;
            let Content::File { data, .. } = &state.node(ino.0)?.content else {
                return Err(Errno::EISDIR);
            };
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let end = start.saturating_add(size as usize).min(data.len());
            Ok(data[start..end].to_vec())
        })();
        match result {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.model.lock();
        let result = (|| {
            state.alive()?;
            state.node(ino.0)?;
            state.mutate(|s| {
                format!(
                    "write {} bytes at {offset} to {}",
                    bytes.len(),
                    s.path(ino.0)
                )
            })?;
            let node = state.node_mut(ino.0)?;
            let Content::File { data, dirty, .. } = &mut node.content else {
                return Err(Errno::EISDIR);
            };
            let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
            let data = Arc::make_mut(data);
            if data.len() < start + bytes.len() {
                data.resize(start + bytes.len(), 0);
            }
            data[start..start + bytes.len()].copy_from_slice(bytes);
            *dirty = true;
            node.mtime = SystemTime::now();
            Ok(u32::try_from(bytes.len()).expect("a FUSE write is small"))
        })();
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.model.lock();
        let result = (|| {
            state.alive()?;
            state.node(ino.0)?;
            let call = if datasync { "fdatasync" } else { "fsync" };
            state.mutate(|s| format!("{call} {}", s.path(ino.0)))?;
            if let Content::File {
                data,
                durable,
                dirty,
            } = &mut state.node_mut(ino.0)?.content
            {
                *durable = Some(Arc::clone(data));
                *dirty = false;
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let state = self.model.lock();
        match state.alive().and_then(|()| state.entries(ino.0).map(drop)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.model.lock();
        let listing = (|| {
            state.alive()?;
            let parent = state.node(ino.0)?.parent;
            let mut all = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (parent, FileType::Directory, OsString::from("..")),
            ];
            for (name, child) in state.entries(ino.0)? {
                let kind = match state.node(*child)?.content {
                    Content::Dir { .. } => FileType::Directory,
                    Content::File { .. } => FileType::RegularFile,
                };
                all.push((*child, kind, name.clone()));
            }
            Ok(all)
        })();
        match listing {
            Ok(all) => {
                for (i, (child, kind, name)) in all
                    .into_iter()
                    .enumerate()
                    .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.model.lock();
        let result = (|| {
            state.alive()?;
            state.entries(ino.0)?;
            state.mutate(|s| format!("fsync folder {}/", s.path(ino.0)))?;
            if let Content::Dir { entries, durable } = &mut state.node_mut(ino.0)?.content {
                *durable = Some(entries.clone());
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let state = self.model.lock();
        match state.alive() {
            Ok(()) => reply.statfs(1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 4096, 255, 4096),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let state = self.model.lock();
        match state.alive().and_then(|()| state.node(ino.0).map(drop)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn create_file(state: &mut State, parent: u64, name: &OsStr, perm: u16) -> Result<u64, Errno> {
    state.alive()?;
    if state.entries(parent)?.contains_key(name) {
        return Err(Errno::EEXIST);
    }
    state.mutate(|s| format!("create {}", s.child_path(parent, name)))?;
    let content = Content::File {
        data: Arc::new(Vec::new()),
        durable: None,
        dirty: true,
    };
    Ok(state.add(parent, name, content, perm))
}

/// The model mounted on a folder: unmounted (lazily if it must be) when dropped, also when a
/// test panics.
#[derive(Debug)]
pub struct Drive {
    model: Arc<Model>,
    mount_point: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Drive {
    /// Mounts a new, empty drive on `mount_point` (an empty folder), whose power is cut at
    /// mutating operation `cut_at` (never with `None`). Needs root.
    pub fn mount(mount_point: &Path, cut_at: Option<u64>) -> Result<Self, HarnessError> {
        remove_stale_mounts();
        let model = Arc::new(Model::new(cut_at));
        let fs = PowerCutFs {
            model: Arc::clone(&model),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(FS_NAME.into()),
            MountOption::Subtype("powercut".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        let session = fuser::spawn_mount(fs, mount_point, &config).map_err(|e| {
            HarnessError(format!(
                "could not mount the power-cut file system on {}: {e} (it needs root and \
                 /dev/fuse)",
                mount_point.display()
            ))
        })?;
        Ok(Self {
            model,
            mount_point: mount_point.to_owned(),
            session: Some(session),
        })
    }

    /// The model behind it.
    #[must_use]
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Where it is mounted.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    /// Runs `work` on a thread of its own whose `syncfs` and `sync` calls (and those of the
    /// threads it starts) reach the model before they run; after the cut they fail with
    /// `EIO`. A panic in `work` is returned as an error with its message.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, String> {
        let stop = AtomicBool::new(false);
        let model = &self.model;
        let ours = std::fs::canonicalize(&self.mount_point).unwrap_or(self.mount_point.clone());
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let worker = std::thread::Builder::new()
                .name("powercut-work".into())
                .spawn_scoped(s, move || {
                    match sync_watch::watch_this_thread() {
                        Ok(listener) => {
                            tx.send(Ok(listener)).expect("the caller waits");
                        }
                        Err(e) => {
                            tx.send(Err(e)).expect("the caller waits");
                            return None;
                        }
                    }
                    Some(work())
                })
                .map_err(|e| format!("could not start a thread: {e}"))?;
            let listener = match rx.recv() {
                Ok(Ok(listener)) => listener,
                Ok(Err(e)) => {
                    drop(worker.join());
                    return Err(format!(
                        "could not watch syncfs with seccomp (SECCOMP_RET_USER_NOTIF, Linux \
                         5.5 or newer): {e}"
                    ));
                }
                Err(_) => return Err("the work thread ended before it started".into()),
            };
            let stop = &stop;
            let ours = &ours;
            let supervisor = s.spawn(move || {
                sync_watch::serve(&listener, stop, |call| {
                    let result = match &call {
                        SyncCall::Syncfs(Some(path)) if path.starts_with(ours) => {
                            model.syncfs(&format!("syncfs {}", path.display()))
                        }
                        SyncCall::Syncfs(_) => return Ok(()),
                        SyncCall::Sync => model.syncfs("sync"),
                    };
                    result.map_err(|_| libc::EIO)
                })
            });
            let outcome = worker.join();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let served = supervisor.join();
            let value = match outcome {
                Ok(Some(value)) => value,
                Ok(None) => return Err("the work thread could not be watched".into()),
                Err(panic) => return Err(panic_message(&panic)),
            };
            match served {
                Ok(Ok(())) => Ok(value),
                Ok(Err(e)) => Err(format!("watching syncfs failed: {e}")),
                Err(panic) => Err(panic_message(&panic)),
            }
        })
    }

    /// Unmounts the drive, keeping the model (for [`Model::write_image`]).
    #[must_use]
    pub fn unplug(mut self) -> Arc<Model> {
        self.unmount();
        Arc::clone(&self.model)
    }

    fn unmount(&mut self) {
        if let Some(session) = self.session.take() {
            // Unmounts, then the server's thread ends; a busy mount is left to the lazy
            // unmount below.
            drop(session);
        }
        if is_mounted(&self.mount_point) {
            lazy_unmount(&self.mount_point);
        }
    }
}

impl Drop for Drive {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .map_or_else(|| "panicked".into(), |m| format!("panicked: {m}"))
}

/// Mount points of this file system, from `/proc/self/mountinfo`.
fn our_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut right = right.split(' ');
            let _fstype = right.next()?;
            let source = right.next()?;
            let point = left.split(' ').nth(4)?;
            (source == FS_NAME).then(|| unescape_mountinfo(point))
        })
        .collect()
}

fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(c) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(c);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

fn is_mounted(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or(path.to_owned());
    our_mounts().contains(&path)
}

fn lazy_unmount(path: &Path) {
    match std::process::Command::new("umount")
        .arg("-l")
        .arg(path)
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("warning: umount -l {} failed ({status})", path.display()),
        Err(e) => eprintln!("warning: could not run umount -l {}: {e}", path.display()),
    }
}

/// Unmounts what killed test runs left: mounts of this file system under a scratch folder
/// whose process is gone (`<pid>-<n>-<label>`, see [`crate::scratch`]).
fn remove_stale_mounts() {
    let root = crate::scratch::root();
    for mount in our_mounts() {
        let Ok(rel) = mount.strip_prefix(&root) else {
            continue;
        };
        let owner = rel
            .components()
            .next()
            .and_then(|c| crate::scratch::owner_pid(&c.as_os_str().to_string_lossy()));
        if owner.is_some_and(|pid| !crate::scratch::pid_alive(pid)) {
            lazy_unmount(&mount);
        }
    }
}
