//! A restore touches only what the VM is (issue 19): a checkpoint whose manifest was edited
//! in the store — a disk source, the NVRAM file, the TPM state folder, the domain definition
//! pointing outside, through a link, or at host devices — is refused before anything
//! changes: files outside are byte-identical afterwards, and the VM runs on, untouched.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use rewind_tests::pool::TestPool;
use rewind_tests::scratch::ScratchDir;
use rewind_tests::{TestVm, daemon};

use super::{
    booted_uefi_tpm_guest, firmware_state, open, rewind_fails, rewind_json, store_with_checkpoint,
};

/// Everything under `dir` without following links: each entry's path, what it is (with a
/// link's target), its permission bits and a file's content.
fn tree(dir: &Path) -> Vec<(PathBuf, String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(dir).unwrap().to_path_buf();
            let mode = meta.permissions().mode();
            if meta.file_type().is_symlink() {
                let to = std::fs::read_link(&path).unwrap();
                out.push((rel, format!("link to {}", to.display()), mode, Vec::new()));
            } else if meta.is_dir() {
                out.push((rel, "folder".into(), mode, Vec::new()));
                stack.push(path);
            } else {
                out.push((rel, "file".into(), mode, std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `xml` with the emulated TPM's state folder set to `dir`.
fn with_tpm_folder(xml: &str, dir: &Path) -> String {
    let start = xml
        .find("<backend type='emulator'")
        .expect("an emulated TPM");
    let end = start + xml[start..].find('>').unwrap();
    let source = format!("<source type='dir' path='{}'/>", dir.display());
    if xml[..end].ends_with('/') {
        format!("{}>{source}</backend>{}", &xml[..end - 1], &xml[end + 1..])
    } else {
        format!("{}>{source}{}", &xml[..end], &xml[end + 1..])
    }
}

/// Files and folders outside the VM's files and libvirt's folders, which no restore may
/// touch: a file, an NVRAM file, a folder with files (as a TPM state folder), a log; and a
/// storage pool with a link out to them.
struct Canaries {
    outside: ScratchDir,
    pool: TestPool,
    file: PathBuf,
    nvram: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    before: Vec<(PathBuf, String, u32, Vec<u8>)>,
}

impl Canaries {
    fn make() -> Self {
        let outside = ScratchDir::new("confine-canaries").unwrap();
        let file = outside.path().join("canary.img");
        let pattern: Vec<u8> = (0..1u32 << 20)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        std::fs::write(&file, &pattern).unwrap();
        let nvram = outside.path().join("nvram.fd");
        std::fs::write(&nvram, b"not UEFI variables").unwrap();
        let dir = outside.path().join("tpm");
        std::fs::create_dir_all(dir.join("tpm2")).unwrap();
        std::fs::write(dir.join("tpm2/tpm2-00.permall"), b"another TPM").unwrap();
        std::fs::write(dir.join("keep"), b"keep me").unwrap();
        let log = outside.path().join("console.log");
        std::fs::write(&log, b"a log nobody may append to").unwrap();
        let pool = TestPool::create("confine-pool").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(outside.path(), pool.path().join("out")).unwrap();
        let before = tree(outside.path());
        Self {
            outside,
            pool,
            file,
            nvram,
            dir,
            log,
            before,
        }
    }

    fn unchanged(&self) -> bool {
        tree(self.outside.path()) == self.before
    }
}

/// Writes `manifest` as the store's manifest file at `path`, as Rewind writes them.
fn write_manifest(path: &Path, manifest: &serde_json::Value) {
    let mut bytes = serde_json::to_vec(manifest).unwrap();
    bytes.push(b'\n');
    std::fs::write(path, &bytes).unwrap();
}

/// Manifest `json` of a checkpoint of `vm` edited to point at `canaries`: what each case
/// is, the manifest, and what the refusal must say.
fn edited_manifests(
    vm: &TestVm,
    json: &serde_json::Value,
    canaries: &Canaries,
) -> Vec<(&'static str, serde_json::Value, String)> {
    let xml = json["domain_xml"].as_str().unwrap().to_owned();
    let (nvram, _) = firmware_state(vm);
    let console = vm.dir().join("console.log").display().to_string();
    let with_source = |source: &Path| {
        let mut edited = json.clone();
        edited["disks"][0]["source"] = source.display().to_string().into();
        edited
    };
    let with_xml = |new_xml: String| {
        assert_ne!(new_xml, xml, "the definition is edited");
        let mut edited = json.clone();
        edited["domain_xml"] = new_xml.into();
        edited
    };
    let hostdev = "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x3'/></source></hostdev></devices>";
    let qemu_args = xml
        .replacen(
            "<domain ",
            "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' ",
            1,
        )
        .replace(
            "</domain>",
            "<qemu:commandline><qemu:arg value='-device'/><qemu:arg value='x'/></qemu:commandline></domain>",
        );
    let dotdot = vm
        .dir()
        .join("..")
        .join(canaries.outside.path().file_name().unwrap())
        .join("canary.img");
    let (nvram_now, canary_nvram) = (nvram.display().to_string(), &canaries.nvram);
    let canary_log = &canaries.log;
    vec![
        (
            "a disk source outside",
            with_source(&canaries.file),
            format!("disk vda's image \"{}\"", canaries.file.display()),
        ),
        (
            "a disk source with ..",
            with_source(&dotdot),
            "is not a plain absolute path".to_owned(),
        ),
        (
            "a disk source in a pool whose folder links out",
            with_source(&canaries.pool.path().join("out/canary.img")),
            "leads elsewhere through a symbolic link".to_owned(),
        ),
        (
            "the NVRAM file outside",
            with_xml(xml.replace(&nvram_now, &canary_nvram.display().to_string())),
            format!("the UEFI variable store \"{}\"", canary_nvram.display()),
        ),
        (
            "the TPM state folder outside",
            with_xml(with_tpm_folder(&xml, &canaries.dir)),
            "swtpm's state folder of this VM".to_owned(),
        ),
        (
            "a host device",
            with_xml(xml.replace("</devices>", hostdev)),
            "<hostdev type='pci'> (a device of the host)".to_owned(),
        ),
        (
            "a serial log outside",
            with_xml(xml.replace(&console, &canary_log.display().to_string())),
            format!("the serial's file \"{}\"", canary_log.display()),
        ),
        (
            "QEMU arguments",
            with_xml(qemu_args),
            "passes arguments to QEMU past libvirt".to_owned(),
        ),
    ]
}

#[test]
fn a_checkpoint_edited_in_the_store_is_refused_before_anything_changes() {
    let mut vm = booted_uefi_tpm_guest("confine");
    let (_dir, dest, id) = store_with_checkpoint(&vm, "confine-store");
    let dest_str = dest.to_str().unwrap();
    let store = open(&dest);
    let m = super::manifest(&store, &id);
    // The checkpoint has UEFI variables and TPM state: a restore would write them where
    // its definition says.
    assert!(
        ["nvram", "tpm"]
            .iter()
            .all(|b| m.blobs.iter().any(|x| x.name == *b)),
        "{:?}",
        m.blobs
    );
    let manifest_path = dest
        .join("manifests")
        .join(&vm.uuid)
        .join(format!("{id}.manifest"));
    let original = std::fs::read(&manifest_path).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let canaries = Canaries::make();

    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    let running_as = vm.domain().id().unwrap();
    let definition = hv.persistent_xml(&vm.name).unwrap();
    let (_, tpm_dir) = firmware_state(&vm);
    let tpm_before = super::files_under(&tpm_dir);
    for (case, edited, said) in edited_manifests(&vm, &json, &canaries) {
        assert_ne!(edited, json, "{case}: the manifest is edited");
        write_manifest(&manifest_path, &edited);
        let stderr = rewind_fails(&["restore", &vm.name, &id, "--from", dest_str, "--force-off"]);
        eprintln!("{case}: {stderr}");
        assert!(
            stderr.contains("was refused, and nothing was changed") && stderr.contains(&said),
            "{case}: expected {said:?} in: {stderr}"
        );
        assert!(
            stderr.contains("store may have been altered"),
            "{case}: {stderr}"
        );
        // Nothing changed: the files outside, the VM (the same QEMU process runs on, with
        // the same definition and TPM state), the store (no safety checkpoint was taken).
        assert!(canaries.unchanged(), "{case}: the canaries changed");
        assert!(
            vm.domain().is_active().unwrap(),
            "{case}: the VM was stopped"
        );
        assert_eq!(vm.domain().id().unwrap(), running_as, "{case}: restarted");
        assert_eq!(hv.persistent_xml(&vm.name).unwrap(), definition, "{case}");
        assert_eq!(
            super::files_under(&tpm_dir),
            tpm_before,
            "{case}: TPM state"
        );
        let checkpoints = open(&dest).catalog().unwrap().checkpoints;
        assert_eq!(
            checkpoints.len(),
            1,
            "{case}: a safety checkpoint was taken"
        );
        assert!(!super::marker_path(&vm.uuid).exists(), "{case}");
    }

    an_emulator_of_the_stores_choosing_is_left_out(&vm, &json, &manifest_path, &canaries);
    assert!(canaries.unchanged(), "the canaries changed");
    std::fs::write(&manifest_path, &original).unwrap();
    vm.destroy().unwrap();
}

/// What is unsafe but not needed is made safe instead of refused: QEMU as a program of the
/// store's choosing is left out (libvirt runs its own), and the restore says so. The
/// restore then goes through: disk, UEFI variables and TPM state where the VM keeps them.
fn an_emulator_of_the_stores_choosing_is_left_out(
    vm: &TestVm,
    json: &serde_json::Value,
    manifest_path: &Path,
    canaries: &Canaries,
) {
    let work = ScratchDir::new("confine-program").unwrap();
    let ran = work.path().join("ran");
    let program = work.path().join("qemu.sh");
    let script = format!(
        "#!/bin/sh\ntouch {}\nexec /usr/bin/qemu-system-x86_64 \"$@\"\n",
        ran.display()
    );
    std::fs::write(&program, script).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut edited = json.clone();
    let xml = json["domain_xml"].as_str().unwrap();
    let program_str = program.display().to_string();
    edited["domain_xml"] = xml
        .replace("/usr/bin/qemu-system-x86_64", &program_str)
        .into();
    write_manifest(manifest_path, &edited);
    let id = json["id"].as_str().unwrap();
    let dest = manifest_path.ancestors().nth(3).unwrap();
    let report = rewind_json(&[
        "restore",
        &vm.name,
        id,
        "--from",
        dest.to_str().unwrap(),
        "--force-off",
        "--no-start",
    ]);
    eprintln!("made safe: {report:#}");
    let made_safe = report["made_safe"].to_string();
    assert!(
        made_safe.contains("<emulator>") && made_safe.contains(&program_str),
        "{report}"
    );
    assert_eq!(
        (report["nvram"].clone(), report["tpm"].clone()),
        (true.into(), true.into()),
        "{report}"
    );
    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    let defined = hv.persistent_xml(&vm.name).unwrap();
    assert!(
        defined.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"),
        "{defined}"
    );
    assert!(!ran.exists(), "libvirt ran the store's program");
    let store = open(dest);
    let m = super::manifest(&store, id);
    let blob = m.blobs.iter().find(|b| b.name == "nvram").unwrap();
    let (nvram, _) = firmware_state(vm);
    let saved = store
        .object_reader(&blob.index)
        .unwrap()
        .read_all()
        .unwrap();
    assert!(
        std::fs::read(&nvram).unwrap() == saved,
        "the UEFI variables went where the VM keeps them"
    );
    assert!(canaries.unchanged());
}
