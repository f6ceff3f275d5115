//! Writing a VM's files onto a libvirt host through the libvirt connection alone: disk
//! volumes in a storage pool, and small files (UEFI NVRAM, emulated TPM state) at any path.
//!
//! Restoring onto another host (the disaster-recovery case) reaches that host only through a
//! URI such as `qemu+ssh://user@host/system`: Rewind has no file access there, so every byte
//! goes through libvirt's storage API.
//!
//! # Disks: [`Hypervisor::create_volume_with`]
//!
//! The data is uploaded into a new raw volume (`virStorageVolCreateXML` with allocation 0,
//! a sparse file in a `dir` pool) with `virStorageVolUpload` and
//! `VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM`. Data goes as data, holes as `virStreamSendHole`
//! (only a length crosses the connection), and 64 KiB pieces of data that are all zeroes
//! become holes as well. An upload writes the volume's *file*, though, not the guest's view
//! of it, so it cannot fill a qcow2 image directly. For qcow2 the upload therefore goes into
//! a temporary raw volume `<name>.rewind-upload`, then `virStorageVolCreateXMLFrom` makes the
//! qcow2 volume from it (libvirt runs `qemu-img convert` on the host, which leaves zero
//! clusters unallocated), and the temporary volume is deleted. Meanwhile the pool needs room
//! for the data twice. qcow2 volumes are made with `compat` 1.1: libvirt's default would be
//! 0.10, which cannot hold the persistent dirty bitmaps that incremental checkpoints need.
//!
//! Cancellation is checked at every write and hole (so at least every 256 KiB of data), not
//! during the conversion, which is one libvirt call. On any error or cancel the volumes made
//! so far are deleted, except when the connection itself is lost (the error is then
//! retryable) or Rewind crashes: the half-written volume stays, under its own name for raw,
//! as `<name>.rewind-upload` for qcow2 (which the next upload of that name removes itself).
//! A caller that retries deletes a raw one first with [`Hypervisor::delete_volume`].
//!
//! # Files at any path: [`Hypervisor::write_host_file`]
//!
//! libvirt has no file API, but a `dir` storage pool whose target is the file's folder makes
//! every file in it a volume. Rewind uses a pool that already targets the folder (starting an
//! inactive one for the moment, as libvirt allows only one pool per folder) or creates a
//! *transient* pool `rewind-files-…` there (`virStoragePoolCreateXML`, with
//! `VIR_STORAGE_POOL_CREATE_WITH_BUILD` if the folder is missing), creates a raw volume of the
//! file's length (replacing an existing file: delete, then create), uploads the bytes and
//! destroys the transient pool again. Destroying a `dir` pool leaves its files alone. A
//! transient pool that a crash left is used and destroyed like a new one, so two writes into
//! the same folder must not run at the same time.
//!
//! # Findings
//!
//! With libvirt 9.0, QEMU 7.2 and swtpm 0.7 on Debian 12, checked by hand and in
//! `tests/it/remote.rs`:
//!
//! - A volume file gets the mode of the volume XML's `<permissions>` and is owned by the
//!   daemon's user (root for `qemu:///system`). A folder libvirt builds for a pool gets mode
//!   0711, root; missing parents above it are made 0755 (0777 less libvirtd's umask, 022
//!   here). An existing folder keeps its owner and mode. (Untested: under a stricter
//!   libvirtd umask a new `/var/lib/libvirt/swtpm/<uuid>` would be 0700, and swtpm, running
//!   as `tss`, could not reach its state below it.)
//! - That is enough for a VM to start: when it starts, libvirt gives the NVRAM file to
//!   `libvirt-qemu` (its DAC security driver), and the TPM state folder
//!   (`/var/lib/libvirt/swtpm/<uuid>/tpm2`, made 0711 root by the pool) and its files to
//!   `tss`, mode 0700/0600 (`swtpm_user` in `qemu.conf`). A UEFI + TPM 2.0 VM whose NVRAM
//!   and `tpm2-00.permall` were written this way and then defined with the same UUID started
//!   and booted; swtpm took the existing state (its log shows no new "vTPM manufacturing").
//! - libvirt's `ssh` transport ignores the URI's `known_hosts` parameter (only `libssh` and
//!   `libssh2` use it); OpenSSH's own `known_hosts` and `~/.ssh/config` apply instead.
//! - A full pool fails the upload with "Unable to write …: No space left on device" (or the
//!   conversion with qemu-img's "No space left on device"); that is turned into an error
//!   naming the pool. [`Hypervisor::pool_available_bytes`] lets a caller check beforehand.

use std::fmt::Write as _;
use std::path::PathBuf;

use virt::error::{ErrorNumber, ErrorNumberEnum};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::backup::xml_escape;
use super::{Hypervisor, ffi};
use crate::cleanup::OrWarn as _;
use crate::error::{Error, Result};
use crate::progress::Control;

mod host_files;
mod writer;

use writer::VolumeFormat;
pub use writer::VolumeWriter;

/// Most bytes sent in one stream message: libvirt's RPC payload limit is 256 KiB
/// (`VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX`, a little less than 256 KiB, splits the rest).
const SEND_PIECE_BYTES: usize = 256 << 10;

/// Data pieces of this size that hold only zeroes are sent as holes.
const ZERO_BLOCK_BYTES: usize = 64 << 10;

/// Suffix of the temporary raw volume a qcow2 volume is converted from.
const UPLOAD_SUFFIX: &str = ".rewind-upload";

/// libvirt's own folder for disk images; where virt-manager puts a new VM's disks.
pub const LIBVIRT_IMAGES: &str = "/var/lib/libvirt/images";

/// Name prefix of the transient pools [`Hypervisor::write_host_file`] creates.
pub const FILE_POOL_PREFIX: &str = "rewind-files-";

/// Deletes the volumes it holds when dropped, unless disarmed: nothing half-made stays.
struct DeleteOnDrop(Vec<StorageVol>);

impl DeleteOnDrop {
    fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        for vol in &self.0 {
            // Best effort: if the connection is gone, so is any way to clean up.
            vol.delete(0).or_warn("remove a volume left half-written");
        }
    }
}

impl Hypervisor {
    /// Creates volume `name` in the active pool `pool`, as a `format` image (`"raw"` or
    /// `"qcow2"`) of guest-visible size `size_bytes`, and fills it with `fill`, which is
    /// called once with a [`VolumeWriter`] that takes the content front to back, data and
    /// holes, covering exactly `size_bytes`. Returns the volume's path on that host.
    ///
    /// Holes (and zeroes) do not cross the connection. Progress is added to `control`'s done
    /// bytes (data and holes); cancelling it stops the upload at its next piece. On any error
    /// or cancel nothing is left in the pool, unless the connection itself was lost (then
    /// see [`Hypervisor::delete_volume`]). The module documentation says how it works.
    ///
    /// # Errors
    /// The pool does not exist, is inactive (the error lists the active pools) or does not
    /// hold files (only `dir`, `fs` and `netfs` pools do), a volume of that name exists, the
    /// pool fills up, the connection is lost (retryable), `fill` fails (its error is
    /// returned as it is) or covers more or less than `size_bytes`, or [`Error::Cancelled`].
    pub fn create_volume_with(
        &self,
        pool: &str,
        name: &str,
        format: &str,
        size_bytes: u64,
        control: &Control,
        fill: &mut dyn FnMut(&mut VolumeWriter<'_>) -> Result<()>,
    ) -> Result<PathBuf> {
        let format = VolumeFormat::parse(format)?;
        check_volume_name(name)?;
        if size_bytes == 0 || i64::try_from(size_bytes).is_err() {
            return Err(Error::Invalid(format!(
                "a volume must have a size between 1 byte and 8 EiB, not {size_bytes} bytes \
                 (volume {name:?})"
            )));
        }
        let pool_obj = self.active_pool(pool)?;
        self.check_folder_pool(&pool_obj, pool)?;
        if self.find_volume(&pool_obj, pool, name)?.is_some() {
            return Err(self.volume_exists_error(pool, name));
        }
        control.check().map_err(|_| Error::Cancelled)?;

        let upload_name = match format {
            VolumeFormat::Raw => name.to_owned(),
            VolumeFormat::Qcow2 => format!("{name}{UPLOAD_SUFFIX}"),
        };
        if format == VolumeFormat::Qcow2
            && let Some(stale) = self.find_volume(&pool_obj, pool, &upload_name)?
        {
            // The temporary volume of an upload that crashed: Rewind's own, by its name.
            stale.delete(0).map_err(|e| {
                self.storage_error(
                    &format!("delete the leftover volume {upload_name:?} in pool {pool:?}"),
                    &e,
                )
            })?;
        }
        let upload_vol = StorageVol::create_xml(
            &pool_obj,
            &volume_xml(&upload_name, VolumeFormat::Raw, size_bytes, None),
            0,
        )
        .map_err(|e| self.create_volume_error(pool, &upload_name, &e))?;
        let mut cleanup = DeleteOnDrop(vec![upload_vol.clone()]);

        self.upload(&upload_vol, pool, name, size_bytes, control, fill)?;

        let done = match format {
            VolumeFormat::Raw => upload_vol,
            VolumeFormat::Qcow2 => {
                control.check().map_err(|_| Error::Cancelled)?;
                let qcow2 = StorageVol::create_xml_from(
                    &pool_obj,
                    &volume_xml(name, VolumeFormat::Qcow2, size_bytes, None),
                    &upload_vol,
                    0,
                )
                .map_err(|e| self.create_volume_error(pool, name, &e))?;
                cleanup.0.push(qcow2.clone());
                upload_vol.delete(0).map_err(|e| {
                    self.storage_error(
                        &format!("delete the temporary volume {upload_name:?} in pool {pool:?}"),
                        &e,
                    )
                })?;
                cleanup.0.remove(0);
                qcow2
            }
        };
        let path = done.path().map_err(|e| {
            self.storage_error(
                &format!("read the path of volume {name:?} in pool {pool:?}"),
                &e,
            )
        })?;
        cleanup.disarm();
        Ok(PathBuf::from(path))
    }

    /// Streams `fill`'s content into the raw volume `vol`.
    fn upload(
        &self,
        vol: &StorageVol,
        pool: &str,
        name: &str,
        size_bytes: u64,
        control: &Control,
        fill: &mut dyn FnMut(&mut VolumeWriter<'_>) -> Result<()>,
    ) -> Result<()> {
        let stream = Stream::new(&self.conn, 0)
            .map_err(|e| self.storage_error("open a stream to upload a volume", &e))?;
        vol.upload(
            &stream,
            0,
            size_bytes,
            sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM,
        )
        .map_err(|e| self.upload_error(pool, name, &e))?;
        let filled = {
            let mut writer = VolumeWriter {
                hv: self,
                stream: &stream,
                control,
                pool,
                volume: name,
                size_bytes,
                position: 0,
                pending_hole_bytes: 0,
                sent_data_bytes: 0,
            };
            fill(&mut writer).and_then(|()| writer.finish())
        };
        match filled {
            Ok(()) => stream
                .finish()
                .map_err(|e| self.upload_error(pool, name, &e)),
            Err(e) => {
                // The error that stopped the upload is the one to report.
                drop(stream.abort());
                Err(e)
            }
        }
    }

    /// The names of the active storage pools, sorted.
    pub fn pool_names(&self) -> Result<Vec<String>> {
        let pools = self
            .conn
            .list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(|e| self.storage_error("list the storage pools", &e))?;
        let mut names: Vec<String> = pools.iter().filter_map(|p| p.name().ok()).collect();
        names.sort();
        Ok(names)
    }

    /// Where libvirt lets its clients keep disk images on this host: [`LIBVIRT_IMAGES`] and
    /// the folders of the active storage pools of type `dir` (as libvirt says, never as a
    /// store says). The transient pools Rewind itself makes to reach a folder for a moment
    /// ([`FILE_POOL_PREFIX`]) do not count.
    pub fn storage_folders(&self) -> Result<Vec<PathBuf>> {
        let pools = self
            .conn
            .list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(|e| self.storage_error("list the storage pools", &e))?;
        let mut folders = vec![PathBuf::from(LIBVIRT_IMAGES)];
        for pool in &pools {
            if pool
                .name()
                .map_or(true, |name| name.starts_with(FILE_POOL_PREFIX))
            {
                continue;
            }
            let target = pool
                .xml_desc(0)
                .ok()
                .and_then(|x| host_files::pool_target(&x));
            if let Some((kind, path)) = target
                && kind == "dir"
                && !folders.iter().any(|f| f.as_os_str() == path.as_str())
            {
                folders.push(PathBuf::from(path));
            }
        }
        Ok(folders)
    }

    /// The target folder of the active storage pool `pool` (for a `dir` pool, where its
    /// volumes are files), as libvirt says.
    pub fn pool_folder(&self, pool: &str) -> Result<Option<PathBuf>> {
        let pool_obj = self.active_pool(pool)?;
        let xml = pool_obj
            .xml_desc(0)
            .map_err(|e| self.storage_error(&format!("read storage pool {pool:?}"), &e))?;
        Ok(host_files::pool_target(&xml)
            .filter(|(kind, _)| kind == "dir")
            .map(|(_, path)| PathBuf::from(path)))
    }

    /// How many bytes pool `pool` has free, as libvirt last saw it (refreshed first).
    pub fn pool_available_bytes(&self, pool: &str) -> Result<u64> {
        let pool_obj = self.active_pool(pool)?;
        let what = format!("read the free space of storage pool {pool:?}");
        pool_obj
            .refresh(0)
            .map_err(|e| self.storage_error(&what, &e))?;
        pool_obj
            .info()
            .map(|info| info.available)
            .map_err(|e| self.storage_error(&what, &e))
    }

    /// Whether volume `name` exists in the active pool `pool`.
    pub fn volume_exists(&self, pool: &str, name: &str) -> Result<bool> {
        let pool_obj = self.active_pool(pool)?;
        Ok(self.find_volume(&pool_obj, pool, name)?.is_some())
    }

    /// Deletes volume `name` from the active pool `pool`; nothing happens if there is none.
    /// For a retry after a lost connection, which leaves the half-made volume behind: under
    /// its own name for raw, as `<name>.rewind-upload` for qcow2 (which the next
    /// [`Hypervisor::create_volume_with`] of that name removes by itself).
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        let pool_obj = self.active_pool(pool)?;
        match self.find_volume(&pool_obj, pool, name)? {
            Some(vol) => vol.delete(0).map_err(|e| {
                self.storage_error(
                    &format!("delete volume {name:?} in storage pool {pool:?}"),
                    &e,
                )
            }),
            None => Ok(()),
        }
    }

    fn find_volume(
        &self,
        pool_obj: &StoragePool,
        pool: &str,
        name: &str,
    ) -> Result<Option<StorageVol>> {
        match pool_obj.lookup_storage_vol_by_name(name) {
            Ok(vol) => Ok(Some(vol)),
            Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => Ok(None),
            Err(e) => Err(self.storage_error(
                &format!("look for volume {name:?} in storage pool {pool:?}"),
                &e,
            )),
        }
    }

    /// The active pool `pool`, or an error that says which pools there are.
    fn active_pool(&self, pool: &str) -> Result<StoragePool> {
        match self.conn.lookup_storage_pool_by_name(pool) {
            Ok(p) if p.is_active().unwrap_or(false) => Ok(p),
            Ok(_) => Err(Error::Invalid(format!(
                "storage pool {pool:?} is not active: start it (`virsh pool-start {pool}`) or \
                 choose an active one ({})",
                self.uri
            ))),
            Err(e) if is_code(&e, ErrorNumber::NoStoragePool) => {
                let names = self.pool_names()?;
                let choice = if names.is_empty() {
                    "this host has no active storage pool: define one (e.g. `virsh \
                     pool-define-as default dir --target /var/lib/libvirt/images`, then \
                     `virsh pool-build default` and `virsh pool-start default`)"
                        .to_owned()
                } else {
                    let mut list = String::new();
                    for (i, n) in names.iter().enumerate() {
                        let sep = if i == 0 { "" } else { ", " };
                        write!(list, "{sep}{n:?}").expect("writing to a String cannot fail");
                    }
                    format!("choose one of the active pools: {list}")
                };
                Err(Error::Invalid(format!(
                    "there is no storage pool called {pool:?}: {choice} ({})",
                    self.uri
                )))
            }
            Err(e) => Err(self.storage_error(&format!("look up storage pool {pool:?}"), &e)),
        }
    }

    /// Disks go only into pools of files (`dir`, `fs`, `netfs`): there a hole in the upload
    /// is a hole in a new file. In a pool of block devices (LVM, iSCSI, ...) it would leave
    /// whatever the device held before.
    fn check_folder_pool(&self, pool_obj: &StoragePool, pool: &str) -> Result<()> {
        let xml = pool_obj.xml_desc(0).map_err(|e| {
            self.storage_error(&format!("read the definition of storage pool {pool:?}"), &e)
        })?;
        let kind = roxmltree::Document::parse(&xml)
            .ok()
            .and_then(|d| d.root_element().attribute("type").map(str::to_owned))
            .unwrap_or_default();
        if matches!(kind.as_str(), "dir" | "fs" | "netfs") {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "storage pool {pool:?} is of type {kind:?}: Rewind restores disks as files, into \
             a pool of type dir, fs or netfs (such as \"default\"); choose one of those ({})",
            self.uri
        )))
    }

    fn volume_exists_error(&self, pool: &str, name: &str) -> Error {
        Error::Invalid(format!(
            "a volume called {name:?} already exists in storage pool {pool:?}: choose another \
             name, or delete it first (`virsh vol-delete {name} --pool {pool}`) if it is not \
             needed ({})",
            self.uri
        ))
    }

    fn create_volume_error(&self, pool: &str, name: &str, e: &virt::error::Error) -> Error {
        if is_code(e, ErrorNumber::StorageVolExist)
            || e.message().contains("exists already")
            || e.message().contains("already in use")
        {
            return self.volume_exists_error(pool, name);
        }
        if e.message().contains("No space left on device") {
            return no_space_error(pool, name, e);
        }
        self.storage_error(
            &format!("create volume {name:?} in storage pool {pool:?}"),
            e,
        )
    }

    /// An error of the upload stream: the pool filling up gets its own message.
    fn upload_error(&self, pool: &str, name: &str, e: &virt::error::Error) -> Error {
        if e.message().contains("No space left on device") {
            return no_space_error(pool, name, e);
        }
        self.storage_error(
            &format!("write volume {name:?} in storage pool {pool:?}"),
            e,
        )
    }
}

impl Hypervisor {
    /// A failed storage call. libvirt reports the host's file errors (a missing folder, a
    /// full disk) with the same code as a broken socket, so the connection counts as lost
    /// only if it is gone.
    fn storage_error(&self, action: &str, e: &virt::error::Error) -> Error {
        Error::Libvirt {
            action: action.to_owned(),
            detail: e.message().trim().to_owned(),
            connection_lost: is_code(e, ErrorNumber::NoConnect) || !self.is_alive(),
        }
    }
}

fn is_code(e: &virt::error::Error, code: ErrorNumber) -> bool {
    e.code() == ErrorNumberEnum::Known(code)
}

fn no_space_error(pool: &str, name: &str, e: &virt::error::Error) -> Error {
    Error::Libvirt {
        action: format!("write volume {name:?}"),
        detail: format!(
            "storage pool {pool:?} is full: free space there or choose a pool with more \
             room (a qcow2 volume needs room for its data twice while it is made), then \
             try again (libvirt: {})",
            e.message().trim()
        ),
        connection_lost: false,
    }
}

/// Volume names are file names in the pool's folder: no `/`, not `.` or `..`, no NUL.
fn check_volume_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(Error::Invalid(format!(
            "{name:?} cannot name a volume: use a file name (no '/', at most 255 bytes)"
        )));
    }
    Ok(())
}

/// The XML of a new volume. Raw volumes start with no allocation (a sparse file); qcow2
/// ones are compat 1.1 (with persistent dirty bitmaps).
fn volume_xml(name: &str, format: VolumeFormat, size_bytes: u64, mode: Option<u32>) -> String {
    let mut xml = format!(
        "<volume><name>{}</name><capacity unit='bytes'>{size_bytes}</capacity>",
        xml_escape(name)
    );
    let target = match format {
        VolumeFormat::Raw => {
            xml.push_str("<allocation unit='bytes'>0</allocation>");
            "<format type='raw'/>".to_owned()
        }
        VolumeFormat::Qcow2 => "<format type='qcow2'/><compat>1.1</compat>".to_owned(),
    };
    let perms = mode.map_or_else(String::new, |m| {
        format!("<permissions><mode>{m:04o}</mode></permissions>")
    });
    write!(xml, "<target>{target}{perms}</target></volume>")
        .expect("writing to a String cannot fail");
    xml
}

#[cfg(test)]
mod tests {
    use super::host_files::{pool_target, split_host_path};
    use super::writer::is_zero;
    use super::*;
    use std::path::Path;

    #[test]
    fn paths_split_into_folder_and_file() {
        let (dir, name) =
            split_host_path(Path::new("/var/lib/libvirt/qemu/nvram//win11_VARS.fd")).unwrap();
        assert_eq!(dir, Path::new("/var/lib/libvirt/qemu/nvram"));
        assert_eq!(name, "win11_VARS.fd");
        let (dir, _) = split_host_path(Path::new("/a/./b/tpm2-00.permall")).unwrap();
        assert_eq!(dir, Path::new("/a/b"));
        for bad in ["relative/file", "/a/../etc/passwd", "/", ""] {
            let e = split_host_path(Path::new(bad)).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{bad}: {e:?}");
        }
    }

    #[test]
    fn volume_names_are_file_names() {
        assert!(check_volume_name("disk-vda.qcow2").is_ok());
        assert!(check_volume_name(".hidden").is_ok());
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            assert!(check_volume_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_volume_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn volume_xml_is_sparse_raw_or_v3_qcow2() {
        let raw = volume_xml("a&b", VolumeFormat::Raw, 10, Some(0o600));
        assert_eq!(
            raw,
            "<volume><name>a&amp;b</name><capacity unit='bytes'>10</capacity>\
             <allocation unit='bytes'>0</allocation><target><format type='raw'/>\
             <permissions><mode>0600</mode></permissions></target></volume>"
        );
        let qcow2 = volume_xml("d", VolumeFormat::Qcow2, 1 << 30, None);
        assert!(qcow2.contains("<compat>1.1</compat>"), "{qcow2}");
        assert!(!qcow2.contains("allocation"), "{qcow2}");
    }

    #[test]
    fn formats_are_raw_or_qcow2() {
        assert_eq!(VolumeFormat::parse("raw").unwrap(), VolumeFormat::Raw);
        assert_eq!(VolumeFormat::parse("qcow2").unwrap(), VolumeFormat::Qcow2);
        let e = VolumeFormat::parse("vmdk").unwrap_err();
        assert!(e.to_string().contains("\"vmdk\""), "{e}");
    }

    #[test]
    fn pool_xml_gives_type_and_target() {
        let xml = "<pool type='dir'><name>p</name><source/><target><path>/var/lib/x</path>\
                   <permissions><mode>0711</mode></permissions></target></pool>";
        assert_eq!(
            pool_target(xml),
            Some(("dir".to_owned(), "/var/lib/x".to_owned()))
        );
        assert_eq!(pool_target("<pool type='rbd'><name>r</name></pool>"), None);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0; 70_000]));
        let mut data = vec![0; 70_000];
        data[69_999] = 1;
        assert!(!is_zero(&data));
    }
}
