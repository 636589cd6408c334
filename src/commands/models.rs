//! `flotilla models`: the model registry. `list [NAME]`, `show NAME[@VERSION|@ALIAS]`,
//! `alias NAME VERSION ALIAS`, `download NAME[@...] --format safetensors -f FILE`.

use std::io::Write;

use anyhow::{Context, bail};
use flotilla_proto::v1::{self, ArtifactFormat};
use serde_json::{Value, json};

use crate::cluster_file;
use crate::output::{OutputFormat, print_json};

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Every version of every model (or of NAME), with its lineage.
    List {
        /// Only this model's versions.
        name: Option<String>,
    },
    /// One version: NAME (the newest), NAME@VERSION or NAME@ALIAS.
    Show {
        /// NAME, NAME@VERSION or NAME@ALIAS.
        reference: String,
    },
    /// Points ALIAS (e.g. production, staging) of NAME at VERSION: `models alias mnist-mlp 3
    /// production`; NAME@production then names version 3 (in `show`, `download`, `infer`).
    Alias {
        /// The model's name (`register_as` in the job spec).
        name: String,
        /// The version the alias points at (a number, as `models list` shows it).
        #[arg(value_name = "VERSION")]
        number: u32,
        /// The alias to set (or move, if it points elsewhere).
        alias: String,
    },
    /// Writes a version's weights to a file.
    Download {
        /// NAME (the newest), NAME@VERSION or NAME@ALIAS.
        reference: String,
        /// Artifact format: safetensors (PyTorch names and layouts).
        #[arg(long, default_value = "safetensors")]
        format: String,
        /// The file to write (`-o` is the CLI's output format everywhere, so the file is `-f`).
        #[arg(short = 'f', long)]
        file: std::path::PathBuf,
    },
}

fn version_json(v: &v1::ModelVersion) -> Value {
    let metrics = v.metrics.unwrap_or_default();
    let spec = v.spec.clone().unwrap_or_default();
    json!({
        "name": v.name,
        "version": v.version,
        "aliases": v.aliases,
        "job_id": v.job_id,
        "source_checkpoint": v.source_checkpoint.as_ref().map(|c| json!({"step": c.step, "uri": c.uri})),
        "dataset_sha256": v.dataset_sha256,
        "metrics": {
            "val_accuracy": metrics.val_accuracy,
            "val_loss": metrics.val_loss,
            "train_loss": metrics.train_loss,
            "val_step": metrics.val_step,
        },
        "preemptions_survived": v.preemptions_survived,
        "cost_usd": v.cost_usd,
        "artifact_uri": v.artifact_uri,
        "created_at_unix_ms": v.created_at_unix_ms,
        "features_per_row": v.features_per_row,
        "classes": v.classes,
        "feature_scale": v.feature_scale,
        "spec_toml": flotilla_proto::convert::spec_from_proto(spec).map(|s| s.to_toml()).unwrap_or_default(),
    })
}

/// `models show` for a reader: the version, its metrics and lineage, then its job's spec.
fn version_text(v: &v1::ModelVersion) -> String {
    let metrics = v.metrics.unwrap_or_default();
    // Four decimals, or four significant digits for a loss near zero (not "0.0000").
    let number = |x: Option<f64>| match x {
        None => "-".to_string(),
        Some(x) if x != 0.0 && x.abs() < 1e-3 => format!("{x:.3e}"),
        Some(x) => format!("{x:.4}"),
    };
    let aliases = if v.aliases.is_empty() { String::new() } else { format!(" ({})", v.aliases.join(", ")) };
    let mut checkpoint =
        v.source_checkpoint.as_ref().map_or("-".to_string(), |c| format!("step {} at {}", c.step, c.uri));
    if metrics.val_step > 0 {
        checkpoint.push_str(&format!("; the model is its best validated state, step {}", metrics.val_step));
    }
    let spec = v.spec.clone().and_then(|s| flotilla_proto::convert::spec_from_proto(s).ok()).map(|s| s.to_toml());
    let mut text = format!(
        "{name} version {version}{aliases}\n\
         job                   {job}\n\
         val_accuracy          {accuracy}\n\
         val_loss              {val_loss}\n\
         train_loss            {train_loss}\n\
         input                 {features} features (scaled by {scale}), {classes} classes\n\
         trained from          {checkpoint}\n\
         dataset sha256        {dataset}\n\
         preemptions survived  {preemptions}\n\
         cost                  ${cost:.2}\n\
         created               {created}\n\
         artifact              {artifact}\n",
        name = v.name,
        version = v.version,
        job = v.job_id,
        accuracy = number(metrics.val_accuracy),
        val_loss = number(metrics.val_loss),
        train_loss = number(metrics.train_loss),
        features = v.features_per_row,
        scale = v.feature_scale,
        classes = v.classes,
        dataset = if v.dataset_sha256.is_empty() { "-" } else { &v.dataset_sha256 },
        preemptions = v.preemptions_survived,
        cost = v.cost_usd,
        created = flotilla_core::text::rfc3339_utc(v.created_at_unix_ms),
        artifact = v.artifact_uri,
    );
    if let Some(spec) = spec {
        text.push_str("spec:\n");
        for line in spec.lines() {
            let indent = if line.is_empty() { "" } else { "  " };
            text.push_str(&format!("{indent}{line}\n"));
        }
    }
    text
}

pub fn run(command: ModelsCommand, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("async runtime")?;
    let _context = runtime.enter();
    let target = cluster_file::resolve(coordinator)?;
    let mut client = target.client()?;
    match command {
        ModelsCommand::List { name } => {
            let mut answer = v1::ListModelsResponse::default();
            loop {
                let request = v1::ListModelsRequest {
                    name: name.clone().unwrap_or_default(),
                    page_token: answer.next_page_token.clone(),
                    ..Default::default()
                };
                let page = runtime.block_on(client.call_registry(|mut c| {
                    let request = request.clone();
                    async move { c.list_models(request).await }
                }))?;
                answer.versions.extend(page.versions);
                answer.next_page_token = page.next_page_token;
                if answer.next_page_token.is_empty() {
                    break;
                }
            }
            match output {
                OutputFormat::Json => print_json(&Value::Array(answer.versions.iter().map(version_json).collect())),
                OutputFormat::Text => {
                    println!(
                        "{:<24} {:>7} {:<10} {:>12} {:>11} {:>9}  ALIASES",
                        "NAME", "VERSION", "JOB", "VAL_ACC", "PREEMPTED", "COST $"
                    );
                    for v in &answer.versions {
                        let accuracy = v.metrics.and_then(|m| m.val_accuracy).map_or("-".into(), |a| format!("{a:.4}"));
                        println!(
                            "{:<24} {:>7} {:<10} {:>12} {:>11} {:>9.2}  {}",
                            v.name,
                            v.version,
                            v.job_id,
                            accuracy,
                            v.preemptions_survived,
                            v.cost_usd,
                            v.aliases.join(",")
                        );
                    }
                    println!("({} version(s))", answer.versions.len());
                }
            }
        }
        ModelsCommand::Show { reference } => {
            let request = v1::GetModelRequest { reference };
            let v = runtime.block_on(client.call_registry(|mut c| {
                let request = request.clone();
                async move { c.get_model(request).await }
            }))?;
            match output {
                OutputFormat::Json => print_json(&version_json(&v)),
                OutputFormat::Text => print!("{}", version_text(&v)),
            }
        }
        ModelsCommand::Alias { name, number: version, alias } => {
            let request = v1::SetAliasRequest { name: name.clone(), version, alias: alias.clone() };
            runtime.block_on(client.call_registry(|mut c| {
                let request = request.clone();
                async move { c.set_alias(request).await }
            }))?;
            match output {
                OutputFormat::Json => print_json(&json!({"name": name, "version": version, "alias": alias})),
                OutputFormat::Text => println!("{name}@{alias} -> version {version}"),
            }
        }
        ModelsCommand::Download { reference, format, file: path } => {
            if format != "safetensors" {
                bail!("--format {format}: the registry serves safetensors (PyTorch-loadable weights)");
            }
            let request = v1::DownloadModelRequest { reference, format: ArtifactFormat::Safetensors.into() };
            let bytes = runtime.block_on(async {
                let mut stream = client
                    .call_registry(|mut c| {
                        let request = request.clone();
                        async move { c.download_model(request).await }
                    })
                    .await?;
                let mut bytes = Vec::new();
                while let Some(chunk) = stream.message().await.map_err(flotilla_proto::ApiError::from)? {
                    bytes.extend_from_slice(&chunk.data);
                }
                anyhow::Ok(bytes)
            })?;
            let mut file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            file.write_all(&bytes).with_context(|| format!("writing {}", path.display()))?;
            match output {
                OutputFormat::Json => print_json(&json!({"file": path, "bytes": bytes.len()})),
                OutputFormat::Text => println!("{} ({} bytes)", path.display(), bytes.len()),
            }
        }
    }
    Ok(())
}
