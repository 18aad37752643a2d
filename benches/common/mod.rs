//! Shared by the benchmarks: relay processes on loopback and facts about the machine.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_patchrelay");

/// A relay process, stopped when dropped.
pub struct RelayProcess {
    pub name: &'static str,
    pub child: Child,
    pub addr: String,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RelayProcess {
    /// Starts `patchrelay serve` with a config under `dir`; `extra` is appended to it.
    pub fn start(name: &'static str, dir: &Path, parent: Option<&str>, extra: &str) -> Self {
        let parents = parent
            .map(|p| format!("\"http://{p}\""))
            .unwrap_or_default();
        let config = dir.join(format!("{name}.toml"));
        let text = format!(
            "[relay]\nid = \"{name}\"\nsite = \"bench\"\nlisten = \"127.0.0.1:0\"\n\
             cache_dir = \"{name}-cache\"\n\n[upstream]\nparents = [{parents}]\n\
             stall_timeout = \"60s\"\n{extra}\n\
             # Every benchmark client comes from 127.0.0.1.\n\
             [server]\nmax_connections = 100000\nmax_connections_per_client = 100000\n"
        );
        std::fs::write(&config, text).expect("write config");
        let mut child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&config)
            .env("RUST_LOG", "warn,patchrelay=info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start relay");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let start = lines
            .next()
            .expect("a start line")
            .expect("readable stderr");
        let addr = start
            .split_whitespace()
            .find_map(|f| f.strip_prefix("listen="))
            .unwrap_or_else(|| panic!("no listen address in {start:?}"))
            .to_string();
        // Keep draining the log so the relay never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { name, child, addr }
    }

    /// A memory figure of /proc/PID/status in KiB, e.g. "VmHWM:" (peak resident).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    }
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}
