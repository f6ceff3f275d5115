//! The fuzz corpora replayed (CI runs `cargo test`, not `cargo fuzz`), and the seeds of the
//! corpora: real files written with the real API, each of which the targets accept.

#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};

use super::*;
use crate::progress::Control;
use crate::store::manifest::{CheckpointKind, Consistency, Manifest, VmRef};
use crate::store::writer::NewCheckpoint;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Feeds every file of `core/fuzz/corpus/<target>/` and `core/fuzz/artifacts/<target>/`
/// (the crashes found, kept as regressions) to the target: none may panic (or hang).
fn replay(target: &str) {
    let body = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a target")
        .1;
    let mut replayed = 0;
    for folder in ["corpus", "artifacts"] {
        let dir = fuzz_dir().join(folder).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            assert_eq!(folder, "artifacts", "{} is missing", dir.display());
            continue;
        };
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| body(&bytes));
            assert!(outcome.is_ok(), "{} panics", file.display());
            replayed += 1;
        }
    }
    assert!(replayed >= 5, "{target}: only {replayed} inputs to replay");
}

#[test]
fn the_store_header_corpus_replays_cleanly() {
    replay("store_header");
}

#[test]
fn the_manifest_corpus_replays_cleanly() {
    replay("manifest");
}

#[test]
fn the_index_page_corpus_replays_cleanly() {
    replay("index_page");
}

#[test]
fn the_chunk_corpus_replays_cleanly() {
    replay("chunk");
}

#[test]
fn the_config_corpus_replays_cleanly() {
    replay("config");
}

#[test]
fn the_domain_xml_corpus_replays_cleanly() {
    replay("domain_xml");
}

/// Every seed goes all the way through its target: the fuzzer starts from inputs that
/// pass the first checks (and the fixed header still opens, the manifests still validate).
#[test]
fn every_seed_is_accepted() {
    let seeds = seeds();
    for (target, _) in TARGETS {
        assert!(
            seeds.iter().filter(|s| s.0 == target).count() >= 2,
            "{target} has seeds"
        );
    }
    for (target, name, bytes) in &seeds {
        let body = TARGETS.iter().find(|(t, _)| t == target).unwrap().1;
        assert!(body(bytes), "seed {target}/{name} is refused");
    }
}

/// Small changes to good inputs are refused, not accepted (the targets see what they
/// should) and do not panic.
#[test]
fn damaged_seeds_are_refused() {
    for (target, name, bytes) in seeds() {
        let body = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
        if target == "chunk" {
            // A whole read (not a partial one) finds a flipped bit anywhere.
            let mut bad = bytes.clone();
            *bad.last_mut().unwrap() ^= 0x40;
            assert!(
                bytes[0] & CHUNK_OP == 1 || !body(&bad),
                "{name}: a flipped bit in the file"
            );
            let mut bad = bytes.clone();
            bad[1] ^= 1;
            let named_by_tree = bytes[0] & CHUNK_ID_FROM_TREE != 0;
            assert!(
                bytes[0] & CHUNK_OP == 3 || named_by_tree || !body(&bad),
                "{name}: another name"
            );
        }
        if target == "manifest" {
            assert!(!body(&bytes[..bytes.len() - 2]), "{name}: cut short");
        }
    }
}

/// Writes the seeds into the corpus folders (run by hand: `cargo test -p rewind-core --
/// --ignored write_fuzz_seeds`); `cargo fuzz cmin` later renames what it keeps.
#[test]
#[ignore = "writes the fuzz corpora's seeds into the source tree"]
fn write_fuzz_seeds() {
    for (target, name, bytes) in seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}

/// `(target, name, input)` for every seed.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let tmp = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    header_seeds(tmp.path(), &mut out);
    let stores = StoreSeeds::write(tmp.path());
    for (name, plain, encrypted) in &stores.manifests {
        out.push(("manifest", format!("{name}-plain"), prefixed(0, plain)));
        out.push((
            "manifest",
            format!("{name}-encrypted"),
            prefixed(1, encrypted),
        ));
        out.push((
            "manifest",
            format!("{name}-sealed-here"),
            prefixed(2, plain),
        ));
    }
    chunk_seeds(&stores, &mut out);
    index_seeds(&stores, &mut out);
    config_seeds(tmp.path(), &mut out);
    domain_xml_seeds(&mut out);
    out
}

fn prefixed(first: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend_from_slice(rest);
    out
}

fn header_seeds(tmp: &Path, out: &mut Vec<(&'static str, String, Vec<u8>)>) {
    out.push((
        "store_header",
        "fixed-encrypted".into(),
        FIXED_HEADER.into(),
    ));
    let plain = tmp.join("plain-header");
    Store::init(&plain, &InitOptions::default()).unwrap();
    let json = std::fs::read(plain.join(CONFIG_FILE)).unwrap();
    // A version 1 store with small chunks, as an older Rewind made it.
    let mut old: serde_json::Value = serde_json::from_slice(&json).unwrap();
    old["version"] = 1.into();
    old["chunk_size_bytes"] = (64 << 10).into();
    out.push(("store_header", "plain".into(), json));
    out.push((
        "store_header",
        "plain-version-1".into(),
        serde_json::to_vec_pretty(&old).unwrap(),
    ));
    // An encrypted store made now (with whatever this version writes into its header).
    let encrypted = tmp.join("encrypted-header");
    let options = InitOptions {
        passphrase: Some(zeroize::Zeroizing::new(PASSPHRASE.to_vec())),
        kdf_cost: KdfCost::FAST_FOR_TESTS,
        ..InitOptions::default()
    };
    Store::init(&encrypted, &options).unwrap();
    out.push((
        "store_header",
        "encrypted-now".into(),
        std::fs::read(encrypted.join(CONFIG_FILE)).unwrap(),
    ));
}

/// Two stores (unencrypted, and the fixed encrypted one) per kind of checkpoint, each
/// holding checkpoint [`CHECKPOINT_ID`] of VM [`VM_UUID`].
struct StoreSeeds {
    /// `(name, plain manifest file, encrypted manifest file)`.
    manifests: Vec<(&'static str, Vec<u8>, Vec<u8>)>,
    /// The disk-only checkpoint's stores: `(unencrypted, encrypted)`, and its manifests.
    disk_only: Vec<(PathBuf, Manifest, bool)>,
}

impl StoreSeeds {
    fn write(tmp: &Path) -> Self {
        let mut manifests = Vec::new();
        let mut disk_only = Vec::new();
        for kind in [CheckpointKind::Disk, CheckpointKind::Full] {
            let name = match kind {
                CheckpointKind::Disk => "disk-only",
                CheckpointKind::Full => "full-state",
            };
            let mut files = Vec::new();
            for encrypted in [false, true] {
                let root = tmp.join(format!("{name}-{encrypted}"));
                let store = if encrypted {
                    open_fixed_store(&root)
                } else {
                    Store::init(&root, &InitOptions::default()).unwrap()
                };
                let manifest = write_checkpoint(&store, kind, tmp);
                assert_eq!(manifest.id, CHECKPOINT_ID);
                let file = root
                    .join("manifests")
                    .join(VM_UUID.to_string())
                    .join(format!("{CHECKPOINT_ID}.manifest"));
                files.push(std::fs::read(file).unwrap());
                if kind == CheckpointKind::Disk {
                    disk_only.push((root, manifest, encrypted));
                }
            }
            let encrypted = files.pop().unwrap();
            let plain = files.pop().unwrap();
            manifests.push((name, plain, encrypted));
        }
        Self {
            manifests,
            disk_only,
        }
    }
}

use crate::store::tests::noise;

fn text(len: usize) -> Vec<u8> {
    b"Rewind keeps checkpoints of virtual machines. "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// A checkpoint with chunks of every shape: a 1 MiB text slot (a tree, compressed piece by
/// piece), a hole, a 1 MiB slot of some noise and zeros, a 128 KiB noise slot (a tree,
/// stored as it is), a short text disk (compressed, no tree), NVRAM (noise, no tree), a TPM
/// folder blob, and for a full-state checkpoint a memory blob; a second disk of 130 slots,
/// mostly holes (a full index page and a short one).
fn write_checkpoint(store: &Store, kind: CheckpointKind, tmp: &Path) -> Manifest {
    const MIB: usize = 1 << 20;
    let control = Control::new();
    let full = kind == CheckpointKind::Full;
    let new = NewCheckpoint {
        vm: VmRef {
            name: "win11".into(),
            uuid: VM_UUID,
        },
        time: Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap(),
        kind,
        consistency: if full {
            Consistency::Application
        } else {
            Consistency::Crash
        },
        domain_xml: UEFI_DOMAIN.into(),
        parent: full.then(|| "20261201T110000.000Z".into()),
        full_reason: (!full).then(|| "the first checkpoint into this store".into()),
        consistency_note: full.then(|| "the guest agent froze C:\\ and D:\\".into()),
        labels: if full {
            vec!["safety".into(), "before-update".into()]
        } else {
            vec![]
        },
        libvirt_checkpoint: full.then(|| "rewind-1a2b3c4d-20261201T120000.000Z".into()),
    };
    let mut new_without_parent = new.clone();
    new_without_parent.parent = None;
    let mut writer = store
        .begin_checkpoint(new_without_parent, &control)
        .unwrap();
    let mut vda = writer
        .object_writer((3 * MIB + 128 * 1024) as u64, None)
        .unwrap();
    vda.put(0, &text(MIB)).unwrap();
    vda.put_hole(1).unwrap();
    let mut mixed = vec![0; MIB];
    mixed[..64 << 10].copy_from_slice(&noise(1, 64 << 10));
    vda.put(2, &mixed).unwrap();
    vda.put(3, &noise(2, 128 << 10)).unwrap();
    let vda = vda.finish().unwrap();
    writer
        .add_disk(
            "vda",
            Some("/var/lib/libvirt/images/win11.qcow2".into()),
            Some("qcow2".into()),
            vda,
        )
        .unwrap();
    let mut vdb = writer.object_writer(130 * MIB as u64, None).unwrap();
    for slot in [0, 5, 127, 129] {
        vdb.put(slot, &text(MIB)).unwrap();
    }
    let vdb = vdb.finish().unwrap();
    writer
        .add_disk("vdb", Some("/dev/vg/data".into()), Some("raw".into()), vdb)
        .unwrap();
    let mut sdb = writer.object_writer(5000, None).unwrap();
    sdb.put(0, &text(5000)).unwrap();
    let sdb = sdb.finish().unwrap();
    writer.add_disk("sdb", None, None, sdb).unwrap();
    writer.add_blob_bytes("nvram", &noise(3, 1000)).unwrap();
    let tpm = tmp.join(format!("tpm-{}", store.is_encrypted()));
    std::fs::create_dir_all(tpm.join("tpm2")).unwrap();
    std::fs::write(tpm.join("tpm2/tpm2-00.permall"), noise(4, 300)).unwrap();
    writer
        .add_blob_bytes("tpm", &crate::store::dirblob::pack(&tpm).unwrap())
        .unwrap();
    if full {
        let mut memory = save_image_head(UEFI_DOMAIN, 4096);
        memory.extend_from_slice(&noise(5, 10_000));
        writer.add_blob_bytes("memory", &memory).unwrap();
    }
    writer.add_read_bytes(3 * MIB as u64);
    let mut manifest = writer.commit(&control).unwrap();
    if full {
        // A parent recorded (informative only), as an incremental's manifest has it.
        manifest.parent = new.parent;
        let file = store
            .root()
            .join("manifests")
            .join(VM_UUID.to_string())
            .join(format!("{CHECKPOINT_ID}.manifest"));
        let json = serde_json::to_vec(&manifest).unwrap();
        let bytes = if store.is_encrypted() {
            seal_manifest(&json)
        } else {
            json
        };
        std::fs::write(file, bytes).unwrap();
    }
    manifest
}

/// The head of a libvirt save image as libvirt 9 writes one (`libvirt/save_image.rs`):
/// header, the XML, a cookie, padding.
fn save_image_head(xml: &str, pad: usize) -> Vec<u8> {
    let mut data = xml.as_bytes().to_vec();
    data.push(0);
    let cookie_at = data.len();
    data.extend_from_slice(b"<qemu-migration><name>win11</name></qemu-migration>");
    data.push(0);
    data.resize(data.len() + pad, 0);
    let mut out = b"LibvirtQemudSave".to_vec();
    for word in [2, data.len() as u32, 1, 0, cookie_at as u32]
        .into_iter()
        .chain([0; 14])
    {
        out.extend_from_slice(&word.to_ne_bytes());
    }
    out.extend_from_slice(&data);
    out
}

fn chunk_seeds(stores: &StoreSeeds, out: &mut Vec<(&'static str, String, Vec<u8>)>) {
    for (root, manifest, encrypted) in &stores.disk_only {
        let pages: BTreeSet<ChunkId> = manifest
            .indexes()
            .flat_map(|i| i.pages.iter().flatten().copied())
            .collect();
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("chunks"))
            .unwrap()
            .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let sealed = if *encrypted { CHUNK_ENCRYPTED } else { 0 };
        let what = if *encrypted { "encrypted" } else { "plain" };
        for path in files {
            let name = path.file_name().unwrap().to_str().unwrap();
            let id = ChunkId::from_hex(name).unwrap();
            let file = std::fs::read(&path).unwrap();
            let seed = |flags: u8, words: [u32; 4], file: &[u8]| {
                let mut seed = vec![flags];
                seed.extend_from_slice(&id.0);
                for w in words {
                    seed.extend_from_slice(&w.to_le_bytes());
                }
                seed.extend_from_slice(file);
                seed
            };
            let short = &name[..8];
            if pages.contains(&id) {
                out.push((
                    "chunk",
                    format!("{what}-page-{short}"),
                    seed(2 | sealed, [0; 4], &file),
                ));
                continue;
            }
            let plain_len = u32::from_le_bytes(file[8..12].try_into().unwrap());
            let tree = file[7] == 1;
            out.push((
                "chunk",
                format!("{what}-data-{short}"),
                seed(sealed, [0; 4], &file),
            ));
            // Two ranges in different pieces (one piece only in a short chunk).
            let (a, c) = if plain_len > 128 << 10 {
                (70_000, 900_000)
            } else {
                (10, plain_len / 2)
            };
            out.push((
                "chunk",
                format!("{what}-ranges-{short}"),
                seed(1 | sealed, [a, 100, c, 20], &file),
            ));
            let len = file.len() as u32;
            out.push((
                "chunk",
                format!("{what}-header-{short}"),
                seed(3 | sealed, [len, 0, 0, 0], &file[..chunk::HEADER_BYTES]),
            ));
            if tree && !*encrypted {
                let mut named_by_tree = seed(1 | CHUNK_ID_FROM_TREE, [a, 1, 0, 0], &file);
                named_by_tree[1..33].fill(0);
                out.push(("chunk", format!("tree-named-{short}"), named_by_tree));
            }
        }
    }
}

fn index_seeds(stores: &StoreSeeds, out: &mut Vec<(&'static str, String, Vec<u8>)>) {
    let (root, manifest, _) = stores
        .disk_only
        .iter()
        .find(|s| !s.2)
        .expect("an unencrypted store");
    let store = Store::open(root, None).unwrap();
    let objects = manifest
        .disks
        .iter()
        .map(|d| (&d.target, &d.index))
        .chain(manifest.blobs.iter().map(|b| (&b.name, &b.index)));
    for (name, index) in objects {
        for page in 0..index.page_count() {
            if index.pages[page as usize].is_none() {
                continue;
            }
            let entries = store.read_page(index, page).unwrap();
            let mut seed = vec![4]; // 64 KiB << 4: 1 MiB chunks
            seed.extend_from_slice(&index.size_bytes.to_le_bytes());
            seed.extend_from_slice(&page.to_le_bytes());
            seed.extend_from_slice(&index::encode_page(&entries));
            out.push(("index_page", format!("{name}-page-{page}"), seed));
        }
    }
}

fn config_seeds(tmp: &Path, out: &mut Vec<(&'static str, String, Vec<u8>)>) {
    let documented = r#"(
    uri: "qemu:///system",
    destinations: [
        (name: "usb", location: "/media/me/backup/rewind", store_id: Some("6a1f0c2e-9d4b-4e77-8a35-1b2c3d4e5f60")),
    ],
    vms: [
        (vm: "win11", destinations: ["usb"], interval_secs: 900,
         keep: (last: 4, hourly: 24, daily: 7, weekly: 4, monthly: 6, yearly: 0)),
    ],
)
"#;
    let everything = r#"// Rewind's configuration
(
    uri: "qemu+ssh://root@host/system",
    destinations: [
        (name: "usb", location: "/media/me/backup/rewind", store_id: Some("6a1f0c2e-9d4b-4e77-8a35-1b2c3d4e5f60"), passphrase_file: Some("/etc/rewind/keys/usb")),
        (name: "nas", location: "ssh://backup@nas:2222/srv/rewind"),
    ],
    vms: [
        (vm: "Büro \"Win 11\"", uuid: Some("11111111-2222-3333-4444-555555555555"), destinations: ["usb", "nas"],
         interval_secs: 3600, activity_bytes: Some(1073741824), kind: disk, full_state_every_secs: Some(86400),
         quiesce: false, stale_after_secs: Some(172800), paused: true,
         keep: (last: 1, hourly: 0, daily: 7, weekly: 0, monthly: 0, yearly: 3)),
        (vm: "db", destinations: ["nas"], kind: full),
    ],
    paused: false,
    paused_until: Some("2026-12-04T15:40:00Z"),
    max_concurrent_jobs: 2,
    watch_paths: ["/srv/drives", "/mnt/usb"],
    notifications: (on_failure: true, on_stale: false, on_success: true),
    shutdown_timeout_secs: 30,
)
"#;
    out.push(("config", "documented".into(), documented.into()));
    out.push(("config", "everything".into(), everything.into()));
    out.push(("config", "empty".into(), "()".into()));
    // What Rewind writes itself.
    let path = tmp.join("config.ron");
    Config::parse(everything, &path)
        .unwrap()
        .save(&path)
        .unwrap();
    out.push(("config", "saved".into(), std::fs::read(&path).unwrap()));
    Config::default().save(&path).unwrap();
    out.push((
        "config",
        "default-saved".into(),
        std::fs::read(&path).unwrap(),
    ));
}

/// A UEFI VM with a TPM, disks of three kinds, a network card, logs and the guest agent,
/// as libvirt shows a running one.
const UEFI_DOMAIN: &str = r#"<domain type='kvm' id='3'>
  <name>win11</name>
  <uuid>6a1f0c2e-9d4b-4e77-8a35-1b2c3d4e5f60</uuid>
  <metadata>
    <rwt:harness xmlns:rwt="https://rewind.invalid/test-harness/1" pid="4242"/>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/win11_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/><smm state='on'/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/win11.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/data'/>
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
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/vm/win11-console.log'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <log file='/var/log/vm/win11.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/3-win11/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0'>
        <encryption secret='0b5c4e2a-1111-2222-3333-444455556666'/>
      </backend>
    </tpm>
  </devices>
</domain>
"#;

/// A small BIOS VM without a UEFI variable store, as `virsh dumpxml --inactive` shows it.
const BIOS_DOMAIN: &str = "<domain type='qemu'>\n  <name>tiny &amp; old</name>\n  \
<uuid>11111111-2222-3333-4444-555555555555</uuid>\n  <memory>131072</memory>\n  \
<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>\n  \
<devices>\n    <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
<source file='/var/lib/libvirt/images/tiny.raw'/><target dev='hda' bus='ide'/></disk>\n    \
<disk type='file' device='floppy'><source file='/tmp/boot.img'/><target dev='fda'/></disk>\n    \
<interface type='user'><mac address='52:54:00:00:00:01'/></interface>\n  \
</devices>\n</domain>\n";

fn domain_xml_seeds(out: &mut Vec<(&'static str, String, Vec<u8>)>) {
    for (name, xml) in [("uefi", UEFI_DOMAIN), ("bios", BIOS_DOMAIN)] {
        for flags in [0u8, 0b0000_1111, 0b0111_0100, 0b0011_0011] {
            out.push((
                "domain_xml",
                format!("{name}-{flags:02x}"),
                prefixed(flags, xml.as_bytes()),
            ));
        }
    }
    out.push((
        "domain_xml",
        "save-image-uefi".into(),
        prefixed(0b1000_0001, &save_image_head(UEFI_DOMAIN, 4096)),
    ));
}
