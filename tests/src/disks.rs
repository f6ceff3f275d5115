//! Test disks made with the real tools, without mounting anything.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::package::run_ok;

/// A GPT disk image `linux.raw` of `mib` MiB in `dir` (replaced if there), whose one
/// partition ("Linux", from sector 2048) holds an ext4 file system labelled "linux" with
/// the files of `src`: made by sgdisk and `mkfs.ext4 -d`.
///
/// # Panics
/// A tool is missing or fails.
#[must_use]
pub fn ext4_gpt(dir: &Path, src: &Path, mib: u64) -> PathBuf {
    let disk = dir.join("linux.raw");
    if disk.exists() {
        std::fs::remove_file(&disk).expect("remove the old disk image");
    }
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(mib << 20))
        .expect("make the disk image");
    run_ok(
        "sgdisk",
        Command::new("sgdisk")
            .args([
                "--new=1:2048:0",
                "--typecode=1:8300",
                "--change-name=1:Linux",
            ])
            .arg(&disk),
    );
    run_ok(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", "linux", "-E", "offset=1048576", "-d"])
            .arg(src)
            .arg(&disk)
            .arg(format!("{}M", mib - 2)),
    );
    disk
}
