//! The relay and monitor config loaders: never panic, and errors carry a line number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchrelay::config::{Config, ConfigError};
use patchrelay::monitor::MonitorConfig;

fn check_line(error: &ConfigError, text: &str) {
    match error {
        ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => {
            assert!(
                *line >= 1 && *line <= text.lines().count().max(1) + 1,
                "{error}"
            );
        }
        ConfigError::Read { .. } => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = std::path::Path::new("/nonexistent");
    if let Err(e) = Config::parse(text, "fuzz.toml", base) {
        check_line(&e, text);
    }
    if let Err(e) = MonitorConfig::parse(text, "fuzz.toml", base) {
        check_line(&e, text);
    }
});
