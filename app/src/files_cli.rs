//! `rewind files`, `rewind restore-files` and `rewind changes`: a checkpoint's volumes,
//! folders and files, read in place from the store (file-level restore).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Local, Utc};
use rewind_core::engine::ResumeKey;
use rewind_core::engine::files::{BrowseAnswer, BrowseAsk};
use rewind_core::engine::jobs::{JobOutput, JobRequest};
use rewind_core::files::browse::{Browser, DiskVolumes, Found, Restored};
use rewind_core::files::changes::{
    Change, ChangeKind, changes as find_changes, previous_checkpoint,
};
use rewind_core::files::{Entry, EntryKind, FileSystem, PartitionTable, Timestamp};
use rewind_core::progress::Phase;
use rewind_core::store::Manifest;
use rewind_core::units::human_bytes;

use crate::progress_cli::Progress;
use crate::service_cli::Session;
use crate::store_cli::{Interrupt, find_checkpoint, open_store, write_json};

/// Where a checkpoint's files are read: here, as this user, or by the protection service
/// (for its own destinations, whose stores only it may read).
trait Source {
    /// The checkpoint.
    fn manifest(&self) -> &Manifest;
    /// Its disks and volumes.
    fn disks(&mut self) -> anyhow::Result<Vec<DiskVolumes>>;
    /// What `path` shows (a folder's entries or a file's), and the path as resolved.
    fn show(&mut self, path: &str) -> anyhow::Result<(String, Vec<Entry>)>;
    /// What a search below `path` (every volume if empty) finds, and what it skipped.
    fn find(&mut self, path: &str, pattern: &str) -> anyhow::Result<(Vec<Found>, Vec<String>)>;
    /// The changes since `since` (else the checkpoint before): with which, and what was
    /// skipped.
    fn changes(&mut self, since: Option<&str>) -> anyhow::Result<Changed>;
    /// Restores `paths` into `to`.
    fn restore(&mut self, paths: &[String], to: &Path) -> anyhow::Result<Restored>;
}

/// What `changes` found: the checkpoint compared with (`None`: there was none before), the
/// changes, and what could not be compared.
type Changed = (Option<String>, Vec<Change>, Vec<String>);

/// The checkpoint read here, as this user.
struct Here {
    browser: Browser,
    dest: std::path::PathBuf,
}

impl Source for Here {
    fn manifest(&self) -> &Manifest {
        self.browser.manifest()
    }

    fn disks(&mut self) -> anyhow::Result<Vec<DiskVolumes>> {
        Ok(self.browser.disks().to_vec())
    }

    fn show(&mut self, path: &str) -> anyhow::Result<(String, Vec<Entry>)> {
        Ok(self.browser.show(path)?)
    }

    fn find(&mut self, path: &str, pattern: &str) -> anyhow::Result<(Vec<Found>, Vec<String>)> {
        let control = Interrupt::install()?.next_control();
        let (found, skipped) = self.browser.find_in(path, pattern, &control)?;
        Ok((found, skipped.iter().map(ToString::to_string).collect()))
    }

    fn changes(&mut self, since: Option<&str>) -> anyhow::Result<Changed> {
        let new = self.browser.manifest().clone();
        let store = self.browser.store().clone();
        let old = match since {
            Some(id) => Some(find_checkpoint(
                &store,
                &self.dest,
                &new.vm.uuid.to_string(),
                id,
            )?),
            None => previous_checkpoint(&store, &new)?,
        };
        let Some(old) = old else {
            return Ok((None, Vec::new(), Vec::new()));
        };
        let since = old.id.clone();
        let mut old_browser = Browser::open(store, old)?;
        let control = Interrupt::install()?.next_control();
        let (found, skipped) = find_changes(&mut old_browser, &mut self.browser, &control)?;
        Ok((
            Some(since),
            found,
            skipped.iter().map(ToString::to_string).collect(),
        ))
    }

    fn restore(&mut self, paths: &[String], to: &Path) -> anyhow::Result<Restored> {
        let resolved = paths
            .iter()
            .map(|p| self.browser.resolve(p))
            .collect::<Result<Vec<_>, _>>()?;
        // Ctrl-C cancels: nothing is left in the target folder.
        let control = Interrupt::install()?.next_control();
        control.start_phase(Phase::Copying);
        let reporter = Progress::start(&self.browser.manifest().vm.name, control.clone());
        let result = self.browser.restore(&resolved, to, &control);
        drop(reporter);
        Ok(result?)
    }
}

/// The checkpoint read by the protection service.
struct Served<'s> {
    session: &'s mut Session,
    key: ResumeKey,
    manifest: Manifest,
}

impl Source for Served<'_> {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn disks(&mut self) -> anyhow::Result<Vec<DiskVolumes>> {
        match self.session.browse(&self.key, BrowseAsk::Volumes)? {
            BrowseAnswer::Volumes(disks) => Ok(disks),
            other => bail!("the service answered {other:?} to a question about volumes"),
        }
    }

    fn show(&mut self, path: &str) -> anyhow::Result<(String, Vec<Entry>)> {
        let ask = BrowseAsk::List {
            path: path.to_owned(),
        };
        match self.session.browse(&self.key, ask)? {
            BrowseAnswer::Listing { path, entries } => Ok((path, entries)),
            other => bail!("the service answered {other:?} to a listing"),
        }
    }

    fn find(&mut self, path: &str, pattern: &str) -> anyhow::Result<(Vec<Found>, Vec<String>)> {
        let ask = BrowseAsk::Find {
            path: path.to_owned(),
            pattern: pattern.to_owned(),
        };
        match self.session.browse(&self.key, ask)? {
            BrowseAnswer::Found { found, skipped } => Ok((found, skipped)),
            other => bail!("the service answered {other:?} to a search"),
        }
    }

    fn changes(&mut self, since: Option<&str>) -> anyhow::Result<Changed> {
        let ask = BrowseAsk::Changes {
            since: since.map(str::to_owned),
        };
        match self.session.browse(&self.key, ask)? {
            BrowseAnswer::Changes {
                since,
                changes,
                skipped,
            } => Ok((since, changes, skipped)),
            other => bail!("the service answered {other:?} to a comparison"),
        }
    }

    fn restore(&mut self, paths: &[String], to: &Path) -> anyhow::Result<Restored> {
        let to = std::path::absolute(to)
            .with_context(|| format!("could not make {} an absolute path", to.display()))?;
        let request = JobRequest::RestoreFiles {
            destination: self.key.destination.clone(),
            vm_uuid: self.key.vm_uuid,
            checkpoint: self.key.checkpoint.clone(),
            paths: paths.to_vec(),
            to: to.clone(),
            owner: None,
        };
        let done = self
            .session
            .job(request, &self.manifest.vm.name)
            .map_err(|e| restore_cut_off(&to, e))?;
        match done {
            JobOutput::FilesRestored(done) => Ok(*done),
            other => bail!("the service answered {other:?} to a restore of files"),
        }
    }
}

/// What `rewind restore-files` says when the service stopped during the restore (`e` is a
/// [`JobCutOff`](crate::service_cli::JobCutOff); any other error is returned as it is).
fn restore_cut_off(to: &Path, e: anyhow::Error) -> anyhow::Error {
    let Some(cut) = e.downcast_ref::<crate::service_cli::JobCutOff>() else {
        return e;
    };
    tracing::debug!("{cut}");
    anyhow::anyhow!(
        "Rewind's protection service stopped while it restored files into {}. What is there \
         under a restored name is whole; what is missing was not restored: run the command \
         again once the service runs. Its hidden temporary folder there (.rewind-restore-…) \
         is removed when the service starts again",
        to.display()
    )
}

/// Runs `work` on the checkpoint: through the service when `session` is one and `dest` is
/// one of its destinations, else here.
fn with_source(
    session: Option<&mut Session>,
    dest: &Path,
    vm: &str,
    checkpoint: &str,
    work: impl FnOnce(&mut dyn Source) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if let Some(session) = session
        && let Some(found) = session.served_checkpoint(dest, vm, checkpoint)
    {
        let (destination, manifest) = found?;
        let key = ResumeKey {
            destination,
            vm_uuid: manifest.vm.uuid,
            checkpoint: manifest.id.clone(),
        };
        return work(&mut Served {
            session,
            key,
            manifest,
        });
    }
    let store = Arc::new(open_store(dest)?);
    let m = find_checkpoint(&store, dest, vm, checkpoint)?;
    let browser = Browser::open(store, m)?;
    work(&mut Here {
        browser,
        dest: dest.to_path_buf(),
    })
}

/// What `rewind files` is asked.
#[derive(Debug)]
pub struct FilesAsk<'a> {
    /// The store.
    pub dest: &'a Path,
    /// The VM (name or UUID).
    pub vm: &'a str,
    /// The checkpoint's id, or `latest`.
    pub checkpoint: &'a str,
    /// A folder (volume first); none for the volumes.
    pub path: Option<&'a str>,
    /// Search below `path` for names with this piece or pattern.
    pub find: Option<&'a str>,
    /// Print JSON.
    pub json: bool,
}

/// `rewind files VM CHECKPOINT [PATH] [--find NAME] --in DEST`.
pub fn files(
    out: &mut dyn Write,
    session: Option<&mut Session>,
    ask: &FilesAsk<'_>,
) -> anyhow::Result<()> {
    with_source(session, ask.dest, ask.vm, ask.checkpoint, |source| {
        files_of(out, source, ask)
    })
}

fn files_of(
    out: &mut dyn Write,
    source: &mut dyn Source,
    ask: &FilesAsk<'_>,
) -> anyhow::Result<()> {
    let (vm, checkpoint) = (
        source.manifest().vm.name.clone(),
        source.manifest().id.clone(),
    );
    if let Some(pattern) = ask.find {
        let (found, problems) = source.find(ask.path.unwrap_or(""), pattern)?;
        for p in &problems {
            eprintln!("warning: skipped {p}");
        }
        if ask.json {
            let found: Vec<serde_json::Value> = found
                .iter()
                .map(|f| entry_json(&f.entry, Some(&f.path)))
                .collect();
            return write_json(
                out,
                &serde_json::json!({
                    "vm": vm,
                    "checkpoint": checkpoint,
                    "found": found,
                    "skipped": problems,
                }),
            );
        }
        let rows: Vec<[String; 4]> = found
            .iter()
            .map(|f| row(&f.entry, f.path.clone()))
            .collect();
        return table(out, &rows);
    }
    let Some(path) = ask.path else {
        let disks = source.disks()?;
        return volumes(out, &vm, &checkpoint, &disks, ask.json);
    };
    let (path, entries) = source.show(path)?;
    if ask.json {
        let entries: Vec<serde_json::Value> = entries.iter().map(|e| entry_json(e, None)).collect();
        return write_json(
            out,
            &serde_json::json!({
                "vm": vm,
                "checkpoint": checkpoint,
                "path": path,
                "entries": entries,
            }),
        );
    }
    let rows: Vec<[String; 4]> = entries
        .iter()
        .map(|e| {
            let mut name = e.name.clone();
            if e.kind == EntryKind::Folder {
                name.push('/');
            }
            row(e, name)
        })
        .collect();
    table(out, &rows)
}

fn row(e: &Entry, name: String) -> [String; 4] {
    [
        match e.kind {
            EntryKind::Folder => "folder",
            EntryKind::File => "file",
            EntryKind::Symlink => "link",
            EntryKind::Other => "other",
        }
        .to_owned(),
        if e.kind == EntryKind::Folder {
            String::new()
        } else {
            human_bytes(e.size_bytes)
        },
        e.modified
            .and_then(time)
            .map(|t| t.with_timezone(&Local).format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default(),
        name,
    ]
}

fn table(out: &mut dyn Write, rows: &[[String; 4]]) -> anyhow::Result<()> {
    let widths: Vec<usize> = (0..3)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:<w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        )?;
    }
    Ok(())
}

fn time(t: Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, t.nanos)
}

/// An entry as JSON: its time in RFC 3339.
fn entry_json(e: &Entry, path: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "name": e.name,
        "kind": e.kind,
        "size_bytes": e.size_bytes,
        "modified": e.modified.and_then(time).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
    });
    if let Some(path) = path {
        v["path"] = path.into();
    }
    if !e.streams.is_empty() {
        v["streams"] = serde_json::to_value(&e.streams).unwrap_or_default();
    }
    v
}

/// `rewind files VM CHECKPOINT --in DEST`: each disk's partition table and volumes.
fn volumes(
    out: &mut dyn Write,
    vm: &str,
    checkpoint: &str,
    disks: &[DiskVolumes],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let disks: Vec<serde_json::Value> = disks
            .iter()
            .map(|d| {
                serde_json::json!({
                    "target": d.target,
                    "size_bytes": d.size_bytes,
                    "partition_table": d.partition_table,
                    "volumes": d.volumes,
                })
            })
            .collect();
        let doc = serde_json::json!({ "vm": vm, "checkpoint": checkpoint, "disks": disks });
        serde_json::to_writer_pretty(&mut *out, &doc).context("could not write JSON")?;
        writeln!(out)?;
        return Ok(());
    }
    let mut rows = vec![[
        "VOLUME".to_owned(),
        "SIZE".to_owned(),
        "FILE SYSTEM".to_owned(),
        "LABEL".to_owned(),
        "PARTITION".to_owned(),
    ]];
    for disk in disks {
        if disk.volumes.is_empty() {
            rows.push([
                disk.target.clone(),
                human_bytes(disk.size_bytes),
                "-".into(),
                String::new(),
                match disk.partition_table {
                    PartitionTable::None => "no partition table or file system Rewind knows",
                    _ => "no partitions",
                }
                .into(),
            ]);
        }
        for v in &disk.volumes {
            // The first disk's volumes are named with their disk here too.
            let name = if v.number == 0 {
                disk.target.clone()
            } else {
                format!("{}/p{}", disk.target, v.number)
            };
            let kind = match &v.partition_name {
                Some(n) => format!("{} ({n})", v.partition_type),
                None => v.partition_type.clone(),
            };
            let fs = match v.file_system {
                FileSystem::Bitlocker => "BitLocker (locked: restore the VM to use it)".into(),
                other => other.name().to_owned(),
            };
            rows.push([
                name,
                human_bytes(v.size_bytes),
                fs,
                v.label.clone().unwrap_or_default(),
                kind,
            ]);
        }
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

/// What `rewind restore-files` and `rewind changes` are asked.
#[derive(Debug)]
pub struct CheckpointAsk<'a> {
    /// The store.
    pub dest: &'a Path,
    /// The VM (name or UUID).
    pub vm: &'a str,
    /// The checkpoint's id, or `latest`.
    pub checkpoint: &'a str,
    /// Print JSON.
    pub json: bool,
}

/// `rewind restore-files VM CHECKPOINT PATH… --from DEST --to DIR`.
pub fn restore_files(
    out: &mut dyn Write,
    session: Option<&mut Session>,
    ask: &CheckpointAsk<'_>,
    paths: &[String],
    to: &Path,
) -> anyhow::Result<()> {
    // A restore never goes through a link at the target folder's end (the service's could
    // be redirected), so a link the user names is followed here, as the user.
    let to = &std::fs::canonicalize(to).unwrap_or_else(|_| to.to_path_buf());
    with_source(session, ask.dest, ask.vm, ask.checkpoint, |source| {
        let done = source.restore(paths, to)?;
        for (path, why) in &done.skipped {
            eprintln!("warning: left out {path}: {why}");
        }
        if ask.json {
            return write_json(out, &done);
        }
        let mut what = Vec::new();
        for (n, one, many) in [
            (done.files, "file", "files"),
            (done.folders, "folder", "folders"),
            (done.links, "link", "links"),
        ] {
            if n > 0 {
                what.push(format!("{n} {}", if n == 1 { one } else { many }));
            }
        }
        let m = source.manifest();
        writeln!(
            out,
            "Restored {} ({}) from checkpoint {} of {}:",
            what.join(", "),
            human_bytes(done.bytes),
            m.id,
            m.vm.name
        )?;
        for path in &done.written {
            writeln!(out, "  {}", path.display())?;
        }
        Ok(())
    })
}

/// `rewind changes VM CHECKPOINT --in DEST [--since CHECKPOINT]`.
pub fn changes(
    out: &mut dyn Write,
    session: Option<&mut Session>,
    ask: &CheckpointAsk<'_>,
    since: Option<&str>,
) -> anyhow::Result<()> {
    with_source(session, ask.dest, ask.vm, ask.checkpoint, |source| {
        let (older, found, problems) = source.changes(since)?;
        let n = source.manifest();
        let Some(older) = older else {
            return Err(crate::exit::not_found(format!(
                "checkpoint {} is the first of {} in this store, so there is nothing to \
                 compare it with; name a later checkpoint, or an earlier one with --since",
                n.id, n.vm.name
            )));
        };
        for p in &problems {
            eprintln!("warning: skipped {p}");
        }
        if ask.json {
            let changes: Vec<serde_json::Value> = found
                .iter()
                .map(|c| {
                    let mut v = entry_json(&c.entry, Some(&c.path));
                    v["change"] = serde_json::to_value(c.change).unwrap_or_default();
                    v
                })
                .collect();
            return write_json(
                out,
                &serde_json::json!({
                    "vm": n.vm.name,
                    "checkpoint": n.id,
                    "since": older,
                    "changes": changes,
                    "skipped": problems,
                }),
            );
        }
        if found.is_empty() {
            writeln!(out, "No file changed between {older} and {}.", n.id)?;
        }
        for c in &found {
            let mut path = c.path.clone();
            if c.entry.kind == EntryKind::Folder {
                path.push('/');
            }
            let what = match c.change {
                ChangeKind::Added => "added   ",
                ChangeKind::Modified => "modified",
                ChangeKind::Deleted => "deleted ",
            };
            writeln!(out, "{what}  {path}")?;
        }
        Ok(())
    })
}
