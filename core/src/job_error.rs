//! Why a job failed, as the front ends see it: a [`JobError`] carries a [`ErrorKind`] (what
//! sort of failure, for icons, exit codes and the choice of what to offer next), whether
//! trying again later can help, the message for the user, and the typed error it came from.
//!
//! Whether a failure is retryable is decided once, by the error type that knows: each of
//! [`crate::Error`], [`StoreError`], [`CheckpointError`] and [`RestoreError`] has an
//! `is_retryable`, and a job error only copies the answer. The scheduler and the window's
//! jobs both build their failures here.

use std::sync::Arc;

use crate::checkpoint::CheckpointError;
use crate::restore::RestoreError;
use crate::store::StoreError;

/// What sort of failure a job met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The user (or Rewind stopping) cancelled it.
    Cancelled,
    /// The configuration lacks what the job needs: no destination, no such destination.
    NotConfigured,
    /// A VM, checkpoint or disk named by the job does not exist.
    NotFound,
    /// Something needed is away for now: the drive, the SSH host, the libvirt daemon.
    Unavailable,
    /// Not allowed: libvirt refused, a passphrase is wrong or missing.
    PermissionDenied,
    /// The store or the target ran out of room.
    NoSpace,
    /// The store holds damaged data.
    Damaged,
    /// Another process holds the store.
    Busy,
    /// A full-state checkpoint cannot resume the VM here; nothing was changed, and the same
    /// checkpoint can be restored disks-only.
    CannotResume,
    /// The request itself cannot be done as asked (a name, a file that exists, a feature
    /// the VM's setup lacks).
    Invalid,
    /// Anything else: an I/O error, a libvirt operation that failed.
    Failed,
}

impl ErrorKind {
    /// The kind of `error` if it is one of the core's typed errors (or a [`JobError`]):
    /// the same answer a job failing with it gets. `None` for any other error (a front
    /// end's own message, an I/O error with no context of the core's).
    #[must_use]
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        use crate::scheduler::instance::InstanceError;
        if let Some(e) = error.downcast_ref::<JobError>() {
            return Some(e.kind);
        }
        if let Some(e) = error.downcast_ref::<crate::Error>() {
            return Some(libvirt_kind(e));
        }
        if let Some(e) = error.downcast_ref::<StoreError>() {
            return Some(store_kind(e));
        }
        if let Some(e) = error.downcast_ref::<CheckpointError>() {
            return Some(checkpoint_kind(e));
        }
        if let Some(e) = error.downcast_ref::<RestoreError>() {
            return Some(restore_kind(e));
        }
        if let Some(e) = error.downcast_ref::<InstanceError>() {
            return Some(match e {
                InstanceError::AlreadyRunning { .. } => Self::Busy,
                InstanceError::Io { .. } => Self::Failed,
            });
        }
        // The rest have a `From` that knows their kind; it needs the error itself, so
        // these few are matched here the same way.
        if let Some(e) = error.downcast_ref::<crate::destination::OpenError>() {
            use crate::destination::OpenError as O;
            return Some(match e {
                O::Missing { .. } => Self::Unavailable,
                O::Store(s) => store_kind(s),
                O::PassphraseFile { .. } => Self::PermissionDenied,
            });
        }
        if let Some(e) = error.downcast_ref::<crate::destination::AddError>() {
            return Some(add_kind(e));
        }
        if let Some(e) = error.downcast_ref::<crate::files::FilesError>() {
            return Some(files_kind(e));
        }
        error
            .downcast_ref::<crate::config::ConfigError>()
            .map(config_kind)
    }
}

/// Why a job failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    /// What sort of failure.
    pub kind: ErrorKind,
    /// Whether the same job can succeed later without the user changing anything.
    pub retryable: bool,
    /// What failed and what to do.
    pub message: String,
    /// The typed error it came from, if any.
    #[source]
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// How a [`JobError`] crosses the service's socket: its typed fields, and the words of each
/// error under it (the typed errors themselves stay in the process that met them).
#[derive(serde::Serialize, serde::Deserialize)]
struct WireJobError {
    kind: ErrorKind,
    retryable: bool,
    message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    causes: Vec<String>,
}

/// An error under a [`JobError`] that came over the socket: its words and its own cause.
#[derive(Debug)]
struct RemoteCause {
    text: String,
    source: Option<Box<RemoteCause>>,
}

impl std::fmt::Display for RemoteCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for RemoteCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl serde::Serialize for JobError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut causes = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = self
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static));
        while let Some(e) = next {
            causes.push(e.to_string());
            next = e.source();
        }
        WireJobError {
            kind: self.kind,
            retryable: self.retryable,
            message: self.message.clone(),
            causes,
        }
        .serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for JobError {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireJobError::deserialize(deserializer)?;
        let source = wire
            .causes
            .into_iter()
            .rev()
            .fold(None, |source, text| {
                Some(Box::new(RemoteCause { text, source }))
            })
            .map(|c| Arc::new(*c) as Arc<dyn std::error::Error + Send + Sync>);
        Ok(Self {
            kind: wire.kind,
            retryable: wire.retryable,
            message: wire.message,
            source,
        })
    }
}

impl PartialEq for JobError {
    /// Equal when they say the same (the sources are not compared).
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.retryable == other.retryable
            && self.message == other.message
    }
}

impl JobError {
    /// A failure of `kind` with no typed error under it, never retryable.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            retryable: false,
            message: message.into(),
            source: None,
        }
    }

    /// The same, retryable: `kind` is away for now.
    #[must_use]
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    /// The temporary work folder could not be made (retryable: room may come back).
    #[must_use]
    pub fn work_folder(source: std::io::Error) -> Self {
        Self {
            kind: ErrorKind::Failed,
            retryable: true,
            message: format!(
                "could not make a folder for the job in Rewind's work folder: {source}"
            ),
            source: Some(Arc::new(source)),
        }
    }

    /// A task of the engine's that panicked or was cut off: a bug in Rewind.
    #[must_use]
    pub fn internal(what: &dyn std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::Failed,
            format!("internal error in Rewind: {what}; please report it"),
        )
    }

    /// A failure of `kind` from `source`, with its own message.
    fn from_source<E>(kind: ErrorKind, retryable: bool, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Self {
            kind,
            retryable,
            message: source.to_string(),
            source: Some(Arc::new(source)),
        }
    }

    /// The same with `context` in front of the message ("could not read X: …").
    #[must_use]
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// Whether the job was a restore that changed nothing and can be tried disks-only.
    #[must_use]
    pub fn disk_only_possible(&self) -> bool {
        self.kind == ErrorKind::CannotResume
    }
}

/// The kind of a libvirt-side error.
fn libvirt_kind(e: &crate::Error) -> ErrorKind {
    use crate::Error as E;
    match e {
        E::DaemonNotRunning { .. }
        | E::Unreachable { .. }
        | E::Libvirt {
            connection_lost: true,
            ..
        } => ErrorKind::Unavailable,
        E::PermissionDenied { .. } => ErrorKind::PermissionDenied,
        E::UnsupportedUri { .. } | E::BadDomainXml { .. } | E::Invalid(_) => ErrorKind::Invalid,
        E::VmNotFound { .. } => ErrorKind::NotFound,
        E::Cancelled => ErrorKind::Cancelled,
        E::Libvirt { .. } | E::Io { .. } => ErrorKind::Failed,
    }
}

/// The kind of a store error.
fn files_kind(e: &crate::files::FilesError) -> ErrorKind {
    use crate::files::{FilesError as F, TreeError as T};
    match e {
        F::Store(s) => store_kind(s),
        F::NoVolume { .. }
        | F::Tree {
            source: T::NotFound { .. },
            ..
        } => ErrorKind::NotFound,
        F::Tree {
            source: T::Cancelled(_),
            ..
        } => ErrorKind::Cancelled,
        F::Tree {
            source: T::Damaged { .. },
            ..
        }
        | F::BadTable { .. } => ErrorKind::Damaged,
        F::Ambiguous { .. }
        | F::Exists { .. }
        | F::Tree {
            source:
                T::NotAFolder { .. }
                | T::NotAFile { .. }
                | T::Locked
                | T::NoFileSystem
                | T::Unsupported { .. },
            ..
        } => ErrorKind::Invalid,
        F::Output { source, .. }
        | F::Tree {
            source: T::Write { source, .. },
            ..
        } if source.kind() == std::io::ErrorKind::StorageFull => ErrorKind::NoSpace,
        F::Output { .. }
        | F::Read { .. }
        | F::Tree {
            source: T::Read(_) | T::Write { .. },
            ..
        } => ErrorKind::Failed,
    }
}

fn store_kind(e: &StoreError) -> ErrorKind {
    use StoreError as S;
    match e {
        S::Missing { .. }
        | S::Unreachable { .. }
        | S::ConnectionLost { .. }
        | S::LockLost { .. } => ErrorKind::Unavailable,
        S::PassphraseRequired { .. }
        | S::WrongPassphrase { .. }
        | S::HostKey { .. }
        | S::Login { .. }
        | S::NotEncrypted { .. } => ErrorKind::PermissionDenied,
        S::NoSpace { .. } => ErrorKind::NoSpace,
        S::Damaged { .. }
        | S::BadChunk { .. }
        | S::BadIndex(_)
        | S::Refused { .. }
        | S::HeaderTampered { .. }
        | S::EncryptedContent { .. }
        | S::NotTheStore { .. } => ErrorKind::Damaged,
        S::Busy { .. } | S::GcUnsafe { .. } => ErrorKind::Busy,
        S::NoSuchCheckpoint { .. } | S::ParentGone { .. } => ErrorKind::NotFound,
        S::Cancelled => ErrorKind::Cancelled,
        S::NotAStore { .. }
        | S::NotEmpty { .. }
        | S::AlreadyExists { .. }
        | S::NewerFormat { .. }
        | S::BadEncryptionConfig { .. }
        | S::InvalidName { .. }
        | S::Invalid(_)
        | S::BadLocation { .. }
        | S::ServerUnsupported { .. } => ErrorKind::Invalid,
        _ => ErrorKind::Failed,
    }
}

impl From<crate::Error> for JobError {
    fn from(e: crate::Error) -> Self {
        Self::from_source(libvirt_kind(&e), e.is_retryable(), e)
    }
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        Self::from_source(store_kind(&e), e.is_retryable(), e)
    }
}

/// The kind of a checkpoint error.
fn checkpoint_kind(e: &CheckpointError) -> ErrorKind {
    match e {
        CheckpointError::Libvirt(l) => libvirt_kind(l),
        CheckpointError::Store(s) => store_kind(s),
        CheckpointError::Unsupported(_) => ErrorKind::Invalid,
        _ => ErrorKind::Failed,
    }
}

/// The kind of a restore error: a restore stopped part-way is the kind of what stopped it.
fn restore_kind(e: &RestoreError) -> ErrorKind {
    match e {
        RestoreError::Libvirt(l) => libvirt_kind(l),
        RestoreError::Store(s) => store_kind(s),
        RestoreError::Safety(c) => checkpoint_kind(c),
        RestoreError::Stopped { cause, .. } => restore_kind(cause),
        RestoreError::CannotResume { .. } => ErrorKind::CannotResume,
        RestoreError::Cancelled => ErrorKind::Cancelled,
        RestoreError::NoSuchDisk { .. } => ErrorKind::NotFound,
        RestoreError::Exists(_)
        | RestoreError::Invalid(_)
        | RestoreError::DomainXml(_)
        | RestoreError::Refused { .. } => ErrorKind::Invalid,
        RestoreError::Verify { .. } => ErrorKind::Damaged,
        _ => ErrorKind::Failed,
    }
}

/// The kind of an error adding a destination.
fn add_kind(e: &crate::destination::AddError) -> ErrorKind {
    use crate::destination::AddError as A;
    match e {
        A::Store(s) => store_kind(s),
        A::NeedsPassphrase { .. } => ErrorKind::PermissionDenied,
        A::NotAbsolute(_) => ErrorKind::Invalid,
        A::PassphraseFile { .. } => ErrorKind::Failed,
    }
}

/// The kind of a configuration error.
fn config_kind(e: &crate::config::ConfigError) -> ErrorKind {
    match e {
        crate::config::ConfigError::Io { .. } => ErrorKind::Failed,
        _ => ErrorKind::Invalid,
    }
}

impl From<crate::files::FilesError> for JobError {
    fn from(e: crate::files::FilesError) -> Self {
        let retryable = matches!(&e, crate::files::FilesError::Store(s) if s.is_retryable());
        Self::from_source(files_kind(&e), retryable, e)
    }
}

impl From<crate::destination::OpenError> for JobError {
    fn from(e: crate::destination::OpenError) -> Self {
        let kind = ErrorKind::of(&e).unwrap_or(ErrorKind::Failed);
        Self::from_source(kind, e.is_retryable(), e)
    }
}

impl From<crate::destination::AddError> for JobError {
    fn from(e: crate::destination::AddError) -> Self {
        use crate::destination::AddError as A;
        let retryable = matches!(&e, A::Store(s) if s.is_retryable());
        Self::from_source(add_kind(&e), retryable, e)
    }
}

impl From<crate::config::ConfigError> for JobError {
    fn from(e: crate::config::ConfigError) -> Self {
        Self::from_source(config_kind(&e), false, e)
    }
}

impl From<crate::autostart::AutostartError> for JobError {
    fn from(e: crate::autostart::AutostartError) -> Self {
        Self::from_source(ErrorKind::Failed, false, e)
    }
}

impl From<CheckpointError> for JobError {
    fn from(e: CheckpointError) -> Self {
        Self::from_source(checkpoint_kind(&e), e.is_retryable(), e)
    }
}

impl From<RestoreError> for JobError {
    fn from(e: RestoreError) -> Self {
        Self::from_source(restore_kind(&e), e.is_retryable(), e)
    }
}

impl From<crate::bootcheck::BootCheckError> for JobError {
    fn from(e: crate::bootcheck::BootCheckError) -> Self {
        use crate::bootcheck::BootCheckError as B;
        match e {
            B::Clone(e) => e.into(),
            B::Cancelled => Self::from_source(ErrorKind::Cancelled, false, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;
    use std::path::PathBuf;

    #[test]
    fn kind_and_retryable_come_from_the_error_that_knows() {
        let missing = || StoreError::Missing {
            path: PathBuf::from("/media/usb/rewind"),
        };
        let e = JobError::from(missing());
        assert_eq!((e.kind, e.retryable), (ErrorKind::Unavailable, true));
        assert!(e.message.contains("/media/usb/rewind"), "{e}");
        assert!(e.source().is_some(), "the typed error stays underneath");

        // The same store error deep inside a restore that stopped part-way says the same.
        let stopped = RestoreError::Stopped {
            cause: Box::new(RestoreError::Store(missing())),
            outcome: "the VM is as it was".into(),
        };
        let e = JobError::from(stopped);
        assert_eq!((e.kind, e.retryable), (ErrorKind::Unavailable, true));

        let full = JobError::from(CheckpointError::Store(StoreError::NoSpace {
            path: PathBuf::from("/media/usb/rewind"),
        }));
        assert_eq!(full.kind, ErrorKind::NoSpace);
        assert_eq!(
            full.retryable,
            StoreError::NoSpace {
                path: PathBuf::from("/x")
            }
            .is_retryable()
        );

        let gone = JobError::from(crate::Error::VmNotFound {
            wanted: "win11".into(),
            uri: "qemu:///system".into(),
        });
        assert_eq!((gone.kind, gone.retryable), (ErrorKind::NotFound, false));
    }

    #[test]
    fn only_a_restore_that_cannot_resume_offers_the_disks() {
        let e = JobError::from(RestoreError::CannotResume {
            id: "x".into(),
            vm: "win11".into(),
            reason: "the OVMF file is another".into(),
        });
        assert!(e.disk_only_possible());
        assert!(!e.retryable);
        assert!(!JobError::from(RestoreError::Cancelled).disk_only_possible());
        assert_eq!(
            JobError::from(RestoreError::Cancelled).kind,
            ErrorKind::Cancelled
        );
    }

    #[test]
    fn the_kind_of_a_typed_error_is_the_kind_its_job_gets() {
        let busy = StoreError::Busy {
            path: PathBuf::from("/media/usb/rewind"),
            holder: "rewind gc".into(),
        };
        assert_eq!(ErrorKind::of(&busy), Some(ErrorKind::Busy));
        let stopped = RestoreError::Stopped {
            cause: Box::new(RestoreError::Store(StoreError::NoSuchCheckpoint {
                id: "x".into(),
                store: PathBuf::from("/s"),
            })),
            outcome: "the VM is as it was".into(),
        };
        assert_eq!(ErrorKind::of(&stopped), Some(ErrorKind::NotFound));
        let job = JobError::new(ErrorKind::NotConfigured, "no destination");
        assert_eq!(ErrorKind::of(&job), Some(ErrorKind::NotConfigured));
        let held = crate::scheduler::instance::InstanceError::AlreadyRunning {
            holder: "process 1".into(),
        };
        assert_eq!(ErrorKind::of(&held), Some(ErrorKind::Busy));
        let io = std::io::Error::other("disk on fire");
        assert_eq!(ErrorKind::of(&io), None);
    }

    #[test]
    fn the_kind_is_written_in_snake_case() {
        assert_eq!(
            serde_json::to_string(&ErrorKind::CannotResume).unwrap(),
            "\"cannot_resume\""
        );
    }
}
