//! `synthetic:` data sets, generated from their parameters alone (nothing is read).
//!
//! Owns: the blobs generator. Must not touch: I/O, clocks, thread RNGs — the same
//! [`SyntheticSpec`] gives the same bytes on every worker and every run.
//!
//! Blobs: one Gaussian cluster per class. Class `c`'s centre has each coordinate drawn uniformly
//! from `[-1, 1]` (from `seed`), so centres differ by about 1 in every coordinate; sample `i` has
//! label `i mod classes` and features `centre + noise x N(0, 1)` per coordinate. Features are not
//! rescaled (`feature_scale` 1).

use flotilla_proto::spec::{SyntheticKind, SyntheticSpec};

use super::{DataError, RawData, SplitMix64, check_limits};

/// Stream ids of the generator's two uses of the seed.
const CENTRES_STREAM: u64 = 1;
const SAMPLES_STREAM: u64 = 2;

/// Generates the data set `spec` describes.
pub fn blobs(spec: &SyntheticSpec) -> Result<RawData, DataError> {
    let SyntheticKind::Blobs = spec.kind;
    let uri = spec.to_string();
    let rows = usize::try_from(spec.samples).unwrap_or(usize::MAX);
    let features = usize::try_from(spec.features).unwrap_or(usize::MAX);
    let classes = usize::try_from(spec.classes).unwrap_or(usize::MAX);
    check_limits(&uri, rows, features)?;
    if !(2..=super::CLASSES_MAX).contains(&classes) {
        return Err(DataError::Unsupported {
            uri,
            reason: format!("classes = {classes}; 2 to {} are supported", super::CLASSES_MAX),
        });
    }
    let mut centre_rng = SplitMix64::for_stream(spec.seed, CENTRES_STREAM);
    let centres: Vec<f64> = (0..classes * features).map(|_| centre_rng.next_f64() * 2.0 - 1.0).collect();
    let mut sample_rng = SplitMix64::for_stream(spec.seed, SAMPLES_STREAM);
    let mut values = Vec::with_capacity(rows * features);
    let mut labels = Vec::with_capacity(rows);
    for row in 0..rows {
        let class = row % classes;
        let centre = &centres[class * features..(class + 1) * features];
        values.extend(centre.iter().map(|&c| (c + spec.noise * sample_rng.next_gaussian()) as f32));
        labels.push(class as u32);
    }
    Ok(RawData { values, labels, features_per_row: features })
}
