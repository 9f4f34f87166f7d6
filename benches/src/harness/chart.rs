//! The SVG chart: latency percentiles against offered rate.

use std::path::Path;

use plotters::prelude::*;

use super::{HarnessError, Report};

/// `20000`, `150`, `0.25`: no trailing noise from the log scale.
fn axis_label(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn chart_error(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::new(format!("chart: {e}"))
}

/// Draws p50, p90, p99 and p99.9 latency (µs, log scale) against the
/// offered rate (events/s, log scale) of the report's open-loop runs into
/// an SVG file. With no open-loop run, closed-loop runs are drawn at the
/// rate they achieved.
pub fn write_chart(report: &Report, path: &Path) -> Result<(), HarnessError> {
    let open = report.runs.iter().any(|r| r.offered_rate.is_some());
    let mut points: Vec<(f64, [f64; 4])> = report
        .runs
        .iter()
        .filter(|r| r.offered_rate.is_some() == open)
        .map(|r| {
            let l = &r.latency_us;
            let x = r.offered_rate.unwrap_or(r.events_per_sec);
            // Log scales need positive values.
            let y = [l.p50, l.p90, l.p99, l.p999].map(|v| v.max(0.001));
            (x.max(0.001), y)
        })
        .collect();
    if points.is_empty() {
        return Err(HarnessError::new("chart: the report has no runs"));
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (x_lo, x_hi) = (points[0].0, points[points.len() - 1].0);
    let (x_lo, x_hi) = (x_lo / 1.5, x_hi * 1.5);
    let y_lo = points
        .iter()
        .flat_map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        / 2.0;
    let y_hi = points.iter().flat_map(|p| p.1).fold(0.0, f64::max) * 2.0;

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| HarnessError::new(format!("cannot create {}: {e}", dir.display())))?;
    }
    let s = &report.settings;
    let title = format!(
        "seambus-bench: {}, {} module(s), {} B payload",
        s.transport.as_str(),
        s.modules,
        s.payload_size
    );
    let x_desc = if open {
        "offered rate (events/s)"
    } else {
        "achieved rate, closed loop (events/s)"
    };
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| axis_label(*x))
        .y_label_formatter(&|y| axis_label(*y))
        .draw()
        .map_err(chart_error)?;
    let series = [
        ("p50", BLUE),
        ("p90", GREEN),
        ("p99", MAGENTA),
        ("p99.9", RED),
    ];
    for (i, (name, color)) in series.into_iter().enumerate() {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(x, y)| (*x, y[i])),
                color.stroke_width(2),
            ))
            .map_err(chart_error)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|(x, y)| Circle::new((*x, y[i]), 3, color.filled())),
            )
            .map_err(chart_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(chart_error)?;
    root.present().map_err(chart_error)?;
    Ok(())
}
