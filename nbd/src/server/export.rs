//! What a server serves: the [`Export`] trait, and [`MemoryExport`], bytes held in memory.

use std::io;
use std::sync::Arc;

/// A read-only disk image that [`serve_connection`](crate::serve_connection) serves.
///
/// One value serves one connection, from one thread; [`serve_listener`](crate::serve_listener)
/// makes one per connection. Nothing the client sends reaches these methods unchecked:
/// every call lies inside `0..size_bytes()`, and no buffer is longer than 32 MiB.
pub trait Export: Send {
    /// The size of the disk in bytes. Asked once per connection; it must not change
    /// while the connection lasts.
    fn size_bytes(&self) -> u64;

    /// Fills `buf` with the disk's bytes from `offset` on. An error fails this one request
    /// with `NBD_EIO`; the connection goes on.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// What the disk holds at `offset`: the kind of the run of bytes that starts there and
    /// its length, of which only the first `length_bytes` (never zero) matter. A run may end
    /// earlier than the range asked about, but not be empty; a longer one is cut.
    ///
    /// Zeros that cost nothing to read ([`Allocation::Hole`], [`Allocation::Zero`]) are sent
    /// as holes in structured replies, and reported by `NBD_CMD_BLOCK_STATUS` in the context
    /// `base:allocation`. The default says "all data", which is always correct.
    fn allocation_at(&mut self, offset: u64, length_bytes: u64) -> io::Result<Run> {
        let _ = offset;
        Ok(Run {
            allocation: Allocation::Data,
            length_bytes,
        })
    }
}

impl<E: Export + ?Sized> Export for Box<E> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }

    fn allocation_at(&mut self, offset: u64, length_bytes: u64) -> io::Result<Run> {
        (**self).allocation_at(offset, length_bytes)
    }
}

/// How a run of an export's bytes is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Bytes that must be read (`base:allocation` flags 0).
    Data,
    /// Stored, but known to read as zeros (`NBD_STATE_ZERO`).
    Zero,
    /// Not stored at all; reads as zeros (`NBD_STATE_HOLE | NBD_STATE_ZERO`), like a
    /// chunk a checkpoint's store never wrote.
    Hole,
}

impl Allocation {
    /// The flags of this allocation in the `base:allocation` metadata context.
    #[must_use]
    pub fn base_allocation_flags(self) -> u32 {
        match self {
            Allocation::Data => 0,
            Allocation::Zero => crate::STATE_ZERO,
            Allocation::Hole => crate::STATE_HOLE | crate::STATE_ZERO,
        }
    }

    /// Whether the run reads as zeros without reading it.
    #[must_use]
    pub fn reads_as_zeros(self) -> bool {
        self != Allocation::Data
    }
}

/// A run of bytes of one [`Allocation`], as [`Export::allocation_at`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// How the bytes are stored.
    pub allocation: Allocation,
    /// How many bytes, from the offset asked about.
    pub length_bytes: u64,
}

/// An export of bytes held in memory, in which every aligned block of 4 KiB of zeros is a
/// hole. For tests and small disks; clones share the bytes, so that each connection of a
/// [`serve_listener`](crate::serve_listener) can have its own cheaply.
#[derive(Debug, Clone)]
pub struct MemoryExport {
    data: Arc<[u8]>,
}

impl MemoryExport {
    /// The granularity of holes.
    pub const HOLE_BLOCK_BYTES: u64 = 4096;

    /// Serves `data`.
    pub fn new(data: impl Into<Arc<[u8]>>) -> Self {
        MemoryExport { data: data.into() }
    }

    /// The bytes served.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The bytes of `range`, or an error naming it if it is outside the data.
    fn slice(&self, offset: u64, length: u64) -> io::Result<&[u8]> {
        usize::try_from(offset)
            .ok()
            .zip(usize::try_from(length).ok())
            .and_then(|(start, length)| self.data.get(start..start.checked_add(length)?))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{length} bytes at offset {offset} are outside the {} bytes in memory",
                        self.data.len()
                    ),
                )
            })
    }

    /// Whether the block of [`Self::HOLE_BLOCK_BYTES`] that holds `offset` is all zeros.
    fn block_is_hole(&self, offset: u64) -> bool {
        let start = offset - offset % Self::HOLE_BLOCK_BYTES;
        let end = (start + Self::HOLE_BLOCK_BYTES).min(self.data.len() as u64);
        self.slice(start, end - start)
            .is_ok_and(|block| block.iter().all(|&b| b == 0))
    }
}

impl Export for MemoryExport {
    fn size_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(self.slice(offset, buf.len() as u64)?);
        Ok(())
    }

    fn allocation_at(&mut self, offset: u64, length_bytes: u64) -> io::Result<Run> {
        let end = offset.saturating_add(length_bytes).min(self.size_bytes());
        if offset >= end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "offset {offset} is outside the {} bytes in memory",
                    self.data.len()
                ),
            ));
        }
        let hole = self.block_is_hole(offset);
        let mut at = offset - offset % Self::HOLE_BLOCK_BYTES + Self::HOLE_BLOCK_BYTES;
        while at < end && self.block_is_hole(at) == hole {
            at += Self::HOLE_BLOCK_BYTES;
        }
        Ok(Run {
            allocation: if hole {
                Allocation::Hole
            } else {
                Allocation::Data
            },
            length_bytes: at.min(end) - offset,
        })
    }
}
