//! Rewriting a checkpoint's domain XML for where it is restored: another name and UUID and
//! fresh MAC addresses for a new VM, disks at new paths, the UEFI variables elsewhere.
//!
//! The document is edited in place by byte ranges (roxmltree keeps the position of every
//! node and attribute), so everything Rewind does not touch — devices, CPU model, options of
//! newer libvirt versions — stays exactly as the checkpoint recorded it.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};

use crate::libvirt::backup::xml_escape;
use crate::libvirt::xml::XmlError;

/// Where one disk of the restored VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlace {
    /// Guest target (`vda`).
    pub target: String,
    /// The image file on the host.
    pub path: PathBuf,
    /// Its format (`qcow2`, `raw`).
    pub format: String,
}

/// What to change.
#[derive(Debug, Clone, Default)]
#[allow(clippy::struct_excessive_bools)] // independent changes, each asked for on its own
pub struct Rewrite {
    /// New `<name>`.
    pub name: Option<String>,
    /// New `<uuid>`.
    pub uuid: Option<String>,
    /// Drop every `<mac>` so that libvirt makes new addresses (two VMs on one network
    /// must not share one).
    pub new_macs: bool,
    /// Disks that now live elsewhere: they become plain files, without backing chain.
    pub disks: Vec<DiskPlace>,
    /// New path of the UEFI variable store (`<os><nvram>`).
    pub nvram: Option<PathBuf>,
    /// Serial and console logs written to files are renamed from the old VM name to the
    /// new one (`old`, `new`), so that two VMs do not write one file.
    pub rename_logs: Option<(String, String)>,
    /// Put those logs in this folder (on another host, the lost host's folders are not
    /// there).
    pub logs_dir: Option<PathBuf>,
    /// Drop `<emulator>`, so that another host uses its own QEMU binary.
    pub drop_emulator: bool,
    /// Eject CD-ROMs and floppies (their images are host files another host lacks).
    pub eject_removable: bool,
    /// Unplug every network card (`<link state='down'/>`): a copy resumed with the
    /// original's MAC addresses must not meet it on the network.
    pub links_down: bool,
}

/// Byte-range edits of one document, applied back to front.
struct Edits {
    list: Vec<(Range<usize>, String)>,
}

impl Edits {
    fn replace(&mut self, range: Range<usize>, text: impl Into<String>) {
        self.list.push((range, text.into()));
    }

    fn remove(&mut self, node: Node<'_, '_>) {
        self.replace(node.range(), "");
    }

    fn apply(mut self, xml: &str) -> Result<String, XmlError> {
        self.list.sort_by_key(|(r, _)| (r.start, r.end));
        for pair in self.list.windows(2) {
            if pair[0].0.end > pair[1].0.start {
                return Err(XmlError::Overlap);
            }
        }
        let mut out = xml.to_owned();
        for (range, text) in self.list.into_iter().rev() {
            out.replace_range(range, &text);
        }
        Ok(out)
    }
}

fn child<'a, 'i>(node: Node<'a, 'i>, tag: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| n.has_tag_name(tag))
}

/// Sets the text of element `node` (which holds only text, or nothing).
fn set_text(edits: &mut Edits, node: Node<'_, '_>, text: &str) {
    if let Some(t) = node.first_child().filter(Node::is_text) {
        edits.replace(t.range(), xml_escape(text));
    } else {
        let tag = node.tag_name().name();
        let mut attrs = String::new();
        for a in node.attributes() {
            write!(attrs, " {}='{}'", a.name(), xml_escape(a.value()))
                .expect("writing to a String cannot fail");
        }
        edits.replace(
            node.range(),
            format!("<{tag}{attrs}>{}</{tag}>", xml_escape(text)),
        );
    }
}

/// Applies `rewrite` to domain XML `xml`.
pub fn rewrite(xml: &str, rewrite: &Rewrite) -> Result<String, XmlError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(XmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    let mut edits = Edits { list: Vec::new() };
    for (tag, missing, value) in [
        ("name", "the domain has no <name>", &rewrite.name),
        ("uuid", "the domain has no <uuid>", &rewrite.uuid),
    ] {
        if let Some(value) = value {
            let node = child(root, tag).ok_or(XmlError::Missing(missing))?;
            set_text(&mut edits, node, value);
        }
    }
    // A domain id and the live XML's runtime state mean nothing to a definition.
    if let Some(id) = root.attributes().find(|a| a.name() == "id") {
        edits.replace(id.range(), "");
    }
    if let Some(path) = &rewrite.nvram
        && let Some(os) = child(root, "os")
    {
        if let Some(nvram) = child(os, "nvram") {
            set_text(&mut edits, nvram, &path.display().to_string());
        } else {
            // Put it after the last child of <os>.
            let at = os
                .last_element_child()
                .map_or(os.range().end, |n| n.range().end);
            edits.replace(
                at..at,
                format!("<nvram>{}</nvram>", xml_escape(&path.display().to_string())),
            );
        }
    }
    if rewrite.drop_emulator
        && let Some(emulator) = child(root, "devices").and_then(|d| child(d, "emulator"))
    {
        edits.remove(emulator);
    }
    let Some(devices) = child(root, "devices") else {
        return edits.apply(xml);
    };
    for device in devices.children().filter(Node::is_element) {
        match device.tag_name().name() {
            "disk" => disk(&mut edits, device, rewrite)?,
            "interface" => {
                if rewrite.new_macs
                    && let Some(mac) = child(device, "mac")
                {
                    edits.remove(mac);
                }
                if rewrite.links_down {
                    unplug(&mut edits, device);
                }
            }
            "serial" | "console" | "channel" | "parallel"
                if rewrite.rename_logs.is_some() || rewrite.logs_dir.is_some() =>
            {
                log_files(&mut edits, device, rewrite);
            }
            _ => {}
        }
    }
    edits.apply(xml)
}

fn disk(edits: &mut Edits, disk: Node<'_, '_>, rewrite: &Rewrite) -> Result<(), XmlError> {
    let target = child(disk, "target").and_then(|t| t.attribute("dev"));
    let place = rewrite
        .disks
        .iter()
        .find(|p| Some(p.target.as_str()) == target);
    let Some(place) = place else {
        let removable = matches!(disk.attribute("device"), Some("cdrom" | "floppy"));
        if rewrite.eject_removable
            && removable
            && let Some(source) = child(disk, "source")
        {
            edits.remove(source);
        }
        return Ok(());
    };
    let path = xml_escape(&place.path.display().to_string());
    match disk.attributes().find(|a| a.name() == "type") {
        Some(t) => edits.replace(t.range_value(), "file"),
        None => return Err(XmlError::DiskWithoutType(place.target.clone())),
    }
    if let Some(source) = child(disk, "source") {
        edits.replace(source.range(), format!("<source file='{path}'/>"));
    } else {
        let at = child(disk, "target").map_or(disk.range().end, |t| t.range().start);
        edits.replace(at..at, format!("<source file='{path}'/>"));
    }
    // The restored image holds everything: no backing chain below it.
    for backing in disk.children().filter(|n| n.has_tag_name("backingStore")) {
        edits.remove(backing);
    }
    let format = xml_escape(&place.format);
    if let Some(driver) = child(disk, "driver") {
        if let Some(t) = driver.attributes().find(|a| a.name() == "type") {
            edits.replace(t.range_value(), format);
        } else {
            // Right after the element's name as written: `<driver`, or `<p:driver` with a
            // prefix (whose length is anyone's, in a checkpoint's XML).
            let tag = &disk.document().input_text()[driver.range()];
            let name_len = tag[1..]
                .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
                .unwrap_or(tag.len() - 1);
            let at = driver.range().start + 1 + name_len;
            edits.replace(at..at, format!(" type='{format}'"));
        }
    } else {
        let at = child(disk, "source").map_or(disk.range().end, |s| s.range().start);
        edits.replace(at..at, format!("<driver name='qemu' type='{format}'/>"));
    }
    Ok(())
}

/// Sets `<link state='down'/>` in a network card.
fn unplug(edits: &mut Edits, interface: Node<'_, '_>) {
    const DOWN: &str = "<link state='down'/>";
    if let Some(link) = child(interface, "link") {
        edits.replace(link.range(), DOWN);
    } else if let Some(last) = interface.last_element_child() {
        let at = last.range().end;
        edits.replace(at..at, DOWN);
    }
}

/// `<source path='…/old.log'/>` and `<log file='…'/>` of a file-backed character device.
fn log_files(edits: &mut Edits, device: Node<'_, '_>, rewrite: &Rewrite) {
    if device.attribute("type") != Some("file") && child(device, "log").is_none() {
        return;
    }
    for node in device.children().filter(Node::is_element) {
        let attr = match node.tag_name().name() {
            "source" if device.attribute("type") == Some("file") => "path",
            "log" => "file",
            _ => continue,
        };
        if let Some(a) = node.attributes().find(|a| a.name() == attr) {
            let mut path = PathBuf::from(a.value());
            if let Some((old, new)) = &rewrite.rename_logs {
                path = PathBuf::from(renamed_log(&path, old, new));
            }
            if let (Some(dir), Some(file)) = (&rewrite.logs_dir, path.file_name()) {
                path = dir.join(file);
            }
            edits.replace(a.range_value(), xml_escape(&path.display().to_string()));
        }
    }
}

/// `/var/log/vm/win11.log` for `win11` → `win11-copy`: `/var/log/vm/win11-copy.log`; a name
/// without the old VM's name gets the new one in front (`console.log` → `win11-copy-console.log`).
/// The same name for both leaves it as it is.
fn renamed_log(path: &Path, old: &str, new: &str) -> String {
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    let renamed = if old == new {
        file.into_owned()
    } else if !old.is_empty() && file.contains(old) {
        file.replacen(old, new, 1)
    } else {
        format!("{new}-{file}")
    };
    path.with_file_name(renamed).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu' id='7'>
  <name>win 11 "home"</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/win11_VARS.fd</nvram>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/win11' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/data.qcow2' index='1'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/isos/virtio-win.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
    <serial type='file'>
      <source path='/var/tmp/vm/console.log'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='/var/tmp/vm/console.log'/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>"#;

    fn parsed(xml: &str) -> crate::libvirt::xml::DomainXml {
        crate::libvirt::xml::parse_domain(xml).unwrap()
    }

    #[test]
    fn a_new_vm_gets_its_own_name_uuid_macs_disks_nvram_and_logs() {
        let rw = Rewrite {
            name: Some("win 11 <copy>".into()),
            uuid: Some("99999999-8888-7777-6666-555555555555".into()),
            new_macs: true,
            disks: vec![
                DiskPlace {
                    target: "vda".into(),
                    path: "/restore/it's vda.qcow2".into(),
                    format: "qcow2".into(),
                },
                DiskPlace {
                    target: "vdb".into(),
                    path: "/restore/vdb.raw".into(),
                    format: "raw".into(),
                },
            ],
            nvram: Some("/var/lib/libvirt/qemu/nvram/copy_VARS.fd".into()),
            rename_logs: Some(("win 11 \"home\"".into(), "win 11 <copy>".into())),
            logs_dir: None,
            drop_emulator: false,
            eject_removable: false,
            links_down: false,
        };
        let out = rewrite(LIVE, &rw).unwrap();
        let d = parsed(&out);
        assert_eq!(d.name, "win 11 <copy>");
        assert_eq!(d.uuid, "99999999-8888-7777-6666-555555555555");
        assert_eq!(
            d.disks[0].path().unwrap(),
            Path::new("/restore/it's vda.qcow2")
        );
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(d.disks[1].path().unwrap(), Path::new("/restore/vdb.raw"));
        assert_eq!(d.disks[1].format.as_deref(), Some("raw"));
        assert!(
            d.disks[1].backing_chain.is_empty(),
            "{:?}",
            d.disks[1].backing_chain
        );
        assert_eq!(
            d.disks[2].path().unwrap(),
            Path::new("/isos/virtio-win.iso")
        );
        assert_eq!(
            d.firmware.nvram_path().unwrap(),
            Path::new("/var/lib/libvirt/qemu/nvram/copy_VARS.fd")
        );
        assert!(!out.contains("52:54:00:12:34:56"), "{out}");
        assert!(!out.contains("id='7'"), "{out}");
        assert!(out.contains("cache='none'"), "other attributes stay: {out}");
        assert_eq!(
            out.matches("/var/tmp/vm/win 11 &lt;copy&gt;-console.log")
                .count(),
            2,
            "{out}"
        );
        assert!(out.contains("<emulator>"));
    }

    #[test]
    fn another_host_uses_its_own_emulator_and_gets_no_cdrom() {
        let rw = Rewrite {
            drop_emulator: true,
            eject_removable: true,
            logs_dir: Some("/pool/dir".into()),
            ..Rewrite::default()
        };
        let out = rewrite(LIVE, &rw).unwrap();
        let d = parsed(&out);
        assert!(!out.contains("<emulator>"), "{out}");
        assert_eq!(out.matches("'/pool/dir/console.log'").count(), 2, "{out}");
        assert!(d.disks[2].path().is_none(), "{:?}", d.disks[2]);
        assert_eq!(d.disks.len(), 3);
        assert_eq!(d.name, "win 11 \"home\"", "untouched");
    }

    #[test]
    fn a_resumed_copy_keeps_its_mac_addresses_with_its_network_cards_unplugged() {
        let rw = Rewrite {
            links_down: true,
            ..Rewrite::default()
        };
        let out = rewrite(LIVE, &rw).unwrap();
        assert!(
            out.contains(
                "<mac address='52:54:00:12:34:56'/>\n      <source network='default'/><link state='down'/>\n    </interface>"
            ),
            "{out}"
        );
        // One that says how its link is already is set down, not given a second one.
        let up = LIVE.replace(
            "<source network='default'/>",
            "<source network='default'/><link state='up'/>",
        );
        let out = rewrite(&up, &rw).unwrap();
        assert_eq!(out.matches("<link ").count(), 1, "{out}");
        assert!(out.contains("<link state='down'/>"), "{out}");
    }

    #[test]
    fn an_os_without_nvram_element_gets_one() {
        let xml = "<domain type='kvm'><name>a</name><uuid>u</uuid><os firmware='efi'><type>hvm</type></os></domain>";
        let rw = Rewrite {
            nvram: Some("/n/a_VARS.fd".into()),
            ..Rewrite::default()
        };
        let out = rewrite(xml, &rw).unwrap();
        assert!(
            out.contains("<type>hvm</type><nvram>/n/a_VARS.fd</nvram></os>"),
            "{out}"
        );
    }

    #[test]
    fn log_names_follow_the_vm() {
        assert_eq!(
            renamed_log(Path::new("/l/win11.log"), "win11", "win11-copy"),
            "/l/win11-copy.log"
        );
        assert_eq!(
            renamed_log(Path::new("/l/console.log"), "win11", "b"),
            "/l/b-console.log"
        );
    }

    #[test]
    fn bad_xml_is_an_error_not_a_panic() {
        assert!(rewrite("<domain", &Rewrite::default()).is_err());
        assert!(rewrite("<network/>", &Rewrite::default()).is_err());
        let rw = Rewrite {
            name: Some("x".into()),
            ..Rewrite::default()
        };
        assert!(rewrite("<domain/>", &rw).is_err());
    }

    /// A `<driver>` without a type gets one after its name, whatever prefix the name has
    /// (found by the `domain_xml` fuzz target: the type went 7 bytes after the `<`, inside
    /// a longer name, and inside a character of a non-ASCII one, which panicked).
    #[test]
    fn a_driver_with_a_prefix_gets_its_type_after_its_name() {
        let rw = Rewrite {
            disks: vec![DiskPlace {
                target: "vda".into(),
                path: "/r/vda.qcow2".into(),
                format: "qcow2".into(),
            }],
            ..Rewrite::default()
        };
        for (driver, expected) in [
            ("<driver/>", "<driver type='qcow2'/>"),
            (
                "<driver\tcache='none'>",
                "<driver type='qcow2'\tcache='none'>",
            ),
            (
                "<q:driver xmlns:q='urn:x'/>",
                "<q:driver type='qcow2' xmlns:q='urn:x'/>",
            ),
            (
                "<aaaaa\u{e9}:driver xmlns:aaaaa\u{e9}='urn:x'/>",
                "<aaaaa\u{e9}:driver type='qcow2' xmlns:aaaaa\u{e9}='urn:x'/>",
            ),
        ] {
            let end = if driver.ends_with("/>") {
                ""
            } else {
                "</driver>"
            };
            let xml = format!(
                "<domain><name>a</name><uuid>u</uuid><devices><disk type='file'>{driver}{end}<target dev='vda'/></disk></devices></domain>"
            );
            let out = rewrite(&xml, &rw).unwrap();
            assert!(out.contains(expected), "{out}");
            assert!(Document::parse(&out).is_ok(), "{out}");
        }
    }
}
