//! Storage pools for tests: a transient `dir` pool over a scratch folder (optionally a small
//! tmpfs, to fill it up), destroyed on drop (also when the test panics), and a list of every
//! pool's folder for leak assertions.
//!
//! Pools are made through the local daemon ([`crate::daemon::URI`]) so that cleaning up
//! works even when a test has cut its SSH connection. Transient pools also vanish when
//! libvirtd restarts; [`TestPool::create`] destroys those of test processes that died.

use std::path::{Path, PathBuf};

use virt::connect::Connect;
use virt::storage_pool::StoragePool;

use crate::HarnessError;
use crate::scratch::{ScratchDir, Tmpfs, owner_pid, pid_alive};

/// A transient `dir` pool named `rwt-<scratch folder>` over its own scratch folder.
#[derive(Debug)]
pub struct TestPool {
    pool: StoragePool,
    name: String,
    // Dropped last: the folder (or tmpfs) goes after the pool.
    backing: Backing,
}

/// The folder under a test pool.
#[derive(Debug)]
enum Backing {
    Dir(ScratchDir),
    /// A tmpfs mounted on the folder, unmounted after the pool is destroyed.
    Tmpfs(Tmpfs),
    /// A folder the test owns otherwise (a test VM's); it stays when the pool goes.
    Over(PathBuf),
}

impl Backing {
    fn path(&self) -> &Path {
        match self {
            Self::Dir(d) => d.path(),
            Self::Tmpfs(t) => t.path(),
            Self::Over(p) => p,
        }
    }
}

impl TestPool {
    /// Creates the folder and the pool; `label` names both.
    pub fn create(label: &str) -> Result<Self, HarnessError> {
        Self::create_in(ScratchDir::new(label)?)
    }

    /// A pool of only `size_bytes` (a tmpfs mounted on its folder, which needs root), to see
    /// what happens when it fills up.
    pub fn create_small(label: &str, size_bytes: u64) -> Result<Self, HarnessError> {
        let tmpfs = Tmpfs::mount(label, size_bytes)?;
        let conn = crate::domain::connect()?;
        sweep_stale(&conn);
        let slug = tmpfs
            .path()
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let name = format!("rwt-{slug}");
        Self::create_named(&conn, name, Backing::Tmpfs(tmpfs))
    }

    /// A pool over `folder`, a scratch folder the test already has (a test VM's, whose
    /// files are then in a libvirt storage pool, as a real user's VM is): named after it,
    /// destroyed on drop; the folder is left to its owner.
    pub fn over(folder: &Path) -> Result<Self, HarnessError> {
        let conn = crate::domain::connect()?;
        sweep_stale(&conn);
        let slug = folder.file_name().unwrap_or_default().to_string_lossy();
        let name = format!("rwt-{slug}");
        Self::create_named(&conn, name, Backing::Over(folder.to_path_buf()))
    }

    fn create_in(dir: ScratchDir) -> Result<Self, HarnessError> {
        let conn = crate::domain::connect()?;
        sweep_stale(&conn);
        let slug = dir.path().file_name().unwrap_or_default().to_string_lossy();
        let name = format!("rwt-{slug}");
        Self::create_named(&conn, name, Backing::Dir(dir))
    }

    fn create_named(conn: &Connect, name: String, backing: Backing) -> Result<Self, HarnessError> {
        let xml = format!(
            "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
            backing.path().display()
        );
        let pool = conn.create_storage_pool_xml(&xml, 0).map_err(|e| {
            HarnessError(format!("could not create test pool {name:?}: {e}\n{xml}"))
        })?;
        Ok(Self {
            pool,
            name,
            backing,
        })
    }

    /// The pool's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool's folder.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.backing.path()
    }

    /// Whether the pool is still active.
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.pool.is_active().unwrap_or(false)
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        if self.pool.is_active().unwrap_or(false)
            && let Err(e) = self.pool.destroy()
        {
            eprintln!("warning: could not destroy test pool {:?}: {e}", self.name);
        }
    }
}

/// Every storage pool on the local daemon with its target folder (pools without one are
/// left out), active or not.
pub fn pool_targets() -> Result<Vec<(String, PathBuf)>, HarnessError> {
    let conn = crate::domain::connect()?;
    let pools = conn
        .list_all_storage_pools(0)
        .map_err(HarnessError::libvirt)?;
    Ok(pools
        .iter()
        .filter_map(|p| {
            let name = p.name().ok()?;
            let xml = p.xml_desc(0).ok()?;
            let doc = roxmltree::Document::parse(&xml).ok()?;
            let path = doc
                .descendants()
                .find(|n| n.has_tag_name("target"))?
                .children()
                .find(|n| n.has_tag_name("path"))?
                .text()?
                .trim()
                .to_owned();
            Some((name, PathBuf::from(path)))
        })
        .collect())
}

/// Destroys `rwt-<pid>-...` pools whose test process is gone.
fn sweep_stale(conn: &Connect) {
    for pool in conn.list_all_storage_pools(0).unwrap_or_default() {
        let Ok(name) = pool.name() else { continue };
        if let Some(pid) = name.strip_prefix("rwt-").and_then(owner_pid)
            && !pid_alive(pid)
        {
            drop(pool.destroy());
            drop(pool.undefine());
        }
    }
}
