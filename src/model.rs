//! Domain types shared by the store, the broker and the gRPC layer.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A ServiceTitan environment. Credentials work only where they were issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    Production,
    Integration,
}

impl Environment {
    pub const ALL: [Environment; 2] = [Environment::Production, Environment::Integration];

    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Integration => "integration",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Environment {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "production" => Ok(Environment::Production),
            "integration" => Ok(Environment::Integration),
            other => Err(format!(
                "unknown environment {other:?}; expected production or integration"
            )),
        }
    }
}
