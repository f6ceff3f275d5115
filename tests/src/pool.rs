//! Storage pools for tests: a transient `dir` pool over a scratch folder (optionally a small
//! tmpfs, to fill it up), destroyed on drop (also when the test panics), and a list of every
//! pool's folder for leak assertions.
//!
//! Pools are made through the local daemon ([`crate::daemon::URI`]) so that cleaning up
//! works even when a test has cut its SSH connection. Transient pools also vanish when
//! libvirtd restarts; [`TestPool::create`] destroys those of test processes that died.

use std::path::{Path, PathBuf};
use std::process::Command;

use virt::connect::Connect;
use virt::storage_pool::StoragePool;

use crate::HarnessError;
use crate::scratch::{ScratchDir, owner_pid, pid_alive};

/// A transient `dir` pool named `rwt-<scratch folder>` over its own scratch folder.
#[derive(Debug)]
pub struct TestPool {
    pool: StoragePool,
    name: String,
    /// A tmpfs mounted on the folder, unmounted after the pool is destroyed.
    mounted: Option<PathBuf>,
    // Dropped last: the folder goes after the pool.
    dir: ScratchDir,
}

impl TestPool {
    /// Creates the folder and the pool; `label` names both.
    pub fn create(label: &str) -> Result<Self, HarnessError> {
        Self::create_in(ScratchDir::new(label)?, None)
    }

    /// A pool of only `size_bytes` (a tmpfs mounted on its folder, which needs root), to see
    /// what happens when it fills up.
    pub fn create_small(label: &str, size_bytes: u64) -> Result<Self, HarnessError> {
        let dir = ScratchDir::new(label)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes},mode=0755"))
            .arg("rewind-test-pool")
            .arg(dir.path())
            .status()
            .map_err(|e| HarnessError(format!("could not run mount: {e}")))?;
        if !status.success() {
            return Err(HarnessError(format!(
                "could not mount a tmpfs on {} ({status}): this test needs root, run it with \
                 ./x test",
                dir.path().display()
            )));
        }
        let mounted = dir.path().to_path_buf();
        Self::create_in(dir, Some(mounted))
    }

    fn create_in(dir: ScratchDir, mounted: Option<PathBuf>) -> Result<Self, HarnessError> {
        let mut unmount = Unmount(mounted);
        let conn = crate::domain::connect()?;
        sweep_stale(&conn);
        let slug = dir.path().file_name().unwrap_or_default().to_string_lossy();
        let name = format!("rwt-{slug}");
        let xml = format!(
            "<pool type='dir'><name>{name}</name><target><path>{}</path></target></pool>",
            dir.path().display()
        );
        let pool = conn.create_storage_pool_xml(&xml, 0).map_err(|e| {
            HarnessError(format!("could not create test pool {name:?}: {e}\n{xml}"))
        })?;
        Ok(Self {
            pool,
            name,
            mounted: unmount.0.take(),
            dir,
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
        self.dir.path()
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
        drop(Unmount(self.mounted.take()));
    }
}

/// Unmounts a test tmpfs when dropped.
struct Unmount(Option<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = Command::new("umount").arg(&path).status();
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
            let _ = pool.destroy();
            let _ = pool.undefine();
        }
    }
}
