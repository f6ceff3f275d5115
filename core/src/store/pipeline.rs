//! Filling an object with every core: worker threads each read chunk after chunk (from
//! their own NBD connection, or from a file) and hash, compress, encrypt and store them,
//! while the calling thread applies the results to the index in slot order — so index
//! pages are loaded and written once each, exactly as by the sequential
//! [`ObjectWriter::put`]. Several reads in flight also keep the drive under the VM busy.
//!
//! [`for_each_slot`] is the same machinery for any per-chunk work with in-order results (a
//! restore's writes and reads, an upload).
//!
//! Memory stays bounded: one chunk buffer per worker, and at most two results per worker
//! waiting to be applied.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use super::chunk::{self, ChunkId, PIECE_BYTES};
use super::error::StoreError;
use super::index::HOLE;
use super::pieces::{Known, Stored};
use super::writer::ObjectWriter;
use crate::progress::Control;

/// How many readers to use: one more than there are cores (so that a worker waiting for
/// its read does not leave a core idle), at least two, at most five.
#[must_use]
pub fn reader_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| (n.get() + 1).clamp(2, 5))
}

/// How far ahead of the slowest slot the workers may run, per worker.
pub const AHEAD_PER_WORKER: usize = 4;

/// What a worker made of slot number `seq` in the list.
type Done<T, E> = (usize, Result<T, E>);

/// Runs one worker thread per element of `workers` over `slots` (chunk slot numbers, in
/// the order they are to be done): each worker takes the next slot, gets a buffer of `lens[seq]` bytes (holding
/// whatever that worker's previous slot left in it, zeros at first), fills it
/// and turns it into a `T` (reading, hashing, storing, writing — whatever the caller's
/// closure does), while the calling thread hands the results to `apply` strictly in list
/// order. Cancellation is checked before each slot; progress (`lens`) is counted as results
/// are applied. On the first error nothing more is started and that error is returned.
///
/// Memory stays bounded: one buffer per worker, and no worker starts a slot more than
/// [`AHEAD_PER_WORKER`] × workers slots past the first one not yet applied, so at most that
/// many results wait (when applying is the slow part, such as an upload).
pub fn for_each_slot<T, E, W>(
    slots: &[u64],
    lens: &[usize],
    control: &Control,
    workers: Vec<W>,
    mut apply: impl FnMut(u64, T) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
    E: From<StoreError> + Send,
    W: FnMut(u64, &mut Vec<u8>) -> Result<T, E> + Send,
{
    if workers.is_empty() {
        return Err(StoreError::Invalid("no worker to process the chunks".into()).into());
    }
    if lens.len() != slots.len() {
        return Err(StoreError::Invalid("one length per chunk slot is needed".into()).into());
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let applied_so_far = AtomicUsize::new(0);
    let ahead = AHEAD_PER_WORKER * workers.len();
    let (done_tx, done_rx) = mpsc::channel::<Done<T, E>>();
    std::thread::scope(|scope| {
        for mut work in workers {
            let done_tx = done_tx.clone();
            let (next, stop, applied_so_far) = (&next, &stop, &applied_so_far);
            std::thread::Builder::new()
                .name("rewind-chunks".into())
                .spawn_scoped(scope, move || {
                    let mut buf = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let seq = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = slots.get(seq) else { break };
                        while seq >= applied_so_far.load(Ordering::Relaxed) + ahead
                            && !stop.load(Ordering::Relaxed)
                        {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let result = control
                            .check()
                            .map_err(|c| E::from(StoreError::from(c)))
                            .and_then(|()| {
                                // Not zeroed again for every slot: most workers fill
                                // the buffer or do not use it at all.
                                buf.resize(lens[seq], 0);
                                work(i, &mut buf)
                            });
                        if result.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        if done_tx.send((seq, result)).is_err() {
                            break;
                        }
                    }
                })
                .expect("threads can be started");
        }
        drop(done_tx);

        let mut waiting = BTreeMap::new();
        let mut applied = 0;
        let mut outcome = Ok(());
        // Ends when every worker has stopped (all slots done, or an error).
        for (seq, result) in &done_rx {
            if outcome.is_err() {
                continue;
            }
            waiting.insert(seq, result);
            while let Some(result) = waiting.remove(&applied) {
                if let Err(e) = result.and_then(|value| apply(slots[applied], value)) {
                    stop.store(true, Ordering::Relaxed);
                    outcome = Err(e);
                    break;
                }
                control.add_done_bytes(lens[applied] as u64);
                applied += 1;
                applied_so_far.store(applied, Ordering::Relaxed);
            }
        }
        if outcome.is_ok() && applied < slots.len() {
            // A worker stopped on an error that is still waiting behind a gap.
            outcome = waiting.into_values().find_map(Result::err).map_or_else(
                || {
                    Err(StoreError::Invalid(
                        "the chunks were left unfinished by their workers".into(),
                    )
                    .into())
                },
                Err,
            );
        }
        outcome
    })
}

impl ObjectWriter<'_> {
    /// Sets every slot in `slots` (ascending), one worker thread per reader in `readers`.
    /// A reader fills the buffer it is given with slot `i`'s bytes (exactly
    /// [`ObjectWriter::chunk_len`] of them) and returns `true`, or returns `false` when
    /// the slot is known to be zeros (a hole). Progress is counted per slot as it is
    /// applied; cancellation is checked before each read. On any error nothing more is
    /// read and the first error is returned; chunks already written stay in the store for
    /// garbage collection, as with a dropped writer.
    pub fn put_slots<E, R>(
        &mut self,
        slots: &[u64],
        control: &Control,
        readers: Vec<R>,
    ) -> Result<(), E>
    where
        E: From<StoreError> + Send,
        R: FnMut(u64, &mut [u8]) -> Result<bool, E> + Send,
    {
        self.check_slots(slots, readers.len())?;
        let store = self.store;
        let lens: Vec<usize> = slots
            .iter()
            .map(|&i| usize::try_from(self.chunk_len(i)).expect("chunk fits memory"))
            .collect();
        // What each slot held in the index this one started from (an incremental's
        // parent): a changed slot is stored over it, as a patch where little changed.
        let parents = self.parent_entries(slots)?;
        let parents = &parents;
        let parent_of = |i: u64| -> Option<&(ChunkId, Vec<ChunkId>)> {
            slots.binary_search(&i).ok().map(|seq| &parents[seq])
        };
        let workers: Vec<_> = readers
            .into_iter()
            .map(|mut read| {
                move |i: u64, buf: &mut Vec<u8>| -> Result<Stored, E> {
                    if !read(i, buf)? {
                        return Ok(Stored::hole());
                    }
                    let known = match parent_of(i) {
                        Some((parent, chain)) if buf.iter().any(|&b| b != 0) => {
                            store.known(parent, chain)?
                        }
                        _ => None,
                    };
                    Ok(store.put_data_over(known.as_ref(), buf)?)
                }
            })
            .collect();
        for_each_slot(slots, &lens, control, workers, |i, stored| {
            self.apply(i, stored)?;
            Ok(())
        })
    }

    /// That every slot is in the object, and there is a reader.
    fn check_slots(&self, slots: &[u64], readers: usize) -> Result<(), StoreError> {
        if let Some(&bad) = slots.iter().find(|&&i| i >= self.chunk_count()) {
            return Err(StoreError::Invalid(format!(
                "chunk {bad} is beyond the end of an object of {} chunks",
                self.chunk_count()
            )));
        }
        if readers == 0 {
            return Err(StoreError::Invalid(
                "no reader to fill the object with".into(),
            ));
        }
        Ok(())
    }

    fn apply(&mut self, i: u64, stored: Stored) -> Result<(), StoreError> {
        if stored.id == HOLE {
            self.put_hole(i)
        } else {
            self.put_stored(i, stored.id, stored.chain, stored.added)
        }
    }

    /// Sets every slot in `changes` (ascending slots, each with the pieces that may have
    /// changed since the index this one started from: sorted piece numbers) with one worker
    /// per reader in `readers`. A reader fills the buffer it is given with the object's
    /// bytes from the offset it is given. Where the slot's previous content is a chunk (or
    /// patch) with a tree, only the changed pieces are read, and kept as a patch over it if
    /// at most half of the slot changed (see `FORMAT.md`, "Patches"); where it was a hole,
    /// only the changed pieces are read (the rest is zeros); otherwise the whole slot is
    /// read and stored as [`ObjectWriter::put_slots`] does. Progress counts the bytes to
    /// read.
    pub fn put_changed<E, R>(
        &mut self,
        changes: &[(u64, Vec<usize>)],
        control: &Control,
        readers: Vec<R>,
    ) -> Result<(), E>
    where
        E: From<StoreError> + Send,
        R: FnMut(u64, &mut [u8]) -> Result<(), E> + Send,
    {
        let slots: Vec<u64> = changes.iter().map(|(i, _)| *i).collect();
        if slots.windows(2).any(|w| w[0] >= w[1]) {
            return Err(StoreError::Invalid("the changed slots are not in order".into()).into());
        }
        self.check_slots(&slots, readers.len())?;
        let store = self.store;
        let chunk = u64::from(store.chunk_size_bytes());
        let slot_lens: Vec<usize> = slots
            .iter()
            .map(|&i| usize::try_from(self.chunk_len(i)).expect("chunk fits memory"))
            .collect();
        let lens: Vec<usize> = changes
            .iter()
            .zip(&slot_lens)
            .map(|((_, pieces), &len)| (pieces.len() * PIECE_BYTES).min(len))
            .collect();
        let parents = self.parent_entries(&slots)?;
        let (slots, parents, slot_lens) = (&slots, &parents, &slot_lens);
        let workers: Vec<_> = readers
            .into_iter()
            .map(|mut read| {
                move |i: u64, buf: &mut Vec<u8>| -> Result<Stored, E> {
                    let seq = slots.binary_search(&i).expect("a slot of the list");
                    let len = slot_lens[seq];
                    let pieces = &changes[seq].1;
                    let (parent, chain) = &parents[seq];
                    let known = store.known(parent, chain)?;
                    buf.resize(len, 0);
                    let mut fetch = |wanted: &[usize], buf: &mut Vec<u8>| -> Result<(), E> {
                        for (first, end) in runs(wanted) {
                            let (from, to) = (first * PIECE_BYTES, (end * PIECE_BYTES).min(len));
                            read(i * chunk + from as u64, &mut buf[from..to])?;
                        }
                        Ok(())
                    };
                    let whole_pieces = len.is_multiple_of(PIECE_BYTES);
                    if *parent == HOLE && whole_pieces {
                        // Zeros before: only what was written since is read.
                        buf.fill(0);
                        fetch(pieces, buf)?;
                        return Ok(store.put_data_over(None, buf)?);
                    }
                    let Some(known) = known.filter(|k| {
                        k.tree.len() * PIECE_BYTES == len
                            && pieces.iter().all(|&p| p < k.tree.len())
                    }) else {
                        read(i * chunk, buf)?;
                        return Ok(store.put_data_over(None, buf)?);
                    };
                    store_changed(store, &known, pieces, buf, fetch)
                }
            })
            .collect();
        for_each_slot(slots, &lens, control, workers, |i, stored| {
            self.apply(i, stored)?;
            Ok(())
        })
    }
}

/// Stores the new content of a slot that held `known`, of which only `pieces` may have
/// changed: `fetch` reads pieces of the slot from the source into the buffer. Reads the
/// changed pieces and, unless the content is kept as a patch over `known`, the rest.
fn store_changed<E: From<StoreError>>(
    store: &super::Store,
    known: &Known,
    pieces: &[usize],
    buf: &mut Vec<u8>,
    mut fetch: impl FnMut(&[usize], &mut Vec<u8>) -> Result<(), E>,
) -> Result<Stored, E> {
    let n = known.tree.len();
    fetch(pieces, buf)?;
    // The new content's tree: the parent's, with the hashes of the pieces read (the others
    // did not change: the dirty bitmap says so).
    let mut tree = known.tree.clone();
    for &k in pieces {
        tree[k] = chunk::piece_cv(
            k,
            &buf[k * PIECE_BYTES..(k + 1) * PIECE_BYTES],
            store.tree_key(),
        );
    }
    if let Some(done) = store.settled(known, &tree) {
        return Ok(done);
    }
    if let Some(done) = store.put_patch_over(known, &tree, buf)? {
        return Ok(done);
    }
    // Stored whole: the rest is read as well (from the source, never from the store: a
    // checkpoint does not depend on its parent's chunks being sound).
    let rest: Vec<usize> = (0..n)
        .filter(|k| pieces.binary_search(k).is_err())
        .collect();
    fetch(&rest, buf)?;
    Ok(store.put_data_over(Some(known), buf)?)
}

/// Runs of consecutive piece numbers in `pieces` (sorted), as `(first, last + 1)`.
fn runs(pieces: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &k in pieces {
        match out.last_mut() {
            Some(run) if run.1 == k => run.1 = k + 1,
            _ => out.push((k, k + 1)),
        }
    }
    out
}
