//! Records as JSON: the values of etcd's keys and the lines of an export file share these
//! forms, so an export reads like what `etcdctl get` shows.
//!
//! Services and backends are the model's own serde forms; API keys, join tokens, blocklist
//! entries and events get a form here because their times are milliseconds since the Unix epoch
//! (as in SQLite) and a key's hash is hex.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use ipnet::IpNet;

use crate::model::{
    ApiKeyId, ApiKeyRecord, BlockRecord, BlockSource, Event, JoinTokenId, JoinTokenRecord, KeyCaps,
    RateLimit,
};

/// Milliseconds since the Unix epoch, negative before it; saturates ~292 million years out.
pub(super) fn unix_ms(time: SystemTime) -> i64 {
    let millis = |duration: Duration| i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => millis(after),
        Err(before) => -millis(before.duration()),
    }
}

/// The time `ms` stands for; None if this system cannot hold it.
pub(super) fn from_unix_ms(ms: i64) -> Option<SystemTime> {
    let offset = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    }
}

/// An API key as JSON. In etcd `last_used_ms` is kept apart, under its own key, so that the
/// once-a-second last-used batch does not rewrite (and wake every watcher of) the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub id: ApiKeyId,
    pub name: String,
    /// Lowercase hex of the secret's SHA-256.
    pub secret_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Absent from entries written before keys had caps of their own.
    #[serde(flatten)]
    pub caps: KeyCaps,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
}

impl KeyEntry {
    pub(super) fn from_record(record: &ApiKeyRecord) -> KeyEntry {
        KeyEntry {
            id: record.id,
            name: record.name.clone(),
            secret_sha256: hex::encode(record.secret_sha256),
            rate_limit: record.rate_limit,
            caps: record.caps,
            created_ms: unix_ms(record.created),
            last_used_ms: record.last_used.map(unix_ms),
            revoked_ms: record.revoked.map(unix_ms),
        }
    }

    /// The record, or what is wrong with this entry.
    pub(super) fn to_record(&self) -> Result<ApiKeyRecord, String> {
        let mut secret_sha256 = [0u8; 32];
        hex::decode_to_slice(&self.secret_sha256, &mut secret_sha256).map_err(|_| {
            format!(
                "secret_sha256 {:?} is not 64 hex digits",
                self.secret_sha256
            )
        })?;
        Ok(ApiKeyRecord {
            id: self.id,
            name: self.name.clone(),
            secret_sha256,
            rate_limit: self.rate_limit,
            caps: self.caps,
            created: time("created_ms", self.created_ms)?,
            last_used: self
                .last_used_ms
                .map(|ms| time("last_used_ms", ms))
                .transpose()?,
            revoked: self
                .revoked_ms
                .map(|ms| time("revoked_ms", ms))
                .transpose()?,
        })
    }
}

/// A join token as JSON: its services by key (`192.0.2.10:9944/tcp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub id: JoinTokenId,
    pub name: String,
    /// Lowercase hex of the secret's SHA-256.
    pub secret_sha256: String,
    pub services: Vec<String>,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<i64>,
}

impl TokenEntry {
    pub(super) fn from_record(record: &JoinTokenRecord) -> TokenEntry {
        TokenEntry {
            id: record.id,
            name: record.name.clone(),
            secret_sha256: hex::encode(record.secret_sha256),
            services: record.services.iter().map(ToString::to_string).collect(),
            created_ms: unix_ms(record.created),
            revoked_ms: record.revoked.map(unix_ms),
        }
    }

    /// The record, or what is wrong with this entry.
    pub(super) fn to_record(&self) -> Result<JoinTokenRecord, String> {
        let mut secret_sha256 = [0u8; 32];
        hex::decode_to_slice(&self.secret_sha256, &mut secret_sha256).map_err(|_| {
            format!(
                "secret_sha256 {:?} is not 64 hex digits",
                self.secret_sha256
            )
        })?;
        Ok(JoinTokenRecord {
            id: self.id,
            name: self.name.clone(),
            secret_sha256,
            services: parse_services(&self.services)?,
            created: time("created_ms", self.created_ms)?,
            revoked: self
                .revoked_ms
                .map(|ms| time("revoked_ms", ms))
                .transpose()?,
        })
    }
}

/// Service keys as stored, or which one is not a key.
pub(super) fn parse_services(services: &[String]) -> Result<Vec<crate::model::ServiceKey>, String> {
    services
        .iter()
        .map(|service| {
            service
                .parse()
                .map_err(|problem| format!("services: {problem}"))
        })
        .collect()
}

/// A blocked source prefix as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocklistEntry {
    pub prefix: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
    pub source: BlockSource,
    pub created_ms: i64,
}

impl BlocklistEntry {
    pub(super) fn from_record(record: &BlockRecord) -> BlocklistEntry {
        BlocklistEntry {
            prefix: record.prefix,
            until_ms: record.until.map(unix_ms),
            source: record.source,
            created_ms: unix_ms(record.created),
        }
    }

    /// The record, or what is wrong with this entry.
    pub(super) fn to_record(&self) -> Result<BlockRecord, String> {
        if self.prefix != self.prefix.trunc() {
            return Err(format!("prefix {} has host bits set", self.prefix));
        }
        Ok(BlockRecord {
            prefix: self.prefix,
            until: self.until_ms.map(|ms| time("until_ms", ms)).transpose()?,
            source: self.source,
            created: time("created_ms", self.created_ms)?,
        })
    }
}

/// One event as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventEntry {
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub subject: String,
    pub detail: String,
}

impl EventEntry {
    pub(super) fn from_event(event: &Event) -> EventEntry {
        EventEntry {
            id: event.id,
            at_ms: unix_ms(event.at),
            kind: event.kind.clone(),
            subject: event.subject.clone(),
            detail: event.detail.clone(),
        }
    }

    pub(super) fn to_event(&self) -> Result<Event, String> {
        Ok(Event {
            id: self.id,
            at: time("at_ms", self.at_ms)?,
            kind: self.kind.clone(),
            subject: self.subject.clone(),
            detail: self.detail.clone(),
        })
    }
}

fn time(field: &str, ms: i64) -> Result<SystemTime, String> {
    from_unix_ms(ms).ok_or_else(|| format!("{field} {ms} is not a time this system can hold"))
}
