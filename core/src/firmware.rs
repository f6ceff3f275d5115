//! A VM's firmware state beside its disks: the UEFI variables (the NVRAM file) and the
//! emulated TPM's state folder. Read at a checkpoint's capture instant, kept in the store as
//! the blobs `nvram` and `tpm` (`FORMAT.md`), checked whole before a restore touches the
//! VM, and put back where libvirt and swtpm expect them.
//!
//! # What swtpm and libvirt need (libvirt 9.0, QEMU 7.2, swtpm 0.7, checked by hand and in
//! `tests/it/resume.rs`)
//!
//! - **Where.** libvirt keeps an emulated TPM 2.0's state in `<swtpmStorageDir>/<uuid>/tpm2/`
//!   (`/var/lib/libvirt/swtpm/<uuid>/tpm2/tpm2-00.permall` for `qemu:///system`), plus a
//!   `.lock` file that swtpm takes when it starts.
//! - **Who.** swtpm runs as `swtpm_user`/`swtpm_group` of `qemu.conf` (`tss` by default).
//!   When a VM starts, libvirt makes `<uuid>/` itself (mode 0711, the daemon's user) if it is
//!   missing, and hands `tpm2/` (0700) and the files in it to the swtpm user. It does *not*
//!   touch `<uuid>/` when it exists. Before issue 16 a restore replaced `<uuid>/` by a folder
//!   of mode 0700 owned by root: swtpm could then not open its lock file
//!   (`SWTPM_NVRAM_Lock_Dir: Could not open lockfile: Permission denied`), and QEMU failed
//!   with `tpm-emulator: TPM result for CMD_INIT: 0x9 operation failed` — for a resume and
//!   for a plain boot alike. A restore therefore writes the folder as libvirt makes it:
//!   `<uuid>/` 0711, the daemon's user; everything below it owned by the swtpm user,
//!   folders 0700, files at most 0640.
//! - **Labels.** New files take the default `SELinux` context of their folder, and libvirt
//!   relabels the state folder for swtpm whenever the VM starts; `AppArmor`'s libvirt profile
//!   allows swtpm everything below `/var/lib/libvirt/swtpm/`. Nothing is copied from the
//!   store but contents and permission bits.
//! - **Which state a resume gets.** A saved memory image (a full-state checkpoint) carries
//!   swtpm's permanent, volatile and save-state blobs of the saved instant inside QEMU's
//!   `tpm-emulator` device state. On a resume QEMU hands all three to swtpm
//!   (`CMD_SET_STATEBLOB`) before it starts the TPM (`CMD_INIT`), and swtpm writes the
//!   permanent one to its state folder. So a resumed VM always has the TPM of the instant its
//!   memory was saved, whatever the folder held, even when the folder was missing (libvirt
//!   then makes a new TPM first, which the blobs replace). What the folder must be is
//!   reachable, as above. The `tpm` blob matters for booting from the checkpoint's disks: it
//!   is read at the same instant as the memory (right after the live snapshot, or while the
//!   VM is saved), so that a boot finds the permanent state the memory had.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::cleanup::OrWarn as _;
use crate::restore::confine::Confined;
use crate::store::dirblob::{self, PackedFile};
use crate::store::{CheckpointWriter, Manifest, Store, StoreError};
use crate::vm::{Firmware, VmInfo};

/// Blob name of the UEFI variables.
pub const NVRAM_BLOB: &str = "nvram";
/// Blob name of the emulated TPM's state folder (a folder blob, see [`dirblob`]).
pub const TPM_BLOB: &str = "tpm";

/// What can go wrong with a VM's firmware state.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// A file of the running VM could not be read.
    #[error(
        "could not read the {what} of VM {vm:?} at {}: {source}; run Rewind as a user who can read it (root, for qemu:///system)",
        path.display()
    )]
    Read {
        /// `UEFI variables` or `TPM state`.
        what: &'static str,
        /// The VM.
        vm: String,
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store's copy cannot be used.
    #[error(
        "the {what} in checkpoint {id} cannot be used ({detail}), so nothing was changed; restore another checkpoint"
    )]
    Damaged {
        /// `UEFI variables` or `TPM state`.
        what: &'static str,
        /// The checkpoint.
        id: String,
        /// What is wrong.
        detail: String,
    },
    /// The checkpoint has it, but this host's place for it is unknown.
    #[error("checkpoint {id} holds {what} but it is not known where this libvirt host keeps them")]
    NoPlace {
        /// `UEFI variables` or `TPM state`.
        what: &'static str,
        /// The checkpoint.
        id: String,
    },
    /// Writing it back failed.
    #[error("could not write {}: {source}", path.display())]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The names of a VM's own firmware state kept in a folder ([`FirmwareState::keep_in`]).
const KEPT_NVRAM: &str = "own-nvram";
const KEPT_TPM: &str = "own-tpm";

/// The UEFI variables and TPM state of a VM at one instant, as the store keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirmwareState {
    /// The NVRAM file's content.
    pub nvram: Option<Vec<u8>>,
    /// The TPM state folder, packed.
    pub tpm: Option<Vec<u8>>,
}

impl FirmwareState {
    /// Reads the state of VM `info` now (files that are not there yet are left out: a VM
    /// that never started has none).
    pub fn read(info: &VmInfo) -> Result<Self, FirmwareError> {
        let unreadable = |what, path: &Path, source| FirmwareError::Read {
            what,
            vm: info.name.clone(),
            path: path.to_path_buf(),
            source,
        };
        let mut state = Self::default();
        if let Firmware::Uefi {
            nvram_path: Some(path),
            ..
        } = &info.firmware
            && path.exists()
        {
            state.nvram =
                Some(std::fs::read(path).map_err(|e| unreadable("UEFI variables", path, e))?);
        }
        if let Some(path) = info.tpm.as_ref().and_then(|t| t.state_path.as_ref())
            && path.exists()
        {
            state.tpm = Some(dirblob::pack(path).map_err(|e| unreadable("TPM state", path, e))?);
        }
        Ok(state)
    }

    /// Adds it to a checkpoint being written.
    pub fn add_to(&self, writer: &mut CheckpointWriter<'_>) -> Result<(), StoreError> {
        if let Some(bytes) = &self.nvram {
            writer.add_blob_bytes(NVRAM_BLOB, bytes)?;
        }
        if let Some(bytes) = &self.tpm {
            writer.add_blob_bytes(TPM_BLOB, bytes)?;
        }
        Ok(())
    }

    /// Keeps it in `folder` (a private folder of Rewind's), to be put back later
    /// ([`FirmwareState::kept_in`], [`FirmwareState::put_back`]): a run from a checkpoint keeps
    /// the VM's own state while the VM runs on it.
    pub fn keep_in(&self, folder: &Path) -> io::Result<()> {
        for (name, bytes) in [(KEPT_NVRAM, &self.nvram), (KEPT_TPM, &self.tpm)] {
            if let Some(bytes) = bytes {
                crate::atomic_file::write(&folder.join(name), bytes, 0o600)?;
            }
        }
        Ok(())
    }

    /// What [`FirmwareState::keep_in`] kept in `folder`.
    pub fn kept_in(folder: &Path) -> io::Result<Self> {
        let read = |name| match std::fs::read(folder.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        Ok(Self {
            nvram: read(KEPT_NVRAM)?,
            tpm: read(KEPT_TPM)?,
        })
    }

    /// Puts it back as VM `info`'s own (shut off), where its definition on this host keeps
    /// them: what it holds is written, and what it does not hold (the VM had none) is
    /// removed, so that the VM's UEFI variables and TPM state are as they were when it was
    /// read. The places come from the VM's definition here, never from a store.
    pub fn put_back(&self, info: &VmInfo) -> Result<(), FirmwareError> {
        let failed = |path: &Path, source| FirmwareError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(path) = info.firmware.nvram_path() {
            match &self.nvram {
                Some(bytes) => {
                    crate::atomic_file::write(path, bytes, 0o600).map_err(|e| failed(path, e))?;
                }
                None => crate::cleanup::remove_file(path),
            }
        }
        if let Some(dir) = info.tpm.as_ref().and_then(|t| t.state_path.as_ref()) {
            match &self.tpm {
                Some(bytes) => {
                    let files = dirblob::unpack(bytes)
                        .map_err(|e| failed(dir, io::Error::other(e.to_string())))?;
                    replace_tpm_state(dir, &files, swtpm_owner())?;
                }
                None => crate::cleanup::remove_dir_all(dir),
            }
        }
        Ok(())
    }
}

/// The content of blob `name` of checkpoint `m`, if it has one (every chunk checked).
pub fn blob(store: &Store, m: &Manifest, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match m.blobs.iter().find(|b| b.name == name) {
        Some(b) => Ok(Some(store.object_reader(&b.index)?.read_all()?)),
        None => Ok(None),
    }
}

/// A checkpoint's firmware state, read from the store and checked, ready to be written.
#[derive(Debug, Clone, Default)]
pub struct SavedFirmware {
    /// The checkpoint's id.
    id: String,
    /// The UEFI variables.
    pub nvram: Option<Vec<u8>>,
    /// The files of the TPM state folder.
    pub tpm: Option<Vec<PackedFile>>,
}

impl SavedFirmware {
    /// Reads the firmware state of checkpoint `m`: a damaged copy is found here, before a
    /// restore changes anything.
    pub fn load(store: &Store, m: &Manifest) -> Result<Self, FirmwareError> {
        let damaged = |what, e: StoreError| FirmwareError::Damaged {
            what,
            id: m.id.clone(),
            detail: e.to_string(),
        };
        let nvram = blob(store, m, NVRAM_BLOB).map_err(|e| damaged("UEFI variables", e))?;
        let tpm = blob(store, m, TPM_BLOB)
            .map_err(|e| damaged("TPM state", e))?
            .map(|bytes| {
                dirblob::unpack(&bytes).map_err(|e| FirmwareError::Damaged {
                    what: "TPM state",
                    id: m.id.clone(),
                    detail: e.to_string(),
                })
            })
            .transpose()?;
        Ok(Self {
            id: m.id.clone(),
            nvram,
            tpm,
        })
    }

    /// Writes it where this machine's libvirt keeps the restored VM's state; returns
    /// whether there was each. The places are [`Confined`]: a restore checked them against
    /// what the VM is and where libvirt keeps NVRAM and TPM state
    /// ([`crate::restore::confine`]), never taken from a store as they are.
    pub fn write_local(
        &self,
        nvram_path: Option<&Confined>,
        tpm_dir: Option<&Confined>,
    ) -> Result<(bool, bool), FirmwareError> {
        let nvram_path = nvram_path.map(Confined::path);
        let tpm_dir = tpm_dir.map(Confined::path);
        let no_place = |what| FirmwareError::NoPlace {
            what,
            id: self.id.clone(),
        };
        let nvram = match (&self.nvram, nvram_path) {
            (Some(bytes), Some(path)) => {
                crate::atomic_file::write(path, bytes, 0o600).map_err(|source| {
                    FirmwareError::Write {
                        path: path.to_path_buf(),
                        source,
                    }
                })?;
                true
            }
            (Some(_), None) => return Err(no_place("UEFI variables")),
            (None, _) => false,
        };
        let tpm = match (&self.tpm, tpm_dir) {
            (Some(files), Some(dir)) => {
                replace_tpm_state(dir, files, swtpm_owner())?;
                true
            }
            (Some(_), None) => return Err(no_place("TPM state")),
            (None, _) => false,
        };
        Ok((nvram, tpm))
    }
}

/// The user and group libvirt runs swtpm as: `swtpm_user` and `swtpm_group` of
/// `/etc/libvirt/qemu.conf`, `tss` where it does not say; `None` if this machine has no
/// such user (then the files keep Rewind's own).
fn swtpm_owner() -> Option<(u32, u32)> {
    libvirt_daemon_user(("swtpm_user", "tss"), ("swtpm_group", "tss"))
}

/// The user and group the system libvirt daemon runs QEMU as: `user` and `group` of
/// `/etc/libvirt/qemu.conf`, `libvirt-qemu` (Debian's) where it does not say; `None` if
/// this machine has no such user.
#[must_use]
pub fn qemu_owner() -> Option<(u32, u32)> {
    libvirt_daemon_user(("user", "libvirt-qemu"), ("group", "libvirt-qemu"))
}

/// The ids of the user and group that `/etc/libvirt/qemu.conf` sets with the keys of
/// `user` and `group`, or their defaults (names, or `+ID`).
fn libvirt_daemon_user(user: (&str, &str), group: (&str, &str)) -> Option<(u32, u32)> {
    let conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    let setting = |(key, default): (&str, &str)| {
        conf.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map_or_else(
                || default.to_owned(),
                |(_, v)| v.trim().trim_matches('"').to_owned(),
            )
    };
    let id_of = |file: &str, name: &str| -> Option<u32> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name) && fields.len() > 2)
                .then(|| fields[2].parse().ok())
                .flatten()
        })
    };
    let (user, group) = (setting(user), setting(group));
    let uid = user
        .strip_prefix('+')
        .map_or_else(|| id_of("/etc/passwd", &user), |n| n.parse().ok())?;
    let gid = group
        .strip_prefix('+')
        .map_or_else(|| id_of("/etc/group", &group), |n| n.parse().ok())?;
    Some((uid, gid))
}

/// Replaces the TPM state folder `dir` (`<swtpmStorageDir>/<uuid>`) with `files`: unpacked
/// next to it, then swapped in, so that a failure leaves the old state. The folder is made
/// the way libvirt makes it (see the module documentation): itself 0711 and the daemon's,
/// everything in it `owner`'s (the swtpm user).
fn replace_tpm_state(
    dir: &Path,
    files: &[PackedFile],
    owner: Option<(u32, u32)>,
) -> Result<(), FirmwareError> {
    let failed = |source| FirmwareError::Write {
        path: dir.to_path_buf(),
        source,
    };
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let fresh = parent.join(format!(".{name}.rewind-new"));
    let old = parent.join(format!(".{name}.rewind-old"));
    crate::cleanup::remove_dir_all(&fresh);
    crate::cleanup::remove_dir_all(&old);
    let result = (|| {
        // Never through a link: what is replaced (and deleted) is this folder.
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(io::Error::other(
                "it is a symbolic link; Rewind replaces only a real TPM state folder",
            ));
        }
        std::fs::create_dir_all(parent)?;
        std::fs::create_dir(&fresh)?;
        for f in files {
            let path = fresh.join(&f.path);
            let folder = path.parent().unwrap_or(&fresh);
            std::fs::create_dir_all(folder)?;
            std::fs::write(&path, &f.content)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode & 0o640))?;
        }
        for entry in std::fs::read_dir(&fresh)? {
            hand_over(&entry?.path(), owner)?;
        }
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o711))?;
        if dir.exists() {
            std::fs::rename(dir, &old)?;
        }
        std::fs::rename(&fresh, dir)?;
        crate::cleanup::remove_dir_all(&old);
        std::fs::File::open(parent)?.sync_all()
    })();
    if result.is_err() {
        crate::cleanup::remove_dir_all(&fresh);
        if !dir.exists() && old.exists() {
            std::fs::rename(&old, dir).or_warn(format_args!(
                "put the TPM state back from {} to {}",
                old.display(),
                dir.display()
            ));
        }
    }
    result.map_err(failed)
}

/// Gives `path` and everything below it to `owner`; folders get mode 0700.
fn hand_over(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(path)? {
            hand_over(&entry?.path(), owner)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_tpm_state_folder_is_put_back_the_way_libvirt_makes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("0c7e5a4e-0000-4000-8000-000000000001");
        // What is there now: libvirt's layout, with other state.
        std::fs::create_dir_all(dir.join("tpm2")).unwrap();
        std::fs::write(dir.join("tpm2/tpm2-00.permall"), b"newer").unwrap();
        std::fs::write(dir.join("tpm2/stray"), b"x").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        let files = vec![
            PackedFile {
                path: "tpm2/.lock".into(),
                mode: 0o640,
                content: Vec::new(),
            },
            PackedFile {
                path: "tpm2/tpm2-00.permall".into(),
                // A store may say anything: no set-id bits, nothing for others.
                mode: 0o4777,
                content: b"checkpoint".to_vec(),
            },
        ];
        let me = rustix::process::geteuid().as_raw();
        let owner = Some((me, rustix::process::getegid().as_raw()));
        replace_tpm_state(&dir, &files, owner).unwrap();
        assert_eq!(
            std::fs::read(dir.join("tpm2/tpm2-00.permall")).unwrap(),
            b"checkpoint"
        );
        assert!(!dir.join("tpm2/stray").exists(), "the old state is gone");
        assert_eq!(mode(&dir), 0o711, "swtpm must pass through the VM's folder");
        assert_eq!(mode(&dir.join("tpm2")), 0o700);
        assert_eq!(mode(&dir.join("tpm2/tpm2-00.permall")), 0o640);
        assert_eq!(mode(&dir.join("tpm2/.lock")), 0o640);
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_tpm_state_folder_that_is_a_link_is_not_replaced_through_it() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep"), b"canary").unwrap();
        let dir = tmp.path().join("0c7e5a4e-0000-4000-8000-000000000002");
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let files = vec![PackedFile {
            path: "tpm2/tpm2-00.permall".into(),
            mode: 0o600,
            content: b"state".to_vec(),
        }];
        let err = replace_tpm_state(&dir, &files, None).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(elsewhere.join("keep")).unwrap(), b"canary");
        assert!(
            std::fs::symlink_metadata(&dir)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn the_tpm_state_below_the_vm_folder_goes_to_the_swtpm_user() {
        // Handing files to another user needs root (which `./x test` is).
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to hand files to another user");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vm");
        let files = vec![PackedFile {
            path: "tpm2/tpm2-00.permall".into(),
            mode: 0o600,
            content: b"state".to_vec(),
        }];
        replace_tpm_state(&dir, &files, Some((4242, 4343))).unwrap();
        let owner = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(owner(&dir), (0, 0), "the VM's folder stays the daemon's");
        assert_eq!(owner(&dir.join("tpm2")), (4242, 4343));
        assert_eq!(owner(&dir.join("tpm2/tpm2-00.permall")), (4242, 4343));
    }
}
