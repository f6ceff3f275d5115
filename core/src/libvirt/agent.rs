//! The QEMU guest agent, for application-consistent checkpoints: freezing the guest's file
//! systems around the capture instant (on Windows the agent drives VSS, so applications
//! such as databases flush too) and thawing them right after.

use super::{Hypervisor, ffi};
use crate::error::Result;

/// Whether a VM's guest agent can be asked to freeze, from its live definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// The VM has no `org.qemu.guest_agent.0` channel.
    NotConfigured,
    /// The channel exists but no agent is listening in the guest (not installed, not
    /// started, or the guest is still booting).
    NotConnected,
    /// An agent is connected.
    Connected,
}

impl AgentState {
    /// Reads the agent channel's state from a live domain XML.
    #[must_use]
    pub fn from_live_xml(xml: &str) -> Self {
        let Ok(doc) = roxmltree::Document::parse(xml) else {
            return Self::NotConfigured;
        };
        let target = doc.descendants().find(|n| {
            n.has_tag_name("target")
                && n.attribute("name") == Some("org.qemu.guest_agent.0")
                && n.parent().is_some_and(|p| p.has_tag_name("channel"))
        });
        match target {
            None => Self::NotConfigured,
            Some(t) if t.attribute("state") == Some("connected") => Self::Connected,
            Some(_) => Self::NotConnected,
        }
    }
}

impl Hypervisor {
    /// Whether VM `vm` has a connected guest agent.
    pub fn agent_state(&self, vm: &str) -> Result<AgentState> {
        let dom = self.lookup(vm)?;
        let xml = dom
            .xml_desc(0)
            .map_err(|e| self.libvirt_error(&format!("read the definition of VM {vm:?}"), &e))?;
        Ok(AgentState::from_live_xml(&xml))
    }

    /// Freezes every file system of VM `vm` through its guest agent; returns how many.
    /// Must be followed by [`Hypervisor::thaw_filesystems`], also on every error path.
    pub fn freeze_filesystems(&self, vm: &str) -> Result<u32> {
        let dom = self.lookup(vm)?;
        ffi::fs_freeze(&dom).map_err(|e| {
            self.libvirt_error(
                &format!("freeze the file systems of VM {vm:?} through its guest agent"),
                &e,
            )
        })
    }

    /// Thaws every frozen file system of VM `vm`; returns how many were frozen. Harmless
    /// when nothing is frozen.
    pub fn thaw_filesystems(&self, vm: &str) -> Result<u32> {
        let dom = self.lookup(vm)?;
        ffi::fs_thaw(&dom).map_err(|e| {
            self.libvirt_error(
                &format!("thaw the file systems of VM {vm:?} through its guest agent"),
                &e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_state_from_the_live_xml() {
        let with = |target: &str| {
            format!(
                "<domain><devices><channel type='unix'><source mode='bind'/>{target}</channel></devices></domain>"
            )
        };
        assert_eq!(
            AgentState::from_live_xml(&with(
                "<target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>"
            )),
            AgentState::Connected
        );
        assert_eq!(
            AgentState::from_live_xml(&with(
                "<target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>"
            )),
            AgentState::NotConnected
        );
        assert_eq!(
            AgentState::from_live_xml(&with(
                "<target type='virtio' name='org.qemu.spice.0' state='connected'/>"
            )),
            AgentState::NotConfigured
        );
        assert_eq!(
            AgentState::from_live_xml("<domain/>"),
            AgentState::NotConfigured
        );
    }
}
