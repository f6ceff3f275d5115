//! Errors of the backup store. Each names the file or folder concerned and what to do.

use std::io;
use std::path::PathBuf;

use super::chunk::ChunkProblem;

/// Everything that can go wrong with a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The folder does not exist (drive not plugged in, typo).
    #[error(
        "no backup store at {path}: the folder does not exist. Check that the drive is \
         plugged in and mounted, or create a store there with `rewind init {path}`",
        path = path.display()
    )]
    Missing {
        /// The folder that was given.
        path: PathBuf,
    },

    /// The folder exists but holds no store.
    #[error(
        "{path} is not a Rewind store (it has no rewind-store.json). Choose the folder that \
         holds rewind-store.json, or create a store with `rewind init {path}`",
        path = path.display()
    )]
    NotAStore {
        /// The folder that was given.
        path: PathBuf,
    },

    /// `init` into a folder that holds other files.
    #[error(
        "cannot create a store in {path}: the folder is not empty. Choose a new or empty \
         folder, such as {suggestion}",
        path = path.display(),
        suggestion = suggestion.display()
    )]
    NotEmpty {
        /// The folder that was given.
        path: PathBuf,
        /// A new folder inside it that would do.
        suggestion: PathBuf,
    },

    /// `init` where a store already is.
    #[error("{path} already holds a Rewind store; use it as it is", path = path.display())]
    AlreadyExists {
        /// The store's folder.
        path: PathBuf,
    },

    /// Written by a newer Rewind.
    #[error(
        "the store at {path} has format version {found}, newer than this Rewind understands \
         (up to {supported}); update Rewind to use this store",
        path = path.display()
    )]
    NewerFormat {
        /// The store's folder.
        path: PathBuf,
        /// Version in the store.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },

    /// A file of the store is not what it must be.
    #[error(
        "{path} is damaged: {detail}. Run `rewind verify --in {store}` to see which \
         checkpoints are affected",
        path = path.display(),
        store = store.display()
    )]
    Damaged {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
        /// The store it belongs to.
        store: PathBuf,
    },

    /// A chunk a checkpoint needs could not be read back intact.
    #[error(
        "chunk {chunk} of the store at {store} is {problem}. Run `rewind verify --in {store}` \
         to see which checkpoints are affected; a later checkpoint of the same data heals it",
        store = store.display()
    )]
    BadChunk {
        /// Hex name of the chunk.
        chunk: String,
        /// What is wrong.
        problem: ChunkProblem,
        /// The store's folder.
        store: PathBuf,
    },

    /// The drive is full. What was written so far is not visible; old checkpoints are intact.
    #[error(
        "the drive of the store is full (while writing {path}). Free some space on it or \
         remove old checkpoints with `rewind prune`; existing checkpoints are intact",
        path = path.display()
    )]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },

    /// Something in the store that Rewind refuses to follow or use: a link, a device, a
    /// path that leads out of the store. Nothing outside the store was touched.
    #[error(
        "refused {path}: {detail}. A Rewind store holds only plain files and folders, so \
         someone or something else put this there. Rewind never follows or uses it, and \
         touched nothing outside the store. Look at what it is, remove it, then run \
         `rewind verify` on the store",
        path = path.display()
    )]
    Refused {
        /// What was refused.
        path: PathBuf,
        /// Why.
        detail: String,
    },

    /// Any other I/O failure.
    #[error("could not {action} {path}: {source}", path = path.display())]
    Io {
        /// What was being done ("read", "create", ...).
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// Encrypted store, no passphrase given.
    #[error(
        "the store at {path} is encrypted: give its passphrase (Rewind asks for it in a \
         terminal, or reads the REWIND_PASSPHRASE environment variable)",
        path = path.display()
    )]
    PassphraseRequired {
        /// The store's folder.
        path: PathBuf,
    },

    /// The passphrase does not open the store's key.
    #[error(
        "wrong passphrase for the store at {path}; try again (passphrases are case-sensitive)",
        path = path.display()
    )]
    WrongPassphrase {
        /// The store's folder.
        path: PathBuf,
    },

    /// The encryption settings in `rewind-store.json` are unusable.
    #[error("the encryption settings of the store at {path} are invalid: {detail}", path = path.display())]
    BadEncryptionConfig {
        /// The store's folder.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// The header of an encrypted store does not match its MAC (or its MAC is malformed).
    #[error(
        "the header of the store at {path} (rewind-store.json) fails its check: {detail}. \
         Someone without the store's key changed it, or it is damaged. Rewind writes nothing \
         to this store. If you did not change it yourself, do not use this drive for \
         backups; your checkpoints are readable only from a store whose header is intact",
        path = path.display()
    )]
    HeaderTampered {
        /// The store's folder.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },

    /// A passphrase was given for a store whose header says it is not encrypted.
    #[error(
        "a passphrase was given for the store at {path}, but its rewind-store.json says it is \
         not encrypted. If you made it without encryption, use it without a passphrase (unset \
         REWIND_PASSPHRASE, or add the destination again without one). If you made it \
         encrypted, its header was changed to make Rewind write in plaintext: nothing was \
         written; do not use this drive",
        path = path.display()
    )]
    NotEncrypted {
        /// The store's folder.
        path: PathBuf,
    },

    /// A store whose header says "not encrypted" holds encrypted manifests or chunks.
    #[error(
        "the store at {path} says it is not encrypted, but {found} is encrypted: its header \
         was changed, or encrypted and plain stores were mixed. Rewind writes nothing in \
         plaintext into it. Open it with its passphrase after restoring its original \
         rewind-store.json, or use another store",
        path = path.display(),
        found = found.display()
    )]
    EncryptedContent {
        /// The store's folder.
        path: PathBuf,
        /// An encrypted file found in it.
        found: PathBuf,
    },

    /// A destination's store is not the one it was made for: its ID matches, its proof not.
    #[error(
        "{path} holds a store with the ID of destination {destination:?}, but not the proof \
         that the destination keeps for its own store ({detail}): it is another store with a \
         copied ID, or the proof file was removed. Nothing was written. If this really is \
         your store, remove the destination and add it again",
        path = path.display()
    )]
    NotTheStore {
        /// The store's folder.
        path: PathBuf,
        /// The destination's name.
        destination: String,
        /// What is wrong.
        detail: String,
    },

    /// The system's random number generator failed.
    #[error("could not get random numbers from the system: {0}")]
    Random(String),

    /// No checkpoint with this id.
    #[error(
        "no checkpoint {id} in the store at {store}; list them with `rewind checkpoints --in {store}`",
        store = store.display()
    )]
    NoSuchCheckpoint {
        /// The id that was asked for.
        id: String,
        /// The store's folder.
        store: PathBuf,
    },

    /// A name (VM, disk target, blob, checkpoint id) that cannot be used in the store.
    #[error("{what} {name:?} cannot be used: {why}")]
    InvalidName {
        /// What kind of name.
        what: &'static str,
        /// The name.
        name: String,
        /// Why not.
        why: &'static str,
    },

    /// A caller passed something that makes no sense (a chunk of the wrong length, ...).
    #[error("{0}")]
    Invalid(String),

    /// Another process holds the store in a way that excludes this operation.
    #[error("the store at {path} is busy: {holder}. Try again when it has finished", path = path.display())]
    Busy {
        /// The store's folder.
        path: PathBuf,
        /// Who holds it, as far as known.
        holder: String,
    },

    /// Garbage collection refuses to run while it cannot see every checkpoint.
    #[error(
        "garbage collection stopped without deleting anything: {detail}. It would not know \
         which chunks that checkpoint needs. Run `rewind verify --in {store}`",
        store = store.display()
    )]
    GcUnsafe {
        /// Which manifest or index could not be read.
        detail: String,
        /// The store's folder.
        store: PathBuf,
    },

    /// The checkpoint an incremental was to be taken from is no longer in the store.
    #[error(
        "checkpoint {id}, which this one was to be incremental from, has been removed from the \
         store at {store}; take a full checkpoint instead",
        store = store.display()
    )]
    ParentGone {
        /// The parent's id.
        id: String,
        /// The store's folder.
        store: PathBuf,
    },

    /// An object's index is inconsistent.
    #[error(transparent)]
    BadIndex(#[from] super::index::IndexError),

    /// A manifest about to be written is inconsistent.
    #[error(transparent)]
    BadManifest(#[from] super::manifest::ManifestError),

    /// The caller cancelled.
    #[error("cancelled")]
    Cancelled,

    /// A store location that cannot be used as written.
    #[error("{input:?} is not a usable store location: {why}")]
    BadLocation {
        /// What was given.
        input: String,
        /// What is wrong with it.
        why: String,
    },

    /// The store's host could not be reached (down, network cut, sshd not running).
    #[error(
        "cannot reach the host of the store: {detail}. Check that the host is up and its SSH \
         server runs, then try again ({location})"
    )]
    Unreachable {
        /// The store, `ssh://…`.
        location: String,
        /// What ssh said.
        detail: String,
    },

    /// ssh refused the host: its key is not known, or it changed.
    #[error(
        "ssh refused the host key of {host}: {detail}. If you trust this host, run `{accept}` \
         once and accept its key (a changed key can also mean that someone intercepts the \
         connection: ask the host's owner first), then try again ({location})"
    )]
    HostKey {
        /// The store, `ssh://…`.
        location: String,
        /// The host as given.
        host: String,
        /// What ssh said.
        detail: String,
        /// The command that asks to accept the key.
        accept: String,
        /// The key changed since it was accepted (else it was never known).
        changed: bool,
    },

    /// ssh could not log in (no key it accepts, agent not running, password needed).
    #[error(
        "ssh could not log in to {host}: {detail}. Rewind logs in like `{command}` does, \
         without asking for a password: set up a key (ssh-copy-id) or an ssh agent, or the \
         user and key in ~/.ssh/config ({location})"
    )]
    Login {
        /// The store, `ssh://…`.
        location: String,
        /// The host as given.
        host: String,
        /// What ssh said.
        detail: String,
        /// The command Rewind's connection is equivalent to.
        command: String,
    },

    /// ssh failed in some other way (bad configuration, no `ssh` program).
    #[error("ssh could not connect to the host of the store: {detail} ({location})")]
    Ssh {
        /// The store, `ssh://…`.
        location: String,
        /// What went wrong.
        detail: String,
    },

    /// The connection to the store's host broke during an operation.
    #[error(
        "the connection to the host of the store was lost while trying to {action} {path}: \
         {detail}. Nothing in the store is damaged (the unfinished operation left at most \
         temporary files); try again when the host is reachable",
        path = path.display()
    )]
    ConnectionLost {
        /// What was being done.
        action: &'static str,
        /// The file or folder, `ssh://…`.
        path: PathBuf,
        /// What failed.
        detail: String,
    },

    /// The SFTP server lacks an operation the store needs to stay consistent.
    #[error(
        "the SFTP server of the store's host lacks {missing}, which Rewind needs to write a \
         store without risking damage (OpenSSH's sftp-server has it; ask the host's owner to \
         use it) ({location})"
    )]
    ServerUnsupported {
        /// The store, `ssh://…`.
        location: String,
        /// What is missing.
        missing: String,
    },

    /// Another process took this process's lock of a remote store over, judging it stale.
    #[error(
        "this process lost its lock of the store at {path}: {detail}. Nothing was committed; \
         try again",
        path = path.display()
    )]
    LockLost {
        /// The store.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
}

impl StoreError {
    /// Whether this is a failure to reach a remote store (connecting, or a connection that
    /// broke) rather than something about the store's content.
    #[must_use]
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::HostKey { .. }
                | Self::Login { .. }
                | Self::Ssh { .. }
                | Self::ConnectionLost { .. }
                | Self::ServerUnsupported { .. }
        )
    }

    /// Whether trying the same operation again later can succeed without the user changing
    /// anything: the host or drive comes back, the link returns, another process finishes.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Missing { .. }
            | Self::Busy { .. }
            | Self::Unreachable { .. }
            | Self::ConnectionLost { .. }
            | Self::LockLost { .. } => true,
            Self::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::ConnectionReset
            ),
            _ => false,
        }
    }
}

impl From<crate::progress::Cancelled> for StoreError {
    fn from(_: crate::progress::Cancelled) -> Self {
        StoreError::Cancelled
    }
}

/// Wraps an I/O error, turning "no space left" and "quota exceeded" into [`StoreError::NoSpace`].
pub(crate) fn io_error(
    action: &'static str,
    path: impl Into<PathBuf>,
    source: io::Error,
) -> StoreError {
    let path = path.into();
    if source
        .get_ref()
        .is_some_and(<dyn std::error::Error + Send + Sync>::is::<super::backend::RemoteFailure>)
    {
        let inner = source
            .into_inner()
            .and_then(|inner| inner.downcast::<super::backend::RemoteFailure>().ok())
            .expect("checked above");
        return match *inner {
            super::backend::RemoteFailure::Lost(detail) => StoreError::ConnectionLost {
                action,
                path,
                detail,
            },
            super::backend::RemoteFailure::Connect(error) => error,
        };
    }
    if let Some(refusal) = super::local::Refusal::of(&source) {
        return StoreError::Refused {
            path,
            detail: refusal.to_string(),
        };
    }
    if let Some(inside) = source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<super::local::Inside>())
    {
        return StoreError::Refused {
            path: path.join(inside.name.file_name().unwrap_or_default()),
            detail: inside.refusal.to_string(),
        };
    }
    match source.raw_os_error() {
        Some(code)
            if code == rustix::io::Errno::NOSPC.raw_os_error()
                || code == rustix::io::Errno::DQUOT.raw_os_error() =>
        {
            StoreError::NoSpace { path }
        }
        _ => StoreError::Io {
            action,
            path,
            source,
        },
    }
}
