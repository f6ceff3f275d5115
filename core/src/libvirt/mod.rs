//! Access to libvirt: connecting, listing VMs with everything Rewind needs to know about
//! them, and lifecycle events.
//!
//! All libvirt calls block; callers on an async runtime run them with `spawn_blocking`.

pub mod agent;
pub mod backup;
pub mod bitmaps;
pub mod clone_vm;
mod events;
mod ffi;
pub mod lifecycle;
pub mod live_snapshot;
pub mod save_image;
mod saved_state;
pub mod volumes;
pub mod xml;

use std::path::{Path, PathBuf};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;

pub use events::{LifecycleKind, Subscription, VmEvent, ensure_event_loop};

use crate::error::{Error, Result};
use crate::qcow2;
use crate::vm::{DiskSource, Firmware, Tpm, VmInfo, VmState};

/// The URI used when neither the configuration nor `--connect` names one.
pub const DEFAULT_URI: &str = "qemu:///system";

/// Whether libvirt URI `uri` names a daemon on this machine (`qemu:///system`), so that
/// its files are this machine's files; `qemu+ssh://host/system` is another host's.
#[must_use]
pub fn is_local_uri(uri: &str) -> bool {
    uri.split_once("://")
        .is_some_and(|(_, rest)| rest.starts_with('/'))
}

/// A connection to one libvirt daemon.
#[derive(Debug)]
pub struct Hypervisor {
    conn: Connect,
    uri: String,
}

impl Hypervisor {
    /// Connects to `uri` (e.g. `qemu:///system`, `qemu+ssh://user@host/system`, `test:///default`).
    ///
    /// # Errors
    /// Says whether the daemon is down, the user lacks permission, the URI is not understood,
    /// or the host cannot be reached, and what to do about each.
    pub fn connect(uri: &str) -> Result<Self> {
        // Rewind drives QEMU (and libvirt's test driver in unit tests). Any other
        // hypervisor is refused here, before libvirt's client would hand an unknown
        // scheme to the daemon and answer "daemon not running" when none is up.
        let driver = uri.split("://").next().unwrap_or_default();
        let driver = driver.split('+').next().unwrap_or_default();
        if !matches!(driver, "qemu" | "test") {
            return Err(Error::UnsupportedUri {
                uri: uri.to_owned(),
                detail: format!("\"{driver}\" is not a QEMU connection"),
            });
        }
        ensure_event_loop();
        let conn = Connect::open(Some(uri)).map_err(|e| classify_connect_error(uri, &e))?;
        // Notice a dead daemon or a cut network within ~15 s instead of hanging forever.
        // Not every driver supports keep-alives (the test driver does not); that is fine.
        drop(conn.set_keep_alive(5, 3));
        Ok(Self {
            conn,
            uri: uri.to_owned(),
        })
    }

    /// The URI this connection was opened with.
    #[must_use]
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the daemon runs on this machine (`qemu:///system`), so that its files are
    /// this machine's files; `qemu+ssh://host/system` is another host's.
    #[must_use]
    pub fn is_local(&self) -> bool {
        is_local_uri(&self.uri)
    }

    /// Where libvirt keeps the UEFI variables of VM `name` when its definition names no
    /// file (`<nvramDir>/<name>_VARS.fd`), on the daemon's host.
    #[must_use]
    pub fn default_nvram_path(&self, name: &str) -> Option<PathBuf> {
        daemon_dir(&self.uri, "qemu/nvram").map(|dir| dir.join(format!("{name}_VARS.fd")))
    }

    /// The folder of the emulated TPM's state of the VM with this UUID, on the daemon's host.
    #[must_use]
    pub fn tpm_state_dir(&self, uuid: &str) -> Option<PathBuf> {
        daemon_dir(&self.uri, "swtpm").map(|root| root.join(uuid))
    }

    /// The folder where libvirt keeps UEFI variable stores (`nvramDir`), on the daemon's
    /// host.
    #[must_use]
    pub fn nvram_dir(&self) -> Option<PathBuf> {
        daemon_dir(&self.uri, "qemu/nvram")
    }

    /// The folder under which libvirt keeps each emulated TPM's state (`swtpmStorageDir`),
    /// on the daemon's host.
    #[must_use]
    pub fn swtpm_dir(&self) -> Option<PathBuf> {
        daemon_dir(&self.uri, "swtpm")
    }

    /// The UEFI and BIOS firmware files the daemon offers for guests of this architecture,
    /// machine type and domain type (`<os><loader><value>` of its domain capabilities),
    /// and for its defaults of this architecture (a machine type or domain type this host
    /// lacks still gets the firmware it has); none if it cannot say.
    #[must_use]
    pub fn firmware_files(
        &self,
        arch: Option<&str>,
        machine: Option<&str>,
        virt_type: Option<&str>,
    ) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for (machine, virt_type) in [(machine, virt_type), (None, None)] {
            let Ok(caps) = self
                .conn
                .domain_capabilities(None, arch, machine, virt_type, 0)
            else {
                continue;
            };
            let Ok(doc) = roxmltree::Document::parse(&caps) else {
                continue;
            };
            let values = doc
                .root_element()
                .children()
                .filter(|n| n.has_tag_name("os"))
                .flat_map(|os| os.children().filter(|n| n.has_tag_name("loader")))
                .flat_map(|loader| loader.children().filter(|n| n.has_tag_name("value")))
                .filter_map(|value| value.text())
                .map(|text| PathBuf::from(text.trim()));
            for file in values {
                if !files.contains(&file) {
                    files.push(file);
                }
            }
        }
        files
    }

    /// Whether the connection still works (the daemon may have restarted).
    #[must_use]
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// Lists every VM, running or not, sorted by name.
    pub fn list_vms(&self) -> Result<Vec<VmInfo>> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|e| self.libvirt_error("list the VMs", &e))?;
        let mut vms = Vec::with_capacity(domains.len());
        for dom in &domains {
            match self.describe(dom) {
                Ok(vm) => vms.push(vm),
                // Undefined between listing and describing: it is simply gone.
                Err(_) if !self.still_defined(dom) => {}
                Err(e) => return Err(e),
            }
        }
        vms.sort_by(|a, b| {
            a.name
                .to_lowercase()
                .cmp(&b.name.to_lowercase())
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(vms)
    }

    /// Describes one VM, found by name or UUID.
    pub fn vm(&self, name_or_uuid: &str) -> Result<VmInfo> {
        let dom = self.lookup(name_or_uuid)?;
        self.describe(&dom)
    }

    /// Calls `handler` on libvirt's event thread for every lifecycle event of every VM until
    /// the returned [`Subscription`] is dropped.
    pub fn subscribe(
        &self,
        handler: impl Fn(VmEvent) + Send + Sync + 'static,
    ) -> Result<Subscription> {
        Subscription::new(&self.conn, handler)
            .map_err(|e| self.libvirt_error("subscribe to VM events", &e))
    }

    /// Finds a domain by exact name, then by UUID.
    /// The domain XML of VM `name_or_uuid` (secure: with what restoring it needs).
    pub fn domain_xml(&self, name_or_uuid: &str) -> Result<String> {
        let dom = self.lookup(name_or_uuid)?;
        dom.xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE).map_err(|e| {
            self.libvirt_error(&format!("read the definition of VM {name_or_uuid:?}"), &e)
        })
    }

    pub(crate) fn lookup(&self, name_or_uuid: &str) -> Result<Domain> {
        if let Ok(dom) = self.conn.lookup_domain_by_name(name_or_uuid) {
            return Ok(dom);
        }
        if let Ok(dom) = self.conn.lookup_domain_by_uuid_string(name_or_uuid) {
            return Ok(dom);
        }
        Err(Error::VmNotFound {
            wanted: name_or_uuid.to_owned(),
            uri: self.uri.clone(),
        })
    }

    fn describe(&self, dom: &Domain) -> Result<VmInfo> {
        let label = dom.name().unwrap_or_default();
        let what = |verb: &str| format!("{verb} of VM {label:?}");
        let xml_text = dom
            .xml_desc(0)
            .map_err(|e| self.libvirt_error(&what("read the definition"), &e))?;
        let parsed = xml::parse_domain(&xml_text).map_err(|source| Error::BadDomainXml {
            vm: label.clone(),
            source,
        })?;
        let (state, _reason) = dom
            .state()
            .map_err(|e| self.libvirt_error(&what("read the state"), &e))?;
        let info = dom
            .info()
            .map_err(|e| self.libvirt_error(&what("read the CPU and memory"), &e))?;

        let mut disks = parsed.disks;
        for disk in &mut disks {
            if let DiskSource::Volume { pool, volume, path } = &mut disk.source {
                *path = self.volume_path(pool, volume);
            }
            if matches!(disk.source, DiskSource::None | DiskSource::Network { .. }) {
                continue;
            }
            // Sizes are best effort: a missing image file must not hide the VM from the list.
            if let Ok(block) = dom.block_info(&disk.target, 0) {
                disk.virtual_size_bytes = Some(block.capacity);
                disk.allocated_bytes = Some(block.allocation);
            }
            if disk.backing_chain.is_empty()
                && disk.format.as_deref() == Some("qcow2")
                && let Some(path) = disk.path()
            {
                disk.backing_chain = qcow2::read::backing_chain(path).unwrap_or_default();
            }
        }

        let tpm = parsed
            .tpm
            .map(|tpm| self.with_tpm_state_path(tpm, &parsed.uuid));
        let firmware = self.with_nvram_path(parsed.firmware, &parsed.name);
        Ok(VmInfo {
            name: parsed.name,
            uuid: parsed.uuid,
            state: map_state(state),
            persistent: dom.is_persistent().unwrap_or(true),
            autostart: dom.autostart().unwrap_or(false),
            vcpus: parsed.vcpus.unwrap_or(info.nr_virt_cpu),
            memory_bytes: info.memory.saturating_mul(1024),
            max_memory_bytes: info.max_mem.saturating_mul(1024),
            hypervisor: parsed.hypervisor,
            machine: parsed.machine,
            arch: parsed.arch,
            firmware,
            tpm,
            guest_agent: parsed.guest_agent,
            disks,
        })
    }

    fn still_defined(&self, dom: &Domain) -> bool {
        dom.uuid_string()
            .is_ok_and(|uuid| self.conn.lookup_domain_by_uuid_string(&uuid).is_ok())
    }

    fn volume_path(&self, pool: &str, volume: &str) -> Option<PathBuf> {
        let pool = self.conn.lookup_storage_pool_by_name(pool).ok()?;
        let vol = pool.lookup_storage_vol_by_name(volume).ok()?;
        vol.path().ok().map(PathBuf::from)
    }

    /// libvirt keeps an emulated TPM's state in a folder named after the VM's UUID, under a
    /// per-daemon root (libvirt's `swtpmStorageDir`), unless the XML names one.
    fn with_tpm_state_path(&self, mut tpm: Tpm, uuid: &str) -> Tpm {
        if tpm.backend == "emulator" && tpm.state_path.is_none() {
            tpm.state_path = self.tpm_state_dir(uuid);
        }
        tpm
    }

    /// With `<os firmware='efi'>`, libvirt 9.0 resolves the firmware only when the VM starts,
    /// so the definition of a shut-off VM names no NVRAM. libvirt then uses
    /// `<nvramDir>/<name>_VARS.fd`; report that path so the NVRAM is never overlooked.
    fn with_nvram_path(&self, mut firmware: Firmware, name: &str) -> Firmware {
        if let Firmware::Uefi { nvram_path, .. } = &mut firmware
            && nvram_path.is_none()
        {
            *nvram_path = self.default_nvram_path(name);
        }
        firmware
    }

    fn libvirt_error(&self, action: &str, e: &virt::error::Error) -> Error {
        let connection_lost = matches!(
            e.code(),
            virt::error::ErrorNumberEnum::Known(ErrorNumber::NoConnect | ErrorNumber::SystemError)
        ) || !self.is_alive();
        Error::Libvirt {
            action: action.to_owned(),
            detail: e.message().to_owned(),
            connection_lost,
        }
    }
}

fn map_state(state: virt::domain::DomainStateEnum) -> VmState {
    match state.unwrap_or(DomainState::NoState) {
        DomainState::Running => VmState::Running,
        DomainState::Blocked => VmState::Blocked,
        DomainState::Paused => VmState::Paused,
        DomainState::Shutdown => VmState::ShuttingDown,
        DomainState::Shutoff => VmState::ShutOff,
        DomainState::Crashed => VmState::Crashed,
        DomainState::PMSuspended => VmState::PmSuspended,
        DomainState::NoState => VmState::Unknown,
    }
}

/// Where the QEMU daemon behind `uri` keeps per-VM state of a kind: `swtpm` (TPM state
/// folders) or `qemu/nvram` (UEFI variable stores). These are libvirt's built-in defaults
/// (`swtpmStorageDir`, `nvramDir`): `/var/lib/libvirt/...` for the system daemon,
/// `$XDG_CONFIG_HOME/libvirt/qemu/...` for a local session daemon. Unknown for other URIs.
fn daemon_dir(uri: &str, kind: &str) -> Option<PathBuf> {
    let (scheme, rest) = uri.split_once("://")?;
    if !scheme.starts_with("qemu") {
        return None;
    }
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    let path = path.split('?').next().unwrap_or_default();
    match path {
        "system" => Some(Path::new("/var/lib/libvirt").join(kind)),
        "session" if !scheme.contains('+') => {
            let config = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
            let kind = kind.strip_prefix("qemu/").unwrap_or(kind);
            Some(config.join("libvirt/qemu").join(kind))
        }
        _ => None,
    }
}

/// Turns a failed `virConnectOpen` into an error that says what to do.
fn classify_connect_error(uri: &str, e: &virt::error::Error) -> Error {
    let detail = e.message().to_owned();
    let lower = detail.to_lowercase();
    let uri = uri.to_owned();
    let code = e.code();
    let is = |n: ErrorNumber| code == virt::error::ErrorNumberEnum::Known(n);
    let remote = uri.split("://").next().is_some_and(|s| s.contains('+'));
    if is(ErrorNumber::AuthFailed)
        || is(ErrorNumber::AuthUnavailable)
        || is(ErrorNumber::AuthCancelled)
        || lower.contains("permission denied")
        || lower.contains("polkit")
        || lower.contains("authentication")
        || lower.contains("system bus")
    {
        return Error::PermissionDenied { uri, detail };
    }
    if lower.contains("no connection driver available") || lower.contains("unsupported") {
        return Error::UnsupportedUri { uri, detail };
    }
    if !remote
        && (lower.contains("failed to connect socket")
            || lower.contains("no such file or directory")
            || lower.contains("connection refused"))
    {
        return Error::DaemonNotRunning { uri, detail };
    }
    Error::Unreachable { uri, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dirs_follow_libvirt_defaults() {
        assert_eq!(
            daemon_dir("qemu:///system", "swtpm"),
            Some(PathBuf::from("/var/lib/libvirt/swtpm"))
        );
        assert_eq!(
            daemon_dir("qemu+ssh://me@host/system?keyfile=x", "qemu/nvram"),
            Some(PathBuf::from("/var/lib/libvirt/qemu/nvram"))
        );
        let session = daemon_dir("qemu:///session", "qemu/nvram").unwrap();
        assert!(
            session.ends_with(".config/libvirt/qemu/nvram")
                || std::env::var_os("XDG_CONFIG_HOME").is_some(),
            "{session:?}"
        );
        assert_eq!(daemon_dir("qemu+ssh://me@host/session", "swtpm"), None);
        assert_eq!(daemon_dir("test:///default", "swtpm"), None);
        assert_eq!(daemon_dir("garbage", "swtpm"), None);
    }

    #[test]
    fn test_driver_lists_its_vm() {
        let hv = Hypervisor::connect("test:///default").unwrap();
        let vms = hv.list_vms().unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].name, "test");
        assert_eq!(vms[0].state, VmState::Running);
        assert!(hv.vm("test").is_ok());
        assert!(hv.vm(&vms[0].uuid).is_ok());
        assert!(matches!(hv.vm("nope"), Err(Error::VmNotFound { .. })));
    }

    #[test]
    fn connect_errors_say_what_to_do() {
        let e = Hypervisor::connect("qemu:///system?socket=/nonexistent/libvirt-sock").unwrap_err();
        assert!(matches!(e, Error::DaemonNotRunning { .. }), "{e:?}");
        assert!(e.to_string().contains("libvirtd"), "{e}");
        assert!(e.is_retryable());

        let e = Hypervisor::connect("bogus:///nothing").unwrap_err();
        assert!(matches!(e, Error::UnsupportedUri { .. }), "{e:?}");
        assert!(e.to_string().contains("qemu:///system"), "{e}");
        assert!(!e.is_retryable());
    }
}
