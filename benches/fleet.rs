//! The fleet simulation: a tree of real relays (1 root, 10 regional, 100 branch by default)
//! and 10,000 simulated agents in one process, plus the monitor, with relay faults of
//! known ground truth. Prints the bytes each tier pulled against one copy per relay, the
//! time to 75/90/100% installed per deployment, the monitor's attribution against the
//! ground truth (a confusion matrix), and the process's peak memory and CPU time.
//!
//! Run: `cargo bench --bench fleet`
//! Knobs: PATCHRELAY_FLEET_REGIONS, _BRANCHES, _AGENTS, _BUNDLES, _BUNDLE_KIB, _WINDOW_S
//! (deadline after creation, seconds), _AGENT_FAILURE (share, e.g. 0.02), _SEED.

#[path = "fleet/sim.rs"]
mod sim;

fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(format!("PATCHRELAY_FLEET_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either.
    let full = sim::FleetConfig::full();
    let config = sim::FleetConfig {
        regions: knob("REGIONS", full.regions),
        branches: knob("BRANCHES", full.branches),
        agents: knob("AGENTS", full.agents),
        bundles: knob("BUNDLES", full.bundles),
        bundle_size: knob("BUNDLE_KIB", full.bundle_size / 1024) * 1024,
        window: std::time::Duration::from_secs(knob("WINDOW_S", full.window.as_secs())),
        agent_failure_share: knob("AGENT_FAILURE", full.agent_failure_share),
        seed: knob("SEED", full.seed),
        ..full
    };
    assert!(
        config.regions >= 2 && config.branches >= 2 * config.regions,
        "need at least 2 regions and 2 branches per region"
    );
    let dir = tempfile::tempdir().expect("scratch directory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "machine: {} cores, {}; date {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown cpu".into()),
        chrono::Utc::now().format("%Y-%m-%d")
    );
    let result = runtime.block_on(sim::run(&config, dir.path()));
    print!("{}", result.render());
}
