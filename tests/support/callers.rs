//! Bearer-key callers and policy files for tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tonic::Request;

/// A bearer key, its policy hash, and the name it is listed under.
pub struct Key {
    pub name: &'static str,
    pub key: String,
}

impl Key {
    pub fn new(name: &'static str) -> Key {
        Key {
            name,
            key: stvault::auth::identity::generate_key().expose().to_owned(),
        }
    }

    pub fn hash(&self) -> String {
        hex::encode(stvault::auth::identity::key_hash(&self.key.clone().into()))
    }

    pub fn entry(&self, roles: &str, tenants: Option<&str>) -> String {
        let mut entry = format!(
            "[[caller]]\nname = \"{}\"\nkey_sha256 = \"{}\"\nroles = {roles}\n",
            self.name,
            self.hash()
        );
        if let Some(tenants) = tenants {
            entry.push_str(&format!("tenants = {tenants}\n"));
        }
        entry
    }

    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.key).parse().unwrap(),
        );
        request
    }

    pub fn header(&self) -> String {
        format!("authorization: Bearer {}", self.key)
    }
}

pub fn write_policy(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}
