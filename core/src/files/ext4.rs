//! Reading ext4 volumes.

use super::{FileTree, TreeError, VolumeDisk};

/// Opens the ext4 file system on `disk`.
///
/// # Errors
/// Not read yet.
pub fn open(disk: VolumeDisk) -> Result<Box<dyn FileTree>, TreeError> {
    let _ = disk;
    Err(TreeError::Damaged {
        detail: "ext4 is not read yet".into(),
    })
}
