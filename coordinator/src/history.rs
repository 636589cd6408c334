//! Reading a job's metrics history (`<store>/jobs/<job>/history/*.jsonl`, written by its rank 0,
//! see `flotilla_worker::history`) for the dashboard and `GET /api/jobs/<job>/history`: the
//! points in training order (generation, then step: a live handover changes the writer, not the
//! generation), thinned to at most the number asked for (every point with validation metrics
//! kept).

use flotilla_core::JobId;
use flotilla_store::Location;

/// Segments read at most, and bytes per segment (writers flush at 64 KiB).
const SEGMENTS_MAX: usize = 20_000;
const SEGMENT_BYTES_MAX: u64 = 1024 * 1024;
/// Points returned at most, whatever is asked.
pub const POINTS_MAX: usize = 10_000;
/// Points returned when the caller names no number.
pub const POINTS_DEFAULT: usize = 2000;

/// Every point of `job`'s history, oldest first, thinned to `points` (1..=POINTS_MAX).
pub async fn read(store: &Location, job: JobId, points: usize) -> Result<Vec<serde_json::Value>, String> {
    let folder = store.join(&format!("jobs/{job}/history"));
    let mut objects = flotilla_store::list(&folder, folder.prefix())
        .await
        .map_err(|e| format!("listing the history of {job}: {e}"))?;
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    let mut all = Vec::new();
    for object in objects.iter().take(SEGMENTS_MAX) {
        let bytes = match flotilla_store::get_capped(&folder, &object.location, SEGMENT_BYTES_MAX).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::debug!(error = %e, "a history segment was not readable");
                continue;
            }
        };
        all.extend(
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|point| point.is_object()),
        );
    }
    in_training_order(&mut all);
    Ok(thin(all, points.clamp(1, POINTS_MAX)))
}

/// Sorts points by generation, then step, keeping the read order among equals (a step's
/// validation point after its progress point). Pure.
pub fn in_training_order(points: &mut [serde_json::Value]) {
    let key = |p: &serde_json::Value| {
        let field = |name: &str| p.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0);
        (field("generation"), field("step"))
    };
    points.sort_by_key(key);
}

/// At most `limit` points: an even stride over the series, plus every point that carries
/// validation metrics and the last one (pure).
pub fn thin(points: Vec<serde_json::Value>, limit: usize) -> Vec<serde_json::Value> {
    if points.len() <= limit {
        return points;
    }
    let stride = points.len().div_ceil(limit);
    let last = points.len() - 1;
    points
        .into_iter()
        .enumerate()
        .filter(|(i, p)| i % stride == 0 || *i == last || p.get("val_accuracy").is_some_and(|v| !v.is_null()))
        .map(|(_, p)| p)
        .collect()
}

/// A point as `JobService.GetHistory` answers it (pure): the fields a writer left out, or wrote
/// as something other than a number (`null` for a loss that was not finite), stay unset.
pub fn to_proto(point: &serde_json::Value) -> flotilla_proto::v1::HistoryPoint {
    let whole = |name: &str| point.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let number = |name: &str| point.get(name).and_then(serde_json::Value::as_f64);
    flotilla_proto::v1::HistoryPoint {
        t_unix_ms: whole("t"),
        generation: whole("generation"),
        world: u32::try_from(whole("world")).unwrap_or(u32::MAX),
        step: whole("step"),
        loss: number("loss"),
        samples_per_s: number("samples_per_s"),
        val_accuracy: number("val_accuracy"),
        val_loss: number("val_loss"),
        learning_rate: number("learning_rate"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn points_read_as_the_api_answers_them() {
        let progress = json!({ "t": 17, "generation": 2, "world": 4, "step": 30, "loss": 0.5, "samples_per_s": 800.0,
            "learning_rate": 0.002 });
        let point = super::to_proto(&progress);
        assert_eq!(point.learning_rate, Some(0.002));
        assert_eq!((point.t_unix_ms, point.generation, point.world, point.step), (17, 2, 4, 30));
        assert_eq!((point.loss, point.samples_per_s, point.val_accuracy), (Some(0.5), Some(800.0), None));
        let odd = super::to_proto(&json!({ "step": "thirty", "loss": null, "val_accuracy": 0.9, "world": -1 }));
        assert_eq!((odd.step, odd.loss, odd.val_accuracy, odd.world), (0, None, Some(0.9), 0));
    }

    #[test]
    fn thinning_keeps_the_ends_and_the_validation_points() {
        let mut points: Vec<_> = (0..1000).map(|s| json!({ "step": s })).collect();
        points[500] = json!({ "step": 500, "val_accuracy": 0.9 });
        let thinned = super::thin(points, 100);
        assert!(thinned.len() <= 102, "{}", thinned.len());
        assert_eq!(thinned.first().and_then(|p| p["step"].as_u64()), Some(0));
        assert_eq!(thinned.last().and_then(|p| p["step"].as_u64()), Some(999));
        assert!(thinned.iter().any(|p| p["val_accuracy"] == 0.9));
        let short: Vec<_> = (0..5).map(|s| json!({ "step": s })).collect();
        assert_eq!(super::thin(short.clone(), 100), short);
    }

    #[test]
    fn points_come_in_training_order() {
        // Segments of a second writer of generation 1 (after a live handover) read first.
        let mut points = vec![
            json!({ "generation": 1, "step": 30 }),
            json!({ "generation": 2, "step": 5 }),
            json!({ "generation": 1, "step": 10 }),
            json!({ "generation": 1, "step": 30, "val_accuracy": 0.9 }),
            json!({ "generation": 1, "step": 20 }),
        ];
        super::in_training_order(&mut points);
        let order: Vec<_> = points.iter().map(|p| (p["generation"].as_u64(), p["step"].as_u64())).collect();
        let expected = [(1, 10), (1, 20), (1, 30), (1, 30), (2, 5)].map(|(g, s)| (Some(g), Some(s)));
        assert_eq!(order, expected);
        assert!(points[3]["val_accuracy"].is_number(), "a step's validation point stays after its progress point");
    }
}
