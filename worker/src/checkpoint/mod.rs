//! The checkpoint format: named parts under an object-store prefix, and a MANIFEST written last.
//!
//! ```text
//!   <prefix>/model      flat parameters (f32, little-endian, module order)
//!   <prefix>/optim      optimizer state
//!   <prefix>/meta       JSON: step, data cursor, metrics, spec fingerprint
//!   <prefix>/MANIFEST   JSON: format version, and each part's size and SHA-256  <- written last
//! ```
//!
//! A checkpoint exists only once its MANIFEST exists: a crash in the middle of a save leaves
//! parts without a manifest, which [`read`] refuses as partial. Reading verifies every part's
//! size and checksum, so a truncated or corrupted part is refused with the part named, never
//! loaded. Which checkpoints count for resume is decided elsewhere (the coordinator records
//! them through Raft); this module only writes and verifies bytes.

pub mod files;
pub mod live;
pub mod peer;
pub mod push;
pub mod state;
pub mod store;

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla_proto::auth::hex;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Format written by this build; readers accept it and refuse newer ones.
pub const FORMAT: &str = "flotilla-checkpoint-v1";
pub const MANIFEST: &str = "MANIFEST";
/// Parts in one checkpoint at most.
pub const PARTS_MAX: usize = 64;
/// Bytes of one part at most (16 GiB: a 4-billion-parameter model in f32).
pub const PART_BYTES_MAX: u64 = 16 << 30;
/// Bytes of a MANIFEST at most.
const MANIFEST_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEntry {
    pub name: String,
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the part's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub parts: Vec<PartEntry>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.size_bytes).sum()
    }

    /// Hex SHA-256 of the manifest itself: identifies the whole checkpoint.
    pub fn fingerprint(&self) -> String {
        hex(&Sha256::digest(self.encode()))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest is plain data")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint at {prefix} is partial: it has no {MANIFEST} (the save did not finish)")]
    Partial { prefix: String },
    #[error("checkpoint at {prefix} is corrupt: {reason}")]
    Corrupt { prefix: String, reason: String },
    #[error("checkpoint at {prefix} has format `{found}`; this build reads {FORMAT}")]
    Format { prefix: String, found: String },
    #[error("checkpoint store: {0}")]
    Store(#[from] object_store::Error),
    #[error("checkpoint store: {0}")]
    Location(flotilla_store::StoreError),
    #[error("checkpoint URI `{uri}`: {reason}")]
    Uri { uri: String, reason: String },
    #[error("invalid checkpoint: {0}")]
    Invalid(String),
    /// Written, but the coordinator did not record it (so it will not be resumed from).
    #[error("checkpoint written but not recorded: {0}")]
    NotRecorded(String),
}

impl CheckpointError {
    /// The checkpoint itself is bad (half-written or corrupt): reading it again will not help;
    /// resume from an older one. A format this build does not read is not "bad" (an older
    /// worker during an upgrade): that is a retryable failure, never a reason to delete it.
    pub fn is_unusable(&self) -> bool {
        matches!(self, CheckpointError::Partial { .. } | CheckpointError::Corrupt { .. })
    }

    /// The store did not answer or failed on its side: the checkpoint may be fine, and a later
    /// try may read it ([`flotilla_store::StoreError::is_outage`]).
    pub fn is_outage(&self) -> bool {
        match self {
            CheckpointError::Store(e) => flotilla_store::is_outage(e),
            CheckpointError::Location(e) => e.is_outage(),
            _ => false,
        }
    }
}

fn part_path(prefix: &Path, name: &str) -> Path {
    prefix.clone().join(name)
}

/// The MANIFEST of `parts` (each part's name, size and SHA-256), checking names and limits:
/// what [`write`] stores last, and what a peer transfer is checked against.
pub fn manifest_of(parts: &[(&str, Bytes)]) -> Result<Manifest, CheckpointError> {
    check_part_count(parts.len())?;
    let entries = parts
        .iter()
        .map(|(name, bytes)| part_entry(name, bytes.len() as u64, &Sha256::digest(bytes)))
        .collect::<Result<Vec<_>, _>>()?;
    manifest_of_entries(entries)
}

/// The manifest of parts hashed by the caller (a receiver hashes each part as it arrives).
pub fn manifest_of_entries(entries: Vec<PartEntry>) -> Result<Manifest, CheckpointError> {
    check_part_count(entries.len())?;
    Ok(Manifest { format: FORMAT.to_string(), parts: entries })
}

fn check_part_count(count: usize) -> Result<(), CheckpointError> {
    if count == 0 || count > PARTS_MAX {
        return Err(CheckpointError::Invalid(format!("{count} parts; 1 to {PARTS_MAX} allowed")));
    }
    Ok(())
}

/// The manifest entry of part `name` of `size` bytes whose SHA-256 is `digest`, checking the
/// name and the size against the format's limits.
pub fn part_entry(name: &str, size: u64, digest: &[u8]) -> Result<PartEntry, CheckpointError> {
    let valid = !name.is_empty() && name != MANIFEST && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid || size > PART_BYTES_MAX {
        return Err(CheckpointError::Invalid(format!("part `{name}` ({size} bytes)")));
    }
    Ok(PartEntry { name: name.to_string(), size_bytes: size, sha256: hex(digest) })
}

/// Writes `parts` under `prefix`, then the MANIFEST. Returns the manifest written.
pub async fn write(
    store: &dyn ObjectStore,
    prefix: &Path,
    parts: &[(&str, Bytes)],
) -> Result<Manifest, CheckpointError> {
    let manifest = manifest_of(parts)?;
    write_with(store, prefix, parts, &manifest).await?;
    Ok(manifest)
}

/// Writes `parts` under `prefix`, then `manifest` (computed by [`manifest_of`] from these
/// parts: the caller that already has it does not hash the bytes twice).
pub async fn write_with(
    store: &dyn ObjectStore,
    prefix: &Path,
    parts: &[(&str, Bytes)],
    manifest: &Manifest,
) -> Result<(), CheckpointError> {
    for (name, bytes) in parts {
        store.put(&part_path(prefix, name), PutPayload::from_bytes(bytes.clone())).await?;
    }
    store.put(&part_path(prefix, MANIFEST), PutPayload::from(manifest.encode())).await?;
    Ok(())
}

/// Checks one part's bytes against its manifest entry (size, then SHA-256); `origin` names
/// where they came from in the error (a prefix, or a peer).
pub fn check_part(entry: &PartEntry, bytes: &[u8], origin: &str) -> Result<(), CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt { prefix: origin.to_string(), reason };
    if bytes.len() as u64 != entry.size_bytes {
        return Err(corrupt(format!(
            "part `{}` has {} bytes, the manifest says {}",
            entry.name,
            bytes.len(),
            entry.size_bytes
        )));
    }
    if hex(&Sha256::digest(bytes)) != entry.sha256 {
        return Err(corrupt(format!("part `{}` does not match its checksum", entry.name)));
    }
    Ok(())
}

/// Reads and verifies the checkpoint under `prefix`: every part named by the MANIFEST, with
/// its size and checksum checked.
pub async fn read(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<(Manifest, BTreeMap<String, Bytes>), CheckpointError> {
    let manifest = read_manifest(store, prefix).await?;
    let mut parts = BTreeMap::new();
    for entry in &manifest.parts {
        let corrupt = |reason: String| CheckpointError::Corrupt { prefix: prefix.to_string(), reason };
        let bytes = match store.get(&part_path(prefix, &entry.name)).await {
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(corrupt(format!("part `{}` is missing", entry.name)));
            }
            Err(e) => return Err(e.into()),
        };
        check_part(entry, &bytes, prefix.as_ref())?;
        parts.insert(entry.name.clone(), bytes);
    }
    Ok((manifest, parts))
}

/// Reads and checks the MANIFEST alone (cheap: used to find the newest complete checkpoint).
pub async fn read_manifest(store: &dyn ObjectStore, prefix: &Path) -> Result<Manifest, CheckpointError> {
    let bytes = match store.get(&part_path(prefix, MANIFEST)).await {
        Ok(got) => got.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(CheckpointError::Partial { prefix: prefix.to_string() });
        }
        Err(e) => return Err(e.into()),
    };
    parse_manifest(&bytes, prefix.as_ref())
}

/// Decodes and checks a MANIFEST's bytes (size, format, part count); `origin` names where
/// they came from in the error.
pub fn parse_manifest(bytes: &[u8], origin: &str) -> Result<Manifest, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt { prefix: origin.to_string(), reason };
    if bytes.len() > MANIFEST_BYTES_MAX {
        return Err(corrupt(format!("{MANIFEST} is {} bytes", bytes.len())));
    }
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("{MANIFEST}: {e}")))?;
    if manifest.format != FORMAT {
        return Err(CheckpointError::Format { prefix: origin.to_string(), found: manifest.format });
    }
    if manifest.parts.is_empty() || manifest.parts.len() > PARTS_MAX {
        return Err(corrupt(format!("{MANIFEST} lists {} parts", manifest.parts.len())));
    }
    Ok(manifest)
}

/// f32 values as little-endian bytes (the `model` and `optim` part encoding).
pub fn f32_to_bytes(values: &[f32]) -> Bytes {
    f32s_to_bytes(&[values])
}

/// Several runs of f32 values, one after the other, as little-endian bytes. On a
/// little-endian machine that is their memory, copied once (a rank encodes megabytes of state
/// on the stop's critical path; element by element took several times as long).
pub fn f32s_to_bytes(runs: &[&[f32]]) -> Bytes {
    let mut out = Vec::with_capacity(runs.iter().map(|r| r.len() * 4).sum());
    for run in runs {
        if cfg!(target_endian = "little") {
            out.extend_from_slice(bytemuck::cast_slice::<f32, u8>(run));
        } else {
            for v in *run {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    Bytes::from(out)
}

/// The inverse of [`f32_to_bytes`]; `what` names the part in the error.
pub fn bytes_to_f32(bytes: &[u8], what: &str) -> Result<Vec<f32>, CheckpointError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CheckpointError::Invalid(format!(
            "part `{what}` is {} bytes, not a whole number of f32",
            bytes.len()
        )));
    }
    if cfg!(target_endian = "little") {
        // One copy into aligned f32s (the bytes may sit at any address).
        return Ok(bytemuck::pod_collect_to_vec::<u8, f32>(bytes));
    }
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

#[cfg(test)]
mod tests;
