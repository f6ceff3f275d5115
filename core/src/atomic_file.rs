//! Replacing a small file of the host (configuration, status, history notes, UEFI
//! variables, a passphrase file, the autostart entry) so that a crash or a power cut
//! leaves either the old file or the whole new one — one way, one durability rule for all:
//!
//! 1. a temporary file beside it (`tempfile`: a random name in the same folder, so on the
//!    same file system), created with the file's mode, owned like the file it replaces;
//! 2. the content written and flushed to the disk (`fsync`);
//! 3. renamed over the file (`rename(2)` is atomic);
//! 4. the folder flushed, so the rename itself survives a power cut.
//!
//! A failure removes the temporary file. (Files inside a store have their own writer, with
//! the store's durability rules: `store::fsutil`.)

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

/// Writes `bytes` to `path` (its folder made if missing) as the module documentation says,
/// with permission bits `mode`. A file that is replaced keeps its owner (when Rewind may
/// give it that owner: root, or the owner itself).
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let owner = std::fs::metadata(path).ok().map(|m| (m.uid(), m.gid()));
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.",
            path.file_name().unwrap_or_default().to_string_lossy()
        ))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    // Set after creating, so that the umask does not take bits away.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(bytes)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(tmp.as_file(), Some(uid), Some(gid))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_with_its_mode_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.ron");
        write(&path, b"one", 0o600).unwrap();
        write(&path, b"two, longer", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two, longer");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("config.ron")]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        write(&path, b"old", 0o644).unwrap();
        // A folder where the file should go cannot be renamed over.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write(&blocked, b"new", 0o644).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary file is left"
        );
    }
}
