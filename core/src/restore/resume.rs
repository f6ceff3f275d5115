//! Resuming a VM from a full-state checkpoint's saved memory instead of booting it: in
//! place, as a copy beside the original, or on another host.
//!
//! Everything a resume needs is made sure of before the restore touches the VM, and any
//! shortfall is a [`RestoreError::CannotResume`] that changed nothing — the same checkpoint
//! can then still be restored disks-only, which boots the VM:
//!
//! 1. [`check`], cheap (the window runs it when its restore dialog opens): the checkpoint's
//!    image is whole as far as the store knows (no chunk that `verify` found damaged), its
//!    head is libvirt's save format and holds a readable definition, and the libvirt host
//!    has what that definition needs — its machine type, and on this machine the QEMU
//!    binary, the UEFI firmware file and swtpm; an encrypted TPM state's secret anywhere.
//! 2. [`stage`]: room for the image beside the VM's storage (never in `/tmp`, see
//!    [`crate::staging`]) or in the storage pool on another host; the whole image written
//!    there with every chunk checked against its hash; libvirt reads its head back.
//!
//! A copy beside the original gets its own name and UUID written into the staged image's
//! head ([`crate::libvirt::save_image`]); its network cards keep the original's MAC
//! addresses, which the running guest knows, but start unplugged (`<link state='down'/>`)
//! so that the two do not clash on the network. Its persistent definition has new
//! addresses, which it takes at its next boot.

use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::RestoreError;
use crate::checkpoint::MEMORY_BLOB;
use crate::cleanup::OrWarn as _;
use crate::libvirt::Hypervisor;
use crate::libvirt::save_image::{SaveImageError, SaveImageHead};
use crate::progress::{Control, Phase};
use crate::staging::Staging;
use crate::store::{Manifest, ObjectIndex, Store, StoreError};

/// Where the saved memory is written out for libvirt to resume from.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// A private folder in this folder of this machine (the VM's disk folder).
    Beside(&'a Path),
    /// A volume in this storage pool of the libvirt host.
    Pool(&'a str),
}

/// A name and UUID for the resumed VM other than the saved ones.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// The VM's name.
    pub name: &'a str,
    /// Its UUID; `None` keeps the saved one (a VM renamed since the checkpoint).
    pub uuid: Option<&'a str>,
}

fn cannot(m: &Manifest, vm: &str, reason: impl Into<String>) -> RestoreError {
    RestoreError::CannotResume {
        id: m.id.clone(),
        vm: vm.to_owned(),
        reason: reason.into(),
    }
}

/// The saved memory of checkpoint `m`, if it is a full-state checkpoint.
fn memory_index(m: &Manifest) -> Option<&ObjectIndex> {
    m.blobs
        .iter()
        .find(|b| b.name == MEMORY_BLOB)
        .map(|b| &b.index)
}

/// Reads the head of the saved image from the store.
fn read_head(store: &Store, index: &ObjectIndex) -> Result<SaveImageHead, HeadError> {
    let mut reader = store.object_reader(index)?;
    let mut bytes = Vec::new();
    let mut slot = 0;
    loop {
        let needed = match SaveImageHead::len_from(&bytes) {
            Ok(len) => len,
            Err(SaveImageError::TooShort) => crate::libvirt::save_image::HEADER_LEN,
            Err(e) => return Err(e.into()),
        };
        if bytes.len() >= needed {
            return Ok(SaveImageHead::parse(&bytes)?);
        }
        if slot == reader.chunk_count() {
            return Err(SaveImageError::CutShort.into());
        }
        bytes.extend_from_slice(&reader.read(slot)?);
        slot += 1;
    }
}

/// Why the head of a saved image could not be read from the store.
#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error(transparent)]
    Image(#[from] SaveImageError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What the libvirt host lacks to run `xml` (the definition in a saved image), if anything.
fn host_lacks(hv: &Hypervisor, xml: &str) -> Option<String> {
    let doc = match roxmltree::Document::parse(xml) {
        Ok(d) => d,
        Err(e) => return Some(format!("the definition saved with it is unreadable: {e}")),
    };
    let root = doc.root_element();
    let find = |tag: &str| root.descendants().find(|n| n.has_tag_name(tag));
    let text = |tag: &str| find(tag).and_then(|n| n.text()).map(str::trim);
    if let Some(os_type) = find("os").and_then(|os| os.children().find(|n| n.has_tag_name("type")))
        && let (Some(arch), Some(machine)) =
            (os_type.attribute("arch"), os_type.attribute("machine"))
        && let Some(why) = hv.cannot_run(arch, machine, root.attribute("type").unwrap_or("kvm"))
    {
        return Some(why);
    }
    if hv.is_local() {
        for (tag, what) in [("emulator", "QEMU program"), ("loader", "UEFI firmware")] {
            if let Some(path) = text(tag)
                && !Path::new(path).exists()
            {
                return Some(format!(
                    "this machine has no {what} {path}, which the saved VM ran on"
                ));
            }
        }
    }
    let tpm_backend = find("tpm")
        .and_then(|t| t.children().find(|n| n.has_tag_name("backend")))
        .filter(|b| b.attribute("type") == Some("emulator"));
    if let Some(backend) = tpm_backend {
        if hv.is_local() && !on_path("swtpm") {
            return Some(
                "swtpm, which emulates the VM's TPM, is not installed on this machine (install the swtpm package)".into(),
            );
        }
        if let Some(secret) = backend
            .children()
            .find(|n| n.has_tag_name("encryption"))
            .and_then(|e| e.attribute("secret"))
            && !hv.has_secret(secret)
        {
            return Some(format!(
                "the VM's TPM state is encrypted with libvirt secret {secret}, which {} does not have (define it there with the same value: virsh secret-define, secret-set-value)",
                hv.uri()
            ));
        }
    }
    None
}

/// Whether a program of this name is in one of `$PATH`'s folders.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Whether checkpoint `m` can resume the VM `vm` on the host of `hv`, as far as can be told
/// without reading the whole image: the image's head (`None` for a disk-only checkpoint), or
/// [`RestoreError::CannotResume`] saying why not.
pub fn check(
    hv: &Hypervisor,
    store: &Store,
    m: &Manifest,
    vm: &str,
) -> Result<Option<SaveImageHead>, RestoreError> {
    let Some(index) = memory_index(m) else {
        return Ok(None);
    };
    let known_damage = store.unhealed_damage(m)?;
    let mut reader = store.object_reader(index)?;
    for slot in (0..reader.chunk_count()).filter(|_| !known_damage.is_empty()) {
        let id = reader.entry(slot)?;
        if known_damage.contains(&id) {
            return Err(cannot(
                m,
                vm,
                format!(
                    "chunk {} of its saved memory is damaged in the store (found by verify)",
                    id.to_hex()
                ),
            ));
        }
    }
    let head = read_head(store, index)
        .map_err(|e| cannot(m, vm, format!("its saved memory cannot be used: {e}")))?;
    if let Some(why) = host_lacks(hv, head.xml()) {
        return Err(cannot(m, vm, why));
    }
    Ok(Some(head))
}

/// The checkpoint's saved memory, written out for libvirt and checked; removed when
/// dropped.
pub struct Staged<'a> {
    hv: &'a Hypervisor,
    /// The image, on the libvirt host.
    pub path: PathBuf,
    /// The definition it holds (with the new identity, if one was given).
    pub xml: String,
    /// For a restore in place: the definition to resume with instead of the one it holds,
    /// when that had to be made safe ([`super::confine`]).
    pub resume_xml: Option<String>,
    /// What was changed to make it safe, in words.
    pub made_safe: Vec<String>,
    held: Held,
}

impl std::fmt::Debug for Staged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

enum Held {
    Folder(#[allow(dead_code)] Staging),
    Volume { pool: String, name: String },
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if let Held::Volume { pool, name } = &self.held {
            self.hv.delete_volume(pool, name).or_warn(format_args!(
                "delete the staged memory image {name:?} in pool {pool:?}"
            ));
        }
    }
}

/// Stages the saved memory of checkpoint `m` at `place` for a resume of VM `vm` (see the
/// module documentation): `None` for a disk-only checkpoint. `confine` checks the
/// definition saved with it, which comes from the store too, before anything is written
/// ([`super::confine`]), and returns it made safe.
#[allow(clippy::too_many_arguments)] // the one call's context, spelled out
pub fn stage<'a>(
    hv: &'a Hypervisor,
    store: &Store,
    m: &Manifest,
    vm: &str,
    place: Place<'_>,
    identity: Option<Identity<'_>>,
    confine: &dyn Fn(&str) -> Result<super::confine::domain::Safe, RestoreError>,
    control: &Control,
) -> Result<Option<Staged<'a>>, RestoreError> {
    let Some(saved) = check(hv, store, m, vm)? else {
        return Ok(None);
    };
    let index = memory_index(m).expect("checked: a full-state checkpoint");
    let (xml, new_head) = match identity {
        None => (saved.xml().to_owned(), None),
        Some(id) => {
            let xml = super::domain_xml::rewrite(
                saved.xml(),
                &super::domain_xml::Rewrite {
                    name: Some(id.name.to_owned()),
                    uuid: id.uuid.map(str::to_owned),
                    ..super::domain_xml::Rewrite::default()
                },
            )
            .map_err(|e| {
                cannot(
                    m,
                    vm,
                    format!("its saved definition cannot be renamed: {e}"),
                )
            })?;
            let bytes = saved
                .with_xml(&xml)
                .map_err(|e| cannot(m, vm, format!("its saved memory cannot be renamed: {e}")))?;
            (xml, Some(bytes))
        }
    };
    let safe = confine(&xml)?;
    let resume_xml = (safe.xml != xml).then_some(safe.xml);
    control.start_phase(Phase::ReadingMemory);
    let written = match place {
        Place::Beside(dir) => write_beside(store, m, vm, index, dir, new_head.as_deref(), control),
        Place::Pool(pool) => {
            write_to_pool(hv, store, m, vm, index, pool, new_head.as_deref(), control)
        }
    };
    let (path, held) = written.map_err(|e| match e {
        RestoreError::Store(StoreError::Cancelled) => RestoreError::Cancelled,
        RestoreError::Store(e) => cannot(
            m,
            vm,
            format!("its saved memory cannot be read back whole: {e}"),
        ),
        other => other,
    })?;
    let staged = Staged {
        hv,
        path,
        xml,
        resume_xml,
        made_safe: safe.changes,
        held,
    };
    hv.saved_state_xml(&staged.path).map_err(|e| {
        cannot(
            m,
            vm,
            format!("libvirt does not take its saved memory: {e}"),
        )
    })?;
    Ok(Some(staged))
}

/// Writes the image into a new private folder in `dir`.
fn write_beside(
    store: &Store,
    m: &Manifest,
    vm: &str,
    index: &ObjectIndex,
    dir: &Path,
    head: Option<&[u8]>,
    control: &Control,
) -> Result<(PathBuf, Held), RestoreError> {
    let staging = Staging::new(
        dir,
        index.size_bytes,
        &format!("write out the saved memory of VM {vm:?}"),
        None,
    )
    .map_err(|e| cannot(m, vm, e.to_string()))?;
    let path = staging.path().join("memory.save");
    let failed = |e: std::io::Error| RestoreError::Write {
        path: path.clone(),
        detail: e.to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(failed)?;
    store.object_reader(index)?.write_to_file(&file, control)?;
    if let Some(bytes) = head {
        file.write_all_at(bytes, 0).map_err(failed)?;
    }
    Ok((path, Held::Folder(staging)))
}

/// Uploads the image into a new volume of storage pool `pool`, after checking its room.
#[allow(clippy::too_many_arguments)] // the one call's context, spelled out
fn write_to_pool(
    hv: &Hypervisor,
    store: &Store,
    m: &Manifest,
    vm: &str,
    index: &ObjectIndex,
    pool: &str,
    head: Option<&[u8]>,
    control: &Control,
) -> Result<(PathBuf, Held), RestoreError> {
    let available = hv.pool_available_bytes(pool)?;
    let needed = index
        .size_bytes
        .saturating_add(crate::staging::RESERVE_BYTES);
    if available < needed {
        return Err(cannot(
            m,
            vm,
            format!(
                "storage pool {pool:?} on {} has {} free, and the saved memory needs {} plus {} left free; free up space there",
                hv.uri(),
                crate::units::human_bytes(available),
                crate::units::human_bytes(index.size_bytes),
                crate::units::human_bytes(crate::staging::RESERVE_BYTES)
            ),
        ));
    }
    let name = format!(
        "rewind-memory-{}-{}.save",
        m.vm.uuid.simple(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let path = upload(hv, store, index, pool, &name, head, control)?;
    Ok((
        path,
        Held::Volume {
            pool: pool.to_owned(),
            name,
        },
    ))
}

/// Uploads the saved image into a new volume, `head` written over its first bytes.
fn upload(
    hv: &Hypervisor,
    store: &Store,
    index: &ObjectIndex,
    pool: &str,
    name: &str,
    head: Option<&[u8]>,
    control: &Control,
) -> Result<PathBuf, RestoreError> {
    control.add_total_bytes(index.size_bytes);
    let mut failure = None;
    let uploaded = hv.create_volume_with(
        pool,
        name,
        "raw",
        index.size_bytes,
        control,
        &mut |writer| {
            let mut send = || -> Result<(), RestoreError> {
                let mut reader = store.object_reader(index)?;
                let mut at = 0usize;
                for slot in 0..reader.chunk_count() {
                    let mut data = reader.read(slot)?;
                    if let Some(head) = head
                        && at < head.len()
                    {
                        let n = (head.len() - at).min(data.len());
                        data[..n].copy_from_slice(&head[at..at + n]);
                    }
                    at += data.len();
                    writer.write(&data)?;
                }
                Ok(())
            };
            send().map_err(|e| match e {
                RestoreError::Libvirt(e) => e,
                other => {
                    let message = other.to_string();
                    failure = Some(other);
                    crate::Error::Invalid(message)
                }
            })
        },
    );
    uploaded.map_err(|e| failure.take().unwrap_or(RestoreError::Libvirt(e)))
}
