//! Model artifacts for the registry: the trained parameters as safetensors (readable by
//! PyTorch's `safetensors.torch.load_file`, with PyTorch's names and layouts), and a content
//! fingerprint of the training data (lineage).
//!
//! Names follow the module tree: `hidden.{i}.weight|bias`, `output.weight|bias` (MLP),
//! `blocks.{i}.weight|bias`, `output.weight|bias` (CNN). Linear weights are transposed from
//! burn's `[in, out]` to PyTorch's `[out, in]`; convolution weights are `[out, in, kh, kw]` in
//! both.

use flotilla_proto::spec::ModelSpec;
use sha2::{Digest, Sha256};

use super::flat::ParamLayout;
use super::{Dataset, TrainError};

/// The safetensors file of `params` (flat, in `layout` order) for a model of `spec`.
pub fn safetensors(spec: &ModelSpec, layout: &ParamLayout, params: &[f32]) -> Result<Vec<u8>, TrainError> {
    Ok(encode(&named_tensors(spec, layout, params)?))
}

/// (PyTorch name, PyTorch shape, values) of every parameter tensor, in layout order.
type NamedTensor = (String, Vec<usize>, Vec<f32>);

fn named_tensors(spec: &ModelSpec, layout: &ParamLayout, params: &[f32]) -> Result<Vec<NamedTensor>, TrainError> {
    let (layers, prefix): (usize, &str) = match spec {
        ModelSpec::Mlp { hidden } => (hidden.len(), "hidden"),
        ModelSpec::Cnn { channels } => (channels.len(), "blocks"),
    };
    if layout.shapes.len() != 2 * (layers + 1) || params.len() != layout.len {
        return Err(TrainError::Internal(format!(
            "{} parameter tensors ({} values) do not match a {} with {layers} layer(s)",
            layout.shapes.len(),
            params.len(),
            spec.kind()
        )));
    }
    let mut tensors: Vec<NamedTensor> = Vec::new();
    let mut offset = 0;
    for (index, shape) in layout.shapes.iter().enumerate() {
        let count: usize = shape.iter().product();
        let values = &params[offset..offset + count];
        offset += count;
        let layer = index / 2;
        let module = if layer < layers { format!("{prefix}.{layer}") } else { "output".to_string() };
        let (role, shape, values) = match shape.as_slice() {
            [d_in, d_out] => {
                // burn's linear weight is [in, out]; PyTorch's is [out, in].
                let mut transposed = vec![0.0f32; count];
                for i in 0..*d_in {
                    for o in 0..*d_out {
                        transposed[o * d_in + i] = values[i * d_out + o];
                    }
                }
                ("weight", vec![*d_out, *d_in], transposed)
            }
            [_] => ("bias", shape.clone(), values.to_vec()),
            _ => ("weight", shape.clone(), values.to_vec()),
        };
        tensors.push((format!("{module}.{role}"), shape, values));
    }
    Ok(tensors)
}

/// The flat parameters (in `layout` order) of a safetensors file written by [`safetensors`] for a
/// model of `spec`: the inverse of the export, checking every name, dtype and shape.
pub fn load_safetensors(spec: &ModelSpec, layout: &ParamLayout, bytes: &[u8]) -> Result<Vec<f32>, TrainError> {
    let bad = |reason: String| TrainError::Resume(format!("model file: {reason}"));
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
        .ok_or_else(|| bad("shorter than its 8-byte header length".into()))?;
    let data_start = 8usize.checked_add(header_len).filter(|&end| end <= bytes.len());
    let data_start = data_start.ok_or_else(|| bad(format!("header of {header_len} bytes runs past the file")))?;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data = &bytes[data_start..];
    // The export's names, shapes and values of a zero model of this layout tell what to expect.
    let expected = named_tensors(spec, layout, &vec![0.0; layout.len])?;
    let mut params = Vec::with_capacity(layout.len);
    for ((name, shape, _), layout_shape) in expected.iter().zip(&layout.shapes) {
        let entry = &header[name.as_str()];
        if entry["dtype"] != "F32" {
            return Err(bad(format!("tensor `{name}` is missing or not F32")));
        }
        let found: Vec<usize> =
            entry["shape"].as_array().into_iter().flatten().filter_map(|d| d.as_u64().map(|d| d as usize)).collect();
        if found != *shape {
            return Err(bad(format!("tensor `{name}` has shape {found:?}; this model needs {shape:?}")));
        }
        let offsets: Vec<usize> = entry["data_offsets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_u64().map(|d| d as usize))
            .collect();
        let count: usize = shape.iter().product();
        let raw = match offsets.as_slice() {
            [start, end] if end.checked_sub(*start) == Some(count * 4) && *end <= data.len() => &data[*start..*end],
            _ => return Err(bad(format!("tensor `{name}` has bad data offsets {offsets:?}"))),
        };
        let values: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        match layout_shape.as_slice() {
            [d_in, d_out] => {
                // PyTorch's [out, in] back to burn's [in, out].
                for i in 0..*d_in {
                    params.extend((0..*d_out).map(|o| values[o * d_in + i]));
                }
            }
            _ => params.extend(values),
        }
    }
    Ok(params)
}

/// safetensors encoding: u64 LE header length, JSON header (offsets into the data), padding to
/// 8 bytes, then the little-endian f32 data.
fn encode(tensors: &[NamedTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt", "producer": "flotilla" }));
    let mut start = 0usize;
    for (name, shape, values) in tensors {
        let end = start + values.len() * 4;
        header
            .insert(name.clone(), serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [start, end] }));
        start = end;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + start);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, values) in tensors {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Hex SHA-256 of a data set's content as trained on (features after scaling, and labels).
pub fn dataset_sha256(data: &Dataset) -> String {
    let mut hash = Sha256::new();
    hash.update((data.rows as u64).to_le_bytes());
    hash.update((data.features_per_row as u64).to_le_bytes());
    hash.update(bytemuck::cast_slice::<f32, u8>(&data.features));
    for label in &data.labels {
        hash.update(label.to_le_bytes());
    }
    flotilla_proto::auth::hex(&hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_weights_are_transposed_and_named_like_pytorch() {
        let spec = ModelSpec::Mlp { hidden: vec![3] };
        // hidden.0: [2 in, 3 out] weight + [3] bias; output: [3 in, 2 out] weight + [2] bias.
        let layout = ParamLayout { shapes: vec![vec![2, 3], vec![3], vec![3, 2], vec![2]], len: 6 + 3 + 6 + 2 };
        let params: Vec<f32> = (0..17).map(|v| v as f32).collect();
        let bytes = safetensors(&spec, &layout, &params).expect("export");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
        assert_eq!(header["hidden.0.weight"]["shape"], serde_json::json!([3, 2]));
        assert_eq!(header["output.bias"]["shape"], serde_json::json!([2]));
        let data = &bytes[8 + header_len..];
        let at = |name: &str, i: usize| {
            let start = header[name]["data_offsets"][0].as_u64().expect("offset") as usize + 4 * i;
            f32::from_le_bytes(data[start..start + 4].try_into().expect("4 bytes"))
        };
        // burn [in=2, out=3] = [[0,1,2],[3,4,5]] -> PyTorch [out=3, in=2] = [[0,3],[1,4],[2,5]].
        assert_eq!((at("hidden.0.weight", 0), at("hidden.0.weight", 1), at("hidden.0.weight", 2)), (0.0, 3.0, 1.0));
        assert_eq!(at("hidden.0.bias", 2), 8.0);
        assert!(safetensors(&ModelSpec::Mlp { hidden: vec![3, 4] }, &layout, &params).is_err(), "shape mismatch");
        assert_eq!(load_safetensors(&spec, &layout, &bytes).expect("load"), params, "loading inverts the export");
        let wider = ParamLayout { shapes: vec![vec![2, 4], vec![4], vec![4, 2], vec![2]], len: 8 + 4 + 8 + 2 };
        let error = load_safetensors(&ModelSpec::Mlp { hidden: vec![4] }, &wider, &bytes).expect_err("shape");
        assert!(error.to_string().contains("hidden.0.weight` has shape [3, 2]"), "{error}");
        assert!(load_safetensors(&spec, &layout, &bytes[..40]).is_err(), "truncated");
    }
}
