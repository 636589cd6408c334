//! Batch inference on one worker: a registered model loaded once, input rows scaled the way the
//! training data was, predictions written as CSV.
//!
//! Owns: building the network from the registry's safetensors ([`Predictor::load`]), indexing
//! an inference input's rows once ([`InputText`]) and parsing only a shard's rows from it (the
//! model's features, optionally preceded by a label: [`Input::parse`]), and turning a shard's
//! rows into its output text and statistics ([`run_shard`]). Parsing numbers costs ~3x the
//! forward pass of an MLP, so each worker parses only the rows it predicts.
//! Must not touch: leasing and committing shards (the agent does, through the coordinator),
//! object storage (the caller fetches and writes bytes).
//!
//! Output rows: `row,predicted[,label],p_0,...,p_{classes-1}` with a header line; `row` is the
//! 0-based index of the data row in the input (blank lines are not rows), probabilities are the
//! softmax of the logits. The predicted class is the first highest logit, as in training's
//! validation, so a labelled input's accuracy equals the job's `val_accuracy` on the same rows.

use std::fmt::Write as _;

use burn::tensor::TensorData;
use flotilla_proto::spec::ModelSpec;

use crate::data::{DataError, csv, store};
use crate::train::backend::{self, Device, Tensor};
use crate::train::export::load_safetensors;
use crate::train::flat::{self, ParamLayout};
use crate::train::model::Network;
use crate::train::{TrainError, argmax};

/// Why a shard could not be inferred.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] TrainError),
    #[error("{0}")]
    Input(String),
}

/// A model ready to predict, on the CPU.
pub struct Predictor {
    network: Network,
    device: Device,
    pub features_per_row: usize,
    pub classes: usize,
    /// Inputs are divided by this before the forward pass (the training data's scale).
    pub feature_scale: f32,
}

impl Predictor {
    /// Builds the network of `model` for `features_per_row` inputs and `classes` outputs and
    /// loads `safetensors` (the registry's artifact) into it.
    pub fn load(
        model: &ModelSpec,
        features_per_row: usize,
        classes: usize,
        feature_scale: f32,
        safetensors: &[u8],
    ) -> Result<Predictor, InferError> {
        if !(feature_scale.is_finite() && feature_scale > 0.0) {
            return Err(InferError::Input(format!("the model's feature scale {feature_scale} is not positive")));
        }
        let device = backend::cpu();
        let network = Network::new(model, features_per_row, classes, &device)?;
        let layout = ParamLayout::of(&network);
        let params = load_safetensors(model, &layout, safetensors)?;
        let network = flat::write_params(network, &params, &layout);
        Ok(Predictor { network, device, features_per_row, classes, feature_scale })
    }

    /// Softmax probabilities `[rows, classes]` (row-major) for already scaled `features`.
    pub fn probabilities(&self, features: Vec<f32>, rows: usize) -> Result<Vec<f32>, InferError> {
        let input = Tensor::from_data(TensorData::new(features, [rows, self.features_per_row]), &self.device);
        let logits = flat::tensor_values(self.network.forward(input))?;
        Ok(logits.chunks_exact(self.classes).flat_map(softmax).collect())
    }
}

/// The softmax of `logits`.
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&v| (f64::from(v) - f64::from(max)).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|&e| (e / sum) as f32).collect()
}

/// An input's text (decompressed) with the byte offset of every data row (blank lines are not
/// rows): what a worker keeps per job, so a shard parses only its own rows.
pub struct InputText {
    uri: String,
    text: Vec<u8>,
    row_starts: Vec<usize>,
}

impl InputText {
    /// Decompresses `bytes` (when gzip) and indexes its data rows.
    pub fn index(uri: &str, bytes: &[u8]) -> Result<InputText, InferError> {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut store::maybe_gunzip(uri, bytes), &mut text).map_err(|e| {
            InferError::Data(DataError::Truncated {
                uri: uri.to_string(),
                location: "decompression".into(),
                reason: e.to_string(),
            })
        })?;
        let mut row_starts = Vec::new();
        let mut start = 0;
        for line in text.split_inclusive(|&b| b == b'\n') {
            if flotilla_proto::text::is_data_line(line) {
                row_starts.push(start);
            }
            start += line.len();
        }
        Ok(InputText { uri: uri.to_string(), text, row_starts })
    }

    pub fn rows(&self) -> usize {
        self.row_starts.len()
    }

    /// Parses data rows `first_row..first_row + rows` for a model of `features_per_row` inputs.
    pub fn shard(&self, first_row: usize, rows: usize, features_per_row: usize) -> Result<Input, InferError> {
        let end = first_row.checked_add(rows).filter(|&end| end <= self.rows() && rows > 0).ok_or_else(|| {
            InferError::Input(format!(
                "rows {first_row}..{} are not in {} ({} rows)",
                first_row + rows,
                self.uri,
                self.rows()
            ))
        })?;
        let from = self.row_starts[first_row];
        let to = self.row_starts.get(end).copied().unwrap_or(self.text.len());
        let name = format!("{} (data rows {first_row}..{end})", self.uri);
        Input::parse(&name, &self.text[from..to], features_per_row)
    }
}

/// Parsed rows in memory: raw (unscaled) features and, when the rows carry one, labels.
pub struct Input {
    pub values: Vec<f32>,
    pub labels: Option<Vec<u32>>,
    pub rows: usize,
    pub features_per_row: usize,
}

impl Input {
    /// Parses CSV `bytes` (gzip or not) named `uri` for a model of `features_per_row` inputs:
    /// rows of exactly that many values, or one more (a leading whole-number label).
    pub fn parse(uri: &str, bytes: &[u8], features_per_row: usize) -> Result<Input, InferError> {
        let raw = csv::parse_unlabelled(uri, store::maybe_gunzip(uri, bytes))?;
        let rows = raw.values.len() / raw.features_per_row.max(1);
        if raw.features_per_row == features_per_row {
            return Ok(Input { values: raw.values, labels: None, rows, features_per_row });
        }
        if raw.features_per_row != features_per_row + 1 {
            return Err(InferError::Input(format!(
                "{uri}: rows have {} columns; the model takes {features_per_row} features (or {} with a leading label)",
                raw.features_per_row,
                features_per_row + 1
            )));
        }
        let mut values = Vec::with_capacity(rows * features_per_row);
        let mut labels = Vec::with_capacity(rows);
        for (row, chunk) in raw.values.chunks_exact(raw.features_per_row).enumerate() {
            let label = chunk[0];
            if label < 0.0 || label.fract() != 0.0 || label >= crate::data::CLASSES_MAX as f32 {
                return Err(InferError::Input(format!(
                    "{uri}: data row {row}, column 1: label {label} is not a whole number in 0..{}",
                    crate::data::CLASSES_MAX
                )));
            }
            labels.push(label as u32);
            values.extend_from_slice(&chunk[1..]);
        }
        Ok(Input { values, labels: Some(labels), rows, features_per_row })
    }
}

/// One shard's result: its CSV text and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOutput {
    pub csv: String,
    pub rows: u64,
    pub labelled_rows: u64,
    pub correct: u64,
    /// Predicted rows per class.
    pub class_counts: Vec<u64>,
}

/// Predicts every row of `input` (a shard whose first row has id `first_row_id` in the whole
/// input), `batch_size` rows per forward pass.
pub fn run_shard(
    predictor: &Predictor,
    input: &Input,
    first_row_id: usize,
    batch_size: usize,
) -> Result<ShardOutput, InferError> {
    if input.features_per_row != predictor.features_per_row {
        return Err(InferError::Input(format!(
            "rows have {} features; the model takes {}",
            input.features_per_row, predictor.features_per_row
        )));
    }
    let (features, classes, end) = (input.features_per_row, predictor.classes, input.rows);
    let mut out = ShardOutput {
        csv: header(classes, input.labels.is_some()),
        rows: input.rows as u64,
        labelled_rows: 0,
        correct: 0,
        class_counts: vec![0; classes],
    };
    for start in (0..end).step_by(batch_size.max(1)) {
        let stop = (start + batch_size.max(1)).min(end);
        let scaled: Vec<f32> =
            input.values[start * features..stop * features].iter().map(|v| v / predictor.feature_scale).collect();
        let probabilities = predictor.probabilities(scaled, stop - start)?;
        for (offset, p) in probabilities.chunks_exact(classes).enumerate() {
            let row = start + offset;
            let predicted = argmax(p);
            out.class_counts[predicted] += 1;
            let _ = write!(out.csv, "{},{predicted}", first_row_id + row);
            if let Some(labels) = &input.labels {
                out.labelled_rows += 1;
                out.correct += u64::from(labels[row] as usize == predicted);
                let _ = write!(out.csv, ",{}", labels[row]);
            }
            for value in p {
                let _ = write!(out.csv, ",{value:.6}");
            }
            out.csv.push('\n');
        }
    }
    Ok(out)
}

fn header(classes: usize, labelled: bool) -> String {
    let mut line = String::from("row,predicted");
    if labelled {
        line.push_str(",label");
    }
    for class in 0..classes {
        let _ = write!(line, ",p_{class}");
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::export::safetensors;

    /// A 2-feature, 2-class linear model whose class 1 logit is x0 - x1 and class 0 logit 0.
    fn predictor(scale: f32) -> Predictor {
        let spec = ModelSpec::Mlp { hidden: vec![] };
        let device = backend::cpu();
        let network = Network::new(&spec, 2, 2, &device).expect("network");
        let layout = ParamLayout::of(&network);
        // burn's linear weight [in=2, out=2]: column 1 = (1, -1); bias 0.
        let params = vec![0.0, 1.0, 0.0, -1.0, 0.0, 0.0];
        let bytes = safetensors(&spec, &layout, &params).expect("export");
        Predictor::load(&spec, 2, 2, scale, &bytes).expect("load")
    }

    #[test]
    fn a_labelled_input_is_predicted_scaled_counted_and_written_with_row_ids() {
        let predictor = predictor(10.0);
        let text = InputText::index("in.csv", b"1,30,10\n0,10,30\n\n1,0,5\n").expect("index");
        assert_eq!(text.rows(), 3);
        let all = text.shard(0, 3, 2).expect("parse");
        assert_eq!((all.rows, all.labels.clone()), (3, Some(vec![1, 0, 1])));
        let input = text.shard(1, 2, 2).expect("parse");
        let out = run_shard(&predictor, &input, 1, 1).expect("shard");
        let lines: Vec<&str> = out.csv.lines().collect();
        assert_eq!(lines[0], "row,predicted,label,p_0,p_1");
        assert!(lines[1].starts_with("1,0,0,0.880797,0.119203"), "{}", lines[1]); // logit 1 = (1 - 3) = -2
        assert!(lines[2].starts_with("2,0,1,"), "{}", lines[2]);
        assert_eq!((out.rows, out.labelled_rows, out.correct, out.class_counts.clone()), (2, 2, 1, vec![2, 0]));
        assert!(text.shard(2, 2, 2).is_err(), "past the end");
        let error = text.shard(0, 3, 5).err().expect("width").to_string();
        assert!(error.contains("in.csv (data rows 0..3)"), "{error}");
    }

    #[test]
    fn unlabelled_rows_have_no_label_column_and_wrong_widths_are_refused() {
        let predictor = predictor(1.0);
        let input = Input::parse("in.csv", b"3,1\n1,3\n", 2).expect("parse");
        let out = run_shard(&predictor, &input, 0, 64).expect("shard");
        assert!(out.csv.starts_with("row,predicted,p_0,p_1\n0,1,"), "{}", out.csv);
        assert_eq!((out.labelled_rows, out.class_counts.clone()), (0, vec![1, 1]));
        let error = Input::parse("in.csv", b"1,2,3,4\n", 2).err().expect("width").to_string();
        assert!(error.contains("rows have 4 columns; the model takes 2 features (or 3"), "{error}");
        let error = Input::parse("in.csv", b"1.5,2,3\n", 2).err().expect("label").to_string();
        assert!(error.contains("label 1.5 is not a whole number"), "{error}");
    }
}
