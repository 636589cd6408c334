//! Training data: readers, the train/validation split and the global sample order (DESIGN §3-§4).
//!
//! Owns: turning a job's `[data]` section into in-memory [`Dataset`]s — reading `file://`
//! (later `s3://`) objects through `object_store` ([`store`]), parsing CSV ([`csv`]) and MNIST IDX
//! ([`idx`]) files, generating `synthetic:` sets ([`synthetic`]), scaling pixel values to
//! `[0, 1]`, holding out a seeded validation split — and the sample order ([`order`]).
//! Must not touch: the model, the optimizer, collectives. Bad input never panics: every problem
//! is a [`DataError`] that names the URI and, for text, the line and column.
//!
//! ```text
//!   DataSpec ──load_job_data──▶ fetch (object_store, size-capped) ──▶ gunzip (stream) ──▶ parse
//!                                                                   ──▶ scale to [0,1] ──▶ split
//! ```
//!
//! Loading is synchronous (training is): [`load`] runs the object-store future on a private
//! current-thread tokio runtime. Call it from a plain thread (or `spawn_blocking`), never from
//! inside an async task — that is refused with [`DataError::InsideAsyncRuntime`].

pub mod csv;
pub mod idx;
pub mod order;
pub mod store;
pub mod synthetic;

use flotilla_proto::spec::{DataFormat, DataSpec, DataUri};

pub use order::{Cursor, SplitMix64, StepPlan, epoch_order};

/// Rows in one data set at most: sample indices are `u32` in the epoch order, and 10 M rows is
/// the synthetic generator's own cap (`SYNTHETIC_SAMPLES_MAX`).
pub const ROWS_MAX: usize = 10_000_000;
/// Features per row at most (a 316x316 image; the synthetic generator's cap too).
pub const FEATURES_PER_ROW_MAX: usize = 100_000;
/// Feature values held in memory at most, over all rows: 1 GiB of `f32`. A worker holds the
/// whole training split in memory; larger sets need a streaming reader, which this is not.
pub const FEATURE_VALUES_MAX: usize = 256 * 1024 * 1024;
/// Largest object fetched, in bytes (compressed size for `.gz`). The object is fetched whole, so
/// this bounds memory before parsing starts.
pub const FILE_SIZE_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Largest decompressed stream, in bytes: a gzip bomb stops here instead of filling memory.
pub const DECOMPRESSED_SIZE_MAX_BYTES: u64 = 8 * 1024 * 1024 * 1024;
/// Labels lie in `0..CLASSES_MAX` (the synthetic generator's class cap).
pub const CLASSES_MAX: usize = 1_000;

/// A labelled data set in memory: `rows` rows of `features_per_row` features, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `rows x features_per_row` values, row-major, already divided by `feature_scale`.
    pub features: Vec<f32>,
    /// One label per row, each `< classes`.
    pub labels: Vec<u32>,
    pub rows: usize,
    pub features_per_row: usize,
    /// Number of classes the model predicts: one more than the largest label seen in the train
    /// set (and its validation set), so both splits of one job agree.
    pub classes: usize,
    /// The raw values were divided by this (255 for 8-bit images, 16 for the UCI digits, 1 for
    /// data that is not grey levels). Recorded so inference can scale its inputs the same way.
    pub feature_scale: f32,
    /// Where the data came from (a URI), for messages.
    pub source: String,
}

/// Why data could not be loaded. Every variant names the source.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataError {
    #[error("{uri}: cannot read: {reason}")]
    Read { uri: String, reason: String },
    /// The store did not answer or failed on its side ([`flotilla_store::StoreError::is_outage`]):
    /// a later try may read it.
    #[error("{uri}: cannot read now (the store is out; a later try may work): {reason}")]
    Unavailable { uri: String, reason: String },
    #[error("{uri}: {what} is {value}; at most {limit} is supported")]
    TooLarge { uri: String, what: &'static str, value: u64, limit: u64 },
    #[error("{uri}: line {line}, column {column}: {reason}")]
    Field { uri: String, line: u64, column: usize, reason: String },
    #[error("{uri}: line {line} has {found} columns, but line {first_line} has {expected} (label + features)")]
    ColumnCount { uri: String, line: u64, found: usize, expected: usize, first_line: u64 },
    #[error("{uri}: line {line}, column 1: label {label} is out of range; labels must be whole numbers in 0..{limit}")]
    LabelOutOfRange { uri: String, line: u64, label: String, limit: usize },
    #[error("{uri}: contains no data rows")]
    Empty { uri: String },
    #[error("{uri}: truncated or corrupt at {location}: {reason}")]
    Truncated { uri: String, location: String, reason: String },
    #[error("{uri}: {reason}")]
    Unsupported { uri: String, reason: String },
    #[error("{uri}: {reason}")]
    Mismatch { uri: String, reason: String },
    #[error("data loading blocks; it was called from inside an async runtime (use spawn_blocking or a plain thread)")]
    InsideAsyncRuntime,
}

impl DataError {
    /// The store was out: waiting, not the job, is the fix.
    pub fn is_outage(&self) -> bool {
        matches!(self, DataError::Unavailable { .. })
    }
}

impl Dataset {
    /// The features of row `row`.
    pub fn row(&self, row: usize) -> &[f32] {
        &self.features[row * self.features_per_row..(row + 1) * self.features_per_row]
    }

    /// A new data set of the given rows, in the given order.
    pub fn select(&self, rows: &[u32]) -> Dataset {
        let mut features = Vec::with_capacity(rows.len() * self.features_per_row);
        let mut labels = Vec::with_capacity(rows.len());
        for &row in rows {
            features.extend_from_slice(self.row(row as usize));
            labels.push(self.labels[row as usize]);
        }
        Dataset {
            features,
            labels,
            rows: rows.len(),
            features_per_row: self.features_per_row,
            classes: self.classes,
            feature_scale: self.feature_scale,
            source: self.source.clone(),
        }
    }

    /// The rows' features (concatenated) and labels, for a batch.
    pub fn gather(&self, rows: impl Iterator<Item = u32>) -> (Vec<f32>, Vec<u32>) {
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for row in rows {
            features.extend_from_slice(self.row(row as usize));
            labels.push(self.labels[row as usize]);
        }
        (features, labels)
    }
}

/// Raw parsed values before scaling: what every reader produces.
#[derive(Debug, Clone, PartialEq)]
pub struct RawData {
    pub values: Vec<f32>,
    pub labels: Vec<u32>,
    pub features_per_row: usize,
}

impl RawData {
    fn classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&m| m as usize + 1)
    }
}

/// Grey-level depths recognised when inferring the feature scale: 1 (already in `[0, 1]`),
/// 16 (the UCI 8x8 digits, 0..16), 255 (8-bit images such as MNIST), 65535 (16-bit images).
const GREY_LEVEL_MAXIMA: [f32; 4] = [1.0, 16.0, 255.0, 65_535.0];

/// The scale for pixel-like data: the smallest of [`GREY_LEVEL_MAXIMA`] that is at least the
/// largest value. Data with negative values, or values above 65535, is not grey levels and keeps
/// scale 1 (it is used as it is).
pub fn infer_feature_scale(values: &[f32]) -> f32 {
    let (min, max) = values.iter().fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if min < 0.0 {
        return 1.0;
    }
    GREY_LEVEL_MAXIMA.into_iter().find(|&level| max <= level).unwrap_or(1.0)
}

fn into_dataset(raw: RawData, scale: f32, classes: usize, source: String) -> Dataset {
    let mut features = raw.values;
    if scale != 1.0 {
        features.iter_mut().for_each(|v| *v /= scale);
    }
    Dataset {
        rows: raw.labels.len(),
        features,
        labels: raw.labels,
        features_per_row: raw.features_per_row,
        classes,
        feature_scale: scale,
        source,
    }
}

/// Reads one data set (unscaled) from `uri` in `format`. Blocking; see the module doc.
pub fn load_raw(uri: &DataUri, format: DataFormat) -> Result<RawData, DataError> {
    let name = uri.to_string();
    match (uri, format) {
        (DataUri::Synthetic(spec), _) => synthetic::blobs(spec),
        (_, DataFormat::Synthetic) => {
            Err(DataError::Unsupported { uri: name, reason: "format = \"synthetic\" needs a synthetic: URI".into() })
        }
        (_, DataFormat::Csv) => {
            let bytes = store::fetch(uri)?;
            csv::parse(&name, store::maybe_gunzip(&name, &bytes))
        }
        (_, DataFormat::Idx) => idx::load(uri),
    }
}

/// Reads one data set and scales it by its own inferred scale (see [`infer_feature_scale`]).
pub fn load(uri: &DataUri, format: DataFormat) -> Result<Dataset, DataError> {
    let raw = load_raw(uri, format)?;
    let scale = scale_for(uri, format, &raw);
    let classes = raw.classes();
    Ok(into_dataset(raw, scale, classes, uri.to_string()))
}

fn scale_for(uri: &DataUri, format: DataFormat, raw: &RawData) -> f32 {
    match (uri, format) {
        (DataUri::Synthetic(_), _) | (_, DataFormat::Synthetic) => 1.0,
        (_, DataFormat::Idx) => idx::GREY_LEVEL_MAX,
        (_, DataFormat::Csv) => infer_feature_scale(&raw.values),
    }
}

/// The training data of a job and the data it is validated on.
#[derive(Debug, Clone, PartialEq)]
pub struct Splits {
    pub train: Dataset,
    /// `None` when `validation_fraction` is 0 and no `data.validation` is given.
    pub validation: Option<Dataset>,
}

/// Salt for the split's shuffle, so it is unrelated to the epoch orders of the same seed.
const SPLIT_SEED_SALT: u64 = 0x7370_6c69_745f_7631; // "split_v1"

/// Loads a job's data: `data.train`, and either `data.validation` (scaled like the train set) or
/// a `validation_fraction` of the train rows chosen by a shuffle seeded with `seed` (the files
/// may be sorted by label, so taking the last rows would hold out whole classes).
pub fn load_job_data(spec: &DataSpec, seed: u64) -> Result<Splits, DataError> {
    let train_raw = load_raw(&spec.train, spec.format)?;
    let scale = scale_for(&spec.train, spec.format, &train_raw);
    let train_name = spec.train.to_string();
    let Some(validation_uri) = &spec.validation else {
        let classes = train_raw.classes();
        let all = into_dataset(train_raw, scale, classes, train_name);
        return split(all, spec.validation_fraction, seed);
    };
    let validation_raw = load_raw(validation_uri, spec.format)?;
    if validation_raw.features_per_row != train_raw.features_per_row {
        return Err(DataError::Mismatch {
            uri: validation_uri.to_string(),
            reason: format!(
                "has {} features per row, but the train set {train_name} has {}",
                validation_raw.features_per_row, train_raw.features_per_row
            ),
        });
    }
    let classes = train_raw.classes().max(validation_raw.classes());
    Ok(Splits {
        train: into_dataset(train_raw, scale, classes, train_name),
        validation: Some(into_dataset(validation_raw, scale, classes, validation_uri.to_string())),
    })
}

/// Holds out `round(fraction x rows)` rows, chosen by a seeded shuffle; both parts keep the
/// file's row order. At least one row always stays for training.
pub fn split(all: Dataset, fraction: f64, seed: u64) -> Result<Splits, DataError> {
    let held_out = ((all.rows as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
    if held_out == 0 {
        return Ok(Splits { train: all, validation: None });
    }
    if held_out >= all.rows {
        return Err(DataError::Mismatch {
            uri: all.source.clone(),
            reason: format!("validation_fraction {fraction} of {} rows leaves no row to train on", all.rows),
        });
    }
    let mut shuffled: Vec<u32> = (0..all.rows as u32).collect();
    SplitMix64::for_stream(seed ^ SPLIT_SEED_SALT, 0).shuffle(&mut shuffled);
    let (validation_rows, train_rows) = shuffled.split_at_mut(held_out);
    validation_rows.sort_unstable();
    train_rows.sort_unstable();
    Ok(Splits { train: all.select(train_rows), validation: Some(all.select(validation_rows)) })
}

/// Checks the shape limits shared by every reader; `rows` and `features` as parsed so far.
fn check_limits(uri: &str, rows: usize, features_per_row: usize) -> Result<(), DataError> {
    let too_large = |what, value: usize, limit: usize| DataError::TooLarge {
        uri: uri.to_string(),
        what,
        value: value as u64,
        limit: limit as u64,
    };
    if rows > ROWS_MAX {
        return Err(too_large("the number of rows", rows, ROWS_MAX));
    }
    if features_per_row > FEATURES_PER_ROW_MAX {
        return Err(too_large("the number of features per row", features_per_row, FEATURES_PER_ROW_MAX));
    }
    let values = rows.saturating_mul(features_per_row);
    if values > FEATURE_VALUES_MAX {
        return Err(too_large("the number of feature values", values, FEATURE_VALUES_MAX));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
