//! Entry points for the fuzz targets in `core/fuzz` (feature `fuzzing`), and the tests that
//! replay their corpora on every `cargo test`.
//!
//! A store may come from anyone (a USB stick, a NAS), and Rewind reads it as root, so every
//! parser of what a store holds must answer with a value or an error, never a panic or a
//! hang. Each function here is one fuzz target's body: it takes the fuzzer's bytes, drives
//! the crate's own parsing code with them (through the same calls the rest of Rewind makes,
//! files included where the real code reads files), and says whether the input was accepted
//! all the way (so that tests can check that the seeds get past the first checks). The
//! layout of each input is documented on its function; `core/fuzz/README.md` says how to
//! run the targets.
//!
//! Encrypted stores use one fixed header ([`FIXED_HEADER`]) whose key is wrapped with
//! [`PASSPHRASE`], so that encrypted seeds keep authenticating from one run to the next.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use uuid::Uuid;

use crate::config::Config;
use crate::libvirt::save_image::SaveImageHead;
use crate::libvirt::xml::parse_domain;
use crate::restore::confine::{Reference, Rules};
use crate::restore::domain_xml::{DiskPlace, Rewrite, rewrite};
use crate::store::chunk::{self, ChunkId, ChunkKind, PIECE_BYTES};
use crate::store::config::{CONFIG_FILE, StoreConfig};
use crate::store::crypto::{EncryptionConfig, KdfCost, Keys};
use crate::store::index::{self, MAX_OBJECT_BYTES, ObjectIndex};
use crate::store::{InitOptions, Store};

/// A fuzz target's body: takes the fuzzer's bytes, says whether they were accepted.
pub type Target = fn(&[u8]) -> bool;

/// The fuzz targets: name (as in `core/fuzz/fuzz_targets/` and `core/fuzz/corpus/`) and body.
pub const TARGETS: [(&str, Target); 6] = [
    ("store_header", store_header),
    ("manifest", manifest),
    ("index_page", index_page),
    ("chunk", chunk),
    ("config", config),
    ("domain_xml", domain_xml),
];

/// The passphrase of [`FIXED_HEADER`]'s store.
pub const PASSPHRASE: &[u8] = b"fuzzing passphrase";

/// `rewind-store.json` of an encrypted store (written by [`Store::init`] with [`PASSPHRASE`]
/// and [`KdfCost::FAST_FOR_TESTS`] once, and kept), so that its key is the same in every
/// run: the encrypted seeds were sealed with it. It has no header MAC, as a store made
/// before headers had one (the MAC depends on the header's fields, which may grow).
pub const FIXED_HEADER: &str = r#"{
  "format": "rewind-store",
  "version": 2,
  "id": "7654cd10-2d58-45ec-9e1a-f363ba94cd5a",
  "created": "2026-12-05T03:03:56.923205120Z",
  "chunk_size_bytes": 1048576,
  "encryption": {
    "cipher": "xchacha20poly1305",
    "kdf": "argon2id",
    "kdf_memory_kib": 64,
    "kdf_iterations": 1,
    "kdf_parallelism": 1,
    "salt_hex": "cd06496a4093d295587c8deb76d5ceeb",
    "wrapped_key_hex": "61557442182192f4745b8a8de71d8e5c0c602c248245335a5608a54d6b5315007988c826e82f1fb8f735e21b789a13b13b88714918f7dc5bd60dc38fcb7de8de06b0b24287e28ec7cc45794f631236e5539f93668805c3fc812f149e0e4c83a2a36877a6c0387ce4"
  }
}
"#;

/// The VM whose manifests the `manifest` target reads.
pub const VM_UUID: Uuid = Uuid::from_u128(0x6a1f_0c2e_9d4b_4e77_8a35_1b2c_3d4e_5f60);
/// The checkpoint id of the manifest the `manifest` target reads.
pub const CHECKPOINT_ID: &str = "20261201T120000.000Z";

/// Flags of the first byte of a `chunk` input.
const CHUNK_OP: u8 = 0b11;
const CHUNK_ENCRYPTED: u8 = 0b100;
const CHUNK_ID_FROM_TREE: u8 = 0b1000;
/// Length of the head of a `chunk` input: flags, chunk id, four words.
const CHUNK_HEAD: usize = 1 + 32 + 16;

/// The store key of [`FIXED_HEADER`].
fn fixed_keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let config: StoreConfig =
            serde_json::from_str(FIXED_HEADER).expect("the fixed header is a store header");
        let encryption = config
            .encryption
            .expect("the fixed header is of an encrypted store");
        Keys::unwrap(&encryption, PASSPHRASE, config.id.as_bytes())
            .expect("the fixed header opens with its passphrase")
    })
}

/// Stores in a temporary folder, one set per thread (tests replay corpora on several
/// threads at once; each writes its own files).
struct Fixture {
    dir: tempfile::TempDir,
    /// A store folder whose `rewind-store.json` each `store_header` input replaces.
    header_store: PathBuf,
    /// An unencrypted store with the default chunk size.
    plain: Store,
    /// The store of [`FIXED_HEADER`], opened with [`PASSPHRASE`].
    encrypted: Store,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rewind-fuzz-")
            .tempdir()
            .expect("a temporary folder for the fuzz fixture");
        let header_store = dir.path().join("header");
        Store::init(&header_store, &InitOptions::default()).expect("a store for headers");
        let plain = Store::init(&dir.path().join("plain"), &InitOptions::default())
            .expect("an unencrypted store");
        let encrypted = open_fixed_store(&dir.path().join("encrypted"));
        Self {
            dir,
            header_store,
            plain,
            encrypted,
        }
    }
}

/// Makes a store at `root` with [`FIXED_HEADER`] as its header, and opens it.
fn open_fixed_store(root: &Path) -> Store {
    let options = InitOptions {
        passphrase: Some(zeroize::Zeroizing::new(PASSPHRASE.to_vec())),
        kdf_cost: KdfCost::FAST_FOR_TESTS,
        ..InitOptions::default()
    };
    drop(Store::init(root, &options).expect("an encrypted store"));
    std::fs::write(root.join(CONFIG_FILE), FIXED_HEADER).expect("the fixed header written");
    Store::open(root, Some(PASSPHRASE)).expect("the store of the fixed header opens")
}

fn with_fixture<T>(f: impl FnOnce(&Fixture) -> T) -> T {
    thread_local! {
        static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
    }
    FIXTURE.with(|cell| {
        let mut cell = cell.borrow_mut();
        f(cell.get_or_insert_with(Fixture::new))
    })
}

/// `rewind-store.json`: the input is the whole file. It is read as [`Store::probe`] reads
/// it, then opened as [`Store::open`] opens it (with [`PASSPHRASE`] if it says it is
/// encrypted). A key derivation costlier than a millisecond or so is not run as the file
/// asks (that is slow on purpose, and bounded by `crypto.rs`): the encryption settings
/// then go to [`Keys::unwrap`] with the cost lowered, so that everything else in them is
/// still checked.
#[must_use]
pub fn store_header(data: &[u8]) -> bool {
    with_fixture(|f| {
        let root = &f.header_store;
        std::fs::write(root.join(CONFIG_FILE), data).expect("the header written");
        let Ok(config) = StoreConfig::read(root) else {
            return false;
        };
        match &config.encryption {
            None => {
                // A passphrase for a store that says it is not encrypted is refused or
                // ignored (depending on the version), never a panic.
                std::hint::black_box(Store::open(root, Some(PASSPHRASE)).is_ok());
                Store::open(root, None).is_ok()
            }
            Some(encryption) if cheap(encryption) => {
                std::hint::black_box(Store::open(root, None).is_ok());
                Store::open(root, Some(PASSPHRASE)).is_ok()
            }
            Some(encryption) => {
                let mut cheaper = encryption.clone();
                cheaper.kdf_memory_kib = cheaper.kdf_memory_kib.min(256);
                cheaper.kdf_iterations = cheaper.kdf_iterations.min(2);
                cheaper.kdf_parallelism = cheaper.kdf_parallelism.min(8);
                Keys::unwrap(&cheaper, PASSPHRASE, config.id.as_bytes()).is_ok()
            }
        }
    })
}

/// Whether the key derivation `encryption` asks for is quick, or refused before it runs
/// (out of the bounds `crypto.rs` sets).
fn cheap(encryption: &EncryptionConfig) -> bool {
    let (memory, iterations, lanes) = (
        u64::from(encryption.kdf_memory_kib),
        u64::from(encryption.kdf_iterations),
        u64::from(encryption.kdf_parallelism),
    );
    let quick = memory * iterations.max(1) <= 512 && lanes <= 8;
    let refused = memory > 4 << 20 || iterations > 100 || lanes > 64;
    quick || refused
}

/// A manifest file: the first byte says how it is read (modulo 3), the rest is the file.
///
/// - `0`: the file of checkpoint [`CHECKPOINT_ID`] of VM [`VM_UUID`] in an unencrypted
///   store;
/// - `1`: the same in the encrypted store of [`FIXED_HEADER`] (a real one starts with
///   `RWME` and must pass authentication);
/// - `2`: the rest is the plain JSON, sealed here with that store's key as Rewind seals a
///   manifest, so that the JSON behind the authentication is fuzzed too.
///
/// It is read with [`Store::manifest`] (the file, decryption, JSON, validation and the
/// check against the file's name) and with [`Store::vm_catalog`].
#[must_use]
pub fn manifest(data: &[u8]) -> bool {
    let Some((&mode, body)) = data.split_first() else {
        return false;
    };
    with_fixture(|f| {
        let (store, file) = match mode % 3 {
            0 => (&f.plain, body.to_vec()),
            1 => (&f.encrypted, body.to_vec()),
            _ => (&f.encrypted, seal_manifest(body)),
        };
        let dir = store
            .root()
            .join("manifests")
            .join(VM_UUID.hyphenated().to_string());
        std::fs::create_dir_all(&dir).expect("the VM's manifest folder");
        std::fs::write(dir.join(format!("{CHECKPOINT_ID}.manifest")), file)
            .expect("the manifest written");
        let read = store.manifest(&VM_UUID, CHECKPOINT_ID);
        let catalog = store.vm_catalog(&VM_UUID).expect("a local folder lists");
        assert_eq!(
            catalog.checkpoints.len() + catalog.unreadable.len(),
            1,
            "one manifest file, one entry in the catalog"
        );
        let Ok(manifest) = read else {
            return false;
        };
        assert_eq!(catalog.checkpoints.first(), Some(&manifest));
        // What a restore works out from every index before it reads a page.
        for index in manifest.indexes() {
            std::hint::black_box((index.page_count(), index.entries_in_page(0)));
        }
        true
    })
}

/// `RWME ‖ nonce ‖ ciphertext ‖ tag` of `json`, as the store of [`FIXED_HEADER`] writes
/// checkpoint [`CHECKPOINT_ID`] of VM [`VM_UUID`] (`FORMAT.md`, "Manifests").
fn seal_manifest(json: &[u8]) -> Vec<u8> {
    let aad = format!("rewind manifest {VM_UUID}/{CHECKPOINT_ID}");
    let mut out = b"RWME".to_vec();
    out.extend_from_slice(
        &fixed_keys()
            .seal(json, aad.as_bytes())
            .expect("random bytes for a nonce"),
    );
    out
}

/// An index page: `[chunk size: 1 byte][object size: u64 LE][page number: u64 LE][page]`.
///
/// The chunk size is 64 KiB shifted left by the first byte modulo 9 (64 KiB to 16 MiB, the
/// sizes a store may have); the page number is taken modulo the object's page count; the
/// page's bytes are decoded as [`Store::read_page`] decodes them, for as many entries as
/// that page of that object has.
#[must_use]
pub fn index_page(data: &[u8]) -> bool {
    let Some((head, page_bytes)) = data.split_at_checked(17) else {
        return false;
    };
    let word = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
    let index = ObjectIndex {
        size_bytes: word(1),
        chunk_size_bytes: (64 << 10) << (head[0] % 9),
        data_bytes: 0,
        pages: Vec::new(),
    };
    // `ObjectIndex::validate` refuses bigger objects before anything is read.
    if index.size_bytes > MAX_OBJECT_BYTES || index.page_count() == 0 {
        return false;
    }
    let page = word(9) % index.page_count();
    let entries = index.entries_in_page(page);
    let Ok(ids) = index::decode_page(page_bytes, entries) else {
        return false;
    };
    assert_eq!(ids.len() as u64, entries);
    for (k, id) in (0..).zip(&ids) {
        let slot = page * index::ENTRIES_PER_PAGE + k;
        assert!(index.chunk_len(slot) > 0, "every entry of a page is a slot");
        std::hint::black_box(*id == index::HOLE);
    }
    true
}

/// A chunk file and how it is read: `[flags: 1 byte][chunk id: 32 bytes][a, b, c, d: u32
/// LE each][file]`.
///
/// Flags: the low two bits choose the reading, bit 2 reads it as a chunk of the encrypted
/// store of [`FIXED_HEADER`], bit 3 names the chunk after the piece tree the file holds (if
/// it has one) instead of the id given, as whoever wrote the store could. Readings:
///
/// - `0`: [`chunk::decode`] of a data chunk (what restores and verify read);
/// - `1`: [`chunk::decode_ranges`] of the ranges `a..a+b` and `c..c+d` (a range of length 0
///   is left out);
/// - `2`: [`chunk::decode`] of an index page, then its entries as [`Store::read_page`]
///   decodes them;
/// - `3`: [`chunk::Header::parse`] of the file's start with `a | b << 32` as the file's
///   length (a quick verify, and dedup's check of an existing chunk); and the file read as
///   a patch (store format 3), every piece it holds decoded (with bit 3: named after the
///   content and base it names); and read whole as a flat copy of a patch over base `id`
///   (with bit 3: of the patch its prefix names).
#[must_use]
pub fn chunk(data: &[u8]) -> bool {
    let Some((head, file)) = data.split_at_checked(CHUNK_HEAD) else {
        return false;
    };
    let flags = head[0];
    let mut id = ChunkId(head[1..33].try_into().expect("32 bytes"));
    let word = |i: usize| {
        u64::from(u32::from_le_bytes(
            head[33 + 4 * i..37 + 4 * i].try_into().expect("4 bytes"),
        ))
    };
    let keys = (flags & CHUNK_ENCRYPTED != 0).then(fixed_keys);
    if flags & CHUNK_ID_FROM_TREE != 0
        && let Some(root) = tree_root_of(file)
    {
        id = root;
    }
    match flags & CHUNK_OP {
        0 => chunk::decode(file.to_vec(), ChunkKind::Data, &id, keys).is_ok(),
        1 => {
            let ranges: Vec<(u64, u64)> = [(word(0), word(1)), (word(2), word(3))]
                .into_iter()
                .filter(|&(_, len)| len > 0)
                .map(|(from, len)| (from, from + len))
                .collect();
            let mut out = Vec::new();
            let decoded =
                chunk::decode_ranges(file, file.len() as u64, &id, keys, &ranges, &mut out);
            if let Ok(partial) = decoded {
                assert!(
                    ranges.iter().all(|&(_, to)| to <= out.len() as u64),
                    "what was read is within the chunk"
                );
                std::hint::black_box(partial);
            }
            decoded.is_ok()
        }
        2 => chunk::decode(file.to_vec(), ChunkKind::IndexPage, &id, keys)
            .is_ok_and(|page| index::decode_page(&page, page.len() as u64 / 32).is_ok()),
        _ => {
            // A patch (store format 3), named after what it says it holds over what base
            // when asked, as whoever wrote the store could: parsed and every piece it
            // holds decoded and checked.
            if flags & CHUNK_ID_FROM_TREE != 0 && file.len() >= chunk::HEADER_BYTES + 64 {
                let at = chunk::HEADER_BYTES;
                id = crate::store::patch::name(
                    &ChunkId(file[at..at + 32].try_into().expect("32 bytes")),
                    &ChunkId(file[at + 32..at + 64].try_into().expect("32 bytes")),
                    keys,
                );
            }
            let patch = crate::store::patch::Patch::parse(file, &id, keys).and_then(|patch| {
                let mut out = vec![0; patch.content_len()];
                patch.read_pieces(&patch.held, &mut out).map(|_| ())
            });
            // And as a flat copy of a patch over base `id` (named after the content its
            // prefix names when asked).
            let named = flags & CHUNK_ID_FROM_TREE != 0;
            let flat = crate::store::flat::fuzz_flat(file, (!named).then_some(&id), &id, keys);
            chunk::Header::parse(file, word(0) | word(1) << 32).is_ok() || patch.is_ok() || flat
        }
    }
}

/// The id the piece tree at the start of a chunk file's payload adds up to, if the header
/// says it has one of a size one can have.
fn tree_root_of(file: &[u8]) -> Option<ChunkId> {
    let header = file.get(..chunk::HEADER_BYTES)?;
    let plain_len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if header[7] != 1 || !chunk::takes_tree(plain_len) || plain_len > chunk::MAX_CHUNK_BYTES {
        return None;
    }
    let pieces = plain_len / PIECE_BYTES;
    let tree: Vec<[u8; 32]> = file
        .get(chunk::HEADER_BYTES..chunk::HEADER_BYTES + 32 * pieces)?
        .chunks_exact(32)
        .map(|cv| cv.try_into().expect("exact chunks"))
        .collect();
    Some(chunk::tree_root(&tree, None))
}

/// `config.ron`: the input is the whole file. It is parsed and checked as Rewind loads it;
/// a configuration that loads is saved and loaded again (it must come back the same), and
/// what the scheduler and the window work out from it is worked out.
#[must_use]
pub fn config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let config = match Config::parse(text, Path::new("config.ron")) {
        Ok(config) => config,
        Err(e) => {
            std::hint::black_box(e.to_string());
            return false;
        }
    };
    std::hint::black_box((config.pause_text(), config.stop_mode()));
    for protection in &config.vms {
        std::hint::black_box(protection.stale_after());
        std::hint::black_box(config.protection(&protection.vm).is_some());
    }
    for destination in &config.destinations {
        std::hint::black_box(config.destination(&destination.name).is_some());
    }
    with_fixture(|f| {
        let path = f.dir.path().join("config.ron");
        config.save(&path).expect("a valid configuration saves");
        let again = Config::load(&path).expect("a saved configuration loads");
        assert_eq!(again, config, "a saved configuration loads as it was");
    });
    true
}

/// Domain XML from a store: `[flags: 1 byte][XML, or a libvirt save image's head]`.
///
/// The XML (invalid UTF-8 replaced: a manifest's `domain_xml` is a JSON string) is read as
/// a restore reads it ([`parse_domain`]) and rewritten as a restore rewrites it
/// ([`rewrite`]), with the changes the flags ask for: bit 0 a new name and UUID, bit 1 new
/// MAC addresses, bit 2 every disk (and `vda`) at a new path, bit 3 a new NVRAM path, bit
/// 4 logs renamed, bit 5 logs moved, bit 6 the emulator dropped, removable media ejected
/// and links down. A rewritten document must still be XML. It is then checked and made
/// safe as before libvirt defines it ([`Rules::check_domain`]; in place with the XML as the
/// VM's current definition, or, with bit 1, as a new VM), and what is made safe must still
/// be XML. With bit 7, the rest is the head of a save image (the `memory` blob of a
/// full-state checkpoint), whose XML is used, and the rewritten XML is put back into the
/// head as a resume on a copy does.
#[must_use]
pub fn domain_xml(data: &[u8]) -> bool {
    let Some((&flags, rest)) = data.split_first() else {
        return false;
    };
    let bit = |n: u8| flags & (1 << n) != 0;
    let (xml, head) = if bit(7) {
        match SaveImageHead::parse(rest) {
            Ok(head) => (head.xml().to_owned(), Some(head)),
            Err(e) => {
                std::hint::black_box(e.to_string());
                return false;
            }
        }
    } else {
        (String::from_utf8_lossy(rest).into_owned(), None)
    };
    let parsed = parse_domain(&xml);
    let (name, mut targets) = match &parsed {
        Ok(domain) => (
            domain.name.clone(),
            domain.disks.iter().map(|d| d.target.clone()).collect(),
        ),
        Err(e) => {
            std::hint::black_box(e.to_string());
            ("vm".to_owned(), Vec::new())
        }
    };
    targets.push("vda".to_owned());
    let new_name = "copy <of> 'the' \"vm\" & more";
    let changes = Rewrite {
        name: bit(0).then(|| new_name.to_owned()),
        uuid: bit(0).then(|| "99999999-8888-4777-8666-555555555555".to_owned()),
        new_macs: bit(1),
        disks: if bit(2) {
            targets
                .into_iter()
                .map(|target| DiskPlace {
                    path: PathBuf::from(format!("/restore/it's <{target}> & co.qcow2")),
                    target,
                    format: "qcow2".to_owned(),
                })
                .collect()
        } else {
            Vec::new()
        },
        nvram: bit(3).then(|| PathBuf::from("/var/lib/libvirt/qemu/nvram/copy's <VARS>.fd")),
        rename_logs: bit(4).then(|| (name, new_name.to_owned())),
        logs_dir: bit(5).then(|| PathBuf::from("/var/log/libvirt/qemu/&<new>")),
        drop_emulator: bit(6),
        eject_removable: bit(6),
        links_down: bit(6),
    };
    let Ok(out) = rewrite(&xml, &changes) else {
        return false;
    };
    if let Err(e) = roxmltree::Document::parse(&out) {
        panic!("the rewritten domain XML is not XML ({e}):\n{out}");
    }
    // Checked and made safe before libvirt defines it.
    let in_place = !bit(1);
    match rules(&out, in_place, &changes.disks).check_domain(&out) {
        Ok(safe) => {
            if let Err(e) = roxmltree::Document::parse(&safe.xml) {
                panic!("the domain XML made safe is not XML ({e}):\n{}", safe.xml);
            }
        }
        Err(refusal) => {
            std::hint::black_box(refusal.to_string());
        }
    }
    if let Some(head) = head {
        std::hint::black_box(head.with_xml(&out).is_ok());
    }
    parsed.is_ok()
}

/// What a restore of domain XML `xml` may touch on a host that is not this machine (so that
/// what the fuzzer's paths are here does not matter): in place, with `xml` itself as the
/// VM's current definition, or as a new VM whose disks are `placed`.
fn rules(xml: &str, in_place: bool, placed: &[DiskPlace]) -> Rules {
    let (name, uuid) = parse_domain(xml).map_or_else(
        |_| (String::new(), String::new()),
        |domain| (domain.name, domain.uuid),
    );
    let mut current = Reference::default();
    if in_place {
        current.add_xml(xml);
    }
    Rules {
        local: false,
        name,
        uuid,
        current,
        storage: vec!["/var/lib/libvirt/images".into(), "/restore".into()],
        nvram_dir: Some("/var/lib/libvirt/qemu/nvram".into()),
        swtpm_dir: Some("/var/lib/libvirt/swtpm".into()),
        firmware: vec![
            "/usr/share/OVMF/OVMF_CODE_4M.ms.fd".into(),
            "/usr/share/OVMF/OVMF_VARS_4M.ms.fd".into(),
        ],
        others: vec![(
            "/var/lib/libvirt/images/other.qcow2".into(),
            true,
            "other".into(),
        )],
        own_new: placed.iter().map(|p| p.path.clone()).collect(),
        placed_disks: Vec::new(),
    }
}

#[cfg(test)]
mod tests;
