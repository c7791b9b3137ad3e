//! Checks that the fake ServiceTitan behaves as the real service is
//! documented to, including its failures.

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use support::fake_servicetitan::*;

const CLIENT: &str = "cid.test";
const SECRET: &str = "cs1.secret";
const TENANT: i64 = 8450;
const APP_KEY: &str = "ak1.test";

async fn fake_with_app() -> FakeServiceTitan {
    let fake = FakeServiceTitan::start().await;
    fake.add_app(FakeApp::new(CLIENT, SECRET, TENANT, APP_KEY));
    fake
}

async fn post_token(fake: &FakeServiceTitan, form: &[(&str, &str)]) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(fake.token_url())
        .form(form)
        .send()
        .await
        .expect("token request reaches the fake");
    let status = response.status().as_u16();
    let body = read_json(response).await;
    (status, body)
}

async fn token_for(fake: &FakeServiceTitan, client: &str, secret: &str) -> String {
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", client),
        ("client_secret", secret),
    ];
    let (status, body) = post_token(fake, &form).await;
    assert_eq!(status, 200, "token request failed: {body}");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

async fn get_api(
    fake: &FakeServiceTitan,
    path: &str,
    key: Option<&str>,
    auth: Option<&str>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("{}{path}", fake.api_url()));
    if let Some(key) = key {
        request = request.header("ST-App-Key", key);
    }
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    let response = request.send().await.expect("API request reaches the fake");
    let status = response.status().as_u16();
    (status, read_json(response).await)
}

/// Parses a response body as JSON, or returns `Value::Null` when it is not JSON.
async fn read_json(response: reqwest::Response) -> Value {
    let text = response.text().await.expect("response body arrives");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("JWT has three parts");
    let bytes = URL_SAFE_NO_PAD.decode(part).expect("JWT part is base64url");
    serde_json::from_slice(&bytes).expect("JWT part is JSON")
}

fn customers(tenant: i64) -> String {
    PROBES[1].path(tenant)
}

#[tokio::test]
async fn token_success_carries_jwt_claims() {
    let fake = fake_with_app().await;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
    ];
    let (status, body) = post_token(&fake, &form).await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], json!(900));
    assert_eq!(body["token_type"], json!("Bearer"));
    assert_eq!(body["scope"], json!(ALL_PROBE_SCOPES.join(" ")));

    let token = body["access_token"].as_str().unwrap();
    assert_eq!(token.split('.').count(), 3);
    assert_eq!(jwt_part(token, 0), json!({"alg": "RS256", "typ": "at+jwt"}));
    let claims = jwt_part(token, 1);
    assert_eq!(claims["tenant"], json!("8450"));
    assert_eq!(claims["client_id"], json!(CLIENT));
    assert_eq!(claims["scope"], json!(ALL_PROBE_SCOPES));
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900
    );
    assert_eq!(claims["nbf"], claims["iat"]);
    assert_eq!(claims["iss"], json!(fake.api_url()));

    let other = token_for(&fake, CLIENT, SECRET).await;
    assert_ne!(jwt_part(&other, 1)["jti"], claims["jti"]);
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn token_form_decoding_is_byte_exact() {
    let fake = FakeServiceTitan::start().await;
    let secret = "a+b/c=d&e%2F:é ~*";
    fake.add_app(FakeApp::new(CLIENT, secret, TENANT, APP_KEY));
    token_for(&fake, CLIENT, secret).await;
    let expected = vec![
        ("grant_type".to_string(), "client_credentials".to_string()),
        ("client_id".to_string(), CLIENT.to_string()),
        ("client_secret".to_string(), secret.to_string()),
    ];
    assert_eq!(fake.last_token_form(), Some(expected));

    // The secret with its escapes decoded once too often must not match.
    let (status, body) = post_token(
        &fake,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", "a b/c=d&e/:é ~*"),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"error": "invalid_client"}));
}

#[tokio::test]
async fn token_rejections_use_oauth_errors() {
    let fake = fake_with_app().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("grant_type", "password"),
                ("client_id", CLIENT),
                ("client_secret", SECRET),
            ],
            "unsupported_grant_type",
        ),
        (
            &[("client_id", CLIENT), ("client_secret", SECRET)],
            "unsupported_grant_type",
        ),
        (
            &[("grant_type", "client_credentials"), ("client_id", CLIENT)],
            "invalid_request",
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_secret", SECRET),
            ],
            "invalid_request",
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "cid.other"),
                ("client_secret", SECRET),
            ],
            "invalid_client",
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT),
                ("client_secret", "cs1.wrong"),
            ],
            "invalid_client",
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT),
                ("client_secret", SECRET),
                ("client_secret", SECRET),
            ],
            "invalid_request",
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT),
                ("client_secret", SECRET),
                ("scope", "tn.other:r"),
            ],
            "invalid_scope",
        ),
    ];
    for (form, expected) in cases {
        let (status, body) = post_token(&fake, form).await;
        assert_eq!(status, 400, "form {form:?}");
        assert_eq!(body, json!({ "error": expected }), "form {form:?}");
    }

    let response = reqwest::Client::new()
        .post(fake.token_url())
        .header("Content-Type", "application/json")
        .body(json!({"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(
        read_json(response).await,
        json!({"error": "invalid_request"})
    );
    assert_eq!(fake.last_token_form(), None);
    assert_eq!(fake.token_requests(), cases.len() + 1);
}

#[tokio::test]
async fn token_accepts_both_active_secrets() {
    let fake = fake_with_app().await;
    fake.update_app(CLIENT, |app| app.client_secrets.push("cs2.second".into()));
    token_for(&fake, CLIENT, SECRET).await;
    token_for(&fake, CLIENT, "cs2.second").await;

    fake.update_app(CLIENT, |app| app.client_secrets.retain(|s| s != SECRET));
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
    ];
    let (status, body) = post_token(&fake, &form).await;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"error": "invalid_client"}));
}

#[tokio::test]
async fn enterprise_hub_requires_tenant_field() {
    let fake = fake_with_app().await;
    fake.update_app(CLIENT, |app| app.enterprise_hub_tenants = vec![100, 200]);
    let base = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
    ];
    let (status, body) = post_token(&fake, &base).await;
    assert_eq!((status, body), (400, json!({"error": "invalid_request"})));

    let outside = [base.as_slice(), &[("tenant", "300")]].concat();
    let (status, body) = post_token(&fake, &outside).await;
    assert_eq!((status, body), (400, json!({"error": "invalid_grant"})));

    let inside = [base.as_slice(), &[("tenant", "200")]].concat();
    let (status, body) = post_token(&fake, &inside).await;
    assert_eq!(status, 200);
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(jwt_part(token, 1)["tenant"], json!("200"));
    let bearer = format!("Bearer {token}");
    let (status, _) = get_api(&fake, &customers(200), Some(APP_KEY), Some(&bearer)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn every_probe_returns_empty_page() {
    let fake = fake_with_app().await;
    let token = token_for(&fake, CLIENT, SECRET).await;
    let bearer = format!("Bearer {token}");
    for probe in PROBES {
        let path = format!("{}?pageSize=1", probe.path(TENANT));
        let (status, body) = get_api(&fake, &path, Some(APP_KEY), Some(&bearer)).await;
        assert_eq!(status, 200, "probe {path}: {body}");
        let expected =
            json!({"page": 1, "pageSize": 1, "totalCount": 0, "hasMore": false, "data": []});
        assert_eq!(body, expected, "probe {path}");
    }
    let scopes: Vec<&str> = PROBES.iter().map(|p| p.scope).collect();
    assert_eq!(scopes, ALL_PROBE_SCOPES);

    let (status, body) = get_api(&fake, &customers(TENANT), Some(APP_KEY), Some(&token)).await;
    assert_eq!(status, 200, "bare token is accepted");
    assert_eq!(body["pageSize"], json!(50));

    let path = format!("{}?pageSize=abc", customers(TENANT));
    let (status, body) = get_api(&fake, &path, Some(APP_KEY), Some(&bearer)).await;
    assert_eq!(status, 400);
    assert!(body["errors"]["pageSize"].is_array(), "{body}");
    assert_eq!(fake.api_requests(), PROBES.len() + 2);
}

#[tokio::test]
async fn api_rejections_follow_documented_order() {
    let fake = fake_with_app().await;
    fake.add_app(FakeApp::new("cid.other", "cs1.other", 9000, "ak1.other"));
    let token = token_for(&fake, CLIENT, SECRET).await;
    let bearer = format!("Bearer {token}");
    let path = customers(TENANT);
    let gateway_401 = json!({"statusCode": 401, "message": APP_KEY_REJECTED_MESSAGE});

    let (status, body) = get_api(&fake, &path, None, Some(&bearer)).await;
    assert_eq!((status, &body), (401, &gateway_401), "missing app key");
    let (status, body) = get_api(&fake, &path, Some("ak1.unknown"), Some(&bearer)).await;
    assert_eq!((status, &body), (401, &gateway_401), "unknown app key");

    let (status, body) = get_api(&fake, &path, Some(APP_KEY), None).await;
    assert_eq!(status, 401, "missing token");
    assert_eq!(body["status"], json!(401));
    let (status, body) = get_api(&fake, &path, Some(APP_KEY), Some("Bearer nonsense")).await;
    assert_eq!(status, 401, "unknown token");
    assert!(body["traceId"].is_string());

    let (status, body) = get_api(&fake, &customers(1), Some(APP_KEY), Some(&bearer)).await;
    assert_eq!(status, 403, "other tenant in path");
    assert_eq!(body["title"], json!(TENANT_NOT_ALLOWED_TITLE));
    let (status, body) = get_api(&fake, &path, Some("ak1.other"), Some(&bearer)).await;
    assert_eq!(status, 403, "key of another app");
    assert_eq!(body["title"], json!(TENANT_NOT_ALLOWED_TITLE));

    fake.update_app(CLIENT, |app| {
        app.scopes.retain(|s| s != "tn.crm.customers:r")
    });
    let (status, body) = get_api(&fake, &path, Some(APP_KEY), Some(&bearer)).await;
    assert_eq!(status, 403, "scope removed");
    assert!(
        body["title"]
            .as_str()
            .unwrap()
            .contains("tn.crm.customers:r"),
        "{body}"
    );

    fake.update_app(CLIENT, |app| app.tenant_connected = false);
    let (status, body) =
        get_api(&fake, &PROBES[0].path(TENANT), Some(APP_KEY), Some(&bearer)).await;
    assert_eq!(status, 403, "not connected");
    assert_eq!(body["title"], json!(TENANT_NOT_ALLOWED_TITLE));

    fake.update_app(CLIENT, |app| app.app_enabled = false);
    let (status, body) = get_api(&fake, &path, Some(APP_KEY), Some(&bearer)).await;
    assert_eq!((status, &body), (401, &gateway_401), "disabled app");

    let (status, body) = get_api(
        &fake,
        "/crm/v2/tenant/8450/unknown",
        Some(APP_KEY),
        Some(&bearer),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["statusCode"], json!(404));
}

#[tokio::test]
async fn expired_and_revoked_tokens_get_401() {
    let fake = fake_with_app().await;
    fake.set_token_lifetime(0);
    let expired = format!("Bearer {}", token_for(&fake, CLIENT, SECRET).await);
    let (status, _) = get_api(&fake, &customers(TENANT), Some(APP_KEY), Some(&expired)).await;
    assert_eq!(status, 401);

    fake.set_token_lifetime(900);
    let live = format!("Bearer {}", token_for(&fake, CLIENT, SECRET).await);
    fake.revoke_tokens(CLIENT);
    let (status, _) = get_api(&fake, &customers(TENANT), Some(APP_KEY), Some(&live)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn expires_in_override_is_verbatim() {
    let fake = fake_with_app().await;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
    ];
    for value in [json!("abc"), json!(-5), json!(0), json!(1e12)] {
        fake.set_expires_in_override(Some(value.clone()));
        let (_, body) = post_token(&fake, &form).await;
        assert_eq!(body["expires_in"], value);
    }
    fake.set_expires_in_override(Some(Value::Null));
    let (_, body) = post_token(&fake, &form).await;
    assert!(body.get("expires_in").is_none(), "{body}");
    assert!(body["access_token"].is_string());
}

#[tokio::test]
async fn faults_replace_normal_responses() {
    let fake = fake_with_app().await;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
    ];
    let client = reqwest::Client::new();

    fake.set_token_fault(Fault::Status(503));
    let response = client
        .post(fake.token_url())
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        read_json(response).await,
        Value::Null,
        "503 body is a gateway page"
    );

    fake.set_token_fault(Fault::RateLimited {
        retry_after_secs: 7,
    });
    let response = client
        .post(fake.token_url())
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body = read_json(response).await;
    assert!(
        body["title"].as_str().unwrap().contains("7 seconds"),
        "{body}"
    );

    fake.set_token_fault(Fault::Garbage);
    let (status, body) = post_token(&fake, &form).await;
    assert_eq!((status, body), (200, Value::Null), "garbage is not JSON");

    fake.set_token_fault(Fault::MissingAccessToken);
    let (status, body) = post_token(&fake, &form).await;
    assert_eq!(status, 200);
    assert!(body.get("access_token").is_none());

    fake.set_token_fault(Fault::FailOnce(500));
    let (status, _) = post_token(&fake, &form).await;
    assert_eq!(status, 500);
    let token = token_for(&fake, CLIENT, SECRET).await;
    assert_eq!(fake.token_requests(), 6);

    let bearer = format!("Bearer {token}");
    fake.set_api_fault(Fault::Status(500));
    let (status, body) = get_api(&fake, &customers(TENANT), Some(APP_KEY), Some(&bearer)).await;
    assert_eq!(status, 500);
    assert_eq!(body["status"], json!(500));
    fake.set_api_fault(Fault::RateLimited {
        retry_after_secs: 2,
    });
    let (status, _) = get_api(&fake, &customers(TENANT), Some(APP_KEY), Some(&bearer)).await;
    assert_eq!(status, 429);
    fake.set_api_fault(Fault::None);
    let (status, _) = get_api(&fake, &customers(TENANT), Some(APP_KEY), Some(&bearer)).await;
    assert_eq!(status, 200);
    assert_eq!(fake.api_requests(), 3);
}

#[tokio::test]
async fn token_delay_slows_responses() {
    let fake = fake_with_app().await;
    fake.set_token_delay(Duration::from_millis(300));
    let started = Instant::now();
    token_for(&fake, CLIENT, SECRET).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn hang_holds_connection_until_shutdown() {
    let fake = fake_with_app().await;
    fake.set_token_fault(Fault::Hang);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT),
        ("client_secret", SECRET),
    ];
    let client = reqwest::Client::new();
    let timed = client
        .post(fake.token_url())
        .form(&form)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(timed.unwrap_err().is_timeout());

    let pending = tokio::spawn(client.post(fake.token_url()).form(&form).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "hanging request got a response");
    fake.shutdown();
    let outcome = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("shutdown ends the hanging request")
        .unwrap();
    assert!(outcome.is_err(), "no response after shutdown: {outcome:?}");
    assert_eq!(fake.token_requests(), 2);

    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(fake.addr()).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "listener still accepts after shutdown");
}

#[tokio::test]
async fn start_on_rejects_non_loopback() {
    let addr = "0.0.0.0:0".parse().unwrap();
    let error = FakeServiceTitan::start_on(addr)
        .await
        .err()
        .expect("rejected");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}
