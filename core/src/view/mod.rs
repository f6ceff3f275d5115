//! What the front ends show, computed from the configuration, the stores and the history:
//! the checkpoints of every destination ([`catalog`]) and how well each VM is protected
//! ([`overview`]). It sits beside the history, below the engine and the scheduler, which
//! only hand it their data.

pub mod catalog;
pub mod overview;
