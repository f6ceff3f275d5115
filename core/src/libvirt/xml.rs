//! Reading libvirt domain XML into [`crate::vm`] types.
//!
//! Only what Rewind needs is read; everything else in the XML is ignored, so newer libvirt
//! versions with extra elements still parse. Sizes, run state and anything that needs a live
//! connection are filled in by the caller.

use std::path::PathBuf;

use roxmltree::{Document, Node};

use crate::vm::{BackingImage, Disk, DiskDevice, DiskSource, Firmware, GuestAgent, Tpm};

/// Facts read from one domain XML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: String,
    /// `<domain type=...>`: `kvm`, `qemu`, ...
    pub hypervisor: String,
    /// `<os><type machine=...>`.
    pub machine: Option<String>,
    /// `<os><type arch=...>`.
    pub arch: Option<String>,
    /// Current vCPUs (`<vcpu current=...>` or its text).
    pub vcpus: Option<u32>,
    /// `<currentMemory>` in bytes.
    pub memory_bytes: Option<u64>,
    /// `<memory>` in bytes.
    pub max_memory_bytes: Option<u64>,
    /// Boot firmware.
    pub firmware: Firmware,
    /// TPM device; `state_path` is set only when the XML names it.
    pub tpm: Option<Tpm>,
    /// Guest agent channel.
    pub guest_agent: GuestAgent,
    /// Disks, without sizes.
    pub disks: Vec<Disk>,
}

/// The name of the QEMU guest agent's virtio-serial channel.
pub const GUEST_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// What is wrong with a domain definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XmlError {
    /// It is not XML.
    #[error("not well-formed XML: {0}")]
    NotXml(#[from] roxmltree::Error),
    /// Its root is another element.
    #[error("expected a <domain> element, found <{0}>")]
    NotADomain(String),
    /// A required element or attribute is missing.
    #[error("{0}")]
    Missing(&'static str),
    /// A disk without a type (file, block, network…).
    #[error("disk {0} has no type")]
    DiskWithoutType(String),
    /// Two changes to the same text (a bug in the rewrite).
    #[error("two changes to the domain XML overlap")]
    Overlap,
}

/// Parses a domain XML document.
///
/// # Errors
/// Says what is malformed or missing.
pub fn parse_domain(xml: &str) -> Result<DomainXml, XmlError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(XmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    let name = child_text(root, "name")
        .ok_or(XmlError::Missing("the domain has no <name>"))?
        .to_owned();
    let uuid = child_text(root, "uuid")
        .ok_or(XmlError::Missing("the domain has no <uuid>"))?
        .trim()
        .to_ascii_lowercase();
    let hypervisor = root.attribute("type").unwrap_or("unknown").to_owned();

    let os = child(root, "os");
    let os_type = os.and_then(|os| child(os, "type"));
    let machine = os_type
        .and_then(|t| t.attribute("machine"))
        .map(str::to_owned);
    let arch = os_type.and_then(|t| t.attribute("arch")).map(str::to_owned);

    let vcpus = child(root, "vcpu").and_then(|v| {
        v.attribute("current")
            .or_else(|| v.text())
            .and_then(|s| s.trim().parse().ok())
    });
    let memory_bytes = child(root, "currentMemory").and_then(memory_of);
    let max_memory_bytes = child(root, "memory").and_then(memory_of);

    let firmware = os.map_or(Firmware::Bios, parse_firmware);
    let devices = child(root, "devices");
    let tpm = devices.and_then(|d| child(d, "tpm")).map(parse_tpm);
    let guest_agent = devices.map(parse_guest_agent).unwrap_or_default();
    let disks = match devices {
        Some(devices) => devices
            .children()
            .filter(|n| n.has_tag_name("disk"))
            .map(parse_disk)
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };

    Ok(DomainXml {
        name,
        uuid,
        hypervisor,
        machine,
        arch,
        vcpus,
        memory_bytes,
        max_memory_bytes,
        firmware,
        tpm,
        guest_agent,
        disks,
    })
}

fn child<'a, 'i>(node: Node<'a, 'i>, tag: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| n.has_tag_name(tag))
}

fn child_text<'a>(node: Node<'a, '_>, tag: &str) -> Option<&'a str> {
    child(node, tag).and_then(|n| n.text())
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// Converts a libvirt scaled integer (`<memory unit='KiB'>4096</memory>`) to bytes.
fn memory_of(node: Node<'_, '_>) -> Option<u64> {
    let value: u64 = node.text()?.trim().parse().ok()?;
    let unit = node.attribute("unit").unwrap_or("KiB");
    let factor: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    value.checked_mul(factor)
}

fn parse_firmware(os: Node<'_, '_>) -> Firmware {
    let loader = child(os, "loader");
    let nvram = child(os, "nvram");
    let efi = os.attribute("firmware") == Some("efi")
        || loader.is_some_and(|l| l.attribute("type") == Some("pflash"))
        || nvram.is_some();
    if !efi {
        return Firmware::Bios;
    }
    let loader_path = loader.and_then(|l| non_empty(l.text())).map(PathBuf::from);
    let secure_boot = loader.is_some_and(|l| l.attribute("secure") == Some("yes"))
        || child(os, "firmware").is_some_and(|f| {
            f.children().any(|feat| {
                feat.has_tag_name("feature")
                    && feat.attribute("name") == Some("secure-boot")
                    && feat.attribute("enabled") == Some("yes")
            })
        });
    // Older libvirt puts the path in the element's text, newer (8.5+) may use <source file=.../>.
    let nvram_path = nvram.and_then(|n| {
        non_empty(n.text())
            .or_else(|| child(n, "source").and_then(|s| s.attribute("file")))
            .map(PathBuf::from)
    });
    let nvram_template = nvram
        .and_then(|n| n.attribute("template"))
        .map(PathBuf::from);
    Firmware::Uefi {
        loader_path,
        secure_boot,
        nvram_path,
        nvram_template,
    }
}

fn parse_tpm(tpm: Node<'_, '_>) -> Tpm {
    let backend = child(tpm, "backend");
    Tpm {
        model: tpm.attribute("model").unwrap_or("tpm-tis").to_owned(),
        backend: backend
            .and_then(|b| b.attribute("type"))
            .unwrap_or("passthrough")
            .to_owned(),
        version: backend
            .and_then(|b| b.attribute("version"))
            .map(str::to_owned),
        state_path: backend
            .and_then(|b| child(b, "source"))
            .and_then(|s| s.attribute("path"))
            .map(PathBuf::from),
    }
}

fn parse_guest_agent(devices: Node<'_, '_>) -> GuestAgent {
    let target = devices
        .children()
        .filter(|n| n.has_tag_name("channel"))
        .filter_map(|c| child(c, "target"))
        .find(|t| t.attribute("name") == Some(GUEST_AGENT_CHANNEL));
    GuestAgent {
        channel: target.is_some(),
        connected: target.is_some_and(|t| t.attribute("state") == Some("connected")),
    }
}

fn parse_disk(disk: Node<'_, '_>) -> Result<Disk, XmlError> {
    let target_node = child(disk, "target");
    let target = target_node
        .and_then(|t| t.attribute("dev"))
        .ok_or(XmlError::Missing("a <disk> has no <target dev=...>"))?
        .to_owned();
    let bus = target_node
        .and_then(|t| t.attribute("bus"))
        .map(str::to_owned);
    let device = match disk.attribute("device").unwrap_or("disk") {
        "cdrom" => DiskDevice::Cdrom,
        "floppy" => DiskDevice::Floppy,
        "lun" => DiskDevice::Lun,
        _ => DiskDevice::Disk,
    };
    let format = child(disk, "driver")
        .and_then(|d| d.attribute("type"))
        .map(str::to_owned);
    Ok(Disk {
        target,
        bus,
        device,
        source: parse_source(
            disk.attribute("type").unwrap_or("file"),
            child(disk, "source"),
        ),
        format,
        virtual_size_bytes: None,
        allocated_bytes: None,
        read_only: child(disk, "readonly").is_some(),
        shareable: child(disk, "shareable").is_some(),
        backing_chain: parse_backing_chain(disk),
    })
}

fn parse_source(kind: &str, source: Option<Node<'_, '_>>) -> DiskSource {
    let Some(source) = source else {
        return DiskSource::None;
    };
    let attr = |name: &str| source.attribute(name).map(str::to_owned);
    match kind {
        "file" => attr("file").map_or(DiskSource::None, |p| DiskSource::File { path: p.into() }),
        "block" => attr("dev").map_or(DiskSource::None, |p| DiskSource::Block { path: p.into() }),
        "volume" => DiskSource::Volume {
            pool: attr("pool").unwrap_or_default(),
            volume: attr("volume").unwrap_or_default(),
            path: None,
        },
        "network" => DiskSource::Network {
            protocol: attr("protocol").unwrap_or_else(|| "unknown".into()),
            name: attr("name"),
        },
        other => DiskSource::Network {
            protocol: other.to_owned(),
            name: None,
        },
    }
}

/// Walks nested `<backingStore>` elements (present in live XML and in newer libvirt).
fn parse_backing_chain(disk: Node<'_, '_>) -> Vec<BackingImage> {
    let mut chain = Vec::new();
    let mut node = child(disk, "backingStore");
    while let Some(store) = node {
        let path = child(store, "source")
            .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
            .map(PathBuf::from);
        let Some(path) = path else { break };
        let format = child(store, "format")
            .and_then(|f| f.attribute("type"))
            .map(str::to_owned);
        chain.push(BackingImage { path, format });
        node = child(store, "backingStore");
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    const UEFI_TPM: &str = r#"<domain type='qemu' id='3'>
  <name>Büro Win 11 "Test"</name>
  <uuid>6B1C58D4-0000-4000-8000-000000000001</uuid>
  <memory unit='KiB'>524288</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <firmware><feature enabled='yes' name='secure-boot'/></firmware>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/top.qcow2'/>
      <backingStore type='file' index='1'>
        <format type='qcow2'/>
        <source file='/images/mid.qcow2'/>
        <backingStore type='file' index='2'>
          <format type='raw'/>
          <source file='/images/base.raw'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='raw'/>
      <source pool='default' volume='data.img'/>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/image'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0'/>
    </tpm>
  </devices>
</domain>"#;

    #[test]
    fn reads_uefi_tpm_domain() {
        let d = parse_domain(UEFI_TPM).unwrap();
        assert_eq!(d.name, "Büro Win 11 \"Test\"");
        assert_eq!(d.uuid, "6b1c58d4-0000-4000-8000-000000000001");
        assert_eq!(d.hypervisor, "qemu");
        assert_eq!(d.machine.as_deref(), Some("pc-q35-7.2"));
        assert_eq!(d.vcpus, Some(1));
        assert_eq!(d.memory_bytes, Some(256 << 20));
        assert_eq!(d.max_memory_bytes, Some(512 << 20));
        assert_eq!(
            d.firmware,
            Firmware::Uefi {
                loader_path: Some("/usr/share/OVMF/OVMF_CODE_4M.ms.fd".into()),
                secure_boot: true,
                nvram_path: Some("/var/lib/libvirt/qemu/nvram/x_VARS.fd".into()),
                nvram_template: Some("/usr/share/OVMF/OVMF_VARS_4M.ms.fd".into()),
            }
        );
        let tpm = d.tpm.unwrap();
        assert_eq!(
            (
                tpm.model.as_str(),
                tpm.backend.as_str(),
                tpm.version.as_deref()
            ),
            ("tpm-crb", "emulator", Some("2.0"))
        );
        assert_eq!(
            d.guest_agent,
            GuestAgent {
                channel: true,
                connected: true
            }
        );
    }

    #[test]
    fn reads_disks_and_backing_chain() {
        let d = parse_domain(UEFI_TPM).unwrap();
        assert_eq!(d.disks.len(), 4);
        let vda = &d.disks[0];
        assert_eq!(vda.target, "vda");
        assert_eq!(vda.format.as_deref(), Some("qcow2"));
        assert_eq!(
            vda.source,
            DiskSource::File {
                path: "/images/top.qcow2".into()
            }
        );
        let chain: Vec<_> = vda
            .backing_chain
            .iter()
            .map(|b| (b.path.to_str().unwrap(), b.format.as_deref()))
            .collect();
        assert_eq!(
            chain,
            [
                ("/images/mid.qcow2", Some("qcow2")),
                ("/images/base.raw", Some("raw"))
            ]
        );
        assert!(vda.protectable().is_ok());

        let cdrom = &d.disks[1];
        assert_eq!(cdrom.device, DiskDevice::Cdrom);
        assert_eq!(cdrom.source, DiskSource::None);
        assert_eq!(cdrom.protectable(), Err("CD-ROM"));

        let vol = &d.disks[2];
        assert!(
            matches!(&vol.source, DiskSource::Volume { pool, volume, .. } if pool == "default" && volume == "data.img")
        );
        assert_eq!(vol.protectable(), Err("shared with other VMs"));

        assert_eq!(d.disks[3].protectable(), Err("network disk"));
    }

    #[test]
    fn bios_domain_without_devices() {
        let d = parse_domain(
            "<domain type='kvm'><name>a</name><uuid>u</uuid><os><type>hvm</type></os></domain>",
        )
        .unwrap();
        assert_eq!(d.firmware, Firmware::Bios);
        assert!(d.disks.is_empty() && d.tpm.is_none() && !d.guest_agent.channel);
    }

    #[test]
    fn new_style_nvram_source_and_manual_pflash() {
        let d = parse_domain(
            "<domain type='kvm'><name>a</name><uuid>u</uuid><os>\
             <loader type='pflash'>/code.fd</loader>\
             <nvram type='file'><source file='/vars.fd'/></nvram></os></domain>",
        )
        .unwrap();
        assert_eq!(d.firmware.nvram_path(), Some(&PathBuf::from("/vars.fd")));
    }

    #[test]
    fn bad_documents_are_errors_not_panics() {
        for bad in [
            "",
            "<domain>",
            "<network/>",
            "<domain><uuid>u</uuid></domain>",
            "<domain><name>a</name></domain>",
            "<domain><name>a</name><uuid>u</uuid><devices><disk/></devices></domain>",
        ] {
            assert!(parse_domain(bad).is_err(), "{bad:?} should be rejected");
        }
        // Odd values are ignored, not fatal.
        let d = parse_domain(
            "<domain><name>a</name><uuid>u</uuid><memory unit='parsec'>1</memory>\
             <currentMemory>99999999999999999999</currentMemory><vcpu>x</vcpu></domain>",
        )
        .unwrap();
        assert_eq!(
            (d.memory_bytes, d.max_memory_bytes, d.vcpus),
            (None, None, None)
        );
    }

    #[test]
    fn memory_units() {
        let doc = Document::parse("<m unit='GiB'>2</m>").unwrap();
        assert_eq!(memory_of(doc.root_element()), Some(2 << 30));
        let doc = Document::parse("<m unit='b'>5</m>").unwrap();
        assert_eq!(memory_of(doc.root_element()), Some(5));
        let doc = Document::parse("<m unit='TiB'>99999999</m>").unwrap();
        assert_eq!(memory_of(doc.root_element()), None, "overflow is None");
    }
}
