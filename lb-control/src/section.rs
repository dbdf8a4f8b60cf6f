//! What every section of the configuration file shares: how an invalid field is reported and
//! how durations are written. Each section lives with the module it configures and reports its
//! own problems; `config` collects them all at once.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer};

/// One invalid field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field's path in the file, e.g. `services[2].backends[0].weight`.
    pub field: String,
    pub reason: String,
}

impl Problem {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Problem {
        Problem {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Durations are written as `"1s"`, `"250ms"`, `"10m"`.
pub fn parse_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|error| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"1s\" or \"250ms\": {error}"
        ))
    })
}
