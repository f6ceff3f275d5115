//! A real window's accessibility tree, read over AT-SPI as a screen reader reads it: a test
//! finds the window's buttons and labels by their names and clicks them (AT-SPI's "click"
//! action, as Orca or dogtail would), so that it drives the real process without screen
//! coordinates. The window publishes its tree through AccessKit once the session's
//! accessibility bus says assistive technology is on.
//!
//! [`Session`] gives a user a session bus (which lets root in as well, so that a test can
//! play the desktop's panel) and an accessibility bus (at-spi2-core's
//! `at-spi-bus-launcher`, run as that user); both stop when it is dropped.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use zbus::zvariant::OwnedObjectPath;

use crate::HarnessError;
use crate::users::TestUser;

const LAUNCHER: &str = "/usr/libexec/at-spi-bus-launcher";
const REGISTRY: &str = "org.a11y.atspi.Registry";
const ROOT: &str = "/org/a11y/atspi/accessible/root";
const ACCESSIBLE: &str = "org.a11y.atspi.Accessible";
const ACTION: &str = "org.a11y.atspi.Action";

/// A user's session bus with an accessibility bus beside it.
pub struct Session {
    address: String,
    bus_pid: u32,
    launcher: Child,
    /// `None` only while starting (dropping it then stops what was started).
    a11y: Option<zbus::blocking::Connection>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// An element of a window: a button, a label, a list item.
#[derive(Debug, Clone)]
pub struct Node {
    bus: String,
    path: OwnedObjectPath,
    /// What it is called (a button's text, a label's words).
    pub name: String,
    /// Whether it can be clicked.
    pub clickable: bool,
}

fn fail(what: &str) -> impl Fn(zbus::Error) -> HarnessError + '_ {
    move |e| HarnessError(format!("AT-SPI: could not {what}: {e}"))
}

impl Session {
    /// Starts `user`'s session bus and accessibility bus; `home` and `runtime_dir` are the
    /// user's (the accessibility bus keeps its socket there).
    ///
    /// # Errors
    /// at-spi2-core is missing, or a bus did not come up.
    pub fn start(user: &TestUser, home: &Path, runtime_dir: &Path) -> Result<Self, HarnessError> {
        if !Path::new(LAUNCHER).exists() {
            return Err(HarnessError(format!(
                "{LAUNCHER} is missing: install at-spi2-core (./x test does)"
            )));
        }
        // The user's session bus as a desktop has it, and root let in too (as on the
        // accessibility bus): the test plays the panel and the screen reader.
        let config = runtime_dir.join("session-bus.conf");
        std::fs::write(
            &config,
            "<busconfig>\n  <include>/usr/share/dbus-1/session.conf</include>\n  \
             <policy context=\"default\"><allow user=\"root\"/></policy>\n</busconfig>\n",
        )
        .map_err(|e| HarnessError::io("write", &config, &e))?;
        let config_arg = format!("--config-file={}", config.display());
        let out = user.run(
            Path::new("dbus-daemon"),
            &[&config_arg, "--fork", "--print-address=1", "--print-pid=1"],
            &[("HOME", home), ("XDG_RUNTIME_DIR", runtime_dir)],
        );
        if !out.status.success() {
            return Err(HarnessError(format!(
                "dbus-daemon --session failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let address = lines.next().unwrap_or_default().trim().to_owned();
        let bus_pid = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| HarnessError(format!("dbus-daemon said {text:?}")))?;
        let mut cmd = user.command(
            Path::new(LAUNCHER),
            &[
                ("DBUS_SESSION_BUS_ADDRESS", Path::new(&address)),
                ("HOME", home),
                ("XDG_RUNTIME_DIR", runtime_dir),
                // "Assistive technology on" is a GSettings key: kept in memory, not in a
                // dconf database of the user's.
                ("GSETTINGS_BACKEND", Path::new("memory")),
            ],
        );
        cmd.arg("--launch-immediately")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own process group: the bus and registry it starts go with it.
            .process_group(0);
        let launcher = cmd
            .spawn()
            .map_err(|e| HarnessError(format!("could not start {LAUNCHER}: {e}")))?;
        let a11y = accessibility_bus(user, &address);
        let mut session = Self {
            address,
            bus_pid,
            launcher,
            a11y: None,
        };
        session.a11y = Some(a11y?);
        Ok(session)
    }

    /// The session bus's address, for the window's `DBUS_SESSION_BUS_ADDRESS`.
    #[must_use]
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A connection of root's to the user's session bus.
    ///
    /// # Errors
    /// The bus does not answer.
    pub fn session_bus(&self) -> Result<zbus::blocking::Connection, HarnessError> {
        zbus::blocking::connection::Builder::address(self.address.as_str())
            .and_then(zbus::blocking::connection::Builder::build)
            .map_err(fail("connect to the session bus"))
    }

    fn call<B, R>(
        &self,
        bus: &str,
        path: &str,
        iface: &str,
        method: &str,
        body: &B,
    ) -> zbus::Result<R>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
    {
        self.a11y
            .as_ref()
            .ok_or_else(|| zbus::Error::Failure("not connected".into()))?
            .call_method(Some(bus), path, Some(iface), method, body)?
            .body()
            .deserialize()
    }

    fn children(&self, bus: &str, path: &str) -> Vec<(String, OwnedObjectPath)> {
        self.call(bus, path, ACCESSIBLE, "GetChildren", &())
            .unwrap_or_default()
    }

    /// Every element of every application on the bus (windows that are gone or still
    /// starting are skipped).
    #[must_use]
    pub fn nodes(&self) -> Vec<Node> {
        let mut found = Vec::new();
        let mut todo = self.children(REGISTRY, ROOT);
        while let Some((bus, path)) = todo.pop() {
            let name: String = self
                .call::<_, zbus::zvariant::OwnedValue>(
                    &bus,
                    path.as_str(),
                    "org.freedesktop.DBus.Properties",
                    "Get",
                    &(ACCESSIBLE, "Name"),
                )
                .ok()
                .and_then(|v| String::try_from(v).ok())
                .unwrap_or_default();
            let interfaces: Vec<String> = self
                .call(&bus, path.as_str(), ACCESSIBLE, "GetInterfaces", &())
                .unwrap_or_default();
            todo.extend(self.children(&bus, path.as_str()));
            found.push(Node {
                clickable: interfaces.iter().any(|i| i == ACTION),
                bus,
                path,
                name,
            });
        }
        found
    }

    /// Waits until an element that `want` accepts is there, and gives it.
    ///
    /// # Errors
    /// None came within `timeout`; the error lists the names that were there.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&Node) -> bool,
    ) -> Result<Node, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.nodes();
            if let Some(node) = nodes.iter().find(|n| want(n)) {
                return Ok(node.clone());
            }
            if Instant::now() > deadline {
                let mut names: Vec<&str> = nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .filter(|n| !n.is_empty())
                    .collect();
                names.sort_unstable();
                names.dedup();
                return Err(HarnessError(format!(
                    "no {what} in the window within {timeout:?}; it shows: {names:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits for the clickable element called `name` and clicks it.
    ///
    /// # Errors
    /// It did not come within `timeout`, or the click was refused.
    pub fn click(&self, name: &str, timeout: Duration) -> Result<(), HarnessError> {
        let node = self.wait_for(&format!("button {name:?}"), timeout, |n| {
            n.clickable && n.name == name
        })?;
        let done: bool = self
            .call(&node.bus, node.path.as_str(), ACTION, "DoAction", &0_i32)
            .map_err(fail(&format!("click {name:?}")))?;
        if done {
            Ok(())
        } else {
            Err(HarnessError(format!(
                "the window refused the click on {name:?}"
            )))
        }
    }
}

/// Turns assistive technology on in `user`'s session (on the bus at `address`) and
/// connects to the accessibility bus. The session bus lets only its user in, so
/// `dbus-send` asks it as that user; the accessibility bus lets root in, as a screen
/// reader run by root would be.
fn accessibility_bus(
    user: &TestUser,
    address: &str,
) -> Result<zbus::blocking::Connection, HarnessError> {
    let env = [("DBUS_SESSION_BUS_ADDRESS", Path::new(address))];
    let send = |args: &[&str]| {
        let mut all = vec![
            "--session",
            "--print-reply",
            "--dest=org.a11y.Bus",
            "/org/a11y/bus",
        ];
        all.extend_from_slice(args);
        user.run(Path::new("dbus-send"), &all, &env)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let out = send(&["org.a11y.Bus.GetAddress"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if Instant::now() > deadline {
            return Err(HarnessError(format!(
                "at-spi-bus-launcher never answered: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // `   string "unix:path=…"`
    let a11y_address = reply
        .split('"')
        .nth(1)
        .ok_or_else(|| HarnessError(format!("org.a11y.Bus.GetAddress said {reply:?}")))?
        .to_owned();
    let out = send(&[
        "org.freedesktop.DBus.Properties.Set",
        "string:org.a11y.Status",
        "string:IsEnabled",
        "variant:boolean:true",
    ]);
    if !out.status.success() {
        return Err(HarnessError(format!(
            "could not turn assistive technology on: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    zbus::blocking::connection::Builder::address(a11y_address.as_str())
        .and_then(zbus::blocking::connection::Builder::build)
        .map_err(fail("connect to the accessibility bus"))
}

impl Drop for Session {
    fn drop(&mut self) {
        let group = format!("-{}", self.launcher.id());
        drop(Command::new("kill").args(["--", &group]).status());
        drop(self.launcher.wait());
        drop(Command::new("kill").arg(self.bus_pid.to_string()).status());
    }
}
