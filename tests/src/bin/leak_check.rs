//! Fails (exit 1) if the test suite left anything behind: libvirt domains made by the
//! harness or using scratch files, storage pools on scratch folders (or Rewind's transient
//! file pools), notes of unfinished restores of scratch stores, scratch folders, mounts, or
//! processes using scratch files.
//! Whatever it finds it also removes, so the next run starts clean.
//!
//! `./x test` runs it after `cargo test`.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails

use std::path::Path;
use std::process::ExitCode;

use rewind_tests::{daemon, domain, scratch};

/// Users made for tests and left behind.
fn remove_test_users(leaks: &mut Vec<String>) {
    for name in rewind_tests::users::leftover() {
        leaks.push(format!("test user {name:?}"));
        rewind_tests::users::stop_processes_of(&name);
        drop(std::process::Command::new("userdel").arg(&name).status());
    }
}

fn main() -> ExitCode {
    let root = scratch::root();
    let mut leaks = Vec::new();

    if Path::new(daemon::LIBVIRT_SOCKET).exists() {
        match domain::connect() {
            Ok(conn) => {
                for dom in conn.list_all_domains(0).unwrap_or_default() {
                    if domain::marker_pid(&dom).is_some() || domain::uses_files_under(&dom, &root) {
                        let name = dom.name().unwrap_or_default();
                        leaks.push(format!("libvirt domain {name:?}"));
                        if let Err(e) = domain::remove_domain(&dom) {
                            eprintln!("leak-check: could not remove domain {name:?}: {e}");
                        }
                    }
                }
            }
            Err(e) => eprintln!("leak-check: cannot list domains: {e}"),
        }
        // Storage pools on scratch folders, and the transient pools Rewind makes to write
        // files through libvirt.
        if let Ok(conn) = domain::connect() {
            for pool in conn.list_all_storage_pools(0).unwrap_or_default() {
                let name = pool.name().unwrap_or_default();
                let on_scratch = rewind_tests::pool::pool_targets()
                    .unwrap_or_default()
                    .iter()
                    .any(|(n, path)| *n == name && path.starts_with(&root));
                if on_scratch || name.starts_with(rewind_core::libvirt::volumes::FILE_POOL_PREFIX) {
                    leaks.push(format!("storage pool {name:?}"));
                    drop(pool.destroy());
                    drop(pool.undefine());
                }
            }
        }
    }

    remove_test_users(&mut leaks);

    // Notes of restores that never finished, for stores in scratch folders.
    let restoring = rewind_core::notes::restoring_dir();
    for entry in std::fs::read_dir(&restoring)
        .into_iter()
        .flatten()
        .flatten()
    {
        let marker: Option<rewind_core::notes::RestoreMarker> = std::fs::read(entry.path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if marker.is_some_and(|m| m.store.starts_with(&root)) {
            leaks.push(format!("restore note {}", entry.path().display()));
            drop(std::fs::remove_file(entry.path()));
        }
    }

    for pid in processes_using(&root) {
        leaks.push(format!(
            "process {pid} ({})",
            cmdline(pid).chars().take(120).collect::<String>()
        ));
        drop(
            std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status(),
        );
    }

    // Mounts under the scratch root (small drives of the store tests), deepest first.
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .filter(|m| Path::new(m).starts_with(&root))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        leaks.push(format!("mount {mount}"));
        drop(
            std::process::Command::new("umount")
                .args(["-l", &mount])
                .status(),
        );
    }

    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // lock files
            }
            leaks.push(format!("scratch path {}", entry.path().display()));
            drop(
                std::fs::remove_dir_all(entry.path())
                    .or_else(|_| std::fs::remove_file(entry.path())),
            );
        }
    }

    if leaks.is_empty() {
        println!(
            "leak-check: no test VMs, pools, restore notes, mounts, scratch files or processes left behind"
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("leak-check: the tests left these behind (now removed):");
        for leak in &leaks {
            eprintln!("  - {leak}");
        }
        ExitCode::FAILURE
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn processes_using(root: &Path) -> Vec<u32> {
    let me = std::process::id();
    let root = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pid != me && cmdline(pid).contains(&root))
                .collect()
        })
        .unwrap_or_default()
}
