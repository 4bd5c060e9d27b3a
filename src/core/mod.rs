//! The pure core: parsing, normalizing and alarm decisions.
//!
//! Nothing here touches a database, a file or a clock; every function is a
//! plain transformation over plain structs, so the rules of the contract can
//! be tested without any I/O.

pub mod alarm;
pub mod message;
pub mod normalize;
pub mod provisioning;

pub use message::{DeadLetterKind, Message, Parsed, Rejection};
