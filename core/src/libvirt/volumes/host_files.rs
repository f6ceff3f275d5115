//! Files on the daemon's host written through libvirt: a folder pool reaches the folder,
//! a volume is the file.

use std::path::{Component, Path, PathBuf};

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::*;

/// A pool used to reach one folder, and what to do with it afterwards.
pub(super) struct FolderPool {
    pool: StoragePool,
    /// Destroy it when done: a transient pool Rewind created, or a defined pool that was
    /// inactive and that Rewind started for the moment.
    stop_after: bool,
}

impl FolderPool {
    /// Destroys the pool if Rewind made or started it.
    pub(super) fn release(mut self) -> std::result::Result<(), virt::error::Error> {
        if std::mem::take(&mut self.stop_after) && self.pool.is_active().unwrap_or(false) {
            self.pool.destroy()
        } else {
            Ok(())
        }
    }
}

impl Drop for FolderPool {
    fn drop(&mut self) {
        if self.stop_after {
            self.pool
                .destroy()
                .or_warn("stop the storage pool made for the restore");
        }
    }
}

impl Hypervisor {
    /// Writes `bytes` as the file at absolute `path` on the libvirt host, with permission bits
    /// `mode` (e.g. `0o600`), through libvirt only: creates missing folders, replaces an
    /// existing file. For a VM's NVRAM and its TPM state files; see the module documentation
    /// for how, and for the owner and mode of what it creates.
    ///
    /// The file is not replaced atomically (libvirt cannot rename): if this fails, the file
    /// is gone or partly written, and writing it again repairs it.
    ///
    /// # Errors
    /// `path` is not an absolute path to a file, a pool that cannot hold files (not a folder
    /// pool) already owns its folder, the host refuses the folder or file, or the connection
    /// is lost.
    pub fn write_host_file(&self, path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
        let (dir, file_name) = split_host_path(path)?;
        if mode > 0o7777 {
            return Err(Error::Invalid(format!(
                "file permissions are 12 bits (at most 0o7777), not {mode:#o} ({})",
                path.display()
            )));
        }
        let folder = self.folder_pool(&dir)?;
        let written = self.write_file_volume(&folder.pool, path, &file_name, bytes, mode);
        let released = folder.release().map_err(|e| {
            self.storage_error(
                &format!(
                    "stop the temporary storage pool Rewind used to reach {}",
                    dir.display()
                ),
                &e,
            )
        });
        written.and(released)
    }

    fn write_file_volume(
        &self,
        pool: &StoragePool,
        path: &Path,
        file_name: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<()> {
        let action = |verb: &str| format!("{verb} {}", path.display());
        match pool.lookup_storage_vol_by_name(file_name) {
            Ok(old) => {
                let kind = old
                    .info()
                    .map_err(|e| self.storage_error(&action("look at"), &e))?
                    .kind;
                if kind != sys::VIR_STORAGE_VOL_FILE {
                    return Err(in_the_way(path, &self.uri));
                }
                old.delete(0)
                    .map_err(|e| self.storage_error(&action("remove the old file"), &e))?;
            }
            Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => {}
            Err(e) => return Err(self.storage_error(&action("look for"), &e)),
        }
        let len = bytes.len() as u64;
        let vol = StorageVol::create_xml(
            pool,
            &volume_xml(file_name, VolumeFormat::Raw, len, Some(mode)),
            0,
        )
        .map_err(|e| {
            if is_code(&e, ErrorNumber::StorageVolExist) || e.message().contains("exists already") {
                in_the_way(path, &self.uri)
            } else {
                self.storage_error(&action("create"), &e)
            }
        })?;
        let cleanup = DeleteOnDrop(vec![vol.clone()]);
        if !bytes.is_empty() {
            let stream = Stream::new(&self.conn, 0)
                .map_err(|e| self.storage_error("open a stream to upload a file", &e))?;
            vol.upload(&stream, 0, len, 0)
                .map_err(|e| self.storage_error(&action("write"), &e))?;
            let mut sent = 0;
            while sent < bytes.len() {
                let end = (sent + SEND_PIECE_BYTES).min(bytes.len());
                match stream.send(&bytes[sent..end]) {
                    Ok(n) if n > 0 => sent += n.cast_unsigned(),
                    Ok(_) => {
                        let e = virt::error::Error::last_error();
                        // The error that stopped the upload is the one to report.
                        drop(stream.abort());
                        return Err(self.storage_error(&action("write"), &e));
                    }
                    Err(e) => {
                        // The error that stopped the upload is the one to report.
                        drop(stream.abort());
                        return Err(self.storage_error(&action("write"), &e));
                    }
                }
            }
            stream
                .finish()
                .map_err(|e| self.storage_error(&action("write"), &e))?;
        }
        cleanup.disarm();
        Ok(())
    }

    /// A pool whose target is folder `dir`: an existing one (started for the moment if it is
    /// inactive) or a new transient `dir` pool, building the folder if it is missing.
    fn folder_pool(&self, dir: &Path) -> Result<FolderPool> {
        let reach = |e: &virt::error::Error| {
            self.storage_error(
                &format!("reach folder {} through a storage pool", dir.display()),
                e,
            )
        };
        let pools = self.conn.list_all_storage_pools(0).map_err(|e| reach(&e))?;
        for pool in pools {
            let Ok(xml) = pool.xml_desc(0) else { continue };
            let Some((kind, target)) = pool_target(&xml) else {
                continue;
            };
            if normalize(Path::new(&target)).as_deref() != Some(dir) {
                continue;
            }
            let name = pool.name().unwrap_or_default();
            if !matches!(kind.as_str(), "dir" | "fs" | "netfs") {
                return Err(Error::Invalid(format!(
                    "storage pool {name:?} (type {kind}) owns this folder but cannot hold \
                     files, and libvirt allows one pool per folder: write the file elsewhere \
                     ({}, {})",
                    dir.display(),
                    self.uri
                )));
            }
            let active = pool.is_active().map_err(|e| reach(&e))?;
            if active {
                // Files written there without libvirt must be known before one is replaced.
                pool.refresh(0).map_err(|e| reach(&e))?;
            } else {
                pool.create(0).map_err(|e| reach(&e))?;
            }
            // A transient pool of Rewind's own, left by a crash, goes once it has served.
            let leftover =
                name.starts_with(FILE_POOL_PREFIX) && !pool.is_persistent().unwrap_or(true);
            return Ok(FolderPool {
                pool,
                stop_after: !active || leftover,
            });
        }
        let name = format!(
            "{FILE_POOL_PREFIX}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let xml = format!(
            "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
            xml_escape(&dir.to_string_lossy())
        );
        let pool = match self.conn.create_storage_pool_xml(&xml, 0) {
            Ok(pool) => pool,
            // Only a missing folder is built: building an existing one could change its mode.
            Err(e) if e.message().contains("No such file or directory") => self
                .conn
                .create_storage_pool_xml(&xml, sys::VIR_STORAGE_POOL_CREATE_WITH_BUILD)
                .map_err(|e| reach(&e))?,
            Err(e) => return Err(reach(&e)),
        };
        Ok(FolderPool {
            pool,
            stop_after: true,
        })
    }
}

pub(super) fn in_the_way(path: &Path, uri: &str) -> Error {
    Error::Invalid(format!(
        "something that is not a file (a folder, a device, a socket?) is where Rewind would \
         write a file: move it away on that host and try again ({}, {uri})",
        path.display()
    ))
}

/// Splits an absolute host path into its normalized folder and its file name.
pub(super) fn split_host_path(path: &Path) -> Result<(PathBuf, String)> {
    let bad = |why: &str| {
        Error::Invalid(format!(
            "{why}: Rewind writes files on a libvirt host by absolute path ({})",
            path.display()
        ))
    };
    let clean = normalize(path).ok_or_else(|| bad("the path must be absolute, without '..'"))?;
    let name = clean
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad("the path must end in a file name in UTF-8"))?
        .to_owned();
    check_volume_name(&name)?;
    let dir = clean
        .parent()
        .ok_or_else(|| bad("the path must name a file in a folder"))?
        .to_path_buf();
    Ok((dir, name))
}

/// `path` without `.` components and repeated or trailing slashes; `None` if it is relative
/// or has `..` (whose meaning depends on symbolic links on the host).
pub(super) fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The type and target path of a storage pool, from its XML.
pub(super) fn pool_target(xml: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let root = doc.root_element();
    let kind = root.attribute("type")?.to_owned();
    let path = root
        .children()
        .find(|n| n.has_tag_name("target"))?
        .children()
        .find(|n| n.has_tag_name("path"))?
        .text()?
        .trim()
        .to_owned();
    Some((kind, path))
}
