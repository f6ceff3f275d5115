//! Prune: remove the checkpoints that the keep rules do not keep (per VM). Their chunks go
//! at the next garbage collection.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::StoreError;
use super::retention::{self, KeepReason, KeepRules};
use super::{Catalog, LockMode, Store};
use crate::progress::Control;

/// The decision about one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneDecision {
    /// VM name.
    pub vm: String,
    /// VM UUID.
    pub vm_uuid: Uuid,
    /// Checkpoint id.
    pub id: String,
    /// Its time.
    pub time: DateTime<Utc>,
    /// Kept or removed.
    pub keep: bool,
    /// The rules that keep it.
    pub reasons: Vec<KeepReason>,
}

/// Keep rules that keep nothing would remove every checkpoint: refused.
fn refuse_no_rules(rules: &KeepRules) -> Result<(), StoreError> {
    if rules.is_empty() {
        return Err(StoreError::Invalid(
            "give at least one keep rule (such as --keep-last 10): with none, every checkpoint would be removed".into(),
        ));
    }
    Ok(())
}

impl Store {
    /// Applies `rules` to every VM's checkpoints (or only `vm`'s), in the local time zone.
    /// With `dry_run`, only says what it would do. Unreadable manifests are left alone.
    pub fn prune(
        &self,
        rules: &KeepRules,
        vm: Option<Uuid>,
        dry_run: bool,
        control: &Control,
    ) -> Result<Vec<PruneDecision>, StoreError> {
        refuse_no_rules(rules)?;
        let _lock = self.lock(LockMode::Shared, "removing old checkpoints", Some(control))?;
        let catalog = match vm {
            Some(uuid) => self.vm_catalog(&uuid)?,
            None => self.catalog()?,
        };
        self.prune_in(&catalog, rules, vm, dry_run, None, control)
    }

    /// [`Store::prune`] over checkpoints the caller has read already (a scheduled job reads
    /// its VM's once, and adds the one it took). The caller holds no lock; this takes the
    /// shared one for the deletions. Checkpoints added meanwhile by another writer are not
    /// in `catalog`, so they are kept.
    pub fn prune_known(
        &self,
        catalog: &Catalog,
        rules: &KeepRules,
        vm: Option<Uuid>,
        control: &Control,
    ) -> Result<Vec<PruneDecision>, StoreError> {
        refuse_no_rules(rules)?;
        let _lock = self.lock(LockMode::Shared, "removing old checkpoints", Some(control))?;
        self.prune_in(catalog, rules, vm, false, None, control)
    }

    /// Makes room for the next checkpoint of `vm` in a store that ran out of space: removes
    /// now what `rules` would remove once that checkpoint is taken (as if it were taken at
    /// `upcoming`), never the VM's newest checkpoint nor its newest safety checkpoint, then
    /// collects the data only they used. Returns what was removed and freed; nothing
    /// removed and nothing freed means there is no room to be made within the rules.
    pub fn make_room(
        &self,
        rules: &KeepRules,
        vm: Uuid,
        upcoming: DateTime<Utc>,
        control: &Control,
    ) -> Result<(Vec<PruneDecision>, super::gc::GcReport), StoreError> {
        refuse_no_rules(rules)?;
        let decisions = {
            let _lock = self.lock(LockMode::Shared, "removing old checkpoints", Some(control))?;
            let catalog = self.vm_catalog(&vm)?;
            self.prune_in(&catalog, rules, Some(vm), false, Some(upcoming), control)?
        };
        let gc = self.gc(control)?;
        Ok((decisions, gc))
    }

    fn prune_in(
        &self,
        catalog: &Catalog,
        rules: &KeepRules,
        vm: Option<Uuid>,
        dry_run: bool,
        upcoming: Option<DateTime<Utc>>,
        control: &Control,
    ) -> Result<Vec<PruneDecision>, StoreError> {
        let mut vms: Vec<Uuid> = catalog.checkpoints.iter().map(|m| m.vm.uuid).collect();
        vms.sort();
        vms.dedup();
        let mut out = Vec::new();
        for uuid in vms.into_iter().filter(|u| vm.is_none_or(|v| v == *u)) {
            let mine: Vec<_> = catalog
                .checkpoints
                .iter()
                .filter(|m| m.vm.uuid == uuid)
                .collect();
            // The checkpoint about to be taken counts, as the one it will be (`None`).
            let items: Vec<(Option<usize>, DateTime<Utc>)> = mine
                .iter()
                .enumerate()
                .map(|(i, m)| (Some(i), m.time))
                .chain(upcoming.map(|t| (None, t)))
                .collect();
            // ...but it is not taken yet: the newest there is stays.
            let newest = upcoming.and(
                mine.iter()
                    .enumerate()
                    .max_by_key(|(_, m)| m.time)
                    .map(|(i, _)| i),
            );
            // The newest safety checkpoint stays whatever the rules say: it is what
            // `rewind undo-restore` goes back to.
            let newest_safety = mine
                .iter()
                .enumerate()
                .filter(|(_, m)| m.labels.iter().any(|l| l == super::SAFETY_LABEL))
                .max_by_key(|(_, m)| m.time)
                .map(|(i, _)| i);
            for mut decision in retention::plan(&items, rules, &chrono::Local) {
                let Some(key) = decision.key else {
                    continue;
                };
                if Some(key) == newest_safety {
                    decision.keep = true;
                    decision.reasons.push(retention::KeepReason::Safety);
                }
                if Some(key) == newest && !decision.keep {
                    decision.keep = true;
                    decision.reasons.push(retention::KeepReason::Last);
                }
                let m = mine[key];
                if !decision.keep && !dry_run {
                    control.check()?;
                    match self.delete_checkpoint(&uuid, &m.id) {
                        // Deleted meanwhile (by hand, or another prune): gone either way.
                        Err(StoreError::NoSuchCheckpoint { .. }) => {}
                        other => other?,
                    }
                }
                out.push(PruneDecision {
                    vm: m.vm.name.clone(),
                    vm_uuid: uuid,
                    id: m.id.clone(),
                    time: m.time,
                    keep: decision.keep,
                    reasons: decision.reasons,
                });
            }
        }
        Ok(out)
    }
}
