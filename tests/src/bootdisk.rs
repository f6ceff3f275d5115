//! A disk the tiny guest boots from, like an installed system: for tests that need the
//! firmware to read the disk's boot sector (a boot-check must fail on a checkpoint whose
//! boot sector was zeroed, which a direct-kernel-boot guest never reads).
//!
//! [`build_boot_image`] makes, without mounting anything, a raw image that boots both with
//! a BIOS and with UEFI (Secure Boot included):
//! - an MBR: syslinux's `mbr.bin` in the first 440 bytes, then one active partition of type
//!   `0x0E` (FAT16, LBA) from [`PARTITION_START_BYTES`] to the end of the image;
//! - in that partition, a FAT16 file system (`mkfs.fat --offset`) holding the harness's
//!   `vmlinuz` and `initrd.img` (copied with `mcopy`) and two ways to load them:
//!   - BIOS: syslinux (`syslinux --install --offset`, which works on the image through
//!     mtools), started by `mbr.bin` from the active partition;
//!   - UEFI: the removable-media path `\EFI\BOOT\BOOTX64.EFI`, which is Debian's shim
//!     (signed by Microsoft's UEFI CA), with Debian's signed GRUB beside it as
//!     `grubx64.efi`. OVMF with Microsoft's keys enrolled (what libvirt picks for a
//!     Secure Boot VM) starts shim, shim checks GRUB against Debian's key, and GRUB checks
//!     the (Debian-signed) kernel through shim: the chain of an installed Debian. OVMF finds
//!     the FAT file system on an MBR partition as well as on a GPT one. Both come from
//!     [`EFI_PACKAGES`], fetched with `apt-get download` like the guest's kernel.
//!
//! It is cached under `<cache_root>/<key>/boot.img`; the key names the guest build (its
//! cache folder) and a hash of this builder, the syslinux files and the versions of the
//! [`EFI_PACKAGES`], so a new guest, syslinux, shim or GRUB makes a new image.
//!
//! [`install_boot_disk`] puts a copy on a test VM's disk, with a `syslinux.cfg` and an
//! `\EFI\BOOT\grub.cfg` that boot the kernel with the command line the direct-kernel-boot
//! domain would get: the image itself has no configuration, so one cached image serves
//! every workload.
//!
//! Under TCG, the guest was ready 5 to 11 s after the start with a BIOS (the firmware,
//! `SeaBIOS`, then syslinux, which reads the 24 MB through the BIOS), a few seconds more
//! than direct kernel boot, and 18 to 25 s after it with UEFI. A guest with a zeroed boot sector stops in the firmware, which prints
//! `Boot failed: not a bootable disk` and `No bootable device.` on the
//! serial console when the domain has `<bios useserial='yes'/>`. With UEFI, zeroing the
//! first sector takes the partition table with it, so OVMF finds no file system: it prints
//! `BdsDxe: failed to load Boot0001 "UEFI Misc Device" ...: Not Found` and, once nothing
//! is left to try, `BdsDxe: No bootable option or device was found.`
//!
//! UEFI needs more guest memory than direct kernel boot: with 256 MiB the kernel that GRUB
//! started hangs right after `EFI stub: UEFI Secure Boot is enabled.`; with 512 MiB it
//! boots (see [`UEFI_MIN_MEMORY_MIB`]).

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::HarnessError;
use crate::guest::GuestImage;

/// Where the boot partition starts on the disk (sector 2048, as partitioning tools align).
pub const PARTITION_START_BYTES: u64 = 1 << 20;
/// syslinux's master boot record code (package `syslinux-common`): boots the active
/// partition.
pub const MBR_CODE: &str = "/usr/lib/syslinux/mbr/mbr.bin";
/// syslinux's core module for BIOS (package `syslinux-common`), which `syslinux --install`
/// copies; hashed into the cache key.
const LDLINUX_C32: &str = "/usr/lib/syslinux/modules/bios/ldlinux.c32";
/// The Debian packages the build needs: `syslinux` (the installer that works through
/// mtools), `syslinux-common` (the boot code), `mtools` and `dosfstools` (`mkfs.fat`).
pub const PACKAGES: &[&str] = &["syslinux", "syslinux-common", "mtools", "dosfstools"];
/// Debian packages fetched (`apt-get download`, not installed) for the UEFI boot chain:
/// shim, signed by Microsoft's UEFI CA, and GRUB, signed by Debian.
pub const EFI_PACKAGES: &[&str] = &["shim-signed", "grub-efi-amd64-signed"];
/// Where the unpacked [`EFI_PACKAGES`] keep shim and GRUB, and their names on the disk.
const EFI_FILES: &[(&str, &str)] = &[
    ("usr/lib/shim/shimx64.efi.signed", "::/EFI/BOOT/BOOTX64.EFI"),
    (
        "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
        "::/EFI/BOOT/grubx64.efi",
    ),
];
/// The folder of the removable-media boot path, where shim looks for GRUB and GRUB for
/// `grub.cfg`.
const EFI_BOOT_DIR: &str = "::/EFI/BOOT";
/// Guest memory a UEFI guest needs to boot from this disk.
pub const UEFI_MIN_MEMORY_MIB: u32 = 512;
/// Room in the partition beyond the files copied: syslinux's files, the configuration and
/// the file system's own tables.
const SLACK_BYTES: u64 = 4 << 20;
/// The FAT volume id and label (fixed, so builds do not differ by chance).
const VOLUME_ID: &str = "52574254";
const VOLUME_LABEL: &str = "RWBOOT";
/// The MBR's disk signature.
const DISK_SIGNATURE: u32 = 0x5257_4254;
const SECTOR_BYTES: u64 = 512;
/// Bumped whenever the image's layout changes, to invalidate old caches.
const BUILDER_REVISION: &str = "rewind-bootdisk-builder-2";

/// The cached boot image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    /// The raw image (`<cache_root>/<key>/boot.img`), mode 0644.
    pub path: PathBuf,
    /// Its size: [`PARTITION_START_BYTES`] plus the partition.
    pub size_bytes: u64,
}

/// The boot image of the harness's guest ([`crate::guest_image`]), built once per process
/// and cached under `target/rewind-test-bootdisk`.
pub fn boot_image() -> Result<&'static BootImage, HarnessError> {
    static IMAGE: OnceLock<Result<BootImage, HarnessError>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let guest = crate::guest_image()?;
            build_boot_image(&crate::target_dir().join("rewind-test-bootdisk"), guest)
                .map_err(|e| HarnessError(format!("could not build the test boot disk: {e}")))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Builds (once per cache key) or reuses the boot image for `guest`; safe when several
/// test processes call it at once. Needs the [`PACKAGES`], and `apt-get`, `apt-cache` and
/// `dpkg` with current package lists for the [`EFI_PACKAGES`]; without package lists, an
/// image already cached for this guest is used.
pub fn build_boot_image(cache_root: &Path, guest: &GuestImage) -> io::Result<BootImage> {
    for tool in [MBR_CODE, LDLINUX_C32] {
        if !Path::new(tool).is_file() {
            return Err(io::Error::other(format!(
                "{tool} is missing: install the packages {} (`./x test` does)",
                PACKAGES.join(" ")
            )));
        }
    }
    let guest_key = guest
        .kernel
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::other("the guest kernel has no cache folder"))?;
    let efi_packages = match efi_package_versions() {
        Ok(p) => p,
        Err(e) => {
            return newest_cached(cache_root, &format!("{guest_key}_boot-"))?.ok_or(e);
        }
    };
    let mut h = FNV_OFFSET_BASIS;
    h = fnv1a64(BUILDER_REVISION.as_bytes(), h);
    for tool in [MBR_CODE, LDLINUX_C32] {
        h = fnv1a64(
            &fs::read(tool).map_err(|e| with_path(&e, "read", Path::new(tool)))?,
            h,
        );
    }
    for (name, version) in &efi_packages {
        h = fnv1a64(format!("{name}={version}\n").as_bytes(), h);
    }
    let entry = cache_root.join(format!("{guest_key}_boot-{h:016x}"));
    if let Some(image) = cached(&entry)? {
        return Ok(image);
    }
    if !cache_root.is_dir() {
        fs::create_dir_all(cache_root).map_err(|e| with_path(&e, "create", cache_root))?;
        fs::set_permissions(cache_root, fs::Permissions::from_mode(0o755))?;
    }
    let lock_path = cache_root.join(".build.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| with_path(&e, "open", &lock_path))?;
    lock.lock().map_err(|e| with_path(&e, "lock", &lock_path))?;
    if let Some(image) = cached(&entry)? {
        return Ok(image);
    }
    // Left by a build that was killed (this process holds the lock: no build runs).
    crate::guest::remove_stale_temp_dirs(cache_root)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = cache_root.join(format!(".tmp-{}-{nanos}", std::process::id()));
    fs::create_dir(&tmp).map_err(|e| with_path(&e, "create", &tmp))?;
    let built = build_into(&tmp, guest, &efi_packages)
        .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)))
        .and_then(|()| {
            fs::rename(&tmp, &entry).map_err(|e| with_path(&e, "rename into place", &entry))
        });
    if let Err(e) = built {
        drop(fs::remove_dir_all(&tmp));
        return Err(e);
    }
    drop(lock);
    cached(&entry)?.ok_or_else(|| {
        io::Error::other(format!(
            "boot image {} vanished after it was built",
            entry.display()
        ))
    })
}

fn cached(entry: &Path) -> io::Result<Option<BootImage>> {
    let path = entry.join("boot.img");
    match fs::metadata(&path) {
        Ok(meta) => Ok(Some(BootImage {
            path,
            size_bytes: meta.len(),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(with_path(&e, "inspect", &path)),
    }
}

/// The newest image cached under `cache_root` in a folder whose name starts with `prefix`.
fn newest_cached(cache_root: &Path, prefix: &str) -> io::Result<Option<BootImage>> {
    let Ok(entries) = fs::read_dir(cache_root) else {
        return Ok(None);
    };
    let mut best: Option<(SystemTime, BootImage)> = None;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        if let Some(image) = cached(&entry.path())? {
            let modified = fs::metadata(&image.path)?.modified()?;
            if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                best = Some((modified, image));
            }
        }
    }
    Ok(best.map(|(_, image)| image))
}

/// Each of the [`EFI_PACKAGES`] with its candidate version.
fn efi_package_versions() -> io::Result<Vec<(String, String)>> {
    let policy = crate::guest::run_apt(
        Command::new("apt-cache").arg("policy").args(EFI_PACKAGES),
        &format!(
            "looking up the versions of {} (apt-cache policy)",
            EFI_PACKAGES.join(", ")
        ),
    )?;
    EFI_PACKAGES
        .iter()
        .map(|&name| {
            Ok((
                name.to_owned(),
                crate::guest::candidate_version(&policy, name)?,
            ))
        })
        .collect()
}

/// Fetches and unpacks the [`EFI_PACKAGES`] in `dir`, then writes `dir/boot.img` and
/// removes everything else from `dir`.
fn build_into(dir: &Path, guest: &GuestImage, efi_packages: &[(String, String)]) -> io::Result<()> {
    let debs = dir.join("debs");
    let root = dir.join("root");
    fs::create_dir(&debs)?;
    fs::create_dir(&root)?;
    let specs: Vec<String> = efi_packages
        .iter()
        .map(|(name, version)| format!("{name}={version}"))
        .collect();
    crate::guest::run_apt(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .args(&specs),
        &format!("apt-get download {}", specs.join(" ")),
    )?;
    for item in fs::read_dir(&debs)? {
        let deb = item?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run(
                Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
                &format!("dpkg -x {}", deb.display()),
            )?;
        }
    }
    let mut files = vec![
        (guest.kernel.clone(), "::/vmlinuz"),
        (guest.initrd.clone(), "::/initrd.img"),
    ];
    for (from, to) in EFI_FILES {
        files.push((root.join(from), to));
    }
    write_image(&dir.join("boot.img"), &files)?;
    fs::remove_dir_all(&debs)?;
    fs::remove_dir_all(&root)
}

/// Writes the image: MBR, FAT file system, `files` (`(host path, mtools path)`) copied
/// onto it, syslinux installed.
fn write_image(out: &Path, files: &[(PathBuf, &str)]) -> io::Result<()> {
    let files_bytes = files
        .iter()
        .map(|(p, _)| {
            fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| with_path(&e, "inspect", p))
        })
        .sum::<io::Result<u64>>()?;
    let partition_bytes = (files_bytes + SLACK_BYTES).div_ceil(1 << 20) << 20;
    let file = File::create(out).map_err(|e| with_path(&e, "create", out))?;
    file.set_len(PARTITION_START_BYTES + partition_bytes)?;
    write_mbr(&file, partition_bytes)?;
    file.set_permissions(fs::Permissions::from_mode(0o644))?;
    drop(file);

    let start_sectors = (PARTITION_START_BYTES / SECTOR_BYTES).to_string();
    run(
        Command::new("mkfs.fat")
            .args(["-F", "16", "--offset", &start_sectors, "-h", &start_sectors])
            .args(["-i", VOLUME_ID, "-n", VOLUME_LABEL])
            .arg(out)
            .arg((partition_bytes / 1024).to_string()),
        "making the FAT file system of the boot partition (mkfs.fat, package dosfstools)",
    )?;
    let fat = fat_path(out);
    run(
        mtools("mmd")
            .arg("-i")
            .arg(&fat)
            .args(["::/EFI", EFI_BOOT_DIR]),
        "making the EFI folders on the boot partition (mmd, package mtools)",
    )?;
    for (from, to) in files {
        run(
            mtools("mcopy").arg("-i").arg(&fat).arg(from).arg(to),
            &format!(
                "copying {} onto the boot partition (mcopy, package mtools)",
                from.display()
            ),
        )?;
    }
    run(
        Command::new("syslinux")
            .args(["--install", "--offset", &PARTITION_START_BYTES.to_string()])
            .arg(out)
            .env("MTOOLS_SKIP_CHECK", "1"),
        "installing syslinux on the boot partition (syslinux, package syslinux)",
    )
}

/// The MBR: syslinux's boot code, a disk signature and one active FAT16 (LBA) partition
/// from [`PARTITION_START_BYTES`] on.
fn write_mbr(mut file: &File, partition_bytes: u64) -> io::Result<()> {
    let code = fs::read(MBR_CODE).map_err(|e| with_path(&e, "read", Path::new(MBR_CODE)))?;
    if code.len() > 440 {
        return Err(io::Error::other(format!(
            "{MBR_CODE} is {} bytes, more than the 440 an MBR has for code",
            code.len()
        )));
    }
    let mut mbr = [0u8; 512];
    mbr[..code.len()].copy_from_slice(&code);
    mbr[440..444].copy_from_slice(&DISK_SIGNATURE.to_le_bytes());
    let to_sectors = |bytes: u64| {
        u32::try_from(bytes / SECTOR_BYTES)
            .map_err(|_| io::Error::other("the boot partition is too large for an MBR"))
    };
    // Status (active), CHS of the first sector (unused: "beyond 8 GiB"), type, CHS of the
    // last sector, then the first sector and the sector count as LBA.
    let mut entry = [
        0x80, 0xfe, 0xff, 0xff, 0x0e, 0xfe, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    entry[8..12].copy_from_slice(&to_sectors(PARTITION_START_BYTES)?.to_le_bytes());
    entry[12..16].copy_from_slice(&to_sectors(partition_bytes)?.to_le_bytes());
    mbr[446..462].copy_from_slice(&entry);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&mbr)
}

/// The syslinux configuration that boots the guest with `cmdline` at once, printing to
/// the serial console too.
#[must_use]
pub fn syslinux_cfg(cmdline: &str) -> String {
    format!(
        "SERIAL 0 115200\nDEFAULT rewind\nPROMPT 0\nTIMEOUT 0\nLABEL rewind\n  \
         LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {cmdline}\n"
    )
}

/// The GRUB configuration that boots the guest with `cmdline` at once. Debian's signed
/// GRUB reads it from the folder it was started from (`$cmdpath/grub.cfg`) when its own
/// prefix (`/EFI/debian`) does not exist.
#[must_use]
pub fn grub_cfg(cmdline: &str) -> String {
    format!("set timeout=0\nlinux /vmlinuz {cmdline}\ninitrd /initrd.img\nboot\n")
}

/// Writes `image`, with a `syslinux.cfg` and a `grub.cfg` that boot the kernel with
/// `cmdline`, to the start
/// of the disk image `disk` (format `format`, at least `image.size_bytes` large, VM not
/// running); the rest of the disk keeps what it holds. `work` is a folder for the
/// temporary copy.
pub fn install_boot_disk(
    image: &BootImage,
    cmdline: &str,
    work: &Path,
    disk: &Path,
    format: &str,
) -> io::Result<()> {
    let copy = work.join(".boot-disk.img");
    let cfg = work.join(".boot.cfg");
    let result = (|| {
        fs::copy(&image.path, &copy).map_err(|e| with_path(&e, "copy", &image.path))?;
        for (text, to) in [
            (syslinux_cfg(cmdline), "::/syslinux.cfg".to_owned()),
            (grub_cfg(cmdline), format!("{EFI_BOOT_DIR}/grub.cfg")),
        ] {
            fs::write(&cfg, text).map_err(|e| with_path(&e, "write", &cfg))?;
            run(
                mtools("mcopy")
                    .arg("-o")
                    .arg("-i")
                    .arg(fat_path(&copy))
                    .arg(&cfg)
                    .arg(&to),
                &format!("copying {to} onto the boot partition (mcopy, package mtools)"),
            )?;
        }
        run(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", format])
                .arg(&copy)
                .arg(disk),
            &format!("writing the boot disk to {}", disk.display()),
        )
    })();
    drop(fs::remove_file(&copy));
    drop(fs::remove_file(&cfg));
    result
}

/// mtools' name for the FAT file system in `image`'s partition: `IMAGE@@OFFSET`.
fn fat_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(format!("@@{PARTITION_START_BYTES}"));
    PathBuf::from(s)
}

/// An mtools command that does not second-guess the file system's geometry and ignores
/// any user configuration.
fn mtools(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("MTOOLS_SKIP_CHECK", "1")
        .env("MTOOLSRC", "/dev/null");
    cmd
}

fn run(cmd: &mut Command, what: &str) -> io::Result<()> {
    let out = cmd.output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{what}: cannot run {}: {e} (install the packages {})",
                cmd.get_program().display(),
                PACKAGES.join(" ")
            ),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn with_path(e: &io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {action} {}: {e}", path.display()))
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a64(data: &[u8], mut hash: u64) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_boots_at_once_with_the_command_line() {
        let cfg = syslinux_cfg("console=ttyS0 rw.workload=sequence rw.disk=vdb");
        assert!(cfg.contains("\n  APPEND console=ttyS0 rw.workload=sequence rw.disk=vdb\n"));
        assert!(cfg.contains("TIMEOUT 0\n"));
        assert!(cfg.contains("LINUX /vmlinuz\n") && cfg.contains("INITRD /initrd.img\n"));
    }

    #[test]
    fn grub_config_boots_at_once_with_the_command_line() {
        assert_eq!(
            grub_cfg("console=ttyS0 rw.workload=idle rw.disk=vdb"),
            "set timeout=0\nlinux /vmlinuz console=ttyS0 rw.workload=idle rw.disk=vdb\n\
             initrd /initrd.img\nboot\n"
        );
    }

    #[test]
    fn mtools_path_names_the_partition_offset() {
        assert_eq!(
            fat_path(Path::new("/t/boot.img")),
            Path::new("/t/boot.img@@1048576")
        );
    }
}
