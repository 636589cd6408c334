//! The MNIST IDX reader: an images file (`*-idx3-ubyte`) and its sibling labels file.
//!
//! Owns: the IDX header (magic, element type, dimensions), the sibling-name rule and the checks
//! that make a truncated or mismatched pair an error naming the byte offset.
//! Must not touch: fetching (through [`super::store`]) or scaling beyond reporting
//! [`GREY_LEVEL_MAX`]. Only unsigned-byte IDX files (type `0x08`, as MNIST ships) are read.
//!
//! The labels file is the images file's name with `idx3` → `idx1` and `images` → `labels`:
//! `train-images-idx3-ubyte.gz` → `train-labels-idx1-ubyte.gz`, in the same folder or prefix.

use std::io::Read;

use flotilla_proto::spec::DataUri;

use super::{DataError, RawData, check_limits, store};

/// Unsigned-byte pixels are divided by this to lie in `[0, 1]`.
pub const GREY_LEVEL_MAX: f32 = 255.0;
/// The IDX element type code for unsigned bytes.
const TYPE_UNSIGNED_BYTE: u8 = 0x08;
/// Dimensions an IDX header may declare at most (MNIST uses 3; 8 leaves room for any image set).
const DIMENSIONS_MAX: usize = 8;

/// Loads images and labels. Blocking.
pub fn load(images: &DataUri) -> Result<RawData, DataError> {
    let images_name = images.to_string();
    let labels = labels_uri(images)?;
    let labels_name = labels.to_string();
    let image_bytes = decompressed(&images_name, &store::fetch(images)?)?;
    let label_bytes = decompressed(&labels_name, &store::fetch(&labels)?)?;
    let (image_dims, pixels) = parse(&images_name, &image_bytes)?;
    let (label_dims, label_values) = parse(&labels_name, &label_bytes)?;
    if image_dims.len() < 2 {
        return Err(mismatch(
            &images_name,
            format!("declares {} dimension(s); images need at least 2", image_dims.len()),
        ));
    }
    if label_dims.len() != 1 {
        return Err(mismatch(&labels_name, format!("declares {} dimensions; labels need exactly 1", label_dims.len())));
    }
    if image_dims[0] != label_dims[0] {
        return Err(mismatch(
            &labels_name,
            format!("holds {} labels, but {images_name} holds {} images", label_dims[0], image_dims[0]),
        ));
    }
    let rows = image_dims[0];
    if rows == 0 {
        return Err(DataError::Empty { uri: images_name });
    }
    let features_per_row = image_dims[1..].iter().product();
    check_limits(&images_name, rows, features_per_row)?;
    Ok(RawData {
        values: pixels.iter().map(|&p| f32::from(p)).collect(),
        labels: label_values.iter().map(|&l| u32::from(l)).collect(),
        features_per_row,
    })
}

/// The labels file of an images file (see the module doc).
pub fn labels_uri(images: &DataUri) -> Result<DataUri, DataError> {
    let sibling = |path: &str| -> Result<String, DataError> {
        let (folder, file) = path.rsplit_once('/').map_or(("", path), |(folder, file)| (folder, file));
        let renamed = file.replace("idx3", "idx1").replace("images", "labels");
        if renamed == file {
            return Err(DataError::Unsupported {
                uri: images.to_string(),
                reason: "an IDX images file name must contain `idx3` or `images`, so that the labels file \
                         (`idx1` / `labels` in its place) can be found"
                    .into(),
            });
        }
        Ok(if path.contains('/') { format!("{folder}/{renamed}") } else { renamed })
    };
    match images {
        DataUri::File(path) => Ok(DataUri::File(sibling(path)?)),
        DataUri::Relative(path) => Ok(DataUri::Relative(sibling(path)?)),
        DataUri::S3 { bucket, key } => Ok(DataUri::S3 { bucket: bucket.clone(), key: sibling(key)? }),
        DataUri::Synthetic(_) => {
            Err(DataError::Unsupported { uri: images.to_string(), reason: "is synthetic, not an IDX file".into() })
        }
    }
}

fn decompressed(uri: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::new();
    store::maybe_gunzip(uri, bytes).read_to_end(&mut out).map_err(|e| match e.kind() {
        std::io::ErrorKind::FileTooLarge => DataError::TooLarge {
            uri: uri.to_string(),
            what: "the decompressed size in bytes",
            value: super::DECOMPRESSED_SIZE_MAX_BYTES + 1,
            limit: super::DECOMPRESSED_SIZE_MAX_BYTES,
        },
        _ => DataError::Truncated {
            uri: uri.to_string(),
            location: format!("decompressed byte {}", out.len()),
            reason: e.to_string(),
        },
    })?;
    Ok(out)
}

/// Parses one IDX file: its dimensions and its unsigned-byte payload.
pub fn parse<'a>(uri: &str, bytes: &'a [u8]) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let truncated = |location: usize, reason: String| DataError::Truncated {
        uri: uri.to_string(),
        location: format!("byte {location}"),
        reason,
    };
    let Some(&[zero_a, zero_b, element_type, dimensions]) = bytes.first_chunk::<4>() else {
        return Err(truncated(bytes.len(), "the 4-byte IDX magic number is incomplete".into()));
    };
    if zero_a != 0 || zero_b != 0 {
        return Err(truncated(0, "not an IDX file (the magic number must start with two zero bytes)".into()));
    }
    if element_type != TYPE_UNSIGNED_BYTE {
        return Err(DataError::Unsupported {
            uri: uri.to_string(),
            reason: format!("IDX element type 0x{element_type:02x}; only unsigned bytes (0x08) are read"),
        });
    }
    let dimensions = usize::from(dimensions);
    if dimensions == 0 || dimensions > DIMENSIONS_MAX {
        return Err(truncated(3, format!("declares {dimensions} dimensions; 1 to {DIMENSIONS_MAX} are accepted")));
    }
    let header_len = 4 + 4 * dimensions;
    let Some(header) = bytes.get(4..header_len) else {
        return Err(truncated(bytes.len(), format!("the header needs {header_len} bytes")));
    };
    let dims: Vec<usize> =
        header.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).unwrap_or(usize::MAX);
    let payload = &bytes[header_len..];
    if payload.len() < expected {
        return Err(truncated(
            bytes.len(),
            format!("dimensions {dims:?} need {expected} bytes after the header, found {}", payload.len()),
        ));
    }
    if payload.len() > expected {
        return Err(truncated(
            header_len + expected,
            format!("{} unexpected bytes after the data", payload.len() - expected),
        ));
    }
    Ok((dims, payload))
}

fn mismatch(uri: &str, reason: String) -> DataError {
    DataError::Mismatch { uri: uri.to_string(), reason }
}
