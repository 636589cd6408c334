//! Flotilla's one storage layer: object stores opened from URIs, for the coordinator and the
//! worker alike.
//!
//! Owns: what a storage URI may be ([`parse`], pure), turning one into a store and a prefix
//! ([`open`]), the S3 client settings (timeouts, retries), fsync on local writes, checking that a
//! location can be read or written with one clear error naming the URI and the cause ([`probe`]),
//! and the helpers every caller needs (bounded reads, listing, copy-then-delete promotion).
//! Must not touch: what is stored (checkpoint format, logs, artifacts) — the callers own that.
//!
//! ```text
//!   file:///abs/dir   or /abs/dir   -> LocalFileSystem rooted at "/", writes fsync'd
//!   s3://bucket/prefix              -> AmazonS3 from the standard AWS environment:
//!                                      AWS_REGION, the credentials ([`credentials`]: env, profile,
//!                                      the instance role where allowed), AWS_ENDPOINT_URL (moto,
//!                                      MinIO), AWS_ALLOW_HTTP
//! ```
//!
//! Connections belong to the tokio runtime that made them: a long-lived holder keeps one
//! [`Location`] with its runtime; a one-shot caller opens a fresh one (opening is cheap, no I/O).

pub mod credentials;
mod error;
#[doc(hidden)]
pub mod testing;
mod uri;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ClientConfigKey, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

pub use error::{Cause, StoreError, is_outage};
pub use uri::{Root, StoreUri, parse};

/// How long one S3 connection attempt may take: an unreachable endpoint fails in seconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one S3 request may take in all (a 16 GiB part goes up as a multipart upload, so each
/// request is a part, well under this).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Retries of one S3 request (server errors, throttling, dropped connections).
pub const RETRIES_MAX: usize = 3;
/// Time budget for one request including its retries.
pub const RETRY_BUDGET: Duration = Duration::from_secs(30);
/// How long [`probe`] may take before the location counts as unreachable: never a hang.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Objects one [`list`] returns at most (a prefix with more is a caller's bug or an attack).
pub const LIST_OBJECTS_MAX: usize = 100_000;

/// What a caller needs of a location: [`probe`] checks exactly that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Listing and reading (a missing prefix is fine: it lists empty).
    Read,
    /// Creating and deleting objects.
    Write,
}

/// A store and the prefix inside it that a URI names.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    root: Root,
    prefix: Path,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location").field("uri", &self.uri()).finish()
    }
}

impl Location {
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The prefix inside the store (no leading or trailing slash).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The URI of this location, canonical (`file:///...` or `s3://bucket/...`).
    pub fn uri(&self) -> String {
        self.uri_of(&self.prefix)
    }

    /// The URI of any key in this store.
    pub fn uri_of(&self, key: &Path) -> String {
        self.root.uri_of(key)
    }

    /// The key `rel` (slash-separated, no `..`) below this location's prefix.
    pub fn key(&self, rel: &str) -> Path {
        rel.split('/').filter(|s| !s.is_empty()).fold(self.prefix.clone(), |p, s| p.join(s))
    }

    /// This location's sub-location `rel`, sharing the store (and its connections).
    pub fn join(&self, rel: &str) -> Location {
        Location { store: self.store.clone(), root: self.root.clone(), prefix: self.key(rel) }
    }

    /// The key in this store that `uri` names, when `uri` is in this store; lets a holder reuse
    /// its connections for a URI that came over the wire.
    pub fn key_in(&self, uri: &str) -> Option<Path> {
        let parsed = parse(uri).ok()?;
        (parsed.root == self.root).then_some(parsed.prefix)
    }

    /// The location `uri` names, reusing this store when the URI is in it, else opening another.
    pub fn resolve(&self, uri: &str) -> Result<Location, StoreError> {
        match self.key_in(uri) {
            Some(prefix) => Ok(Location { store: self.store.clone(), root: self.root.clone(), prefix }),
            None => open(uri),
        }
    }
}

/// Checks that `uri` names a store location ([`open`] would accept it) without opening it (an
/// S3 client's set-up takes milliseconds).
pub fn check_uri(uri: &str) -> Result<(), StoreError> {
    parse(uri).map(|_| ())
}

/// Opens the store `uri` names. No I/O: a bad bucket or missing credentials show at the first
/// request, which is why services call [`probe`] at start-up and at submit.
pub fn open(uri: &str) -> Result<Location, StoreError> {
    open_with(uri, std::env::vars())
}

/// [`open`] with the AWS settings taken from `env` (name, value pairs; only `AWS_*`,
/// `FLOTILLA_INSTANCE_ROLE` and `HOME` are read) instead of the process environment: for tests
/// and for callers that forward settings. An S3 URI with no credentials to use
/// ([`credentials::choose`]) fails here, before any request.
pub fn open_with(uri: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<Location, StoreError> {
    let parsed = parse(uri)?;
    let store: Arc<dyn ObjectStore> = match &parsed.root {
        Root::File => Arc::new(LocalFileSystem::new().with_fsync(true)),
        Root::S3 { bucket } => {
            let vars = env.into_iter().filter(|(name, _)| credentials::relevant(name)).collect();
            let unusable = |cause| StoreError::Unusable { uri: uri.to_string(), cause };
            let source = credentials::from_env(&vars).map_err(|why| unusable(Cause::NoCredentials(why)))?;
            Arc::new(s3_builder(bucket, &vars, source).build().map_err(|e| unusable(Cause::Config(e.to_string())))?)
        }
    };
    Ok(Location { store, root: parsed.root, prefix: parsed.prefix })
}

/// The S3 client: everything from the standard AWS environment `vars`, the credentials of
/// `source`, plus our timeouts and retries.
fn s3_builder(
    bucket: &str,
    vars: &std::collections::BTreeMap<String, String>,
    source: credentials::Source,
) -> AmazonS3Builder {
    // As `AmazonS3Builder::from_env`, from the given variables.
    let mut builder = AmazonS3Builder::new();
    for (name, value) in vars {
        if name.starts_with("AWS_")
            && let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
        {
            builder = builder.with_config(key, value);
        }
    }
    if let credentials::Source::Profile { key_id, secret, token, region, .. } = source {
        builder = builder.with_access_key_id(key_id).with_secret_access_key(secret);
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
        let region_set = ["AWS_REGION", "AWS_DEFAULT_REGION"].iter().any(|name| vars.contains_key(*name));
        if let Some(region) = region.filter(|_| !region_set) {
            builder = builder.with_region(region);
        }
    }
    // Not `with_client_options`: it would replace what the environment set (AWS_ALLOW_HTTP).
    builder
        .with_bucket_name(bucket)
        .with_retry(RetryConfig { max_retries: RETRIES_MAX, retry_timeout: RETRY_BUDGET, ..RetryConfig::default() })
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            format!("{}s", CONNECT_TIMEOUT.as_secs()),
        )
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), format!("{}s", REQUEST_TIMEOUT.as_secs()))
}

/// Checks that `location` allows `access`, within [`PROBE_TIMEOUT`]; the error names the URI
/// and the cause (no bucket, no credentials, refused credentials, unreachable endpoint).
/// Writing leaves nothing behind: the probe object is deleted.
pub async fn probe(location: &Location, access: Access) -> Result<(), StoreError> {
    let uri = location.uri();
    let check = async {
        match access {
            Access::Read => {
                let mut listing = location.store.list(Some(&location.prefix));
                listing.try_next().await.map(|_| ())
            }
            Access::Write => {
                static PROBES: AtomicU64 = AtomicU64::new(0);
                let n = PROBES.fetch_add(1, Ordering::Relaxed);
                let key = location.key(&format!("_flotilla_probe-{}-{n}", std::process::id()));
                location.store.put(&key, PutPayload::from_static(b"probe")).await?;
                location.store.delete(&key).await
            }
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StoreError::Unusable { uri, cause: Cause::classify(&e) }),
        Err(_) => {
            Err(StoreError::Unusable { uri, cause: Cause::Unreachable(format!("no answer in {PROBE_TIMEOUT:?}")) })
        }
    }
}

/// Checks that the object `uri` names exists and can be read, within [`PROBE_TIMEOUT`] (one
/// HEAD request): what a submission checks of its data before any worker is bought. The error
/// names the URI and the cause; a missing object is [`StoreError::NotFound`].
pub async fn probe_object(uri: &str) -> Result<u64, StoreError> {
    let location = open(uri)?;
    let head = location.store.head(&location.prefix);
    match tokio::time::timeout(PROBE_TIMEOUT, head).await {
        Ok(Ok(meta)) => Ok(meta.size),
        Ok(Err(object_store::Error::NotFound { .. })) => {
            // A HEAD answer has no body, so a missing bucket looks like a missing object: a
            // listing tells them apart.
            let mut listing = location.store.list(Some(&location.prefix));
            match tokio::time::timeout(PROBE_TIMEOUT, listing.try_next()).await {
                Ok(Err(e)) if Cause::classify(&e) == Cause::NoBucket => {
                    Err(StoreError::Unusable { uri: uri.to_string(), cause: Cause::NoBucket })
                }
                _ => Err(StoreError::NotFound { uri: uri.to_string() }),
            }
        }
        Ok(Err(e)) => Err(StoreError::op(uri.to_string(), e)),
        Err(_) => Err(StoreError::Unusable {
            uri: uri.to_string(),
            cause: Cause::Unreachable(format!("no answer in {PROBE_TIMEOUT:?}")),
        }),
    }
}

/// Reads the whole object `key`, refusing one over `size_max_bytes` before fetching it.
pub async fn get_capped(location: &Location, key: &Path, size_max_bytes: u64) -> Result<Bytes, StoreError> {
    let op = |e| StoreError::op(location.uri_of(key), e);
    let result = location.store.get(key).await.map_err(op)?;
    if result.meta.size > size_max_bytes {
        return Err(StoreError::TooLarge { uri: location.uri_of(key), size_bytes: result.meta.size, size_max_bytes });
    }
    result.bytes().await.map_err(op)
}

/// Every object under `prefix` (recursively), at most [`LIST_OBJECTS_MAX`].
pub async fn list(location: &Location, prefix: &Path) -> Result<Vec<ObjectMeta>, StoreError> {
    let mut stream = location.store.list(Some(prefix));
    let mut objects = Vec::new();
    while let Some(meta) = stream.try_next().await.map_err(|e| StoreError::op(location.uri_of(prefix), e))? {
        if objects.len() == LIST_OBJECTS_MAX {
            return Err(StoreError::TooMany { uri: location.uri_of(prefix), limit: LIST_OBJECTS_MAX });
        }
        objects.push(meta);
    }
    Ok(objects)
}

/// Deletes every object under `prefix`; a prefix already gone is fine. Returns how many went.
pub async fn delete_prefix(location: &Location, prefix: &Path) -> Result<usize, StoreError> {
    if prefix.as_ref().is_empty() {
        return Err(StoreError::Uri {
            uri: location.uri_of(prefix),
            reason: "is the root of a store, which is never deleted as a whole".into(),
        });
    }
    let objects = list(location, prefix).await?;
    for meta in &objects {
        match location.store.delete(&meta.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(StoreError::op(location.uri_of(&meta.location), e)),
        }
    }
    if location.root.is_local() {
        // A local store keeps the emptied folders; remove them too (only folders are left).
        let folder = std::path::PathBuf::from(format!("/{prefix}"));
        match tokio::fs::remove_dir_all(&folder).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Unusable { uri: location.uri_of(prefix), cause: Cause::Local(e.to_string()) });
            }
        }
    }
    Ok(objects.len())
}

/// Moves `from` to `to` by copy then delete (S3 has no rename). Idempotent, so two leaders (or
/// one retrying) may both run it: a missing source with the target present is a finished move.
pub async fn promote(location: &Location, from: &Path, to: &Path) -> Result<(), StoreError> {
    match location.store.copy(from, to).await {
        Ok(()) => {}
        Err(object_store::Error::NotFound { .. }) => {
            return match location.store.head(to).await {
                Ok(_) => Ok(()),
                Err(e) => Err(StoreError::op(location.uri_of(from), e)),
            };
        }
        Err(e) => return Err(StoreError::op(location.uri_of(to), e)),
    }
    match location.store.delete(from).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(StoreError::op(location.uri_of(from), e)),
    }
}

/// Runs `future` on a private current-thread runtime (timers and I/O enabled), for blocking
/// callers. Refuses inside an async runtime, where blocking would stall it (and tokio panics).
pub fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, StoreError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(StoreError::InsideAsyncRuntime);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Runtime(e.to_string()))?;
    Ok(runtime.block_on(future))
}

#[cfg(test)]
mod tests;
