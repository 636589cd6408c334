//! Confinement of user-named local paths: a `file://` URI a user submits (training data,
//! inference input and output) must lie inside one of the coordinators' data roots
//! (`--data-root`), after symlinks are resolved; what the coordinator reads itself must be a
//! regular file that is not a symlink (no FIFO that blocks it, no device, no link swapped in).
//!
//! ```text
//!   s3://...                       ─▶ not a local path: the store's credentials confine it
//!   file:///abs (or /abs)          ─▶ no `..`; the deepest existing ancestor canonicalised
//!                                     (symlinks resolved) + the rest ─▶ inside a root?
//! ```
//!
//! Without any data root a coordinator accepts no `file://` path from users (`flotilla up`
//! gives its cluster the folder it runs in and the cluster's parent folder).

use std::path::{Component, Path, PathBuf};

/// Data roots a coordinator takes at most.
pub const DATA_ROOTS_MAX: usize = 32;

/// The local path a `file://` URI or absolute path names; `None` for other schemes.
fn local_path(uri: &str) -> Option<&Path> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Some(Path::new(path));
    }
    uri.starts_with('/').then(|| Path::new(uri))
}

/// Canonical forms of the configured roots (they must exist).
pub fn canonical_roots(roots: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    if roots.len() > DATA_ROOTS_MAX {
        return Err(format!("{} data roots; at most {DATA_ROOTS_MAX}", roots.len()));
    }
    roots.iter().map(|root| root.canonicalize().map_err(|e| format!("--data-root {}: {e}", root.display()))).collect()
}

/// `path` with symlinks resolved as far as it exists (the rest appended as named).
fn resolved(path: &Path) -> Result<PathBuf, String> {
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{} contains `..`; name the path without it", path.display()));
    }
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(canonical) => {
                return Ok(rest.iter().rev().fold(canonical, |p: PathBuf, name| p.join(name)));
            }
            Err(_) => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(format!("{} does not resolve", path.display()));
                };
                rest.push(name.to_os_string());
                existing = parent;
            }
        }
    }
}

/// Refuses a local path outside every root; `field` names the request field.
pub fn check(field: &str, uri: &str, roots: &[PathBuf]) -> Result<(), String> {
    let Some(path) = local_path(uri) else { return Ok(()) };
    let real = resolved(path).map_err(|e| format!("{field}: {e}"))?;
    if roots.iter().any(|root| real.starts_with(root)) {
        return Ok(());
    }
    let listed: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    Err(format!(
        "{field}: {uri} is outside the coordinators' data roots ({}); move it inside one, start the coordinators \
         with --data-root (up: --data-root), or use an s3:// URI",
        if listed.is_empty() { "none configured".to_string() } else { listed.join(", ") }
    ))
}

/// A file the coordinator is about to read for a user: a regular file, not a symlink (a FIFO
/// would block the reader, a device read forever, a link point anywhere).
pub fn check_regular_file(field: &str, uri: &str) -> Result<(), String> {
    let Some(path) = local_path(uri) else { return Ok(()) };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(format!("{field}: {uri} is a symbolic link; name the file itself"))
        }
        Ok(meta) if !meta.file_type().is_file() => Err(format!("{field}: {uri} is not a regular file")),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{field}: {uri}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_a_root_pass_and_escapes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("data");
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(&root).expect("root");
        std::fs::create_dir_all(&outside).expect("outside");
        std::fs::write(root.join("in.csv"), "1,2\n").expect("file");
        std::fs::write(outside.join("key"), "x").expect("file");
        let roots = canonical_roots(std::slice::from_ref(&root)).expect("roots");
        let uri = |p: &Path| format!("file://{}", p.display());

        assert!(check("input_uri", &uri(&root.join("in.csv")), &roots).is_ok());
        assert!(check("output_uri", &uri(&root.join("new/out")), &roots).is_ok(), "not yet existing, inside");
        assert!(check("input_uri", "s3://bucket/key", &roots).is_ok(), "not local");
        let refused = check("input_uri", &uri(&outside.join("key")), &roots).expect_err("outside");
        assert!(refused.contains("input_uri") && refused.contains("--data-root"), "{refused}");
        assert!(check("input_uri", &format!("{}/../secret/key", root.display()), &roots).is_err(), "`..`");
        // A symlink inside the root that points out of it is judged by where it points.
        std::os::unix::fs::symlink(&outside, root.join("link")).expect("symlink");
        assert!(check("input_uri", &uri(&root.join("link/key")), &roots).is_err(), "escape through a link");
        assert!(check("output_uri", &uri(&root.join("link/new")), &roots).is_err(), "write through a link");
        // No roots: no local path at all.
        assert!(check("input_uri", &uri(&root.join("in.csv")), &[]).expect_err("none").contains("none configured"));
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("in.csv");
        std::fs::write(&file, "1\n").expect("file");
        let uri = |p: &Path| format!("file://{}", p.display());
        assert!(check_regular_file("input_uri", &uri(&file)).is_ok());
        std::os::unix::fs::symlink(&file, dir.path().join("link.csv")).expect("symlink");
        assert!(check_regular_file("input_uri", &uri(&dir.path().join("link.csv"))).is_err());
        assert!(check_regular_file("input_uri", &uri(dir.path())).is_err(), "a folder");
        assert!(check_regular_file("input_uri", "file:///dev/zero").is_err(), "a device");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        assert!(check_regular_file("input_uri", &uri(&fifo)).expect_err("a FIFO").contains("not a regular file"));
    }
}
