//! The qcow2 image format, as far as Rewind needs it: [`read`] follows a shut-off VM's
//! backing chain and reads an image's size from its header; [`write`] lays out the
//! metadata of a new image whose data clusters Rewind writes itself. Both follow QEMU's
//! `docs/interop/qcow2.txt`.

pub mod read;
pub mod write;

/// The first four bytes of every qcow2 image: `QFI\xfb`.
const MAGIC: u32 = 0x5146_49fb;
