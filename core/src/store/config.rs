//! `rewind-store.json`: what a store is (format version, id, chunk size, encryption).

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::backend::Backend;
use super::crypto::EncryptionConfig;
use super::error::{StoreError, io_error};

/// Name of the file that marks a folder as a store.
pub const CONFIG_FILE: &str = "rewind-store.json";
/// The value of the `format` field.
pub const FORMAT_NAME: &str = "rewind-store";
/// The store format version this build writes and the highest it reads.
pub const FORMAT_VERSION: u32 = 3;
/// The first format version whose data chunks carry a tree of their pieces' hashes
/// (`FORMAT.md`, "Chunk files"); a store of an older version keeps being written as it is,
/// so that the Rewind that made it can still read it.
pub const TREES_SINCE_VERSION: u32 = 2;
/// The first format version whose unencrypted stores hold *patches*: data chunks kept as
/// the pieces in which they differ from another (`FORMAT.md`, "Patches"), and index pages
/// that name their bases. An older unencrypted store is upgraded to it when it is first
/// written to (only its header's version changes).
pub const PATCHES_SINCE_VERSION: u32 = 3;
/// Default chunk size, chosen by measurement (see `core/BENCHMARKS.md`).
pub const DEFAULT_CHUNK_SIZE_BYTES: u32 = 1 << 20;
/// Smallest and largest chunk sizes a store may use.
pub const CHUNK_SIZE_RANGE_BYTES: (u32, u32) = (64 << 10, 16 << 20);

/// The contents of `rewind-store.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreConfig {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version ([`FORMAT_VERSION`] for stores this build creates).
    pub version: u32,
    /// The store's identity: a destination is recognised by it, not by its mount path.
    pub id: Uuid,
    /// When the store was created.
    pub created: DateTime<Utc>,
    /// Disks are cut into chunks of this size, aligned to disk offsets.
    pub chunk_size_bytes: u32,
    /// Present when the store is encrypted.
    pub encryption: Option<EncryptionConfig>,
    /// In an encrypted store: the MAC of everything above, with a key derived from the
    /// store's key ([`StoreConfig::authenticated_bytes`]). Absent in stores made before
    /// Rewind wrote it; added the next time such a store is written with its passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_hex: Option<String>,
}

/// Just enough of the file to check the version before trusting the rest.
#[derive(Deserialize)]
struct Probe {
    format: String,
    version: u32,
}

impl StoreConfig {
    /// Reads and checks the config of the store at `root`.
    pub fn read(root: &Path) -> Result<Self, StoreError> {
        Self::read_in(&Backend::local(root))
    }

    /// Reads and checks the config of the store in `fs`.
    pub(crate) fn read_in(fs: &Backend) -> Result<Self, StoreError> {
        let root = fs.display(Path::new(""));
        let path = root.join(CONFIG_FILE);
        let look = |e| io_error("look at", &root, e);
        if !fs.exists(Path::new("")).map_err(look)? {
            return Err(StoreError::Missing { path: root.clone() });
        }
        if !fs
            .exists(Path::new(CONFIG_FILE))
            .map_err(|e| io_error("look at", &path, e))?
        {
            return Err(StoreError::NotAStore { path: root.clone() });
        }
        let bytes = fs.read_bounded(Path::new(CONFIG_FILE), 64 << 10, &root)?;
        let damaged = |detail: String| StoreError::Damaged {
            path: path.clone(),
            detail,
            store: root.clone(),
        };
        let probe: Probe = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        if probe.format != FORMAT_NAME {
            return Err(damaged(format!(
                "its format is {:?}, not {FORMAT_NAME:?}",
                probe.format
            )));
        }
        if probe.version > FORMAT_VERSION {
            return Err(StoreError::NewerFormat {
                path: root.clone(),
                found: probe.version,
                supported: FORMAT_VERSION,
            });
        }
        if probe.version == 0 {
            return Err(damaged("its version is 0".into()));
        }
        let config: StoreConfig =
            serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        let (min, max) = CHUNK_SIZE_RANGE_BYTES;
        if !config.chunk_size_bytes.is_power_of_two()
            || !(min..=max).contains(&config.chunk_size_bytes)
        {
            return Err(damaged(format!(
                "chunk size {} is not a power of two between {min} and {max}",
                config.chunk_size_bytes
            )));
        }
        Ok(config)
    }

    /// The bytes the header's MAC covers: every field but the MAC itself, as compact JSON
    /// in the order of the fields (so the same header always gives the same bytes).
    #[must_use]
    pub fn authenticated_bytes(&self) -> Vec<u8> {
        let mut copy = self.clone();
        copy.mac_hex = None;
        serde_json::to_vec(&copy).expect("config serialises")
    }

    /// The JSON written to disk.
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("config serialises");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever `rewind-store.json` holds, reading it answers with a config or an error
        /// naming the file — never a panic.
        #[test]
        fn arbitrary_config_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::write(tmp.path().join(CONFIG_FILE), &bytes).unwrap();
            if let Err(e) = StoreConfig::read(tmp.path()) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        /// Valid JSON with arbitrary field values: still only Ok or a clear error.
        #[test]
        fn arbitrary_config_values_never_panic(version in prop_oneof![0..=FORMAT_VERSION + 1, any::<u32>()], chunk in any::<u32>(), format in "[a-z-]{0,14}") {
            let tmp = tempfile::tempdir().unwrap();
            let text = format!(
                r#"{{"format":"{format}","version":{version},"id":"00000000-0000-4000-8000-000000000000","created":"2026-01-01T00:00:00Z","chunk_size_bytes":{chunk},"encryption":null}}"#
            );
            std::fs::write(tmp.path().join(CONFIG_FILE), text).unwrap();
            let result = StoreConfig::read(tmp.path());
            let valid = format == FORMAT_NAME && (1..=FORMAT_VERSION).contains(&version) && chunk.is_power_of_two()
                && (CHUNK_SIZE_RANGE_BYTES.0..=CHUNK_SIZE_RANGE_BYTES.1).contains(&chunk);
            prop_assert_eq!(result.is_ok(), valid);
            if format == FORMAT_NAME && version > FORMAT_VERSION {
                let is_newer = matches!(result, Err(StoreError::NewerFormat { .. }));
                prop_assert!(is_newer);
            }
        }
    }
}
