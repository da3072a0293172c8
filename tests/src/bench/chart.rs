//! The report's PNG: throughput (1 and 8 streams) and latency at 1,000 req/s (p50, p99) per
//! data path, medians as bars and min–max as whiskers. Text needs a TrueType font read at run
//! time (DejaVu Sans from Debian's `fonts-dejavu-core`, or any of [`FONT_CANDIDATES`]);
//! without one the chart is drawn without text and the report says so.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use super::model::{DataPath, Metric, Quantile, Results};
use super::report::{FIXED_RATES, STREAMS};

/// Where a sans-serif TTF is looked for, first match wins.
pub const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const FONT_FAMILY: &str = "sans-serif";
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 460;
/// Series colours: first and second bar of each group.
const COLOURS: [RGBColor; 2] = [RGBColor(0x2b, 0x6c, 0xb0), RGBColor(0xe0, 0x7b, 0x39)];

/// Registers the first font found; its path, or `None` (then draw without text).
pub fn load_font() -> Option<&'static str> {
    for path in FONT_CANDIDATES {
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        // The font registry keeps `&'static` bytes: leaked once per process, at startup.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
            return Some(path);
        }
    }
    None
}

/// One bar group: a path and its two series' (median, min, max).
type Group = (DataPath, [Option<(f64, f64, f64)>; 2]);

fn groups(results: &Results, paths: &[DataPath], metrics: [Metric; 2]) -> Vec<Group> {
    paths
        .iter()
        .filter(|p| results.has(**p))
        .map(|&p| {
            let bar = |m| results.spread(p, m).map(|s| (s.median, s.min, s.max));
            (p, [bar(metrics[0]), bar(metrics[1])])
        })
        .collect()
}

/// The two panels' bar groups: throughput of the paths that carry TCP, latency at the first
/// fixed rate of every path (the HTTP-only L7 paths too), each path with samples.
fn panel_groups(results: &Results) -> (Vec<Group>, Vec<Group>) {
    let tcp: Vec<DataPath> = DataPath::ALL
        .into_iter()
        .filter(|p| p.carries_tcp())
        .collect();
    let rate = FIXED_RATES[0].0;
    let throughput = groups(
        results,
        &tcp,
        STREAMS.map(|streams| Metric::Throughput { streams }),
    );
    let latency = groups(
        results,
        &DataPath::ALL,
        [Quantile::P50, Quantile::P99].map(|q| Metric::FixedRateLatency { rate, q }),
    );
    (throughput, latency)
}

/// Draws the chart to `path` (PNG). `text`: whether a font was registered.
pub fn draw(results: &Results, path: &Path, text: bool) -> Result<()> {
    let (throughput, latency) = panel_groups(results);
    let rate = FIXED_RATES[0].0;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("fill chart: {e}"))?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    panel(
        &left,
        &throughput,
        "Throughput, Gbit/s (iperf3)",
        ["1 stream", "8 streams"],
        Scale::Linear,
        // The baselines' throughput is lowest: the legend goes over them.
        SeriesLabelPosition::UpperRight,
        text,
    )?;
    panel(
        &right,
        &latency,
        &format!("Latency at {rate} req/s, µs, log scale (HTTP/1.1 keep-alive)"),
        ["p50", "p99"],
        Scale::Log { floor: 10.0 },
        // Direct's latency is lowest, the L7 paths' (last) highest.
        SeriesLabelPosition::UpperLeft,
        text,
    )?;
    root.present()
        .with_context(|| format!("write chart {}", path.display()))?;
    Ok(())
}

/// How values map to the vertical axis.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scale {
    Linear,
    /// log10, bars starting at `floor` (latencies span three decades on a noisy machine).
    Log {
        floor: f64,
    },
}

impl Scale {
    fn y(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log { floor } => v.max(floor).log10(),
        }
    }

    fn label(self, y: f64) -> String {
        match self {
            Scale::Linear if y.abs() >= 100.0 => format!("{y:.0}"),
            Scale::Linear => format!("{y:.1}"),
            Scale::Log { .. } => format!("{:.0}", 10f64.powf(y)),
        }
    }
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    groups: &[Group],
    title: &str,
    series: [&str; 2],
    scale: Scale,
    legend: SeriesLabelPosition,
    text: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let groups: Vec<Group> = groups
        .iter()
        .map(|(p, bars)| {
            (
                *p,
                bars.map(|b| b.map(|(m, lo, hi)| (scale.y(m), scale.y(lo), scale.y(hi)))),
            )
        })
        .collect();
    let groups = groups.as_slice();
    let bottom = match scale {
        Scale::Linear => 0.0,
        Scale::Log { floor } => floor.log10(),
    };
    // Linear: scaled to the medians, so that one noisy repetition's maximum does not flatten
    // the bars (its whisker is cut at the top instead). Log: room for every whisker.
    let top = groups
        .iter()
        .flat_map(|(_, bars)| {
            bars.iter().flatten().map(|b| match scale {
                Scale::Linear => b.0 * 1.3,
                Scale::Log { .. } => b.2 + 0.2,
            })
        })
        .fold(bottom + 1e-9, f64::max);
    let n = groups.len().max(1) as f64;
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(12)
        .x_label_area_size(if text { 40 } else { 5 });
    builder.y_label_area_size(if text { 55 } else { 5 });
    if text {
        builder.caption(title, (FONT_FAMILY, 20));
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..n, bottom..top)
        .map_err(|e| anyhow!("chart axes: {e}"))?;
    let names: Vec<&str> = groups.iter().map(|(p, _)| p.short()).collect();
    // Labels sit at group centres (i + 0.5).
    let label = |x: &f64| {
        let i = x.floor();
        if (x - i - 0.5).abs() < 1e-6 && i >= 0.0 {
            names
                .get(i as usize)
                .map(|s| s.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        }
    };
    let y_label = |y: &f64| scale.label(*y);
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&label)
        .y_label_formatter(&y_label);
    if text {
        mesh.label_style((FONT_FAMILY, 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| anyhow!("chart mesh: {e}"))?;

    for (s, colour) in COLOURS.iter().enumerate() {
        let bars: Vec<(f64, (f64, f64, f64))> = groups
            .iter()
            .enumerate()
            .filter_map(|(i, (_, b))| b[s].map(|v| (i as f64, v)))
            .collect();
        let x0 = |i: f64| i + 0.12 + 0.38 * s as f64;
        let series_anno = chart
            .draw_series(bars.iter().map(|&(i, (median, _, _))| {
                Rectangle::new([(x0(i), bottom), (x0(i) + 0.36, median)], colour.filled())
            }))
            .map_err(|e| anyhow!("chart bars: {e}"))?;
        if text {
            series_anno.label(series[s]).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
            });
        }
        chart
            .draw_series(bars.iter().map(|&(i, (_, min, max))| {
                let x = x0(i) + 0.18;
                PathElement::new(
                    vec![(x, min.min(top)), (x, max.min(top))],
                    BLACK.stroke_width(2),
                )
            }))
            .map_err(|e| anyhow!("chart whiskers: {e}"))?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, 14))
            .position(legend)
            .draw()
            .map_err(|e| anyhow!("chart legend: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_scale_keeps_small_values_visible() {
        let log = Scale::Log { floor: 10.0 };
        assert_eq!(log.y(100.0), 2.0);
        assert_eq!(log.y(1.0), 1.0, "clamped to the floor");
        assert_eq!(log.label(3.0), "1000");
        assert_eq!(Scale::Linear.y(2.5), 2.5);
        assert_eq!(Scale::Linear.label(2.5), "2.5");
        assert_eq!(Scale::Linear.label(250.0), "250");
    }

    #[test]
    fn the_l7_paths_are_in_the_latency_panel_only() {
        let mut r = Results::default();
        let lat = Metric::FixedRateLatency {
            rate: FIXED_RATES[0].0,
            q: Quantile::P50,
        };
        for p in [DataPath::Direct, DataPath::Waypoint, DataPath::Ingress] {
            r.record(p, lat, 0, 100.0);
        }
        r.record(DataPath::Direct, Metric::Throughput { streams: 1 }, 0, 10.0);
        let (throughput, latency) = panel_groups(&r);
        let paths = |g: &[Group]| g.iter().map(|(p, _)| *p).collect::<Vec<_>>();
        assert_eq!(paths(&throughput), [DataPath::Direct]);
        assert_eq!(
            paths(&latency),
            [DataPath::Direct, DataPath::Waypoint, DataPath::Ingress]
        );
        assert_eq!(latency[2].1[0], Some((100.0, 100.0, 100.0)));
    }

    #[test]
    fn a_chart_is_a_small_png() {
        let mut r = Results::default();
        for (rep, v) in [9.0, 10.0, 11.0].into_iter().enumerate() {
            for (i, p) in [
                DataPath::Direct,
                DataPath::ZtunnelEbpf,
                DataPath::HaproxyTls,
            ]
            .into_iter()
            .enumerate()
            {
                let f = 1.0 / (i + 1) as f64;
                r.record(p, Metric::Throughput { streams: 1 }, rep, v * f);
                r.record(p, Metric::Throughput { streams: 8 }, rep, 2.0 * v * f);
                let lat = |q| Metric::FixedRateLatency { rate: 1_000, q };
                r.record(p, lat(Quantile::P50), rep, 30.0 / f);
                r.record(p, lat(Quantile::P99), rep, 90.0 / f);
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let png = dir.path().join("chart.png");
        let text = load_font().is_some();
        draw(&r, &png, text).expect("draw");
        let bytes = std::fs::read(&png).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() < 300 * 1024, "{} bytes", bytes.len());
    }
}
