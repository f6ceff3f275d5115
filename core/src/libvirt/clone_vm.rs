//! What a boot-check asks of libvirt about a throwaway clone: start it as a transient
//! domain that dies with Rewind's connection, ask its guest agent whether it answers, take
//! a screenshot of its screen, and stop it.

use std::time::Duration;

use virt::stream::Stream;

use super::{Hypervisor, ffi};
use crate::error::Result;

/// Largest screenshot accepted: a 4K screen in PPM is 24 MiB.
const MAX_SCREENSHOT_BYTES: usize = 64 << 20;

/// A picture of a VM's screen as libvirt gives it.
#[derive(Debug, Clone)]
pub struct Screenshot {
    /// Its MIME type (`image/x-portable-pixmap` from QEMU).
    pub mime: String,
    /// The image file's bytes.
    pub bytes: Vec<u8>,
}

impl Hypervisor {
    /// Starts a transient VM from `xml`, destroyed by libvirt when this connection closes
    /// (also if this process is killed); returns its name.
    pub fn start_transient(&self, xml: &str) -> Result<String> {
        let dom = ffi::create_transient_autodestroy(&self.conn, xml)
            .map_err(|e| self.libvirt_error("start the throwaway copy of the VM", &e))?;
        dom.name()
            .map_err(|e| self.libvirt_error("read the name of the VM just started", &e))
    }

    /// Turns VM `vm` off at once (a transient one is then gone).
    pub fn destroy_vm(&self, vm: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        dom.destroy()
            .map_err(|e| self.libvirt_error(&format!("turn off VM {vm:?}"), &e))
    }

    /// Whether VM `vm` runs (or is paused); false once it has stopped or is gone.
    #[must_use]
    pub fn is_running(&self, vm: &str) -> bool {
        self.lookup(vm)
            .and_then(|d| {
                d.is_active()
                    .map_err(|e| self.libvirt_error("look at the VM", &e))
            })
            .unwrap_or(false)
    }

    /// Whether VM `vm`'s guest agent answers a `guest-ping` within `timeout`.
    #[must_use]
    pub fn agent_answers(&self, vm: &str, timeout: Duration) -> bool {
        let Ok(dom) = self.lookup(vm) else {
            return false;
        };
        let seconds = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        dom.qemu_agent_command(r#"{"execute":"guest-ping"}"#, seconds, 0)
            .is_ok_and(|answer| answer.contains("\"return\""))
    }

    /// A screenshot of VM `vm`'s first screen.
    pub fn screenshot(&self, vm: &str) -> Result<Screenshot> {
        let dom = self.lookup(vm)?;
        let failed = |e: &virt::error::Error| {
            self.libvirt_error(&format!("take a screenshot of VM {vm:?}"), e)
        };
        let stream = Stream::new(&self.conn, 0).map_err(|e| failed(&e))?;
        let mime = dom.screenshot(&stream, 0, 0).map_err(|e| failed(&e))?;
        let mut bytes = Vec::new();
        let mut buf = vec![0; 256 << 10];
        loop {
            match stream.recv(&mut buf) {
                Ok(0) => break,
                Ok(n) if n > 0 => {
                    bytes.extend_from_slice(&buf[..n.cast_unsigned()]);
                    if bytes.len() > MAX_SCREENSHOT_BYTES {
                        drop(stream.abort());
                        return Err(crate::error::Error::Libvirt {
                            action: format!("take a screenshot of VM {vm:?}"),
                            detail: format!(
                                "the picture is larger than {MAX_SCREENSHOT_BYTES} bytes"
                            ),
                            connection_lost: false,
                        });
                    }
                }
                Ok(_) => {
                    let e = virt::error::Error::last_error();
                    drop(stream.abort());
                    return Err(failed(&e));
                }
                Err(e) => {
                    drop(stream.abort());
                    return Err(failed(&e));
                }
            }
        }
        drop(stream.finish());
        Ok(Screenshot { mime, bytes })
    }
}
