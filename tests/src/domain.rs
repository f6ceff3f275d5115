//! Test VMs: defined from the tiny guest, cleaned up on drop and on panic.
//!
//! Every domain the harness defines carries a `<rwt:harness pid=...>` element in its
//! `<metadata>`. [`sweep_stale`] removes domains whose test process has died (a test killed
//! with SIGKILL cannot run its destructors); the `leak-check` binary fails the suite if any
//! marked domain, or any domain using files under the scratch root, is left after it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::daemon::URI;
use crate::guest::{AGENT_MARKER, ERROR_MARKER, FSWRITE_PREFIX, TPM_PREFIX};
use crate::scratch::{ScratchDir, pid_alive};
use crate::{HarnessError, guest_image};

/// XML namespace of the harness marker.
pub const MARKER_NS: &str = "https://rewind.invalid/test-harness/1";

/// How many guests may run at once: TCG guests each keep a core busy while booting.
const MAX_RUNNING_GUESTS: usize = 2;

/// Seconds libvirt waits for the guest agent's reply to one command (TCG guests are slow).
const AGENT_COMMAND_TIMEOUT_S: i32 = 20;

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw file.
    Raw,
    /// qcow2 (needed for dirty bitmaps).
    Qcow2,
}

impl Format {
    /// The name libvirt and qemu-img use.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// A disk to create for a test VM.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Target device (`vda`, `vdb`, ...).
    pub target: String,
    /// Image format.
    pub format: Format,
    /// Virtual size.
    pub size_bytes: u64,
    /// Put a qcow2 base image under it (the disk then has a one-image backing chain).
    pub with_backing_file: bool,
}

impl DiskSpec {
    /// A disk of `size_bytes` at `target`.
    #[must_use]
    pub fn new(target: &str, format: Format, size_bytes: u64) -> Self {
        Self {
            target: target.to_owned(),
            format,
            size_bytes,
            with_backing_file: false,
        }
    }

    /// The disk gets a qcow2 base image (only with [`Format::Qcow2`]).
    #[must_use]
    pub fn with_backing_file(mut self) -> Self {
        self.with_backing_file = true;
        self
    }
}

/// How much of the QEMU guest agent a test VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Agent {
    /// No channel.
    None,
    /// The `org.qemu.guest_agent.0` channel, no agent in the guest.
    Channel,
    /// The channel, and the guest runs `qemu-ga` on it.
    Running,
}

/// Builder for a [`TestVm`].
#[derive(Debug, Clone)]
pub struct TestVmBuilder {
    label: String,
    name: Option<String>,
    uefi: bool,
    tpm: bool,
    nic: bool,
    agent: Agent,
    filesystem: Option<String>,
    memory_mib: u32,
    workload: String,
    disks: Vec<DiskSpec>,
    boot_from: BootFrom,
}

/// Where a test VM's kernel comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BootFrom {
    /// libvirt's direct kernel boot.
    Kernel,
    /// The VM's first disk ([`TestVmBuilder::boot_from_disk`]).
    Disk,
}

impl TestVmBuilder {
    /// The exact domain name (default: `rwt-<pid>-<n>-<label>`). Must be unique on the host.
    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// Boot with UEFI (OVMF, q35, SMM) instead of BIOS.
    #[must_use]
    pub fn uefi(mut self) -> Self {
        self.uefi = true;
        self
    }

    /// Add a network card (virtio, on QEMU's user-mode network: nothing on the host).
    #[must_use]
    pub fn nic(mut self) -> Self {
        self.nic = true;
        self
    }

    /// Add an emulated TPM 2.0 (swtpm), like a Windows 11 VM.
    #[must_use]
    pub fn tpm(mut self) -> Self {
        self.tpm = true;
        self
    }

    /// Add a QEMU guest agent channel.
    #[must_use]
    pub fn agent_channel(mut self) -> Self {
        self.agent = self.agent.max(Agent::Channel);
        self
    }

    /// Add the agent channel and run the real QEMU guest agent in the guest (`rw.agent=1`,
    /// see `guest.rs`); wait for it with [`TestVm::wait_agent_ready`].
    #[must_use]
    pub fn guest_agent(mut self) -> Self {
        self.agent = Agent::Running;
        self
    }

    /// Put an ext4 file system on disk `target` (unless it holds one already) and mount it on
    /// `/mnt/<target>` in the guest (`rw.fs=<target>`); the `fswrite` workload writes to it.
    /// `target` must be one of the VM's disks.
    #[must_use]
    pub fn filesystem(mut self, target: &str) -> Self {
        self.filesystem = Some(target.to_owned());
        self
    }

    /// Guest memory.
    #[must_use]
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The workload the guest runs on its first disk (see `guest.rs`), or on its second
    /// with [`TestVmBuilder::boot_from_disk`].
    #[must_use]
    pub fn workload(mut self, workload: &str) -> Self {
        workload.clone_into(&mut self.workload);
        self
    }

    /// Replaces the default disk (`vda`, raw, 64 MiB) with these.
    #[must_use]
    pub fn disks(mut self, disks: Vec<DiskSpec>) -> Self {
        self.disks = disks;
        self
    }

    /// Boot from the first disk (`vda`), like an installed system, instead of direct
    /// kernel boot: the first disk holds an MBR with syslinux's boot code and a FAT boot
    /// partition with syslinux, shim and GRUB, the kernel and the initramfs (see
    /// [`crate::bootdisk`]).
    ///
    /// With a BIOS, the firmware (`SeaBIOS`) prints to the serial console too
    /// (`<bios useserial='yes'/>`), so a disk that does not boot shows its `Boot failed: not
    /// a bootable disk` in [`TestVm::console`]. With UEFI ([`TestVm::uefi_tpm_builder`]),
    /// OVMF with Secure Boot starts shim, GRUB and the kernel from
    /// `\EFI\BOOT\BOOTX64.EFI`, and prints its own `BdsDxe:` lines on the console; the
    /// VM gets at least [`crate::bootdisk::UEFI_MIN_MEMORY_MIB`] of memory, which GRUB
    /// needs to start the kernel.
    ///
    /// The workload runs on the **second** disk, so its writes never touch the boot
    /// partition and the `sequence` helpers keep their meaning there (`wait_flushed`,
    /// `last_flushed_record`, and [`crate::workload::scan_sequence`] of the second disk,
    /// e.g. a checkpoint's `vdb`; the first disk holds no records). If the VM has only one
    /// disk, a second one, `vdb`, of the same format and size, is added. The first disk is
    /// made at least as large as the boot image (about 35 MiB).
    #[must_use]
    pub fn boot_from_disk(mut self) -> Self {
        self.boot_from = BootFrom::Disk;
        self
    }

    /// The disk the workload uses: the first one, or the second when booting from disk.
    fn workload_disk(&self) -> Option<&DiskSpec> {
        self.disks
            .get(usize::from(self.boot_from == BootFrom::Disk))
    }

    /// The kernel command line: console, workload and its options (see `guest.rs`).
    fn kernel_cmdline(&self) -> String {
        let disk = self.workload_disk().map_or("vda", |d| d.target.as_str());
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 rw.workload={} rw.disk={disk}",
            self.workload
        );
        if self.agent == Agent::Running {
            cmdline.push_str(" rw.agent=1");
        }
        if let Some(fs) = &self.filesystem {
            write!(cmdline, " rw.fs={fs}").expect("writing to a String cannot fail");
        }
        cmdline
    }

    /// With [`TestVmBuilder::boot_from_disk`]: adds the second disk if missing and grows
    /// the first to hold the boot image.
    fn plan_boot_disk(&mut self, image_bytes: u64) -> Result<(), HarnessError> {
        if self.uefi {
            self.memory_mib = self.memory_mib.max(crate::bootdisk::UEFI_MIN_MEMORY_MIB);
        }
        let Some(first) = self.disks.first().cloned() else {
            return Err(HarnessError(
                "boot_from_disk(): the test VM has no disk to boot from".into(),
            ));
        };
        if self.filesystem.as_deref() == Some(first.target.as_str()) {
            return Err(HarnessError(format!(
                "filesystem({:?}) with boot_from_disk(): that disk holds the boot partition; \
                 use the second disk",
                first.target
            )));
        }
        if self.disks.len() == 1 {
            let target = if first.target == "vdb" { "vdc" } else { "vdb" };
            self.disks
                .push(DiskSpec::new(target, first.format, first.size_bytes));
        }
        let boot = &mut self.disks[0];
        boot.size_bytes = boot.size_bytes.max(image_bytes);
        Ok(())
    }

    /// Creates the disks and defines the domain (not started).
    pub fn define(mut self) -> Result<TestVm, HarnessError> {
        let boot_image = if self.boot_from == BootFrom::Disk {
            let image = crate::bootdisk::boot_image()?;
            self.plan_boot_disk(image.size_bytes)?;
            Some(image)
        } else {
            None
        };
        if let Some(fs) = &self.filesystem
            && !self.disks.iter().any(|d| &d.target == fs)
        {
            return Err(HarnessError(format!(
                "filesystem({fs:?}): the test VM has no such disk (its disks: {})",
                self.disks
                    .iter()
                    .map(|d| d.target.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let plain_name = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        if let Some(fs) = &self.filesystem
            && !plain_name(fs)
        {
            return Err(HarnessError(format!(
                "filesystem({fs:?}): the guest takes plain disk names such as \"vdb\""
            )));
        }
        crate::setup()?;
        let dir = ScratchDir::new(&self.label)?;
        let mut disks = Vec::new();
        for spec in &self.disks {
            disks.push(create_disk(dir.path(), spec)?);
        }
        let boot = if let Some(boot_image) = boot_image {
            let vda = &disks[0];
            crate::bootdisk::install_boot_disk(
                boot_image,
                &self.kernel_cmdline(),
                dir.path(),
                &vda.path,
                vda.format.name(),
            )
            .map_err(|e| HarnessError(format!("could not make the boot disk: {e}")))?;
            Boot::Disk
        } else {
            let image = guest_image()?;
            let kernel = dir.path().join("vmlinuz");
            let initrd = dir.path().join("initrd.img");
            // Per-VM copies: libvirt relabels kernel and initrd while a VM runs.
            copy(&image.kernel, &kernel)?;
            copy(&image.initrd, &initrd)?;
            Boot::Kernel { kernel, initrd }
        };
        let console = dir.path().join("console.log");
        let name = self.name.clone().unwrap_or_else(|| {
            let slug = dir.path().file_name().unwrap_or_default().to_string_lossy();
            format!("rwt-{slug}")
        });
        let xml = domain_xml(&self, &name, &boot, &console, &disks);
        let conn = connect()?;
        let dom = conn
            .define_domain_xml(&xml)
            .map_err(|e| HarnessError(format!("could not define test VM {name:?}: {e}\n{xml}")))?;
        let uuid = dom.uuid_string().map_err(HarnessError::libvirt)?;
        Ok(TestVm {
            dom,
            conn,
            name,
            uuid,
            console,
            disks,
            slot: None,
            dir,
        })
    }
}

/// A disk created for a test VM.
#[derive(Debug, Clone)]
pub struct TestDisk {
    /// Target device.
    pub target: String,
    /// Format.
    pub format: Format,
    /// The image file.
    pub path: PathBuf,
    /// Virtual size.
    pub size_bytes: u64,
    /// Its backing image, if any.
    pub backing: Option<PathBuf>,
}

/// A defined test VM; destroyed, undefined (with NVRAM, TPM state, checkpoints) and its
/// files removed when dropped, also when the test panics.
#[derive(Debug)]
pub struct TestVm {
    dom: Domain,
    conn: Connect,
    /// The domain name.
    pub name: String,
    /// The domain UUID.
    pub uuid: String,
    console: PathBuf,
    /// Its disks.
    pub disks: Vec<TestDisk>,
    slot: Option<GuestSlot>,
    // Dropped last: the folder goes after the domain.
    dir: ScratchDir,
}

impl TestVm {
    /// Starts describing a VM; `label` names its scratch folder.
    #[must_use]
    pub fn builder(label: &str) -> TestVmBuilder {
        TestVmBuilder {
            label: label.to_owned(),
            name: None,
            uefi: false,
            tpm: false,
            nic: false,
            agent: Agent::None,
            filesystem: None,
            memory_mib: 192,
            workload: "idle".into(),
            disks: vec![DiskSpec::new("vda", Format::Raw, 64 << 20)],
            boot_from: BootFrom::Kernel,
        }
    }

    /// A UEFI (OVMF, Secure Boot) guest with an emulated TPM 2.0, 256 MiB, one 32 MiB
    /// qcow2 disk `vda`, running the sequence workload: what a Windows 11 VM needs, in
    /// small. Add to it before `define`.
    #[must_use]
    pub fn uefi_tpm_builder(label: &str) -> TestVmBuilder {
        Self::builder(label)
            .uefi()
            .tpm()
            .memory_mib(256)
            .workload("sequence")
            .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
    }

    /// The libvirt domain.
    #[must_use]
    pub fn domain(&self) -> &Domain {
        &self.dom
    }

    /// The VM's scratch folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether a disk of the VM runs on a live snapshot's overlay (Rewind's
    /// `.rewind-live-` files).
    ///
    /// # Panics
    /// libvirt cannot give the VM's XML.
    #[must_use]
    pub fn on_live_overlay(&self) -> bool {
        self.dom.xml_desc(0).unwrap().contains(".rewind-live-")
    }

    /// How many live snapshot overlay files lie beside the VM's disks.
    ///
    /// # Panics
    /// The VM's folder cannot be read.
    #[must_use]
    pub fn live_overlay_files(&self) -> usize {
        std::fs::read_dir(self.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".rewind-live-"))
            .count()
    }

    /// The disk with this target.
    #[must_use]
    pub fn disk(&self, target: &str) -> &TestDisk {
        self.disks
            .iter()
            .find(|d| d.target == target)
            .unwrap_or_else(|| panic!("test VM {:?} has no disk {target}", self.name))
    }

    /// Starts the VM (waiting for a free guest slot first).
    pub fn start(&mut self) -> Result<(), HarnessError> {
        if self.slot.is_none() {
            self.slot = Some(GuestSlot::acquire());
        }
        self.dom
            .create()
            .map_err(|e| HarnessError(format!("could not start test VM {:?}: {e}", self.name)))?;
        Ok(())
    }

    /// Starts the VM and waits until the guest says it is ready.
    pub fn start_and_wait_ready(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        self.start()?;
        self.wait_console("REWIND-GUEST READY", timeout)
    }

    /// Stops the VM at once (like pulling the plug).
    pub fn destroy(&mut self) -> Result<(), HarnessError> {
        if self.dom.is_active().unwrap_or(false) {
            self.dom.destroy().map_err(HarnessError::libvirt)?;
        }
        self.slot = None;
        Ok(())
    }

    /// Everything the guest printed on its serial console so far.
    #[must_use]
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the console contains `needle`.
    pub fn wait_console(&self, needle: &str, timeout: Duration) -> Result<(), HarnessError> {
        self.wait_console_until(timeout, |c| c.contains(needle))
            .map_err(|tail| {
                HarnessError(format!(
                    "test VM {:?} did not print {needle:?} within {timeout:?}; console ends with:\n{tail}",
                    self.name
                ))
            })
    }

    /// Waits until `done(console)` holds; on timeout returns the console's last lines.
    pub fn wait_console_until(
        &self,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if done(&console) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let lines: Vec<&str> = console.lines().collect();
                return Err(lines[lines.len().saturating_sub(15)..].join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the guest reports at least `n` flushed records on its console; returns
    /// the highest it reported. The error shows the console.
    pub fn wait_flushed(&self, n: u64, timeout: Duration) -> Result<u64, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let k = self.last_flushed_record();
            if k >= n {
                return Ok(k);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError(format!(
                    "the guest flushed only {k} of {n} records in {timeout:?}; console:\n{}",
                    self.console()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The highest `i` of the `RWSEQ <i> flushed` lines on the console.
    #[must_use]
    pub fn last_flushed_record(&self) -> u64 {
        self.console()
            .lines()
            .filter_map(|l| {
                let rest = l.trim().strip_prefix("RWSEQ ")?;
                let (i, tail) = rest.split_once(' ')?;
                (tail.trim() == "flushed")
                    .then(|| i.parse::<u64>().ok())
                    .flatten()
            })
            .max()
            .unwrap_or(0)
    }

    /// The `RWCNT <n> <uptime cs>` lines of the `counter` workload on the console so far:
    /// `(n, uptime_cs)` in order.
    #[must_use]
    pub fn counter_lines(&self) -> Vec<(u64, u64)> {
        self.console().lines().filter_map(counter_line).collect()
    }

    /// Waits until the `counter` workload printed a counter of at least `n`; returns the
    /// last line's `(n, uptime_cs)`.
    pub fn wait_counter(&self, n: u64, timeout: Duration) -> Result<(u64, u64), HarnessError> {
        self.wait_console_until(timeout, |_| {
            self.counter_lines().last().is_some_and(|&(k, _)| k >= n)
        })
        .map_err(|tail| {
            HarnessError(format!(
                "test VM {:?} did not count to {n} within {timeout:?}; console ends with:\n{tail}",
                self.name
            ))
        })?;
        Ok(*self.counter_lines().last().expect("waited for it"))
    }

    /// Waits until the guest's QEMU agent (see [`TestVmBuilder::guest_agent`]) runs and
    /// answers `guest-ping` through libvirt. Fails as soon as the guest prints an error line.
    pub fn wait_agent_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        self.wait_console_until(timeout, |c| {
            c.contains(AGENT_MARKER) || c.contains(ERROR_MARKER)
        })
        .map_err(|tail| {
            HarnessError(format!(
                "test VM {:?} did not start its guest agent within {timeout:?} (was it built \
                 with .guest_agent()?); console ends with:\n{tail}",
                self.name
            ))
        })?;
        if let Some(error) = self.console().lines().find(|l| l.contains(ERROR_MARKER)) {
            return Err(HarnessError(format!(
                "test VM {:?} failed to start its guest agent: {}",
                self.name,
                error.trim()
            )));
        }
        // The agent holds its port open; libvirt learns that from QEMU a moment later.
        loop {
            match self.agent_command(r#"{"execute":"guest-ping"}"#) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(HarnessError(format!(
                        "the guest agent of test VM {:?} runs but does not answer within \
                         {timeout:?}: {e}",
                        self.name
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Sends one command to the guest agent through libvirt (`virDomainQemuAgentCommand`),
    /// e.g. `{"execute":"guest-fsfreeze-status"}`, and returns the reply's `return` value.
    pub fn agent_command(&self, command: &str) -> Result<serde_json::Value, HarnessError> {
        let reply = self
            .dom
            .qemu_agent_command(command, AGENT_COMMAND_TIMEOUT_S, 0)
            .map_err(|e| {
                HarnessError(format!(
                    "guest agent command {command} to test VM {:?} failed: {}",
                    self.name,
                    e.message()
                ))
            })?;
        let mut value: serde_json::Value = serde_json::from_str(&reply).map_err(|e| {
            HarnessError(format!(
                "guest agent reply to {command} is not JSON ({e}): {reply}"
            ))
        })?;
        value
            .get_mut("return")
            .map(serde_json::Value::take)
            .ok_or_else(|| {
                HarnessError(format!(
                    "guest agent reply to {command} has no \"return\": {reply}"
                ))
            })
    }

    /// Runs `/bin/rwtpm COMMAND [ARG]` in the guest (see `guest::TPM_SCRIPT`; needs
    /// `.uefi().tpm().guest_agent()` and a running agent) and waits for what it printed.
    pub fn tpm(&self, command: &str, arg: Option<&str>) -> Result<TpmState, HarnessError> {
        run_tpm(&self.dom, &self.console, command, arg)
    }

    /// The highest `i` of the `RWFS <i> synced` lines of the `fswrite` workload; 0 if none.
    #[must_use]
    pub fn last_fs_record(&self) -> u64 {
        self.console()
            .lines()
            .filter_map(|l| {
                let rest = l.trim().strip_prefix(FSWRITE_PREFIX)?;
                let (i, tail) = rest.split_once(' ')?;
                (tail.trim() == "synced")
                    .then(|| i.parse::<u64>().ok())
                    .flatten()
            })
            .max()
            .unwrap_or(0)
    }

    /// Waits until the `fswrite` workload reports line `n` or a later one as synced; returns
    /// the highest it reported. The error shows the console.
    pub fn wait_fs_record(&self, n: u64, timeout: Duration) -> Result<u64, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let k = self.last_fs_record();
            if k >= n {
                return Ok(k);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError(format!(
                    "the guest synced only {k} of {n} file system lines in {timeout:?}; \
                     console:\n{}",
                    self.console()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes `len` bytes of `byte` at `offset` of disk `target` through QEMU's block layer
    /// (HMP `qemu-io`), so dirty bitmaps see the write exactly like a guest write.
    pub fn host_write(
        &self,
        target: &str,
        byte: u8,
        offset: u64,
        len: u64,
    ) -> Result<(), HarnessError> {
        self.qemu_io_write(target, &format!("-P 0x{byte:02x}"), offset, len)
    }

    /// Replaces the contents of disk `target` (VM not running) with the raw image `raw`,
    /// holes staying holes (`qemu-img convert -n --target-is-zero`).
    pub fn fill_disk(&self, target: &str, raw: &Path) -> Result<(), HarnessError> {
        let disk = self.disk(target);
        let out = Command::new("qemu-img")
            .args(["convert", "-n", "--target-is-zero", "-f", "raw", "-O"])
            .arg(disk.format.name())
            .arg(raw)
            .arg(&disk.path)
            .output()
            .map_err(|e| HarnessError(format!("could not run qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(HarnessError(format!(
                "qemu-img could not fill {}: {}",
                disk.path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Grows disk `target` of the running VM to `size_bytes` (`virsh blockresize`).
    pub fn resize_disk(&self, target: &str, size_bytes: u64) -> Result<(), HarnessError> {
        self.dom
            .block_resize(target, size_bytes, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            .map(drop)
            .map_err(HarnessError::libvirt)
    }

    /// Writes the first `len` bytes of `file` (readable by QEMU's user) at `offset` of disk
    /// `target`, through QEMU's block layer like [`TestVm::host_write`].
    pub fn host_write_file(
        &self,
        target: &str,
        file: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), HarnessError> {
        self.qemu_io_write(target, &format!("-s {}", file.display()), offset, len)
    }

    /// Makes QEMU write out what it caches of disk `target` (qcow2 metadata included), so
    /// that the image file, read from outside, shows every write so far.
    pub fn host_flush(&self, target: &str) -> Result<(), HarnessError> {
        let alias = self.disk_alias(target)?;
        let cmd = format!("qemu-io -d /machine/peripheral/{alias}/virtio-backend \"flush\"");
        let out = self
            .dom
            .qemu_monitor_command(&cmd, sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            .map_err(HarnessError::libvirt)?;
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(HarnessError(format!(
                "qemu-io flush failed: {}",
                out.trim()
            )))
        }
    }

    fn qemu_io_write(
        &self,
        target: &str,
        source: &str,
        offset: u64,
        len: u64,
    ) -> Result<(), HarnessError> {
        let alias = self.disk_alias(target)?;
        let cmd = format!(
            "qemu-io -d /machine/peripheral/{alias}/virtio-backend \"write {source} {offset} {len}\""
        );
        let out = self
            .dom
            .qemu_monitor_command(&cmd, sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            .map_err(HarnessError::libvirt)?;
        // QEMU 7.2 prints qemu-io's own output ("wrote N/N bytes") to its log, not to the
        // monitor: the monitor says something only when the command could not run.
        if !out.trim().is_empty() && !out.contains("wrote") {
            return Err(HarnessError(format!(
                "qemu-io write failed: {}",
                out.trim()
            )));
        }
        Ok(())
    }

    /// The device alias QEMU knows disk `target` by (from the live XML).
    fn disk_alias(&self, target: &str) -> Result<String, HarnessError> {
        let xml = self.dom.xml_desc(0).map_err(HarnessError::libvirt)?;
        let doc = roxml(&xml)?;
        doc.descendants()
            .filter(|n| n.has_tag_name("disk"))
            .find(|d| {
                d.children()
                    .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
            })
            .and_then(|d| d.children().find(|c| c.has_tag_name("alias")))
            .and_then(|a| a.attribute("name"))
            .map(str::to_owned)
            .ok_or_else(|| HarnessError(format!("no alias for disk {target}: is the VM running?")))
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if let Err(e) = remove_domain(&self.dom) {
            eprintln!("warning: cleaning up test VM {:?}: {e}", self.name);
        }
        let _ = &self.conn;
        self.slot = None;
    }
}

fn roxml(xml: &str) -> Result<roxmltree::Document<'_>, HarnessError> {
    roxmltree::Document::parse(xml).map_err(|e| HarnessError(format!("bad XML from libvirt: {e}")))
}

/// Opens the test URI.
pub fn connect() -> Result<Connect, HarnessError> {
    // Errors come back as values; libvirt need not print them too (retries would flood).
    virt::error::clear_error_callback();
    Connect::open(Some(URI)).map_err(HarnessError::libvirt)
}

/// Removes the domain called `name`, if there is one, as [`remove_domain`] does (for a VM
/// a test made through Rewind, such as a restore as a new VM). Whether there was one.
///
/// # Errors
/// libvirt could not be reached, or the domain could not be removed.
pub fn remove_named(name: &str) -> Result<bool, HarnessError> {
    let conn = connect()?;
    match conn.lookup_domain_by_name(name) {
        Ok(dom) => remove_domain(&dom).map(|()| true),
        Err(_) => Ok(false),
    }
}

/// Destroys and undefines a domain with everything libvirt keeps for it.
pub fn remove_domain(dom: &Domain) -> Result<(), HarnessError> {
    if dom.is_active().unwrap_or(false) {
        drop(dom.destroy());
    }
    // Checkpoints and snapshots would block undefine; drop their metadata, NVRAM and TPM state.
    let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | sys::VIR_DOMAIN_UNDEFINE_NVRAM
        | sys::VIR_DOMAIN_UNDEFINE_TPM;
    match dom.undefine_flags(flags) {
        Ok(()) => Ok(()),
        // Transient or already gone.
        Err(_) if !dom.is_persistent().unwrap_or(false) => Ok(()),
        Err(e) => Err(HarnessError::libvirt(e)),
    }
}

/// The harness marker's `pid` on a domain, if it carries one.
#[must_use]
pub fn marker_pid(dom: &Domain) -> Option<u32> {
    let xml = dom
        .metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT.cast_signed(),
            Some(MARKER_NS),
            0,
        )
        .ok()?;
    let doc = roxmltree::Document::parse(&xml).ok()?;
    doc.root_element().attribute("pid")?.parse().ok()
}

/// Whether a domain's XML references a file under `root` (a domain made by a test through
/// Rewind itself, e.g. a restore as a new VM, carries no marker but uses scratch files).
#[must_use]
pub fn uses_files_under(dom: &Domain, root: &Path) -> bool {
    let root = root.to_string_lossy();
    dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .is_ok_and(|xml| xml.contains(root.as_ref()))
}

/// Removes domains left by test processes that no longer run.
#[must_use]
pub fn sweep_stale(conn: &Connect) -> Vec<String> {
    let mut removed = Vec::new();
    for dom in conn.list_all_domains(0).unwrap_or_default() {
        let Some(pid) = marker_pid(&dom) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        let name = dom.name().unwrap_or_default();
        if remove_domain(&dom).is_ok() {
            removed.push(name);
        }
    }
    removed
}

fn copy(from: &Path, to: &Path) -> Result<(), HarnessError> {
    std::fs::copy(from, to).map_err(|e| HarnessError::io("copy", from, &e))?;
    Ok(())
}

fn create_disk(dir: &Path, spec: &DiskSpec) -> Result<TestDisk, HarnessError> {
    let path = dir.join(format!("{}.{}", spec.target, spec.format.name()));
    let mut backing = None;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", spec.format.name()]);
    if spec.with_backing_file {
        assert_eq!(
            spec.format,
            Format::Qcow2,
            "only qcow2 disks can have a backing file"
        );
        let base = dir.join(format!("{}-base.qcow2", spec.target));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg(spec.size_bytes.to_string()))?;
        cmd.arg("-b").arg(&base).args(["-F", "qcow2"]);
        backing = Some(base);
    }
    cmd.arg(&path).arg(spec.size_bytes.to_string());
    run(&mut cmd)?;
    Ok(TestDisk {
        target: spec.target.clone(),
        format: spec.format,
        path,
        size_bytes: spec.size_bytes,
        backing,
    })
}

fn run(cmd: &mut Command) -> Result<(), HarnessError> {
    let out = cmd
        .output()
        .map_err(|e| HarnessError(format!("could not run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(HarnessError(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Escapes text for XML content and attribute values.
#[must_use]
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// How a test VM boots.
enum Boot {
    /// Direct kernel boot of these per-VM copies.
    Kernel { kernel: PathBuf, initrd: PathBuf },
    /// From its first disk.
    Disk,
}

fn domain_xml(
    b: &TestVmBuilder,
    name: &str,
    boot: &Boot,
    console: &Path,
    disks: &[TestDisk],
) -> String {
    let e = |p: &Path| xml_escape(&p.to_string_lossy());
    let (os_attr, machine, features) = if b.uefi {
        (" firmware='efi'", "q35", "<acpi/><smm state='on'/>")
    } else {
        ("", "pc", "<acpi/>")
    };
    let boot = match boot {
        Boot::Kernel { kernel, initrd } => format!(
            "<kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>{}</cmdline>",
            e(kernel),
            e(initrd),
            xml_escape(&b.kernel_cmdline())
        ),
        // OVMF prints to the serial console anyway; SeaBIOS is told to, so that a disk that
        // does not boot says so there.
        Boot::Disk if b.uefi => "<boot dev='hd'/>".to_owned(),
        Boot::Disk => "<boot dev='hd'/>\n    <bios useserial='yes'/>".to_owned(),
    };
    let mut devices = String::new();
    for d in disks {
        writeln!(
            devices,
            "<disk type='file' device='disk'><driver name='qemu' type='{}'/>\
             <source file='{}'/><target dev='{}' bus='virtio'/></disk>",
            d.format.name(),
            e(&d.path),
            d.target
        )
        .expect("writing to a String cannot fail");
    }
    writeln!(
        devices,
        "<serial type='file'><source path='{}'/><target port='0'/></serial>",
        e(console)
    )
    .expect("writing to a String cannot fail");
    if b.agent != Agent::None {
        devices.push_str(
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n",
        );
    }
    if b.tpm {
        devices.push_str("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n");
    }
    if b.nic {
        devices.push_str("<interface type='user'><model type='virtio'/></interface>\n");
    }
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <metadata><rwt:harness xmlns:rwt='{MARKER_NS}' pid='{pid}'/></metadata>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os{os_attr}>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    {boot}
  </os>
  <features>{features}</features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {devices}
    <memballoon model='none'/>
  </devices>
</domain>",
        name = xml_escape(name),
        pid = std::process::id(),
        mem = b.memory_mib,
    )
}

/// What the guest's TPM held when `/bin/rwtpm` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmState {
    /// PCR 16 (SHA-256 bank), hex: volatile state, reset at every boot.
    pub pcr16: String,
    /// The NV counter at index 0x01500016, hex, or `none` before the first count: permanent
    /// state, kept across boots.
    pub counter: String,
}

/// [`TestVm::tpm`] for the domain called `vm` whose serial console goes to `console` (a VM
/// that Rewind restored as a copy, say).
pub fn guest_tpm(
    vm: &str,
    console: &Path,
    command: &str,
    arg: Option<&str>,
) -> Result<TpmState, HarnessError> {
    let conn = connect()?;
    let dom = conn
        .lookup_domain_by_name(vm)
        .map_err(HarnessError::libvirt)?;
    run_tpm(&dom, console, command, arg)
}

fn run_tpm(
    dom: &Domain,
    console: &Path,
    command: &str,
    arg: Option<&str>,
) -> Result<TpmState, HarnessError> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tag = format!(
        "t{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut args = vec![command.to_owned()];
    args.extend(arg.map(str::to_owned));
    args.push(tag.clone());
    let request = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": "/bin/rwtpm", "arg": args},
    })
    .to_string();
    // After a snapshot or a restore, libvirt takes a moment to see the agent again.
    let asked = Instant::now();
    while let Err(e) = dom.qemu_agent_command(&request, AGENT_COMMAND_TIMEOUT_S, 0) {
        if asked.elapsed() > Duration::from_mins(1) {
            return Err(HarnessError(format!(
                "guest-exec of rwtpm {command} failed: {e}"
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let read = || {
        std::fs::read(console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let prefix = format!("{TPM_PREFIX}{tag} ");
    let error = format!("{ERROR_MARKER} rwtpm");
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let mut text = read();
        // Only whole lines: the guest may be half-way through writing the last one.
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        if let Some(rest) = text.lines().find_map(|l| l.trim().strip_prefix(&prefix)) {
            let field = |name: &str| {
                rest.split(' ')
                    .find_map(|f| f.strip_prefix(name))
                    .map(str::to_owned)
                    .ok_or_else(|| HarnessError(format!("rwtpm printed no {name}: {rest}")))
            };
            return Ok(TpmState {
                pcr16: field("pcr16=")?,
                counter: field("counter=")?,
            });
        }
        if let Some(line) = text.lines().find(|l| l.contains(&error)) {
            return Err(HarnessError(format!(
                "rwtpm {command} failed: {}",
                line.trim()
            )));
        }
        if Instant::now() >= deadline {
            return Err(HarnessError(format!(
                "rwtpm {command} printed nothing within a minute; console ends with:\n{}",
                text.lines().rev().take(15).collect::<Vec<_>>().join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `(n, uptime_cs)` of a `RWCNT <n> <uptime cs>` console line of the `counter`
/// workload.
#[must_use]
pub fn counter_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.trim().strip_prefix("RWCNT ")?.split(' ');
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// A permit to run one guest; at most [`MAX_RUNNING_GUESTS`] exist per process.
#[derive(Debug)]
struct GuestSlot;

static RUNNING: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

impl GuestSlot {
    fn acquire() -> Self {
        let mut running = RUNNING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *running >= MAX_RUNNING_GUESTS {
            running = FREED
                .wait(running)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *running += 1;
        GuestSlot
    }
}

impl Drop for GuestSlot {
    fn drop(&mut self) {
        let mut running = RUNNING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *running -= 1;
        FREED.notify_one();
    }
}

/// Removes a VM that a test made through Rewind (not through the harness), also on panic:
/// forced off and undefined when dropped.
#[derive(Debug)]
pub struct RestoredVm(pub String);

impl Drop for RestoredVm {
    fn drop(&mut self) {
        let Ok(hv) = rewind_core::libvirt::Hypervisor::connect(URI) else {
            return;
        };
        if hv.has_vm(&self.0) {
            let control = rewind_core::progress::Control::new();
            let force = rewind_core::libvirt::lifecycle::StopMode::Force;
            drop(hv.stop_vm(&self.0, force, &control));
            drop(hv.undefine_vm(&self.0));
        }
    }
}
