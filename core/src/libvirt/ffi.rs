//! The few libvirt calls the `virt` crate does not wrap, made safe here.
//!
//! This and [`crate::priority`] are the only modules of `rewind-core` allowed to use
//! `unsafe`. Each `unsafe` block says which libvirt contract makes it sound. Callbacks from libvirt's event loop never
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
    if catch_unwind(AssertUnwindSafe(|| handler(event))).is_err() {
        tracing::error!("a handler of libvirt's VM events panicked; that event was dropped");
    }
}

// ---- Backups and checkpoints (virDomainBackup*, virDomainCheckpoint*) -------------------

use std::ffi::CString;
use virt::domain::Domain;

fn c_string(text: &str) -> Result<CString, virt::error::Error> {
    // A NUL inside is impossible for XML we build and names we validated; report, not panic.
    CString::new(text).map_err(|_| virt::error::Error::last_error())
}

/// Takes ownership of a string libvirt allocated, returns it as a `String`.
///
/// # Safety
/// `ptr` must be a non-null, NUL-terminated string allocated by libvirt's allocator, owned
/// by the caller (as documented for virDomainBackupGetXMLDesc and friends).
unsafe fn owned_string(ptr: *mut std::ffi::c_char) -> String {
    // SAFETY: per the function's contract.
    unsafe {
        let text = CStr::from_ptr(ptr).to_string_lossy().into_owned();
        libc::free(ptr.cast::<c_void>());
        text
    }
}

/// virDomainBackupBegin: starts a backup job (push or pull mode per `backup_xml`), creating
/// the checkpoint described by `checkpoint_xml` at the same instant.
pub(super) fn backup_begin(
    dom: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
) -> Result<(), virt::error::Error> {
    let backup = c_string(backup_xml)?;
    let checkpoint = checkpoint_xml.map(c_string).transpose()?;
    // SAFETY: `dom` is a live domain; both strings are NUL-terminated and outlive the call;
    // a null checkpoint XML means "no checkpoint", as documented.
    let rc = unsafe {
        sys::virDomainBackupBegin(
            dom.as_ptr(),
            backup.as_ptr(),
            checkpoint.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            0,
        )
    };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// virDomainBackupGetXMLDesc: the running backup job's XML (with libvirt's defaults filled in).
pub(super) fn backup_xml(dom: &Domain) -> Result<String, virt::error::Error> {
    // SAFETY: `dom` is live; the result is a caller-owned string or null on error.
    let ptr = unsafe { sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0) };
    if ptr.is_null() {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: non-null, owned by us, allocated by libvirt.
    Ok(unsafe { owned_string(ptr) })
}

/// virDomainAbortJob: ends a pull-mode backup (that is how a pull backup finishes) or
/// cancels any other job.
pub(super) fn abort_job(dom: &Domain) -> Result<(), virt::error::Error> {
    // SAFETY: `dom` is live.
    if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Looks up checkpoint `name` of `dom` and runs `f` on its handle, freeing it afterwards.
fn with_checkpoint<T>(
    dom: &Domain,
    name: &str,
    f: impl FnOnce(sys::virDomainCheckpointPtr) -> Result<T, virt::error::Error>,
) -> Result<T, virt::error::Error> {
    let cname = c_string(name)?;
    // SAFETY: `dom` is live and `cname` NUL-terminated; the result is null or a handle we own.
    let cp = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), cname.as_ptr(), 0) };
    if cp.is_null() {
        return Err(virt::error::Error::last_error());
    }
    let result = f(cp);
    // SAFETY: `cp` is the handle looked up above, freed exactly once.
    unsafe { sys::virDomainCheckpointFree(cp) };
    result
}

/// The names of `dom`'s checkpoints.
pub(super) fn checkpoint_names(dom: &Domain) -> Result<Vec<String>, virt::error::Error> {
    let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: `dom` is live; libvirt fills `list` with `n` handles and a terminating null,
    // all owned by us.
    let n = unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &raw mut list, 0) };
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    let mut names = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: `i < n`, so the element is a valid handle; its name is owned by the handle
        // and copied before the handle is freed; each handle and the array are freed once.
        unsafe {
            let cp = *list.add(i);
            let name = sys::virDomainCheckpointGetName(cp);
            if !name.is_null() {
                names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
            sys::virDomainCheckpointFree(cp);
        }
    }
    if !list.is_null() {
        // SAFETY: the array was allocated by libvirt for us.
        unsafe { libc::free(list.cast::<c_void>()) };
    }
    Ok(names)
}

/// The XML of checkpoint `name` (with the disks' bitmap names and sizes).
pub(super) fn checkpoint_xml(dom: &Domain, name: &str) -> Result<String, virt::error::Error> {
    with_checkpoint(dom, name, |cp| {
        // SAFETY: `cp` is a live handle; the result is a caller-owned string or null.
        let ptr = unsafe { sys::virDomainCheckpointGetXMLDesc(cp, 0) };
        if ptr.is_null() {
            return Err(virt::error::Error::last_error());
        }
        // SAFETY: non-null, owned by us, allocated by libvirt.
        Ok(unsafe { owned_string(ptr) })
    })
}

/// Deletes checkpoint `name`: its bitmaps too, or with `metadata_only` only libvirt's record.
pub(super) fn checkpoint_delete(
    dom: &Domain,
    name: &str,
    metadata_only: bool,
) -> Result<(), virt::error::Error> {
    let flags = if metadata_only {
        sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    } else {
        0
    };
    with_checkpoint(dom, name, |cp| {
        // SAFETY: `cp` is a live handle.
        if unsafe { sys::virDomainCheckpointDelete(cp, flags) } < 0 {
            return Err(virt::error::Error::last_error());
        }
        Ok(())
    })
}

/// virDomainFSFreeze of every mounted file system, through the guest agent: the number of
/// file systems frozen.
pub(super) fn fs_freeze(dom: &Domain) -> Result<u32, virt::error::Error> {
    // SAFETY: `dom` is live; a null mount-point list with count 0 means "all of them".
    let n = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    u32::try_from(n).map_err(|_| virt::error::Error::last_error())
}

/// virDomainFSThaw of every frozen file system: the number thawed.
pub(super) fn fs_thaw(dom: &Domain) -> Result<u32, virt::error::Error> {
    // SAFETY: as in `fs_freeze`.
    let n = unsafe { sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    u32::try_from(n).map_err(|_| virt::error::Error::last_error())
}

/// virDomainCheckpointCreateXML with `REDEFINE`: records a checkpoint in libvirt's metadata
/// for bitmaps that already exist (nothing is created in the images).
pub(super) fn checkpoint_redefine(dom: &Domain, xml: &str) -> Result<(), virt::error::Error> {
    let cxml = c_string(xml)?;
    // SAFETY: `dom` is live and `cxml` NUL-terminated; the result is null or a handle we own.
    let cp = unsafe {
        sys::virDomainCheckpointCreateXML(
            dom.as_ptr(),
            cxml.as_ptr(),
            sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE,
        )
    };
    if cp.is_null() {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: `cp` is the handle just returned, freed exactly once.
    unsafe { sys::virDomainCheckpointFree(cp) };
    Ok(())
}

/// virDomainCheckpointCreateXML: a new checkpoint (dirty bitmaps) of `dom` as `xml` says.
pub(super) fn checkpoint_create(dom: &Domain, xml: &str) -> Result<(), virt::error::Error> {
    let cxml = c_string(xml)?;
    // SAFETY: `dom` is live and `cxml` NUL-terminated; the result is null or a handle we own.
    let cp = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), cxml.as_ptr(), 0) };
    if cp.is_null() {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: `cp` is the handle just returned, freed exactly once.
    unsafe { sys::virDomainCheckpointFree(cp) };
    Ok(())
}

// ---- Block jobs (an active commit of an overlay back into its base) -------------------

/// virDomainBlockCommit with `ACTIVE`: starts merging disk `target`'s active overlay into
/// its backing image.
pub(super) fn block_commit_active(dom: &Domain, target: &str) -> Result<(), virt::error::Error> {
    let disk = c_string(target)?;
    // SAFETY: `dom` is live and `disk` NUL-terminated; null base and top mean "the backing
    // image" and "the active layer", as documented.
    let rc = unsafe {
        sys::virDomainBlockCommit(
            dom.as_ptr(),
            disk.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            0,
            sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE,
        )
    };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// virDomainGetBlockJobInfo: `(cur, end)` of disk `target`'s block job, `None` without one.
pub(super) fn block_job_progress(
    dom: &Domain,
    target: &str,
) -> Result<Option<(u64, u64)>, virt::error::Error> {
    let disk = c_string(target)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: `dom` is live, `disk` NUL-terminated, `info` a valid struct to fill.
    let rc =
        unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), disk.as_ptr(), &raw mut info, 0) };
    match rc {
        rc if rc < 0 => Err(virt::error::Error::last_error()),
        0 => Ok(None),
        _ => Ok(Some((info.cur, info.end))),
    }
}

/// virDomainBlockJobAbort, with `PIVOT` when `pivot`: ends disk `target`'s block job (an
/// active commit that reached its ready state switches the disk to the base image).
pub(super) fn block_job_abort(
    dom: &Domain,
    target: &str,
    pivot: bool,
) -> Result<(), virt::error::Error> {
    let disk = c_string(target)?;
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: `dom` is live and `disk` NUL-terminated.
    if unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), disk.as_ptr(), flags) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

// ---- Sparse streams (virStreamSendHole) -----------------------------------------------

use virt::stream::Stream;

/// virStreamSendHole: on a sparse stream (an upload opened with
/// `VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM`), tells the receiving end to skip `len_bytes`,
/// which then read as zeroes. Only the length crosses the connection.
pub(super) fn stream_send_hole(stream: &Stream, len_bytes: i64) -> Result<(), virt::error::Error> {
    // SAFETY: `stream` is a live stream (the wrapper holds a reference until it drops, which
    // cannot happen during this call); libvirt defines no flags for this call, 0 is required.
    if unsafe { sys::virStreamSendHole(stream.as_ptr(), len_bytes, 0) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

// ---- Transient domains (virDomainCreateXML) --------------------------------------------

/// virDomainCreateXML with `VIR_DOMAIN_START_AUTODESTROY`: starts a transient domain from
/// `xml` that libvirt destroys when `conn` closes (also when this process dies), so that a
/// throwaway clone never outlives the one who started it.
pub(super) fn create_transient_autodestroy(
    conn: &Connect,
    xml: &str,
) -> Result<Domain, virt::error::Error> {
    let xml = c_string(xml)?;
    // SAFETY: the connection pointer is valid while `conn` lives; `xml` is NUL-terminated
    // and outlives the call. A non-null result is a new reference we own, which `Domain`
    // frees when dropped.
    let ptr = unsafe {
        sys::virDomainCreateXML(
            conn.as_ptr(),
            xml.as_ptr(),
            sys::VIR_DOMAIN_START_AUTODESTROY,
        )
    };
    if ptr.is_null() {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: as above.
    Ok(unsafe { Domain::from_ptr(ptr) })
}

/// virDomainBlockCopy of disk `target` (with everything below it: not shallow) into the
/// new image that `dest_xml` describes, as a job that does not survive the domain (required
/// for a persistent domain by libvirt 9).
pub(super) fn block_copy(
    dom: &Domain,
    target: &str,
    dest_xml: &str,
) -> Result<(), virt::error::Error> {
    let disk = c_string(target)?;
    let xml = c_string(dest_xml)?;
    // SAFETY: `dom` is live; `disk` and `xml` are NUL-terminated and outlive the call; no
    // typed parameters are passed (null, 0).
    let rc = unsafe {
        sys::virDomainBlockCopy(
            dom.as_ptr(),
            disk.as_ptr(),
            xml.as_ptr(),
            std::ptr::null_mut(),
            0,
            sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
        )
    };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// virDomainCreateXML without flags: for a domain defined (persistently) with the same name
/// and UUID and shut off, it runs with `xml` as its live definition while its persistent
/// one stays as it is.
pub(super) fn create_live(conn: &Connect, xml: &str) -> Result<Domain, virt::error::Error> {
    let xml = c_string(xml)?;
    // SAFETY: as in `create_transient_autodestroy`.
    let ptr = unsafe { sys::virDomainCreateXML(conn.as_ptr(), xml.as_ptr(), 0) };
    if ptr.is_null() {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: a new reference we own.
    Ok(unsafe { Domain::from_ptr(ptr) })
}
