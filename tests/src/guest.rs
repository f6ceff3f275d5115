//! The tiny test guest: a Debian cloud kernel plus an initramfs of static busybox, the
//! virtio modules, the QEMU guest agent, `mke2fs` and an `/init` script that runs a named
//! workload.
//!
//! [`build_guest_image`] downloads `linux-image-<release>-cloud-amd64`, `busybox-static` and
//! the [`TOOL_PACKAGES`] (`qemu-guest-agent`, `e2fsprogs` and the libraries their programs
//! link against) with `apt-get download`, unpacks them with `dpkg -x`, writes the initramfs
//! (an uncompressed cpio "newc" archive, written here) and caches the result under
//! `<cache_root>/<key>/{vmlinuz,initrd.img}`. The key names the kernel package and version,
//! the busybox version, a hash of the tool packages' versions and a hash of everything else
//! that goes into the initramfs (the `/init` script included), so editing the script builds
//! a new image.
//!
//! `qemu-ga` and `mke2fs` are dynamically linked. Their shared libraries are taken from the
//! downloaded packages, not from the host: the downloaded dynamic loader lists them
//! (`ld-linux-x86-64.so.2 --library-path <unpacked libs> --list <program>`), and the build
//! fails with a clear message if a library resolves outside the unpacked packages. The
//! loader goes to `/lib64/ld-linux-x86-64.so.2` in the initramfs and the libraries to
//! `/lib/x86_64-linux-gnu/`, where the loader looks by default.
//!
//! # Guest behaviour
//! Boot it directly (`<kernel>`, `<initrd>`, `<cmdline>`) with `console=ttyS0` and:
//! - `rw.workload=NAME`: `idle` (the default), `sequence`, `fswrite` or `counter`;
//! - `rw.disk=DEV`: the disk the workload uses, default `vda`; `none` to not wait for one;
//! - `rw.fs=DEV`: put an ext4 file system on disk `DEV` (a plain name such as `vdb`; made with
//!   `mke2fs -t ext4` unless the disk already holds an ext2/3/4 file system, which is kept)
//!   and mount it on `/mnt/DEV`, then print [`FS_MARKER`]` /dev/DEV ext4 (new|existing)
//!   mounted on /mnt/DEV`;
//! - `rw.agent=1`: run the QEMU guest agent (`qemu-ga -m virtio-serial`) on the virtio port
//!   named `org.qemu.guest_agent.0` (the domain needs that channel), after the file system is
//!   mounted, and print [`AGENT_MARKER`]` pid=N port=/dev/vportXpY uptime=SECONDS` once it
//!   holds the port open. Without the channel the guest prints an error after 30 s. If
//!   `qemu-ga` exits later, the guest prints an error line with the end of its log;
//! - `rw.verbose=1`: keep the kernel's console messages (otherwise `/init` lowers the console
//!   log level to errors only, so kernel lines don't interleave with the markers).
//!
//! On the console the guest prints [`READY_MARKER`]` workload=NAME` once the disk exists and
//! the file system and agent asked for are up, then runs the workload. Any failure prints a
//! line starting with [`ERROR_MARKER`] and the guest then idles (it never exits: PID 1
//! exiting would panic the kernel). An unknown workload or a malformed `rw.agent`/`rw.fs`
//! prints an error line and no READY line.
//!
//! The `sequence` workload writes record `i` (1, 2, 3, ...) to 4096-byte block `i` of the disk
//! about every 100 ms, with `dd ... conv=notrunc,sync,fsync` (one fork per record), then prints
//! `RWSEQ <i> flushed`. See `workload.rs` for the record format and the host-side parser.
//! It first prints `RWSEQ resume after <k>`: numbering continues after the records already
//! on the disk (0 on a new disk), so a restored guest carries on from its checkpoint.
//! When the disk is full it prints `RWSEQ done: disk full after <i>` and idles.
//!
//! The `counter` workload keeps a counter only in memory (a shell variable, 1 after each
//! boot) and about every 100 ms increments it, writes `RWCNT <n: 10 digits> <uptime in
//! centiseconds: 12 digits>` to 4096-byte block 1 of the disk (fsynced), then prints
//! `RWCNT <n> <uptime cs>`. A guest resumed from saved memory carries on counting; a
//! rebooted one starts again at 1 with a small uptime.
//!
//! The `fswrite` workload needs `rw.fs=DEV`. About every 100 ms it appends the line
//! `RWFS <i> uptime=<seconds>` to `/mnt/DEV/rwfs.log`, syncs that file system
//! (`sync -f`, one fork per line), then prints `RWFS <i> synced`. Numbering continues after
//! the file's last line, so it keeps rising across reboots. While the file system is frozen
//! (`virDomainFSFreeze`, `guest-fsfreeze-freeze`) the append blocks, so the lines stop
//! until it is thawed.
//!
//! `/bin/rwtpm` ([`TPM_SCRIPT`]), started through the guest agent, puts values into the
//! guest's TPM 2.0 (a domain with `<tpm>`) and prints what it holds.

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
/// Start of the line the guest prints once `qemu-ga` holds its port open (`rw.agent=1`).
pub const AGENT_MARKER: &str = "REWIND-GUEST AGENT RUNNING";
/// Start of the line the guest prints once the `rw.fs` file system is mounted.
pub const FS_MARKER: &str = "REWIND-GUEST FS";
/// Start of the line `/bin/rwtpm` prints (`RWTPM <tag> pcr16=<hex> counter=<hex>`).
pub const TPM_PREFIX: &str = "RWTPM ";
/// Start of the line the `fswrite` workload prints after each synced line (`RWFS <i> synced`).
pub const FSWRITE_PREFIX: &str = "RWFS ";

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

/// Packages besides the kernel and busybox: `qemu-ga` and `mke2fs`, the glibc loader and the
/// shared libraries those two load (the loader must find each one in these, or the build
/// fails). Names are Debian 12's.
pub const TOOL_PACKAGES: &[&str] = &[
    "qemu-guest-agent",
    "e2fsprogs",
    "libc6",
    "libglib2.0-0",
    "libpcre2-8-0",
    "libudev1",
    "libnuma1",
    "liburing2",
    "libext2fs2",
    "libcom-err2",
    "libblkid1",
    "libuuid1",
];

/// Dynamically linked programs put into the initramfs: where each package may have it
/// (merged `/usr` or not), and where `/init` runs it from.
const TOOL_PROGRAMS: &[(&[&str], &str)] = &[
    (&["usr/sbin/qemu-ga", "sbin/qemu-ga"], "usr/sbin/qemu-ga"),
    (&["sbin/mke2fs", "usr/sbin/mke2fs"], "usr/sbin/mke2fs"),
];

/// The x86-64 glibc dynamic loader, as programs name it (`PT_INTERP`).
const INTERPRETER: &str = "lib64/ld-linux-x86-64.so.2";
/// Where the initramfs keeps the shared libraries (a default search folder of the loader).
const LIBRARY_DIR: &str = "lib/x86_64-linux-gnu";

/// Bumped whenever the way the image is put together changes, to invalidate old caches.
const BUILDER_REVISION: &str = "rewind-guest-builder-2";

/// `/init`, run by the kernel as PID 1 through `#!/bin/busybox sh`.
///
/// Kept cheap under TCG: everything in the loops is an ash builtin except the one `dd` (or
/// `sync`) per record; sleeping is `read -t` on a FIFO nobody writes to, which needs no fork.
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
agent=0
fs=
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        rw.workload=*) workload=${arg#rw.workload=} ;;
        rw.disk=*) disk=${arg#rw.disk=} ;;
        rw.verbose=*) verbose=${arg#rw.verbose=} ;;
        rw.agent=*) agent=${arg#rw.agent=} ;;
        rw.fs=*) fs=${arg#rw.fs=} ;;
    esac
done
[ "$verbose" = 1 ] || echo 4 > /proc/sys/kernel/printk

# Sleeping without a fork: read with a timeout from a FIFO that nobody writes to.
mkfifo /tmp/nap
exec 9<>/tmp/nap
nap() { read -r -t "$1" _ <&9; }
idle_forever() { while :; do nap 3600; done; }
fail() { echo "REWIND-GUEST ERROR $*"; idle_forever; }
uptime_s() { read -r up _ < /proc/uptime; }

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console; do
    insmod "/lib/modules/$m.ko" || echo "REWIND-GUEST ERROR insmod $m failed"
done

case "$workload" in
    idle|sequence|fswrite|counter) ;;
    *) fail "unknown workload=$workload" ;;
esac
case "$agent" in
    0|1) ;;
    *) fail "rw.agent=$agent: expected 0 or 1" ;;
esac
case "$fs" in
    *[!a-z0-9]*) fail "rw.fs=$fs: expected a disk name such as vdb" ;;
esac
[ "$workload" != fswrite ] || [ -n "$fs" ] || fail "workload fswrite needs a file system: add rw.fs=DEV"

wait_block() {
    n=0
    while [ ! -b "/dev/$1" ]; do
        n=$((n + 1))
        [ "$n" -le 600 ] || fail "disk /dev/$1 did not appear"
        nap 0.1
    done
}

# rw.fs=DEV: an ext4 file system on /dev/DEV (made unless DEV already holds an ext2/3/4 one),
# mounted on /mnt/DEV.
mount_fs() {
    wait_block "$fs"
    dev=/dev/$fs
    mnt=/mnt/$fs
    magic=$(hexdump -s 1080 -n 2 -e '2/1 "%02x"' "$dev") || fail "cannot read $dev"
    how=existing
    if [ "$magic" != 53ef ]; then
        how=new
        # mke2fs would wait for the kernel's random pool (seconds under TCG) to make the UUID
        # and directory hash seed; the kernel's UUIDs do not wait. Inode tables and journal
        # are zeroed now, so the kernel does not write them in the background later.
        read -r uuid < /proc/sys/kernel/random/uuid
        read -r seed < /proc/sys/kernel/random/uuid
        /usr/sbin/mke2fs -q -F -t ext4 -L rwfs -U "$uuid" \
            -E nodiscard,lazy_itable_init=0,lazy_journal_init=0,hash_seed="$seed" "$dev" \
            || fail "mke2fs -t ext4 $dev failed"
    fi
    mkdir -p "$mnt"
    mount -t ext4 "$dev" "$mnt" || fail "mounting $dev on $mnt failed"
    echo "REWIND-GUEST FS $dev ext4 ($how) mounted on $mnt"
}

# rw.agent=1: the QEMU guest agent on the virtio port named org.qemu.guest_agent.0.
start_agent() {
    name=org.qemu.guest_agent.0
    port=
    n=0
    while :; do
        set +f
        for f in /sys/class/virtio-ports/*/name; do
            [ -r "$f" ] || continue
            read -r pname < "$f"
            [ "$pname" != "$name" ] || { p=${f%/name}; port=/dev/${p##*/}; }
        done
        set -f
        [ -z "$port" ] || [ ! -c "$port" ] || break
        n=$((n + 1))
        [ "$n" -le 300 ] || fail "no virtio port named $name after 30 s (does the domain have the agent channel?)"
        nap 0.1
    done
    mkdir -p /dev/virtio-ports /run/qemu-ga
    ln -sf "$port" "/dev/virtio-ports/$name"
    (
        /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run/qemu-ga >/run/qemu-ga.log 2>&1
        echo "REWIND-GUEST ERROR qemu-ga exited with status $?: $(tail -n 5 /run/qemu-ga.log)"
    ) &
    # Running once it holds the port open.
    n=0
    while :; do
        pid=$(pidof qemu-ga)
        if [ -n "$pid" ]; then
            set +f
            for f in /proc/$pid/fd/*; do
                if [ "$f" -ef "$port" ]; then
                    set -f
                    uptime_s
                    echo "REWIND-GUEST AGENT RUNNING pid=$pid port=$port uptime=$up"
                    return
                fi
            done
            set -f
        fi
        n=$((n + 1))
        [ "$n" -le 600 ] || fail "qemu-ga did not open $port within 60 s: $(tail -n 5 /run/qemu-ga.log)"
        nap 0.1
    done
}

[ "$disk" = none ] || wait_block "$disk"
[ -z "$fs" ] || mount_fs
[ "$agent" != 1 ] || start_agent

echo "REWIND-GUEST READY workload=$workload"

sequence() {
    [ "$disk" != none ] || fail "workload sequence needs a disk"
    dev=/dev/$disk
    read -r sectors < "/sys/class/block/$disk/size"
    last=$((sectors / 8 - 1))
    # Continue after the records already on the disk (a restored disk holds 1..k): they
    # are contiguous from block 1, so a binary search over the blocks finds the last one.
    has_record() {
        [ "$(dd if="$dev" bs=4096 skip="$1" count=1 status=none | head -c 16)" = "$(printf 'RWSEQ %010d' "$1")" ]
    }
    i=0
    if has_record 1; then
        lo=1
        hi=$last
        while [ "$lo" -lt "$hi" ]; do
            mid=$(( (lo + hi + 1) / 2 ))
            if has_record "$mid"; then lo=$mid; else hi=$((mid - 1)); fi
        done
        i=$lo
    fi
    echo "RWSEQ resume after $i"
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

# Appends line i to /mnt/FS/rwfs.log, syncs the file system, then prints "RWFS <i> synced".
# Numbering continues after the file's last line. A write blocks while the file system is
# frozen, so the lines stop until it is thawed.
fswrite() {
    file=/mnt/$fs/rwfs.log
    i=0
    if [ -s "$file" ]; then
        set -- $(tail -n 1 "$file")
        [ "$1" != RWFS ] || i=$2
        case "$i" in
            ''|*[!0-9]*) i=0 ;;
        esac
    fi
    while :; do
        i=$((i + 1))
        uptime_s
        echo "RWFS $i uptime=$up" >> "$file" || fail "appending line $i to $file failed"
        sync -f "$file" || fail "syncing the file system of $file failed"
        echo "RWFS $i synced"
        nap 0.1
    done
}

# A counter kept only in memory, written to block 1 of the disk and printed every ~100 ms.
counter() {
    [ "$disk" != none ] || fail "workload counter needs a disk"
    dev=/dev/$disk
    n=0
    while :; do
        n=$((n + 1))
        read -r up _ < /proc/uptime
        sec=${up%.*}
        frac=${up#*.}
        frac=${frac#0}
        cs=$((sec * 100 + frac))
        printf 'RWCNT %010d %012d\n' "$n" "$cs" > /tmp/counter
        dd if=/tmp/counter of="$dev" bs=4096 seek=1 count=1 conv=notrunc,sync,fsync status=none \
            || fail "writing counter $n to $dev failed"
        echo "RWCNT $n $cs"
        nap 0.1
    done
}

case "$workload" in
    idle) idle_forever ;;
    sequence) sequence ;;
    fswrite) fswrite ;;
    counter) counter ;;
esac
"#;

/// `/bin/rwtpm`, run through the guest agent (`guest-exec`): TPM 2.0 commands written raw to
/// `/dev/tpm0` (busybox has no TPM tools), so a test can put values into the guest's TPM
/// and read them back after a restore:
/// - `rwtpm extend HEX64 TAG`: extends PCR 16 (volatile state) with a SHA-256 digest;
/// - `rwtpm count TAG`: increments an NV counter at index 0x01500016 (permanent state),
///   defining it first if it is not there;
/// - `rwtpm show TAG`: changes nothing.
///
/// Each prints [`TPM_PREFIX`]`TAG pcr16=<64 hex> counter=<16 hex>` on the console once done, or
/// an [`ERROR_MARKER`] line naming the command and the TPM's response code.
pub const TPM_SCRIPT: &str = r#"#!/bin/sh
export PATH=/bin
exec >/dev/console 2>&1
# A password session with the empty password: TPM_RS_PW, no nonce, no attributes, no HMAC.
auth=400000090000000000
nv=01500016
# One command (hex) in, its response (hex) out, on one open of the TPM.
tpm() {
    echo "$1" | xxd -r -p > /tmp/rwtpm.cmd
    exec 3<>/dev/tpm0 || return 1
    dd if=/tmp/rwtpm.cmd bs=4096 count=1 status=none >&3
    dd bs=4096 count=1 status=none <&3 | xxd -p | tr -d '\n'
    exec 3>&-
}
rc() { echo "$1" | cut -c13-20; }
# check NAME COMMAND [CODE]: runs COMMAND; fails unless the TPM answers success (or CODE).
check() {
    r=$(tpm "$2")
    code=$(rc "$r")
    [ "$code" = 00000000 ] || [ "$code" = "$3" ] && return 0
    echo "REWIND-GUEST ERROR rwtpm $1: TPM response code $code ($r)"
    exit 1
}
case "$1" in
    extend)
        tag=$3
        [ ${#2} -eq 64 ] || { echo "REWIND-GUEST ERROR rwtpm extend: want 64 hex digits"; exit 1; }
        check pcr-extend "800200000041000001820000001000000009${auth}00000001000b$2"
        ;;
    count)
        tag=$2
        # TPM_RC_NV_DEFINED (0x14c): defined by an earlier count.
        check nv-define "80020000002d0000012a4000000100000009${auth}0000000e${nv}000b0204001400000008" 0000014c
        check nv-increment "80020000001f00000134${nv}${nv}00000009${auth}"
        ;;
    show) tag=$2 ;;
    *) echo "REWIND-GUEST ERROR rwtpm: unknown command $1"; exit 1 ;;
esac
r=$(tpm 8001000000140000017e00000001000b03000001)
[ "$(rc "$r")" = 00000000 ] || { echo "REWIND-GUEST ERROR rwtpm pcr-read: $r"; exit 1; }
pcr=$(echo "$r" | tail -c 65)
r=$(tpm "8002000000230000014e${nv}${nv}00000009${auth}00080000")
case "$(rc "$r")" in
    00000000) counter=$(echo "$r" | cut -c33-48) ;;
    *) counter=none ;;
esac
echo "RWTPM $tag pcr16=$pcr counter=$counter"
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
        drop(fs::remove_dir_all(&tmp));
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
    /// Each of [`TOOL_PACKAGES`] with its candidate version, in that order.
    tools: Vec<(String, String)>,
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
        Command::new("apt-cache")
            .args(["policy", &kernel_package, "busybox-static"])
            .args(TOOL_PACKAGES),
        &format!(
            "looking up the versions of {kernel_package}, busybox-static and {} \
             (apt-cache policy)",
            TOOL_PACKAGES.join(", ")
        ),
    )?;
    let kernel_package_version = candidate_version(&policy, &kernel_package)?;
    let busybox_version = candidate_version(&policy, "busybox-static")?;
    let tools = TOOL_PACKAGES
        .iter()
        .map(|&name| Ok((name.to_owned(), candidate_version(&policy, name)?)))
        .collect::<io::Result<_>>()?;
    Ok(Packages {
        kernel_package,
        kernel_package_version,
        kernel_release,
        busybox_version,
        tools,
    })
}

/// The `Candidate:` version in `package`'s section of `apt-cache policy` output.
pub(crate) fn candidate_version(policy: &str, package: &str) -> io::Result<String> {
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
pub(crate) fn run_apt(cmd: &mut Command, what: &str) -> io::Result<String> {
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

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// Hash of everything that goes into the initramfs besides the packages' contents: which
/// modules, packages and programs, where they go, and the `/init` script.
fn initramfs_contents_hash() -> u64 {
    let mut h = FNV_OFFSET_BASIS;
    h = fnv1a64(BUILDER_REVISION.as_bytes(), h);
    let names = MODULES
        .iter()
        .chain(TOOL_PACKAGES)
        .chain(
            TOOL_PROGRAMS
                .iter()
                .flat_map(|(from, to)| from.iter().chain([to])),
        )
        .chain([&INTERPRETER, &LIBRARY_DIR]);
    for name in names {
        h = fnv1a64(name.as_bytes(), h);
        h = fnv1a64(b"\0", h);
    }
    h = fnv1a64(INIT_SCRIPT.as_bytes(), h);
    fnv1a64(TPM_SCRIPT.as_bytes(), h)
}

/// Hash of the tool packages' names and versions (too many to spell out in the cache key).
fn tools_hash(tools: &[(String, String)]) -> u64 {
    tools.iter().fold(FNV_OFFSET_BASIS, |h, (name, version)| {
        fnv1a64(format!("{name}={version}\n").as_bytes(), h)
    })
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
        "{}_{}_busybox-{}_tools-{:016x}_init-{contents_hash:016x}",
        p.kernel_release,
        sanitize(&p.kernel_package_version),
        sanitize(&p.busybox_version),
        tools_hash(&p.tools)
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
pub(crate) fn remove_stale_temp_dirs(cache_root: &Path) -> io::Result<()> {
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

    let mut specs = vec![
        format!("{}={}", p.kernel_package, p.kernel_package_version),
        format!("busybox-static={}", p.busybox_version),
    ];
    specs.extend(
        p.tools
            .iter()
            .map(|(name, version)| format!("{name}={version}")),
    );
    run_apt(
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
    let tools = tool_files(&root)?;

    let initrd = dir.join("initrd.img");
    write_initramfs(&initrd, &busybox, &module_dir, &tools)?;
    let kernel = dir.join("vmlinuz");
    fs::copy(&vmlinuz, &kernel).map_err(|e| with_path(&e, "copy", &vmlinuz))?;
    let mut meta = format!(
        "kernel_package={}\nkernel_package_version={}\nkernel_release={}\n\
         busybox_version={}\ninit_hash={contents_hash:016x}\n",
        p.kernel_package, p.kernel_package_version, p.kernel_release, p.busybox_version
    );
    for (name, version) in &p.tools {
        writeln!(meta, "tool_package={name}={version}").expect("writing to a String cannot fail");
    }
    for tool in &tools {
        writeln!(meta, "tool_file=/{}", tool.dest).expect("writing to a String cannot fail");
    }
    fs::write(dir.join(META_FILE), meta)?;

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

/// A file of the unpacked tool packages that goes into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ToolFile {
    /// Its path in the initramfs, without the leading `/` (`usr/sbin/qemu-ga`).
    dest: String,
    /// The file in the unpacked packages, symlinks resolved.
    source: PathBuf,
    /// Its mode bits in the initramfs.
    perm: u32,
}

/// The programs of [`TOOL_PROGRAMS`], the dynamic loader and every shared library the
/// programs load, all from the packages unpacked in `root`.
///
/// The libraries are those the unpacked loader itself resolves (`--list`) with only the
/// unpacked library folders on its search path; one it finds nowhere, or only on the host
/// (through the host's loader cache), is an error naming it.
fn tool_files(root: &Path) -> io::Result<Vec<ToolFile>> {
    let root = fs::canonicalize(root).map_err(|e| with_path(&e, "resolve", root))?;
    let loader = resolve_in_root(&root, INTERPRETER)?.ok_or_else(|| {
        io::Error::other(format!(
            "the unpacked packages have no /{INTERPRETER} (libc6 provides it)"
        ))
    })?;
    let search_path =
        std::env::join_paths([LIBRARY_DIR, &format!("usr/{LIBRARY_DIR}")].map(|d| root.join(d)))
            .map_err(|e| io::Error::other(format!("unusable library search path: {e}")))?;
    let mut files = std::collections::BTreeMap::new();
    files.insert(INTERPRETER.to_owned(), (loader.clone(), 0o755));
    for &(candidates, dest) in TOOL_PROGRAMS {
        let mut program = None;
        for candidate in candidates {
            program = resolve_in_root(&root, candidate)?;
            if program.is_some() {
                break;
            }
        }
        let program = program.ok_or_else(|| {
            io::Error::other(format!(
                "none of the packages {} holds {}",
                TOOL_PACKAGES.join(", "),
                candidates.join(" or ")
            ))
        })?;
        let out = Command::new(&loader)
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("LD_PRELOAD")
            .arg("--library-path")
            .arg(&search_path)
            .arg("--list")
            .arg(&program)
            .output()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot run the unpacked loader {}: {e}", loader.display()),
                )
            })?;
        let listing = String::from_utf8_lossy(&out.stdout);
        let libraries = parse_loader_list(&listing).map_err(|missing| {
            io::Error::other(format!(
                "/{dest} needs {missing}, which none of the packages {} holds: add the \
                 package that has it to TOOL_PACKAGES",
                TOOL_PACKAGES.join(", ")
            ))
        })?;
        if !out.status.success() || libraries.is_empty() {
            return Err(io::Error::other(format!(
                "listing the shared libraries of /{dest} with {} --list failed ({}): {} {}",
                loader.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                listing.trim()
            )));
        }
        for (name, path) in libraries {
            if let Some(interpreter) = name.strip_prefix('/') {
                if interpreter != INTERPRETER {
                    return Err(io::Error::other(format!(
                        "/{dest} asks for the loader {name}, expected /{INTERPRETER}"
                    )));
                }
                continue;
            }
            let outside = || {
                io::Error::other(format!(
                    "/{dest} needs {name}, which none of the packages {} holds (the loader \
                     found {path} instead): add the package that has it to TOOL_PACKAGES",
                    TOOL_PACKAGES.join(", ")
                ))
            };
            let relative = Path::new(&path)
                .strip_prefix(&root)
                .map_err(|_| outside())?;
            let source =
                resolve_in_root(&root, &relative.to_string_lossy())?.ok_or_else(outside)?;
            files.insert(format!("{LIBRARY_DIR}/{name}"), (source, 0o644));
        }
        files.insert(dest.to_owned(), (program, 0o755));
    }
    Ok(files
        .into_iter()
        .map(|(dest, (source, perm))| ToolFile { dest, source, perm })
        .collect())
}

/// `(name, path)` of each `NAME => PATH (0xADDRESS)` line the loader's `--list` prints (the
/// loader itself is listed under the path programs ask for it by); lines without `=>`, such
/// as the vDSO's, are skipped. The error lists the libraries it did not find.
fn parse_loader_list(listing: &str) -> Result<Vec<(String, String)>, String> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for line in listing.lines() {
        let Some((name, rest)) = line.trim().split_once(" => ") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with("not found") {
            missing.push(name.trim());
            continue;
        }
        let path = rest.rsplit_once(" (0x").map_or(rest, |(path, _)| path);
        found.push((name.trim().to_owned(), path.to_owned()));
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(missing.join(", "))
    }
}

/// `path` (relative to `root`) with every symlink followed as if `root` were `/`: packages
/// hold absolute links (`lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...`) that must
/// not lead to the host's files. `None` if it does not exist in `root`.
fn resolve_in_root(root: &Path, path: &str) -> io::Result<Option<PathBuf>> {
    use std::ffi::OsString;
    use std::path::Component;

    /// The components still to walk, last first.
    fn push_reversed(pending: &mut Vec<OsString>, path: &Path) {
        for c in path.components().rev() {
            match c {
                Component::Normal(name) => pending.push(name.to_owned()),
                Component::ParentDir => pending.push("..".into()),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
    }

    let mut pending = Vec::new();
    push_reversed(&mut pending, Path::new(path));
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let full = root.join(&candidate);
        let meta = match fs::symlink_metadata(&full) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(with_path(&e, "inspect", &full)),
        };
        if !meta.file_type().is_symlink() {
            resolved = candidate;
            continue;
        }
        links += 1;
        if links > 40 {
            return Err(io::Error::other(format!(
                "too many symbolic links below {} resolving {path}",
                root.display()
            )));
        }
        let target = fs::read_link(&full).map_err(|e| with_path(&e, "read the link", &full))?;
        if target.is_absolute() {
            resolved = PathBuf::new();
        }
        push_reversed(&mut pending, &target);
    }
    Ok(Some(root.join(resolved)))
}

fn write_initramfs(
    out: &Path,
    busybox: &Path,
    module_dir: &Path,
    tools: &[ToolFile],
) -> io::Result<()> {
    let file = File::create(out).map_err(|e| with_path(&e, "create", out))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    // Every folder before what it holds: a sorted set lists "usr" before "usr/sbin".
    let mut dirs: std::collections::BTreeSet<&str> = [
        "bin",
        "dev",
        "lib",
        "lib/modules",
        "mnt",
        "proc",
        "root",
        "run",
        "sys",
        "tmp",
    ]
    .into();
    for tool in tools {
        dirs.extend(
            Path::new(&tool.dest)
                .ancestors()
                .skip(1)
                .filter_map(Path::to_str)
                .filter(|d| !d.is_empty()),
        );
    }
    for d in dirs {
        cpio.dir(d, 0o755)?;
    }
    // The kernel opens /dev/console for PID 1's stdio before /init mounts devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    cpio.file("bin/rwtpm", 0o755, TPM_SCRIPT.as_bytes())?;
    let busybox_bytes = fs::read(busybox).map_err(|e| with_path(&e, "read", busybox))?;
    cpio.file("bin/busybox", 0o755, &busybox_bytes)?;
    cpio.symlink("bin/sh", "busybox")?;
    for name in MODULES {
        let module = load_module(module_dir, name)?;
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &module)?;
    }
    for tool in tools {
        let bytes = fs::read(&tool.source).map_err(|e| with_path(&e, "read", &tool.source))?;
        cpio.file(&tool.dest, tool.perm, &bytes)?;
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
            write!(header, "{f:08X}").expect("writing to a String cannot fail");
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
        assert!(INIT_SCRIPT.contains(&format!("echo \"{AGENT_MARKER} pid=")));
        assert!(INIT_SCRIPT.contains(&format!("echo \"{FS_MARKER} $dev ext4")));
        assert!(INIT_SCRIPT.contains(&format!("echo \"{FSWRITE_PREFIX}$i synced\"")));
    }

    #[test]
    fn init_script_runs_the_programs_it_is_given() {
        for (_, dest) in TOOL_PROGRAMS {
            assert!(
                INIT_SCRIPT.contains(&format!("/{dest} ")),
                "/init never runs /{dest}"
            );
        }
    }

    #[test]
    fn loader_listing_is_parsed() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd5b9e8000)\n\
            \tlibudev.so.1 => /c/root dir/usr/lib/x86_64-linux-gnu/libudev.so.1 (0x00007f27)\n\
            \t/lib64/ld-linux-x86-64.so.2 => /c/root dir/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_loader_list(listing).unwrap(),
            vec![
                (
                    "libudev.so.1".to_owned(),
                    "/c/root dir/usr/lib/x86_64-linux-gnu/libudev.so.1".to_owned()
                ),
                (
                    "/lib64/ld-linux-x86-64.so.2".to_owned(),
                    "/c/root dir/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".to_owned()
                ),
            ]
        );
        let missing = "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /r/libc.so.6 (0x1)\n\
                       \tlibbar.so.2 => not found\n";
        assert_eq!(
            parse_loader_list(missing).unwrap_err(),
            "libfoo.so.1, libbar.so.2"
        );
    }

    #[test]
    fn symlinks_resolve_inside_the_unpacked_root() {
        let root = std::env::temp_dir().join(format!("rewind-guest-links-{}", std::process::id()));
        drop(fs::remove_dir_all(&root));
        fs::create_dir_all(root.join("lib/x86_64-linux-gnu")).unwrap();
        fs::create_dir_all(root.join("lib64")).unwrap();
        fs::write(root.join("lib/x86_64-linux-gnu/ld.so"), b"loader").unwrap();
        fs::write(root.join("lib/x86_64-linux-gnu/libx.so.1.2"), b"x").unwrap();
        let link = |target: &str, at: &str| {
            std::os::unix::fs::symlink(target, root.join(at)).unwrap();
        };
        // Absolute, as in libc6: must not lead to the host's /lib.
        link("/lib/x86_64-linux-gnu/ld.so", "lib64/ld.so");
        link("libx.so.1.2", "lib/x86_64-linux-gnu/libx.so.1");
        link("../lib/x86_64-linux-gnu/libx.so.1", "lib64/libx.so.1");
        link("/nowhere", "lib64/dangling");
        link("loop-b", "lib64/loop-a");
        link("loop-a", "lib64/loop-b");

        let resolve = |p: &str| resolve_in_root(&root, p);
        let lib = root.join("lib/x86_64-linux-gnu");
        assert_eq!(resolve("lib64/ld.so").unwrap(), Some(lib.join("ld.so")));
        assert_eq!(resolve("/lib64/ld.so").unwrap(), Some(lib.join("ld.so")));
        assert_eq!(
            resolve("lib64/libx.so.1").unwrap(),
            Some(lib.join("libx.so.1.2"))
        );
        assert_eq!(
            resolve("lib64/../lib64/ld.so").unwrap(),
            Some(lib.join("ld.so"))
        );
        assert_eq!(resolve("lib64/dangling").unwrap(), None);
        assert_eq!(resolve("usr/sbin/missing").unwrap(), None);
        assert!(resolve("lib64/loop-a").is_err());
        fs::remove_dir_all(&root).unwrap();
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
            tools: vec![("qemu-guest-agent".into(), "1:7.2+dfsg-7+deb12u18+b3".into())],
        };
        let key = cache_key(&p, 0xabc);
        let tools = format!("{:016x}", tools_hash(&p.tools));
        assert_eq!(
            key,
            format!(
                "6.1.0-56-cloud-amd64_6.1.192-2_busybox-1_1.35.0-4+deb12u1+b1_tools-{tools}\
                 _init-0000000000000abc"
            )
        );
        assert!(
            key.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
        );
        // Another version of any tool package is another image.
        let mut newer = p.tools.clone();
        newer[0].1.push_str("+deb12u19");
        assert_ne!(tools_hash(&newer), tools_hash(&p.tools));
    }
}
