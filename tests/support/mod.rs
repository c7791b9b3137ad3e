pub mod backend;
pub mod callers;
pub mod certs;
pub mod fake_servicetitan;
pub mod postgres;
pub mod server;

/// Returns the shell commands README.md prints between
/// `<!-- NAME:begin -->` and `<!-- NAME:end -->`, without the code fences.
#[allow(dead_code)]
pub fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    readme
        .split(&format!("<!-- {name}:begin -->"))
        .nth(1)
        .and_then(|rest| rest.split(&format!("<!-- {name}:end -->")).next())
        .unwrap_or_else(|| panic!("README.md has no {name} block"))
        .lines()
        .filter(|line| !line.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}
