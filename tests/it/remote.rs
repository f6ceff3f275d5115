//! Writing a VM onto another libvirt host through the libvirt connection alone (issue 5, the
//! disaster-recovery case): disk volumes, UEFI NVRAM and TPM state. A real sshd on loopback
//! makes the local daemon the "other host" (`qemu+ssh://root@127.0.0.1:PORT/system`); the
//! test checks the results on the local file system, which Rewind itself never touches.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rewind_core::Error;
use rewind_core::libvirt::Hypervisor;
use rewind_core::libvirt::volumes::{FILE_POOL_PREFIX, VolumeWriter};
use rewind_core::progress::Control;
use rewind_tests::pool::{TestPool, pool_targets};
use rewind_tests::scratch::ScratchDir;
use rewind_tests::sshd::Sshd;
use rewind_tests::{TestVm, daemon};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 64 * MIB;
const BOOT_TIMEOUT: Duration = Duration::from_mins(4);
/// Where libvirt has swtpm log, per VM.
const SWTPM_LOGS: &str = "/var/log/swtpm/libvirt/qemu";

fn start_sshd() -> Sshd {
    rewind_tests::setup().expect("test set-up");
    Sshd::start().unwrap_or_else(|e| panic!("{e}"))
}

fn connect(sshd: &Sshd) -> Hypervisor {
    Hypervisor::connect(&sshd.libvirt_uri())
        .unwrap_or_else(|e| panic!("{e:#}\nsshd log:\n{}", sshd.log()))
}

fn pool(label: &str) -> TestPool {
    TestPool::create(label).unwrap_or_else(|e| panic!("{e}"))
}

/// Deterministic bytes that are never all zero over 64 KiB.
fn data(offset: u64, len: usize) -> Vec<u8> {
    let mut x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0] | 1
        })
        .collect()
}

/// One piece of a disk's content, in the order the restore engine would give it.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Data, written in writes of at most this many bytes.
    Data { len: u64, write_bytes: u64 },
    /// Zeroes given as data (must go as a hole).
    Zeroes(u64),
    /// A hole.
    Hole(u64),
}

/// 64 MiB: data at the start, a hole, zeroes as data, a tiny unaligned piece of data, data
/// in odd-sized writes, and holes to the end given in several calls. About 4 MiB of data.
fn pattern() -> Vec<Piece> {
    let unaligned = 1000;
    vec![
        Piece::Data {
            len: MIB,
            write_bytes: MIB,
        },
        Piece::Hole(7 * MIB),
        Piece::Zeroes(MIB),
        Piece::Data {
            len: unaligned,
            write_bytes: unaligned,
        },
        Piece::Hole(11 * MIB - unaligned),
        Piece::Data {
            len: 3 * MIB,
            write_bytes: 100 << 10,
        },
        Piece::Hole(20 * MIB),
        Piece::Hole(21 * MIB),
    ]
}

fn data_bytes(pieces: &[Piece]) -> u64 {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Data { len, .. } => *len,
            Piece::Zeroes(_) | Piece::Hole(_) => 0,
        })
        .sum()
}

/// Feeds `pieces` to `w`.
fn fill(w: &mut VolumeWriter<'_>, pieces: &[Piece]) -> Result<(), Error> {
    for piece in pieces {
        match *piece {
            Piece::Data { len, write_bytes } => {
                let mut done = 0;
                while done < len {
                    let n = write_bytes.min(len - done);
                    let at = w.position();
                    w.write(&data(at, usize::try_from(n).unwrap()))?;
                    done += n;
                }
            }
            Piece::Zeroes(len) => w.write(&vec![0; usize::try_from(len).unwrap()])?,
            Piece::Hole(len) => w.hole(len)?,
        }
    }
    Ok(())
}

/// The same content as a local sparse raw file.
fn write_local_raw(path: &Path, pieces: &[Piece]) {
    let file = File::create(path).unwrap();
    let mut at = 0;
    for piece in pieces {
        match *piece {
            Piece::Data { len, write_bytes } => {
                let mut done = 0;
                while done < len {
                    let n = write_bytes.min(len - done);
                    file.write_all_at(&data(at, usize::try_from(n).unwrap()), at)
                        .unwrap();
                    at += n;
                    done += n;
                }
            }
            Piece::Zeroes(len) | Piece::Hole(len) => at += len,
        }
    }
    file.set_len(at).unwrap();
}

/// `qemu-img compare` of the guest-visible content of two images.
fn assert_same_content(raw: &Path, image: &Path, format: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format])
        .arg(raw)
        .arg(image)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "{} does not hold what was sent: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn owner(path: &Path) -> String {
    let out = Command::new("stat")
        .args(["-c", "%U:%G"])
        .arg(path)
        .output()
        .expect("run stat");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn no_file_pools_left() {
    let left: Vec<_> = pool_targets()
        .unwrap()
        .into_iter()
        .filter(|(name, _)| name.starts_with(FILE_POOL_PREFIX))
        .collect();
    assert!(left.is_empty(), "temporary pools left behind: {left:?}");
}

#[test]
fn the_test_sshd_makes_the_local_daemon_a_remote_host_and_can_cut_it_off() {
    let mut sshd = start_sshd();
    let uri = sshd.libvirt_uri();
    assert!(uri.starts_with("qemu+ssh://root@127.0.0.1:"), "{uri}");
    assert!(!uri.contains("no_verify"), "{uri}");

    let virsh = |uri: &str| {
        Command::new("virsh")
            .args(["-c", uri, "list", "--all"])
            .output()
            .expect("run virsh")
    };
    let out = virsh(&uri);
    assert!(
        out.status.success(),
        "virsh through the test sshd: {}\nsshd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
    let hv = connect(&sshd);
    assert!(hv.is_alive());
    hv.list_vms().expect("list the VMs over ssh");
    let libssh = Hypervisor::connect(&sshd.libssh_uri())
        .unwrap_or_else(|e| panic!("libssh transport: {e:#}\nsshd log:\n{}", sshd.log()));
    libssh.list_vms().expect("list the VMs over libssh");
    drop(libssh);

    // Host keys are verified: a wrong one in known_hosts is refused.
    let known = fs::read_to_string(sshd.known_hosts()).unwrap();
    let client_pub = fs::read_to_string(sshd.dir().join("client_ed25519.pub")).unwrap();
    let wrong = format!(
        "[127.0.0.1]:{} {}",
        sshd.port(),
        client_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    fs::write(sshd.known_hosts(), format!("{wrong}\n")).unwrap();
    let out = virsh(&uri);
    fs::write(sshd.known_hosts(), &known).unwrap();
    assert!(!out.status.success(), "a wrong host key was accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Killing the server breaks the open connection at once, like a network cut.
    sshd.kill();
    assert!(!sshd.is_running());
    let deadline = Instant::now() + Duration::from_secs(20);
    while hv.is_alive() && Instant::now() < deadline {
        drop(hv.list_vms());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!hv.is_alive(), "the connection survived killing sshd");
    let e = Hypervisor::connect(&uri).unwrap_err();
    assert!(e.is_retryable(), "{e:?}");

    sshd.restart().unwrap_or_else(|e| panic!("{e}"));
    assert!(sshd.is_running());
    connect(&sshd)
        .list_vms()
        .expect("list the VMs after the restart");
}

#[test]
fn volumes_written_over_ssh_hold_what_was_sent_and_holes_stay_holes() {
    let sshd = start_sshd();
    let hv = connect(&sshd);
    let pool = pool("remote-volumes");
    let local = ScratchDir::new("remote-volumes-local").unwrap();
    let pieces = pattern();
    let raw = local.path().join("expected.raw");
    write_local_raw(&raw, &pieces);
    assert!(hv.pool_names().unwrap().iter().any(|n| n == pool.name()));
    assert!(hv.pool_available_bytes(pool.name()).unwrap() > DISK_BYTES);

    for (name, format) in [("disk.qcow2", "qcow2"), ("disk.raw", "raw")] {
        assert!(!hv.volume_exists(pool.name(), name).unwrap());
        let control = Control::new();
        let mut sent = 0;
        let path = hv
            .create_volume_with(pool.name(), name, format, DISK_BYTES, &control, &mut |w| {
                fill(w, &pieces)?;
                sent = w.sent_data_bytes();
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{format}: {e:#}"));
        assert_eq!(path, pool.path().join(name));
        assert!(hv.volume_exists(pool.name(), name).unwrap());
        // Zeroes given as data went as a hole; only the data crossed the connection.
        assert_eq!(sent, data_bytes(&pieces), "{format}");
        assert_eq!(control.progress_bytes().0, DISK_BYTES, "{format}");

        assert_same_content(&raw, &path, format);
        let info = qemu_img_info(&path);
        assert_eq!(info["format"], format, "{info}");
        assert_eq!(info["virtual-size"], DISK_BYTES, "{info}");
        if format == "qcow2" {
            // v3, so that it can hold the dirty bitmaps of incremental checkpoints.
            assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{info}");
        }
        let allocated = fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated < data_bytes(&pieces) + 2 * MIB,
            "{format}: {allocated} bytes allocated for {} bytes of data: holes were filled",
            data_bytes(&pieces)
        );
    }
    // The qcow2 volume's temporary raw upload is gone.
    assert_eq!(files_in(pool.path()), ["disk.qcow2", "disk.raw"]);
}

#[test]
fn volume_errors_are_clear_and_leave_nothing_behind() {
    let mut sshd = start_sshd();
    let hv = connect(&sshd);
    let pool = pool("remote-volume-errors");
    let pieces = pattern();
    let control = Control::new();
    hv.create_volume_with(
        pool.name(),
        "taken",
        "qcow2",
        DISK_BYTES,
        &control,
        &mut |w| fill(w, &pieces),
    )
    .unwrap();
    let before = fs::read(pool.path().join("taken")).unwrap();

    // A name that exists is refused before anything is written.
    let e = hv
        .create_volume_with(pool.name(), "taken", "raw", MIB, &control, &mut |_| {
            panic!("nothing is written into an existing volume")
        })
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("already exists") && msg.contains("\"taken\"") && msg.contains(pool.name()),
        "{msg}"
    );
    assert_eq!(fs::read(pool.path().join("taken")).unwrap(), before);

    // A pool that does not exist: the error names the ones there are.
    let e = hv
        .create_volume_with("no-such-pool", "x", "raw", MIB, &control, &mut |_| Ok(()))
        .unwrap_err();
    assert!(
        e.to_string().contains("no-such-pool") && e.to_string().contains(pool.name()),
        "{e}"
    );
    let e = hv
        .create_volume_with(pool.name(), "x", "vmdk", MIB, &control, &mut |_| Ok(()))
        .unwrap_err();
    assert!(e.to_string().contains("vmdk"), "{e}");

    // Cancelled in the middle, failing, or covering too little: nothing stays.
    let block = data(0, usize::try_from(MIB).unwrap());
    for format in ["raw", "qcow2"] {
        let cancel = Control::new();
        let e = hv
            .create_volume_with(pool.name(), "cut", format, DISK_BYTES, &cancel, &mut |w| {
                for i in 0..64 {
                    if i == 8 {
                        cancel.cancel();
                    }
                    w.write(&block)?;
                }
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(e, Error::Cancelled), "{format}: {e:?}");
        assert!(!hv.volume_exists(pool.name(), "cut").unwrap(), "{format}");

        let e = hv
            .create_volume_with(pool.name(), "cut", format, DISK_BYTES, &control, &mut |w| {
                w.write(&data(0, 1 << 16))?;
                Err(Error::Invalid("the store is damaged".into()))
            })
            .unwrap_err();
        assert!(e.to_string().contains("damaged"), "{format}: {e}");

        let e = hv
            .create_volume_with(pool.name(), "cut", format, DISK_BYTES, &control, &mut |w| {
                w.hole(DISK_BYTES - 1)
            })
            .unwrap_err();
        assert!(e.to_string().contains("ends at byte"), "{format}: {e}");
        let e = hv
            .create_volume_with(pool.name(), "cut", format, MIB, &control, &mut |w| {
                w.hole(2 * MIB)
            })
            .unwrap_err();
        assert!(e.to_string().contains("runs past"), "{format}: {e}");
        assert_eq!(files_in(pool.path()), ["taken"], "{format}");
    }

    // The connection cut in the middle: a retryable error; the half-made raw volume stays
    // (there is no connection to delete it through) until the retry deletes it.
    let e = hv
        .create_volume_with(pool.name(), "cut", "raw", DISK_BYTES, &control, &mut |w| {
            for i in 0..64 {
                if i == 8 {
                    sshd.kill();
                }
                w.write(&block)?;
            }
            Ok(())
        })
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    sshd.restart().unwrap();
    let hv = connect(&sshd);
    hv.delete_volume(pool.name(), "cut").unwrap();
    hv.delete_volume(pool.name(), "cut").unwrap();
    assert_eq!(files_in(pool.path()), ["taken"]);
}

#[test]
fn a_full_pool_fails_the_upload_clearly_and_keeps_nothing() {
    let sshd = start_sshd();
    let hv = connect(&sshd);
    // Room for the pattern's data once (raw) but not twice (qcow2 converts from a raw copy).
    let pool = TestPool::create_small("remote-full", 6 * MIB).unwrap_or_else(|e| panic!("{e}"));
    let pieces = pattern();
    let control = Control::new();
    let assert_full = |format: &str, e: &Error| {
        let msg = e.to_string();
        assert!(
            msg.contains("is full") && msg.contains(pool.name()) && !e.is_retryable(),
            "{format}: {msg}"
        );
    };
    // qcow2: the upload fits, the conversion does not.
    let e = hv
        .create_volume_with(
            pool.name(),
            "full",
            "qcow2",
            DISK_BYTES,
            &control,
            &mut |w| fill(w, &pieces),
        )
        .unwrap_err();
    assert_full("qcow2", &e);
    assert_eq!(files_in(pool.path()), Vec::<String>::new());
    // raw: the second upload does not fit.
    hv.create_volume_with(
        pool.name(),
        "fits.raw",
        "raw",
        DISK_BYTES,
        &control,
        &mut |w| fill(w, &pieces),
    )
    .expect("the data fits once");
    let e = hv
        .create_volume_with(pool.name(), "full", "raw", DISK_BYTES, &control, &mut |w| {
            fill(w, &pieces)
        })
        .unwrap_err();
    assert_full("raw", &e);
    assert_eq!(files_in(pool.path()), ["fits.raw"]);
}

#[test]
fn host_files_are_written_through_libvirt_alone() {
    let sshd = start_sshd();
    let hv = connect(&sshd);
    let scratch = ScratchDir::new("remote-files").unwrap();

    // Missing folders are made; the file gets the mode asked for.
    let nvram = scratch.path().join("qemu/nvram/vm_VARS.fd");
    let vars = data(7, 540_672);
    hv.write_host_file(&nvram, &vars, 0o600).unwrap();
    assert_eq!(fs::read(&nvram).unwrap(), vars);
    assert_eq!(mode(&nvram), 0o600);
    assert_eq!(owner(&nvram), "root:root");
    assert_eq!(
        mode(nvram.parent().unwrap()),
        0o711,
        "the folder libvirt built"
    );

    // An existing file is replaced, also by a shorter one; an empty file works too.
    let shorter = data(8, 1000);
    hv.write_host_file(&nvram, &shorter, 0o640).unwrap();
    assert_eq!(fs::read(&nvram).unwrap(), shorter);
    assert_eq!(mode(&nvram), 0o640);
    let empty = nvram.with_file_name("empty");
    hv.write_host_file(&empty, &[], 0o600).unwrap();
    assert_eq!(fs::read(&empty).unwrap(), b"");

    // An existing folder keeps its mode; other files in it are left alone.
    let tpm = scratch.path().join("qemu/nvram/tpm2-00.permall");
    fs::set_permissions(nvram.parent().unwrap(), fs::Permissions::from_mode(0o750)).unwrap();
    hv.write_host_file(&tpm, &data(9, 6116), 0o600).unwrap();
    assert_eq!(mode(nvram.parent().unwrap()), 0o750);
    assert_eq!(fs::read(&nvram).unwrap(), shorter);
    no_file_pools_left();

    // A folder that a pool already owns is written through that pool, which stays active.
    let pool = pool("remote-files-pool");
    let in_pool = pool.path().join("file.bin");
    hv.write_host_file(&in_pool, b"through the pool", 0o644)
        .unwrap();
    assert_eq!(fs::read(&in_pool).unwrap(), b"through the pool");
    assert!(pool.is_active());
    no_file_pools_left();

    // What is in the way stays: a folder where the file should be, a file as its folder.
    let folder = pool.path().join("folder");
    fs::create_dir(&folder).unwrap();
    let e = hv.write_host_file(&folder, b"x", 0o600).unwrap_err();
    assert!(e.to_string().contains("not a file"), "{e}");
    assert!(folder.is_dir());
    let e = hv
        .write_host_file(&in_pool.join("x"), b"x", 0o600)
        .unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    assert_eq!(fs::read(&in_pool).unwrap(), b"through the pool");
    let e = hv
        .write_host_file(Path::new("relative/x"), b"", 0o600)
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    no_file_pools_left();
}

#[test]
fn a_uefi_tpm_vm_starts_from_nvram_and_tpm_state_written_over_ssh() {
    let sshd = start_sshd();
    let mut vm = TestVm::builder("remote-uefi-tpm")
        .uefi()
        .tpm()
        .memory_mib(256)
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("first boot");
    vm.destroy().unwrap();

    let hv = connect(&sshd);
    let info = hv.vm(&vm.name).unwrap();
    let nvram = info.firmware.nvram_path().expect("an NVRAM path").clone();
    let tpm_dir = info
        .tpm
        .as_ref()
        .and_then(|t| t.state_path.clone())
        .expect("a TPM state folder");
    let permall = tpm_dir.join("tpm2/tpm2-00.permall");
    let vars = fs::read(&nvram).expect("the first boot made the NVRAM");
    let state = fs::read(&permall).expect("the first boot made the TPM state");

    // As on a new host: neither exists until Rewind writes them through libvirt.
    fs::remove_file(&nvram).unwrap();
    fs::remove_dir_all(&tpm_dir).unwrap();
    hv.write_host_file(&nvram, &vars, 0o600).unwrap();
    hv.write_host_file(&permall, &state, 0o600).unwrap();
    no_file_pools_left();
    assert_eq!(owner(&nvram), "root:root");
    assert_eq!(owner(&permall), "root:root");

    let swtpm_log = Path::new(SWTPM_LOGS).join(format!("{}-swtpm.log", vm.name));
    let log_before = fs::read_to_string(&swtpm_log).unwrap_or_default();
    assert!(
        log_before.contains("manufacturing"),
        "the first boot made a TPM:\n{log_before}"
    );
    let log_before = log_before.len();
    vm.start_and_wait_ready(BOOT_TIMEOUT)
        .expect("boot from the NVRAM and TPM state written over ssh");
    // libvirt hands the files to the users that run QEMU and swtpm when the VM starts.
    assert_eq!(owner(&nvram), "libvirt-qemu:libvirt-qemu");
    assert_eq!(owner(&permall), "tss:tss");
    assert_eq!(owner(permall.parent().unwrap()), "tss:tss");
    // swtpm took the state it found instead of making a new TPM.
    let log = fs::read_to_string(&swtpm_log).unwrap_or_default();
    let new_lines = log.get(log_before..).unwrap_or_default();
    assert!(
        !new_lines.contains("manufacturing"),
        "swtpm made a new TPM instead of using the state written:\n{new_lines}"
    );
    vm.destroy().unwrap();
}

/// Not a pass/fail test: how fast a 1 GiB disk travels over the loopback ssh URI, as raw
/// and as qcow2, all data or one tenth data and the rest holes, next to the local socket.
/// Run with
/// `cargo test -p rewind --test integration remote::upload_speed -- --ignored --nocapture`.
#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn upload_speed() {
    let sshd = start_sshd();
    let pool = pool("remote-speed");
    let size = 1024 * MIB;
    let block_bytes = 4 * MIB;
    let block = data(1, usize::try_from(block_bytes).unwrap());
    for (label, uri) in [
        ("ssh", sshd.libvirt_uri()),
        ("local", daemon::URI.to_owned()),
    ] {
        let hv = Hypervisor::connect(&uri).unwrap();
        for (content, every) in [("all data", 1), ("1/10 data", 10)] {
            for format in ["raw", "qcow2"] {
                let name = format!("speed-{label}.{format}");
                let control = Control::new();
                let started = Instant::now();
                let mut upload = Duration::ZERO;
                hv.create_volume_with(pool.name(), &name, format, size, &control, &mut |w| {
                    let mut i = 0;
                    while w.position() < size {
                        if i % every == 0 {
                            w.write(&block)?;
                        } else {
                            w.hole(block_bytes)?;
                        }
                        i += 1;
                    }
                    upload = started.elapsed();
                    Ok(())
                })
                .unwrap();
                let total = started.elapsed();
                #[allow(clippy::cast_precision_loss)]
                let mib_s = |d: Duration| (size / MIB) as f64 / d.as_secs_f64();
                println!(
                    "| {label} | {content} | {format} | {:.1} s ({:.0} MiB/s) | {:.1} s |",
                    upload.as_secs_f64(),
                    mib_s(upload),
                    total.as_secs_f64(),
                );
                hv.delete_volume(pool.name(), &name).unwrap();
            }
        }
    }
}
