//! The latency chart: commit → consumer percentiles against offered load, as SVG.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::report::LatencyPoint;

/// Draws p50, p99 and p99.9 against the offered load, with the p99 target as a line.
pub(crate) fn latency_svg(
    path: &Path,
    points: &[LatencyPoint],
    target_p99_ms: f64,
    subtitle: &str,
) -> anyhow::Result<()> {
    let plot = |e| anyhow!("drawing {}: {e}", path.display());
    let x_max = points.iter().map(|p| p.offered_eps).fold(0.0, f64::max) * 1.1;
    let y_max = points.iter().map(|p| p.p999).fold(target_p99_ms, f64::max) * 1.15;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(plot)?;
    let (title_area, chart_area) = root.split_vertically(60);
    title_area
        .draw(&Text::new(
            "Outbox: commit → consumer latency against offered load",
            (20, 12),
            ("sans-serif", 20).into_font(),
        ))
        .map_err(plot)?;
    title_area
        .draw(&Text::new(
            subtitle.to_owned(),
            (20, 38),
            ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
        ))
        .map_err(plot)?;
    let mut chart = ChartBuilder::on(&chart_area)
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max.max(1.0), 0.0..y_max.max(1.0))
        .map_err(plot)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc("offered load, events/s (business transactions with one event each)")
        .y_desc("latency, ms")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(plot)?;

    type Pick = fn(&LatencyPoint) -> f64;
    let series: [(&str, RGBColor, Pick); 3] = [
        ("p50", RGBColor(31, 119, 180), |p| p.p50),
        ("p99", RGBColor(214, 39, 40), |p| p.p99),
        ("p99.9", RGBColor(148, 103, 189), |p| p.p999),
    ];
    for (label, color, value) in series {
        let data: Vec<(f64, f64)> = points.iter().map(|p| (p.offered_eps, value(p))).collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(plot)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(data.into_iter().map(|(x, y)| Circle::new((x, y), 4, color.filled())))
            .map_err(plot)?;
    }
    let target = RGBColor(120, 120, 120);
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, target_p99_ms), (x_max, target_p99_ms)],
            target.stroke_width(1),
        ))
        .map_err(plot)?
        .label(format!("p99 target ({target_p99_ms:.0} ms)"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], target.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(plot)?;
    root.present().map_err(plot)?;
    Ok(())
}
