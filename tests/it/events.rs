//! Lifecycle events from the real daemon reach Rewind's library and engine.

use std::sync::mpsc;
use std::time::Duration;

use rewind_core::engine::{self, Event};
use rewind_core::libvirt::{Hypervisor, LifecycleKind, VmEvent};
use rewind_tests::{TestVm, daemon};

fn next_for(rx: &mpsc::Receiver<VmEvent>, uuid: &str, kind: LifecycleKind) -> VmEvent {
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ev = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind:?} event for {uuid} within a minute"));
        if ev.uuid == uuid && ev.kind == kind {
            return ev;
        }
    }
}

#[test]
fn start_and_stop_events_arrive() {
    let hv = Hypervisor::connect(daemon::URI).expect("connect");
    let (tx, rx) = mpsc::channel();
    let _subscription = hv
        .subscribe(move |ev| {
            drop(tx.send(ev));
        })
        .expect("subscribe");

    let mut vm = TestVm::builder("events").define().expect("define");
    let defined = next_for(&rx, &vm.uuid, LifecycleKind::Defined);
    assert_eq!(defined.name, vm.name);
    vm.start().expect("start");
    next_for(&rx, &vm.uuid, LifecycleKind::Started);
    vm.destroy().expect("destroy");
    next_for(&rx, &vm.uuid, LifecycleKind::Stopped);
}

#[test]
fn engine_follows_a_vm_being_started() {
    let mut engine = engine::spawn(daemon::URI.into(), std::sync::Arc::new(|| {})).expect("engine");
    let mut vm = TestVm::builder("engine").define().expect("define");
    vm.start().expect("start");
    // The engine lists again by itself after the events, and the list shows the VM running.
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the engine never listed {} as running",
            vm.name
        );
        let Some(ev) = engine.recv_timeout(Duration::from_secs(5)) else {
            continue;
        };
        if let Event::Vms(vms) = ev
            && vms.iter().any(|v| v.uuid == vm.uuid && v.state.is_active())
        {
            break;
        }
    }
}
