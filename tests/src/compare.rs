//! What tests compare byte for byte: a disk image as the guest sees it, and a disk as a
//! checkpoint holds it.

use std::path::Path;
use std::process::Command;

use rewind_core::store::{Manifest, Store};

/// The guest-visible bytes of a disk image (also of a running VM's: `qemu-img -U`).
///
/// # Panics
/// `qemu-img` fails, or the scratch file beside the image cannot be used.
#[must_use]
pub fn image_bytes(path: &Path, format: &str) -> Vec<u8> {
    let raw = path.with_extension("compare.raw");
    drop(std::fs::remove_file(&raw));
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img convert {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&raw).expect("read the converted image");
    std::fs::remove_file(&raw).expect("remove the converted image");
    bytes
}

/// Disk `target` of checkpoint `m`, read back out of the store.
///
/// Checkpoint `id` of `store` (of any VM).
///
/// # Panics
/// The store cannot be read, or holds no such checkpoint.
#[must_use]
pub fn manifest(store: &Store, id: &str) -> Manifest {
    store
        .catalog()
        .unwrap()
        .checkpoints
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("no checkpoint {id} in {}", store.root().display()))
}

/// # Panics
/// The checkpoint has no such disk, or the store cannot give it back.
#[must_use]
pub fn checkpoint_bytes(store: &Store, m: &Manifest, target: &str) -> Vec<u8> {
    let disk = m
        .disks
        .iter()
        .find(|d| d.target == target)
        .unwrap_or_else(|| panic!("checkpoint {} has no disk {target}", m.id));
    store
        .object_reader(&disk.index)
        .and_then(|mut r| r.read_all())
        .unwrap_or_else(|e| panic!("read {target} of checkpoint {}: {e}", m.id))
}
