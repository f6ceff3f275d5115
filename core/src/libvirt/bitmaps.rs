//! Stale dirty bitmaps: persistent bitmaps named like Rewind's (`rewind-…`) that sit in a
//! qcow2 image although libvirt has no checkpoint for them — left when libvirt's checkpoint
//! metadata was lost (host reinstalled, VM redefined, a checkpoint deleted with
//! `--metadata`). Nothing can use them as a base any more, yet QEMU keeps updating each one
//! on every guest write and they pile up in the image. Rewind removes them: in a running VM
//! by redefining a libvirt checkpoint for the bitmap and deleting it (so libvirt, which owns
//! the VM's QEMU, removes the bitmap); in a shut-off VM with `qemu-img bitmap --remove`.
//!
//! A running VM's image header lists the bitmaps QEMU loaded when it started, so a bitmap
//! orphaned during the current run is found after the VM's next start.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use super::backup::xml_escape;
use super::{Hypervisor, ffi};
use crate::error::{Error, Result};

/// The names of the persistent bitmaps in the qcow2 image `path` (read with
/// `qemu-img info --force-share`, so also while the VM runs).
pub fn qcow2_bitmaps(path: &Path) -> Result<Vec<String>> {
    let out = Command::new("qemu-img")
        .args(["info", "--force-share", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .map_err(|e| {
            Error::Invalid(format!(
                "could not run qemu-img to list the bitmaps of {}: {e}; install qemu-utils",
                path.display()
            ))
        })?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "qemu-img could not read {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::Invalid(format!(
            "qemu-img info of {} is not JSON: {e}",
            path.display()
        ))
    })?;
    Ok(info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|b| b["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// The bitmaps among `present` (target, bitmap names) that are Rewind's and that libvirt
/// has no checkpoint for: bitmap name -> targets holding it.
#[must_use]
pub fn stale(present: &[(String, Vec<String>)], known: &[String]) -> Vec<(String, Vec<String>)> {
    let mut stale: Vec<(String, Vec<String>)> = Vec::new();
    for (target, names) in present {
        for name in names {
            if !name.starts_with("rewind-") || known.contains(name) {
                continue;
            }
            match stale.iter_mut().find(|(n, _)| n == name) {
                Some((_, targets)) => targets.push(target.clone()),
                None => stale.push((name.clone(), vec![target.clone()])),
            }
        }
    }
    stale
}

impl Hypervisor {
    /// Removes Rewind's stale bitmaps from VM `vm`'s qcow2 disks `disks` (target, image
    /// path); returns the names removed. `running` says how: through libvirt, or with
    /// `qemu-img` on the files of a shut-off VM.
    pub fn remove_stale_bitmaps(
        &self,
        vm: &str,
        disks: &[(String, &Path)],
        running: bool,
    ) -> Result<Vec<String>> {
        let mut present = Vec::new();
        for (target, path) in disks {
            present.push((target.clone(), qcow2_bitmaps(path)?));
        }
        let stale = stale(&present, &self.checkpoint_names(vm)?);
        for (name, targets) in &stale {
            if running {
                self.remove_bitmap_through_libvirt(vm, name, targets)?;
            } else {
                for (target, path) in disks {
                    if targets.contains(target) {
                        remove_with_qemu_img(path, name)?;
                    }
                }
            }
        }
        Ok(stale.into_iter().map(|(name, _)| name).collect())
    }

    fn remove_bitmap_through_libvirt(
        &self,
        vm: &str,
        name: &str,
        targets: &[String],
    ) -> Result<()> {
        let dom = self.lookup(vm)?;
        let escaped = xml_escape(name);
        let mut xml = format!(
            "<domaincheckpoint><name>{escaped}</name><creationTime>1</creationTime><disks>"
        );
        for target in targets {
            write!(
                xml,
                "<disk name='{}' checkpoint='bitmap' bitmap='{escaped}'/>",
                xml_escape(target)
            )
            .expect("writing to a String cannot fail");
        }
        xml.push_str("</disks></domaincheckpoint>");
        let what = format!("remove the stale bitmap {name:?} of VM {vm:?}");
        ffi::checkpoint_redefine(&dom, &xml).map_err(|e| self.libvirt_error(&what, &e))?;
        ffi::checkpoint_delete(&dom, name, false).map_err(|e| self.libvirt_error(&what, &e))
    }
}

fn remove_with_qemu_img(path: &Path, name: &str) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["bitmap", "--remove", "-f", "qcow2"])
        .arg(path)
        .arg(name)
        .output()
        .map_err(|e| Error::Invalid(format!("could not run qemu-img: {e}; install qemu-utils")))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "could not remove the stale bitmap {name:?} from {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rewinds_bitmaps_unknown_to_libvirt_are_stale() {
        let present = vec![
            (
                "vda".to_owned(),
                vec![
                    "rewind-aaaa-1".to_owned(),
                    "rewind-bbbb-2".to_owned(),
                    "someone-elses".to_owned(),
                ],
            ),
            ("vdb".to_owned(), vec!["rewind-aaaa-1".to_owned()]),
        ];
        let known = vec!["rewind-bbbb-2".to_owned()];
        assert_eq!(
            stale(&present, &known),
            vec![(
                "rewind-aaaa-1".to_owned(),
                vec!["vda".to_owned(), "vdb".to_owned()]
            )]
        );
    }
}
