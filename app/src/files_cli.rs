//! `rewind files`, `rewind restore-files` and `rewind changes`: a checkpoint's volumes,
//! folders and files, read in place from the store (file-level restore).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Local, Utc};
use rewind_core::files::browse::{Browser, FilePath};
use rewind_core::files::changes::{ChangeKind, changes as find_changes};
use rewind_core::files::{Entry, EntryKind, FileSystem, PartitionTable, Timestamp};
use rewind_core::progress::Phase;
use rewind_core::store::Manifest;
use rewind_core::units::human_bytes;

use crate::progress_cli::Progress;
use crate::store_cli::{Interrupt, find_checkpoint, open_store, vm_matches, write_json};

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

/// Opens the checkpoint for browsing.
fn browser(dest: &Path, vm: &str, checkpoint: &str) -> anyhow::Result<Browser> {
    let store = Arc::new(open_store(dest)?);
    let m = find_checkpoint(&store, dest, vm, checkpoint)?;
    Ok(Browser::open(store, m)?)
}

/// `rewind files VM CHECKPOINT [PATH] [--find NAME] --in DEST`.
pub fn files(out: &mut dyn Write, ask: &FilesAsk<'_>) -> anyhow::Result<()> {
    let mut browser = browser(ask.dest, ask.vm, ask.checkpoint)?;
    let Some(path) = ask.path.or(ask.find.map(|_| "")) else {
        return volumes(out, &browser, ask.json);
    };
    if let Some(pattern) = ask.find {
        // Without a path, every readable volume is searched.
        let roots: Vec<FilePath> = if path.trim_matches('/').is_empty() {
            readable_roots(&browser)
        } else {
            vec![browser.resolve(path)?]
        };
        let control = Interrupt::install()?.next_control();
        let mut found = Vec::new();
        let mut problems = Vec::new();
        for root in &roots {
            match browser.find(root, pattern, &control) {
                Ok((f, e)) => {
                    found.extend(f);
                    problems.extend(e);
                }
                // A volume that cannot be read is a problem when it was not asked for.
                Err(e) if roots.len() > 1 => problems.push(e),
                Err(e) => return Err(e.into()),
            }
        }
        for p in &problems {
            eprintln!("warning: skipped {p}");
        }
        if ask.json {
            let found: Vec<serde_json::Value> = found
                .iter()
                .map(|f| entry_json(&f.entry, Some(&f.path)))
                .collect();
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return write_json(
                out,
                &serde_json::json!({
                    "vm": browser.manifest().vm.name,
                    "checkpoint": browser.manifest().id,
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
    let at = browser.resolve(path)?;
    let entry = browser.entry(&at)?;
    let entries = if entry.kind == EntryKind::Folder {
        browser.list(&at)?
    } else {
        vec![entry]
    };
    if ask.json {
        let entries: Vec<serde_json::Value> =
            entries.iter().map(|e| entry_json(e, None)).collect();
        return write_json(
            out,
            &serde_json::json!({
                "vm": browser.manifest().vm.name,
                "checkpoint": browser.manifest().id,
                "path": browser.display(at.volume, &at.names),
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

/// The root of every volume with files Rewind reads.
fn readable_roots(browser: &Browser) -> Vec<FilePath> {
    let mut roots = Vec::new();
    for (d, disk) in browser.disks().iter().enumerate() {
        for v in &disk.volumes {
            if rewind_core::files::browse::readable(v.file_system) {
                roots.push(FilePath {
                    volume: rewind_core::files::browse::VolumeRef {
                        disk: d,
                        number: v.number,
                    },
                    names: Vec::new(),
                });
            }
        }
    }
    roots
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
fn volumes(out: &mut dyn Write, browser: &Browser, json: bool) -> anyhow::Result<()> {
    let m = browser.manifest();
    if json {
        let disks: Vec<serde_json::Value> = browser
            .disks()
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
        let doc = serde_json::json!({ "vm": m.vm.name, "checkpoint": m.id, "disks": disks });
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
    for (d, disk) in browser.disks().iter().enumerate() {
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
            let name = browser.volume_name(rewind_core::files::browse::VolumeRef {
                disk: d,
                number: v.number,
            });
            let name = if d == 0 && v.number != 0 {
                format!("{}/{name}", disk.target)
            } else {
                name
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

/// `rewind restore-files VM CHECKPOINT PATH… --from DEST --to DIR`.
pub fn restore_files(
    out: &mut dyn Write,
    dest: &Path,
    vm: &str,
    checkpoint: &str,
    paths: &[String],
    to: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let mut browser = browser(dest, vm, checkpoint)?;
    let resolved = paths
        .iter()
        .map(|p| browser.resolve(p))
        .collect::<Result<Vec<_>, _>>()?;
    // Ctrl-C cancels: nothing is left in the target folder.
    let control = Interrupt::install()?.next_control();
    control.start_phase(Phase::Copying);
    let reporter = Progress::start(&browser.manifest().vm.name, control.clone());
    let result = browser.restore(&resolved, to, &control);
    drop(reporter);
    let done = result?;
    for (path, why) in &done.skipped {
        eprintln!("warning: left out {path}: {why}");
    }
    if json {
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
    writeln!(
        out,
        "Restored {} ({}) from checkpoint {} of {}:",
        what.join(", "),
        human_bytes(done.bytes),
        browser.manifest().id,
        browser.manifest().vm.name
    )?;
    for path in &done.written {
        writeln!(out, "  {}", path.display())?;
    }
    Ok(())
}

/// `rewind changes VM CHECKPOINT --in DEST [--since CHECKPOINT]`.
pub fn changes(
    out: &mut dyn Write,
    dest: &Path,
    vm: &str,
    checkpoint: &str,
    since: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let store = Arc::new(open_store(dest)?);
    let new = find_checkpoint(&store, dest, vm, checkpoint)?;
    let old = match since {
        Some(id) => find_checkpoint(&store, dest, vm, id)?,
        None => previous(&store, &new)?,
    };
    let mut old_browser = Browser::open(store.clone(), old)?;
    let mut new_browser = Browser::open(store, new)?;
    let control = Interrupt::install()?.next_control();
    let (found, problems) = find_changes(&mut old_browser, &mut new_browser, &control)?;
    for p in &problems {
        eprintln!("warning: skipped {p}");
    }
    let (o, n) = (old_browser.manifest(), new_browser.manifest());
    if json {
        let changes: Vec<serde_json::Value> = found
            .iter()
            .map(|c| {
                let mut v = entry_json(&c.entry, Some(&c.path));
                v["change"] = serde_json::to_value(c.change).unwrap_or_default();
                v
            })
            .collect();
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return write_json(
            out,
            &serde_json::json!({
                "vm": n.vm.name,
                "checkpoint": n.id,
                "since": o.id,
                "changes": changes,
                "skipped": problems,
            }),
        );
    }
    if found.is_empty() {
        writeln!(out, "No file changed between {} and {}.", o.id, n.id)?;
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
}

/// The checkpoint of the same VM just before `m`.
fn previous(store: &rewind_core::store::Store, m: &Manifest) -> anyhow::Result<Manifest> {
    let earlier: Vec<Manifest> = store
        .catalog()?
        .checkpoints
        .into_iter()
        .filter(|c| vm_matches(c, Some(&m.vm.uuid.to_string())) && c.time < m.time)
        .collect();
    earlier.into_iter().max_by_key(|c| c.time).ok_or_else(|| {
        crate::exit::not_found(format!(
            "checkpoint {} is the first of {} in this store, so there is nothing to compare \
             it with; name a later checkpoint, or an earlier one with --since",
            m.id, m.vm.name
        ))
    })
}
