//! A checkpoint's disks served straight from the store, read-only, as NBD exports on Unix
//! sockets (issue 23: boot-check and run from backup).
//!
//! QEMU opens such an export as the backing file of a throwaway qcow2 overlay, so that the
//! guest's writes go to the overlay and nothing writes to the store. Each disk of the
//! checkpoint gets its own socket in a folder the caller gives, named after the disk's
//! target (`vda.sock`), with the export name the target (`vda`): the URI
//! `nbd+unix:///vda?socket=…/vda.sock` ([`ServedDisk::uri`]).
//!
//! Each connection reads through its own [`ObjectCursor`](crate::store::random::ObjectCursor):
//! a cache of whole chunks, and the kernel's read-ahead of the chunk files when the guest
//! reads sequentially. Reads come in any order; a chunk the store never wrote is
//! reported as a hole (`base:allocation`), so `qemu-img convert` and QEMU's block copy
//! skip it. The server is Rewind's own ([`rewind_nbd::ListenerHandle`]); it accepts at
//! most [`rewind_nbd::MAX_CONNECTIONS`] connections at once.
//!
//! Anyone who can reach a socket can read that disk: the folder must be one that only QEMU
//! and Rewind can enter. The sockets are given to `socket_owner` (QEMU's user) when Rewind
//! runs as root and QEMU as someone else, and are removed when the export stops or is
//! dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rewind_nbd::{Allocation, Export, ListenerHandle, Run, ServerError};

use crate::store::random::ObjectCursor;
use crate::store::{Manifest, ObjectIndex, Store, StoreError};

/// The chunk cache of each connection: QEMU keeps one or two connections per disk.
const CACHE_BYTES: u64 = 32 << 20;

/// Why a checkpoint's disks could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A disk's index could not be read from the store.
    #[error("could not read disk {target} of the checkpoint from the store: {source}")]
    Store {
        /// The disk's target (`vda`).
        target: String,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
    /// The socket could not be made or served.
    #[error("could not serve disk {target} of the checkpoint: {source}")]
    Serve {
        /// The disk's target.
        target: String,
        /// Why.
        #[source]
        source: ServerError,
    },
    /// The socket could not be handed to QEMU's user.
    #[error(
        "could not let QEMU's user reach the socket {path}: {source}; the folder must be on a \
         local file system that allows ownership changes"
    )]
    Permissions {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A socket's path would not fit a Unix socket address.
    #[error(
        "the folder {folder} has too long a path for a socket (at most 107 bytes in all); use a \
         shorter work folder (REWIND_WORK_DIR)"
    )]
    PathTooLong {
        /// The folder.
        folder: PathBuf,
    },
    /// A target name that cannot name a socket file.
    #[error(
        "the checkpoint names a disk {target:?}, which cannot name a socket; the store may be damaged"
    )]
    BadTarget {
        /// The name.
        target: String,
    },
}

/// One disk of the checkpoint, served.
#[derive(Debug)]
pub struct ServedDisk {
    target: String,
    size_bytes: u64,
    handle: ListenerHandle,
}

impl ServedDisk {
    /// The disk's target in the checkpoint (`vda`), which is also the export's name.
    #[must_use]
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The disk's size in bytes.
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The listening socket.
    #[must_use]
    pub fn socket(&self) -> &Path {
        self.handle.socket()
    }

    /// The export as QEMU names it: `nbd+unix:///vda?socket=/path/vda.sock`.
    #[must_use]
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.target,
            self.handle.socket().display()
        )
    }
}

/// A checkpoint's disks, served until [`CheckpointExport::stop`] or drop.
#[derive(Debug)]
pub struct CheckpointExport {
    disks: Vec<ServedDisk>,
}

impl CheckpointExport {
    /// Serves every disk of `manifest` (a checkpoint of `store`) on a socket in `folder`,
    /// which must exist; `socket_owner` is QEMU's user and group, to whom the sockets are
    /// given when this process may (it runs as root).
    ///
    /// # Errors
    /// A disk's index is damaged, a socket cannot be made there (one exists already, the
    /// path is too long), or handed to `socket_owner`.
    pub fn start(
        store: &Arc<Store>,
        manifest: &Manifest,
        folder: &Path,
        socket_owner: Option<(u32, u32)>,
    ) -> Result<Self, ExportError> {
        let mut disks = Vec::new();
        for disk in &manifest.disks {
            let target = disk.target.clone();
            if target.is_empty()
                || target.len() > 32
                || !target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ExportError::BadTarget { target });
            }
            let socket = folder.join(format!("{target}.sock"));
            if socket.as_os_str().len() > 107 {
                return Err(ExportError::PathTooLong {
                    folder: folder.to_path_buf(),
                });
            }
            // Checked once here, so that a damaged index is this call's error rather than
            // each connection's.
            store
                .object_cursor(&disk.index, 0)
                .map_err(|e| ExportError::Store {
                    target: target.clone(),
                    source: Box::new(e),
                })?;
            let (store, index) = (store.clone(), disk.index.clone());
            let handle =
                ListenerHandle::spawn(&socket, &target, move || StoreDisk::open(&store, &index))
                    .map_err(|source| ExportError::Serve {
                        target: target.clone(),
                        source,
                    })?;
            if let Some((uid, gid)) = socket_owner.filter(|_| rustix::process::geteuid().is_root())
            {
                std::os::unix::fs::chown(&socket, Some(uid), Some(gid)).map_err(|source| {
                    ExportError::Permissions {
                        path: socket.clone(),
                        source,
                    }
                })?;
            }
            disks.push(ServedDisk {
                target,
                size_bytes: disk.index.size_bytes,
                handle,
            });
        }
        Ok(Self { disks })
    }

    /// The disks served, in the checkpoint's order.
    #[must_use]
    pub fn disks(&self) -> &[ServedDisk] {
        &self.disks
    }

    /// The disk of target `target`.
    #[must_use]
    pub fn disk(&self, target: &str) -> Option<&ServedDisk> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// Stops serving: ends every connection, waits for their threads and removes the
    /// sockets.
    ///
    /// # Errors
    /// A disk's server had failed before (the first such error; every disk is stopped).
    pub fn stop(self) -> Result<(), ExportError> {
        let mut first = Ok(());
        for disk in self.disks {
            let target = disk.target;
            if let Err(source) = disk.handle.stop()
                && first.is_ok()
            {
                first = Err(ExportError::Serve { target, source });
            }
        }
        first
    }
}

/// One connection's reader of a disk.
struct StoreDisk {
    cursor: ObjectCursor<'static>,
}

impl StoreDisk {
    fn open(store: &Arc<Store>, index: &ObjectIndex) -> io::Result<Self> {
        Ok(Self {
            cursor: store
                .object_cursor_shared(index, CACHE_BYTES)
                .map_err(io::Error::other)?,
        })
    }
}

impl Export for StoreDisk {
    fn size_bytes(&self) -> u64 {
        self.cursor.len()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.cursor.read_at(offset, buf).map_err(|e| {
            tracing::warn!("reading the served disk at {offset}: {e}");
            io::Error::other(e)
        })?;
        buf[n..].fill(0);
        Ok(())
    }

    fn allocation_at(&mut self, offset: u64, length_bytes: u64) -> io::Result<Run> {
        let (hole, length_bytes) = self
            .cursor
            .run_at(offset, length_bytes)
            .map_err(io::Error::other)?;
        Ok(Run {
            allocation: if hole {
                Allocation::Hole
            } else {
                Allocation::Data
            },
            length_bytes,
        })
    }
}

#[cfg(test)]
mod tests;
