//! The whole state as one JSON document: what `lb-control store export` writes and `import`
//! reads, so state moves between engines (one host on SQLite growing into a pair on etcd).
//!
//! Ids are kept: backends name their service by id, and an id in an old log line or event
//! still means the same record after the move.

use serde::{Deserialize, Serialize};

use super::record::{BlocklistEntry, EventEntry, KeyEntry, TokenEntry};
use crate::model::{ApiKeyRecord, Backend, BlockRecord, Event, JoinTokenRecord, Service};

/// What [`Snapshot::format`] says, so a wrong file is refused by name.
pub const FORMAT: &str = "lb-control-state";
/// Bumped when a field changes meaning or is added; a newer file is refused. 2: `join_tokens`
/// (a version 1 file has none). 3: backends have a `tier` (an older file's backends read as
/// primaries, tier 0; an older reader would have taken backups for primaries). 4: `blocklist`
/// (an older file has none; an older reader would have dropped the blocks).
pub const VERSION: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub format: String,
    pub version: u32,
    pub services: Vec<Service>,
    pub backends: Vec<Backend>,
    pub api_keys: Vec<KeyEntry>,
    #[serde(default)]
    pub join_tokens: Vec<TokenEntry>,
    #[serde(default)]
    pub blocklist: Vec<BlocklistEntry>,
    pub events: Vec<EventEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not an lb-control state export: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("format {found:?} is not {FORMAT:?}: not an lb-control state export")]
    Format { found: String },
    #[error("version {found} is newer than this lb-control reads ({VERSION}); use a newer one")]
    Version { found: u32 },
    #[error("backend {backend} belongs to service {service}, which the file does not hold")]
    Orphan { backend: i64, service: i64 },
}

impl Snapshot {
    pub fn new(
        services: Vec<Service>,
        backends: Vec<Backend>,
        api_keys: Vec<ApiKeyRecord>,
        join_tokens: Vec<JoinTokenRecord>,
        blocklist: Vec<BlockRecord>,
        events: Vec<Event>,
    ) -> Snapshot {
        Snapshot {
            format: FORMAT.to_owned(),
            version: VERSION,
            services,
            backends,
            api_keys: api_keys.iter().map(KeyEntry::from_record).collect(),
            join_tokens: join_tokens.iter().map(TokenEntry::from_record).collect(),
            blocklist: blocklist.iter().map(BlocklistEntry::from_record).collect(),
            events: events.iter().map(EventEntry::from_event).collect(),
        }
    }

    /// Reads an export, checking what an import relies on.
    pub fn parse(text: &str) -> Result<Snapshot, SnapshotError> {
        let snapshot: Snapshot = serde_json::from_str(text)?;
        if snapshot.format != FORMAT {
            return Err(SnapshotError::Format {
                found: snapshot.format,
            });
        }
        if snapshot.version > VERSION {
            return Err(SnapshotError::Version {
                found: snapshot.version,
            });
        }
        for backend in &snapshot.backends {
            if !snapshot.services.iter().any(|s| s.id == backend.service) {
                return Err(SnapshotError::Orphan {
                    backend: backend.id,
                    service: backend.service,
                });
            }
        }
        Ok(snapshot)
    }

    /// `2 services, 5 backends, 3 API keys, 1 join tokens, 4 blocked prefixes, 120 events`
    pub fn summary(&self) -> String {
        format!(
            "{} services, {} backends, {} API keys, {} join tokens, {} blocked prefixes, {} \
             events",
            self.services.len(),
            self.backends.len(),
            self.api_keys.len(),
            self.join_tokens.len(),
            self.blocklist.len(),
            self.events.len()
        )
    }
}
