pub mod backend;
pub mod callers;
pub mod certs;
pub mod fake_servicetitan;
pub mod postgres;
pub mod server;
