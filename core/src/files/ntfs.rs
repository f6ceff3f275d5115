//! Reading NTFS volumes.

use super::{FileTree, TreeError, VolumeDisk};

/// Opens the NTFS file system on `disk`.
///
/// # Errors
/// Not read yet.
pub fn open(disk: VolumeDisk) -> Result<Box<dyn FileTree>, TreeError> {
    let _ = disk;
    Err(TreeError::Damaged {
        detail: "NTFS is not read yet".into(),
    })
}
