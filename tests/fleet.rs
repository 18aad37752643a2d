//! A small fleet (1 root, 3 regional, 9 branch relays, 500 agents) with relay faults and
//! failing agents: the monitor's attribution matches the ground truth, and every healthy
//! relay pulled one copy of each bundle. The full run is `cargo bench --bench fleet`.

#[path = "../benches/fleet/sim.rs"]
mod sim;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_is_attributed_right_and_pulls_one_copy_per_relay() {
    let dir = tempfile::tempdir().unwrap();
    let config = sim::FleetConfig::small();
    let result = sim::run(&config, dir.path()).await;
    let table = result.render();
    println!("{table}");

    let one_copy = (config.bundle_size * config.bundles) as u64;
    assert_eq!(
        result.origin_bytes, one_copy,
        "the origin sent one copy: {table}"
    );
    assert!(
        result.copy_violations.is_empty(),
        "{:?}\n{table}",
        result.copy_violations
    );
    assert_eq!(result.relay_called_agent, 0, "{table}");
    assert!(result.accuracy() >= 0.99, "{table}");
    // Every kind of failure was there to be judged, and each kind is judged right on its
    // own (the many easy policy verdicts must not hide a weak class).
    for class in ["relay", "agent", "policy"] {
        let of_class = |predicted: Option<&str>| -> usize {
            result
                .confusion
                .iter()
                .filter(|((truth, said), _)| truth == class && predicted.is_none_or(|p| p == said))
                .map(|(_, n)| n)
                .sum()
        };
        let (judged, right) = (of_class(None), of_class(Some(class)));
        assert!(judged > 0, "no {class} failures in the run: {table}");
        assert!(
            right as f64 >= 0.99 * judged as f64,
            "{right} of {judged} {class} failures judged {class}: {table}"
        );
    }
    // Where nothing was broken on purpose, the fleet patched completely.
    for d in result.deployments.iter().filter(|d| d.installable > 0) {
        assert!(
            d.of_installable[2].is_some(),
            "{} never reached 100% of installable: {table}",
            d.id
        );
    }
    assert!(result.reports_posted > 0);
}
