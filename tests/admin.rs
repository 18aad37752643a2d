//! The admin API and `patchrelay cache`: authentication, list, pin, unpin, purge, verify.

mod support;

use std::path::Path;
use std::process::Command;

use patchrelay::bundle::BundleId;
use patchrelay::config::Config;
use patchrelay::relay::Relay;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_patchrelay");
const TOKEN: &str = "s3cret-admin-token-0123456789";

/// A config for relay `edge` with `[admin]` and a cached, unpinned bundle from an origin;
/// `listen` and `relay_extra` are put in [relay].
fn config_text(dir: &Path, listen: &str, origin: &str, relay_extra: &str) -> String {
    write_secret(&dir.join("admin.token"), format!("{TOKEN}\n"));
    format!(
        "[relay]\nid = \"edge\"\nsite = \"test\"\nlisten = \"{listen}\"\n\
         cache_dir = \"edge-cache\"\n{relay_extra}\n[upstream]\norigin = \"{origin}\"\n\
         [admin]\ntoken_file = \"admin.token\"\n"
    )
}

async fn admin_relay(dir: &Path, relay_extra: &str) -> (Relay, MockUpstream, BundleId, Vec<u8>) {
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(50_000, 80);
    let id = origin.add(&data);
    let text = config_text(dir, "127.0.0.1:0", &origin.origin_template(), relay_extra);
    let config = Config::parse(&text, "test.toml", dir).unwrap();
    let relay = Relay::start(&config).await.unwrap();
    let got = TestClient::default()
        .get(&bundle_url(&url_of(&relay), &id))
        .await;
    assert_eq!(got.bytes(), &data[..]);
    eventually("the fill has ended", || relay.running_fills() == 0).await;
    (relay, origin, id, data)
}

async fn admin(relay: &Relay, method: &str, path: &str, token: Option<&str>) -> Fetched {
    let url = format!("{}/v1/admin/{path}", url_of(relay));
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    TestClient::default().send(method, &url, &headers).await
}

#[tokio::test]
async fn admin_calls_need_the_right_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _origin, id, _) = admin_relay(dir.path(), "").await;

    let missing = admin(&relay, "GET", "cache", None).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    assert_eq!(missing.json()["relay"], "edge");

    let wrong = admin(&relay, "GET", "cache", Some("not-the-token")).await;
    assert_eq!(wrong.status, 403);

    let listed = admin(&relay, "GET", "cache", Some(TOKEN)).await;
    assert_eq!(listed.status, 200);
    let json = listed.json();
    assert_eq!(json["bundles"][0]["id"], id.to_string());
    assert_eq!(json["bundles"][0]["size"], 50_000);
    assert_eq!(json["bundles"][0]["pinned"], false);
    assert_eq!(json["used_bytes"], 50_000);
    relay.shutdown().await;
}

#[tokio::test]
async fn without_a_token_file_the_admin_api_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay("plain", dir.path(), &[], None).await;
    let got = admin(&relay, "GET", "cache", Some(TOKEN)).await;
    assert_eq!(got.status, 404);
    assert!(got.json()["error"]
        .as_str()
        .unwrap()
        .contains("admin API is off"));
    relay.shutdown().await;
}

#[tokio::test]
async fn pin_unpin_and_purge_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let config_pin = BundleId::of(b"pinned in config");
    let extra = format!("pins = [\"{config_pin}\"]");
    let (relay, _origin, id, _) = admin_relay(dir.path(), &extra).await;
    let token = Some(TOKEN);

    assert_eq!(
        admin(&relay, "PUT", &format!("pins/{id}"), token)
            .await
            .status,
        200
    );
    let refused = admin(&relay, "DELETE", &format!("cache/{id}"), token).await;
    assert_eq!(refused.status, 409, "a pinned bundle is not purged");
    assert!(cached(dir.path(), "edge", &id));

    let config_unpin = admin(&relay, "DELETE", &format!("pins/{config_pin}"), token).await;
    assert_eq!(
        config_unpin.status, 409,
        "config pins are not the API's to remove"
    );

    assert_eq!(
        admin(&relay, "DELETE", &format!("pins/{id}"), token)
            .await
            .status,
        200
    );
    let purged = admin(&relay, "DELETE", &format!("cache/{id}"), token).await;
    assert_eq!(purged.status, 200);
    assert!(!cached(dir.path(), "edge", &id));
    assert_eq!(
        admin(&relay, "DELETE", &format!("cache/{id}"), token)
            .await
            .status,
        404
    );
    assert_eq!(
        admin(&relay, "GET", "cache", token).await.json()["bundles"],
        serde_json::json!([])
    );

    let bad_id = admin(&relay, "PUT", "pins/nope", token).await;
    assert_eq!(bad_id.status, 400);
    relay.shutdown().await;
}

fn cache_cmd(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .arg("cache")
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_cli_talks_to_a_running_relay() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, origin, id, _) = admin_relay(dir.path(), "").await;
    // The CLI finds the relay at the listen address of its config.
    let listen = relay.local_addr().to_string();
    let config = dir.path().join("cli.toml");
    std::fs::write(
        &config,
        config_text(dir.path(), &listen, &origin.origin_template(), ""),
    )
    .unwrap();

    let id_text = id.to_string();
    let (code, out, err) = cache_cmd(&config, &["--json", "ls"]);
    assert_eq!(code, Some(0), "{err}");
    let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listing["bundles"][0]["id"], id_text);

    let (code, out, _) = cache_cmd(&config, &["pin", &id_text]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), format!("pinned {id}").as_str())
    );
    let (code, _, err) = cache_cmd(&config, &["purge", &id_text]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("409") && err.contains("unpin it first"),
        "{err}"
    );
    let (code, out, _) = cache_cmd(&config, &["ls"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines().nth(1).unwrap().trim_end().ends_with("yes"),
        "{out}"
    );

    let (code, out, _) = cache_cmd(&config, &["verify"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!("{id}  ok")), "{out}");
    relay.shutdown().await;
}

#[tokio::test]
async fn cache_cli_offline_works_on_a_stopped_relay_and_finds_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, origin, id, data) = admin_relay(dir.path(), "").await;
    relay.shutdown().await;
    let config = dir.path().join("offline.toml");
    let text = config_text(dir.path(), "127.0.0.1:1", &origin.origin_template(), "");
    std::fs::write(&config, text).unwrap();

    let (code, out, _) = cache_cmd(&config, &["--offline", "verify"]);
    assert_eq!(code, Some(0), "{out}");

    // Flip a bit on disk: verify reports it and exits 1.
    let hex = id.to_string();
    let object = dir
        .path()
        .join(format!("edge-cache/objects/{}/{hex}", &hex[..2]));
    let mut bytes = data.clone();
    bytes[1234] ^= 1;
    std::fs::write(&object, &bytes).unwrap();
    let (code, out, _) = cache_cmd(&config, &["--offline", "verify"]);
    assert_eq!(code, Some(1));
    assert!(out.contains(&format!("{id}  CORRUPT")), "{out}");

    let (code, out, _) = cache_cmd(&config, &["--offline", "purge", &hex]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), format!("purged {id}").as_str())
    );
    assert!(!object.exists());
    let (code, out, _) = cache_cmd(&config, &["--offline", "--json", "ls"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["bundles"],
        serde_json::json!([])
    );
}

async fn put_manifest(relay: &Relay, body: &str) -> Fetched {
    let url = format!("{}/v1/admin/manifest", url_of(relay));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = http::Request::put(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Fetched {
        status: parts.status,
        headers: parts.headers,
        body: Ok(body),
    }
}

#[tokio::test]
async fn the_root_manifest_is_set_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _origin, id, _) = admin_relay(dir.path(), "").await;

    let body = format!(r#"{{"bundles": [{{"id": "{id}", "ready_by": "2026-12-08T06:00:00Z"}}]}}"#);
    let set = put_manifest(&relay, &body).await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(set.json()["version"], 1);

    let manifest = TestClient::default()
        .get(&format!("{}/v1/manifest", url_of(&relay)))
        .await;
    let json = manifest.json();
    assert_eq!(json["bundles"][0]["id"], id.to_string());
    assert_eq!(json["bundles"][0]["size"], 50_000);
    assert_eq!(json["bundles"][0]["ready_by"], "2026-12-08T06:00:00Z");
    let listed = admin(&relay, "GET", "cache", Some(TOKEN)).await.json();
    assert_eq!(listed["bundles"][0]["in_manifest"], true, "{listed}");
    assert_eq!(
        listed["bundles"][0]["pinned"], true,
        "manifest bundles are pinned"
    );

    let unpin = admin(&relay, "DELETE", &format!("pins/{id}"), Some(TOKEN)).await;
    assert_eq!(
        unpin.status, 409,
        "a manifest bundle stays pinned while in the manifest"
    );

    let unknown = BundleId::of(b"never published");
    let missing = put_manifest(
        &relay,
        &format!(r#"{{"bundles": [{{"id": "{unknown}"}}]}}"#),
    )
    .await;
    assert_eq!(missing.status, 409);
    assert_eq!(put_manifest(&relay, "{not json").await.status, 400);
    assert_eq!(
        put_manifest(&relay, r#"{"bundles": [{"id": "zz"}]}"#)
            .await
            .status,
        400
    );
    relay.shutdown().await;
}
