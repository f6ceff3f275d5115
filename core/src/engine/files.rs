//! Browsing checkpoints' files for a front end ([`Command::Browse`]): one thread keeps the
//! checkpoints being browsed open (their partition tables read, their volumes' chunk
//! caches warm), answers each question with an [`Event::Browsed`], and a new search or
//! comparison cancels the one before.
//!
//! [`Command::Browse`]: super::Command::Browse
//! [`Event::Browsed`]: super::Event::Browsed

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use super::jobs::{self, JobError};
use super::{Event, Inner, ResumeKey};
use crate::config::Config;
use crate::files::browse::{Browser, DiskVolumes, Found};
use crate::files::changes::{Change, changes, previous_checkpoint};
use crate::files::{Entry, EntryKind};
use crate::progress::Control;

/// At most this many checkpoints stay open.
const OPEN: usize = 3;
/// A preview holds at most this many bytes of the file's start.
pub const PREVIEW_BYTES: u64 = 256 << 10;
/// Pictures up to this size get a thumbnail.
pub const PICTURE_BYTES: u64 = 32 << 20;
/// A thumbnail fits in a square of this many pixels.
pub const THUMBNAIL_PIXELS: u32 = 320;

/// A question about a checkpoint's files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BrowseAsk {
    /// Its disks and volumes.
    Volumes,
    /// The entries of a folder (volume first: `p2/Users`).
    List {
        /// The folder.
        path: String,
    },
    /// The entries below a folder whose names match a pattern.
    Find {
        /// The folder (volume first).
        path: String,
        /// A piece of a name, or a pattern with `*` and `?`.
        pattern: String,
    },
    /// The start of a file, to show it.
    Preview {
        /// The file (volume first).
        path: String,
    },
    /// What changed since the checkpoint before it (or since the one named: an id or
    /// `latest`).
    Changes {
        /// The checkpoint to compare with; `None`: the one before.
        since: Option<String>,
    },
}

/// The answer to a [`BrowseAsk`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BrowseAnswer {
    /// Its disks and their volumes.
    Volumes(Vec<DiskVolumes>),
    /// A folder's entries, sorted as a file manager shows them (or a file's own entry).
    Listing {
        /// The path as resolved (`vdb/p1/home`).
        path: String,
        /// The entries.
        entries: Vec<Entry>,
    },
    /// What a search found, and the folders it could not read.
    Found {
        /// The matches.
        found: Vec<Found>,
        /// What could not be searched, and why.
        skipped: Vec<String>,
    },
    /// The first bytes of a file (at most [`PREVIEW_BYTES`]) and its size; for a picture
    /// (PNG, JPEG) a thumbnail instead.
    Preview {
        /// Its first bytes (none for a picture with a thumbnail).
        bytes: Vec<u8>,
        /// Its whole size.
        size_bytes: u64,
        /// A thumbnail of a picture, as a PNG of at most [`THUMBNAIL_PIXELS`] a side.
        thumbnail_png: Option<Vec<u8>>,
    },
    /// The changes since the checkpoint before (`None`: it is the first one).
    Changes {
        /// The checkpoint compared with.
        since: Option<String>,
        /// What changed.
        changes: Vec<Change>,
        /// What could not be compared, and why.
        skipped: Vec<String>,
    },
}

/// The thread that answers [`BrowseAsk`]s.
pub(super) struct FilesWorker {
    tx: std::sync::mpsc::Sender<(ResumeKey, BrowseAsk, Config)>,
    /// The search or comparison under way, which a new one cancels.
    current: Arc<Mutex<Arc<Control>>>,
}

impl FilesWorker {
    /// Starts the thread; its answers go to `out`.
    pub(super) fn start(out: mpsc::Sender<Inner>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(ResumeKey, BrowseAsk, Config)>();
        let current = Arc::new(Mutex::new(Arc::new(Control::new())));
        let shared = current.clone();
        std::thread::Builder::new()
            .name("rewind-files".into())
            .spawn(move || {
                let mut open: Vec<(ResumeKey, Browser)> = Vec::new();
                while let Ok((key, ask, config)) = rx.recv() {
                    let control = shared
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    let result = answer(&mut open, &key, &ask, &config, &control);
                    let event = Event::Browsed { key, ask, result };
                    // A closed channel: the engine is stopping.
                    if out.blocking_send(Inner::Emit(event)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self { tx, current })
    }

    /// Asks `ask` about checkpoint `key`.
    pub(super) fn ask(&self, key: ResumeKey, ask: BrowseAsk, config: Config) {
        if matches!(
            ask,
            BrowseAsk::Find { .. } | BrowseAsk::Changes { .. } | BrowseAsk::Preview { .. }
        ) {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            current.cancel();
            *current = Arc::new(Control::new());
        }
        // A stopped thread: the engine is stopping.
        drop(self.tx.send((key, ask, config)));
    }
}

/// The browser of `key`, opened if needed (the oldest one closed past [`OPEN`]).
fn browser<'a>(
    open: &'a mut Vec<(ResumeKey, Browser)>,
    key: &ResumeKey,
    config: &Config,
) -> Result<&'a mut Browser, JobError> {
    // `latest` is looked up each time: it moves on with every checkpoint.
    let cached = (key.checkpoint != "latest")
        .then(|| open.iter().position(|(k, _)| k == key))
        .flatten();
    if let Some(at) = cached {
        let found = open.remove(at);
        open.push(found);
    } else {
        let store = Arc::new(jobs::store_of(config, &key.destination)?);
        let m = jobs::manifest(&store, &key.vm_uuid, &key.checkpoint)?;
        let key = ResumeKey {
            checkpoint: m.id.clone(),
            ..key.clone()
        };
        open.retain(|(k, _)| *k != key);
        let b = Browser::open(store, m)?;
        if open.len() >= OPEN {
            open.remove(0);
        }
        open.push((key, b));
    }
    Ok(&mut open.last_mut().expect("pushed above").1)
}

fn answer(
    open: &mut Vec<(ResumeKey, Browser)>,
    key: &ResumeKey,
    ask: &BrowseAsk,
    config: &Config,
    control: &Control,
) -> Result<BrowseAnswer, JobError> {
    let b = browser(open, key, config)?;
    Ok(match ask {
        BrowseAsk::Volumes => BrowseAnswer::Volumes(b.disks().to_vec()),
        BrowseAsk::List { path } => {
            let (path, entries) = b.show(path)?;
            BrowseAnswer::Listing { path, entries }
        }
        BrowseAsk::Find { path, pattern } => {
            let (found, skipped) = b.find_in(path, pattern, control)?;
            BrowseAnswer::Found {
                found,
                skipped: skipped.iter().map(ToString::to_string).collect(),
            }
        }
        BrowseAsk::Preview { path } => {
            let at = b.resolve(path)?;
            let entry = b.entry(&at)?;
            if entry.kind != EntryKind::File {
                return Err(JobError::new(
                    jobs::ErrorKind::Invalid,
                    format!(
                        "{path} is not a file, so it has no preview: open it to see what it holds"
                    ),
                ));
            }
            let picture = picture(&entry.name).filter(|_| entry.size_bytes <= PICTURE_BYTES);
            let limit = if picture.is_some() {
                PICTURE_BYTES
            } else {
                PREVIEW_BYTES
            };
            let mut bytes = Vec::new();
            let mut limited = Limited {
                out: &mut bytes,
                left: limit,
            };
            let shown = b.display(at.volume, &at.names);
            let read =
                b.tree(at.volume)?
                    .read(&at.names, at.stream.as_deref(), &mut limited, control);
            match read {
                Ok(_) => {}
                // The preview is full: it stopped reading there.
                Err(crate::files::TreeError::Write { .. }) if limited.left == 0 => {}
                Err(source) => {
                    return Err(crate::files::FilesError::Tree {
                        path: shown,
                        source,
                    }
                    .into());
                }
            }
            let thumbnail_png = picture.and_then(|format| thumbnail(&bytes, format));
            if thumbnail_png.is_some() {
                bytes.clear();
            } else {
                bytes.truncate(usize::try_from(PREVIEW_BYTES).unwrap_or(usize::MAX));
            }
            BrowseAnswer::Preview {
                bytes,
                size_bytes: entry.size_bytes,
                thumbnail_png,
            }
        }
        BrowseAsk::Changes { since } => {
            let newer = b.manifest().clone();
            // The store this browser has open: not opened (and its key derived) again.
            let store = b.store().clone();
            let older = match since {
                Some(id) => Some(jobs::manifest(&store, &key.vm_uuid, id)?),
                None => previous_checkpoint(&store, &newer)?,
            };
            let Some(older) = older else {
                return Ok(BrowseAnswer::Changes {
                    since: None,
                    changes: Vec::new(),
                    skipped: Vec::new(),
                });
            };
            let since = older.id.clone();
            let mut old = Browser::open(store.clone(), older)?;
            let b = browser(open, key, config)?;
            let (changes, skipped) = changes(&mut old, b, control)?;
            BrowseAnswer::Changes {
                since: Some(since),
                changes,
                skipped: skipped.iter().map(ToString::to_string).collect(),
            }
        }
    })
}

/// Makes a thumbnail of a picture: its bytes and its kind (`png`, `jpeg`) in, a PNG of at
/// most [`THUMBNAIL_PIXELS`] a side out (`None` if it does not decode). The core has no
/// image codecs: the process that runs the engine (the `rewind` binary) provides one with
/// [`set_thumbnailer`].
pub type Thumbnailer = fn(&[u8], &str) -> Option<Vec<u8>>;

static THUMBNAILER: std::sync::OnceLock<Thumbnailer> = std::sync::OnceLock::new();

/// Sets how pictures' thumbnails are made, once per process; without it, pictures get
/// no preview.
pub fn set_thumbnailer(thumbnailer: Thumbnailer) {
    // Set once: a second call (a test's) changes nothing.
    if THUMBNAILER.set(thumbnailer).is_err() {
        tracing::debug!("the thumbnailer was set already");
    }
}

/// The picture kind a file's name says, for those Rewind makes thumbnails of.
fn picture(name: &str) -> Option<&'static str> {
    THUMBNAILER.get()?;
    let extension = name.rsplit_once('.')?.1.to_ascii_lowercase();
    match extension.as_str() {
        "png" => Some("png"),
        "jpg" | "jpeg" => Some("jpeg"),
        "gif" => Some("gif"),
        "webp" => Some("webp"),
        "bmp" => Some("bmp"),
        _ => None,
    }
}

/// The thumbnail of the picture in `bytes`, if it decodes.
pub(crate) fn thumbnail(bytes: &[u8], kind: &str) -> Option<Vec<u8>> {
    THUMBNAILER.get().and_then(|make| make(bytes, kind))
}

/// A writer that takes `left` bytes more, then fails (to stop a read there).
struct Limited<'a> {
    out: &'a mut Vec<u8>,
    left: u64,
}

impl std::io::Write for Limited<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("the preview is full"));
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        self.out.extend_from_slice(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
