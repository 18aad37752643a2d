//! Checks of a parsed relay config against the machine: what `patchrelay check` reports
//! and `serve` refuses to start with. Parsing already caught unknown keys, bad units and a
//! parent at the relay's own listen address; this adds what needs the file system: secret
//! files readable and not world-readable, a cache directory that can be written, and a
//! parent at the relay's own advertised URL.

use std::path::Path;

use super::{Config, ConfigError};

/// Every problem found, in file order as far as it can tell; empty when the config can run.
pub fn preflight(config: &Config) -> Vec<ConfigError> {
    let mut problems = Vec::new();
    let file = config
        .source
        .as_ref()
        .map_or_else(|| "config".to_string(), |p| p.display().to_string());
    let text = config
        .source
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        path: file.clone(),
        line: line_of_key(&text, key),
        key: key.to_string(),
        message,
    };

    if let Err(why) = writable_dir(&config.relay.cache_dir) {
        problems.push(invalid("relay.cache_dir", why));
    }
    if let Some(url) = &config.relay.advertise_url {
        let own = url.as_str().trim_end_matches('/');
        if config
            .upstream
            .parents
            .iter()
            .any(|p| p.as_str().trim_end_matches('/') == own)
        {
            let msg = format!("{own} is this relay's own advertise_url");
            problems.push(invalid("upstream.parents", msg));
        }
    }
    if let Err(e) = config.admin.read_token() {
        problems.push(e);
    }
    if let Err(e) = config.beacon.read_key() {
        problems.push(e);
    }
    if let Some(files) = &config.relay.tls {
        if let Err(e) = crate::tls::server_config(files) {
            problems.push(invalid("relay.tls_cert", e.to_string()));
        }
    }
    if let Some(files) = &config.upstream.tls {
        if let Err(e) = crate::tls::client_config(files) {
            problems.push(invalid("upstream.ca_file", e.to_string()));
        }
    }
    problems
}

/// The line of `section.key` in `text` (1 when it cannot be found).
fn line_of_key(text: &str, key: &str) -> usize {
    let (section, name) = key.split_once('.').unwrap_or(("", key));
    let mut in_section = section.is_empty();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line.trim_matches(['[', ']']).trim() == section;
            continue;
        }
        let is_key = line
            .strip_prefix(name)
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        if in_section && is_key {
            return i + 1;
        }
    }
    1
}

/// Whether the relay can create files in `dir` (or create `dir` in its nearest existing
/// ancestor). Tries it: permission bits do not tell for root, ACLs or read-only mounts.
fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    tempfile::tempfile_in(existing)
        .map(drop)
        .map_err(|e| format!("cannot write in {}: {e}", existing.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_in_their_section() {
        let text = "[relay]\nid = \"a\"\ncache_dir = \"c\"\n[upstream]\nparents = []\n";
        assert_eq!(line_of_key(text, "relay.cache_dir"), 3);
        assert_eq!(line_of_key(text, "upstream.parents"), 5);
        assert_eq!(line_of_key(text, "admin.token_file"), 1);
    }

    #[test]
    fn an_unwritable_cache_dir_and_a_parent_at_our_own_url_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.toml");
        // A plain file where the cache dir's parent should be.
        std::fs::write(dir.path().join("blocker"), "x").unwrap();
        let text = "[relay]\nid = \"a\"\nsite = \"s\"\nlisten = \"127.0.0.1:7420\"\n\
            cache_dir = \"blocker/cache\"\nadvertise_url = \"http://10.0.0.9:7420\"\n\
            [upstream]\nparents = [\"http://10.0.0.9:7420/\"]\n";
        std::fs::write(&file, text).unwrap();
        let config = Config::load(&file).unwrap();
        let problems: Vec<String> = preflight(&config).iter().map(|e| e.to_string()).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("r.toml:5: relay.cache_dir:"),
            "{problems:?}"
        );
        assert!(problems[0].contains("not a directory"), "{problems:?}");
        assert!(
            problems[1].contains("r.toml:8: upstream.parents:"),
            "{problems:?}"
        );
    }
}
