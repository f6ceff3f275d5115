//! A domain definition from a store, checked and made safe before libvirt defines it
//! ([`Rules::check_domain`]).
//!
//! Every place of libvirt's domain schema (9.0) that names a host path, a host device or
//! QEMU arguments is read with what it is used for ([`Role`]): `<os>` (firmware, NVRAM,
//! kernel, initrd, device tree, ACPI tables), `<sysinfo>` files, `<emulator>`, disks of every
//! type with their backing and data files, shared folders and their daemon, network cards'
//! scripts, devices and sockets, character devices (serial ports, consoles, channels,
//! parallel ports, the random number generator's) with their logs, TPM backends, shared
//! memory, graphics sockets and render nodes, audio files, memory devices, leases; host
//! devices (`<hostdev>`, `<redirdev>`, `<smartcard>`, `<input type='passthrough'>`, host
//! network cards), security labels and the `qemu:` namespace. Then, so that nothing new in
//! the schema slips through, any other attribute or text that is an absolute path must be in
//! the storage folders too.
//!
//! The document is edited by byte ranges, like [`crate::restore::domain_xml`]: what is
//! made safe is removed, everything else stays as the checkpoint had it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::ops::Range;

use roxmltree::{Document, Node, NodeId};

use super::{Refusal, Role, Rules};

/// libvirt's namespace for QEMU command-line passthrough.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// The folder in which libvirt makes the sockets of virtio channels it names itself
/// (`channelTargetDir`); libvirt drops such paths from a definition too.
pub const CHANNEL_TARGET_DIR: &str = "/var/lib/libvirt/qemu/channel/target/";

/// The host's random number sources a `<rng model='random'>` may read.
const RNG_DEVICES: &[&str] = &["/dev/random", "/dev/urandom", "/dev/hwrng"];

/// Subtrees whose values are never host paths (or are looked at on their own).
const NOT_PATHS: &[&str] = &[
    "metadata",
    "description",
    "title",
    "cmdline",
    "seclabel",
    "blkiotune",
    "resource",
    "sysinfo",
    "launchSecurity",
];

/// What to do with something that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fix {
    /// Refuse the restore.
    Refuse,
    /// Remove this range (an element or an attribute), and say `did` in the report.
    Drop {
        /// The bytes removed.
        range: Range<usize>,
        /// What that means, for the report.
        did: String,
    },
    /// Remove it always, without a word: runtime state libvirt ignores or makes anew.
    Quiet(Range<usize>),
}

/// A host path in a definition.
#[derive(Debug, Clone)]
pub(super) struct PathUse {
    pub role: Role,
    pub value: String,
    pub what: String,
    pub fix: Fix,
    /// The disk (target) whose source this is.
    pub disk: Option<String>,
}

/// What kind of device a [`DeviceUse`] is, for its refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeviceKind {
    /// A device of the host.
    Host,
    /// QEMU arguments past libvirt.
    Passthrough,
    /// Something only the current definition may have (a network disk...).
    OnlyCurrent(&'static str),
    /// A security label that would loosen QEMU's confinement.
    Label,
}

/// An element allowed only as the VM's current definition has it.
#[derive(Debug, Clone)]
pub(super) struct DeviceUse {
    pub canonical: String,
    pub what: String,
    pub kind: DeviceKind,
    pub fix: Fix,
}

impl DeviceUse {
    fn refusal(&self) -> Refusal {
        match self.kind {
            DeviceKind::Host => Refusal::HostDevice {
                what: self.what.clone(),
            },
            DeviceKind::Passthrough => Refusal::Passthrough {
                what: self.what.clone(),
            },
            DeviceKind::OnlyCurrent(kind) => Refusal::NotCurrent {
                what: self.what.clone(),
                value: self.canonical.clone(),
                kind,
            },
            DeviceKind::Label => Refusal::NotCurrent {
                what: self.what.clone(),
                value: self.canonical.clone(),
                kind: "a security label",
            },
        }
    }
}

/// Everything a definition names that a restore must look at.
#[derive(Debug, Default)]
pub(super) struct Scan {
    pub paths: Vec<PathUse>,
    pub devices: Vec<DeviceUse>,
    pub name: Option<String>,
    pub uuid: Option<String>,
}

/// A definition made safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Safe {
    /// The definition to give libvirt.
    pub xml: String,
    /// What was changed to make it safe, in words for the report.
    pub changes: Vec<String>,
}

fn is(node: Node<'_, '_>, tag: &str) -> bool {
    node.is_element() && node.tag_name().namespace().is_none() && node.tag_name().name() == tag
}

fn child<'a, 'i>(node: Node<'a, 'i>, tag: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| is(*n, tag))
}

fn children<'a, 'i>(node: Node<'a, 'i>, tag: &'static str) -> impl Iterator<Item = Node<'a, 'i>> {
    node.children().filter(move |n| is(*n, tag))
}

/// An element written the same whatever its attributes' order, whitespace and aliases
/// (which the live definition has and the inactive one lacks).
fn canonical(node: Node<'_, '_>) -> String {
    fn write(node: Node<'_, '_>, out: &mut String) {
        out.push('<');
        if let Some(ns) = node.tag_name().namespace() {
            write!(out, "{{{ns}}}").expect("writing to a String cannot fail");
        }
        out.push_str(node.tag_name().name());
        let mut attrs: Vec<(&str, &str)> =
            node.attributes().map(|a| (a.name(), a.value())).collect();
        attrs.sort_unstable();
        for (k, v) in attrs {
            write!(out, " {k}={v:?}").expect("writing to a String cannot fail");
        }
        out.push('>');
        for c in node.children() {
            if c.is_element() {
                if !is(c, "alias") {
                    write(c, out);
                }
            } else if let Some(t) = c.text().map(str::trim).filter(|t| !t.is_empty()) {
                write!(out, "{t:?}").expect("writing to a String cannot fail");
            }
        }
        out.push_str("</>");
    }
    let mut out = String::new();
    write(node, &mut out);
    out
}

/// The attribute range of `node`'s attribute `name`.
fn attr_range(node: Node<'_, '_>, name: &str) -> Option<Range<usize>> {
    node.attributes()
        .find(|a| a.name() == name)
        .map(|a| a.range())
}

struct Walker {
    scan: Scan,
    handled: HashSet<(NodeId, String)>,
    skipped: HashSet<NodeId>,
}

impl Walker {
    fn path_attr(
        &mut self,
        node: Node<'_, '_>,
        attr: &str,
        role: Role,
        what: &str,
        fix: Fix,
        disk: Option<&str>,
    ) {
        if let Some(value) = node.attribute(attr) {
            self.handled.insert((node.id(), attr.to_owned()));
            self.scan.paths.push(PathUse {
                role,
                value: value.to_owned(),
                what: what.to_owned(),
                fix,
                disk: disk.map(str::to_owned),
            });
        }
    }

    /// A path attribute that is refused unless allowed.
    fn must(&mut self, node: Node<'_, '_>, attr: &str, role: Role, what: &str) {
        self.path_attr(node, attr, role, what, Fix::Refuse, None);
    }

    fn path_text(&mut self, node: Node<'_, '_>, role: Role, what: &str, fix: Fix) {
        if let Some(value) = node.text().map(str::trim).filter(|t| !t.is_empty()) {
            self.handled.insert((node.id(), "#text".to_owned()));
            self.scan.paths.push(PathUse {
                role,
                value: value.to_owned(),
                what: what.to_owned(),
                fix,
                disk: None,
            });
        }
    }

    fn quiet_attr(&mut self, node: Node<'_, '_>, attr: &str) {
        if let Some(range) = attr_range(node, attr) {
            self.handled.insert((node.id(), attr.to_owned()));
            let value = node.attribute(attr).unwrap_or_default().to_owned();
            self.scan.paths.push(PathUse {
                role: Role::Other,
                value,
                what: String::new(),
                fix: Fix::Quiet(range),
                disk: None,
            });
        }
    }

    fn device(&mut self, node: Node<'_, '_>, kind: DeviceKind, what: String, fix: Fix) {
        self.skipped.insert(node.id());
        self.scan.devices.push(DeviceUse {
            canonical: canonical(node),
            what,
            kind,
            fix,
        });
    }

    fn os(&mut self, os: Node<'_, '_>) {
        for c in os.children().filter(Node::is_element) {
            if c.tag_name().namespace().is_some() {
                continue;
            }
            match c.tag_name().name() {
                "loader" => {
                    self.path_text(c, Role::Loader, "the firmware (<os><loader>)", Fix::Refuse);
                }
                "nvram" => {
                    let what = "the UEFI variable store (<os><nvram>)";
                    if c.attribute("type").is_some_and(|t| t != "file") {
                        self.device(
                            c,
                            DeviceKind::OnlyCurrent("a UEFI variable store that is no file"),
                            what.to_owned(),
                            Fix::Refuse,
                        );
                        continue;
                    }
                    self.path_text(c, Role::Nvram, what, Fix::Refuse);
                    if let Some(source) = child(c, "source") {
                        self.must(source, "file", Role::Nvram, what);
                    }
                    if let Some(range) = attr_range(c, "template") {
                        let did = "left out the UEFI variables' template (<nvram template>): libvirt takes the one that goes with the firmware".to_owned();
                        self.path_attr(
                            c,
                            "template",
                            Role::NvramTemplate,
                            "the UEFI variables' template",
                            Fix::Drop { range, did },
                            None,
                        );
                    }
                }
                name @ ("kernel" | "initrd" | "dtb") => {
                    let what = format!("the guest's {name} (<os><{name}>)");
                    self.path_text(c, Role::BootFile, &what, Fix::Refuse);
                }
                "acpi" => {
                    for table in children(c, "table") {
                        self.path_text(
                            table,
                            Role::BootFile,
                            "an ACPI table (<os><acpi><table>)",
                            Fix::Refuse,
                        );
                    }
                }
                _ => {}
            }
        }
    }

    fn disk(&mut self, d: Node<'_, '_>) {
        let target = child(d, "target")
            .and_then(|t| t.attribute("dev"))
            .unwrap_or("?")
            .to_owned();
        let kind = d.attribute("type").unwrap_or("file");
        let device = d.attribute("device").unwrap_or("disk");
        let removable = matches!(device, "cdrom" | "floppy");
        let read_only = removable || child(d, "readonly").is_some();
        if let Some(source) = child(d, "source") {
            let what = format!("disk {target}'s image");
            match kind {
                "file" => {
                    let role = if read_only {
                        Role::ReadOnlyImage
                    } else {
                        Role::Disk
                    };
                    let fix = if removable {
                        Fix::Drop {
                            range: source.range(),
                            did: format!("ejected {device} {target}"),
                        }
                    } else {
                        Fix::Refuse
                    };
                    self.path_attr(source, "file", role, &what, fix, Some(&target));
                }
                "block" => self.path_attr(
                    source,
                    "dev",
                    Role::Block,
                    &what,
                    Fix::Refuse,
                    Some(&target),
                ),
                "dir" => self.path_attr(
                    source,
                    "dir",
                    Role::HostFolder,
                    &what,
                    Fix::Refuse,
                    Some(&target),
                ),
                // The volume's file is checked as the checkpoint's disk source; libvirt keeps
                // volumes in their pools.
                "volume" => {}
                other => self.device(
                    source,
                    DeviceKind::OnlyCurrent("a network or device disk"),
                    format!("disk {target}'s {other} source"),
                    Fix::Refuse,
                ),
            }
        }
        for node in d.descendants().filter(Node::is_element) {
            let name = node.tag_name().name();
            let under = |tag: &str| node.parent_element().is_some_and(|p| is(p, tag));
            if is(node, "source") && under("backingStore") {
                let what = format!("disk {target}'s backing image");
                self.must(node, "file", Role::ReadOnlyImage, &what);
                self.must(node, "dev", Role::Block, &what);
            } else if is(node, "source") && (under("dataStore") || under("mirror")) {
                let what = format!("disk {target}'s data file");
                self.must(node, "file", Role::Disk, &what);
                self.must(node, "dev", Role::Block, &what);
            } else if is(node, "source") && under("reservations") {
                let what = format!("disk {target}'s reservation helper socket");
                self.must(node, "path", Role::Socket, &what);
            } else if name == "mirror" {
                let what = format!("disk {target}'s copy");
                self.must(node, "file", Role::Disk, &what);
            }
        }
    }

    fn filesystem(&mut self, f: Node<'_, '_>) {
        let what = "a folder shared with the guest (<filesystem><source>)";
        if let Some(source) = child(f, "source") {
            self.must(source, "dir", Role::HostFolder, what);
            self.must(source, "file", Role::HostFolder, what);
            self.must(source, "dev", Role::Block, what);
            self.must(source, "socket", Role::Socket, what);
        }
        if let Some(binary) = child(f, "binary") {
            let what = "the program serving a shared folder (<filesystem><binary>)";
            self.must(binary, "path", Role::Program, what);
        }
        // The guest's side.
        if let Some(target) = child(f, "target") {
            self.skipped.insert(target.id());
        }
    }

    fn interface(&mut self, i: Node<'_, '_>) {
        let kind = i.attribute("type").unwrap_or_default();
        let passthrough =
            child(i, "source").is_some_and(|s| s.attribute("mode") == Some("passthrough"));
        if matches!(kind, "hostdev" | "vdpa") || (kind == "direct" && passthrough) {
            self.device(
                i,
                DeviceKind::Host,
                format!("<interface type='{kind}'> (a network card of the host)"),
                Fix::Refuse,
            );
            return;
        }
        for script in ["script", "downscript"] {
            if let Some(node) = child(i, script) {
                let what = format!("the network card's <{script}>, which libvirt runs");
                self.must(node, "path", Role::Program, &what);
            }
        }
        if let Some(backend) = child(i, "backend") {
            for attr in ["tap", "vhost"] {
                let what = format!("the network card's {attr} device (<backend {attr}>)");
                self.must(backend, attr, Role::HostDevice, &what);
            }
        }
        if kind == "vhostuser"
            && let Some(source) = child(i, "source")
        {
            self.must(
                source,
                "path",
                Role::Socket,
                "the network card's vhost-user socket",
            );
        }
        if let Some(rom) = child(i, "rom") {
            self.must(rom, "file", Role::BootFile, "the network card's option ROM");
        }
    }

    /// A character device: `type` on `node`, `<source>` and `<log>` below it.
    fn chardev(&mut self, node: Node<'_, '_>, name: &str) {
        let kind = node.attribute("type").unwrap_or("pty");
        let virtio_channel = is(node, "channel")
            && child(node, "target").is_some_and(|t| t.attribute("type") == Some("virtio"));
        self.quiet_attr(node, "tty");
        for source in children(node, "source") {
            let what = format!("{name}'s {kind}");
            match kind {
                "file" | "pipe" => {
                    self.must(source, "path", Role::LogFile, &what);
                }
                "dev" => self.must(source, "path", Role::HostDevice, &what),
                "unix" => {
                    let default = source
                        .attribute("path")
                        .is_some_and(|p| p.starts_with(CHANNEL_TARGET_DIR));
                    if virtio_channel && default {
                        self.quiet_attr(source, "path");
                    } else {
                        let what = format!("{name}'s socket");
                        self.must(source, "path", Role::Socket, &what);
                    }
                }
                // The pseudo-terminal of a running VM: libvirt gives it a new one.
                "pty" => self.quiet_attr(source, "path"),
                _ => {}
            }
        }
        if let Some(log) = child(node, "log") {
            let what = format!("{name}'s log file");
            self.must(log, "file", Role::LogFile, &what);
        }
    }

    fn devices(&mut self, devices: Node<'_, '_>) {
        for d in devices.children().filter(Node::is_element) {
            if d.tag_name().namespace().is_some() {
                continue;
            }
            match d.tag_name().name() {
                "emulator" => {
                    let did = "left out <emulator>: libvirt runs its own QEMU".to_owned();
                    self.path_text(
                        d,
                        Role::Program,
                        "the QEMU program (<emulator>)",
                        Fix::Drop {
                            range: d.range(),
                            did,
                        },
                    );
                }
                "disk" => self.disk(d),
                "filesystem" => self.filesystem(d),
                "interface" => self.interface(d),
                "hostdev" => {
                    let what = format!(
                        "<hostdev type='{}'> (a device of the host)",
                        d.attribute("type").unwrap_or("?")
                    );
                    self.device(d, DeviceKind::Host, what, Fix::Refuse);
                }
                "redirdev" | "smartcard" => {
                    let tag = d.tag_name().name();
                    // Through the viewer (SPICE), the devices are the viewer's, not the
                    // host's; and the VM runs without them.
                    let viewer = d.attribute("type") == Some("spicevmc")
                        && (tag == "redirdev" || d.attribute("mode") == Some("passthrough"));
                    let what = format!(
                        "<{tag}> ({})",
                        if tag == "redirdev" {
                            "USB redirection"
                        } else {
                            "a smartcard"
                        }
                    );
                    let fix = if viewer {
                        Fix::Drop {
                            range: d.range(),
                            did: format!("left out {what} through the viewer"),
                        }
                    } else {
                        Fix::Refuse
                    };
                    self.device(d, DeviceKind::Host, what, fix);
                }
                "input" if matches!(d.attribute("type"), Some("passthrough" | "evdev")) => {
                    let what = "<input> passed through from the host".to_owned();
                    self.device(d, DeviceKind::Host, what, Fix::Refuse);
                }
                _ => self.device_more(d),
            }
        }
    }

    /// A TPM: its state folder, an external one's socket; one of the host is refused.
    fn tpm(&mut self, d: Node<'_, '_>) {
        let Some(backend) = child(d, "backend") else {
            return;
        };
        match backend.attribute("type").unwrap_or("passthrough") {
            "emulator" => {
                if let Some(source) = child(backend, "source") {
                    let what = "the TPM state folder (<tpm><backend><source>)";
                    self.must(source, "path", Role::TpmState, what);
                }
            }
            "external" => {
                if let Some(source) = child(backend, "source") {
                    let what = "the external TPM's socket";
                    self.must(source, "path", Role::Socket, what);
                }
            }
            _ => {
                let what = "<tpm> passed through from the host".to_owned();
                self.device(d, DeviceKind::Host, what, Fix::Refuse);
            }
        }
    }

    /// A random number generator: a host source, or a character device.
    fn rng(&mut self, d: Node<'_, '_>) {
        let Some(backend) = child(d, "backend") else {
            return;
        };
        if backend.attribute("model") == Some("random") {
            let value = backend.text().map(str::trim).unwrap_or_default();
            if RNG_DEVICES.contains(&value) {
                self.handled.insert((backend.id(), "#text".to_owned()));
            } else {
                let what = "the random number generator's source";
                self.path_text(backend, Role::HostDevice, what, Fix::Refuse);
            }
        } else {
            self.chardev(backend, "the random number generator");
        }
    }

    /// The devices [`Walker::devices`] leaves to this: TPM, random number generator,
    /// shared memory, display, sound, memory devices, leases.
    fn device_more(&mut self, d: Node<'_, '_>) {
        match d.tag_name().name() {
            "tpm" => self.tpm(d),
            name @ ("serial" | "parallel" | "console" | "channel") => {
                let label = match child(d, "target").and_then(|t| t.attribute("name")) {
                    Some(target) => format!("{name} {target}"),
                    None => format!("the {name}"),
                };
                self.chardev(d, &label);
            }
            "rng" => self.rng(d),
            "shmem" => {
                if let Some(server) = child(d, "server") {
                    self.must(
                        server,
                        "path",
                        Role::Socket,
                        "the shared memory's server socket",
                    );
                }
            }
            "graphics" => {
                self.must(d, "socket", Role::Socket, "the display's socket");
                for listen in children(d, "listen") {
                    self.must(listen, "socket", Role::Socket, "the display's socket");
                }
            }
            "audio" => {
                if d.attribute("type") == Some("file") {
                    self.must(d, "path", Role::LogFile, "the sound's file");
                }
                for tag in ["input", "output"] {
                    if let Some(node) = child(d, tag) {
                        let what = format!("the sound's host {tag} device");
                        self.must(node, "dev", Role::HostDevice, &what);
                    }
                }
            }
            "memory" => {
                if let Some(path) = child(d, "source").and_then(|s| child(s, "path")) {
                    self.path_text(
                        path,
                        Role::Disk,
                        "the memory device's backing file",
                        Fix::Refuse,
                    );
                }
            }
            "lease" => {
                if let Some(target) = child(d, "target") {
                    self.must(target, "path", Role::Disk, "the lease file");
                }
            }
            _ => {}
        }
    }

    /// Security labels: the default one of a VM is harmless; one that picks who QEMU runs
    /// as, turns confinement off, or keeps a file's owner is allowed only as the current
    /// definition has it, and is left out otherwise (libvirt then uses its default).
    fn seclabels(&mut self, root: Node<'_, '_>) {
        for label in root.descendants().filter(|n| is(*n, "seclabel")) {
            let domain_level = label.parent_element() == Some(root);
            let harmless = if domain_level {
                matches!(label.attribute("type"), None | Some("dynamic"))
                    && label.attribute("model") != Some("none")
                    && label.attribute("relabel") != Some("no")
                    && child(label, "baselabel").is_none()
            } else {
                child(label, "label").is_none()
            };
            if harmless {
                self.skipped.insert(label.id());
                continue;
            }
            let what = format!("a security label ({})", canonical(label));
            let did = format!("left out {what}: libvirt confines QEMU as it does by default");
            let range = label.range();
            self.device(label, DeviceKind::Label, what, Fix::Drop { range, did });
        }
    }

    /// `rendernode` (a GPU of the host) anywhere: libvirt picks one itself.
    fn render_nodes(&mut self, root: Node<'_, '_>) {
        for node in root.descendants().filter(|n| n.has_attribute("rendernode")) {
            if let Some(range) = attr_range(node, "rendernode") {
                let did =
                    "left out a host GPU render node (rendernode): libvirt picks one".to_owned();
                self.path_attr(
                    node,
                    "rendernode",
                    Role::HostDevice,
                    "a host GPU render node",
                    Fix::Drop { range, did },
                    None,
                );
            }
        }
    }

    /// Any other attribute or text that is an absolute path.
    fn rest(&mut self, root: Node<'_, '_>) {
        let mut stack = vec![root];
        while let Some(node) = stack.pop() {
            if self.skipped.contains(&node.id())
                || (node.tag_name().namespace().is_none()
                    && NOT_PATHS.contains(&node.tag_name().name())
                    && node != root)
            {
                continue;
            }
            let tag = node.tag_name().name().to_owned();
            for a in node.attributes() {
                if a.value().trim_start().starts_with('/')
                    && !self.handled.contains(&(node.id(), a.name().to_owned()))
                {
                    let what = format!("<{tag} {}>", a.name());
                    self.must(node, a.name(), Role::Other, &what);
                }
            }
            let only_text = node.children().all(|c| c.is_text());
            if only_text
                && node.text().is_some_and(|t| t.trim_start().starts_with('/'))
                && !self.handled.contains(&(node.id(), "#text".to_owned()))
            {
                let what = format!("<{tag}>");
                self.path_text(node, Role::Other, &what, Fix::Refuse);
            }
            stack.extend(node.children().filter(Node::is_element));
        }
    }
}

/// Reads everything in a domain definition that a restore must look at.
pub(super) fn scan(doc: &Document<'_>) -> Scan {
    let root = doc.root_element();
    let mut w = Walker {
        scan: Scan::default(),
        handled: HashSet::new(),
        skipped: HashSet::new(),
    };
    let text = |tag| {
        child(root, tag)
            .and_then(|n| n.text())
            .map(|t| t.trim().to_owned())
    };
    w.scan.name = text("name");
    w.scan.uuid = text("uuid");
    for node in root.descendants().filter(Node::is_element) {
        let parent_is_qemu = node
            .parent_element()
            .is_some_and(|p| p.tag_name().namespace() == Some(QEMU_NS));
        if node.tag_name().namespace() == Some(QEMU_NS) && !parent_is_qemu {
            if node.tag_name().name() == "deprecation" {
                w.skipped.insert(node.id());
            } else {
                let what = format!("<qemu:{}>", node.tag_name().name());
                w.device(node, DeviceKind::Passthrough, what, Fix::Refuse);
            }
        }
    }
    w.seclabels(root);
    w.render_nodes(root);
    for node in root.children().filter(Node::is_element) {
        if is(node, "os") {
            w.os(node);
        } else if is(node, "sysinfo") {
            for entry in node.descendants().filter(|n| n.has_attribute("file")) {
                let what = "a file given to the firmware (<sysinfo> entry)";
                w.path_attr(entry, "file", Role::BootFile, what, Fix::Refuse, None);
            }
        } else if is(node, "devices") {
            w.devices(node);
        }
    }
    w.rest(root);
    w.scan
}

/// Removes `ranges` from `xml` (one inside another is removed once).
fn remove(xml: &str, mut ranges: Vec<Range<usize>>) -> String {
    ranges.sort_by_key(|r| (r.start, std::cmp::Reverse(r.end)));
    let mut merged: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start < last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    let mut out = xml.to_owned();
    for r in merged.into_iter().rev() {
        out.replace_range(r, "");
    }
    out
}

impl Rules {
    /// Checks domain definition `xml` from a store and makes it safe (see the module
    /// documentation): the definition to define, and what was changed.
    ///
    /// # Errors
    /// The first thing in it that is refused.
    pub fn check_domain(&self, xml: &str) -> Result<Safe, Refusal> {
        let doc = Document::parse(xml).map_err(|e| Refusal::Unreadable(e.to_string()))?;
        let root = doc.root_element();
        if !is(root, "domain") {
            return Err(Refusal::Unreadable(format!(
                "expected a <domain> element, found <{}>",
                root.tag_name().name()
            )));
        }
        let scan = scan(&doc);
        let (name, uuid) = (
            scan.name.clone().unwrap_or_default(),
            scan.uuid.clone().unwrap_or_default(),
        );
        if name != self.name || !uuid.eq_ignore_ascii_case(&self.uuid) {
            return Err(Refusal::OtherIdentity {
                found: name,
                found_uuid: uuid,
                expected: self.name.clone(),
                expected_uuid: self.uuid.clone(),
            });
        }
        let mut ranges = Vec::new();
        let mut changes = Vec::new();
        for u in &scan.paths {
            if u.disk
                .as_ref()
                .is_some_and(|t| self.placed_disks.contains(t))
            {
                continue;
            }
            if let Fix::Quiet(range) = &u.fix {
                ranges.push(range.clone());
                continue;
            }
            if let Err(refusal) = self.check_path(u.role, &u.value, &u.what) {
                match &u.fix {
                    Fix::Drop { range, did } => {
                        ranges.push(range.clone());
                        changes.push(format!("{did} ({refusal})"));
                    }
                    Fix::Refuse | Fix::Quiet(_) => return Err(refusal),
                }
            }
        }
        for d in &scan.devices {
            if self.current.has_device(&d.canonical) {
                continue;
            }
            match &d.fix {
                Fix::Drop { range, did } => {
                    ranges.push(range.clone());
                    changes.push(did.clone());
                }
                Fix::Quiet(range) => ranges.push(range.clone()),
                Fix::Refuse => return Err(d.refusal()),
            }
        }
        Ok(Safe {
            xml: remove(xml, ranges),
            changes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Reference;
    use super::*;

    const UUID: &str = "0c7e5a4e-1111-4000-8000-000000000001";

    /// A UEFI + TPM VM as libvirt shows it running, its files in a pool folder.
    fn vm_xml(devices: &str) -> String {
        format!(
            "<domain type='qemu' id='3' xmlns:qemu='{QEMU_NS}'>
  <name>win11</name>
  <uuid>{UUID}</uuid>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/win11_VARS.fd</nvram>
    <kernel>/pool/vmlinuz</kernel>
    <cmdline>console=ttyS0 root=/dev/vda</cmdline>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/pool/win11.qcow2' index='1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <serial type='file'>
      <source path='/pool/console.log'/>
      <target port='0'/>
    </serial>
    <console type='pty' tty='/dev/pts/4'>
      <source path='/dev/pts/4'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-win11/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <redirdev bus='usb' type='spicevmc'/>
    {devices}
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel>
</domain>"
        )
    }

    fn rules() -> Rules {
        Rules {
            local: false,
            name: "win11".into(),
            uuid: UUID.into(),
            storage: vec!["/pool".into(), "/var/lib/libvirt/images".into()],
            nvram_dir: Some("/var/lib/libvirt/qemu/nvram".into()),
            swtpm_dir: Some("/var/lib/libvirt/swtpm".into()),
            firmware: vec![
                "/usr/share/OVMF/OVMF_CODE_4M.ms.fd".into(),
                "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            ],
            ..Rules::default()
        }
    }

    /// `rules` with `xml` as the VM's current definition.
    fn defined_as(xml: &str) -> Rules {
        let mut current = Reference::default();
        current.add_xml(xml);
        Rules { current, ..rules() }
    }

    fn refused(rules: &Rules, xml: &str) -> Refusal {
        match rules.check_domain(xml) {
            Ok(safe) => panic!(
                "not refused; made safe as {:?}:\n{}",
                safe.changes, safe.xml
            ),
            Err(e) => e,
        }
    }

    #[test]
    fn a_vm_in_libvirts_folders_is_defined_as_it_was_with_only_runtime_state_left_out() {
        let xml = vm_xml("");
        let safe = rules().check_domain(&xml).unwrap();
        // USB redirection through the viewer is not the host's, but not needed either.
        assert_eq!(safe.changes.len(), 2, "{:?}", safe.changes);
        assert!(safe.changes[0].contains("<emulator>"), "{:?}", safe.changes);
        assert!(
            safe.changes[1].contains("USB redirection"),
            "{:?}",
            safe.changes
        );
        assert!(!safe.xml.contains("/dev/pts/4"), "{}", safe.xml);
        assert!(!safe.xml.contains("domain-3-win11"), "{}", safe.xml);
        assert!(safe.xml.contains("/pool/win11.qcow2") && safe.xml.contains("/pool/console.log"));
        crate::libvirt::xml::parse_domain(&safe.xml).unwrap();
    }

    #[test]
    fn the_vms_own_current_definition_is_taken_as_it_is() {
        let own = vm_xml(
            "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>
             <disk type='block' device='disk'><source dev='/dev/vg/win11-data'/><target dev='vdb'/></disk>
             <disk type='file' device='cdrom'><source file='/isos/virtio-win.iso'/><target dev='sda'/><readonly/></disk>",
        )
        .replace("/pool/", "/home/me/vms/")
        .replace("</domain>", "<qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline></domain>");
        let safe = defined_as(&own).check_domain(&own).unwrap();
        assert_eq!(safe.changes, Vec::<String>::new());
        // The same, reformatted and with aliases (the live definition) is the same.
        let inactive = own
            .replace("<alias name='virtio-disk0'/>", "")
            .replace("managed='yes'", " managed='yes' ");
        defined_as(&own).check_domain(&inactive).unwrap();
    }

    #[test]
    fn a_host_device_is_refused_unless_the_vm_has_it_now() {
        let hostdev = "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>";
        let xml = vm_xml(hostdev);
        let err = refused(&rules(), &xml);
        assert!(matches!(err, Refusal::HostDevice { .. }), "{err}");
        assert!(err.to_string().contains("<hostdev type='pci'>"), "{err}");
        // Another device of the host than the one it has is still refused.
        let other = vm_xml(&hostdev.replace("0x03", "0x04"));
        assert!(matches!(
            refused(&defined_as(&xml), &other),
            Refusal::HostDevice { .. }
        ));
        defined_as(&xml).check_domain(&xml).unwrap();
        for device in [
            "<redirdev bus='usb' type='tcp'><source mode='connect' host='localhost' service='4000'/></redirdev>",
            "<smartcard mode='host'/>",
            "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>",
            "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>",
            "<interface type='hostdev' managed='yes'><source><address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/></source></interface>",
        ] {
            let err = refused(&rules(), &vm_xml(device));
            assert!(matches!(err, Refusal::HostDevice { .. }), "{device}: {err}");
        }
    }

    #[test]
    fn qemu_command_line_passthrough_is_refused() {
        for extra in [
            "<qemu:commandline><qemu:arg value='-device'/><qemu:arg value='x'/></qemu:commandline>",
            "<qemu:override><qemu:device alias='ua-x'><qemu:frontend><qemu:property name='p' type='string' value='v'/></qemu:frontend></qemu:device></qemu:override>",
            "<qemu:capabilities><qemu:add capability='blockdev'/></qemu:capabilities>",
        ] {
            let xml = vm_xml("").replace("</domain>", &format!("{extra}</domain>"));
            let err = refused(&rules(), &xml);
            assert!(matches!(err, Refusal::Passthrough { .. }), "{err}");
            assert!(
                err.to_string().contains("passes arguments to QEMU"),
                "{err}"
            );
        }
    }

    #[test]
    #[allow(clippy::too_many_lines)] // one table of cases
    fn files_outside_libvirts_folders_are_refused() {
        let cases = [
            (
                vm_xml("").replace("/pool/win11.qcow2", "/etc/shadow"),
                "disk vda's image \"/etc/shadow\"",
            ),
            (
                vm_xml("").replace("/pool/console.log", "/etc/cron.d/x"),
                "the serial's file \"/etc/cron.d/x\"",
            ),
            (
                vm_xml("").replace("/pool/win11.qcow2", "/pool/../etc/shadow"),
                "not a plain absolute path",
            ),
            (
                vm_xml("").replace(
                    "/var/lib/libvirt/qemu/nvram/win11_VARS.fd",
                    "/var/lib/libvirt/images/x_VARS.fd",
                ),
                "libvirt's folder of UEFI variables",
            ),
            (
                vm_xml("").replace("/pool/vmlinuz", "/boot/vmlinuz"),
                "the guest's kernel",
            ),
            (
                vm_xml("").replace(
                    "OVMF_CODE_4M.ms.fd</loader>",
                    "../../../etc/shadow</loader>",
                ),
                "not a plain",
            ),
            (
                vm_xml(
                    "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><source type='dir' path='/etc/ssh'/></backend></tpm>",
                ),
                "swtpm's state folder of this VM",
            ),
            (
                vm_xml(
                    "<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/><source dir='/'/><target dir='root'/></filesystem>",
                ),
                "a folder shared with the guest",
            ),
            (
                vm_xml(
                    "<filesystem type='mount'><driver type='virtiofs'/><binary path='/tmp/evil'/><source dir='/pool/share'/><target dir='share'/></filesystem>",
                ),
                "a program",
            ),
            (
                vm_xml(
                    "<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdc'/></disk>",
                ),
                "a block device",
            ),
            (
                vm_xml(
                    "<disk type='network' device='disk'><source protocol='nbd' name='x'><host transport='unix' socket='/run/x'/></source><target dev='vdc'/></disk>",
                ),
                "a network or device disk",
            ),
            (
                vm_xml("<serial type='dev'><source path='/dev/ttyS0'/><target port='1'/></serial>"),
                "a host device",
            ),
            (
                vm_xml(
                    "<channel type='unix'><source mode='bind' path='/etc/cron.d/sock'/><target type='virtio' name='x'/></channel>",
                ),
                "socket",
            ),
            (
                vm_xml("<interface type='ethernet'><script path='/tmp/evil'/></interface>"),
                "which libvirt runs",
            ),
            (
                vm_xml("<audio id='2' type='file' path='/etc/motd'/>"),
                "the sound's file",
            ),
            (
                vm_xml(
                    "<serial type='pty'><log file='/etc/cron.d/y' append='on'/><target port='2'/></serial>",
                ),
                "log file",
            ),
            (
                vm_xml(
                    "<disk type='file' device='disk'><source file='/pool/d.qcow2'><dataStore type='file'><format type='raw'/><source file='/etc/passwd'/></dataStore></source><target dev='vdd'/></disk>",
                ),
                "data file",
            ),
            (
                vm_xml(
                    "<interface type='network'><source network='default'/><rom file='/etc/shadow'/></interface>",
                ),
                "option ROM",
            ),
            (
                vm_xml("<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>"),
                "random number",
            ),
            (
                vm_xml(
                    "<memory model='nvdimm'><source><path>/etc/shadow</path></source><target><size unit='KiB'>1024</size></target></memory>",
                ),
                "memory device",
            ),
            (
                vm_xml("<shmem name='x'><server path='/etc/x.sock'/></shmem>"),
                "server socket",
            ),
            (
                vm_xml("<newdevice><source file='/etc/shadow'/></newdevice>"),
                "<source file>",
            ),
        ];
        for (xml, said) in cases {
            let err = refused(&rules(), &xml);
            assert!(err.to_string().contains(said), "expected {said:?}: {err}");
        }
    }

    #[test]
    fn what_is_unsafe_but_not_needed_is_left_out_and_said() {
        let xml = vm_xml(
            "<disk type='file' device='cdrom'><source file='/home/me/secret.iso'/><target dev='sdb'/><readonly/></disk>
             <smartcard mode='passthrough' type='spicevmc'/>
             <graphics type='egl-headless'><gl rendernode='/dev/dri/renderD128'/></graphics>",
        )
        .replace("/usr/bin/qemu-system-x86_64", "/tmp/evil")
        .replace("OVMF_VARS_4M.ms.fd", "../../../etc/shadow")
        .replace(
            "</domain>",
            "<seclabel type='static' model='dac' relabel='yes'><label>+0:+0</label></seclabel></domain>",
        )
        .replace("<seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel>", "");
        let safe = rules().check_domain(&xml).unwrap();
        let said = safe.changes.join("\n");
        for change in [
            "<emulator>",
            "ejected cdrom sdb",
            "template",
            "smartcard",
            "render node",
            "security label",
        ] {
            assert!(said.contains(change), "{change}: {said}");
        }
        for gone in [
            "/tmp/evil",
            "secret.iso",
            "etc/shadow",
            "renderD128",
            "+0:+0",
        ] {
            assert!(!safe.xml.contains(gone), "{gone}: {}", safe.xml);
        }
        let parsed = crate::libvirt::xml::parse_domain(&safe.xml).unwrap();
        assert_eq!(parsed.disks.len(), 2);
        // The VM's own values stay.
        let own = defined_as(&xml).check_domain(&xml).unwrap();
        assert!(
            own.xml.contains("/tmp/evil") && own.xml.contains("secret.iso"),
            "{}",
            own.xml
        );
    }

    #[test]
    fn a_definition_of_another_vm_is_refused() {
        let xml = vm_xml("").replace(UUID, "99999999-1111-4000-8000-000000000001");
        assert!(matches!(
            refused(&rules(), &xml),
            Refusal::OtherIdentity { .. }
        ));
        let xml = vm_xml("").replace("<name>win11</name>", "<name>other</name>");
        assert!(matches!(
            refused(&rules(), &xml),
            Refusal::OtherIdentity { .. }
        ));
        assert!(matches!(
            refused(&rules(), "<domain"),
            Refusal::Unreadable(_)
        ));
        assert!(matches!(
            refused(&rules(), "<network/>"),
            Refusal::Unreadable(_)
        ));
    }

    #[test]
    fn disks_the_restore_places_itself_are_not_looked_at() {
        let xml = vm_xml("").replace("/pool/win11.qcow2", "/old/host/win11.qcow2");
        assert!(refused(&rules(), &xml).to_string().contains("disk vda"));
        let placed = Rules {
            placed_disks: vec!["vda".into()],
            ..rules()
        };
        placed.check_domain(&xml).unwrap();
    }
}
