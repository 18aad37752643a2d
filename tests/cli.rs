//! The binary: publish, serve, config errors and SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use patchrelay::bundle::BundleId;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_patchrelay");

/// A child process that is killed if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// A `patchrelay serve` process whose log lines can be awaited.
struct ServeProcess {
    child: KillOnDrop,
    lines: std::sync::mpsc::Receiver<String>,
    /// The start line, and the address it names.
    start_line: String,
    listen: String,
}

impl ServeProcess {
    fn start(config: &Path) -> Self {
        let mut child = KillOnDrop(
            Command::new(BIN)
                .args(["serve", "-c"])
                .arg(config)
                .env("RUST_LOG", "info")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.0.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut process = Self {
            child,
            lines,
            start_line: String::new(),
            listen: String::new(),
        };
        let start_line = process.wait_for("relay started");
        process.listen = start_line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("listen="))
            .expect("start line names the listen address")
            .to_string();
        process.start_line = start_line;
        process
    }

    /// The first log line from now on that contains `needle`.
    fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("the relay never logged {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.0.id().to_string();
        let sent = Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(sent.success());
    }
}

fn write_config(dir: &Path, listen: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        r#"[relay]
id = "cli-root"
site = "hq"
listen = "{listen}"
cache_dir = "data/cache"
shutdown_grace = "5s"

[upstream]
parents = []
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `patchrelay publish` with `flags`, the config and `files`.
fn publish(config: &Path, flags: &[&str], files: &[PathBuf]) -> std::process::Output {
    Command::new(BIN)
        .arg("publish")
        .args(flags)
        .arg("-c")
        .arg(config)
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn publish_prints_ids_and_pins_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let (a, b) = (content(10_000, 41), content(20_000, 42));
    std::fs::write(dir.path().join("a.msu"), &a).unwrap();
    std::fs::write(dir.path().join("b.msu"), &b).unwrap();

    let files = [dir.path().join("a.msu"), dir.path().join("b.msu")];
    let out = publish(&config, &[], &files);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("{}  10000  ", BundleId::of(&a))),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!("{}  20000  ", BundleId::of(&b))),
        "{stdout}"
    );

    let cache = dir.path().join("data/cache");
    for id in [BundleId::of(&a), BundleId::of(&b)] {
        assert!(
            cache.join("pins").join(id.to_string()).is_file(),
            "{id} not pinned"
        );
    }
}

#[test]
fn publish_of_a_missing_file_fails_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let out = publish(&config, &[], &[PathBuf::from("/no/such.msu")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such.msu"));
}

#[test]
fn config_errors_name_file_and_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[relay]\nid = \"x\"\nsite = \"s\"\nlisten = \"nowhere\"\ncache_dir = \"c\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:4: relay.listen:", path.display())),
        "{stderr}"
    );

    let missing = Command::new(BIN)
        .args(["serve", "-c", "/no/relay.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/relay.toml"));
}

#[test]
fn checked_in_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml");
    let config = patchrelay::config::Config::load(&path).expect("relay.toml is valid");
    assert!(config.is_root());
    assert_eq!(config.relay.listen.to_string(), "127.0.0.1:7420");

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("monitor.toml");
    let monitor = patchrelay::monitor::MonitorConfig::load(&path).expect("monitor.toml is valid");
    assert_eq!(monitor.listen.to_string(), "127.0.0.1:7500");
    assert!(monitor.tls.is_none() && monitor.checks.tls.is_none());
}

#[test]
fn check_recognizes_a_monitor_config_and_names_its_bad_line() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(manifest.join("monitor.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok (monitor central, listen 127.0.0.1:7500"),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("monitor.toml");
    let text = "[monitor]\nid = \"central\"\nlisten = \"127.0.0.1:7500\"\n\
                database = \"m.db\"\n\n[checks]\ninterval = \"soon\"\n";
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("monitor.toml:7: checks.interval"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serve_answers_published_bundles_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let data = content(30_000, 43);
    std::fs::write(dir.path().join("p.msu"), &data).unwrap();
    let published = publish(&config, &[], &[dir.path().join("p.msu")]);
    assert!(published.status.success());

    let relay = ServeProcess::start(&config);
    let listen = relay.listen.clone();
    assert!(
        relay.start_line.contains("cache.bundles=1"),
        "{}",
        relay.start_line
    );

    let id = BundleId::of(&data);
    let got = within(
        20,
        TestClient::default().get(&bundle_url(&format!("http://{listen}"), &id)),
    )
    .await;
    assert_eq!(got.header("x-patchrelay-cache"), Some("hit"));
    assert_eq!(got.bytes(), &data[..]);

    relay.signal("-TERM");
    let mut child = relay.child;
    let status = within(20, tokio::task::spawn_blocking(move || child.0.wait()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_limits_and_rejects_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let relay = ServeProcess::start(&config);
    let listen = relay.listen.clone();
    let hangup = || relay.signal("-HUP");
    let wait_for = |needle: &str| relay.wait_for(needle);

    // A broken config is refused with its file and line, and the relay keeps serving.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{good}\n[limits]\ndownstream = \"fast\"\n"),
    )
    .unwrap();
    hangup();
    let rejected = wait_for("config reload rejected");
    assert!(rejected.contains("limits.downstream"), "{rejected}");
    let url = format!("http://{listen}/v1/bundles/{}", BundleId::of(b"x"));
    assert_eq!(TestClient::default().get(&url).await.status, 404);

    // A good one is applied.
    std::fs::write(
        &config,
        format!("{good}\n[limits]\ndownstream = \"8 Mbit/s\"\n"),
    )
    .unwrap();
    hangup();
    let applied = wait_for("limits in force");
    assert!(
        applied.contains("limits.downstream=8.000 Mbit/s"),
        "{applied}"
    );
    wait_for("config reloaded");
}

#[test]
fn publish_with_manifest_sets_the_patch_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let (a, b) = (content(1000, 44), content(2000, 45));
    std::fs::write(dir.path().join("a.msu"), &a).unwrap();
    std::fs::write(dir.path().join("b.msu"), &b).unwrap();

    let flags = ["--manifest", "--ready-by", "2026-12-08T06:00:00Z"];
    let files = [dir.path().join("a.msu"), dir.path().join("b.msu")];
    let out = publish(&config, &flags, &files);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("manifest version 1: 2 bundles"), "{stdout}");

    let manifest = patchrelay::manifest::load(&dir.path().join("data/cache")).unwrap();
    let ids: Vec<_> = manifest.bundles.iter().map(|e| e.id).collect();
    assert_eq!(ids, [BundleId::of(&a), BundleId::of(&b)]);
    assert_eq!(manifest.bundles[1].size, 2000);
    assert_eq!(
        manifest.bundles[0].ready_by,
        Some("2026-12-08T06:00:00Z".parse().unwrap())
    );
}

#[test]
fn check_validates_a_config_without_starting_and_serve_runs_the_same_checks() {
    let run = |args: &[&str], config: &Path| {
        Command::new(BIN)
            .args(args)
            .arg("-c")
            .arg(config)
            .output()
            .unwrap()
    };

    // The checked-in example passes.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml");
    let out = run(&["check"], &example);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (relay hq-root, site hq"));

    // A token every user can read: refused by check and by serve, with the fix.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[relay]\nid = \"r\"\nsite = \"s\"\nlisten = \"127.0.0.1:0\"\ncache_dir = \"c\"\n\
         [admin]\ntoken_file = \"admin.token\"\n",
    )
    .unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "a-long-enough-admin-token\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    for command in ["check", "serve"] {
        let out = run(&[command], &config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains("admin.token_file"), "{command}: {stderr}");
        assert!(stderr.contains("chmod 600"), "{command}: {stderr}");
        assert!(
            !stderr.contains("a-long-enough-admin-token"),
            "never print a secret"
        );
    }
    write_secret(&token, "a-long-enough-admin-token\n");
    assert_eq!(run(&["check"], &config).status.code(), Some(0));

    // A bad unit names the file, line and key.
    std::fs::write(
        &config,
        "[relay]\nid = \"r\"\nsite = \"s\"\nlisten = \"127.0.0.1:0\"\ncache_dir = \"c\"\n\
         [limits]\ndownstream = \"fast\"\n",
    )
    .unwrap();
    let out = run(&["check"], &config);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:7: limits.downstream:", config.display())),
        "{stderr}"
    );
}

#[test]
fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[relay]\nid = \"r\"\nsite = \"s\"\nlisten = \"127.0.0.1:0\"\ncache_dir = \"c\"\n",
    )
    .unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 20 s");
    assert!(buf[..n].starts_with(b"READY=1"), "{:?}", &buf[..n]);

    let stopped = Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(stopped.success());
    let n = socket.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1");
}
