//! The SQL of each use case. Every function takes a connection inside a
//! transaction that [`super::Database::transaction`] opened, and runs the same
//! diesel code on both backends through `dispatch!`.

pub mod batch;
pub mod dead_letters;
pub mod fences;
pub mod provisioning;
pub mod reference;
pub mod snapshot;
pub mod status;
