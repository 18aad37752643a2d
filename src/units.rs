//! Human units in the config: byte rates ("40 Mbit/s", "5 MB/s"), sizes ("512 MiB") and
//! request rates ("60/min").
//!
//! Network people write link speeds in bits and decimal prefixes, storage people write
//! sizes in bytes and binary prefixes; both are accepted as written, and every error lists
//! what is.

use std::time::Duration;

/// Bytes per second, parsed from "40 Mbit/s", "5 MB/s", "512 KiB/s", or "unlimited" (None).
pub fn parse_rate(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let Some(amount) = text.strip_suffix("/s") else {
        return Err(format!(
            "{text:?} is not a rate like \"40 Mbit/s\" or \"5 MB/s\""
        ));
    };
    let (number, unit) = split_number(amount)
        .ok_or_else(|| format!("{text:?} is not a rate like \"40 Mbit/s\" or \"5 MB/s\""))?;
    let bytes_per_unit = match unit.to_ascii_lowercase().as_str() {
        "bit" => 1.0 / 8.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        _ => size_unit(unit).ok_or_else(|| {
            format!(
                "{text:?}: unknown unit {unit:?}; use bit, kbit, Mbit, Gbit, B, kB, MB, GB, \
                 KiB, MiB or GiB per second"
            )
        })? as f64,
    };
    let rate = (number * bytes_per_unit).round();
    if !(1.0..=1e15).contains(&rate) {
        return Err(format!("{text:?} must be between 1 B/s and 1 PB/s"));
    }
    Ok(Some(rate as u64))
}

/// Bytes, parsed from "512 MiB", "1 GB", "64 KiB" or a bare number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) =
        split_number(text).ok_or_else(|| format!("{text:?} is not a size like \"512 MiB\""))?;
    let unit = if unit.is_empty() { "B" } else { unit };
    let multiplier = size_unit(unit).ok_or_else(|| {
        format!("{text:?}: unknown unit {unit:?}; use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB")
    })?;
    let bytes = (number * multiplier as f64).round();
    if !(0.0..=1.8e19).contains(&bytes) {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// A request rate "N/s", "N/min" or "N/h", as (N, period).
pub fn parse_request_rate(text: &str) -> Result<(u32, Duration), String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a request rate like \"60/min\", \"5/s\" or \"1000/h\"");
    let (count, per) = text.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let period = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(format!("{text:?} must allow at least one request"));
    }
    Ok((count, period))
}

fn size_unit(unit: &str) -> Option<u64> {
    Some(match unit {
        "B" | "b" => 1,
        "kB" | "KB" | "k" | "K" => 1000,
        "MB" | "M" => 1000 * 1000,
        "GB" | "G" => 1000 * 1000 * 1000,
        "TB" | "T" => 1000 * 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    })
}

/// Splits "12.5 MiB" into (12.5, "MiB").
fn split_number(text: &str) -> Option<(f64, &str)> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let number: f64 = text[..end].parse().ok()?;
    Some((number, text[end..].trim()))
}

/// Formats a byte rate for logs and messages, in Mbit/s.
pub fn format_rate(bytes_per_second: Option<u64>) -> String {
    match bytes_per_second {
        None => "unlimited".into(),
        Some(rate) => format!("{:.3} Mbit/s", rate as f64 * 8.0 / 1e6),
    }
}

/// Formats a byte count for messages: whole KiB, MiB or GiB when it is one, else bytes.
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes % size == 0 {
            return format!("{} {unit}", bytes / size);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_format_in_the_largest_whole_unit() {
        assert_eq!(format_size(4 << 20), "4 MiB");
        assert_eq!(format_size(1536), "1536 bytes");
        assert_eq!(format_size(64 << 10), "64 KiB");
        assert_eq!(format_size(0), "0 bytes");
    }

    #[test]
    fn rates_in_bits_and_bytes() {
        assert_eq!(parse_rate("40 Mbit/s"), Ok(Some(5_000_000)));
        assert_eq!(parse_rate("1 Gbit/s"), Ok(Some(125_000_000)));
        assert_eq!(parse_rate("1 mbit/s"), Ok(Some(125_000)));
        assert_eq!(parse_rate("5 MB/s"), Ok(Some(5_000_000)));
        assert_eq!(parse_rate("2 MiB/s"), Ok(Some(2 << 20)));
        assert_eq!(parse_rate("1.5 MB/s"), Ok(Some(1_500_000)));
        assert_eq!(parse_rate("800 kbit/s"), Ok(Some(100_000)));
        assert_eq!(parse_rate("unlimited"), Ok(None));
    }

    #[test]
    fn bad_rates_say_why() {
        assert!(parse_rate("40 Mbit").unwrap_err().contains("not a rate"));
        assert!(parse_rate("40 furlongs/s")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_rate("fast/s").is_err());
        assert!(parse_rate("0 MB/s").unwrap_err().contains("between"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1 GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
    }

    #[test]
    fn request_rates() {
        assert_eq!(
            parse_request_rate("60/min"),
            Ok((60, Duration::from_secs(60)))
        );
        assert_eq!(parse_request_rate("5/s"), Ok((5, Duration::from_secs(1))));
        assert_eq!(
            parse_request_rate("1000/h"),
            Ok((1000, Duration::from_secs(3600)))
        );
        assert!(parse_request_rate("0/s").is_err());
        assert!(parse_request_rate("60 per minute").is_err());
        assert!(parse_request_rate("60/fortnight").is_err());
    }
}
