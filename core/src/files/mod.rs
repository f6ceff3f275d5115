//! What is inside a checkpoint's disk, read in place from the store (file-level restore):
//! its partition table and volumes, and the file system of each.
//!
//! Everything here reads through [`crate::store::random::ObjectCursor`] (or any
//! [`Read`] + [`Seek`]), so nothing is restored first, and nothing needs root, a kernel
//! mount or an NBD device. A disk is input that anyone may have written (a guest, a store on
//! a drive): every offset and count it holds is checked before it is used, and a damaged
//! table or file system is reported, never followed out of the disk.

pub mod volumes;

use std::io::{Read, Seek};

pub use volumes::{FileSystem, PartitionTable, Volume, volumes};

/// Why a disk's volumes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Reading the disk failed (the store: missing or damaged chunks, a pulled drive).
    #[error("could not read disk {disk}: {source}")]
    Read {
        /// The disk's target (`vda`).
        disk: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The partition table is damaged or not one Rewind understands.
    #[error(
        "the partition table of disk {disk} is damaged ({detail}); its volumes cannot be listed, \
         but the whole VM or the disk can still be restored or exported"
    )]
    BadTable {
        /// The disk's target.
        disk: String,
        /// What is wrong.
        detail: String,
    },
}

/// A disk to look into: anything that reads at any offset.
pub trait Disk: Read + Seek {}

impl<T: Read + Seek> Disk for T {}
