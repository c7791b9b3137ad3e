pub mod fake_servicetitan;
pub mod server;
