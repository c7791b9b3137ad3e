pub mod fake_servicetitan;
