//! The few libvirt calls the `virt` crate does not wrap, made safe here.
//!
//! This is the only module of `rewind-core` allowed to use `unsafe`. Each `unsafe` block
//! says which libvirt contract makes it sound. Callbacks from libvirt's event loop never
//! unwind into C: they catch panics.

#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use virt::connect::Connect;
use virt::sys;

use super::events::{LifecycleKind, VmEvent};

/// What libvirt calls back with for lifecycle events: the user's closure.
type Handler = Box<dyn Fn(VmEvent) + Send + Sync + 'static>;

/// Registers `handler` for lifecycle events of every domain on `conn`.
///
/// Returns libvirt's callback id, to pass to [`deregister`]. The handler runs on libvirt's
/// event-loop thread (started by [`super::events::ensure_event_loop`]).
pub(super) fn register_lifecycle(
    conn: &Connect,
    handler: Handler,
) -> Result<c_int, virt::error::Error> {
    let opaque = Box::into_raw(Box::new(handler)).cast::<c_void>();
    // SAFETY: libvirt calls a lifecycle callback with the signature of `lifecycle_cb`
    // (virConnectDomainEventLifecycleCallback); the generic pointer type in the prototype is
    // only a placeholder that C code casts with VIR_DOMAIN_EVENT_CALLBACK, as done here.
    let cb: unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void) = unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void),
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(lifecycle_cb)
    };
    // SAFETY: `conn` is a live connection; `opaque` is a leaked Box that libvirt hands back to
    // `lifecycle_cb` and finally to `free_handler`, which reclaims it exactly once.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE.cast_signed(),
            Some(cb),
            opaque,
            Some(free_handler),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take ownership of `opaque`.
        drop(unsafe { Box::from_raw(opaque.cast::<Handler>()) });
        return Err(virt::error::Error::last_error());
    }
    Ok(id)
}

/// Removes a registration made by [`register_lifecycle`]; libvirt then frees the handler.
pub(super) fn deregister(conn: &Connect, id: c_int) {
    // SAFETY: `conn` is live and `id` came from virConnectDomainEventRegisterAny on it.
    // Failure only means the connection is already gone, which frees the callbacks too.
    let _ = unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
}

unsafe extern "C" fn free_handler(opaque: *mut c_void) {
    // SAFETY: `opaque` is the Box leaked in `register_lifecycle`; libvirt calls this once.
    drop(unsafe { Box::from_raw(opaque.cast::<Handler>()) });
}

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: libvirt passes a domain valid for the duration of the callback; the strings it
    // returns are owned by the domain object (name) or written into our buffer (UUID).
    let (name, uuid) = unsafe {
        let name_ptr = sys::virDomainGetName(dom);
        let name = if name_ptr.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name_ptr).to_string_lossy().into_owned()
        };
        let mut buf = [0 as std::ffi::c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
        let uuid = if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) == 0 {
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        } else {
            String::new()
        };
        (name, uuid)
    };
    // SAFETY: `opaque` is the handler registered with this callback and outlives it.
    let handler = unsafe { &*opaque.cast::<Handler>() };
    let event = VmEvent {
        name,
        uuid,
        kind: LifecycleKind::from_raw(event),
        detail,
    };
    // A panic must not unwind into libvirt's C code.
    let _ = catch_unwind(AssertUnwindSafe(|| handler(event)));
}
