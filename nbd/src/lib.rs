//! A small synchronous NBD client, for reading the disks that QEMU exports, and a small
//! read-only NBD server, for serving a checkpoint's disk to QEMU.
//!
//! # The client
//!
//! Rewind reads a VM's disks over NBD (the Network Block Device protocol) in two cases:
//!
//! - during a pull-mode backup (`virDomainBackupBegin`): libvirt has QEMU export each disk on
//!   a Unix socket under the disk's target name (`vda`), and the clusters changed since the
//!   last checkpoint in the metadata context `qemu:dirty-bitmap:backup-vda`;
//! - for a shut-off VM, whose qcow2 files are exported with `qemu-nbd --read-only`.
//!
//! [`NbdClient`] follows `doc/proto.md` of the NBD project. It implements:
//!
//! - the fixed newstyle handshake over a Unix socket, with `NBD_FLAG_C_NO_ZEROES` where the
//!   server offers it;
//! - the options `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` (the context ids the
//!   server returns are recorded; a requested context it does not return is an error only
//!   when it is used) and `NBD_OPT_GO` (export size from `NBD_INFO_EXPORT`, maximum payload
//!   from `NBD_INFO_BLOCK_SIZE` if the server sends it);
//! - `NBD_CMD_READ` ([`NbdClient::read_at`]), in requests of at most 32 MiB, answered with
//!   structured replies (data, holes, errors) or a simple reply;
//! - `NBD_CMD_BLOCK_STATUS` ([`NbdClient::block_status`]), repeated until the whole range is
//!   described, since servers may describe less than was asked;
//! - a clean goodbye (`NBD_OPT_ABORT` during the handshake, `NBD_CMD_DISC` after it) on
//!   [`NbdClient::close`] or drop.
//!
//! - `NBD_CMD_WRITE` ([`NbdClient::write_at`]) and `NBD_CMD_FLUSH` ([`NbdClient::flush`]);
//!
//! It does not implement: `NBD_CMD_TRIM`, `WRITE_ZEROES`, `CACHE`;
//! TCP and TLS; the oldstyle and non-fixed newstyle handshakes, and the `NBD_OPT_EXPORT_NAME`
//! fallback for servers without `NBD_OPT_GO` (QEMU, nbdkit and nbd-server all have it);
//! `NBD_OPT_LIST` and `NBD_OPT_LIST_META_CONTEXT`; the experimental extended headers (64-bit
//! lengths); more than one request in flight; timeouts (a server that stops answering blocks
//! the caller). It does not request `NBD_INFO_BLOCK_SIZE`, which would oblige it to align
//! every request to the server's minimum block size; servers then accept any alignment
//! (QEMU does for `NBD_OPT_GO`).
//!
//! Nothing a server sends can make the client panic, and no length a server sends is
//! trusted for an allocation: handshake replies are capped at a few KiB, read data goes
//! straight into the caller's buffer and must lie inside the request, and a block-status
//! reply may hold at most one extent per requested byte. A reply that breaks the protocol,
//! or a lost connection, makes the client unusable ([`NbdError::Unusable`] from then on),
//! because where the next reply starts can no longer be known; an error the server reports
//! for one request ([`NbdError::CommandFailed`]) does not.
//!
//! # The server
//!
//! Rewind serves a checkpoint's disk straight from its store, read-only, on a private Unix
//! socket (issue 23): QEMU uses the export as the backing file of a throwaway qcow2
//! overlay, and `qemu-img` and `qemu-io` read it with their own NBD client. What is served
//! is an [`Export`]: a size, `read_at`, and optionally `allocation_at`, which reports runs
//! that read as zeros without costing anything (a store's holes) as [`Allocation::Hole`].
//!
//! - [`serve_connection`] serves one connection; [`serve_listener`] accepts connections on
//!   a [`UnixListener`](std::os::unix::net::UnixListener), each on its own thread with its
//!   own export, until a [`StopFlag`] is set; [`ListenerHandle`] runs that on a thread and
//!   removes the socket when stopped or dropped. A stop shuts down every connection's
//!   socket, so it takes effect at once even while a client is idle.
//! - The handshake is fixed newstyle only, with `NBD_FLAG_NO_ZEROES`. Options:
//!   `NBD_OPT_GO` and `NBD_OPT_INFO` (`NBD_INFO_EXPORT` with the flags `HAS_FLAGS`,
//!   `READ_ONLY`, `CAN_MULTI_CONN`, `SEND_CACHE` and, with structured replies, `SEND_DF`;
//!   `NBD_INFO_BLOCK_SIZE` 1 / 64 KiB / 32 MiB; `NBD_INFO_NAME` when asked),
//!   `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY`, and
//!   `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT` for `base:allocation`. Other
//!   options get `NBD_REP_ERR_UNSUP`, another export name `NBD_REP_ERR_UNKNOWN`. The
//!   empty name is the default export, which is the one export.
//! - Commands: `NBD_CMD_READ` (a simple reply, or structured `OFFSET_DATA` and
//!   `OFFSET_HOLE` chunks, one data chunk with `NBD_CMD_FLAG_DF`), `NBD_CMD_BLOCK_STATUS`
//!   in `base:allocation` (with `NBD_CMD_FLAG_REQ_ONE`), `NBD_CMD_DISC`, `NBD_CMD_FLUSH`
//!   and `NBD_CMD_CACHE` (nothing to do: success). `WRITE`, `TRIM` and `WRITE_ZEROES` get
//!   `NBD_EPERM`; requests past the end `NBD_EINVAL`; reads over 32 MiB `NBD_EOVERFLOW`
//!   (`NBD_EINVAL` without structured replies); an error of the export `NBD_EIO` for that
//!   request, and the connection goes on.
//! - Not implemented: TCP and TLS, the oldstyle and non-fixed newstyle handshakes,
//!   extended headers, more than one export, other metadata contexts, requests in
//!   parallel on one connection (they are answered in order).
//!
//! Everything a client sends is hostile input. No length it sends is trusted for an
//! allocation: options are at most 64 KiB (longer ones end the connection), reads at most
//! 32 MiB, and structured reads are streamed from the export in pieces of 1 MiB; a write's
//! payload is skipped without being held, and one over 32 MiB ends the connection. Nothing
//! a client sends can make the server panic.

mod client;
mod error;
#[cfg(any(test, feature = "fake-server"))]
pub mod fake;
mod handshake;
mod server;
#[cfg(test)]
mod tests;
mod transmission;
mod wire;

pub use client::NbdClient;
pub use error::NbdError;
pub use server::{
    Allocation, Export, ListenerHandle, MAX_CONNECTIONS, MemoryExport, Run, ServerError, StopFlag,
    serve_connection, serve_listener,
};

/// The standard metadata context that reports allocation, with [`STATE_HOLE`] and
/// [`STATE_ZERO`].
pub const BASE_ALLOCATION: &str = "base:allocation";

/// `base:allocation` flag `NBD_STATE_HOLE`: the extent is not allocated on the server.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag `NBD_STATE_ZERO`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// Flag of a `qemu:dirty-bitmap:*` context: the extent was written since the bitmap started.
pub const STATE_DIRTY: u32 = 1;

/// The metadata context under which QEMU exports the dirty bitmap `bitmap`.
#[must_use]
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// A run of bytes of an export that have the same flags in one metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The first byte.
    pub offset: u64,
    /// How many bytes (never zero in what [`NbdClient::block_status`] returns).
    pub length: u64,
    /// The flags, whose meaning depends on the context: [`STATE_HOLE`] and [`STATE_ZERO`]
    /// for [`BASE_ALLOCATION`], [`STATE_DIRTY`] for a dirty bitmap.
    pub flags: u32,
}

impl Extent {
    /// One past the last byte.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Whether all bits of `flag` are set, e.g. `extent.has(STATE_DIRTY)`.
    #[must_use]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag == flag
    }
}
