//! [`VolumeWriter`]: a volume's bytes sent to libvirt in order, holes as holes.

use super::*;

/// The image formats a new volume can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VolumeFormat {
    Raw,
    Qcow2,
}

impl VolumeFormat {
    pub(super) fn parse(format: &str) -> Result<Self> {
        match format {
            "raw" => Ok(Self::Raw),
            "qcow2" => Ok(Self::Qcow2),
            other => Err(Error::Invalid(format!(
                "Rewind can create volumes as \"raw\" or \"qcow2\" images, not {other:?}"
            ))),
        }
    }
}

/// What [`Hypervisor::create_volume_with`] hands its `fill` closure: accepts the volume's
/// content front to back, as data ([`VolumeWriter::write`]) and holes
/// ([`VolumeWriter::hole`]), covering exactly its size.
pub struct VolumeWriter<'a> {
    pub(super) hv: &'a Hypervisor,
    pub(super) stream: &'a Stream,
    pub(super) control: &'a Control,
    pub(super) pool: &'a str,
    pub(super) volume: &'a str,
    pub(super) size_bytes: u64,
    pub(super) position: u64,
    /// Zeroes accepted but not sent yet (consecutive holes go as one).
    pub(super) pending_hole_bytes: u64,
    pub(super) sent_data_bytes: u64,
}

impl VolumeWriter<'_> {
    /// Appends `data`. Pieces of 64 KiB that are all zeroes are sent as holes.
    ///
    /// # Errors
    /// [`Error::Cancelled`] once the job's control is cancelled; an error if `data` runs past
    /// the volume's size or libvirt refuses it (pool full, connection lost).
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.control.check().map_err(|_| Error::Cancelled)?;
        self.advance(data.len() as u64)?;
        let mut run_start = 0;
        let mut at = 0;
        while at < data.len() {
            let end = (at + ZERO_BLOCK_BYTES).min(data.len());
            if is_zero(&data[at..end]) {
                self.send_data(&data[run_start..at])?;
                self.pending_hole_bytes += (end - at) as u64;
                self.control.add_done_bytes((end - at) as u64);
                run_start = end;
            }
            at = end;
        }
        self.send_data(&data[run_start..])
    }

    /// Appends `len_bytes` of zeroes that take no room (a hole), sending only their length.
    ///
    /// # Errors
    /// [`Error::Cancelled`] once the job's control is cancelled; an error if the hole runs
    /// past the volume's size.
    pub fn hole(&mut self, len_bytes: u64) -> Result<()> {
        self.control.check().map_err(|_| Error::Cancelled)?;
        self.advance(len_bytes)?;
        self.pending_hole_bytes += len_bytes;
        self.control.add_done_bytes(len_bytes);
        Ok(())
    }

    /// How many bytes of the volume have been given so far (data and holes).
    #[must_use]
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The volume's size: what data and holes must add up to.
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// How many bytes went over the connection as data (the rest went as holes).
    #[must_use]
    pub fn sent_data_bytes(&self) -> u64 {
        self.sent_data_bytes
    }

    fn advance(&mut self, len_bytes: u64) -> Result<()> {
        match self.position.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes => {
                self.position = end;
                Ok(())
            }
            _ => Err(Error::Invalid(format!(
                "the content given for volume {:?} runs past its size of {} bytes (at byte \
                 {}, {len_bytes} more): this is a bug in Rewind, please report it (pool {:?})",
                self.volume, self.size_bytes, self.position, self.pool
            ))),
        }
    }

    fn send_data(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.flush_hole()?;
        for piece in data.chunks(SEND_PIECE_BYTES) {
            self.control.check().map_err(|_| Error::Cancelled)?;
            let mut sent = 0;
            while sent < piece.len() {
                let n = self
                    .stream
                    .send(&piece[sent..])
                    .map_err(|e| self.hv.upload_error(self.pool, self.volume, &e))?;
                match usize::try_from(n) {
                    Ok(n) if n > 0 => sent += n,
                    _ => {
                        return Err(self.hv.upload_error(
                            self.pool,
                            self.volume,
                            &virt::error::Error::last_error(),
                        ));
                    }
                }
            }
            self.sent_data_bytes += piece.len() as u64;
            self.control.add_done_bytes(piece.len() as u64);
        }
        Ok(())
    }

    fn flush_hole(&mut self) -> Result<()> {
        if self.pending_hole_bytes == 0 {
            return Ok(());
        }
        // Sizes are checked to fit an i64 when the volume is created.
        let len = i64::try_from(self.pending_hole_bytes).expect("volume sizes fit an i64");
        ffi::stream_send_hole(self.stream, len)
            .map_err(|e| self.hv.upload_error(self.pool, self.volume, &e))?;
        self.pending_hole_bytes = 0;
        Ok(())
    }

    /// Checks that the content covered the whole volume and sends the last hole.
    pub(super) fn finish(&mut self) -> Result<()> {
        if self.position != self.size_bytes {
            return Err(Error::Invalid(format!(
                "the content given for volume {:?} ends at byte {} of its {} bytes: this is a \
                 bug in Rewind, please report it (pool {:?})",
                self.volume, self.position, self.size_bytes, self.pool
            )));
        }
        self.flush_hole()
    }
}

impl std::fmt::Debug for VolumeWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeWriter")
            .field("pool", &self.pool)
            .field("volume", &self.volume)
            .field("size_bytes", &self.size_bytes)
            .field("position", &self.position)
            .field("sent_data_bytes", &self.sent_data_bytes)
            .finish_non_exhaustive()
    }
}

/// Whether `data` holds only zeroes (compared 4 KiB at a time, which vectorises).
pub(super) fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
