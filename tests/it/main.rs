//! Integration tests on a real SQLite file and a real PostgreSQL cluster that
//! the tests start themselves.

mod chaos;
mod cli;
mod contract;
mod dashboard;
mod disk_full;
mod faults;
mod input;
mod mqtt;
mod nats;
mod netns;
mod oracle;
mod partition;
mod pg;
mod plans;
mod provisioning;
mod secure;
mod service;
mod support;
mod timeline;
