//! Reading ext2, ext3 and ext4 volumes (Linux guests), with the `ext4-view` crate.
//!
//! `ext4-view` reads read-only, checks the metadata's checksums, and reports a damaged
//! file system as an error; its calls are still guarded against panics, since the volume
//! is input anyone may have written.

use std::io::Write;
use std::panic::AssertUnwindSafe;

use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType, Metadata};

use super::{Entry, EntryKind, FileTree, Timestamp, TreeError, VolumeDisk};
use crate::progress::Control;

/// How much of a file is read at a time.
const BLOCK: usize = 1 << 20;

/// The volume, as `ext4-view` reads it.
struct Volume(VolumeDisk);

impl Ext4Read for Volume {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_exact_at(start_byte, dst).map_err(Into::into)
    }
}

/// An ext4 volume's folders and files.
struct Ext4Tree {
    fs: Ext4,
}

/// Opens the ext2/3/4 file system on `disk`.
///
/// # Errors
/// The file system is damaged or uses a feature `ext4-view` does not read, or reading
/// failed.
pub fn open(disk: VolumeDisk) -> Result<Box<dyn FileTree>, TreeError> {
    let fs = guarded("", || Ext4::load(Box::new(Volume(disk))))?;
    Ok(Box::new(Ext4Tree { fs }))
}

/// Runs a call into `ext4-view`, turning its errors (and any panic) into [`TreeError`]s
/// about `path`.
fn guarded<T>(path: &str, call: impl FnOnce() -> Result<T, Ext4Error>) -> Result<T, TreeError> {
    match std::panic::catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(tree_error(path, e)),
        Err(_) => Err(TreeError::Damaged {
            detail: format!("the ext4 reader failed on {}", shown(path)),
        }),
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() {
        "the root folder"
    } else {
        path
    }
}

fn tree_error(path: &str, error: Ext4Error) -> TreeError {
    let path_owned = || shown(path).to_owned();
    match error {
        Ext4Error::NotFound => TreeError::NotFound { path: path_owned() },
        Ext4Error::NotADirectory => TreeError::NotAFolder { path: path_owned() },
        Ext4Error::IsADirectory | Ext4Error::IsASpecialFile | Ext4Error::NotASymlink => {
            TreeError::NotAFile { path: path_owned() }
        }
        Ext4Error::Encrypted => TreeError::Unsupported {
            path: path_owned(),
            detail: "it is encrypted with ext4's own encryption".into(),
        },
        Ext4Error::Io(source) => match source.downcast::<std::io::Error>() {
            Ok(io) => TreeError::Read(*io),
            Err(other) => TreeError::Read(std::io::Error::other(other.to_string())),
        },
        other => TreeError::Damaged {
            detail: format!("ext4, at {}: {other}", shown(path)),
        },
    }
}

/// The absolute path `ext4-view` takes, from the names of a path.
fn absolute(path: &[String]) -> Result<String, TreeError> {
    if let Some(bad) = path
        .iter()
        .find(|n| n.is_empty() || *n == "." || *n == ".." || n.contains(['/', '\0']))
    {
        return Err(TreeError::NotFound {
            path: format!("{} (\"{bad}\" is not a name)", path.join("/")),
        });
    }
    Ok(format!("/{}", path.join("/")))
}

fn timestamp(t: ext4_view::Timestamp) -> Timestamp {
    Timestamp {
        seconds: t.seconds(),
        nanos: t.nanoseconds().min(999_999_999),
    }
}

fn kind(file_type: FileType) -> EntryKind {
    if file_type.is_dir() {
        EntryKind::Folder
    } else if file_type.is_regular_file() {
        EntryKind::File
    } else if file_type.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    }
}

fn entry(name: String, metadata: &Metadata, inode: Option<u64>) -> Entry {
    let kind = kind(metadata.file_type());
    Entry {
        name,
        kind,
        size_bytes: if kind == EntryKind::Folder {
            0
        } else {
            metadata.len()
        },
        modified: Some(timestamp(metadata.modified())),
        id: inode,
        streams: Vec::new(),
    }
}

impl FileTree for Ext4Tree {
    fn list(&mut self, folder: &[String]) -> Result<Vec<Entry>, TreeError> {
        let path = absolute(folder)?;
        let shown_path = folder.join("/");
        let fs = &self.fs;
        guarded(&shown_path, || {
            let mut entries = Vec::new();
            for item in fs.read_dir(path.as_str())? {
                let item = item?;
                let name = item.file_name();
                let name = name.as_str().map_or_else(
                    |_| String::from_utf8_lossy(name.as_ref()).into_owned(),
                    str::to_owned,
                );
                if name == "." || name == ".." {
                    continue;
                }
                // The entry's own inode: a lookup by path would scan the folder again
                // for each entry (quadratic in its size).
                let metadata = item.metadata()?;
                entries.push(entry(name, &metadata, None));
            }
            Ok(entries)
        })
    }

    fn entry(&mut self, path: &[String]) -> Result<Entry, TreeError> {
        let absolute = absolute(path)?;
        let fs = &self.fs;
        let metadata = guarded(&path.join("/"), || fs.symlink_metadata(absolute.as_str()))?;
        Ok(entry(
            path.last().cloned().unwrap_or_default(),
            &metadata,
            None,
        ))
    }

    fn read(
        &mut self,
        path: &[String],
        stream: Option<&str>,
        out: &mut dyn Write,
        control: &Control,
    ) -> Result<u64, TreeError> {
        let shown_path = path.join("/");
        if let Some(stream) = stream {
            return Err(TreeError::NotFound {
                path: format!("{shown_path}:{stream} (ext4 files have no named streams)"),
            });
        }
        let absolute = absolute(path)?;
        let fs = &self.fs;
        let metadata = guarded(&shown_path, || fs.symlink_metadata(absolute.as_str()))?;
        if !metadata.file_type().is_regular_file() {
            return Err(TreeError::NotAFile { path: shown_path });
        }
        let mut file = guarded(&shown_path, || fs.open(absolute.as_str()))?;
        let mut buf = vec![0; BLOCK];
        let mut written = 0u64;
        loop {
            control.check()?;
            // `read_bytes` stops at a block's end: fill the buffer from several.
            let mut filled = 0;
            while filled < buf.len() {
                let n = guarded(&shown_path, || file.read_bytes(&mut buf[filled..]))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            written += super::deliver(out, &buf[..filled], &shown_path, control)?;
        }
        Ok(written)
    }

    fn read_link(&mut self, path: &[String]) -> Result<String, TreeError> {
        let absolute = absolute(path)?;
        let fs = &self.fs;
        let target = guarded(&path.join("/"), || fs.read_link(absolute.as_str()))?;
        Ok(target.to_str().map_or_else(
            |_| String::from_utf8_lossy(target.as_ref()).into_owned(),
            str::to_owned,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::process::Command;

    use super::*;
    use crate::files::Slice;

    fn names(v: &[String]) -> Vec<String> {
        v.to_vec()
    }

    #[test]
    fn files_made_by_mkfs_ext4_read_back_with_names_times_and_bytes() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipped: mkfs.ext4 is not installed (e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let deep = src.join("a/b/c/d/e/f/g/h");
        std::fs::create_dir_all(&deep).unwrap();
        let long = format!("Größe-ünïcødé-{}", "x".repeat(200));
        std::fs::write(src.join(&long), b"long name").unwrap();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
            .collect();
        std::fs::write(deep.join("data.bin"), &data).unwrap();
        let sparse = std::fs::File::create(src.join("sparse")).unwrap();
        sparse.set_len(50 << 20).unwrap();
        drop(sparse);
        symlink("a/b", src.join("link")).unwrap();
        // mkfs.ext4 -d keeps whole seconds only.
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 0);
        std::fs::File::options()
            .write(true)
            .open(deep.join("data.bin"))
            .unwrap()
            .set_modified(t)
            .unwrap();
        let image = dir.path().join("ext4.img");
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "linux", "-d"])
            .arg(&src)
            .arg(&image)
            .arg("64M")
            .status()
            .unwrap();
        assert!(made.success());
        let file = std::fs::File::open(&image).unwrap();
        let len = file.metadata().unwrap().len();
        let disk: Box<dyn crate::files::Disk + Send> = Box::new(file);
        let mut tree = open(Slice::new(disk, 0, len)).unwrap();

        let root = tree.list(&[]).unwrap();
        let find = |name: &str| root.iter().find(|e| e.name == name).cloned();
        assert_eq!(find(&long).unwrap().size_bytes, 9);
        assert_eq!(find("a").unwrap().kind, EntryKind::Folder);
        assert_eq!(find("link").unwrap().kind, EntryKind::Symlink);
        assert_eq!(find("sparse").unwrap().size_bytes, 50 << 20);
        assert!(find("lost+found").is_some());
        assert!(root.iter().all(|e| e.name != "." && e.name != ".."));

        let path: Vec<String> = "a/b/c/d/e/f/g/h/data.bin"
            .split('/')
            .map(str::to_owned)
            .collect();
        let meta = tree.entry(&names(&path)).unwrap();
        assert_eq!(meta.size_bytes, data.len() as u64);
        assert_eq!(
            meta.modified,
            Some(Timestamp {
                seconds: 1_600_000_000,
                nanos: 0
            })
        );
        let mut out = Vec::new();
        let control = Control::new();
        assert_eq!(
            tree.read(&path, None, &mut out, &control).unwrap(),
            data.len() as u64
        );
        assert!(out == data, "the content differs");
        assert_eq!(control.progress_bytes().0, data.len() as u64);
        assert_eq!(tree.read_link(&["link".into()]).unwrap(), "a/b");

        assert!(matches!(
            tree.list(&["nothing".into()]),
            Err(TreeError::NotFound { .. })
        ));
        assert!(matches!(
            tree.list(&path),
            Err(TreeError::NotAFolder { .. })
        ));
        assert!(matches!(
            tree.read(&["a".into()], None, &mut Vec::new(), &control),
            Err(TreeError::NotAFile { .. })
        ));
        assert!(matches!(
            tree.list(&["..".into()]),
            Err(TreeError::NotFound { .. })
        ));
        control.cancel();
        assert!(matches!(
            tree.read(&path, None, &mut Vec::new(), &control),
            Err(TreeError::Cancelled(_))
        ));
    }

    #[test]
    fn a_damaged_ext4_volume_is_an_error_never_a_panic() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipped: mkfs.ext4 is not installed (e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("folder/inner")).unwrap();
        for i in 0..40u32 {
            std::fs::write(
                src.join(format!("folder/file{i}")),
                vec![i.to_le_bytes()[0]; 5000],
            )
            .unwrap();
        }
        let image = dir.path().join("ext4.img");
        assert!(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-d"])
                .arg(&src)
                .arg(&image)
                .arg("8M")
                .status()
                .unwrap()
                .success()
        );
        let clean = std::fs::read(&image).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..150 {
            let mut bytes = clean.clone();
            // Metadata lives in the first few hundred KiB: the superblock, the group
            // descriptors, the inode table and the folders' blocks.
            for _ in 0..=(next() % 16) {
                let at = usize::try_from(next() % (512 << 10)).unwrap();
                bytes[at] ^= 1 << (next() % 8);
            }
            let len = bytes.len() as u64;
            let disk: Box<dyn crate::files::Disk + Send> = Box::new(std::io::Cursor::new(bytes));
            let Ok(mut tree) = open(Slice::new(disk, 0, len)) else {
                continue;
            };
            let control = Control::new();
            if let Ok(entries) = tree.list(&["folder".into()]) {
                for e in entries {
                    // Whatever it reads, it must return; errors are expected here.
                    let read = tree.read(
                        &["folder".into(), e.name],
                        None,
                        &mut std::io::sink(),
                        &control,
                    );
                    drop(read);
                }
            }
        }
    }
}
