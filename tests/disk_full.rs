//! A disk that fills up in the middle of a fill. Needs root (it mounts a small tmpfs as
//! the cache dir), so it is ignored by a plain `cargo test`; `.ci/run` runs it with
//! `cargo test --test disk_full -- --ignored`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::future::join_all;
use support::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root");
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a tmpfs; .ci/run runs it"]
async fn a_disk_filling_up_mid_fill_moves_the_fill_to_a_spill_file() {
    let dir = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(&dir.path().join("edge-cache"), "1m");
    let origin =
        MockUpstream::start_paced(Behavior::Normal, 64 * 1024, Duration::from_millis(2)).await;
    let data = content(3_000_000, 77);
    let id = origin.add(&data);
    let relay = start_relay("edge", dir.path(), &[], Some(&origin.origin_template())).await;
    let url = bundle_url(&url_of(&relay), &id);

    let clients = (0..3).map(|_| {
        let url = url.clone();
        async move { TestClient::default().get(&url).await }
    });
    for got in within(60, join_all(clients)).await {
        assert_eq!(got.status, 200);
        assert!(
            got.bytes() == &data[..],
            "every client gets the whole, correct bundle"
        );
    }

    assert!(
        relay.degraded(),
        "a relay whose disk is full reports itself degraded"
    );
    let ranges = origin.ranges();
    assert_eq!(
        ranges.len(),
        2,
        "one transfer, resumed once after the disk filled up"
    );
    assert!(
        ranges[1]
            .as_deref()
            .is_some_and(|r| r.starts_with("bytes=")),
        "{ranges:?}"
    );
    eventually("the fill has ended", || relay.running_fills() == 0).await;
    assert!(!cached(dir.path(), "edge", &id));
    assert_eq!(
        temp_files(dir.path(), "edge"),
        0,
        "the partial cache file is removed"
    );
    relay.shutdown().await;
}
