//! Filling an object with every core: worker threads each read chunk after chunk (from
//! their own NBD connection, or from a file) and hash, compress, encrypt and store them,
//! while the calling thread applies the results to the index in slot order — so index
//! pages are loaded and written once each, exactly as by the sequential
//! [`ObjectWriter::put`]. Several reads in flight also keep the drive under the VM busy.
//!
//! Memory stays bounded: one chunk buffer per worker; out-of-order results wait as ids.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use super::chunk::{ChunkId, ChunkKind};
use super::error::StoreError;
use super::writer::ObjectWriter;
use crate::progress::Control;

/// How many readers to use: one more than there are cores (so that a worker waiting for
/// its read does not leave a core idle), at least two, at most five.
#[must_use]
pub fn reader_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| (n.get() + 1).clamp(2, 5))
}

/// What a worker made of slot number `seq` in the list: `None` for a hole.
type Done<E> = (usize, Result<Option<(ChunkId, u64)>, E>);

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
        if let Some(&bad) = slots.iter().find(|&&i| i >= self.chunk_count()) {
            return Err(StoreError::Invalid(format!(
                "chunk {bad} is beyond the end of an object of {} chunks",
                self.chunk_count()
            ))
            .into());
        }
        if readers.is_empty() {
            return Err(StoreError::Invalid("no reader to fill the object with".into()).into());
        }
        let store = self.store;
        let lens: Vec<usize> = slots
            .iter()
            .map(|&i| usize::try_from(self.chunk_len(i)).expect("chunk fits memory"))
            .collect();
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let (done_tx, done_rx) = mpsc::channel::<Done<E>>();
        std::thread::scope(|scope| {
            for mut read in readers {
                let done_tx = done_tx.clone();
                let (next, stop, lens) = (&next, &stop, &lens);
                scope.spawn(move || {
                    let mut buf = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let seq = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = slots.get(seq) else { break };
                        let result = (|| {
                            control.check().map_err(StoreError::from)?;
                            buf.resize(lens[seq], 0);
                            if !read(i, &mut buf)? || buf.iter().all(|&b| b == 0) {
                                return Ok(None);
                            }
                            Ok(Some(store.put_chunk(ChunkKind::Data, &buf)?))
                        })();
                        if result.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        if done_tx.send((seq, result)).is_err() {
                            break;
                        }
                    }
                });
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
                    let i = slots[applied];
                    let applied_one = result.and_then(|stored| {
                        match stored {
                            None => self.put_hole(i)?,
                            Some((id, added)) => self.put_stored(i, id, added)?,
                        }
                        Ok(())
                    });
                    if let Err(e) = applied_one {
                        stop.store(true, Ordering::Relaxed);
                        outcome = Err(e);
                        break;
                    }
                    control.add_done_bytes(lens[applied] as u64);
                    applied += 1;
                }
            }
            if outcome.is_ok() && applied < slots.len() {
                // A worker stopped on an error that is still waiting behind a gap.
                outcome = waiting.into_values().find_map(Result::err).map_or_else(
                    || {
                        Err(StoreError::Invalid(
                            "the object was left unfinished by its readers".into(),
                        )
                        .into())
                    },
                    Err,
                );
            }
            outcome
        })
    }
}
