//! `flotilla history JOB`: a job's metrics history (the loss curve its rank 0 keeps in the
//! cluster store) as a table, or as JSON for a plotting script. The same points as the
//! dashboard's curve and `GET /api/jobs/<job>/history`, through the job API.

use anyhow::Context;
use flotilla_proto::v1;
use serde_json::{Value, json};

use crate::cluster_file;
use crate::output::{OutputFormat, print_json};

/// Points asked for when `--points` is not given: enough for a curve on a screen.
const POINTS_DEFAULT: u32 = 100;
/// The coordinator's limit (`flotilla_coordinator::history::POINTS_MAX`).
const POINTS_MAX: u32 = 10_000;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The training job whose curve to print (`job-7` or `7`).
    pub job: String,
    /// Points at most, 1 to 10000: an even stride over the curve, plus every point with
    /// validation metrics and the last.
    #[arg(long, default_value_t = POINTS_DEFAULT, value_parser = clap::value_parser!(u32).range(1..=POINTS_MAX as i64))]
    pub points: u32,
}

pub fn run(args: Args, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("async runtime")?;
    let _context = runtime.enter();
    let mut client = cluster_file::resolve(coordinator)?.client()?;
    let request = v1::GetHistoryRequest { job_id: args.job.clone(), points: args.points };
    let response = runtime
        .block_on(client.call(|mut c| {
            let request = request.clone();
            async move { c.get_history(request).await }
        }))
        .map_err(anyhow::Error::from)?;
    let job = job_name(&args.job);
    match output {
        OutputFormat::Json => print_json(&history_json(&job, &response)),
        OutputFormat::Text => print!("{}", history_text(&job, &response)),
    }
    Ok(())
}

/// `7` → `job-7`, as the coordinator names it.
fn job_name(given: &str) -> String {
    if given.bytes().all(|b| b.is_ascii_digit()) { format!("job-{given}") } else { given.to_string() }
}

/// `{"job", "points": [{t, generation, world, step, loss, learning_rate, samples_per_s,
/// val_accuracy, val_loss}], "served_by"}`: the shape of `GET /api/jobs/<job>/history`, a value the point
/// does not have left out.
fn history_json(job: &str, response: &v1::GetHistoryResponse) -> Value {
    let point = |p: &v1::HistoryPoint| {
        let mut shown = json!({ "t": p.t_unix_ms, "generation": p.generation, "world": p.world, "step": p.step });
        let optional = [
            ("loss", p.loss),
            ("learning_rate", p.learning_rate),
            ("samples_per_s", p.samples_per_s),
            ("val_accuracy", p.val_accuracy),
            ("val_loss", p.val_loss),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                shown[name] = json!(value);
            }
        }
        shown
    };
    json!({ "job": job, "points": response.points.iter().map(point).collect::<Vec<_>>(), "served_by": response.served_by })
}

/// One line per point, its time counted from the first point's (pure).
fn history_text(job: &str, response: &v1::GetHistoryResponse) -> String {
    let served = format!("served by coordinator node {}", response.served_by);
    let Some(first) = response.points.first() else {
        return format!(
            "{job} has no metrics history yet: its rank 0 writes one every 5 s while it trains ({served})\n"
        );
    };
    let number = |value: Option<f64>, decimals: usize| value.map_or("-".to_string(), |v| format!("{v:.decimals$}"));
    let rate = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.3e}"));
    let mut text = format!(
        "{:>10} {:>4} {:>5} {:>10} {:>9} {:>10} {:>8} {:>9} {:>9}\n",
        "STEP", "GEN", "WORLD", "LOSS", "LR", "SAMPLES/S", "VAL_ACC", "VAL_LOSS", "TIME_S"
    );
    for p in &response.points {
        let elapsed_s = p.t_unix_ms.saturating_sub(first.t_unix_ms) as f64 / 1e3;
        text.push_str(&format!(
            "{:>10} {:>4} {:>5} {:>10} {:>9} {:>10} {:>8} {:>9} {:>9.1}\n",
            p.step,
            p.generation,
            p.world,
            number(p.loss, 4),
            rate(p.learning_rate),
            number(p.samples_per_s, 0),
            number(p.val_accuracy, 4),
            number(p.val_loss, 4),
            elapsed_s
        ));
    }
    text.push_str(&format!("({} point(s) of {job}, {served})\n", response.points.len()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: u64, step: u64, loss: Option<f64>, val_accuracy: Option<f64>) -> v1::HistoryPoint {
        v1::HistoryPoint { t_unix_ms: t, generation: 1, world: 2, step, loss, val_accuracy, ..Default::default() }
    }

    #[test]
    fn a_curve_reads_as_a_table_and_as_json() {
        let scheduled = v1::HistoryPoint { learning_rate: Some(0.00081), ..point(1_000, 57, Some(0.41), None) };
        let response =
            v1::GetHistoryResponse { points: vec![scheduled, point(3_500, 120, None, Some(0.9188))], served_by: 2 };
        let text = history_text("job-1", &response);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].trim_start().starts_with("STEP") && lines[0].ends_with("TIME_S"), "{text}");
        let first: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(first, ["57", "1", "2", "0.4100", "8.100e-4", "-", "-", "-", "0.0"]);
        let last: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(last, ["120", "1", "2", "-", "-", "-", "0.9188", "-", "2.5"]);
        assert_eq!(lines[3], "(2 point(s) of job-1, served by coordinator node 2)");

        let shown = history_json("job-1", &response);
        assert_eq!(
            shown["points"][0],
            json!({ "t": 1000, "generation": 1, "world": 2, "step": 57, "loss": 0.41, "learning_rate": 0.00081 })
        );
        assert_eq!(shown["points"][1]["val_accuracy"], 0.9188);
        assert!(shown["points"][1].get("loss").is_none(), "{shown}");
        assert_eq!((shown["job"].as_str(), shown["served_by"].as_u64()), (Some("job-1"), Some(2)));

        let empty = history_text("job-3", &v1::GetHistoryResponse { points: vec![], served_by: 1 });
        assert!(empty.starts_with("job-3 has no metrics history yet"), "{empty}");
        assert_eq!(job_name("7"), "job-7");
        assert_eq!(job_name("job-7"), "job-7");
    }
}
