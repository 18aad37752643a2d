//! TLS between relays: a child fetching from an HTTPS parent verified against a test CA
//! (made here with rcgen), mutual TLS refusing a child without a client certificate, and
//! a client that does not trust the CA getting nothing.

mod support;

use std::path::{Path, PathBuf};

use patchrelay::config::Config;
use patchrelay::relay::Relay;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use support::*;

/// A test CA and certificates it signed, written as PEM files under `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["child".to_string()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    let write = |name: &str, text: String| {
        let path = dir.join(name);
        write_secret(&path, text);
        path
    };
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server_cert.pem()),
        server_key: write("server.key", server_key.serialize_pem()),
        client_cert: write("client.pem", client_cert.pem()),
        client_key: write("client.key", client_key.serialize_pem()),
    }
}

/// A relay from TOML text (with `{dir}` replaced by `dir`).
async fn relay_from(dir: &Path, text: &str) -> Relay {
    let text = text.replace("{dir}", &dir.display().to_string());
    let config = Config::parse(&text, "tls.toml", dir).expect("valid config");
    Relay::start(&config).await.expect("relay starts")
}

fn parent_toml(pki: &Pki, origin: &str, client_ca: bool) -> String {
    let client_ca = if client_ca {
        format!("client_ca = {:?}\n", pki.ca)
    } else {
        String::new()
    };
    format!(
        "[relay]\nid = \"parent\"\nsite = \"hq\"\nlisten = \"127.0.0.1:0\"\n\
         cache_dir = \"parent-cache\"\ntls_cert = {:?}\ntls_key = {:?}\n{client_ca}\
         [upstream]\norigin = \"{origin}\"\n",
        pki.server_cert, pki.server_key
    )
}

fn child_toml(parent: &str, ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let client = client.map_or(String::new(), |(cert, key)| {
        format!("client_cert = {cert:?}\nclient_key = {key:?}\n")
    });
    format!(
        "[relay]\nid = \"child\"\nsite = \"branch\"\nlisten = \"127.0.0.1:0\"\n\
         cache_dir = \"child-cache\"\n[upstream]\nparents = [\"{parent}\"]\nca_file = {ca:?}\n\
         connect_timeout = \"1s\"\nstall_timeout = \"2s\"\n{client}"
    )
}

/// A bundle fetched through `relay` (within 20 s).
async fn fetch(relay: &Relay, id: &patchrelay::bundle::BundleId) -> Fetched {
    within(
        20,
        TestClient::default().get(&bundle_url(&url_of(relay), id)),
    )
    .await
}

/// An HTTPS parent in front of `origin` (requiring client certificates with
/// `client_ca`), and its URL.
async fn https_parent(
    dir: &Path,
    pki: &Pki,
    origin: &MockUpstream,
    client_ca: bool,
) -> (Relay, String) {
    let parent = relay_from(dir, &parent_toml(pki, &origin.origin_template(), client_ca)).await;
    let url = format!("https://127.0.0.1:{}", parent.local_addr().port());
    (parent, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_fetches_from_an_https_parent_verified_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(500_000, 101);
    let id = origin.add(&data);
    let (parent, parent_url) = https_parent(dir.path(), &pki, &origin, false).await;

    let child = relay_from(dir.path(), &child_toml(&parent_url, &pki.ca, None)).await;
    let got = fetch(&child, &id).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &data[..]);
    assert_eq!(
        parent.stats().fills_completed,
        1,
        "the parent served it over TLS"
    );

    // Plain HTTP to the TLS port gets no answer; the relay goes on serving TLS.
    let plain = TestClient::default()
        .try_send(
            "GET",
            &format!("http://{}/healthz", parent.local_addr()),
            &[],
        )
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|f| f.status != 200));

    // A child that trusts another CA refuses the parent: 502, nothing cached.
    let other = tempfile::tempdir().unwrap();
    let other_pki = make_pki(other.path());
    let doubting = relay_from(
        other.path(),
        &child_toml(&parent_url, &other_pki.ca, None).replace("\"child\"", "\"doubting\""),
    )
    .await;
    let got = fetch(&doubting, &id).await;
    assert_eq!(got.status, 502);
    assert!(!cached(other.path(), "child", &id));

    doubting.shutdown().await;
    child.shutdown().await;
    parent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_requiring_client_certificates_refuses_a_child_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(100_000, 102);
    let id = origin.add(&data);
    let (parent, parent_url) = https_parent(dir.path(), &pki, &origin, true).await;

    let anonymous = relay_from(dir.path(), &child_toml(&parent_url, &pki.ca, None)).await;
    let got = fetch(&anonymous, &id).await;
    assert_eq!(got.status, 502, "no client certificate, no bundle");
    assert_eq!(parent.stats().fills_started, 0);
    anonymous.shutdown().await;

    let sub = dir.path().join("authenticated");
    std::fs::create_dir_all(&sub).unwrap();
    let known = relay_from(
        &sub,
        &child_toml(
            &parent_url,
            &pki.ca,
            Some((&pki.client_cert, &pki.client_key)),
        ),
    )
    .await;
    let got = fetch(&known, &id).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &data[..]);
    known.shutdown().await;
    parent.shutdown().await;
}

#[test]
fn https_parents_need_a_ca_and_tls_files_go_in_pairs() {
    let dir = Path::new("/etc/patchrelay");
    let base =
        "[relay]\nid = \"r\"\nsite = \"s\"\nlisten = \"127.0.0.1:7420\"\ncache_dir = \"c\"\n";
    let err = Config::parse(
        &format!("{base}[upstream]\nparents = [\"https://10.0.0.1:7420\"]\n"),
        "r.toml",
        dir,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("r.toml:7: upstream.parents:"), "{err}");
    assert!(err.contains("ca_file"), "{err}");

    let ok = Config::parse(
        &format!("{base}[upstream]\nparents = [\"https://10.0.0.1:7420\"]\nca_file = \"ca.pem\"\n"),
        "r.toml",
        dir,
    )
    .unwrap();
    assert_eq!(ok.upstream.tls.unwrap().ca, dir.join("ca.pem"));

    let err = Config::parse(
        &format!("{base}tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nrequire_client_cert = false\n"),
        "r.toml",
        dir,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("r.toml:8: relay.require_client_cert: needs client_ca"),
        "{err}"
    );

    let err = Config::parse(&format!("{base}tls_cert = \"c.pem\"\n"), "r.toml", dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("relay.tls_cert: tls_cert and tls_key go together"),
        "{err}"
    );
    let err = Config::parse(
        &format!("{base}[upstream]\nca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\n"),
        "r.toml",
        dir,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("client_cert and client_key go together"),
        "{err}"
    );
}

/// A GET over HTTPS verified by `ca`, showing `client` when given; the status, or the
/// connection error.
async fn https_get(
    url: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<(u16, Vec<u8>), String> {
    use http_body_util::BodyExt;

    let files = patchrelay::tls::ClientFiles {
        ca: ca.to_path_buf(),
        cert_and_key: client.map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
    };
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let connector = patchrelay::tls::connector(http, Some(&files)).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
    let response = client
        .get(url.parse().unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes().to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_over_mutual_tls_takes_beacons_and_checks_an_https_relay() {
    use patchrelay::monitor::{relay_views, Monitor, MonitorConfig};

    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    write_secret(
        &dir.path().join("beacon.key"),
        [7u8; 32].map(|b| format!("{b:02x}")).concat(),
    );
    write_secret(
        &dir.path().join("admin.token"),
        "tls-admin-token-0123456789",
    );
    let origin = MockUpstream::start(Behavior::Normal).await;

    // Both sides require client certificates signed by the test CA and show theirs.
    let monitor_toml = format!(
        "[monitor]\nid = \"central\"\nlisten = \"127.0.0.1:0\"\ndatabase = \"m.db\"\n\
         tls_cert = {cert:?}\ntls_key = {key:?}\nclient_ca = {ca:?}\n\
         [beacon]\nkey_file = \"beacon.key\"\ninterval = \"200ms\"\n\
         [checks]\ninterval = \"200ms\"\ntimeout = \"2s\"\nca_file = {ca:?}\n\
         client_cert = {ccert:?}\nclient_key = {ckey:?}\n",
        cert = pki.server_cert,
        key = pki.server_key,
        ca = pki.ca,
        ccert = pki.client_cert,
        ckey = pki.client_key,
    );
    let config = MonitorConfig::parse(&monitor_toml, "monitor.toml", dir.path()).unwrap();
    let monitor = Monitor::start(config).await.expect("monitor starts");
    let monitor_url = format!("https://127.0.0.1:{}", monitor.addr().port());

    let relay_toml = format!(
        "[relay]\nid = \"branch\"\nsite = \"lyon\"\nlisten = \"127.0.0.1:0\"\n\
         cache_dir = \"branch-cache\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
         client_ca = {ca:?}\n\
         [upstream]\norigin = \"{origin}\"\nca_file = {ca:?}\nclient_cert = {ccert:?}\n\
         client_key = {ckey:?}\n\
         [monitor]\nurl = \"{monitor_url}\"\n\
         [beacon]\nkey_file = \"beacon.key\"\ninterval = \"200ms\"\n\
         [admin]\ntoken_file = \"admin.token\"\n",
        cert = pki.server_cert,
        key = pki.server_key,
        ca = pki.ca,
        ccert = pki.client_cert,
        ckey = pki.client_key,
        origin = origin.origin_template(),
    );
    let relay = relay_from(dir.path(), &relay_toml).await;

    // The monitor hears the relay's beacons and gets answers from its /readyz, both over
    // mutual TLS, and so calls it up.
    let store = monitor.state().store.clone();
    let seen = within(20, async {
        loop {
            let views = relay_views(&store).unwrap();
            let up = views.into_iter().find(|v| {
                v.relay.id == "branch"
                    && v.relay.last_beacon_at.is_some()
                    && v.relay.check_answered
                    && v.relay.state.is_some_and(|s| s.as_str() == "up")
            });
            if let Some(up) = up {
                return up;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(seen.relay.url.starts_with("https://"), "{}", seen.relay.url);

    // The dashboard answers a client with a certificate, and no one without.
    let page = https_get(
        &format!("{monitor_url}/"),
        &pki.ca,
        Some((&pki.client_cert, &pki.client_key)),
    )
    .await
    .unwrap();
    assert_eq!(page.0, 200);
    assert!(
        String::from_utf8_lossy(&page.1).contains("branch"),
        "the tree lists the relay"
    );
    assert!(https_get(&format!("{monitor_url}/"), &pki.ca, None)
        .await
        .is_err());

    // The admin CLI reaches the HTTPS relay with the TLS settings of its config.
    let config_path = dir.path().join("relay.toml");
    let listen = format!("listen = \"{}\"", relay.local_addr());
    std::fs::write(
        &config_path,
        relay_toml.replace("listen = \"127.0.0.1:0\"", &listen),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patchrelay"))
        .args(["cache", "-c", config_path.to_str().unwrap(), "--json", "ls"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cache ls over HTTPS: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    relay.shutdown().await;
    monitor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certified_child_relay_is_exempt_from_per_client_caps_and_agents_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(50_000, 103);
    let id = origin.add(&data);
    // Client certificates are optional: agents connect without one, child relays with one.
    let text = parent_toml(&pki, &origin.origin_template(), true).replace(
        "[upstream]",
        "require_client_cert = false\n[limits]\nrequests_per_client = \"1/min\"\n\
         max_downloads_per_client = 1\n[upstream]",
    );
    let parent = relay_from(dir.path(), &text).await;
    let base = format!("https://127.0.0.1:{}", parent.local_addr().port());
    let url = bundle_url(&base, &id);

    // An agent without a certificate is served, under the per-client caps.
    assert_eq!(https_get(&url, &pki.ca, None).await.unwrap().0, 200);
    assert_eq!(https_get(&url, &pki.ca, None).await.unwrap().0, 429);

    // A child relay with the tree's certificate, from the same address, is not capped.
    let cert = Some((pki.client_cert.as_path(), pki.client_key.as_path()));
    for _ in 0..3 {
        let (status, body) = https_get(&url, &pki.ca, cert).await.unwrap();
        assert_eq!(status, 200);
        assert!(body == data, "the whole bundle");
    }
    parent.shutdown().await;
}
