//! Cutting a throwaway clone of a checkpoint off from everything but its own disks (a
//! boot-check): applied to a definition that [`confine`](super::confine) already made safe
//! and that [`domain_xml::rewrite`](super::domain_xml::rewrite) gave its own name, UUID and
//! overlay disks.
//!
//! - **Disks:** each disk of the checkpoint is its overlay (a qcow2 file in the clone's
//!   private folder) over the checkpoint's disk served by Rewind's NBD export on a Unix
//!   socket (`<backingStore type='network'>`). Any other disk is removed, removable media
//!   are left empty.
//! - **No network, no host devices:** network cards, host devices (`<hostdev>`,
//!   `<redirdev>`, `<smartcard>`, passthrough input), shared host folders, shared memory,
//!   vsock and graphics listeners (VNC/SPICE, with SPICE channels and audio) are removed.
//! - **Character devices** that reach out of the VM (TCP, UDP, host devices, SPICE) are
//!   removed; files and ptys stay. The guest agent's channel stays, with its socket path
//!   left to libvirt so that it is not the original's.
//! - **A screen:** a VM without a video card gets a VGA card, so that a screenshot can show
//!   how far it came.
//! - **UEFI variables:** in the clone's folder.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;

use roxmltree::{Document, Node};

use crate::libvirt::backup::xml_escape;
use crate::libvirt::xml::XmlError;

/// One disk of the clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayDisk {
    /// Guest target (`vda`).
    pub target: String,
    /// The NBD socket that serves the checkpoint's disk.
    pub socket: PathBuf,
    /// The export's name on it.
    pub export: String,
}

/// What the clone gets.
#[derive(Debug, Clone, Default)]
pub struct Isolation {
    /// Its disks (their overlay files are set already).
    pub disks: Vec<OverlayDisk>,
    /// Its UEFI variable store.
    pub nvram: Option<PathBuf>,
}

/// Devices removed whole.
const REMOVED: &[&str] = &[
    "interface",
    "hostdev",
    "redirdev",
    "redirfilter",
    "smartcard",
    "filesystem",
    "shmem",
    "vsock",
    "graphics",
    "audio",
];

/// Character device types that stay inside the VM or the clone's folder.
const LOCAL_CHARDEVS: &[&str] = &["file", "pty", "null"];

fn child<'a, 'i>(node: Node<'a, 'i>, tag: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| n.has_tag_name(tag))
}

/// Applies `isolation` to the domain XML `xml`.
///
/// # Errors
/// The XML is not a domain, or a disk of the clone is not in it.
pub fn isolate(xml: &str, isolation: &Isolation) -> Result<String, XmlError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(XmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    if let Some(path) = &isolation.nvram
        && let Some(os) = child(root, "os")
    {
        let path = xml_escape(&path.display().to_string());
        if let Some(nvram) = child(os, "nvram") {
            let mut attrs = String::new();
            for a in nvram.attributes() {
                write!(attrs, " {}='{}'", a.name(), xml_escape(a.value()))
                    .expect("writing to a String cannot fail");
            }
            edits.push((nvram.range(), format!("<nvram{attrs}>{path}</nvram>")));
        } else {
            let at = os
                .last_element_child()
                .map_or(os.range().end, |n| n.range().end);
            edits.push((at..at, format!("<nvram>{path}</nvram>")));
        }
    }
    let Some(devices) = child(root, "devices") else {
        return Err(XmlError::Missing("the domain has no <devices>"));
    };
    let mut placed = Vec::new();
    let mut has_video = false;
    for device in devices.children().filter(Node::is_element) {
        let tag = device.tag_name().name();
        match tag {
            _ if REMOVED.contains(&tag) => edits.push((device.range(), String::new())),
            "video" => has_video = true,
            "input" if matches!(device.attribute("type"), Some("passthrough" | "evdev")) => {
                edits.push((device.range(), String::new()));
            }
            "disk" => {
                let target = child(device, "target").and_then(|t| t.attribute("dev"));
                if let Some(disk) = isolation
                    .disks
                    .iter()
                    .find(|d| Some(d.target.as_str()) == target)
                {
                    placed.push(disk.target.clone());
                    overlay_disk(&mut edits, device, disk)?;
                } else if matches!(device.attribute("device"), Some("cdrom" | "floppy")) {
                    if let Some(source) = child(device, "source") {
                        edits.push((source.range(), String::new()));
                    }
                } else {
                    edits.push((device.range(), String::new()));
                }
            }
            "serial" | "console" | "parallel" | "channel" => {
                let kind = device.attribute("type").unwrap_or("pty");
                let agent = tag == "channel"
                    && kind == "unix"
                    && child(device, "target")
                        .and_then(|t| t.attribute("name"))
                        .is_some_and(|n| n == "org.qemu.guest_agent.0");
                if agent {
                    // libvirt names the socket itself (in its channel folder).
                    if let Some(source) = child(device, "source") {
                        edits.push((source.range(), "<source mode='bind'/>".into()));
                    }
                } else if !LOCAL_CHARDEVS.contains(&kind) {
                    edits.push((device.range(), String::new()));
                }
            }
            _ => {}
        }
    }
    if let Some(missing) = isolation.disks.iter().find(|d| !placed.contains(&d.target)) {
        return Err(XmlError::Missing(if missing.target.is_empty() {
            "a disk of the clone has no target"
        } else {
            "a disk of the checkpoint is not in its definition"
        }));
    }
    if !has_video {
        let at = devices
            .last_element_child()
            .map_or(devices.range().end, |n| n.range().end);
        edits.push((at..at, "<video><model type='vga'/></video>".into()));
    }
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    for pair in edits.windows(2) {
        if pair[0].0.end > pair[1].0.start {
            return Err(XmlError::Overlap);
        }
    }
    let mut out = xml.to_owned();
    for (range, text) in edits.into_iter().rev() {
        out.replace_range(range, &text);
    }
    Ok(out)
}

/// Only the disks of [`isolate`]: each of `disks` (whose overlay file is already its
/// `<source file>`, qcow2) gets the export as its backing store; nothing else changes (a
/// VM run from its checkpoint keeps its network and devices).
///
/// # Errors
/// The XML is not a domain, or one of `disks` is not in it.
pub fn back_overlays(xml: &str, disks: &[OverlayDisk]) -> Result<String, XmlError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(XmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut placed = 0;
    for device in child(root, "devices")
        .into_iter()
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("disk")))
    {
        let target = child(device, "target").and_then(|t| t.attribute("dev"));
        if let Some(disk) = disks.iter().find(|d| Some(d.target.as_str()) == target) {
            overlay_disk(&mut edits, device, disk)?;
            placed += 1;
        }
    }
    if placed != disks.len() {
        return Err(XmlError::Missing(
            "a disk of the checkpoint is not in the VM's definition",
        ));
    }
    edits.sort_by_key(|(r, _)| (r.start, r.end));
    let mut out = xml.to_owned();
    for (range, text) in edits.into_iter().rev() {
        out.replace_range(range, &text);
    }
    Ok(out)
}

/// The overlay (already the disk's `<source file>`, qcow2) gets the export as its backing
/// store; any other backing store goes.
fn overlay_disk(
    edits: &mut Vec<(Range<usize>, String)>,
    disk: Node<'_, '_>,
    overlay: &OverlayDisk,
) -> Result<(), XmlError> {
    let Some(source) = child(disk, "source") else {
        return Err(XmlError::Missing("a disk of the clone has no source"));
    };
    for backing in disk.children().filter(|n| n.has_tag_name("backingStore")) {
        edits.push((backing.range(), String::new()));
    }
    let at = source.range().end;
    edits.push((
        at..at,
        format!(
            "<backingStore type='network'><format type='raw'/><source protocol='nbd' \
             name='{}'><host transport='unix' socket='{}'/></source></backingStore>",
            xml_escape(&overlay.export),
            xml_escape(&overlay.socket.display().to_string())
        ),
    ));
    // A read or write that fails (the export's process stopped) pauses the VM instead of
    // failing in the guest: once the export is served again, resuming retries it.
    if let Some(driver) = child(disk, "driver")
        && !driver.has_children()
    {
        let mut text = String::from("<driver");
        for a in driver
            .attributes()
            .filter(|a| !matches!(a.name(), "error_policy" | "rerror_policy"))
        {
            write!(text, " {}='{}'", a.name(), xml_escape(a.value())).ok();
        }
        text.push_str(" error_policy='stop' rerror_policy='stop'/>");
        edits.push((driver.range(), text));
    }
    // Read-only or shareable flags of the original would make QEMU refuse or share the
    // overlay; the clone owns it alone.
    for flag in ["readonly", "shareable", "transient"] {
        if let Some(node) = child(disk, flag) {
            edits.push((node.range(), String::new()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='qemu'><name>c</name><uuid>u</uuid>\
        <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>\
        <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/c_VARS.fd</nvram></os>\
        <devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/c/vda.qcow2'/><target dev='vda' bus='virtio'/><shareable/></disk>\
        <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb' bus='virtio'/></disk>\
        <disk type='file' device='cdrom'><source file='/iso/win.iso'/><target dev='sda' bus='sata'/></disk>\
        <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>\
        <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/><product id='0x2'/></source></hostdev>\
        <filesystem type='mount'><source dir='/home'/><target dir='home'/></filesystem>\
        <serial type='file'><source path='/c/console.log'/></serial>\
        <serial type='tcp'><source mode='connect' host='10.0.0.1' service='23'/></serial>\
        <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/x/org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
        <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>\
        <graphics type='spice' autoport='yes'><listen type='address' address='0.0.0.0'/></graphics>\
        <audio id='1' type='spice'/>\
        <input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>\
        <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\
        </devices></domain>";

    fn isolated() -> String {
        isolate(
            XML,
            &Isolation {
                disks: vec![OverlayDisk {
                    target: "vda".into(),
                    socket: "/run/rw/vda.sock".into(),
                    export: "vda".into(),
                }],
                nvram: Some("/run/rw/VARS.fd".into()),
            },
        )
        .unwrap()
    }

    #[test]
    fn the_clone_keeps_only_its_overlays_on_the_export_and_reaches_nothing_outside() {
        let xml = isolated();
        let doc = Document::parse(&xml).unwrap();
        let devices = doc
            .descendants()
            .find(|n| n.has_tag_name("devices"))
            .unwrap();
        let tags: Vec<&str> = devices
            .children()
            .filter(Node::is_element)
            .map(|n| n.tag_name().name())
            .collect();
        assert_eq!(
            tags,
            ["disk", "disk", "serial", "channel", "tpm", "video"],
            "{xml}"
        );
        // The overlay over the export, not shared.
        assert!(xml.contains(
            "<source file='/c/vda.qcow2'/><backingStore type='network'><format type='raw'/>\
             <source protocol='nbd' name='vda'><host transport='unix' socket='/run/rw/vda.sock'/>\
             </source></backingStore>"
        ));
        assert!(!xml.contains("<shareable/>"));
        // A failed read of the export pauses the VM rather than failing in the guest.
        assert!(
            xml.contains(
                "<driver name='qemu' type='qcow2' error_policy='stop' rerror_policy='stop'/>\
                 <source file='/c/vda.qcow2'/>"
            ),
            "{xml}"
        );
        // The host's block device is gone, the CD is empty.
        assert!(!xml.contains("/dev/sdb") && !xml.contains("win.iso"));
        // No network, host device, host folder, TCP serial, SPICE, passthrough input.
        for gone in [
            "<interface",
            "<hostdev",
            "<filesystem",
            "10.0.0.1",
            "spice",
            "evdev",
        ] {
            assert!(!xml.contains(gone), "{gone} left in {xml}");
        }
        // The agent's channel stays, with a socket of libvirt's choosing.
        assert!(xml.contains(
            "<channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/>"
        ));
        assert!(xml.contains(
            "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/run/rw/VARS.fd</nvram>"
        ));
        assert!(xml.contains("<video><model type='vga'/></video>"));
    }

    #[test]
    fn a_disk_missing_from_the_definition_is_an_error() {
        let err = isolate(
            XML,
            &Isolation {
                disks: vec![OverlayDisk {
                    target: "vdz".into(),
                    socket: "/run/rw/vdz.sock".into(),
                    export: "vdz".into(),
                }],
                nvram: None,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("not in its definition"), "{err}");
    }
}
