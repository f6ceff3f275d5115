//! The store's file operations over SFTP, each with the timeout and reconnection of
//! [`Remote::call`].

use super::{
    AsyncSeek, Bytes, BytesMut, Entry, File, OPERATION_TIMEOUT, OpError, OpResult, Ordering,
    PARALLEL_REMOVALS, Path, PathBuf, Pin, Remote, RemoteFailure, Sftp, SftpError, SftpErrorKind,
    SystemTime, TooLarge, io, is_failure, is_not_found,
};

use crate::store::local::{Inside, Refusal};

/// Why an entry of type `kind` is refused: anything but a file or folder (a server that
/// does not say is trusted to have made a file).
fn refusal(kind: Option<openssh_sftp_client::metadata::FileType>) -> Option<Refusal> {
    let kind = kind?;
    let name = if kind.is_symlink() {
        "symbolic link"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_char_device() {
        "character device"
    } else {
        return None;
    };
    Some(Refusal::Special(name))
}

impl Remote {
    /// What `rel` itself is (not following a link): a file, a folder or nothing; anything
    /// else is refused.
    fn kind(&self, rel: &Path) -> io::Result<Option<bool>> {
        let path = self.path(rel);
        self.call(|c| async move {
            match c.sftp.fs().symlink_metadata(&path).await {
                Ok(meta) => match refusal(meta.file_type()) {
                    Some(refused) => Err(OpError::from(refused.into_io())),
                    None => Ok(Some(meta.file_type().is_some_and(|t| t.is_dir()))),
                },
                Err(SftpError::SftpError(_, _)) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Whether `rel` exists (a link, device or FIFO there is refused).
    pub(crate) fn exists(&self, rel: &Path) -> io::Result<bool> {
        Ok(self.kind(rel)?.is_some())
    }

    /// Whether `rel` is a folder (a link, device or FIFO there is refused).
    pub(crate) fn is_dir(&self, rel: &Path) -> io::Result<bool> {
        Ok(self.kind(rel)? == Some(true))
    }

    pub(crate) fn len(&self, rel: &Path) -> io::Result<u64> {
        let path = self.path(rel);
        self.call(|c| async move {
            let meta = c.sftp.fs().metadata(&path).await?;
            Ok(meta.len().unwrap_or(0))
        })
    }

    /// The whole file; longer than `max_bytes` is an error wrapping [`TooLarge`]. Large
    /// files are read in pieces, all in flight at once.
    pub(crate) fn read(&self, rel: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
        let path = self.path(rel);
        self.call(|c| async move {
            let mut file = c.sftp.open(&path).await?;
            let len = file.metadata().await?.len().unwrap_or(0);
            if len > max_bytes {
                return Err(io::Error::other(TooLarge { len }).into());
            }
            let len = usize::try_from(len).map_err(io::Error::other)?;
            // The first read says how much one request may carry; the rest are then all
            // in flight at once.
            let mut out = match file
                .read(
                    u32::try_from(len.max(1)).unwrap_or(u32::MAX),
                    BytesMut::with_capacity(len.max(1)),
                )
                .await?
            {
                Some(bytes) => bytes,
                None => BytesMut::new(),
            };
            let piece = out.len();
            if piece > 0 && piece < len {
                let mut reads = tokio::task::JoinSet::new();
                let mut offset = piece;
                let mut n = 0usize;
                while offset < len {
                    let size = piece.min(len - offset);
                    let file = file.clone();
                    reads.spawn(async move { (n, read_at(&file, offset as u64, size).await) });
                    offset += size;
                    n += 1;
                }
                let mut pieces: Vec<Option<BytesMut>> = vec![None; n];
                while let Some(done) = reads.join_next().await {
                    let (i, bytes) = done.map_err(io::Error::other)?;
                    pieces[i] = Some(bytes?);
                }
                for bytes in pieces.into_iter().flatten() {
                    let short = bytes.len() < piece;
                    out.extend_from_slice(&bytes);
                    if short {
                        break; // the file got shorter while being read
                    }
                }
            }
            // Anything past the length it had (it grew meanwhile) is not read: a store's
            // files do not change once written.
            drop(file);
            Ok(out.to_vec())
        })
    }

    /// The first `n` bytes and the file's length.
    pub(crate) fn read_prefix(&self, rel: &Path, n: usize) -> io::Result<(Vec<u8>, u64)> {
        let path = self.path(rel);
        self.call(|c| async move {
            let mut file = c.sftp.open(&path).await?;
            let reader = file.clone();
            let (meta, prefix) = tokio::join!(file.metadata(), read_at(&reader, 0, n));
            Ok((prefix?.to_vec(), meta?.len().unwrap_or(0)))
        })
    }

    /// Creates `rel` exclusively with `bytes`, fsynced if `durable`.
    pub(crate) fn write_new(&self, rel: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
        let path = self.path(rel);
        let bytes = Bytes::copy_from_slice(bytes);
        let root = self.location.path.clone();
        self.call(|c| async move {
            let result = async {
                let mut file = create_new(&c.sftp, &path).await?;
                write_all_at_once(&mut file, bytes.clone()).await?;
                if durable {
                    file.sync_all().await?;
                }
                Ok(())
            }
            .await;
            explain_failure(&c.sftp, &root, result, bytes.len()).await
        })
    }

    /// Writes `bytes` to `tmp`, renames it to `dest` (creating `dest`'s folder if it is
    /// missing), then fsyncs it under its new name: both content and name are durable when
    /// this returns. With `durable_before`, also fsyncs before the rename (so that `dest`
    /// never names an incomplete file, even after a power loss). `tmp` is removed if the
    /// rename fails.
    pub(crate) fn put_file(
        &self,
        tmp: &Path,
        dest: &Path,
        bytes: &[u8],
        durable_before: bool,
    ) -> io::Result<()> {
        let (tmp, dest) = (self.path(tmp), self.path(dest));
        let bytes = Bytes::copy_from_slice(bytes);
        let root = self.location.path.clone();
        self.call(|c| async move {
            let result = async {
                let mut file = create_new(&c.sftp, &tmp).await?;
                write_all_at_once(&mut file, bytes.clone()).await?;
                if durable_before {
                    file.sync_all().await?;
                }
                let mut fs = c.sftp.fs();
                let renamed = match fs.rename(&tmp, &dest).await.map_err(OpError::from) {
                    Err(e) if is_not_found(&e) => {
                        let dir = dest.parent().unwrap_or(Path::new("/"));
                        match make_private_dir(&mut fs, dir).await.map_err(OpError::from) {
                            Ok(()) => {}
                            Err(e) if is_failure(&e) => {} // there already (made by another writer)
                            Err(e) => return Err(e),
                        }
                        fs.rename(&tmp, &dest).await.map_err(OpError::from)
                    }
                    other => other,
                };
                if let Err(e) = renamed {
                    drop(file);
                    if let Err(gone) = fs.remove_file(&tmp).await {
                        tracing::warn!("could not remove {}: {gone}", tmp.display());
                    }
                    return Err(e);
                }
                file.sync_all().await?;
                Ok(())
            }
            .await;
            explain_failure(&c.sftp, &root, result, bytes.len()).await
        })
    }

    /// Writes `bytes` over the start of existing file `rel` (never creating it).
    pub(crate) fn rewrite_existing(&self, rel: &Path, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(rel);
        let bytes = Bytes::copy_from_slice(bytes);
        self.call(|c| async move {
            let mut file = c.sftp.options().write(true).open(&path).await?;
            file.write_all(&bytes).await?;
            drop(file);
            Ok(())
        })
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (self.path(from), self.path(to));
        self.call(|c| async move { Ok(c.sftp.fs().rename(&from, &to).await?) })
    }

    /// Creates a folder; one that exists is `AlreadyExists`.
    pub(crate) fn create_dir(&self, rel: &Path) -> io::Result<()> {
        let path = self.path(rel);
        self.call(|c| async move {
            let mut fs = c.sftp.fs();
            match make_private_dir(&mut fs, &path)
                .await
                .map_err(OpError::from)
            {
                Err(e) if is_failure(&e) && fs.metadata(&path).await.is_ok() => {
                    Err(io::Error::new(io::ErrorKind::AlreadyExists, "the folder exists").into())
                }
                other => other,
            }
        })
    }

    /// Creates `rel` and every missing folder above it (also above the store's folder).
    pub(crate) fn create_dir_durable(&self, rel: &Path) -> io::Result<()> {
        let path = self.path(rel);
        self.call(|c| async move {
            let mut fs = c.sftp.fs();
            let mut missing = Vec::new();
            let mut at = path.as_path();
            loop {
                match fs.metadata(at).await {
                    Ok(meta) if meta.file_type().is_some_and(|t| t.is_dir()) => break,
                    Ok(_) => {
                        return Err(io::Error::other(format!(
                            "{} exists and is not a folder",
                            at.display()
                        ))
                        .into());
                    }
                    Err(SftpError::SftpError(SftpErrorKind::NoSuchFile, _)) => {
                        missing.push(at.to_path_buf());
                    }
                    Err(e) => return Err(e.into()),
                }
                match at.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => at = parent,
                    _ => break,
                }
            }
            // A folder's creation is made durable by the next fsync on that file system
            // (SFTP cannot fsync a folder): the store's files are all fsynced.
            for dir in missing.iter().rev() {
                match make_private_dir(&mut fs, dir).await.map_err(OpError::from) {
                    Err(e) if is_failure(&e) && fs.metadata(dir).await.is_ok() => {}
                    other => other?,
                }
            }
            Ok(())
        })
    }

    pub(crate) fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let path = self.path(rel);
        self.call(|c| async move { Ok(c.sftp.fs().remove_file(&path).await?) })
    }

    /// Removes files, many at once; the result of each.
    pub(crate) fn remove_files(&self, rels: &[PathBuf]) -> Vec<io::Result<()>> {
        let mut out = Vec::with_capacity(rels.len());
        for batch in rels.chunks(PARALLEL_REMOVALS * 4) {
            let paths: Vec<PathBuf> = batch.iter().map(|r| self.path(r)).collect();
            let conn = match self.connection() {
                Ok(conn) => conn,
                Err(e) => {
                    let detail = e.to_string();
                    out.extend(
                        batch
                            .iter()
                            .map(|_| Err(RemoteFailure::Lost(detail.clone()).into_io())),
                    );
                    continue;
                }
            };
            let sftp_conn = conn.clone();
            let results = self.block(
                async move {
                    let mut results: Vec<Option<Result<(), SftpError>>> =
                        (0..paths.len()).map(|_| None).collect();
                    let mut running = tokio::task::JoinSet::new();
                    for (i, path) in paths.into_iter().enumerate() {
                        if running.len() >= PARALLEL_REMOVALS
                            && let Some(Ok((j, r))) = running.join_next().await
                        {
                            results[j] = Some(r);
                        }
                        let fs = sftp_conn.sftp.fs();
                        running.spawn(async move {
                            let mut fs = fs;
                            (i, fs.remove_file(&path).await)
                        });
                    }
                    while let Some(done) = running.join_next().await {
                        if let Ok((j, r)) = done {
                            results[j] = Some(r);
                        }
                    }
                    results
                },
                OPERATION_TIMEOUT,
            );
            if let Some(results) = results {
                out.extend(results.into_iter().map(|r| match r {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(Self::io_error(&conn, OpError::Sftp(e))),
                    None => Err(io::Error::other("the removal did not finish")),
                }));
            } else {
                conn.broken.store(true, Ordering::Relaxed);
                out.extend(
                    batch.iter().map(|_| {
                        Err(RemoteFailure::Lost("the host did not answer".into()).into_io())
                    }),
                );
            }
        }
        out
    }

    /// The entries of a folder, sorted by name.
    pub(crate) fn list(&self, rel: &Path) -> io::Result<Vec<Entry>> {
        let path = self.path(rel);
        let rel = rel.to_path_buf();
        self.call(|c| async move {
            let dir = c.sftp.fs().open_dir(&path).await?;
            let mut entries = std::pin::pin!(dir.read_dir());
            let mut out = Vec::new();
            while let Some(entry) =
                std::future::poll_fn(|cx| futures_core::Stream::poll_next(entries.as_mut(), cx))
                    .await
            {
                let entry = entry?;
                let name = entry.filename().to_string_lossy().into_owned();
                if name == "." || name == ".." {
                    continue;
                }
                let meta = entry.metadata();
                if let Some(refused) = refusal(meta.file_type()) {
                    return Err(OpError::from(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        Inside {
                            name: rel.join(&name),
                            refusal: refused,
                        },
                    )));
                }
                out.push(Entry {
                    name,
                    len: meta.len().unwrap_or(0),
                    modified: meta
                        .modified()
                        .map(|t| SystemTime::UNIX_EPOCH + t.as_duration()),
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }
}

/// Creates folder `path` on the server with mode 0700 (masked by the server's umask), as
/// every folder Rewind makes in a store.
async fn make_private_dir(
    fs: &mut openssh_sftp_client::fs::Fs,
    path: &Path,
) -> Result<(), SftpError> {
    fs.dir_builder()
        .permissions(openssh_sftp_client::metadata::Permissions::from(0o700))
        .create(path)
        .await
}

/// Reads `n` bytes at `offset` of `file` (fewer at the end of the file).
pub(super) async fn read_at(file: &File, offset: u64, n: usize) -> OpResult<BytesMut> {
    let mut file = file.clone();
    Pin::new(&mut file).start_seek(io::SeekFrom::Start(offset))?;
    let mut out = BytesMut::with_capacity(n);
    while out.len() < n {
        let want = u32::try_from(n - out.len()).unwrap_or(u32::MAX);
        let at = out.len();
        match file.read(want, out.split_off(at)).await? {
            Some(piece) if !piece.is_empty() => out.unsplit(piece),
            _ => break,
        }
    }
    Ok(out)
}

/// Writes all of `bytes` at offset 0 of `file`, in pieces of the server's largest write,
/// all in flight at once.
pub(super) async fn write_all_at_once(file: &mut File, bytes: Bytes) -> OpResult<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    Pin::new(&mut *file).start_seek(io::SeekFrom::Start(0))?;
    // The first write says how much one request may carry.
    let first = file.write(&bytes).await?;
    if first == 0 || first >= bytes.len() {
        return Ok(());
    }
    let mut writes = tokio::task::JoinSet::new();
    let mut offset = first;
    while offset < bytes.len() {
        let end = (offset + first).min(bytes.len());
        let piece = bytes.slice(offset..end);
        let mut clone = file.clone();
        writes.spawn(async move {
            Pin::new(&mut clone).start_seek(io::SeekFrom::Start(offset as u64))?;
            clone.write_all(&piece).await?;
            Ok::<(), OpError>(())
        });
        offset = end;
    }
    let mut outcome = Ok(());
    while let Some(done) = writes.join_next().await {
        let result = done
            .map_err(|e| OpError::Io(io::Error::other(e)))
            .and_then(|r| r);
        if outcome.is_ok() {
            outcome = result;
        }
    }
    outcome
}

/// Opens `path` for writing, creating it; a file already there is `AlreadyExists`.
pub(super) async fn create_new(sftp: &Sftp, path: &Path) -> OpResult<File> {
    match sftp
        .options()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(OpError::from)
    {
        Err(e) if is_failure(&e) && sftp.fs().metadata(path).await.is_ok() => {
            Err(io::Error::new(io::ErrorKind::AlreadyExists, "the file exists").into())
        }
        other => other,
    }
}

/// SFTP v3 reports a full drive as a bare "failure": ask the server for the free space,
/// and say "no space left" when that is why.
pub(super) async fn explain_failure(
    sftp: &Sftp,
    root: &Path,
    result: OpResult<()>,
    len: usize,
) -> OpResult<()> {
    match result {
        Err(e) if is_failure(&e) && sftp.support_statvfs() => {
            let full = sftp.fs().statvfs(root).await.is_ok_and(|s| {
                s.bavail.saturating_mul(s.frsize) < (len as u64).saturating_add(1 << 20)
            });
            if full {
                Err(io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()).into())
            } else {
                Err(e)
            }
        }
        other => other,
    }
}
