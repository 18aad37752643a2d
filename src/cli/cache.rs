//! `patchrelay cache ls | pin ID | unpin ID | purge ID | verify`: the admin API from the
//! command line, or with `--offline` directly on a stopped relay's cache directory.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use clap::Subcommand;
use http::Method;

use crate::admin::{self, CacheListing, Verified};
use crate::bundle::BundleId;
use crate::cache::{Cache, CacheBounds};
use crate::config::Config;

#[derive(Debug, Clone, Subcommand)]
pub enum CacheCommand {
    /// List the cached bundles, most recently used first.
    Ls,
    /// Pin a bundle: never evict it.
    Pin { id: BundleId },
    /// Remove an admin pin.
    Unpin { id: BundleId },
    /// Remove a bundle from the cache (it must not be pinned).
    Purge { id: BundleId },
    /// Re-hash every cached bundle; exits 1 if any does not match its id.
    Verify,
}

/// Runs a cache command; `offline` works on the cache directory instead of the API.
pub fn run(config: &Config, command: CacheCommand, offline: bool, json: bool) -> ExitCode {
    let result = if offline {
        offline_call(config, &command)
    } else {
        online_call(config, &command)
    };
    match result {
        Ok(output) => print(&command, output, json),
        Err(message) => {
            eprintln!("patchrelay: {message}");
            ExitCode::FAILURE
        }
    }
}

/// What a command produced, whichever way it ran.
enum Output {
    Listing(CacheListing),
    Verified(Vec<Verified>),
    Done(serde_json::Value),
}

fn offline_call(config: &Config, command: &CacheCommand) -> Result<Output, String> {
    let bounds = CacheBounds {
        max: config.relay.cache_max,
        pins: config.relay.pins.clone(),
    };
    let (cache, _) =
        Cache::open_for_serving(&config.relay.cache_dir, bounds).map_err(|e| e.to_string())?;
    let manifest = crate::manifest::load(&config.relay.cache_dir).map_err(|e| e.to_string())?;
    cache.pin_manifest(&manifest);
    let done = |id: &BundleId, what: &str, value: bool| {
        Output::Done(serde_json::json!({ "id": id.to_string(), what: value }))
    };
    match command {
        CacheCommand::Ls => Ok(Output::Listing(admin::listing(&cache))),
        CacheCommand::Pin { id } => {
            cache.pin(id).map_err(|e| e.to_string())?;
            Ok(done(id, "pinned", true))
        }
        CacheCommand::Unpin { id } => {
            admin::unpin(&cache, id).map_err(|e| e.to_string())?;
            Ok(done(id, "pinned", false))
        }
        CacheCommand::Purge { id } => {
            admin::purge(&cache, id).map_err(|e| e.to_string())?;
            Ok(done(id, "purged", true))
        }
        CacheCommand::Verify => Ok(Output::Verified(
            admin::verify_all(&cache).map_err(|e| e.to_string())?,
        )),
    }
}

fn online_call(config: &Config, command: &CacheCommand) -> Result<Output, String> {
    let token = config
        .admin
        .read_token()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            "the admin API is off (no [admin] token_file); use --offline on a stopped relay"
                .to_string()
        })?;
    let (method, path) = match command {
        CacheCommand::Ls => (Method::GET, "cache".to_string()),
        CacheCommand::Pin { id } => (Method::PUT, format!("pins/{id}")),
        CacheCommand::Unpin { id } => (Method::DELETE, format!("pins/{id}")),
        CacheCommand::Purge { id } => (Method::DELETE, format!("cache/{id}")),
        CacheCommand::Verify => (Method::POST, "verify".to_string()),
    };
    let url = format!("{}/v1/admin/{path}", relay_url(config));
    let body = super::http::Call {
        method,
        url: &url,
        token: Some(&token),
        body: Vec::new(),
        tls: config.upstream.tls.as_ref(),
        what: "relay",
    }
    .send()?;
    let parse = |e: serde_json::Error| format!("{url}: unexpected answer: {e}");
    Ok(match command {
        CacheCommand::Ls => Output::Listing(serde_json::from_slice(&body).map_err(parse)?),
        CacheCommand::Verify => Output::Verified(serde_json::from_slice(&body).map_err(parse)?),
        _ => Output::Done(serde_json::from_slice(&body).map_err(parse)?),
    })
}

/// The base URL of the relay `config` describes, from this machine: its advertised URL
/// when it serves HTTPS (its certificate names that host), else its listen address.
fn relay_url(config: &Config) -> String {
    match (&config.relay.tls, &config.relay.advertise_url) {
        (Some(_), Some(url)) => url.as_str().to_string(),
        (Some(_), None) => format!("https://{}", reachable(config.relay.listen)),
        (None, _) => format!("http://{}", reachable(config.relay.listen)),
    }
}

/// The address to reach a relay listening on `listen` from this machine.
pub(super) fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

fn print(command: &CacheCommand, output: Output, json: bool) -> ExitCode {
    let failed = matches!(&output, Output::Verified(v) if v.iter().any(|r| !r.ok));
    if json {
        let value = match &output {
            Output::Listing(listing) => serde_json::to_value(listing),
            Output::Verified(results) => serde_json::to_value(results),
            Output::Done(value) => Ok(value.clone()),
        };
        println!("{}", value.unwrap_or_default());
    } else {
        match output {
            Output::Listing(listing) => print_listing(&listing),
            Output::Verified(results) => {
                for r in &results {
                    println!("{}  {}", r.id, if r.ok { "ok" } else { "CORRUPT" });
                }
                let bad = results.iter().filter(|r| !r.ok).count();
                println!("{} bundles checked, {bad} corrupt", results.len());
            }
            Output::Done(_) => match command {
                CacheCommand::Pin { id } => println!("pinned {id}"),
                CacheCommand::Unpin { id } => println!("unpinned {id}"),
                CacheCommand::Purge { id } => println!("purged {id}"),
                _ => {}
            },
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_listing(listing: &CacheListing) {
    let header = ("ID", "SIZE", "LAST ACCESS", "PINNED", "MANIFEST");
    println!(
        "{:<64}  {:>10}  {:<20}  {:<6}  {}",
        header.0, header.1, header.2, header.3, header.4
    );
    for b in &listing.bundles {
        let yes = |flag: bool| if flag { "yes" } else { "" };
        let (size, pinned, manifest) = (human(b.size), yes(b.pinned), yes(b.in_manifest));
        println!(
            "{:<64}  {size:>10}  {:<20}  {pinned:<6}  {manifest}",
            b.id, b.last_access
        );
    }
    let max = listing
        .cache_max
        .map_or_else(|| "no bound".to_string(), human);
    println!(
        "{} bundles, {} of {max}",
        listing.bundles.len(),
        human(listing.used_bytes)
    );
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
