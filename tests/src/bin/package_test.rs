//! `package-test DEB`: installs Rewind's Debian package on this machine as a user would
//! (`apt-get install ./rewind_….deb`), checks what it installed, starts the protection
//! service as its systemd unit says (by hand where systemd does not run), and then, from
//! the installed files alone, a normal user in the `libvirt` group lists the VMs, takes a
//! checkpoint of a test VM and sees it listed. Last it purges the package: none of its files
//! may stay, and the stores (the user's, and one put inside Rewind's own state folder) must
//! be untouched.
//!
//! `./x test` runs it after `cargo test`, with the package `./x deb` built. It needs root,
//! and a machine where Rewind's package is not installed yet. Whatever happens, it leaves
//! the package purged and nothing of its own behind.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use rewind_tests::package::{self, Completions, run_ok};
use rewind_tests::scratch::ScratchDir;
use rewind_tests::tray_host::TrayHost;
use rewind_tests::users::TestUser;
use rewind_tests::xvfb::Xvfb;
use rewind_tests::{TestVm, a11y, assert_success};

/// The package's name.
const PACKAGE: &str = "rewind";
/// The installed program.
const BINARY: &str = "/usr/bin/rewind";
/// The service's socket when started as its unit says.
const SOCKET: &str = "/run/rewind/rewind.sock";
/// The service's own folders (the unit's `ConfigurationDirectory` and `StateDirectory`).
const CONFIG_DIR: &str = "/etc/rewind";
const STATE_DIR: &str = "/var/lib/rewind";
/// A store put inside the service's state folder, which purging must keep.
const STORE_IN_STATE_DIR: &str = "/var/lib/rewind/a-store-kept-here";

fn apt_get(args: &[&str]) -> Command {
    let mut command = Command::new("apt-get");
    command
        .args(["-y", "-q", "-o", "Dpkg::Use-Pty=0"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive");
    command
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Whether systemd runs this machine (then the package's scripts start the service).
fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Purges the package (and stops the service started by hand) when dropped: also when a
/// check fails.
struct Installed {
    service: Option<Child>,
}

impl Installed {
    fn stop_service(&mut self) {
        if let Some(mut child) = self.service.take() {
            drop(
                Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status(),
            );
            let deadline = Instant::now() + Duration::from_mins(3);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(child.kill());
            drop(child.wait());
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        self.stop_service();
        if installed() {
            drop(apt_get(&["purge", PACKAGE]).stdout(Stdio::null()).status());
        }
        drop(std::fs::remove_dir_all(STORE_IN_STATE_DIR));
        drop(std::fs::remove_dir(STATE_DIR));
    }
}

/// The unit's `[Service]` settings, key by key (a key given twice keeps every value).
fn unit_settings(unit: &Path) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(unit).unwrap();
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((key, value)) = line.split_once('=')
        {
            settings
                .entry(key.trim().to_owned())
                .or_default()
                .push(value.trim().to_owned());
        }
    }
    settings
}

/// Starts the service as `unit` says, where systemd would: its folders with their modes,
/// its environment and umask, its `ExecStart`, as root.
fn start_as_unit_says(unit: &Path, log: &Path) -> Child {
    let settings = unit_settings(unit);
    let one = |key: &str| settings.get(key).and_then(|v| v.last()).cloned();
    for (dir_key, base) in [
        ("RuntimeDirectory", "/run"),
        ("StateDirectory", "/var/lib"),
        ("ConfigurationDirectory", "/etc"),
    ] {
        if let Some(name) = one(dir_key) {
            let dir = Path::new(base).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let mode = one(&format!("{dir_key}Mode")).unwrap_or_else(|| "0755".into());
            run_ok(
                &format!("chmod {mode} {}", dir.display()),
                Command::new("chmod").arg(&mode).arg(&dir),
            );
        }
    }
    let exec = one("ExecStart").expect("the unit has an ExecStart");
    let umask = one("UMask").unwrap_or_else(|| "0022".into());
    let mut command = Command::new("setsid");
    command
        .args(["sh", "-c", "umask \"$0\" && exec \"$@\"", &umask])
        .args(exec.split_whitespace())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for assignments in settings.get("Environment").into_iter().flatten() {
        for assignment in assignments.split_whitespace() {
            let (key, value) = assignment.split_once('=').unwrap();
            command.env(key, value);
        }
    }
    command.spawn().unwrap()
}

fn wait_for_socket(log: &Path) {
    let deadline = Instant::now() + Duration::from_mins(1);
    while std::os::unix::net::UnixStream::connect(SOCKET).is_err() {
        assert!(
            Instant::now() < deadline,
            "the service did not listen on {SOCKET} within 60 s: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every file below `dir` with its bytes (a store's whole contents).
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.insert(
                    path.strip_prefix(dir).unwrap().to_owned(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    files
}

/// The paths the package installed (`dpkg -L`), files and links only.
fn package_files() -> Vec<PathBuf> {
    let out = run_ok("dpkg -L", Command::new("dpkg").args(["-L", PACKAGE]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.symlink_metadata().is_ok_and(|m| !m.is_dir()))
        .collect()
}

fn json(what: &str, out: &std::process::Output) -> serde_json::Value {
    assert_success(what, out);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// What `dpkg -L` must list, beside the man pages.
const EXPECTED: &[&str] = &[
    BINARY,
    "/etc/xdg/autostart/rewind-tray.desktop",
    "/usr/share/applications/io.github.rewindvm.Rewind.desktop",
    "/usr/share/metainfo/io.github.rewindvm.Rewind.metainfo.xml",
    "/usr/share/icons/hicolor/scalable/apps/rewind.svg",
    "/usr/share/icons/hicolor/16x16/apps/rewind.png",
    "/usr/share/icons/hicolor/48x48/apps/rewind.png",
    "/usr/share/icons/hicolor/256x256/apps/rewind.png",
    "/usr/share/icons/hicolor/512x512/apps/rewind.png",
    "/usr/share/icons/hicolor/64x64/status/rewind-tray-attention.png",
    "/usr/share/bash-completion/completions/rewind",
    "/usr/share/zsh/vendor-completions/_rewind",
    "/usr/share/fish/vendor_completions.d/rewind.fish",
    "/usr/share/doc/rewind/copyright",
];

/// The licence in Debian's copyright format, the changelog, and the licences of the crates
/// linked into the binary, each with the crates using it.
fn check_licences(files: &[PathBuf]) {
    let copyright = std::fs::read_to_string("/usr/share/doc/rewind/copyright").unwrap();
    assert!(
        copyright.contains("License: GPL-3+")
            && copyright.contains("/usr/share/common-licenses/GPL-3"),
        "the licence is named in Debian's copyright format: {copyright}"
    );
    assert!(
        files
            .iter()
            .any(|f| f == Path::new("/usr/share/doc/rewind/changelog.Debian.gz")),
        "the package has a changelog"
    );
    // The licences of the crates linked into the binary, each with the crates using it.
    let third_party = run_ok(
        "zcat third-party-licenses.txt.gz",
        Command::new("zcat").arg("/usr/share/doc/rewind/third-party-licenses.txt.gz"),
    );
    let third_party = String::from_utf8_lossy(&third_party.stdout);
    for (krate, licence) in [
        ("eframe", "MIT License"),
        ("virt", "GNU Lesser General Public License v2.1 only"),
        ("tokio", "MIT License"),
    ] {
        assert!(
            third_party
                .lines()
                .any(|l| l.trim().starts_with(&format!("{krate} "))),
            "third-party-licenses names {krate}"
        );
        assert!(
            third_party.contains(licence),
            "third-party-licenses has {licence}"
        );
    }
}

fn check_installed_files(files: &[PathBuf], scratch: &Path) {
    for expected in EXPECTED {
        assert!(
            files.iter().any(|f| f == Path::new(expected)),
            "the package installs {expected}: {files:?}"
        );
    }
    let unit = files
        .iter()
        .find(|f| f.ends_with("systemd/system/rewind.service"))
        .unwrap_or_else(|| panic!("the package installs rewind.service: {files:?}"));
    assert!(
        unit_settings(unit)["ExecStart"]
            .iter()
            .any(|e| e == "/usr/bin/rewind service"),
        "the unit runs the installed service"
    );
    // Enabled on install, as dh_installsystemd does: also where systemd does not run.
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/rewind.service");
    assert!(
        wants.symlink_metadata().is_ok(),
        "the service is enabled on install ({} is missing)",
        wants.display()
    );
    check_licences(files);

    // Man pages: one per command, and each renders.
    let binary = Path::new(BINARY);
    let mut pages: Vec<String> = files
        .iter()
        .filter(|f| f.starts_with("/usr/share/man/man1"))
        .map(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches(".gz")
                .to_owned()
        })
        .collect();
    pages.sort();
    assert_eq!(pages, package::expected_man_pages(binary), "man pages");
    for page in files
        .iter()
        .filter(|f| f.starts_with("/usr/share/man/man1"))
    {
        package::check_man_page(page);
    }
    package::check_top_page_lists_commands(binary, Path::new("/usr/share/man/man1/rewind.1.gz"));
    // `man rewind` finds the page by its name, as a user types it.
    let man = run_ok(
        "man rewind",
        Command::new("man")
            .arg("rewind")
            .env("MANPAGER", "cat")
            .env("LC_ALL", "C.UTF-8"),
    );
    assert!(String::from_utf8_lossy(&man.stdout).starts_with("REWIND(1)"));

    package::check_completions(
        binary,
        &Completions {
            bash: Path::new("/usr/share/bash-completion/completions/rewind"),
            zsh: Path::new("/usr/share/zsh/vendor-completions/_rewind"),
            fish: Path::new("/usr/share/fish/vendor_completions.d/rewind.fish"),
        },
        scratch,
    );

    // The desktop files and the AppStream metadata pass their validators.
    let desktop: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "desktop"))
        .collect();
    assert!(desktop.len() >= 2, "{desktop:?}");
    run_ok(
        "desktop-file-validate",
        Command::new("desktop-file-validate").args(&desktop),
    );
    for metainfo in files
        .iter()
        .filter(|f| f.starts_with("/usr/share/metainfo"))
    {
        run_ok(
            "appstreamcli validate",
            Command::new("appstreamcli")
                .args(["validate", "--no-net"])
                .arg(metainfo),
        );
    }
}

/// Purges the package: every file of it goes, and no store.
fn purge_and_check(mut package: Installed, files: &[PathBuf], store: &Path) {
    package.stop_service();
    assert!(
        Path::new(CONFIG_DIR).join("config.ron").exists(),
        "the service kept its configuration in {CONFIG_DIR}"
    );
    run_ok(
        "cp -a the store",
        Command::new("cp")
            .arg("-a")
            .arg(store)
            .arg(STORE_IN_STATE_DIR),
    );
    let before = contents(store);
    assert!(before.contains_key(Path::new("rewind-store.json")));
    let kept_before = contents(Path::new(STORE_IN_STATE_DIR));
    run_ok("apt-get purge", &mut apt_get(&["purge", PACKAGE]));
    assert!(!installed(), "dpkg says the package is gone");
    let left: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.symlink_metadata().is_ok())
        .collect();
    assert!(left.is_empty(), "purge left these files: {left:?}");
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/rewind.service");
    assert!(
        wants.symlink_metadata().is_err(),
        "purge left {}",
        wants.display()
    );
    assert!(
        !Path::new(CONFIG_DIR).exists(),
        "purge removes the service's configuration"
    );
    assert!(
        !Path::new("/run/rewind").exists(),
        "purge removes /run/rewind"
    );
    let state_left: Vec<_> = std::fs::read_dir(STATE_DIR)
        .unwrap_or_else(|e| panic!("purge removed {STATE_DIR} with the store in it: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        state_left,
        [PathBuf::from(STORE_IN_STATE_DIR)],
        "purge removes the service's state but the store in it"
    );
    assert!(before == contents(store), "the user's store is untouched");
    assert!(
        kept_before == contents(Path::new(STORE_IN_STATE_DIR)),
        "the store in {STATE_DIR} is untouched"
    );
    drop(package);
}

/// The variables that would point the installed program elsewhere than a user's would.
const OTHER_PLACES: [&str; 5] = [
    "REWIND_SOCKET",
    "REWIND_CONFIG_DIR",
    "REWIND_STATE_DIR",
    "REWIND_WORK_DIR",
    "LIBVIRT_DEFAULT_URI",
];

/// A program of the user's, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// A desktop entry's `key`.
fn entry_value(entry: &Path, key: &str) -> String {
    std::fs::read_to_string(entry)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{} has no {key}", entry.display()))
        .to_owned()
}

/// Starts what the desktop entry `entry` runs (its `Exec`), as `user` in their desktop
/// session on `x`, with the installed program found on the `PATH` as a desktop finds it;
/// its stderr goes to `log`.
fn start_entry(
    entry: &Path,
    user: &TestUser,
    x: &Xvfb,
    session: &a11y::Session,
    log: &Path,
) -> Running {
    let home = x.home();
    let exec = entry_value(entry, "Exec");
    let mut words = exec.split_whitespace().filter(|w| !w.starts_with('%'));
    let program = words.next().expect("Exec names a program");
    let mut command = user.command(
        Path::new(program),
        &[
            ("PATH", Path::new("/usr/local/bin:/usr/bin:/bin")),
            ("DBUS_SESSION_BUS_ADDRESS", Path::new(session.address())),
            ("HOME", &home),
        ],
    );
    // The display and the XDG folders (setpriv and env hand them on).
    x.configure(&mut command);
    for var in OTHER_PLACES {
        command.env_remove(var);
    }
    Running(
        command
            .args(words)
            .current_dir(&home)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The user's desktop session with the package installed:
/// - "Open Rewind from the menu": the application entry opens the installed program's
///   window, the desktop can match the window to the entry (its X class is the entry's
///   `StartupWMClass`), and it lists the test VM, which it learns from the service;
/// - at login, the tray's autostart entry shows the tray icon (it registers with the
///   desktop's tray host), with its menu.
fn check_desktop_session(user: &TestUser, vm: &str) {
    let x = Xvfb::start(1280, 800).unwrap();
    let home = x.home();
    std::fs::create_dir_all(&home).unwrap();
    user.own(&home).unwrap();
    user.own(&x.runtime_dir()).unwrap();
    let session = a11y::Session::start(user, &home, &x.runtime_dir()).unwrap();

    let entry = Path::new("/usr/share/applications/io.github.rewindvm.Rewind.desktop");
    let log = home.join("window.log");
    let window = start_entry(entry, user, &x, &session, &log);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    x.wait_window("Rewind", Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("{e}; the window said:\n{}", said()));
    let class = entry_value(entry, "StartupWMClass");
    let found = run_ok(
        "xdotool search --class",
        Command::new("xdotool")
            .args(["search", "--onlyvisible", "--class", &class])
            .env("DISPLAY", x.display()),
    );
    assert!(
        !found.stdout.is_empty(),
        "the window's X class is the desktop entry's StartupWMClass {class:?}"
    );
    session
        .wait_for("the test VM", Duration::from_mins(1), |n| {
            n.name.contains(vm)
        })
        .unwrap_or_else(|e| panic!("{e}; the window said:\n{}", said()));
    drop(window);

    let host = TrayHost::start_on(session.address()).unwrap();
    let autostart = Path::new("/etc/xdg/autostart/rewind-tray.desktop");
    let log = home.join("tray.log");
    let _tray = start_entry(autostart, user, &x, &session, &log);
    let deadline = Instant::now() + Duration::from_mins(1);
    let item = loop {
        if let Some(item) = host.registered().into_iter().next() {
            break item;
        }
        assert!(
            Instant::now() < deadline,
            "the tray registered no icon within a minute; it said:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let bus = session.session_bus().unwrap();
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let labels: Vec<String> = rewind_tests::tray_host::menu(&bus, &item)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, label)| label)
            .collect();
        if ["Checkpoint all now", "Open Rewind"]
            .iter()
            .all(|want| labels.iter().any(|l| l == want))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tray's menu lacks its entries: {labels:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn main() -> ExitCode {
    let Some(deb) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: package-test PATH/rewind_VERSION_ARCH.deb");
        return ExitCode::from(2);
    };
    let deb = std::fs::canonicalize(&deb).unwrap_or_else(|e| {
        panic!("{}: {e} (build it with ./x deb)", deb.display());
    });
    assert!(
        rustix::process::geteuid().is_root(),
        "package-test installs a package: run it as root"
    );
    assert!(
        !installed(),
        "the package {PACKAGE} is installed on this machine already; package-test installs \
         and purges it: remove it first (apt-get purge {PACKAGE})"
    );

    // A test VM, and a normal user in the libvirt group with a folder of their own.
    let vm = TestVm::builder("pkg").define().unwrap();
    let scratch = ScratchDir::new("package").unwrap();
    let user = TestUser::create(true).unwrap();
    let home = scratch.path().join("home");
    std::fs::create_dir(&home).unwrap();
    user.own(&home).unwrap();
    let store = home.join("store");
    let service_log = scratch.path().join("service.log");

    // Debian's own checks of a package: no error and no warning (an archive's first upload
    // that closes no bug report does not apply to a package a user installs by hand).
    let lintian = run_ok(
        "lintian",
        Command::new("lintian")
            .args([
                "--allow-root",
                "--fail-on",
                "error,warning",
                "--suppress-tags",
                "initial-upload-closes-no-bugs",
            ])
            .arg(&deb),
    );
    eprint!("{}", String::from_utf8_lossy(&lintian.stdout));

    // Install, as a user would.
    eprintln!("package-test: installing {}", deb.display());
    let mut package = Installed { service: None };
    run_ok(
        "apt-get install",
        apt_get(&["install", "--no-install-recommends"]).arg(&deb),
    );
    assert!(installed(), "dpkg says the package is installed");
    let files = package_files();
    check_installed_files(&files, scratch.path());

    // The service, as its unit says.
    if !systemd_runs() {
        let unit = files
            .iter()
            .find(|f| f.ends_with("systemd/system/rewind.service"))
            .unwrap();
        package.service = Some(start_as_unit_says(unit, &service_log));
    }
    wait_for_socket(&service_log);

    // The user, with the installed program only: not from the checkout, with no variable
    // pointing anywhere else.
    let as_user = |args: &[&str]| {
        let mut command = user.command(Path::new(BINARY), &[("HOME", &home)]);
        for var in OTHER_PLACES {
            command.env_remove(var);
        }
        command.args(args).current_dir(&home).output().unwrap()
    };
    let vms = json("rewind vms --json", &as_user(&["vms", "--json"]));
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == vm.name.as_str()),
        "rewind vms lists the test VM: {vms}"
    );
    let store_arg = store.to_str().unwrap();
    let taken = json(
        "rewind checkpoint",
        &as_user(&["checkpoint", &vm.name, "--to", store_arg, "--json"]),
    );
    let id = taken[0]["id"].as_str().unwrap().to_owned();
    let listed = json(
        "rewind checkpoints",
        &as_user(&["checkpoints", &vm.name, "--in", store_arg, "--json"]),
    );
    assert!(
        listed["checkpoints"]
            .as_array()
            .unwrap_or_else(|| panic!("rewind checkpoints --json: {listed}"))
            .iter()
            .any(|c| c["id"] == id.as_str()),
        "rewind checkpoints lists {id}: {listed}"
    );
    eprintln!("package-test: the installed rewind took checkpoint {id} as a user");
    check_desktop_session(&user, &vm.name);
    eprintln!(
        "package-test: the menu entry opened the window, which lists the VM; the autostart \
         entry showed the tray icon"
    );

    purge_and_check(package, &files, &store);
    eprintln!("package-test: installed, used and purged {}", deb.display());
    ExitCode::SUCCESS
}
