//! Command jobs' workdirs: the folder a user submits, packed by the CLI into a tar.gz that the
//! cluster store keeps under its SHA-256 (`<store>/workdirs/<sha256>.tar.gz`), fetched,
//! verified and unpacked by every worker that runs the job.
//!
//! Packing skips what does not belong in code shipped to a cluster ([`SKIPPED`]) and refuses
//! links that leave the folder; unpacking refuses names that escape the target, links and
//! special files, and bounds the unpacked size, so a hostile archive cannot write elsewhere or
//! fill the disk.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::checkpoint::store;

/// Folder names never packed: version control, virtual environments, build outputs, caches,
/// and the local cluster's own folder.
pub const SKIPPED: [&str; 8] =
    [".git", ".flotilla", ".venv", "venv", "__pycache__", "node_modules", "target", ".mypy_cache"];
/// Unpacked workdir size and entries at most (a small archive may expand a lot).
const UNPACKED_BYTES_MAX: u64 = 1 << 30;
const UNPACKED_ENTRIES_MAX: usize = 50_000;

/// A packed workdir: the tar.gz bytes and their lower-case hex SHA-256.
pub struct Packed {
    pub archive: Vec<u8>,
    pub sha256: String,
}

/// Packs `dir` (regular files and folders, in name order so the same folder packs to the same
/// bytes; symbolic links are stored as what they point to when that stays inside `dir`).
/// Fails as soon as the archive would pass `max_bytes`, naming the biggest entries.
pub fn pack(dir: &Path, max_bytes: u64) -> anyhow::Result<Packed> {
    let root = std::fs::canonicalize(dir).with_context(|| format!("run.workdir {}", dir.display()))?;
    if !root.is_dir() {
        bail!("run.workdir {} is not a folder", dir.display());
    }
    let mut files = Vec::new();
    collect(&root, &root, &mut files)?;
    files.sort();
    let total: u64 = files.iter().map(|(_, size)| size).sum();
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);
    for (relative, _) in &files {
        builder.append_path_with_name(root.join(relative), relative).with_context(|| format!("packing {relative}"))?;
        if builder.get_ref().get_ref().len() as u64 > max_bytes {
            break;
        }
    }
    let mut encoder = builder.into_inner().context("packing the workdir")?;
    encoder.flush().context("packing the workdir")?;
    let archive = encoder.finish().context("packing the workdir")?;
    if archive.len() as u64 > max_bytes {
        let mut biggest = files.clone();
        biggest.sort_by_key(|(_, size)| std::cmp::Reverse(*size));
        let names: Vec<String> = biggest.iter().take(3).map(|(name, size)| format!("{name} ({size} bytes)")).collect();
        bail!(
            "run.workdir {} packs to more than {max_bytes} bytes ({total} bytes in {} files; biggest: {}); \
             keep data sets and weights out of the workdir (read them from s3:// in your program) or point \
             run.workdir at a smaller folder",
            dir.display(),
            files.len(),
            names.join(", ")
        );
    }
    let sha256 = flotilla_proto::auth::hex(&Sha256::digest(&archive));
    Ok(Packed { archive, sha256 })
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        if SKIPPED.iter().any(|s| name == *s) {
            continue;
        }
        // Follow links only to what stays inside the workdir.
        let path = std::fs::canonicalize(entry.path()).with_context(|| format!("{}", entry.path().display()))?;
        if !path.starts_with(root) {
            bail!("run.workdir: {} points outside the workdir", entry.path().display());
        }
        let relative = entry.path().strip_prefix(root).map(Path::to_path_buf).unwrap_or_default();
        let relative = relative.to_str().with_context(|| format!("{} is not UTF-8", relative.display()))?.to_string();
        let meta = std::fs::metadata(&path).with_context(|| relative.clone())?;
        if meta.is_dir() {
            collect(root, &entry.path(), out)?;
        } else if meta.is_file() {
            out.push((relative, meta.len()));
        }
    }
    Ok(())
}

/// Fetches the packed workdir at `uri`, checks it against the digest in its name and unpacks it
/// into `into` (entries that would land outside it, links and special files are refused).
pub fn fetch(uri: &str, into: &Path, runtime: &tokio::runtime::Handle) -> anyhow::Result<()> {
    let expected = flotilla_proto::spec::run::packed_workdir_sha256(uri)
        .with_context(|| format!("run.workdir `{uri}` is not a packed workdir (<sha256>.tar.gz)"))?;
    let location = store::open(uri)?;
    let max = flotilla_proto::spec::run::WORKDIR_BYTES_MAX;
    let bytes = runtime
        .block_on(flotilla_store::get_capped(&location, location.prefix(), max))
        .with_context(|| format!("fetching the workdir {uri}"))?;
    let actual = flotilla_proto::auth::hex(&Sha256::digest(&bytes));
    if actual != expected {
        bail!("the workdir {uri} has SHA-256 {actual}, not the {expected} its name promises");
    }
    unpack(&bytes, into)
}

/// Unpacks a tar.gz into `into`, bounded in size and entries.
pub fn unpack(archive: &[u8], into: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let (mut bytes, mut entries) = (0u64, 0usize);
    for entry in tar.entries().context("reading the workdir archive")? {
        let mut entry = entry.context("reading the workdir archive")?;
        let kind = entry.header().entry_type();
        let path = entry.path().context("a workdir entry's name")?.into_owned();
        if !(kind.is_file() || kind.is_dir()) {
            bail!("workdir entry {} is not a file or folder (links are not unpacked)", path.display());
        }
        entries += 1;
        bytes += entry.size();
        if entries > UNPACKED_ENTRIES_MAX || bytes > UNPACKED_BYTES_MAX {
            bail!("the workdir unpacks to more than {UNPACKED_ENTRIES_MAX} entries or {UNPACKED_BYTES_MAX} bytes");
        }
        // `unpack_in` refuses names that would escape `into` (absolute, `..`).
        if !entry.unpack_in(into).with_context(|| format!("unpacking {}", path.display()))? {
            bail!("workdir entry {} points outside the workdir", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_pack_deterministically_and_unpack_identically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("src");
        std::fs::create_dir_all(source.join("pkg/__pycache__")).expect("mkdir");
        std::fs::write(source.join("train.py"), b"print('hi')\n").expect("write");
        std::fs::write(source.join("pkg/model.py"), b"x = 1\n").expect("write");
        std::fs::write(source.join("pkg/__pycache__/model.pyc"), b"junk").expect("write");
        let first = pack(&source, 1 << 20).expect("pack");
        let again = pack(&source, 1 << 20).expect("pack");
        assert_eq!(first.sha256, again.sha256, "the same folder packs to the same bytes");
        let target = dir.path().join("out");
        unpack(&first.archive, &target).expect("unpack");
        assert_eq!(std::fs::read(target.join("train.py")).expect("read"), b"print('hi')\n");
        assert_eq!(std::fs::read(target.join("pkg/model.py")).expect("read"), b"x = 1\n");
        assert!(!target.join("pkg/__pycache__").exists(), "caches are not shipped");
    }

    #[test]
    fn oversized_folders_are_refused_with_the_biggest_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(dir.path().join("weights.bin"), &noise).expect("write");
        let refused = pack(dir.path(), 50_000).err().expect("too big").to_string();
        assert!(refused.contains("weights.bin (200000 bytes)") && refused.contains("50000"), "{refused}");
    }

    #[test]
    fn archives_cannot_escape_the_workdir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pack = |name: &str| {
            let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
            let mut header = tar::Header::new_gnu();
            header.set_size(2);
            header.set_mode(0o644);
            // set_path refuses `..`; write the raw name as a hostile archive would.
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, &b"hi"[..]).expect("append");
            builder.into_inner().expect("tar").finish().expect("gzip")
        };
        unpack(&pack("ok.txt"), dir.path()).expect("a plain file unpacks");
        assert_eq!(std::fs::read(dir.path().join("ok.txt")).expect("read"), b"hi");
        assert!(unpack(&pack("../escape.txt"), &dir.path().join("inner")).is_err());
        assert!(!dir.path().join("escape.txt").exists());
    }
}
