//! A folder as one blob (the emulated TPM's state folder): a small archive format of our
//! own, documented in `FORMAT.md` ("Folder blobs"), so that a store alone is enough to put
//! the folder back.
//!
//! Layout: the magic `RWDIR1\n`, then per regular file, in path order: path length (u16 LE),
//! the path relative to the folder (UTF-8, `/`-separated), the permission bits (u32 LE),
//! the length (u64 LE), the content. Subfolders are implied by the paths.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

const MAGIC: &[u8] = b"RWDIR1\n";
/// At most this many files (a TPM state folder holds one or two).
const MAX_FILES: usize = 4096;

/// Packs every regular file under `dir` (symbolic links and special files are skipped).
pub fn pack(dir: &Path) -> io::Result<Vec<u8>> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort();
    let mut out = MAGIC.to_vec();
    for rel in files {
        let path = dir.join(&rel);
        let meta = fs::symlink_metadata(&path)?;
        let content = fs::read(&path)?;
        let name = rel.to_string_lossy().replace('\\', "/");
        let name_len = u16::try_from(name.len())
            .map_err(|_| io::Error::other(format!("path too long: {name}")))?;
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(
            &(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777).to_le_bytes(),
        );
        out.extend_from_slice(&(content.len() as u64).to_le_bytes());
        out.extend_from_slice(&content);
    }
    Ok(out)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect(root, &entry.path(), out)?;
        } else if kind.is_file() {
            out.push(
                entry
                    .path()
                    .strip_prefix(root)
                    .map_err(io::Error::other)?
                    .to_path_buf(),
            );
        }
    }
    Ok(())
}

/// One file of an unpacked folder blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedFile {
    /// Path relative to the folder; only plain components (no `..`, no root).
    pub path: PathBuf,
    /// Permission bits.
    pub mode: u32,
    /// Content.
    pub content: Vec<u8>,
}

/// What is wrong with a folder blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirBlobError {
    /// It does not start like one.
    #[error("not a folder blob (no RWDIR1 header)")]
    NotADirBlob,
    /// It ends inside a file's entry.
    #[error("the folder blob is truncated")]
    Truncated,
    /// A path that is not UTF-8.
    #[error("a path is not UTF-8")]
    PathNotUtf8,
    /// A file bigger than memory can hold.
    #[error("a file is too large")]
    TooLarge,
    /// A path that would lead out of the folder.
    #[error("the path {0:?} would leave the folder")]
    LeavesFolder(String),
    /// More files than any TPM state has.
    #[error("more than {MAX_FILES} files")]
    TooManyFiles,
}

/// Unpacks a folder blob, refusing anything that could write outside the folder.
pub fn unpack(bytes: &[u8]) -> Result<Vec<PackedFile>, DirBlobError> {
    let body = bytes.strip_prefix(MAGIC).ok_or(DirBlobError::NotADirBlob)?;
    let mut cursor = Cursor { rest: body };
    let mut files = Vec::new();
    while !cursor.rest.is_empty() {
        let name_len = usize::from(u16::from_le_bytes(cursor.array()?));
        let name = std::str::from_utf8(cursor.take(name_len)?)
            .map_err(|_| DirBlobError::PathNotUtf8)?
            .to_owned();
        let mode = u32::from_le_bytes(cursor.array()?);
        let size = usize::try_from(u64::from_le_bytes(cursor.array()?))
            .map_err(|_| DirBlobError::TooLarge)?;
        let content = cursor.take(size)?.to_vec();
        let path = PathBuf::from(&name);
        if !plain_relative(&name) || !path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(DirBlobError::LeavesFolder(name));
        }
        if files.len() == MAX_FILES {
            return Err(DirBlobError::TooManyFiles);
        }
        files.push(PackedFile {
            path,
            mode: mode & 0o7777,
            content,
        });
    }
    Ok(files)
}

/// Whether `name` is a plain path below a folder, as [`pack`] writes them: `/`-separated
/// names, none empty, `.` or `..`, and no NUL (a store may hold anything; `Path` would
/// quietly drop a `.` or a doubled `/`).
fn plain_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\0')
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Reads a folder blob front to back; running out of bytes is an error.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DirBlobError> {
        if self.rest.len() < n {
            return Err(DirBlobError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DirBlobError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_of_a_tpm_like_folder() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("tpm2")).unwrap();
        fs::write(tmp.path().join("tpm2/tpm2-00.permall"), b"state").unwrap();
        fs::write(tmp.path().join("top"), b"").unwrap();
        let packed = pack(tmp.path()).unwrap();
        let files = unpack(&packed).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.path.display().to_string()).collect();
        assert_eq!(names, vec!["top", "tpm2/tpm2-00.permall"]);
        assert_eq!(files[1].content, b"state");
    }

    #[test]
    fn truncation_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"content").unwrap();
        let packed = pack(tmp.path()).unwrap();
        for n in MAGIC.len() + 1..packed.len() {
            assert!(unpack(&packed[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn paths_leaving_the_folder_are_refused() {
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../b",
            "",
            ".",
            "a/./b",
            "a//b",
            "a/",
            "tpm2/\0x",
            "..",
        ] {
            let mut blob = MAGIC.to_vec();
            blob.extend_from_slice(&u16::try_from(bad.len()).unwrap().to_le_bytes());
            blob.extend_from_slice(bad.as_bytes());
            blob.extend_from_slice(&0o600u32.to_le_bytes());
            blob.extend_from_slice(&0u64.to_le_bytes());
            assert!(unpack(&blob).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut blob = MAGIC.to_vec();
            blob.extend_from_slice(&bytes);
            drop(unpack(&blob));
            drop(unpack(&bytes));
        }
    }
}
