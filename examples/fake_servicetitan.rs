//! Runs the fake ServiceTitan on loopback, so that stvault can be tried
//! without a ServiceTitan account:
//! `cargo run --example fake_servicetitan -- --listen 127.0.0.1:9000`.

#[path = "../tests/support/fake_servicetitan.rs"]
mod fake_servicetitan;

use std::net::SocketAddr;
use std::process::ExitCode;

use fake_servicetitan::{DEFAULT_TOKEN_LIFETIME_SECS, FakeApp, FakeServiceTitan, PROBES};

const DEFAULT_LISTEN: &str = "127.0.0.1:9000";

/// Exit code for a bad command line, from BSD's sysexits.h (EX_USAGE).
const EXIT_USAGE: u8 = 64;

const USAGE: &str = "\
Usage: fake_servicetitan [--listen ADDR] [--client CLIENT_ID:SECRET:TENANT:APP_KEY]... [--token-lifetime SECS]

Serves a fake ServiceTitan token endpoint and the ten probe endpoints over HTTP.

Options:
  --listen ADDR          loopback address and port to listen on (default 127.0.0.1:9000)
  --client SPEC          adds a connection with every probe scope; repeating a client id
                         with another secret adds its second active secret (at most two).
                         The client id and app key must not contain ':', the secret may.
                         Without --client, a demo connection with two secrets is loaded.
  --token-lifetime SECS  expires_in of issued tokens, in seconds (default 900)
  -h, --help             prints this help";

struct Options {
    listen: SocketAddr,
    apps: Vec<FakeApp>,
    token_lifetime_secs: i64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let fake = match FakeServiceTitan::start_on(options.listen).await {
        Ok(fake) => fake,
        Err(error) => {
            eprintln!("error: failed to listen on {}: {error}", options.listen);
            return ExitCode::FAILURE;
        }
    };
    fake.set_token_lifetime(options.token_lifetime_secs);
    for app in &options.apps {
        fake.add_app(app.clone());
    }
    print_summary(&fake, &options);

    if let Err(error) = tokio::signal::ctrl_c().await {
        eprintln!("error: failed to wait for Ctrl-C, stopping now: {error}");
    }
    fake.shutdown();
    println!("fake ServiceTitan stopped");
    ExitCode::SUCCESS
}

/// Parses the command line. `Ok(None)` means that help was requested.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut listen = DEFAULT_LISTEN.to_string();
    let mut apps = Vec::new();
    let mut token_lifetime = DEFAULT_TOKEN_LIFETIME_SECS.to_string();
    while let Some(arg) = args.next() {
        let (flag, inline_value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let mut value = || {
            inline_value
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} requires a value"))
        };
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--client" => add_client(&mut apps, &value()?)?,
            "--token-lifetime" => token_lifetime = value()?,
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }

    let listen: SocketAddr = listen.parse().map_err(|_| {
        format!("invalid --listen {listen:?}: expected IP:PORT, such as {DEFAULT_LISTEN}")
    })?;
    if !listen.ip().is_loopback() {
        return Err(format!(
            "invalid --listen {listen}: the fake listens only on loopback addresses"
        ));
    }
    let token_lifetime_secs = token_lifetime.parse().map_err(|_| {
        format!("invalid --token-lifetime {token_lifetime:?}: expected whole seconds")
    })?;
    if apps.is_empty() {
        apps.push(demo_app());
    }
    Ok(Some(Options {
        listen,
        apps,
        token_lifetime_secs,
    }))
}

/// Adds the connection of a `CLIENT_ID:SECRET:TENANT:APP_KEY` spec, or a
/// second secret to a connection added before.
fn add_client(apps: &mut Vec<FakeApp>, spec: &str) -> Result<(), String> {
    let invalid = |reason: &str| {
        format!(
            "invalid --client for {:?}: {reason}",
            spec.split(':').next().unwrap_or("")
        )
    };
    let (client_id, rest) = spec
        .split_once(':')
        .ok_or_else(|| invalid("expected CLIENT_ID:SECRET:TENANT:APP_KEY"))?;
    let (rest, app_key) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected CLIENT_ID:SECRET:TENANT:APP_KEY"))?;
    let (secret, tenant) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected CLIENT_ID:SECRET:TENANT:APP_KEY"))?;
    if client_id.is_empty() || secret.is_empty() || app_key.is_empty() {
        return Err(invalid("client id, secret and app key must not be empty"));
    }
    let tenant_id: i64 = tenant
        .parse()
        .map_err(|_| invalid("the tenant id must be an integer"))?;

    let Some(app) = apps.iter_mut().find(|app| app.client_id == client_id) else {
        apps.push(FakeApp::new(client_id, secret, tenant_id, app_key));
        return Ok(());
    };
    if app.tenant_id != tenant_id || app.app_key != app_key {
        return Err(invalid(
            "a repeated client id must keep its tenant id and app key",
        ));
    }
    if app.client_secrets.iter().any(|s| s == secret) {
        return Err(invalid("the same secret is given twice"));
    }
    if app.client_secrets.len() >= 2 {
        return Err(invalid(
            "ServiceTitan allows at most two active secrets per connection",
        ));
    }
    app.client_secrets.push(secret.to_string());
    Ok(())
}

/// Builds the demo connection: two active secrets, as during a rotation.
fn demo_app() -> FakeApp {
    let mut app = FakeApp::new("cid.demo1", "cs1.demo-secret-one", 8450, "ak1.demo-app-key");
    app.client_secrets.push("cs2.demo-secret-two".to_string());
    app
}

fn print_summary(fake: &FakeServiceTitan, options: &Options) {
    println!("fake ServiceTitan listening on {}", fake.api_url());
    println!("token URL:    {}", fake.token_url());
    println!("API base URL: {}", fake.api_url());
    println!("token lifetime: {} s", options.token_lifetime_secs);

    for app in &options.apps {
        println!();
        println!("connection {}", app.client_id);
        println!("  client secrets: {}", app.client_secrets.join("  "));
        println!("  tenant id:      {}", app.tenant_id);
        println!("  app key:        {}", app.app_key);
        println!("  scopes:         {}", app.scopes.join(" "));
    }

    let Some(app) = options.apps.first() else {
        return;
    };
    let probe = PROBES[1].path(app.tenant_id);
    println!();
    println!("try it:");
    println!(
        "  curl -s {} -d grant_type=client_credentials --data-urlencode client_id={} --data-urlencode client_secret={}",
        fake.token_url(),
        shell_quote(&app.client_id),
        shell_quote(&app.client_secrets[0]),
    );
    println!(
        "  curl -s -H {} -H 'Authorization: Bearer ACCESS_TOKEN' '{}{probe}?pageSize=1'",
        shell_quote(&format!("ST-App-Key: {}", app.app_key)),
        fake.api_url(),
    );
    println!();
    println!("press Ctrl-C to stop");
}

/// Quotes a value for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}
