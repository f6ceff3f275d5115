//! Checkpoint manifests: everything about one checkpoint, complete on its own.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::index::ObjectIndex;

/// Largest manifest file Rewind reads (the domain XML and page lists of many big disks fit
/// easily; a hostile file cannot make it allocate more).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Disk-only or full state (with memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Disks, firmware variables and TPM state.
    Disk,
    /// Also memory and device state: the VM resumes where it was.
    Full,
}

/// Whether the guest's file systems were quiesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// As if the power had been cut at that instant.
    Crash,
    /// The guest agent froze the file systems (VSS on Windows).
    Application,
}

/// The VM a checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    /// Its libvirt name when the checkpoint was taken.
    pub name: String,
    /// Its libvirt UUID: the VM's identity across renames.
    pub uuid: Uuid,
}

/// One disk of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// Target device name in the guest (`vda`, `sda`).
    pub target: String,
    /// Path of the disk image on the host when it was captured.
    pub source: Option<String>,
    /// Image format on the host (`qcow2`, `raw`).
    pub format: Option<String>,
    /// Where its data is.
    pub index: ObjectIndex,
}

/// Another piece of VM state: UEFI NVRAM, TPM state, memory image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Name such as `nvram`, `tpm`, `memory`.
    pub name: String,
    /// Where its data is.
    pub index: ObjectIndex,
}

/// The label of a checkpoint taken just before a restore, to undo it with (prune keeps the
/// newest of each VM whatever the keep rules say).
pub const SAFETY_LABEL: &str = "safety";

/// A checkpoint's manifest (`manifests/<vm-uuid>/<id>.manifest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Store format version the manifest was written with.
    pub format_version: u32,
    /// The checkpoint's id, unique within its VM: its UTC time, `20261125T073000.123Z`.
    pub id: String,
    /// The VM.
    pub vm: VmRef,
    /// The instant the checkpoint captures.
    pub time: DateTime<Utc>,
    /// Disk-only or full state.
    pub kind: CheckpointKind,
    /// Crash- or application-consistent.
    pub consistency: Consistency,
    /// The libvirt domain XML at that instant.
    pub domain_xml: String,
    /// Its disks.
    pub disks: Vec<DiskEntry>,
    /// NVRAM, TPM state, memory.
    pub blobs: Vec<BlobEntry>,
    /// Bytes of data (not holes) the checkpoint holds, over all disks and blobs.
    pub logical_bytes: u64,
    /// Bytes this checkpoint added to the store (new chunk files, index pages, manifest).
    pub new_bytes: u64,
    /// The checkpoint this one was taken incrementally from, if any. Only informative:
    /// restoring never needs it.
    pub parent: Option<String>,
    /// Why a full capture was made where an incremental was possible, if so.
    pub full_reason: Option<String>,
    /// Why it is only crash-consistent (no guest agent, the agent did not answer), or
    /// what the guest agent froze for an application-consistent one.
    #[serde(default)]
    pub consistency_note: Option<String>,
    /// How long taking it took.
    pub duration_ms: u64,
    /// Bytes read from the VM's disks to take it (an incremental reads only changed chunks).
    #[serde(default)]
    pub read_bytes: u64,
    /// The libvirt checkpoint (dirty bitmaps) created at this checkpoint's instant, from
    /// which the next checkpoint into this store can be incremental.
    #[serde(default)]
    pub libvirt_checkpoint: Option<String>,
    /// Free-form labels, such as `safety` for the checkpoint taken before a restore.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Version of Rewind that wrote it.
    pub program_version: String,
}

/// Formats a checkpoint id from its time.
#[must_use]
pub fn checkpoint_id(time: DateTime<Utc>) -> String {
    time.format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

/// Checks a name that becomes part of a file name or is matched by users: ASCII letters,
/// digits, `.`, `_`, `-`; not starting with `.`; 1 to 64 characters.
pub fn check_name(what: &'static str, name: &str) -> Result<(), super::StoreError> {
    let why = if name.is_empty() || name.len() > 64 {
        Some("it must be 1 to 64 characters long")
    } else if name.starts_with('.') {
        Some("it must not start with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match why {
        Some(why) => Err(super::StoreError::InvalidName {
            what,
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// What is wrong with a manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// A format this version of Rewind does not read.
    #[error("format version {0} is not supported")]
    Version(u32),
    /// A name that cannot be a file name or label.
    #[error(transparent)]
    Name(Box<super::StoreError>),
    /// Two disks (or blobs) with one name.
    #[error("{0} {1} appears twice")]
    Twice(&'static str, String),
    /// An inconsistent index.
    #[error("{what} {name}: {source}")]
    Index {
        /// `disk` or `blob`.
        what: &'static str,
        /// Its target or name.
        name: String,
        /// What is wrong.
        #[source]
        source: super::index::IndexError,
    },
}

impl Manifest {
    /// Checks everything a hostile or damaged manifest could get wrong; `Err` says what.
    pub fn validate(&self, chunk_size_bytes: u32) -> Result<(), ManifestError> {
        if self.format_version == 0 || self.format_version > super::config::FORMAT_VERSION {
            return Err(ManifestError::Version(self.format_version));
        }
        let name =
            |what, name: &str| check_name(what, name).map_err(|e| ManifestError::Name(Box::new(e)));
        name("checkpoint id", &self.id)?;
        let mut targets = std::collections::HashSet::new();
        for disk in &self.disks {
            name("disk target", &disk.target)?;
            if !targets.insert(disk.target.as_str()) {
                return Err(ManifestError::Twice("disk", disk.target.clone()));
            }
            disk.index
                .validate(chunk_size_bytes)
                .map_err(|source| ManifestError::Index {
                    what: "disk",
                    name: disk.target.clone(),
                    source,
                })?;
        }
        let mut names = std::collections::HashSet::new();
        for blob in &self.blobs {
            name("blob name", &blob.name)?;
            if !names.insert(blob.name.as_str()) {
                return Err(ManifestError::Twice("blob", blob.name.clone()));
            }
            blob.index
                .validate(chunk_size_bytes)
                .map_err(|source| ManifestError::Index {
                    what: "blob",
                    name: blob.name.clone(),
                    source,
                })?;
        }
        for label in &self.labels {
            name("label", label)?;
        }
        if let Some(checkpoint) = &self.libvirt_checkpoint {
            name("libvirt checkpoint", checkpoint)?;
        }
        Ok(())
    }

    /// Every index of the checkpoint, disks first.
    pub fn indexes(&self) -> impl Iterator<Item = &ObjectIndex> {
        self.disks
            .iter()
            .map(|d| &d.index)
            .chain(self.blobs.iter().map(|b| &b.index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_are_valid_names() {
        let a = checkpoint_id("2026-11-25T07:30:00.123Z".parse().unwrap());
        let b = checkpoint_id("2026-11-25T07:30:01Z".parse().unwrap());
        assert_eq!(a, "20261125T073000.123Z");
        assert_eq!(b, "20261125T073001.000Z");
        assert!(a < b);
        check_name("checkpoint id", &a).unwrap();
    }

    #[test]
    fn names_that_could_escape_the_store_are_refused() {
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "x\0y",
            "é",
            &"a".repeat(65),
        ] {
            assert!(check_name("disk target", bad).is_err(), "{bad:?}");
        }
        for good in ["vda", "sda", "nvram", "tpm-state", "x_1.2"] {
            check_name("disk target", good).unwrap();
        }
    }
}
