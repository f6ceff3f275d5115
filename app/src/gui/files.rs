//! The Files window: a checkpoint's volumes, folders and files, read straight from the
//! store by the engine ([`Command::Browse`]), with search, a "changed since the previous
//! checkpoint" filter, a preview of text files, and "Restore to…" a folder of the user's.
//! A file's named data streams (NTFS) have rows of their own below it, ticked and
//! previewed like files (`file:stream`).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use chrono::{DateTime, Local, Utc};
use rewind_core::engine::files::{BrowseAnswer, BrowseAsk};
use rewind_core::engine::jobs::{JobError, JobRequest};
use rewind_core::engine::{Command, ResumeKey};
use rewind_core::files::browse::{DiskVolumes, Found};
use rewind_core::files::changes::{Change, ChangeKind};
use rewind_core::files::{Entry, EntryKind, FileSystem};
use rewind_core::units::human_bytes;

use super::Commands;
use super::state::{CheckpointKey, UiState};

/// An answer of the engine: `None` while it is awaited, else the result or why it failed.
pub type Answer<T> = Option<Result<T, String>>;

/// A search: the folder and the pattern asked, and what was found.
pub type Search = (String, String, Answer<Vec<Found>>);

/// The changes since the previous checkpoint: its id (`None`: there is none), and them.
pub type Changes = (Option<String>, Vec<Change>);

/// A preview: the file, and its first bytes, size and thumbnail (a PNG), once read.
pub type Preview = (String, Answer<(Vec<u8>, u64, Option<Vec<u8>>)>);

/// A picture's thumbnail on the GPU, and the path of its file.
pub struct Thumbnail(String, egui::TextureHandle);

#[cfg(test)]
impl Thumbnail {
    /// Its size in pixels.
    pub fn size(&self) -> [usize; 2] {
        self.1.size()
    }
}

impl std::fmt::Debug for Thumbnail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Thumbnail")
            .field(&self.0)
            .finish_non_exhaustive()
    }
}

/// What the Files window shows.
#[derive(Debug, Default)]
pub struct FilesView {
    /// The checkpoint.
    pub key: Option<CheckpointKey>,
    /// "win11 at 2026-12-05 18:30".
    pub title: String,
    /// Its disks and volumes, once read.
    pub volumes: Option<Result<Vec<DiskVolumes>, String>>,
    /// The folder shown (volume first: `p2/Users`).
    pub folder: Option<String>,
    /// Folders' entries as read so far.
    pub listings: HashMap<String, Result<Vec<Entry>, String>>,
    /// What is typed in the search field.
    pub search: String,
    /// The last search asked: the folder and pattern, and what it found.
    pub found: Option<Search>,
    /// Show only what changed since the previous checkpoint.
    pub changed_only: bool,
    /// The changes since the previous checkpoint, once read.
    pub changes: Answer<Changes>,
    /// The paths ticked for restoring.
    pub selected: BTreeSet<String>,
    /// The file previewed, and its preview once read.
    pub preview: Option<Preview>,
    /// The thumbnail shown, made from the preview's PNG once.
    pub thumbnail: Option<Thumbnail>,
    /// The folder dialog of "Restore to…", while it is open.
    pub picking: Option<Receiver<Option<PathBuf>>>,
    /// Where the last restore went, to say so.
    pub restored_to: Option<PathBuf>,
}

impl FilesView {
    /// The view of checkpoint `key`, asking the engine for its volumes.
    pub fn open(key: CheckpointKey, title: String, commands: &mut Commands) -> Self {
        commands.push(Command::Browse {
            key: resume_key(&key),
            ask: BrowseAsk::Volumes,
        });
        Self {
            key: Some(key),
            title,
            ..Self::default()
        }
    }

    /// Takes in an answer of the engine about checkpoint `key`.
    pub fn apply(
        &mut self,
        key: &ResumeKey,
        ask: BrowseAsk,
        result: Result<BrowseAnswer, JobError>,
    ) {
        if self.key.as_ref().map(resume_key).as_ref() != Some(key) {
            return;
        }
        let result = result.map_err(|e| e.to_string());
        match ask {
            BrowseAsk::Volumes => {
                self.volumes = Some(result.and_then(|a| match a {
                    BrowseAnswer::Volumes(v) => Ok(v),
                    _ => Err("an unexpected answer".into()),
                }));
            }
            BrowseAsk::List { path } => {
                let listing = result.and_then(|a| match a {
                    BrowseAnswer::Listing { entries, .. } => Ok(entries),
                    _ => Err("an unexpected answer".into()),
                });
                self.listings.insert(path, listing);
            }
            BrowseAsk::Find { path, pattern } => {
                if let Some((p, q, slot)) = &mut self.found
                    && *p == path
                    && *q == pattern
                {
                    *slot = Some(result.and_then(|a| match a {
                        BrowseAnswer::Found { found, .. } => Ok(found),
                        _ => Err("an unexpected answer".into()),
                    }));
                }
            }
            BrowseAsk::Preview { path } => {
                if let Some((p, slot)) = &mut self.preview
                    && *p == path
                {
                    *slot = Some(result.and_then(|a| match a {
                        BrowseAnswer::Preview {
                            bytes,
                            size_bytes,
                            thumbnail_png,
                        } => Ok((bytes, size_bytes, thumbnail_png)),
                        _ => Err("an unexpected answer".into()),
                    }));
                }
            }
            BrowseAsk::Changes { .. } => {
                self.changes = Some(result.and_then(|a| match a {
                    BrowseAnswer::Changes { since, changes, .. } => Ok((since, changes)),
                    _ => Err("an unexpected answer".into()),
                }));
            }
        }
    }

    /// Shows `folder`, asking for its entries if they were not read yet.
    pub fn go(&mut self, folder: String, commands: &mut Commands) {
        self.ask_listing(&folder, commands);
        self.folder = Some(folder);
        self.found = None;
    }

    fn ask_listing(&mut self, folder: &str, commands: &mut Commands) {
        if let Some(key) = &self.key
            && !self.listings.contains_key(folder)
        {
            self.listings
                .insert(folder.to_owned(), Err(LOADING.to_owned()));
            commands.push(Command::Browse {
                key: resume_key(key),
                ask: BrowseAsk::List {
                    path: folder.to_owned(),
                },
            });
        }
    }
}

/// What a listing holds while it is read.
const LOADING: &str = "reading…";

fn resume_key(key: &CheckpointKey) -> ResumeKey {
    ResumeKey {
        destination: key.destination.clone(),
        vm_uuid: key.vm_uuid,
        checkpoint: key.id.clone(),
    }
}

fn time(t: Option<rewind_core::files::Timestamp>) -> String {
    t.and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos))
        .map(|t| t.with_timezone(&Local).format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

/// A volume's name in paths, as the engine resolves it.
fn volume_path(disk: usize, target: &str, number: u32) -> String {
    match (disk, number) {
        (_, 0) => target.to_owned(),
        (0, n) => format!("p{n}"),
        (_, n) => format!("{target}/p{n}"),
    }
}

/// Draws the Files window while it is open.
pub fn files_ui(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Commands) {
    let Some(view) = state.files.as_mut() else {
        return;
    };
    // The folder dialog answers on its own thread.
    if let Some(rx) = &view.picking
        && let Ok(picked) = rx.try_recv()
    {
        view.picking = None;
        if let (Some(to), Some(key)) = (picked, &view.key) {
            // A restore never goes through a link at the folder's end: one the user picked
            // is followed here, as the user.
            let to = std::fs::canonicalize(&to).unwrap_or(to);
            commands.push(Command::Start(JobRequest::RestoreFiles {
                destination: key.destination.clone(),
                vm_uuid: key.vm_uuid,
                checkpoint: key.id.clone(),
                paths: view.selected.iter().cloned().collect(),
                to: to.clone(),
                owner: None,
            }));
            view.restored_to = Some(to);
        }
    }
    let mut open = true;
    egui::Window::new(format!("Files of {}", view.title))
        .id(egui::Id::unique("rewind-files"))
        .open(&mut open)
        .default_size([860.0, 520.0])
        .show(ui.ctx(), |ui| window_ui(ui, view, commands));
    if !open {
        state.files = None;
    }
}

fn window_ui(ui: &mut egui::Ui, view: &mut FilesView, commands: &mut Commands) {
    ui.horizontal(|ui| {
        let field = ui.add(
            egui::TextEdit::singleline(&mut view.search)
                .hint_text("Search by name (*.docx)")
                .desired_width(220.0),
        );
        let enter = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        let folder = view.folder.clone();
        if (ui
            .add_enabled(
                folder.is_some() && !view.search.trim().is_empty(),
                egui::Button::new("Search"),
            )
            .clicked()
            || enter)
            && let (Some(folder), Some(key)) = (folder, &view.key)
        {
            let pattern = view.search.trim().to_owned();
            commands.push(Command::Browse {
                key: resume_key(key),
                ask: BrowseAsk::Find {
                    path: folder.clone(),
                    pattern: pattern.clone(),
                },
            });
            view.found = Some((folder, pattern, None));
        }
        if ui
            .checkbox(
                &mut view.changed_only,
                "Changed since the previous checkpoint",
            )
            .changed()
            && view.changed_only
            && view.changes.is_none()
            && let Some(key) = &view.key
        {
            commands.push(Command::Browse {
                key: resume_key(key),
                ask: BrowseAsk::Changes { since: None },
            });
        }
    });
    ui.separator();
    egui::Panel::bottom("rewind-files-actions").show(ui, |ui| {
        actions_ui(ui, view);
    });
    egui::Panel::left("rewind-files-volumes")
        .resizable(true)
        .default_size(220.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| volumes_ui(ui, view, commands));
        });
    if view.preview.is_some() {
        egui::Panel::right("rewind-files-preview")
            .resizable(true)
            .default_size(260.0)
            .show(ui, |ui| preview_ui(ui, view));
    }
    egui::CentralPanel::default().show(ui, |ui| entries_ui(ui, view, commands));
}

fn actions_ui(ui: &mut egui::Ui, view: &mut FilesView) {
    ui.horizontal(|ui| {
        let n = view.selected.len();
        let label = match n {
            0 => "Tick files or folders to restore them".to_owned(),
            1 => "1 item ticked".to_owned(),
            n => format!("{n} items ticked"),
        };
        ui.label(label);
        if ui
            .add_enabled(
                n > 0 && view.picking.is_none(),
                egui::Button::new("Restore to…"),
            )
            .on_hover_text(
                "Copy them, as they were then, into a folder you choose (nothing is written \
                 over, and the VM is not touched)",
            )
            .clicked()
        {
            view.picking = Some(pick_folder(ui.ctx().clone()));
        }
        if let Some(to) = &view.restored_to {
            ui.label(format!("Restoring into {}", to.display()));
        }
    });
}

/// The folder dialog, on its own thread (it blocks until the user answers).
fn pick_folder(ctx: egui::Context) -> Receiver<Option<PathBuf>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let start = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
    std::thread::spawn(move || {
        let picked = rfd::FileDialog::new()
            .set_title("Restore into which folder?")
            .set_directory(start)
            .pick_folder();
        // The window closed meanwhile: the choice is not wanted.
        drop(tx.send(picked));
        ctx.request_repaint();
    });
    rx
}

fn volumes_ui(ui: &mut egui::Ui, view: &mut FilesView, commands: &mut Commands) {
    let disks = match &view.volumes {
        None => {
            ui.spinner();
            ui.label("Reading the disks…");
            return;
        }
        Some(Err(e)) => {
            ui.colored_label(ui.visuals().error_fg_color, e);
            return;
        }
        Some(Ok(disks)) => disks.clone(),
    };
    for (d, disk) in disks.iter().enumerate() {
        ui.strong(format!(
            "Disk {} ({})",
            disk.target,
            human_bytes(disk.size_bytes)
        ));
        if disk.volumes.is_empty() {
            ui.weak("no volume Rewind knows");
        }
        for v in &disk.volumes {
            let path = volume_path(d, &disk.target, v.number);
            let name = v
                .label
                .clone()
                .or_else(|| v.partition_name.clone())
                .unwrap_or_else(|| path.clone());
            let text = format!(
                "{name} — {} {}",
                human_bytes(v.size_bytes),
                v.file_system.name()
            );
            match v.file_system {
                FileSystem::Bitlocker => {
                    ui.label(text).on_hover_text(
                        "Encrypted with BitLocker: its files can be read only once it is \
                         unlocked. Restore the VM (as a new VM, to keep this one) and unlock it \
                         in Windows.",
                    );
                }
                FileSystem::Unknown => {
                    ui.weak(text);
                }
                _ => {
                    let here = view.folder.as_deref() == Some(path.as_str());
                    if ui.selectable_label(here, text).clicked() {
                        view.go(path.clone(), commands);
                    }
                    tree_ui(ui, view, &path, 0, commands);
                }
            }
        }
        ui.add_space(6.0);
    }
}

/// The folders below `folder` that were read, as a tree.
fn tree_ui(
    ui: &mut egui::Ui,
    view: &mut FilesView,
    folder: &str,
    depth: usize,
    commands: &mut Commands,
) {
    if depth > 32 {
        return;
    }
    let Some(Ok(entries)) = view.listings.get(folder) else {
        return;
    };
    let children: Vec<String> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Folder)
        .map(|e| e.name.clone())
        .collect();
    ui.indent(("files-tree", folder.to_owned()), |ui| {
        for name in children {
            let path = format!("{folder}/{name}");
            let here = view.folder.as_deref() == Some(path.as_str());
            if ui.selectable_label(here, format!("📁 {name}")).clicked() {
                view.go(path.clone(), commands);
            }
            // Only the folders on the way to the one shown are opened.
            if view
                .folder
                .as_deref()
                .is_some_and(|f| f == path || f.starts_with(&format!("{path}/")))
            {
                tree_ui(ui, view, &path, depth + 1, commands);
            }
        }
    });
}

/// One row of the list: the path, the entry, and how it changed.
struct Row {
    path: String,
    entry: Entry,
    change: Option<ChangeKind>,
    /// It is a named data stream of the file in the row above (`file:stream`).
    stream: bool,
}

/// `rows` with, after each file, a row for each of its named data streams (NTFS alternate
/// data streams): `file:stream`, which is previewed and restored like a file (restored as a
/// file of that name, as ntfs-3g names it).
fn with_streams(rows: Vec<Row>) -> Vec<Row> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let streams: Vec<Row> = row
            .entry
            .streams
            .iter()
            .map(|s| Row {
                path: format!("{}:{}", row.path, s.name),
                entry: Entry {
                    name: format!("{}:{}", row.entry.name, s.name),
                    kind: EntryKind::File,
                    size_bytes: s.size_bytes,
                    modified: row.entry.modified,
                    id: row.entry.id,
                    streams: Vec::new(),
                },
                change: row.change,
                stream: true,
            })
            .collect();
        out.push(row);
        out.extend(streams);
    }
    out
}

fn entries_ui(ui: &mut egui::Ui, view: &mut FilesView, commands: &mut Commands) {
    if let Some(rows) = rows_ui(ui, view, commands) {
        list_ui(ui, view, with_streams(rows), commands);
    }
}

/// The breadcrumb and what the list holds (`None`, with a word why, while there is none).
fn rows_ui(ui: &mut egui::Ui, view: &mut FilesView, commands: &mut Commands) -> Option<Vec<Row>> {
    let Some(folder) = view.folder.clone() else {
        ui.label("Choose a volume on the left.");
        return None;
    };
    ui.horizontal_wrapped(|ui| {
        let parts: Vec<&str> = folder.split('/').collect();
        for i in 0..parts.len() {
            if i > 0 {
                ui.label("/");
            }
            let upto = parts[..=i].join("/");
            if ui.link(parts[i]).clicked() {
                view.go(upto, commands);
            }
        }
    });
    let rows: Vec<Row> = if let Some((_, pattern, found)) = &view.found {
        match found {
            None => {
                ui.spinner();
                ui.label(format!("Searching for {pattern}…"));
                return None;
            }
            Some(Err(e)) => {
                ui.colored_label(ui.visuals().error_fg_color, e);
                return None;
            }
            Some(Ok(found)) => {
                ui.label(format!("{} found for \"{pattern}\"", found.len()));
                found
                    .iter()
                    .map(|f| Row {
                        path: f.path.clone(),
                        entry: f.entry.clone(),
                        change: None,
                        stream: false,
                    })
                    .collect()
            }
        }
    } else {
        match view.listings.get(&folder) {
            None => Vec::new(),
            Some(Err(e)) if e == LOADING => {
                ui.spinner();
                return None;
            }
            Some(Err(e)) => {
                ui.colored_label(ui.visuals().error_fg_color, e);
                return None;
            }
            Some(Ok(entries)) => entries
                .iter()
                .map(|e| Row {
                    path: format!("{folder}/{}", e.name),
                    entry: e.clone(),
                    change: None,
                    stream: false,
                })
                .collect(),
        }
    };
    let rows = if view.changed_only {
        match &view.changes {
            None => {
                ui.spinner();
                ui.label("Comparing with the previous checkpoint…");
                return None;
            }
            Some(Err(e)) => {
                ui.colored_label(ui.visuals().error_fg_color, e);
                return None;
            }
            Some(Ok((None, _))) => {
                ui.label("This is the VM's first checkpoint here: there is nothing to compare.");
                return None;
            }
            Some(Ok((Some(_), changes))) => {
                changed_rows(&folder, rows, changes, view.found.is_some())
            }
        }
    } else {
        rows
    };
    Some(rows)
}

fn list_ui(ui: &mut egui::Ui, view: &mut FilesView, rows: Vec<Row>, commands: &mut Commands) {
    egui::ScrollArea::vertical().show(ui, |ui| {
        egui::Grid::new("rewind-files-list")
            .striped(true)
            .num_columns(4)
            .show(ui, |ui| {
                ui.strong("");
                ui.strong("Name");
                ui.strong("Size");
                ui.strong("Modified");
                ui.end_row();
                for row in rows {
                    let mut ticked = view.selected.contains(&row.path);
                    let restorable = matches!(
                        row.entry.kind,
                        EntryKind::File | EntryKind::Folder | EntryKind::Symlink
                    ) && row.change != Some(ChangeKind::Deleted);
                    let label = format!("Restore {}", row.entry.name);
                    let tick =
                        ui.add_enabled(restorable, egui::Checkbox::without_text(&mut ticked));
                    // Named for screen readers (and tests), as its row is.
                    tick.widget_info(|| {
                        egui::WidgetInfo::selected(
                            egui::Role::CheckBox,
                            restorable,
                            ticked,
                            label.clone(),
                        )
                    });
                    if tick.on_hover_text(label.clone()).changed() {
                        if ticked {
                            view.selected.insert(row.path.clone());
                        } else {
                            view.selected.remove(&row.path);
                        }
                    }
                    let mark = match row.change {
                        Some(ChangeKind::Added) => " (new)",
                        Some(ChangeKind::Modified) => " (changed)",
                        Some(ChangeKind::Deleted) => " (deleted since)",
                        None => "",
                    };
                    let shown = if view.found.is_some() {
                        row.path.clone()
                    } else {
                        row.entry.name.clone()
                    };
                    name_ui(ui, view, &row, format!("{shown}{mark}"), commands);
                    ui.label(if row.entry.kind == EntryKind::Folder {
                        String::new()
                    } else {
                        human_bytes(row.entry.size_bytes)
                    });
                    ui.label(time(row.entry.modified));
                    ui.end_row();
                }
            });
    });
}

/// The name cell of `row`: a folder opens when clicked, a file (or a file's data stream)
/// is previewed.
fn name_ui(
    ui: &mut egui::Ui,
    view: &mut FilesView,
    row: &Row,
    text: String,
    commands: &mut Commands,
) {
    if row.entry.kind == EntryKind::Folder {
        if ui.link(format!("📁 {text}")).clicked() {
            view.go(row.path.clone(), commands);
        }
        return;
    }
    let mut name = ui.selectable_label(
        view.preview.as_ref().is_some_and(|(p, _)| *p == row.path),
        text,
    );
    if row.stream {
        name = name.on_hover_text(
            "A named data stream of the file above (an NTFS alternate data stream); restored \
             as a file of this name",
        );
    }
    if name.clicked()
        && row.entry.kind == EntryKind::File
        && let Some(key) = &view.key
    {
        commands.push(Command::Browse {
            key: resume_key(key),
            ask: BrowseAsk::Preview {
                path: row.path.clone(),
            },
        });
        view.preview = Some((row.path.clone(), None));
    }
}

/// The rows that changed: those of `rows` that did, and in a folder (not a search) the
/// deleted ones too.
fn changed_rows(folder: &str, rows: Vec<Row>, changes: &[Change], search: bool) -> Vec<Row> {
    let by_path: HashMap<&str, &Change> = changes.iter().map(|c| (c.path.as_str(), c)).collect();
    // A folder holding changes stays, so that they can be reached.
    let holds = |path: &str| {
        let prefix = format!("{path}/");
        changes.iter().any(|c| c.path.starts_with(&prefix))
    };
    let mut out: Vec<Row> = rows
        .into_iter()
        .filter_map(|mut r| match by_path.get(r.path.as_str()) {
            Some(c) => {
                r.change = Some(c.change);
                Some(r)
            }
            None if r.entry.kind == EntryKind::Folder && holds(&r.path) => Some(r),
            None => None,
        })
        .collect();
    if !search {
        for c in changes {
            let parent = c.path.rsplit_once('/').map_or("", |(p, _)| p);
            if c.change == ChangeKind::Deleted && parent == folder {
                out.push(Row {
                    path: c.path.clone(),
                    entry: c.entry.clone(),
                    change: Some(ChangeKind::Deleted),
                    stream: false,
                });
            }
        }
    }
    out
}

/// The pixels of a thumbnail's PNG.
fn decoded(png: &[u8]) -> Option<egui::ColorImage> {
    let image = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .ok()?
        .to_rgba8();
    let size = [
        usize::try_from(image.width()).ok()?,
        usize::try_from(image.height()).ok()?,
    ];
    Some(egui::ColorImage::from_rgba_unmultiplied(
        size,
        image.as_raw(),
    ))
}

fn preview_ui(ui: &mut egui::Ui, view: &mut FilesView) {
    let Some((path, _)) = &view.preview else {
        return;
    };
    let name = path.rsplit('/').next().unwrap_or(path).to_owned();
    let mut close = false;
    ui.horizontal(|ui| {
        ui.strong(name);
        close = ui
            .small_button("Close")
            .on_hover_text("Close the preview")
            .clicked();
    });
    if close {
        view.preview = None;
    }
    let Some((_, preview)) = &view.preview else {
        return;
    };
    match preview {
        None => {
            ui.spinner();
        }
        Some(Err(e)) => {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        Some(Ok((_, size, Some(png)))) => {
            let (size, png) = (*size, png.clone());
            let path = view
                .preview
                .as_ref()
                .map(|(p, _)| p.clone())
                .unwrap_or_default();
            if view.thumbnail.as_ref().is_none_or(|t| t.0 != path)
                && let Some(image) = decoded(&png)
            {
                let texture = ui.ctx().load_texture(
                    format!("rewind-thumbnail-{path}"),
                    image,
                    egui::TextureOptions::LINEAR,
                );
                view.thumbnail = Some(Thumbnail(path.clone(), texture));
            }
            match &view.thumbnail {
                Some(Thumbnail(p, texture)) if *p == path => {
                    ui.add(egui::Image::new(texture).max_width(ui.available_width()))
                        .on_hover_text(format!("A picture of {}", human_bytes(size)));
                }
                _ => {
                    ui.label(format!("{} picture: no preview", human_bytes(size)));
                }
            }
        }
        Some(Ok((bytes, size, None))) => {
            let text = std::str::from_utf8(bytes).ok().or_else(|| {
                // A preview cut in the middle of a character is still text.
                (0..4).find_map(|cut| {
                    std::str::from_utf8(&bytes[..bytes.len().saturating_sub(cut)]).ok()
                })
            });
            match text.filter(|t| !t.contains('\0')) {
                Some(t) => {
                    if (bytes.len() as u64) < *size {
                        ui.weak(format!(
                            "The first {} of {}",
                            human_bytes(bytes.len() as u64),
                            human_bytes(*size)
                        ));
                    }
                    egui::ScrollArea::both().show(ui, |ui| {
                        ui.add(egui::Label::new(egui::RichText::new(t).monospace()).wrap());
                    });
                }
                None => {
                    ui.label(format!("{} of data: no preview", human_bytes(*size)));
                }
            }
        }
    }
}
