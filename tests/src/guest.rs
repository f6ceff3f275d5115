//! The tiny test guest: a Debian cloud kernel plus an initramfs of static busybox, the
//! virtio modules and an `/init` script that runs a named workload.
//!
//! [`build_guest_image`] downloads `linux-image-<release>-cloud-amd64` and `busybox-static`
//! with `apt-get download`, unpacks them with `dpkg -x`, writes the initramfs (an
//! uncompressed cpio "newc" archive, written here) and caches the result under
//! `<cache_root>/<key>/{vmlinuz,initrd.img}`. The key names the kernel package and version,
//! the busybox version and a hash of everything that goes into the initramfs (the `/init`
//! script included), so editing the script builds a new image.
//!
//! # Guest behaviour
//! Boot it directly (`<kernel>`, `<initrd>`, `<cmdline>`) with `console=ttyS0` and:
//! - `rw.workload=NAME`: `idle` (the default) or `sequence`;
//! - `rw.disk=DEV`: the disk the workload uses, default `vda`; `none` to not wait for one;
//! - `rw.verbose=1`: keep the kernel's console messages (otherwise `/init` lowers the console
//!   log level to errors only, so kernel lines don't interleave with the markers).
//!
//! On the console the guest prints [`READY_MARKER`]` workload=NAME` once the disk exists,
//! then runs the workload. Any failure prints a line starting with [`ERROR_MARKER`] and the
//! guest then idles (it never exits: PID 1 exiting would panic the kernel). An unknown
//! workload prints an error line and no READY line.
//!
//! The `sequence` workload writes record `i` (1, 2, 3, ...) to 4096-byte block `i` of the disk
//! about every 100 ms, with `dd ... conv=notrunc,sync,fsync` (one fork per record), then prints
//! `RWSEQ <i> flushed`. See `workload.rs` for the record format and the host-side parser.
//! When the disk is full it prints `RWSEQ done: disk full after <i>` and idles.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Start of the line the guest prints once its workload starts (followed by ` workload=NAME`).
pub const READY_MARKER: &str = "REWIND-GUEST READY";
/// Start of every error line the guest prints.
pub const ERROR_MARKER: &str = "REWIND-GUEST ERROR";

/// The cached guest, ready for direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel (`<cache_root>/<key>/vmlinuz`), mode 0644.
    pub kernel: PathBuf,
    /// The initramfs (`<cache_root>/<key>/initrd.img`), mode 0644.
    pub initrd: PathBuf,
    /// The kernel release, as `uname -r` prints it, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
}

/// Kernel modules put into the initramfs, in the order `/init` loads them.
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
];

/// Bumped whenever the way the image is put together changes, to invalidate old caches.
const BUILDER_REVISION: &str = "rewind-guest-builder-1";

/// `/init`, run by the kernel as PID 1 through `#!/bin/busybox sh`.
///
/// Kept cheap under TCG: everything in the loops is an ash builtin except the one `dd` per
/// record; sleeping is `read -t` on a FIFO nobody writes to, which needs no fork.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# Rewind test guest: PID 1. Never exits (that would panic the kernel).
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
set -f

workload=idle
disk=vda
verbose=0
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        rw.workload=*) workload=${arg#rw.workload=} ;;
        rw.disk=*) disk=${arg#rw.disk=} ;;
        rw.verbose=*) verbose=${arg#rw.verbose=} ;;
    esac
done
[ "$verbose" = 1 ] || echo 4 > /proc/sys/kernel/printk

# Sleeping without a fork: read with a timeout from a FIFO that nobody writes to.
mkfifo /tmp/nap
exec 9<>/tmp/nap
nap() { read -r -t "$1" _ <&9; }
idle_forever() { while :; do nap 3600; done; }
fail() { echo "REWIND-GUEST ERROR $*"; idle_forever; }

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console; do
    insmod "/lib/modules/$m.ko" || echo "REWIND-GUEST ERROR insmod $m failed"
done

case "$workload" in
    idle|sequence) ;;
    *) fail "unknown workload=$workload" ;;
esac

if [ "$disk" != none ]; then
    n=0
    while [ ! -b "/dev/$disk" ]; do
        n=$((n + 1))
        [ "$n" -le 600 ] || fail "disk /dev/$disk did not appear"
        nap 0.1
    done
fi

echo "REWIND-GUEST READY workload=$workload"

sequence() {
    [ "$disk" != none ] || fail "workload sequence needs a disk"
    dev=/dev/$disk
    read -r sectors < "/sys/class/block/$disk/size"
    last=$((sectors / 8 - 1))
    i=0
    while [ "$i" -lt "$last" ]; do
        i=$((i + 1))
        read -r up _ < /proc/uptime
        sec=${up%.*}
        frac=${up#*.}
        frac=${frac#0}
        cs=$((sec * 100 + frac))
        ck=$(( (i * 2654435761 ^ cs * 40503 ^ 1515870810) & 4294967295 ))
        printf 'RWSEQ %010d %012d %010d\n' "$i" "$cs" "$ck" > /tmp/record
        dd if=/tmp/record of="$dev" bs=4096 seek="$i" count=1 conv=notrunc,sync,fsync status=none \
            || fail "writing record $i to $dev failed"
        echo "RWSEQ $i flushed"
        nap 0.1
    done
    echo "RWSEQ done: disk full after $i"
    idle_forever
}

case "$workload" in
    idle) idle_forever ;;
    sequence) sequence ;;
esac
"#;

/// Builds (once per cache key) or reuses the cached guest; safe when several test processes
/// call it at once.
///
/// Needs `apt-get`, `apt-cache` and `dpkg` and current package lists (`apt-get update`).
/// When the package lists cannot be read but an image with the same initramfs contents is
/// already cached, that image is used. QEMU (user `libvirt-qemu`) must be able to reach
/// `cache_root`: the files are made world-readable, but a private parent folder (such as
/// `/root`) still hides them.
pub fn build_guest_image(cache_root: &Path) -> io::Result<GuestImage> {
    // Asking apt for the versions takes a second or two: do it once per process and root.
    static BUILT: Mutex<Vec<(PathBuf, GuestImage)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, image)) = built.iter().find(|(root, _)| root == cache_root)
        && image.kernel.is_file()
        && image.initrd.is_file()
    {
        return Ok(image.clone());
    }
    let image = build_or_reuse(cache_root)?;
    built.retain(|(root, _)| root != cache_root);
    built.push((cache_root.to_path_buf(), image.clone()));
    Ok(image)
}

fn build_or_reuse(cache_root: &Path) -> io::Result<GuestImage> {
    let contents_hash = initramfs_contents_hash();
    let packages = match resolve_packages() {
        Ok(p) => p,
        Err(e) => {
            return match find_cached_by_hash(cache_root, contents_hash)? {
                Some(image) => Ok(image),
                None => Err(e),
            };
        }
    };
    let key = cache_key(&packages, contents_hash);
    let entry = cache_root.join(&key);
    if let Some(image) = cached_image(&entry)? {
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

    // Another process may have built it while this one waited for the lock.
    if let Some(image) = cached_image(&entry)? {
        return Ok(image);
    }
    remove_stale_temp_dirs(cache_root)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = cache_root.join(format!(".tmp-{}-{nanos}", std::process::id()));
    fs::create_dir(&tmp).map_err(|e| with_path(&e, "create", &tmp))?;
    let built = build_into(&tmp, &packages, contents_hash).and_then(|()| {
        fs::rename(&tmp, &entry).map_err(|e| with_path(&e, "rename into place", &entry))
    });
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    drop(lock);
    cached_image(&entry)?.ok_or_else(|| {
        io::Error::other(format!(
            "guest image {} vanished after it was built",
            entry.display()
        ))
    })
}

/// What the image is built from.
#[derive(Debug)]
struct Packages {
    /// `linux-image-6.1.0-56-cloud-amd64`
    kernel_package: String,
    /// `6.1.192-2`
    kernel_package_version: String,
    /// `6.1.0-56-cloud-amd64`
    kernel_release: String,
    /// `1:1.35.0-4+deb12u1+b1`
    busybox_version: String,
}

const APT_HINT: &str = "the package lists are probably missing or stale: run `apt-get update` \
                        (the project's setup script does this)";

fn resolve_packages() -> io::Result<Packages> {
    let depends = run_apt(
        Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]),
        "resolving the cloud kernel package (apt-cache depends linux-image-cloud-amd64)",
    )?;
    let kernel_package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .ok_or_else(|| {
            io::Error::other(format!(
                "apt-cache depends linux-image-cloud-amd64 names no linux-image-*-cloud-amd64 \
                 package; {APT_HINT}. Output was:\n{depends}"
            ))
        })?
        .to_owned();
    let kernel_release = kernel_package["linux-image-".len()..].to_owned();
    let policy = run_apt(
        Command::new("apt-cache").args(["policy", &kernel_package, "busybox-static"]),
        &format!(
            "looking up the versions of {kernel_package} and busybox-static (apt-cache policy)"
        ),
    )?;
    let kernel_package_version = candidate_version(&policy, &kernel_package)?;
    let busybox_version = candidate_version(&policy, "busybox-static")?;
    Ok(Packages {
        kernel_package,
        kernel_package_version,
        kernel_release,
        busybox_version,
    })
}

/// The `Candidate:` version in `package`'s section of `apt-cache policy` output.
fn candidate_version(policy: &str, package: &str) -> io::Result<String> {
    let header = format!("{package}:");
    policy
        .lines()
        .skip_while(|l| l.trim_end() != header)
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_owned)
        .ok_or_else(|| {
            io::Error::other(format!(
                "apt-cache policy {package} shows no candidate; {APT_HINT}"
            ))
        })
}

/// Runs an apt command in the C locale; failures carry stderr and the `apt-get update` hint.
fn run_apt(cmd: &mut Command, what: &str) -> io::Result<String> {
    cmd.env("LC_ALL", "C").env("LANG", "C");
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{what}: cannot run apt: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}; {APT_HINT}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command, what: &str) -> io::Result<Vec<u8>> {
    let out = cmd.output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{what}: cannot run {}: {e}", cmd.get_program().display()),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn with_path(e: &io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {action} {}: {e}", path.display()))
}

/// FNV-1a, 64 bits: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a64(data: &[u8], mut hash: u64) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Hash of everything that goes into the initramfs besides the packages.
fn initramfs_contents_hash() -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325;
    h = fnv1a64(BUILDER_REVISION.as_bytes(), h);
    for m in MODULES {
        h = fnv1a64(m.as_bytes(), h);
        h = fnv1a64(b"\0", h);
    }
    fnv1a64(INIT_SCRIPT.as_bytes(), h)
}

/// Folder-name-safe form of a package version (`1:1.35.0-4+deb12u1+b1` → `1_1.35.0-4+deb12u1+b1`).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn cache_key(p: &Packages, contents_hash: u64) -> String {
    format!(
        "{}_{}_busybox-{}_init-{contents_hash:016x}",
        p.kernel_release,
        sanitize(&p.kernel_package_version),
        sanitize(&p.busybox_version)
    )
}

const META_FILE: &str = "guest.txt";

/// The image in `entry` if it is complete (entries only appear complete, by rename).
fn cached_image(entry: &Path) -> io::Result<Option<GuestImage>> {
    let kernel = entry.join("vmlinuz");
    let initrd = entry.join("initrd.img");
    let meta = entry.join(META_FILE);
    if !(kernel.is_file() && initrd.is_file()) {
        return Ok(None);
    }
    let text = fs::read_to_string(&meta).map_err(|e| with_path(&e, "read", &meta))?;
    let kernel_version = text
        .lines()
        .find_map(|l| l.strip_prefix("kernel_release="))
        .ok_or_else(|| io::Error::other(format!("{} has no kernel_release", meta.display())))?
        .to_owned();
    Ok(Some(GuestImage {
        kernel,
        initrd,
        kernel_version,
    }))
}

/// Used when apt cannot tell the current versions: a cached image with the same initramfs
/// contents (the newest one if there are several).
fn find_cached_by_hash(cache_root: &Path, contents_hash: u64) -> io::Result<Option<GuestImage>> {
    let suffix = format!("_init-{contents_hash:016x}");
    let Ok(dir) = fs::read_dir(cache_root) else {
        return Ok(None);
    };
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for item in dir {
        let item = item?;
        if !item.file_name().to_string_lossy().ends_with(&suffix) {
            continue;
        }
        let modified = item.metadata()?.modified().unwrap_or(UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, item.path()));
        }
    }
    match best {
        Some((_, path)) => cached_image(&path),
        None => Ok(None),
    }
}

/// Removes the temporary folders of builds that died (only called with the lock held).
fn remove_stale_temp_dirs(cache_root: &Path) -> io::Result<()> {
    for item in fs::read_dir(cache_root)? {
        let item = item?;
        if item.file_name().to_string_lossy().starts_with(".tmp-") {
            fs::remove_dir_all(item.path()).map_err(|e| with_path(&e, "remove", &item.path()))?;
        }
    }
    Ok(())
}

fn build_into(dir: &Path, p: &Packages, contents_hash: u64) -> io::Result<()> {
    let debs = dir.join("debs");
    let root = dir.join("root");
    fs::create_dir(&debs)?;
    fs::create_dir(&root)?;

    let kernel_spec = format!("{}={}", p.kernel_package, p.kernel_package_version);
    let busybox_spec = format!("busybox-static={}", p.busybox_version);
    run_apt(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .args([&kernel_spec, &busybox_spec]),
        &format!("apt-get download {kernel_spec} {busybox_spec}"),
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

    let vmlinuz = first_existing(&[
        root.join(format!("boot/vmlinuz-{}", p.kernel_release)),
        root.join(format!("usr/boot/vmlinuz-{}", p.kernel_release)),
    ])
    .ok_or_else(|| io::Error::other(format!("{} has no vmlinuz", p.kernel_package)))?;
    let module_dir = first_existing(&[
        root.join(format!("lib/modules/{}/kernel", p.kernel_release)),
        root.join(format!("usr/lib/modules/{}/kernel", p.kernel_release)),
    ])
    .ok_or_else(|| io::Error::other(format!("{} has no modules folder", p.kernel_package)))?;
    let busybox = first_existing(&[root.join("bin/busybox"), root.join("usr/bin/busybox")])
        .ok_or_else(|| io::Error::other("busybox-static has no bin/busybox"))?;

    let initrd = dir.join("initrd.img");
    write_initramfs(&initrd, &busybox, &module_dir)?;
    let kernel = dir.join("vmlinuz");
    fs::copy(&vmlinuz, &kernel).map_err(|e| with_path(&e, "copy", &vmlinuz))?;
    fs::write(
        dir.join(META_FILE),
        format!(
            "kernel_package={}\nkernel_package_version={}\nkernel_release={}\n\
             busybox_version={}\ninit_hash={contents_hash:016x}\n",
            p.kernel_package, p.kernel_package_version, p.kernel_release, p.busybox_version
        ),
    )?;

    fs::remove_dir_all(&debs)?;
    fs::remove_dir_all(&root)?;
    for f in ["vmlinuz", "initrd.img", META_FILE] {
        fs::set_permissions(dir.join(f), fs::Permissions::from_mode(0o644))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
}

fn first_existing(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.exists()).cloned()
}

fn write_initramfs(out: &Path, busybox: &Path, module_dir: &Path) -> io::Result<()> {
    let file = File::create(out).map_err(|e| with_path(&e, "create", out))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    for d in [
        "bin",
        "dev",
        "lib",
        "lib/modules",
        "proc",
        "root",
        "sys",
        "tmp",
    ] {
        cpio.dir(d, 0o755)?;
    }
    // The kernel opens /dev/console for PID 1's stdio before /init mounts devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    let busybox_bytes = fs::read(busybox).map_err(|e| with_path(&e, "read", busybox))?;
    cpio.file("bin/busybox", 0o755, &busybox_bytes)?;
    cpio.symlink("bin/sh", "busybox")?;
    for name in MODULES {
        let module = load_module(module_dir, name)?;
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &module)?;
    }
    cpio.finish()?.flush()
}

/// Finds `<name>.ko[.xz|.zst|.gz]` below `module_dir` and returns it uncompressed (busybox
/// `insmod` takes plain ELF objects only).
fn load_module(module_dir: &Path, name: &str) -> io::Result<Vec<u8>> {
    let candidates = [
        format!("{name}.ko"),
        format!("{name}.ko.xz"),
        format!("{name}.ko.zst"),
        format!("{name}.ko.gz"),
    ];
    let path = find_file(module_dir, &candidates)?.ok_or_else(|| {
        io::Error::other(format!(
            "kernel module {name} not found below {}",
            module_dir.display()
        ))
    })?;
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => Some(("xz", "xz-utils")),
        Some("zst") => Some(("zstd", "zstd")),
        Some("gz") => Some(("gzip", "gzip")),
        _ => None,
    };
    match tool {
        None => fs::read(&path).map_err(|e| with_path(&e, "read", &path)),
        Some((tool, package)) => run(
            Command::new(tool).arg("-dc").arg(&path),
            &format!(
                "decompressing {} (needs the {package} package)",
                path.display()
            ),
        ),
    }
}

fn find_file(dir: &Path, names: &[String]) -> io::Result<Option<PathBuf>> {
    let mut subdirs = Vec::new();
    for item in fs::read_dir(dir)? {
        let item = item?;
        let file_type = item.file_type()?;
        if file_type.is_dir() {
            subdirs.push(item.path());
        } else if names.iter().any(|n| item.file_name() == n.as_str()) {
            return Ok(Some(item.path()));
        }
    }
    subdirs.sort();
    for sub in subdirs {
        if let Some(found) = find_file(&sub, names)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Writes a cpio archive in the "newc" format (`070701`), as the kernel unpacks initramfs.
///
/// Each entry is a 110-byte ASCII header (magic, then 13 eight-digit hex fields), the NUL
/// terminated name padded to a multiple of 4 bytes (counting from the header's start), and
/// the data padded to a multiple of 4. A `TRAILER!!!` entry ends the archive.
struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, 0o040_000 | perm, 2, (0, 0), &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100_000 | perm, 1, (0, 0), data)
    }

    fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, 0o120_777, 1, (0, 0), target.as_bytes())
    }

    fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, 0o020_000 | perm, 1, (major, minor), &[])
    }

    fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let too_big = || io::Error::other(format!("cpio entry {name} is too large"));
        let size = u32::try_from(data.len()).map_err(|_| too_big())?;
        let name_size = u32::try_from(name.len() + 1).map_err(|_| too_big())?;
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            let _ = write!(header, "{f:08X}");
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        let zeros = [0u8; 3];
        self.put(&zeros[..usize::try_from(n).unwrap_or(0)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_script_loads_exactly_the_packed_modules_in_order() {
        let line = INIT_SCRIPT
            .lines()
            .find(|l| l.trim_start().starts_with("for m in "))
            .expect("module loop");
        let listed: Vec<&str> = line.trim_start()["for m in ".len()..]
            .trim_end_matches("; do")
            .split(' ')
            .collect();
        assert_eq!(listed, MODULES);
    }

    #[test]
    fn init_script_markers_match_constants() {
        assert!(INIT_SCRIPT.contains(&format!("echo \"{READY_MARKER} workload=$workload\"")));
        assert!(INIT_SCRIPT.contains(&format!("echo \"{ERROR_MARKER} $*\"")));
    }

    #[test]
    fn cpio_newc_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/x", 0o644, b"hello").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert_eq!(&out[..6], b"070701");
        // Header fields of the first entry: ino 1, directory mode, nlink 2, name "bin\0".
        assert_eq!(&out[6..14], b"00000001");
        assert_eq!(&out[14..22], b"000041ED");
        assert_eq!(&out[38..46], b"00000002");
        assert_eq!(&out[94..102], b"00000004");
        assert_eq!(&out[110..114], b"bin\0");
        // 110 + 4 = 114, padded to 116; no data.
        assert_eq!(&out[114..116], b"\0\0");
        let second = &out[116..];
        assert_eq!(&second[..6], b"070701");
        assert_eq!(&second[54..62], b"00000005"); // file size
        assert_eq!(&second[110..116], b"bin/x\0");
        // 110 + 6 = 116, aligned; data "hello" then 3 bytes of padding.
        assert_eq!(&second[116..124], b"hello\0\0\0");
        let third = &second[124..];
        assert_eq!(&third[14..22], b"00002180");
        assert_eq!(&third[78..94], b"0000000500000001");
        let trailer_name = b"TRAILER!!!\0";
        assert!(out.windows(trailer_name.len()).any(|w| w == trailer_name));
    }

    #[test]
    fn candidate_versions_from_policy_output() {
        let policy = "linux-image-6.1.0-56-cloud-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  \
                      Version table:\n     6.1.192-2 500\nbusybox-static:\n  Installed: (none)\n  \
                      Candidate: 1:1.35.0-4+deb12u1+b1\n";
        assert_eq!(
            candidate_version(policy, "linux-image-6.1.0-56-cloud-amd64").unwrap(),
            "6.1.192-2"
        );
        assert_eq!(
            candidate_version(policy, "busybox-static").unwrap(),
            "1:1.35.0-4+deb12u1+b1"
        );
        assert!(candidate_version(policy, "busybox").is_err());
        assert!(
            candidate_version("busybox-static:\n  Candidate: (none)\n", "busybox-static").is_err()
        );
    }

    #[test]
    fn cache_key_is_folder_safe() {
        let p = Packages {
            kernel_package: "linux-image-6.1.0-56-cloud-amd64".into(),
            kernel_package_version: "6.1.192-2".into(),
            kernel_release: "6.1.0-56-cloud-amd64".into(),
            busybox_version: "1:1.35.0-4+deb12u1+b1".into(),
        };
        let key = cache_key(&p, 0xabc);
        assert_eq!(
            key,
            "6.1.0-56-cloud-amd64_6.1.192-2_busybox-1_1.35.0-4+deb12u1+b1_init-0000000000000abc"
        );
    }
}
