//! The timeline picture: throughput, latency (p50/p99/max per 100 ms, log
//! scale) and errors/retries, one panel each on a shared time axis, with
//! every cutover's start drawn as a vertical line. SVG, so it stays small
//! and diffable in the repository.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Bucket;

const CUTOVER: RGBColor = RGBColor(214, 39, 40);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(31, 119, 180);
const MAX: RGBColor = RGBColor(255, 127, 14);
const RETRY: RGBColor = RGBColor(148, 103, 189);

type Result<T> = std::result::Result<T, String>;

/// An x-axis label: whole seconds, or tenths on a short run.
fn seconds(v: f64, (from, to): (f64, f64)) -> String {
    if to - from < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}
/// A latency line: its label, colour and value.
type Series = (&'static str, RGBColor, fn(&Bucket) -> f64);

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("plot: {e}")
}

/// Draws the timeline of `buckets` to `path`; `cutovers` are the cutover
/// start times in seconds. Only `[from_s, to_s]` is drawn.
pub fn timeline_svg(
    path: &Path,
    title: &str,
    buckets: &[Bucket],
    cutovers: &[f64],
    (from_s, to_s): (f64, f64),
) -> Result<()> {
    let buckets: Vec<&Bucket> = buckets
        .iter()
        .filter(|b| b.t_s >= from_s && b.t_s <= to_s)
        .collect();
    let cutovers: Vec<f64> = cutovers
        .iter()
        .copied()
        .filter(|t| *t >= from_s && *t <= to_s)
        .collect();
    let root = SVGBackend::new(path, (1200, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, rest) = root.split_vertically(40);
    top.titled(title, ("sans-serif", 20)).map_err(err)?;
    let panels = rest.split_evenly((3, 1));
    throughput(&panels[0], &buckets, &cutovers, (from_s, to_s))?;
    latency(&panels[1], &buckets, &cutovers, (from_s, to_s))?;
    errors(&panels[2], &buckets, &cutovers, (from_s, to_s))?;
    root.present().map_err(err)?;
    Ok(())
}

fn cutover_lines<'a, DB, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    cutovers: &[f64],
    (y0, y1): (f64, f64),
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(
            cutovers.iter().map(|&t| {
                PathElement::new(vec![(t, y0), (t, y1)], CUTOVER.mix(0.35).stroke_width(1))
            }),
        )
        .map_err(err)?
        .label("cutover (upgrade requested)")
        .legend(|(x, y)| PathElement::new(vec![(x, y - 6), (x, y + 6)], CUTOVER.stroke_width(2)));
    Ok(())
}

fn throughput(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    buckets: &[&Bucket],
    cutovers: &[f64],
    x: (f64, f64),
) -> Result<()> {
    let top = buckets.iter().map(|b| b.rps).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(x.0..x.1, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_desc("requests/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&|v| seconds(*v, x))
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    cutover_lines(&mut chart, cutovers, (0.0, top))?;
    chart
        .draw_series(LineSeries::new(
            buckets.iter().map(|b| (b.t_s, b.rps)),
            BLACK.stroke_width(1),
        ))
        .map_err(err)?
        .label("succeeded per second (100 ms buckets)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)
}

fn latency(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    buckets: &[&Bucket],
    cutovers: &[f64],
    x: (f64, f64),
) -> Result<()> {
    // From just under the lowest median to just over the highest maximum.
    let floor = buckets
        .iter()
        .filter(|b| b.rps > 0.0)
        .map(|b| b.p50_ms)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.001, 1.0)
        * 0.5;
    let top = buckets.iter().map(|b| b.max_ms).fold(1.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(x.0..x.1, (floor..top).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_desc("latency (ms, log)")
        .y_label_formatter(&|v| format!("{v}"))
        .x_label_formatter(&|v| seconds(*v, x))
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    cutover_lines(&mut chart, cutovers, (floor, top))?;
    let series: [Series; 3] = [
        ("max", MAX, |b| b.max_ms),
        ("p99", P99, |b| b.p99_ms),
        ("p50", P50, |b| b.p50_ms),
    ];
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                buckets
                    .iter()
                    .filter(|b| b.rps > 0.0)
                    .map(|b| (b.t_s, f(b).max(floor))),
                color.stroke_width(1),
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)
}

fn errors(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    buckets: &[&Bucket],
    cutovers: &[f64],
    x: (f64, f64),
) -> Result<()> {
    // Counts are whole numbers: keep at least 0..5 so the ticks are too.
    let top = buckets
        .iter()
        .map(|b| b.failed.max(b.retried) as f64)
        .fold(5.0, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(x.0..x.1, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_desc("requests per 100 ms")
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_formatter(&|v| seconds(*v, x))
        .x_desc("time since the start of the run (s)")
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    cutover_lines(&mut chart, cutovers, (0.0, top))?;
    chart
        .draw_series(LineSeries::new(
            buckets.iter().map(|b| (b.t_s, b.retried as f64)),
            RETRY.stroke_width(1),
        ))
        .map_err(err)?
        .label("retried (reused connection closed unanswered)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RETRY.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            buckets.iter().map(|b| (b.t_s, b.failed as f64)),
            RED.stroke_width(2),
        ))
        .map_err(err)?
        .label("failed")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_small_svg() {
        let buckets: Vec<Bucket> = (0..50)
            .map(|i| Bucket {
                t_s: i as f64 / 10.0 + 0.05,
                rps: 1000.0,
                failed: u64::from(i == 20),
                retried: u64::from(i == 10),
                p50_ms: 0.1,
                p99_ms: 0.5,
                max_ms: 2.0,
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("baton-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("t.svg");
        timeline_svg(&path, "test", &buckets, &[1.0, 2.0], (0.0, 5.0)).expect("draws");
        let svg = std::fs::read_to_string(&path).expect("written");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("cutover"));
        assert!(svg.len() < 100_000);
    }
}
