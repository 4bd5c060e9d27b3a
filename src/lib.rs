//! normalizer: raw sensor messages into clean readings and alerts, in
//! PostgreSQL or SQLite, without wedging, losing or doubling data when the
//! database fails.
//!
//! - [`core`]: pure parsing, normalizing and alarm decisions.
//! - [`db`]: the only module that knows the database.
//! - [`pipeline`]: reader, router and worker pool.
//! - [`service`], [`feed`], [`mqtt`]: `serve` and the sources it reads
//!   (a Unix socket, a NATS JetStream feed, an MQTT broker).
//! - [`cli`]: the command line.
#![warn(missing_docs, unreachable_pub)]

pub mod cli;
mod config;
pub mod core;
pub mod db;
pub mod feed;
pub mod gen;
pub mod input;
pub mod metrics;
pub mod mqtt;
pub mod outcome;
pub mod pipeline;
pub mod secret;
pub mod service;
