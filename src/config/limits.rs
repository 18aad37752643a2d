//! `[limits]` and `[[limits.schedule]]`: the bandwidth and request caps, and the time
//! windows that change them.

use std::time::Duration;

use chrono::{DateTime, Datelike, FixedOffset, Local, Timelike, Utc, Weekday};
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx};
use crate::units;

/// Byte-rate caps in bytes per second; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// All bytes sent to agents together.
    pub downstream: Option<u64>,
    /// Bytes sent to any one client address.
    pub per_client: Option<u64>,
    /// All bytes pulled from parents and the origin together (the WAN cap).
    pub upstream: Option<u64>,
}

/// `[limits]`, validated. Every cap absent means unlimited.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LimitsConfig {
    /// Caps outside every schedule window.
    pub caps: Caps,
    /// Requests per client address: (count, period).
    pub requests_per_client: Option<(u32, Duration)>,
    /// Concurrent downloads in all.
    pub max_downloads: Option<u32>,
    /// Concurrent downloads per client address.
    pub max_downloads_per_client: Option<u32>,
    /// Burst allowance of the byte caps in bytes; `None` picks 50 ms of the cap (at least
    /// 64 KiB).
    pub burst: Option<u64>,
    /// The time zone schedule windows are written in.
    pub timezone: TimeZone,
    /// Windows that override caps; the first that contains the current time applies.
    pub schedule: Vec<Window>,
}

/// Where schedule times are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeZone {
    #[default]
    Utc,
    /// The machine's local time zone (daylight saving included).
    Local,
    Fixed(FixedOffset),
}

/// One `[[limits.schedule]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Bit n set = the window starts on weekday n (Monday = 0).
    pub days: u8,
    /// Start, minutes after midnight.
    pub from: u16,
    /// End, minutes after midnight (exclusive, 1440 = midnight at the end of the day);
    /// earlier than `from` = ends the next day.
    pub to: u16,
    /// Caps this window sets: `None` = keep the base cap, `Some(None)` = unlimited.
    pub downstream: Option<Option<u64>>,
    pub per_client: Option<Option<u64>>,
    pub upstream: Option<Option<u64>>,
}

impl LimitsConfig {
    /// The caps in force at `now`.
    pub fn caps_at(&self, now: DateTime<Utc>) -> Caps {
        let (weekday, minute) = self.timezone.local_parts(now);
        let mut caps = self.caps;
        if let Some(window) = self.schedule.iter().find(|w| w.contains(weekday, minute)) {
            caps.downstream = window.downstream.unwrap_or(caps.downstream);
            caps.per_client = window.per_client.unwrap_or(caps.per_client);
            caps.upstream = window.upstream.unwrap_or(caps.upstream);
        }
        caps
    }
}

impl TimeZone {
    /// Day of week (Monday = 0) and minute of day of `now` in this zone.
    fn local_parts(&self, now: DateTime<Utc>) -> (u8, u16) {
        let parts = |day: Weekday, hour: u32, minute: u32| {
            (
                day.num_days_from_monday() as u8,
                (hour * 60 + minute) as u16,
            )
        };
        match self {
            Self::Utc => parts(now.weekday(), now.hour(), now.minute()),
            Self::Local => {
                let t = now.with_timezone(&Local);
                parts(t.weekday(), t.hour(), t.minute())
            }
            Self::Fixed(offset) => {
                let t = now.with_timezone(offset);
                parts(t.weekday(), t.hour(), t.minute())
            }
        }
    }
}

impl Window {
    /// Whether `now`, read in `timezone`, falls in this window.
    pub fn contains_time(&self, timezone: TimeZone, now: DateTime<Utc>) -> bool {
        let (weekday, minute) = timezone.local_parts(now);
        self.contains(weekday, minute)
    }

    fn contains(&self, weekday: u8, minute: u16) -> bool {
        let starts_on = |day: u8| self.days & (1 << day) != 0;
        if self.from < self.to {
            return starts_on(weekday) && (self.from..self.to).contains(&minute);
        }
        // Crosses midnight: the evening part on its own day, the morning part the next.
        let yesterday = (weekday + 6) % 7;
        (starts_on(weekday) && minute >= self.from) || (starts_on(yesterday) && minute < self.to)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    downstream: Option<Spanned<String>>,
    per_client: Option<Spanned<String>>,
    requests_per_client: Option<Spanned<String>>,
    max_downloads: Option<Spanned<i64>>,
    max_downloads_per_client: Option<Spanned<i64>>,
    upstream: Option<Spanned<String>>,
    burst: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    schedule: Vec<RawWindow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Spanned<Vec<String>>,
    from: Spanned<String>,
    to: Spanned<String>,
    downstream: Option<Spanned<String>>,
    per_client: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
}

impl Ctx<'_> {
    pub(super) fn limits(&self, raw: RawLimits) -> Result<LimitsConfig, ConfigError> {
        let rate =
            |key: &str, value: &Option<Spanned<String>>| -> Result<Option<u64>, ConfigError> {
                match value {
                    None => Ok(None),
                    Some(v) => units::parse_rate(v.get_ref()).map_err(|m| self.invalid(key, v, m)),
                }
            };
        let caps = Caps {
            downstream: rate("limits.downstream", &raw.downstream)?,
            per_client: rate("limits.per_client", &raw.per_client)?,
            upstream: rate("limits.upstream", &raw.upstream)?,
        };

        let requests_per_client = match &raw.requests_per_client {
            None => None,
            Some(v) => Some(
                units::parse_request_rate(v.get_ref())
                    .map_err(|m| self.invalid("limits.requests_per_client", v, m))?,
            ),
        };
        let max_downloads = self.count("limits.max_downloads", &raw.max_downloads)?;
        let max_downloads_per_client = self.count(
            "limits.max_downloads_per_client",
            &raw.max_downloads_per_client,
        )?;
        let burst = match &raw.burst {
            None => None,
            Some(v) => {
                let bytes = units::parse_size(v.get_ref())
                    .map_err(|m| self.invalid("limits.burst", v, m))?;
                if !(4096..=1 << 30).contains(&bytes) {
                    let msg = "must be between 4 KiB and 1 GiB".to_string();
                    return Err(self.invalid("limits.burst", v, msg));
                }
                Some(bytes)
            }
        };
        let timezone = match &raw.timezone {
            None => TimeZone::Utc,
            Some(v) => self.timezone(v)?,
        };

        let mut schedule = Vec::with_capacity(raw.schedule.len());
        for window in &raw.schedule {
            schedule.push(self.window(window)?);
        }
        Ok(LimitsConfig {
            caps,
            requests_per_client,
            max_downloads,
            max_downloads_per_client,
            burst,
            timezone,
            schedule,
        })
    }

    fn count(&self, key: &str, value: &Option<Spanned<i64>>) -> Result<Option<u32>, ConfigError> {
        let Some(v) = value else { return Ok(None) };
        match u32::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(self.invalid(key, v, format!("{} must be a positive count", v.get_ref()))),
        }
    }

    fn timezone(&self, value: &Spanned<String>) -> Result<TimeZone, ConfigError> {
        let text = value.get_ref().trim();
        if text.eq_ignore_ascii_case("utc") {
            return Ok(TimeZone::Utc);
        }
        if text.eq_ignore_ascii_case("local") {
            return Ok(TimeZone::Local);
        }
        text.parse::<FixedOffset>()
            .map(TimeZone::Fixed)
            .map_err(|_| {
                let msg =
                    format!("{text:?} is not \"UTC\", \"local\" or an offset like \"+02:00\"");
                self.invalid("limits.timezone", value, msg)
            })
    }

    fn window(&self, raw: &RawWindow) -> Result<Window, ConfigError> {
        let times = (&raw.days, &raw.from, &raw.to);
        let Window { days, from, to, .. } = self.window_times("limits.schedule", times)?;
        let rate = |key: &str, value: &Option<Spanned<String>>| match value {
            None => Ok(None),
            Some(v) => units::parse_rate(v.get_ref())
                .map(Some)
                .map_err(|m| self.invalid(key, v, m)),
        };
        Ok(Window {
            days,
            from,
            to,
            downstream: rate("limits.schedule.downstream", &raw.downstream)?,
            per_client: rate("limits.schedule.per_client", &raw.per_client)?,
            upstream: rate("limits.schedule.upstream", &raw.upstream)?,
        })
    }

    /// Days and times of a window (`{prefix}.days`, `.from`, `.to`), without caps.
    pub(super) fn window_times(
        &self,
        prefix: &str,
        (raw_days, raw_from, raw_to): (&Spanned<Vec<String>>, &Spanned<String>, &Spanned<String>),
    ) -> Result<Window, ConfigError> {
        let key = |name: &str| format!("{prefix}.{name}");
        let mut days = 0u8;
        for name in raw_days.get_ref() {
            days |= day_bits(name).ok_or_else(|| {
                let msg = format!(
                    "{name:?} is not a day; use mon..sun, \"weekdays\", \"weekend\" or \"daily\""
                );
                self.invalid(&key("days"), raw_days, msg)
            })?;
        }
        if days == 0 {
            let msg = "must list at least one day".to_string();
            return Err(self.invalid(&key("days"), raw_days, msg));
        }

        let from = self.time_of_day(&key("from"), raw_from)?;
        let to = self.time_of_day(&key("to"), raw_to)?;
        if from == 24 * 60 {
            let msg = "a window must start before 24:00".to_string();
            return Err(self.invalid(&key("from"), raw_from, msg));
        }
        if from == to {
            let msg = "a window must not start and end at the same time".to_string();
            return Err(self.invalid(&key("to"), raw_to, msg));
        }
        Ok(Window {
            days,
            from,
            to,
            downstream: None,
            per_client: None,
            upstream: None,
        })
    }

    fn time_of_day(&self, key: &str, value: &Spanned<String>) -> Result<u16, ConfigError> {
        let text = value.get_ref().trim();
        let parsed = text.split_once(':').and_then(|(h, m)| {
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        });
        parsed.ok_or_else(|| {
            self.invalid(key, value, format!("{text:?} is not a time like \"08:30\""))
        })
    }
}

fn day_bits(name: &str) -> Option<u8> {
    Some(match name.trim().to_ascii_lowercase().as_str() {
        "mon" | "monday" => 1,
        "tue" | "tuesday" => 1 << 1,
        "wed" | "wednesday" => 1 << 2,
        "thu" | "thursday" => 1 << 3,
        "fri" | "friday" => 1 << 4,
        "sat" | "saturday" => 1 << 5,
        "sun" | "sunday" => 1 << 6,
        "weekdays" => 0b001_1111,
        "weekend" | "weekends" => 0b110_0000,
        "daily" | "all" => 0b111_1111,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chrono::TimeZone as _;

    use super::*;
    use crate::config::Config;

    const BASE: &str =
        "[relay]\nid = \"r\"\nsite = \"s\"\nlisten = \"127.0.0.1:0\"\ncache_dir = \"c\"\n";

    fn parse(limits: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}{limits}"), "relay.toml", Path::new("."))
    }

    fn limits(text: &str) -> LimitsConfig {
        parse(text).expect("valid limits").limits
    }

    fn error(text: &str) -> String {
        parse(text)
            .expect_err("limits should be rejected")
            .to_string()
    }

    const BRANCH: &str = r#"
[limits]
downstream = "20 Mbit/s"
per_client = "5 Mbit/s"
requests_per_client = "60/min"
max_downloads = 50
max_downloads_per_client = 2
upstream = "10 Mbit/s"
burst = "256 KiB"
timezone = "+02:00"

[[limits.schedule]]
days = ["weekdays"]
from = "08:00"
to = "18:00"
downstream = "4 Mbit/s"
upstream = "2 Mbit/s"

[[limits.schedule]]
days = ["sat", "sun"]
from = "00:00"
to = "24:00"
downstream = "unlimited"
"#;

    #[test]
    fn parses_every_key() {
        let l = limits(BRANCH);
        assert_eq!(l.caps.downstream, Some(2_500_000));
        assert_eq!(l.caps.per_client, Some(625_000));
        assert_eq!(l.caps.upstream, Some(1_250_000));
        assert_eq!(l.requests_per_client, Some((60, Duration::from_secs(60))));
        assert_eq!(
            (l.max_downloads, l.max_downloads_per_client),
            (Some(50), Some(2))
        );
        assert_eq!(l.burst, Some(256 * 1024));
        assert_eq!(
            l.timezone,
            TimeZone::Fixed(FixedOffset::east_opt(7200).unwrap())
        );
        assert_eq!(l.schedule.len(), 2);
        assert_eq!(l.schedule[1].downstream, Some(None));
    }

    #[test]
    fn absent_limits_are_unlimited() {
        let l = limits("");
        assert_eq!(l, LimitsConfig::default());
        assert_eq!(l.caps_at(Utc::now()), Caps::default());
    }

    #[test]
    fn schedule_windows_follow_the_time_zone() {
        let l = limits(BRANCH);
        // 2026-12-07 is a Monday. 06:30 UTC is 08:30 at +02:00: business hours.
        let monday = |h, m| Utc.with_ymd_and_hms(2026, 12, 7, h, m, 0).unwrap();
        let business = l.caps_at(monday(6, 30));
        assert_eq!(business.downstream, Some(500_000));
        assert_eq!(business.upstream, Some(250_000));
        assert_eq!(
            business.per_client,
            Some(625_000),
            "unset keys keep the base cap"
        );
        assert_eq!(l.caps_at(monday(5, 59)).downstream, Some(2_500_000));
        assert_eq!(
            l.caps_at(monday(16, 0)).downstream,
            Some(2_500_000),
            "18:00 is the end"
        );
        // Saturday noon: unlimited downstream.
        let saturday = Utc.with_ymd_and_hms(2026, 12, 12, 10, 0, 0).unwrap();
        assert_eq!(l.caps_at(saturday).downstream, None);
    }

    #[test]
    fn windows_may_cross_midnight() {
        let l = limits(
            "[limits]\ndownstream = \"1 MB/s\"\n[[limits.schedule]]\ndays = [\"fri\"]\n\
             from = \"22:00\"\nto = \"06:00\"\ndownstream = \"unlimited\"\n",
        );
        let at = |d, h| Utc.with_ymd_and_hms(2026, 12, d, h, 0, 0).unwrap();
        assert_eq!(l.caps_at(at(11, 23)).downstream, None, "Friday 23:00");
        assert_eq!(l.caps_at(at(12, 5)).downstream, None, "Saturday 05:00");
        assert_eq!(
            l.caps_at(at(12, 6)).downstream,
            Some(1_000_000),
            "Saturday 06:00"
        );
        assert_eq!(
            l.caps_at(at(10, 23)).downstream,
            Some(1_000_000),
            "Thursday 23:00"
        );
    }

    #[test]
    fn errors_name_key_and_line() {
        let err = error("[limits]\ndownstream = \"fast\"\n");
        assert!(err.starts_with("relay.toml:7: limits.downstream:"), "{err}");
        let err = error("[limits]\nmax_downloads = 0\n");
        assert!(
            err.starts_with("relay.toml:7: limits.max_downloads:"),
            "{err}"
        );
        let err = error("[limits]\ntimezone = \"Mars/Olympus\"\n");
        assert!(err.contains("limits.timezone"), "{err}");
        let err = error("[limits]\nburst = \"1 KiB\"\n");
        assert!(err.contains("limits.burst: must be between"), "{err}");
        let err = error("[limits]\nrequests_per_client = \"lots\"\n");
        assert!(err.contains("limits.requests_per_client"), "{err}");
        let err = error("[limits]\ndownstrem = \"1 MB/s\"\n");
        assert!(err.contains("downstrem"), "{err}");
    }

    #[test]
    fn bad_windows_are_rejected() {
        let window = |body: &str| error(&format!("[limits]\n[[limits.schedule]]\n{body}"));
        let err = window("days = [\"someday\"]\nfrom = \"08:00\"\nto = \"09:00\"\n");
        assert!(
            err.contains("limits.schedule.days") && err.contains("someday"),
            "{err}"
        );
        let err = window("days = [\"mon\"]\nfrom = \"8am\"\nto = \"09:00\"\n");
        assert!(
            err.starts_with("relay.toml:9: limits.schedule.from:"),
            "{err}"
        );
        let err = window("days = [\"mon\"]\nfrom = \"09:00\"\nto = \"09:00\"\n");
        assert!(err.contains("limits.schedule.to"), "{err}");
        let err = window("days = []\nfrom = \"08:00\"\nto = \"09:00\"\n");
        assert!(err.contains("at least one day"), "{err}");
    }
}
