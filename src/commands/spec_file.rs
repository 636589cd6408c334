//! Reading a job-spec file from disk: size-bounded read, parse with the command line's
//! `--set FIELD=VALUE` overrides, resolve relative data paths (the file's against its folder, an
//! override's against the current one), and check that local data files exist.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flotilla_core::spec::{DataUri, FieldError, JobSpec, Override, SPEC_LEN_MAX_BYTES, SpecError};

/// Why a spec file could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read (missing, unreadable, too big).
    Io(anyhow::Error),
    /// The content is not a valid spec.
    Spec(SpecError),
}

/// Reads the spec at `path`, applies `overrides` (`--set`), validates and resolves it.
pub fn load(path: &Path, overrides: &[Override]) -> Result<JobSpec, LoadError> {
    let text = read_bounded(path).map_err(LoadError::Io)?;
    let here = std::env::current_dir().context("cannot read the current folder").map_err(LoadError::Io)?;
    let here = here.to_str().ok_or_else(|| LoadError::Io(anyhow::anyhow!("the current folder is not valid UTF-8")))?;
    let overrides: Vec<Override> = overrides.iter().map(|o| o.resolve_relative(here)).collect();
    let mut spec = JobSpec::from_toml_str_with(&text, &overrides).map_err(LoadError::Spec)?;
    let folder = spec_folder(path).map_err(LoadError::Io)?;
    let folder = folder
        .to_str()
        .ok_or_else(|| LoadError::Io(anyhow::anyhow!("the folder of {} is not valid UTF-8", path.display())))?;
    spec.resolve_relative_paths(folder);
    let missing = missing_local_files(&spec);
    if !missing.is_empty() {
        return Err(LoadError::Spec(SpecError::Invalid(missing)));
    }
    Ok(spec)
}

fn read_bounded(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read job spec {}", path.display()))?;
    if !meta.is_file() {
        bail!("job spec {} is not a file", path.display());
    }
    if meta.len() > SPEC_LEN_MAX_BYTES as u64 {
        bail!("job spec {} is {} bytes; at most {SPEC_LEN_MAX_BYTES} are accepted", path.display(), meta.len());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read job spec {}", path.display()))?;
    String::from_utf8(bytes).with_context(|| format!("job spec {} is not UTF-8 text", path.display()))
}

fn spec_folder(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute = std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    Ok(absolute.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/")))
}

/// Local data files named by the spec that do not exist: a spec that points at nothing would
/// only fail later, on a worker, after capacity was bought.
fn missing_local_files(spec: &JobSpec) -> Vec<FieldError> {
    let workdir = spec.command().and_then(|r| r.workdir.as_deref()).filter(|w| w.starts_with('/'));
    let missing_workdir = workdir.filter(|w| !Path::new(w).is_dir()).map(|w| FieldError {
        field: "run.workdir".into(),
        message: format!("folder {w} does not exist (relative paths are resolved against the spec's folder)"),
    });
    missing_workdir
        .into_iter()
        .chain(spec.data_uris().into_iter().filter_map(|(field, uri)| match uri {
            DataUri::File(path) if !Path::new(path).is_file() => Some(FieldError {
                field: field.to_string(),
                message: format!(
                    "file {path} does not exist (relative paths are resolved against the spec's folder, \
                     or the current one for --set)"
                ),
            }),
            _ => None,
        }))
        .collect()
}
