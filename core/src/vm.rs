//! What Rewind knows about a virtual machine: identity, state, disks, firmware and TPM.
//!
//! These types are plain data. They are filled from libvirt by [`crate::libvirt`] and
//! serialised as the stable `rewind vms --json` format (documented in `app/CLI.md`),
//! so field names are part of the public interface: add fields, never rename them.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One virtual machine as libvirt describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The libvirt domain name (any Unicode, may contain spaces and quotes).
    pub name: String,
    /// The domain UUID, lower-case hyphenated.
    pub uuid: String,
    /// Run state.
    pub state: VmState,
    /// Whether the domain has a persistent definition (transient domains vanish when stopped).
    pub persistent: bool,
    /// Whether libvirt starts the domain when the host boots.
    pub autostart: bool,
    /// Virtual CPUs currently configured.
    pub vcpus: u32,
    /// Memory currently assigned, in bytes.
    pub memory_bytes: u64,
    /// Maximum memory, in bytes.
    pub max_memory_bytes: u64,
    /// Domain type: `kvm` or `qemu` (TCG).
    pub hypervisor: String,
    /// Machine type, e.g. `pc-q35-7.2`.
    pub machine: Option<String>,
    /// Guest architecture, e.g. `x86_64`.
    pub arch: Option<String>,
    /// Boot firmware.
    pub firmware: Firmware,
    /// Emulated or passed-through TPM, if any.
    pub tpm: Option<Tpm>,
    /// QEMU guest agent channel.
    pub guest_agent: GuestAgent,
    /// Every `<disk>` of the domain, in XML order (CD-ROMs and floppies included).
    pub disks: Vec<Disk>,
}

impl VmInfo {
    /// Disks whose contents Rewind protects: writable, not shared, backed by storage.
    pub fn protected_disks(&self) -> impl Iterator<Item = &Disk> {
        self.disks.iter().filter(|d| d.protectable().is_ok())
    }
}

/// Run state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Running.
    Running,
    /// Paused by the user or by libvirt (e.g. during a save).
    Paused,
    /// Being shut down.
    ShuttingDown,
    /// Not running.
    ShutOff,
    /// The guest crashed.
    Crashed,
    /// Suspended by guest power management (S3/S4).
    PmSuspended,
    /// Blocked on a resource.
    Blocked,
    /// libvirt reports no state.
    Unknown,
}

impl VmState {
    /// Whether a QEMU process exists for the VM (running, paused or blocked).
    #[must_use]
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Running | Self::Paused | Self::ShuttingDown | Self::Blocked | Self::PmSuspended
        )
    }

    /// Human label, as shown in the CLI table and the window.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShuttingDown => "shutting down",
            Self::ShutOff => "shut off",
            Self::Crashed => "crashed",
            Self::PmSuspended => "suspended",
            Self::Blocked => "blocked",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Boot firmware of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Firmware {
    /// Legacy BIOS (`SeaBIOS`), no firmware state to protect.
    Bios,
    /// UEFI (OVMF). Its variable store (NVRAM) holds boot entries and Secure Boot keys.
    Uefi {
        /// Firmware code image, when libvirt has resolved it.
        loader_path: Option<PathBuf>,
        /// Whether the loader is the Secure Boot build.
        secure_boot: bool,
        /// The VM's own NVRAM variable store, when known.
        nvram_path: Option<PathBuf>,
        /// Template the NVRAM is created from.
        nvram_template: Option<PathBuf>,
    },
}

impl Firmware {
    /// The NVRAM file to protect, if any.
    #[must_use]
    pub fn nvram_path(&self) -> Option<&PathBuf> {
        match self {
            Self::Bios => None,
            Self::Uefi { nvram_path, .. } => nvram_path.as_ref(),
        }
    }
}

/// A TPM device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tpm {
    /// Device model, e.g. `tpm-crb` or `tpm-tis`.
    pub model: String,
    /// Backend: `emulator` (swtpm, state kept by libvirt), `passthrough` or `external`.
    pub backend: String,
    /// TPM version, e.g. `2.0`.
    pub version: Option<String>,
    /// For the emulator backend: the folder holding the TPM state (Windows 11 and `BitLocker` need it).
    pub state_path: Option<PathBuf>,
}

/// The QEMU guest agent channel, used to freeze guest file systems for consistent checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GuestAgent {
    /// The domain has an `org.qemu.guest_agent.0` channel.
    pub channel: bool,
    /// An agent in the guest is connected to it (only known while the VM runs).
    pub connected: bool,
}

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Target device name inside the guest, e.g. `vda` or `sda`; unique per domain.
    pub target: String,
    /// Bus: `virtio`, `sata`, `scsi`, `ide`, ...
    pub bus: Option<String>,
    /// What the guest sees.
    pub device: DiskDevice,
    /// Where the data lives.
    pub source: DiskSource,
    /// Image format, e.g. `qcow2` or `raw`.
    pub format: Option<String>,
    /// Guest-visible size in bytes, when libvirt could tell.
    pub virtual_size_bytes: Option<u64>,
    /// Host bytes allocated to the image, when libvirt could tell.
    pub allocated_bytes: Option<u64>,
    /// Read-only to the guest.
    pub read_only: bool,
    /// Shared between several VMs.
    pub shareable: bool,
    /// The images below this one, top first (empty when the image stands alone or the chain is unknown).
    pub backing_chain: Vec<BackingImage>,
}

impl Disk {
    /// Whether Rewind can and should protect this disk; the error says why not.
    pub fn protectable(&self) -> Result<(), &'static str> {
        match self.device {
            DiskDevice::Cdrom => return Err("CD-ROM"),
            DiskDevice::Floppy => return Err("floppy"),
            DiskDevice::Disk | DiskDevice::Lun => {}
        }
        if self.read_only {
            return Err("read-only");
        }
        if self.shareable {
            return Err("shared with other VMs");
        }
        match self.source {
            DiskSource::None => Err("no medium"),
            DiskSource::Network { .. } => Err("network disk"),
            DiskSource::File { .. } | DiskSource::Block { .. } | DiskSource::Volume { .. } => {
                Ok(())
            }
        }
    }

    /// Local path of the disk's top image, if it has one.
    #[must_use]
    pub fn path(&self) -> Option<&PathBuf> {
        match &self.source {
            DiskSource::File { path } | DiskSource::Block { path } => Some(path),
            DiskSource::Volume { path, .. } => path.as_ref(),
            DiskSource::Network { .. } | DiskSource::None => None,
        }
    }
}

/// The kind of device a disk presents to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskDevice {
    /// A hard disk.
    Disk,
    /// A CD/DVD drive.
    Cdrom,
    /// A floppy drive.
    Floppy,
    /// A SCSI LUN passed through.
    Lun,
}

/// Where a disk's data lives on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiskSource {
    /// An image file.
    File {
        /// Path of the image.
        path: PathBuf,
    },
    /// A host block device.
    Block {
        /// Device path.
        path: PathBuf,
    },
    /// A libvirt storage volume.
    Volume {
        /// Storage pool name.
        pool: String,
        /// Volume name.
        volume: String,
        /// The volume's path, when the pool resolves it.
        path: Option<PathBuf>,
    },
    /// A network disk (NBD, iSCSI, RBD, ...).
    Network {
        /// Protocol name.
        protocol: String,
        /// Protocol-specific name of the image.
        name: Option<String>,
    },
    /// No medium (an empty CD-ROM drive).
    None,
}

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingImage {
    /// Path of the backing image.
    pub path: PathBuf,
    /// Its format, when recorded.
    pub format: Option<String>,
}
