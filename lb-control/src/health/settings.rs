//! The `[health]` section of the configuration: how often nodes are checked, how long a check
//! may take and when a node counts as behind or stalled.

use std::time::Duration;

use serde::Deserialize;

use crate::section::{Problem, parse_duration};

/// `[health]` in the config file; every field has a default, durations are written as
/// `"1s"`, `"250ms"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Time between the starts of two checks of one node.
    #[serde(deserialize_with = "parse_duration")]
    pub interval: Duration,
    /// Time between checks while a node is changing state (a failure while healthy, a success
    /// while unhealthy), so a dead node is out after about `interval + (fall - 1) * fast_interval`.
    #[serde(deserialize_with = "parse_duration")]
    pub fast_interval: Duration,
    /// Limit for a whole check, connect included; a node that takes longer fails it.
    #[serde(deserialize_with = "parse_duration")]
    pub timeout: Duration,
    /// Consecutive good checks that bring an unhealthy node back.
    pub rise: u32,
    /// Consecutive failed checks that take a healthy node out.
    pub fall: u32,
    /// Blocks a node's best block may trail the best block of its chain's nodes.
    pub max_lag: u64,
    /// A node whose best block has not moved for this long is stalled.
    #[serde(deserialize_with = "parse_duration")]
    pub stall_after: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(1),
            fast_interval: Duration::from_millis(200),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 2,
            max_lag: 5,
            // Ten Polkadot block times: a missed slot is normal, ten in a row are not.
            stall_after: Duration::from_secs(60),
        }
    }
}

impl HealthSettings {
    /// Every invalid field, e.g. `health.rise: must be at least 1`.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |field: &str, reason: String| {
            problems.push(Problem::new(format!("health.{field}"), reason));
        };
        for (field, value) in [
            ("interval", self.interval),
            ("fast_interval", self.fast_interval),
            ("timeout", self.timeout),
            ("stall_after", self.stall_after),
        ] {
            if value.is_zero() {
                report(field, "must be longer than 0s".to_owned());
            }
        }
        if self.fast_interval > self.interval {
            report(
                "fast_interval",
                format!(
                    "{} is longer than health.interval ({}): it must be at most that",
                    humantime::format_duration(self.fast_interval),
                    humantime::format_duration(self.interval)
                ),
            );
        }
        for (field, value) in [("rise", self.rise), ("fall", self.fall)] {
            if value == 0 {
                report(field, "must be at least 1".to_owned());
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_defaults_and_durations_parse_from_humantime() {
        let settings: HealthSettings =
            toml::from_str("interval = \"2s\"\nfast_interval = \"250ms\"\nrise = 3").unwrap();
        assert_eq!(
            settings,
            HealthSettings {
                interval: Duration::from_secs(2),
                fast_interval: Duration::from_millis(250),
                rise: 3,
                ..HealthSettings::default()
            }
        );
        assert!(HealthSettings::default().problems().is_empty());
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_rejected() {
        assert!(toml::from_str::<HealthSettings>("intervall = \"1s\"").is_err());
        let error = toml::from_str::<HealthSettings>("timeout = \"soon\"").unwrap_err();
        assert!(
            error.to_string().contains("\"soon\" is not a duration"),
            "{error}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let settings = HealthSettings {
            interval: Duration::from_millis(100),
            fast_interval: Duration::from_millis(500),
            timeout: Duration::ZERO,
            rise: 0,
            fall: 0,
            ..HealthSettings::default()
        };
        let fields: Vec<String> = settings
            .problems()
            .into_iter()
            .map(|problem| problem.field)
            .collect();
        assert_eq!(
            fields,
            [
                "health.timeout",
                "health.fast_interval",
                "health.rise",
                "health.fall"
            ]
        );
    }
}
