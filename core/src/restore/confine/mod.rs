//! What a restore may touch: the one check between a store, which anyone may have written
//! (a USB stick, a NAS), and the host, where the restore runs as root.
//!
//! A checkpoint's paths — each disk's source, the NVRAM file, the TPM state folder, every
//! file its domain definition names — are hints. Before the first write or delete, every
//! restore (in place, as a new VM, an undo, the roll-back after a failure, the resume of a
//! full-state checkpoint) checks each path it would touch, and the definition it would
//! define, against [`Rules`]:
//!
//! - **What the VM is now.** A value identical to the VM's current libvirt definition on this
//!   host is always allowed: that is what the user has now. For a new VM beside the
//!   original, only what the original reads (its kernel, firmware, CD-ROM images, QEMU) and
//!   its devices count; what it writes (disks, logs, sockets, NVRAM, TPM state) stays its own.
//! - **Where libvirt keeps VMs.** Disk images, logs, sockets and shared folders may be in
//!   libvirt's storage folders (`/var/lib/libvirt/images` and the folders of the active `dir`
//!   pools, as libvirt lists them; for a new VM also the folder the user chose); the UEFI
//!   variables directly in libvirt's NVRAM folder (`/var/lib/libvirt/qemu/nvram`); the TPM
//!   state in `<swtpm folder>/<the VM's UUID>` (`/var/lib/libvirt/swtpm/<uuid>`); firmware
//!   only as the daemon offers it (its domain capabilities).
//! - **Never.** A path that is not plain and absolute (`..`, `.`, relative), one whose folder
//!   leads elsewhere through a symbolic link, one that is a symbolic link itself, a file
//!   that another VM on the host writes (or one it reads, for writing), block devices,
//!   network disks, host devices, programs and QEMU command-line passthrough that the VM's
//!   current definition does not have.
//!
//! What is unsafe but not needed is made safe instead of refused ([`domain`]): an
//! `<emulator>` libvirt can choose itself is dropped, a CD-ROM outside is ejected, an NVRAM
//! template is left to libvirt, USB redirection and smartcards through the viewer are left
//! out, security labels that would loosen QEMU's confinement are dropped. Each change is
//! said in the restore's report and log. Anything else is a [`Refusal`], before anything
//! changes, that says what, why, and what the user can do.

pub mod domain;

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use super::RestoreError;
use crate::libvirt::Hypervisor;

/// What a path in a restore is used for, which decides where it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A disk image the restore or the guest writes (a disk, its data file, a lease).
    Disk,
    /// A host block device used as a disk.
    Block,
    /// An image the guest only reads: a CD-ROM, a floppy, a read-only disk, a backing file.
    ReadOnlyImage,
    /// A file QEMU reads into the guest: kernel, initrd, device tree, ACPI table, option
    /// ROM, firmware configuration entry.
    BootFile,
    /// The UEFI or BIOS firmware (`<os><loader>`).
    Loader,
    /// The template of the UEFI variables (`<nvram template>`).
    NvramTemplate,
    /// The UEFI variable store.
    Nvram,
    /// The emulated TPM's state folder (which a restore replaces).
    TpmState,
    /// A file written as the VM runs: a serial or console log, a pipe, an audio capture.
    LogFile,
    /// A Unix socket QEMU creates or connects to.
    Socket,
    /// A host folder or file the guest sees (`<filesystem>`, a `dir` disk).
    HostFolder,
    /// A program libvirt runs (`<emulator>`, virtiofsd, an interface script).
    Program,
    /// A host device (`/dev/...`) given to the guest.
    HostDevice,
    /// Any other host path in the definition.
    Other,
}

impl Role {
    /// Whether the host file is written (by the restore, QEMU, virtlogd or swtpm).
    #[must_use]
    pub fn writes(self) -> bool {
        matches!(
            self,
            Self::Disk
                | Self::Block
                | Self::Nvram
                | Self::TpmState
                | Self::LogFile
                | Self::Socket
                | Self::HostFolder
                | Self::HostDevice
                | Self::Other
        )
    }

    /// Whether it is read and never written, so that a new VM beside the original may
    /// share it.
    fn shareable(self) -> bool {
        matches!(
            self,
            Self::ReadOnlyImage
                | Self::BootFile
                | Self::Loader
                | Self::NvramTemplate
                | Self::Program
        )
    }
}

/// The paths and devices of one VM's definition on this host.
#[derive(Debug, Clone, Default)]
pub struct Reference {
    uses: HashSet<(Role, String)>,
    devices: HashSet<String>,
}

impl Reference {
    /// Adds everything domain definition `xml` names (unreadable XML adds nothing).
    pub fn add_xml(&mut self, xml: &str) {
        let Ok(doc) = roxmltree::Document::parse(xml) else {
            return;
        };
        let scan = domain::scan(&doc);
        for u in scan.paths {
            self.uses.insert((u.role, u.value));
        }
        for d in scan.devices {
            self.devices.insert(d.canonical);
        }
    }

    /// Adds one path.
    pub fn add(&mut self, role: Role, path: &Path) {
        self.uses.insert((role, path.display().to_string()));
    }

    /// Whether it names `value` for `role`.
    #[must_use]
    pub fn has(&self, role: Role, value: &str) -> bool {
        self.uses.contains(&(role, value.to_owned()))
    }

    /// Whether it has a device (an element) written the same, ignoring aliases and
    /// whitespace.
    #[must_use]
    pub fn has_device(&self, canonical: &str) -> bool {
        self.devices.contains(canonical)
    }

    /// Only what another VM may share with it: what it reads, and its devices.
    #[must_use]
    pub fn shareable(&self) -> Self {
        Self {
            uses: self
                .uses
                .iter()
                .filter(|(role, _)| role.shareable())
                .cloned()
                .collect(),
            devices: self.devices.clone(),
        }
    }

    fn paths(&self) -> impl Iterator<Item = (Role, &str)> {
        self.uses.iter().map(|(r, v)| (*r, v.as_str()))
    }
}

/// Why a restore was refused: what it would have touched, and why that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not a plain absolute path.
    #[error(
        "{what} {path:?} is not a plain absolute path (it is relative, or has `..` or `.` in it)"
    )]
    NotPlain {
        /// What the path is.
        what: String,
        /// The path.
        path: String,
    },
    /// Outside the folders allowed for it.
    #[error("{what} {path:?} is outside {allowed}")]
    Outside {
        /// What the path is.
        what: String,
        /// The path.
        path: String,
        /// Where it may be, in words.
        allowed: String,
    },
    /// Its folder, or the path itself, leads elsewhere through a symbolic link.
    #[error("{what} {path:?} leads elsewhere through a symbolic link (to {resolved:?})")]
    Symlink {
        /// What the path is.
        what: String,
        /// The path.
        path: String,
        /// Where it leads.
        resolved: String,
    },
    /// Another VM on the host uses it.
    #[error("{what} {path:?} is used by VM {vm:?} on this host")]
    OtherVm {
        /// What the path is.
        what: String,
        /// The path.
        path: String,
        /// The other VM.
        vm: String,
    },
    /// Only the VM's current definition may name this, and it does not.
    #[error(
        "{what} {value:?} is not in the VM's current definition on this host, and only that may name {kind}"
    )]
    NotCurrent {
        /// What it is.
        what: String,
        /// Its value.
        value: String,
        /// The kind of thing (`a block device`, `a program`...).
        kind: &'static str,
    },
    /// A host device that the VM's current definition does not give it.
    #[error(
        "{what} gives the VM a device of this host, and the VM's current definition on this host does not have it"
    )]
    HostDevice {
        /// The element, in short.
        what: String,
    },
    /// QEMU command-line passthrough that the VM's current definition does not have.
    #[error(
        "{what} passes arguments to QEMU past libvirt, and the VM's current definition on this host does not have them"
    )]
    Passthrough {
        /// The element, in short.
        what: String,
    },
    /// The definition is of another VM than the one restored.
    #[error(
        "the definition is of VM {found:?} (UUID {found_uuid}), not of {expected:?} (UUID {expected_uuid})"
    )]
    OtherIdentity {
        /// Its name.
        found: String,
        /// Its UUID.
        found_uuid: String,
        /// The VM restored.
        expected: String,
        /// Its UUID.
        expected_uuid: String,
    },
    /// A disk format that is not an image format.
    #[error("disk {target}'s format {format:?} is not a disk image format Rewind restores")]
    Format {
        /// The disk.
        target: String,
        /// The format.
        format: String,
    },
    /// The name of a disk (its target) cannot be part of a file name.
    #[error("disk name {target:?} cannot be part of a file name")]
    DiskName {
        /// The disk's target.
        target: String,
    },
    /// The definition cannot be read.
    #[error("the domain definition cannot be read: {0}")]
    Unreadable(String),
}

/// The image formats a restore writes with `qemu-img`/`qemu-nbd`: no protocol, no host
/// folder (`vvfat`), no device.
pub const IMAGE_FORMATS: &[&str] = &["raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc"];

/// What a restore may touch on its libvirt host (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Whether the host is this machine (its files can be looked at: symbolic links are
    /// followed to see where a path really is).
    pub local: bool,
    /// The name the restored VM has.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Its current definition on this host (for a new VM: what it may share with the
    /// original).
    pub current: Reference,
    /// libvirt's storage folders (and a new VM's own folder).
    pub storage: Vec<PathBuf>,
    /// libvirt's folder of UEFI variable stores.
    pub nvram_dir: Option<PathBuf>,
    /// libvirt's folder of TPM state folders.
    pub swtpm_dir: Option<PathBuf>,
    /// The firmware files the daemon offers.
    pub firmware: Vec<PathBuf>,
    /// Every path other VMs on the host use: the path, whether they write it, the VM.
    pub others: Vec<(PathBuf, bool, String)>,
    /// Files this restore creates itself (a new VM's disks).
    pub own_new: Vec<PathBuf>,
    /// Disks (targets) whose source this restore sets itself: their sources in a
    /// checkpoint's definition are not looked at.
    pub placed_disks: Vec<String>,
}

/// A path that passed [`Rules::confine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined(PathBuf);

impl Confined {
    /// The path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for Confined {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

/// `value` as a path, if it is plain: absolute, with no `.`, `..` or empty names.
fn plain(value: &str) -> Option<PathBuf> {
    let rest = value.strip_prefix('/')?;
    if value.contains('\0') || value.len() > 4096 {
        return None;
    }
    if !rest.is_empty()
        && rest
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return None;
    }
    let path = PathBuf::from(value);
    path.components()
        .skip(1)
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(path)
}

/// Where `path` really is on this machine: the nearest part of it that exists, with every
/// symbolic link followed, and the rest (which does not exist, so holds no link) after it.
fn resolve(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut at = path;
    loop {
        if let Ok(real) = at.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                at = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

impl Rules {
    /// Checks one path for `role` (`what` names it in a refusal) and returns it confined.
    ///
    /// # Errors
    /// Why it may not be touched.
    pub fn confine(&self, role: Role, path: &Path, what: &str) -> Result<Confined, Refusal> {
        self.check_path(role, &path.display().to_string(), what)?;
        Ok(Confined(path.to_path_buf()))
    }

    /// Checks one path (as the definition or manifest writes it) for `role`.
    ///
    /// # Errors
    /// Why it may not be touched.
    pub fn check_path(&self, role: Role, value: &str, what: &str) -> Result<(), Refusal> {
        if self.current.has(role, value)
            || (role == Role::Disk && self.own_new.iter().any(|p| p.as_os_str() == value))
        {
            return Ok(());
        }
        let Some(path) = plain(value) else {
            return Err(Refusal::NotPlain {
                what: what.to_owned(),
                path: value.to_owned(),
            });
        };
        let outside = |allowed: String| Refusal::Outside {
            what: what.to_owned(),
            path: value.to_owned(),
            allowed,
        };
        let not_current = |kind| Refusal::NotCurrent {
            what: what.to_owned(),
            value: value.to_owned(),
            kind,
        };
        match role {
            Role::Nvram => {
                let dir = self.nvram_dir.as_ref().ok_or_else(|| {
                    outside(
                        "libvirt's folder of UEFI variables, which is not known for this host"
                            .into(),
                    )
                })?;
                self.within(&path, std::slice::from_ref(dir), true, what)
                    .map_err(|e| {
                        e.unwrap_or_else(|| {
                            outside(format!(
                                "libvirt's folder of UEFI variables ({})",
                                dir.display()
                            ))
                        })
                    })?;
            }
            Role::TpmState => {
                let root = self.swtpm_dir.as_ref().ok_or_else(|| {
                    outside("swtpm's state folder, which is not known for this host".into())
                })?;
                let expected = root.join(&self.uuid);
                let described = format!(
                    "swtpm's state folder of this VM ({}, under libvirt's {})",
                    expected.display(),
                    root.display()
                );
                if path != expected {
                    return Err(outside(described));
                }
                self.within(&path, std::slice::from_ref(root), true, what)
                    .map_err(|e| e.unwrap_or_else(|| outside(described.clone())))?;
            }
            Role::Loader => {
                if !self.firmware.contains(&path) {
                    return Err(outside(self.firmware_words()));
                }
            }
            Role::NvramTemplate => {
                let folders: Vec<&Path> = self.firmware.iter().filter_map(|f| f.parent()).collect();
                if !path.parent().is_some_and(|p| folders.contains(&p)) {
                    return Err(outside(format!("the folders of {}", self.firmware_words())));
                }
            }
            Role::Block => return Err(not_current("a block device")),
            Role::Program => return Err(not_current("a program")),
            Role::HostDevice => return Err(not_current("a host device")),
            Role::Disk
            | Role::ReadOnlyImage
            | Role::BootFile
            | Role::LogFile
            | Role::Socket
            | Role::HostFolder
            | Role::Other => {
                self.within(&path, &self.storage, false, what)
                    .map_err(|e| e.unwrap_or_else(|| outside(self.storage_words())))?;
            }
        }
        self.not_of_others(role, &path, what)
    }

    /// Whether `path` is in one of `folders` (directly in it, if `direct`), also once
    /// every symbolic link is followed, and is no symbolic link itself. `Err(None)`: it is
    /// not in any; `Err(Some(..))`: it is, but only on its face.
    fn within(
        &self,
        path: &Path,
        folders: &[PathBuf],
        direct: bool,
        what: &str,
    ) -> Result<(), Option<Refusal>> {
        let inside = |p: &Path, f: &Path| {
            if direct {
                p.parent() == Some(f)
            } else {
                p.starts_with(f) && p != f
            }
        };
        let Some(folder) = folders.iter().find(|f| inside(path, f)) else {
            return Err(None);
        };
        if !self.local {
            return Ok(());
        }
        let symlink = |resolved: &Path| {
            Some(Refusal::Symlink {
                what: what.to_owned(),
                path: path.display().to_string(),
                resolved: resolved.display().to_string(),
            })
        };
        if is_symlink(path) {
            let target = std::fs::read_link(path).unwrap_or_default();
            return Err(symlink(&target));
        }
        let parent = path.parent().unwrap_or(Path::new("/"));
        let real_parent = resolve(parent);
        let real_folder = resolve(folder);
        let ok = if direct {
            real_parent == real_folder
        } else {
            real_parent.starts_with(&real_folder)
        };
        if ok {
            Ok(())
        } else {
            Err(symlink(&real_parent))
        }
    }

    /// Refuses a path another VM writes, or, for writing, one another VM reads.
    fn not_of_others(&self, role: Role, path: &Path, what: &str) -> Result<(), Refusal> {
        let real = self.local.then(|| resolve(path));
        for (other, writes, vm) in &self.others {
            if !(*writes || role.writes()) {
                continue;
            }
            let same = other == path
                || real
                    .as_ref()
                    .is_some_and(|r| *r == resolve(other) && r.as_os_str() != "/");
            if same {
                return Err(Refusal::OtherVm {
                    what: what.to_owned(),
                    path: path.display().to_string(),
                    vm: vm.clone(),
                });
            }
        }
        Ok(())
    }

    fn storage_words(&self) -> String {
        let list: Vec<String> = self
            .storage
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "the VM's current definition and the storage folders libvirt has ({})",
            list.join(", ")
        )
    }

    fn firmware_words(&self) -> String {
        if self.firmware.is_empty() {
            "the firmware files libvirt offers (it offers none for this machine type)".into()
        } else {
            let list: Vec<String> = self
                .firmware
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            format!("the firmware files libvirt offers ({})", list.join(", "))
        }
    }

    /// Checks a disk's format: an image format, which `qemu-img` and `qemu-nbd` open as a
    /// file.
    ///
    /// # Errors
    /// A format that is no image format.
    pub fn check_format(target: &str, format: &str) -> Result<(), Refusal> {
        if IMAGE_FORMATS.contains(&format) {
            Ok(())
        } else {
            Err(Refusal::Format {
                target: target.to_owned(),
                format: format.to_owned(),
            })
        }
    }

    /// Checks a disk's format and the name its file is made from (a new VM's disk files
    /// are named after their targets).
    ///
    /// # Errors
    /// A format that is no image format, or a target that is no plain name.
    pub fn check_disk(target: &str, format: &str) -> Result<(), Refusal> {
        Self::check_format(target, format)?;
        let plain_name = !target.is_empty()
            && target.len() <= 64
            && target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !target.starts_with('.');
        if plain_name {
            Ok(())
        } else {
            Err(Refusal::DiskName {
                target: target.to_owned(),
            })
        }
    }
}

/// Which restore a refusal stopped, for the advice it gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// In place, the VM defined on the host.
    InPlace,
    /// In place, the VM not defined on the host.
    InPlaceUndefined,
    /// As a new VM (beside the original, or the VM itself on a host that lacks it).
    NewVm,
}

/// What the user can do about `refusal` in a restore of `mode`.
pub(super) fn advice(refusal: &Refusal, mode: Mode) -> String {
    let tampered = "A checkpoint's paths are only hints: Rewind writes only where the VM is \
                    now, in libvirt's storage folders and in its NVRAM and TPM folders, and the \
                    store may have been altered";
    let what_to_do = match (refusal, mode) {
        (
            Refusal::HostDevice { .. } | Refusal::Passthrough { .. },
            Mode::InPlace | Mode::InPlaceUndefined,
        ) => {
            "If the VM should have it, define the VM on this host with it first (`virsh define`), then restore in place; or put back only the disks (`rewind export`)"
        }
        (Refusal::HostDevice { .. } | Refusal::Passthrough { .. }, Mode::NewVm) => {
            "A new VM gets only the devices and QEMU arguments the original VM has on this host now; put back only the disks (`rewind export`) and define the VM by hand"
        }
        (
            Refusal::OtherIdentity { .. }
            | Refusal::Format { .. }
            | Refusal::DiskName { .. }
            | Refusal::Unreadable(_),
            _,
        ) => "Restore another checkpoint, and check who could write to this store",
        (_, Mode::InPlace) => {
            "If the VM's files did move there, define the VM with them first (`virsh define`) or make their folder a libvirt storage pool (`virsh pool-define-as NAME dir --target FOLDER`, `virsh pool-start NAME`); or restore the checkpoint as a new VM into a storage pool (--as NAME --pool POOL)"
        }
        (_, Mode::InPlaceUndefined) => {
            "The VM is not defined on this host, so its files may only be in libvirt's storage folders: make the folder they were in a libvirt storage pool (`virsh pool-define-as NAME dir --target FOLDER`, `virsh pool-start NAME`), or define the VM first, or restore the checkpoint as a new VM into a storage pool (--as NAME --pool POOL)"
        }
        (_, Mode::NewVm) => {
            "Restore it into a storage pool (--pool POOL) or a folder of your own (--disk-dir FOLDER); what only the original VM's definition may name is taken only while that VM is defined on this host with it"
        }
    };
    format!("{tampered}. {what_to_do}")
}

/// The paths and devices of every VM on the host of `hv` but the one with UUID `uuid`, and
/// that VM's own (`None` if it is not defined there).
#[allow(clippy::type_complexity)] // one private answer, named in its documentation
fn host_definitions(
    hv: &Hypervisor,
    uuid: &str,
) -> Result<(Option<(String, Reference)>, Vec<(PathBuf, bool, String)>), RestoreError> {
    let mut own = None;
    let mut others = Vec::new();
    for vm in hv.list_vms()? {
        let mut reference = Reference::default();
        // Live and inactive definitions both count: a running VM has both.
        for xml in [hv.domain_xml(&vm.uuid), hv.persistent_xml(&vm.uuid)]
            .into_iter()
            .flatten()
        {
            reference.add_xml(&xml);
        }
        // What libvirt resolves: volumes, backing files, default NVRAM and TPM places.
        for disk in &vm.disks {
            if let Some(path) = disk.path() {
                reference.add(Role::Disk, path);
            }
            for backing in &disk.backing_chain {
                reference.add(Role::ReadOnlyImage, &backing.path);
            }
        }
        if let Some(path) = vm.firmware.nvram_path() {
            reference.add(Role::Nvram, path);
        }
        if let Some(path) = vm.tpm.as_ref().and_then(|t| t.state_path.as_ref()) {
            reference.add(Role::TpmState, path);
        }
        if vm.uuid.eq_ignore_ascii_case(uuid) {
            own = Some((vm.name.clone(), reference));
        } else {
            others.extend(
                reference
                    .paths()
                    .filter(|(role, _)| *role != Role::Program)
                    .map(|(role, value)| (PathBuf::from(value), role.writes(), vm.name.clone())),
            );
        }
    }
    Ok((own, others))
}

/// The rules for restoring a VM on the host of `hv` as `name` with UUID `uuid`, from a
/// checkpoint whose definition is `checkpoint` (for its firmware): the current definition
/// that counts is that of the VM with UUID `original` (whole for a restore in place, only
/// what may be shared for a new VM), and `folder` is a new VM's own folder.
pub(super) fn rules_for(
    hv: &Hypervisor,
    name: &str,
    uuid: &str,
    original: &str,
    new_vm: bool,
    folder: Option<&Path>,
    checkpoint: &crate::libvirt::xml::DomainXml,
) -> Result<Rules, RestoreError> {
    let (own, mut others) = host_definitions(hv, original)?;
    let current =
        match own {
            Some((original_name, reference)) if new_vm => {
                // The original's files stay its own.
                let shared = reference.shareable();
                others.extend(reference.paths().filter(|(role, _)| !role.shareable()).map(
                    |(role, value)| (PathBuf::from(value), role.writes(), original_name.clone()),
                ));
                shared
            }
            Some((_, reference)) => reference,
            None => Reference::default(),
        };
    let mut storage = hv.storage_folders()?;
    storage.extend(folder.map(Path::to_path_buf));
    Ok(Rules {
        local: hv.is_local(),
        name: name.to_owned(),
        uuid: uuid.to_owned(),
        current,
        storage,
        nvram_dir: hv.nvram_dir(),
        swtpm_dir: hv.swtpm_dir(),
        firmware: hv.firmware_files(
            checkpoint.arch.as_deref(),
            checkpoint.machine.as_deref(),
            Some(checkpoint.hypervisor.as_str()).filter(|t| *t != "unknown"),
        ),
        others,
        own_new: Vec::new(),
        placed_disks: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_absolute_paths_are_paths() {
        for good in ["/", "/a", "/a/b.qcow2", "/var/lib/libvirt/images/x y"] {
            assert!(plain(good).is_some(), "{good}");
        }
        for bad in [
            "", "a", "./a", "/a/../b", "/a/./b", "/a//b", "/a/", "/..", "a/b", "/a\0b",
        ] {
            assert!(plain(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_folder_through_a_symbolic_link_is_where_it_leads() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = tmp.path().join("pool");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&pool).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, pool.join("link")).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("f"), pool.join("file-link")).unwrap();
        let rules = Rules {
            local: true,
            storage: vec![pool.clone()],
            ..Rules::default()
        };
        let check =
            |p: &Path| rules.check_path(Role::Disk, p.to_str().unwrap(), "disk vda's image");
        check(&pool.join("vda.qcow2")).unwrap();
        check(&pool.join("new/sub/vda.qcow2")).unwrap();
        for through in [pool.join("link/vda.qcow2"), pool.join("file-link")] {
            let err = check(&through).unwrap_err();
            assert!(matches!(err, Refusal::Symlink { .. }), "{err}");
            assert!(err.to_string().contains("symbolic link"), "{err}");
        }
        let err = check(&elsewhere.join("vda.qcow2")).unwrap_err();
        assert!(matches!(err, Refusal::Outside { .. }), "{err}");
    }

    #[test]
    fn nvram_and_tpm_state_only_where_libvirt_keeps_them() {
        let rules = Rules {
            local: false,
            uuid: "0c7e5a4e-0000-4000-8000-000000000001".into(),
            nvram_dir: Some("/var/lib/libvirt/qemu/nvram".into()),
            swtpm_dir: Some("/var/lib/libvirt/swtpm".into()),
            ..Rules::default()
        };
        rules
            .check_path(
                Role::Nvram,
                "/var/lib/libvirt/qemu/nvram/w_VARS.fd",
                "nvram",
            )
            .unwrap();
        rules
            .check_path(
                Role::TpmState,
                "/var/lib/libvirt/swtpm/0c7e5a4e-0000-4000-8000-000000000001",
                "tpm",
            )
            .unwrap();
        for (role, bad) in [
            (Role::Nvram, "/etc/shadow"),
            (Role::Nvram, "/var/lib/libvirt/qemu/nvram/sub/x_VARS.fd"),
            (
                Role::Nvram,
                "/var/lib/libvirt/qemu/nvram/../../../../etc/shadow",
            ),
            (Role::TpmState, "/etc"),
            (Role::TpmState, "/var/lib/libvirt/swtpm"),
            (
                Role::TpmState,
                "/var/lib/libvirt/swtpm/11111111-0000-4000-8000-000000000001",
            ),
        ] {
            let err = rules.check_path(role, bad, "it").unwrap_err();
            assert!(
                matches!(err, Refusal::Outside { .. } | Refusal::NotPlain { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_file_of_another_vm_is_not_written() {
        let rules = Rules {
            storage: vec!["/pool".into()],
            others: vec![
                ("/pool/other.qcow2".into(), true, "other".into()),
                ("/pool/shared.iso".into(), false, "other".into()),
            ],
            ..Rules::default()
        };
        let err = rules
            .check_path(Role::Disk, "/pool/other.qcow2", "disk vda's image")
            .unwrap_err();
        assert!(err.to_string().contains("used by VM \"other\""), "{err}");
        assert!(
            rules
                .check_path(Role::ReadOnlyImage, "/pool/other.qcow2", "cd")
                .is_err()
        );
        rules
            .check_path(Role::ReadOnlyImage, "/pool/shared.iso", "cd")
            .unwrap();
        assert!(
            rules
                .check_path(Role::Disk, "/pool/shared.iso", "disk")
                .is_err()
        );
    }

    #[test]
    fn disk_formats_and_names_are_plain() {
        Rules::check_disk("vda", "qcow2").unwrap();
        Rules::check_disk("sda", "raw").unwrap();
        for (target, format) in [
            ("vda", "vvfat"),
            ("vda", "json:{}"),
            ("vda", "host_device"),
            ("../x", "raw"),
            ("a/b", "raw"),
            ("", "raw"),
            (".x", "raw"),
        ] {
            assert!(
                Rules::check_disk(target, format).is_err(),
                "{target} {format}"
            );
        }
    }
}
