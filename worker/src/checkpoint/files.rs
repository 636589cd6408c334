//! Checkpoints of command jobs: a folder of the user's files under an object-store prefix, with
//! a MANIFEST (each file's relative path, size and SHA-256) written last.
//!
//! ```text
//!   local <ckpt dir>/<step>/{model.pt, optim.pt, sub/extra.bin}
//!     ──upload──▶ <prefix>/{model.pt, optim.pt, sub/extra.bin, MANIFEST}   (MANIFEST last)
//!     ──download──▶ <resume dir>/…  every file's size and checksum verified
//! ```
//!
//! Same rules as the built-in format ([`super`]): no MANIFEST means a partial save; a file that
//! is missing, of the wrong size or checksum makes the checkpoint corrupt (`is_unusable`), so
//! the coordinator falls back to an older one. Files stream through (8 MiB buffers), so a
//! checkpoint may be larger than memory.

use std::path::{Component, Path as FsPath, PathBuf};

use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use flotilla_proto::auth::hex;

use super::{CheckpointError, MANIFEST, Manifest, PART_BYTES_MAX, PartEntry};

/// Format of a command job's checkpoint.
pub const FILES_FORMAT: &str = "flotilla-files-v1";
/// Files in one checkpoint at most.
pub const FILES_MAX: usize = 4096;
/// Bytes of one relative path at most.
pub const PATH_LEN_MAX: usize = 512;
/// Bytes of a files MANIFEST at most (4096 entries of long paths).
const MANIFEST_BYTES_MAX: u64 = 4 << 20;
/// Read and write buffer.
const CHUNK_BYTES: usize = 8 << 20;

/// The files under `dir` (relative paths, `/`-separated, sorted), refusing what cannot be a
/// checkpoint file: symbolic links, special files, names object stores cannot hold.
pub fn list_files(dir: &FsPath) -> Result<Vec<(String, u64)>, CheckpointError> {
    let invalid = |what: String| CheckpointError::Invalid(format!("checkpoint folder {}: {what}", dir.display()));
    let mut out = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let entries = std::fs::read_dir(dir.join(&relative)).map_err(|e| invalid(format!("{e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| invalid(format!("{e}")))?;
            let path = relative.join(entry.file_name());
            let kind = entry.file_type().map_err(|e| invalid(format!("{e}")))?;
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            if !kind.is_file() {
                return Err(invalid(format!("{} is not a regular file (links are not followed)", path.display())));
            }
            let name =
                relative_name(&path).ok_or_else(|| invalid(format!("`{}` is not a usable name", path.display())))?;
            let size = entry.metadata().map_err(|e| invalid(format!("{e}")))?.len();
            if size > PART_BYTES_MAX {
                return Err(invalid(format!("{name} is {size} bytes; at most {PART_BYTES_MAX} per file")));
            }
            out.push((name, size));
            if out.len() > FILES_MAX {
                return Err(invalid(format!("more than {FILES_MAX} files")));
            }
        }
    }
    if out.is_empty() {
        return Err(invalid("no files".into()));
    }
    out.sort();
    Ok(out)
}

/// A relative path as an object-store key suffix: UTF-8 components, none empty, `.`, `..` or
/// named MANIFEST at the top, no control characters.
fn relative_name(path: &FsPath) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        let Component::Normal(part) = component else { return None };
        let part = part.to_str()?;
        if part.is_empty() || part.chars().any(char::is_control) || Path::parse(part).is_err() {
            return None;
        }
        parts.push(part);
    }
    let name = parts.join("/");
    (!name.is_empty() && name.len() <= PATH_LEN_MAX && name != MANIFEST && Path::parse(&name).is_ok()).then_some(name)
}

/// Uploads every file under `dir` to `prefix`, then the MANIFEST. Returns the manifest.
pub async fn upload(
    store: &std::sync::Arc<dyn ObjectStore>,
    dir: &FsPath,
    prefix: &Path,
) -> Result<Manifest, CheckpointError> {
    let files = list_files(dir)?;
    let mut entries = Vec::with_capacity(files.len());
    let mut buffer = vec![0u8; CHUNK_BYTES];
    for (name, _) in files {
        let local = dir.join(&name);
        let mut file = tokio::fs::File::open(&local)
            .await
            .map_err(|e| CheckpointError::Invalid(format!("reading {}: {e}", local.display())))?;
        let target =
            Path::parse(format!("{prefix}/{name}")).map_err(|e| CheckpointError::Invalid(format!("{name}: {e}")))?;
        let mut writer = object_store::buffered::BufWriter::with_capacity(store.clone(), target, CHUNK_BYTES);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let read = file
                .read(&mut buffer)
                .await
                .map_err(|e| CheckpointError::Invalid(format!("reading {}: {e}", local.display())))?;
            if read == 0 {
                break;
            }
            size += read as u64;
            if size > PART_BYTES_MAX {
                return Err(CheckpointError::Invalid(format!(
                    "{name} grew past {PART_BYTES_MAX} bytes while uploading"
                )));
            }
            hasher.update(&buffer[..read]);
            writer
                .write_all(&buffer[..read])
                .await
                .map_err(|e| CheckpointError::Invalid(format!("uploading {name}: {e}")))?;
        }
        writer.shutdown().await.map_err(|e| CheckpointError::Invalid(format!("uploading {name}: {e}")))?;
        entries.push(PartEntry { name, size_bytes: size, sha256: hex(&hasher.finalize()) });
    }
    let manifest = Manifest { format: FILES_FORMAT.to_string(), parts: entries };
    store.put(&prefix.clone().join(MANIFEST), PutPayload::from(manifest.encode())).await?;
    Ok(manifest)
}

/// Reads the MANIFEST of a files checkpoint and checks its entries.
pub async fn read_manifest(store: &dyn ObjectStore, prefix: &Path) -> Result<Manifest, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt { prefix: prefix.to_string(), reason };
    let got = match store.get(&prefix.clone().join(MANIFEST)).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(CheckpointError::Partial { prefix: prefix.to_string() });
        }
        Err(e) => return Err(e.into()),
    };
    if got.meta.size > MANIFEST_BYTES_MAX {
        return Err(corrupt(format!("{MANIFEST} is {} bytes", got.meta.size)));
    }
    let bytes = got.bytes().await?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("{MANIFEST}: {e}")))?;
    if manifest.format != FILES_FORMAT {
        return Err(CheckpointError::Format { prefix: prefix.to_string(), found: manifest.format });
    }
    if manifest.parts.is_empty() || manifest.parts.len() > FILES_MAX {
        return Err(corrupt(format!("{MANIFEST} lists {} files", manifest.parts.len())));
    }
    for entry in &manifest.parts {
        if relative_name(FsPath::new(&entry.name)).as_deref() != Some(entry.name.as_str())
            || entry.size_bytes > PART_BYTES_MAX
        {
            return Err(corrupt(format!("{MANIFEST} names `{}` ({} bytes)", entry.name, entry.size_bytes)));
        }
    }
    Ok(manifest)
}

/// Downloads the checkpoint at `prefix` into `dir` (created; must not exist yet), verifying
/// every file against the MANIFEST.
pub async fn download(store: &dyn ObjectStore, prefix: &Path, dir: &FsPath) -> Result<Manifest, CheckpointError> {
    let manifest = read_manifest(store, prefix).await?;
    let local_error =
        |what: &FsPath, e: std::io::Error| CheckpointError::Invalid(format!("writing {}: {e}", what.display()));
    for entry in &manifest.parts {
        let corrupt = |reason: String| CheckpointError::Corrupt { prefix: prefix.to_string(), reason };
        let key =
            Path::parse(format!("{prefix}/{}", entry.name)).map_err(|e| corrupt(format!("{}: {e}", entry.name)))?;
        let got = match store.get(&key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(corrupt(format!("file `{}` is missing", entry.name)));
            }
            Err(e) => return Err(e.into()),
        };
        if got.meta.size != entry.size_bytes {
            return Err(corrupt(format!(
                "`{}` has {} bytes, the manifest says {}",
                entry.name, got.meta.size, entry.size_bytes
            )));
        }
        let local = dir.join(&entry.name);
        if let Some(parent) = local.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|e| local_error(parent, e))?;
        }
        let mut file = tokio::fs::File::create_new(&local).await.map_err(|e| local_error(&local, e))?;
        let mut hasher = Sha256::new();
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| local_error(&local, e))?;
        }
        file.flush().await.map_err(|e| local_error(&local, e))?;
        if hex(&hasher.finalize()) != entry.sha256 {
            return Err(corrupt(format!("`{}` does not match its checksum", entry.name)));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &FsPath, name: &str, bytes: &[u8]) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write");
    }

    #[tokio::test]
    async fn folders_round_trip_and_damage_is_refused() {
        let local = tempfile::tempdir().expect("tempdir");
        let remote = tempfile::tempdir().expect("tempdir");
        let source = local.path().join("100");
        write(&source, "model.pt", &[7u8; 100_000]);
        write(&source, "sub/optim.bin", b"moments");
        write(&source, "COMPLETE", b"");
        let location = super::super::store::open(remote.path().to_str().expect("utf-8")).expect("store");
        let prefix = location.key("jobs/job-1/ckpt/000000000100-g1");
        let manifest = upload(location.store(), &source, &prefix).await.expect("upload");
        assert_eq!(
            manifest.parts.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["COMPLETE", "model.pt", "sub/optim.bin"]
        );
        assert_eq!(manifest.total_bytes(), 100_007);

        let restored = local.path().join("resume");
        download(location.store().as_ref(), &prefix, &restored).await.expect("download");
        assert_eq!(std::fs::read(restored.join("model.pt")).expect("read"), vec![7u8; 100_000]);
        assert_eq!(std::fs::read(restored.join("sub/optim.bin")).expect("read"), b"moments");

        // A changed byte is found (same size), and so is a missing MANIFEST.
        let stored = remote.path().join("jobs/job-1/ckpt/000000000100-g1/sub/optim.bin");
        std::fs::write(&stored, b"momentz").expect("damage");
        let again = local.path().join("again");
        let damaged = download(location.store().as_ref(), &prefix, &again).await.expect_err("corrupt");
        assert!(damaged.is_unusable() && damaged.to_string().contains("sub/optim.bin"), "{damaged}");
        std::fs::remove_file(remote.path().join("jobs/job-1/ckpt/000000000100-g1/MANIFEST")).expect("rm");
        let partial = download(location.store().as_ref(), &prefix, &local.path().join("x")).await.expect_err("partial");
        assert!(matches!(partial, CheckpointError::Partial { .. }), "{partial}");
    }

    #[test]
    fn links_and_empty_folders_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(list_files(dir.path()).is_err(), "an empty folder is no checkpoint");
        write(dir.path(), "a", b"x");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).expect("symlink");
        let refused = list_files(dir.path()).expect_err("a link");
        assert!(refused.to_string().contains("link"), "{refused}");
    }
}
