//! The report's PNG plots (plotters): accuracy per round and bytes
//! uploaded, drawn with the DejaVu font when the system has it.

use std::path::Path;

use crate::runner::report::{human_bytes, Report};

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

pub(super) fn ensure_font() -> Result<(), String> {
    use std::sync::OnceLock;
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            for path in FONT_PATHS {
                if let Ok(bytes) = std::fs::read(path) {
                    let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    return plotters::style::register_font(
                        "sans-serif",
                        plotters::style::FontStyle::Normal,
                        leaked,
                    )
                    .map_err(|_| format!("{path} is not a usable font"));
                }
            }
            Err(format!(
                "no font found (looked for {}); install fonts-dejavu-core",
                FONT_PATHS.join(", ")
            ))
        })
        .clone()
}

const COLORS: &[plotters::style::RGBColor] = &[
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(148, 103, 189),
    plotters::style::RGBColor(140, 86, 75),
];

pub(super) fn plot_accuracy(report: &Report, file: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    ensure_font()?;
    let rounds = report.rounds.len().max(1) as u32;
    let root = BitMapBackend::new(file, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Global-test accuracy per round (thin: after local training)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(1u32..rounds.max(2), 0f64..1f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("accuracy")
        .draw()
        .map_err(|e| e.to_string())?;
    // (label, points, colour index (None: black), global model?)
    type Series = (String, Vec<(u32, f64)>, Option<usize>, bool);
    let mut series: Vec<Series> = Vec::new();
    let finite = |points: Vec<(u32, f64)>| -> Vec<(u32, f64)> {
        points.into_iter().filter(|(_, a)| a.is_finite()).collect()
    };
    for (i, f) in report.families.iter().enumerate() {
        let global = report
            .rounds
            .iter()
            .filter_map(|r| {
                r.global_accuracy_by_family
                    .get(&f.key)
                    .map(|a| (r.round, *a))
            })
            .collect();
        series.push((f.key.clone(), finite(global), Some(i), true));
        let local = report
            .rounds
            .iter()
            .filter_map(|r| r.accuracy_by_family.get(&f.key).map(|a| (r.round, *a)))
            .collect();
        series.push((format!("{} (local)", f.key), finite(local), Some(i), false));
    }
    let global = report
        .rounds
        .iter()
        .filter_map(|r| r.global_accuracy.map(|a| (r.round, a)))
        .collect();
    series.push(("overall".into(), finite(global), None, true));
    let local = report
        .rounds
        .iter()
        .map(|r| (r.round, r.accuracy))
        .collect();
    series.push(("overall (local)".into(), finite(local), None, false));
    for (name, points, color, global) in series {
        if points.is_empty() {
            continue;
        }
        let color = color.map(|i| COLORS[i % COLORS.len()]).unwrap_or(BLACK);
        // The global model: solid with markers; after local training: thin.
        let style = if global {
            color.stroke_width(2)
        } else {
            color.mix(0.45).stroke_width(1)
        };
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        if global {
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

pub(super) fn plot_bytes(report: &Report, file: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    ensure_font()?;
    let rounds = report.rounds.len().max(1) as u32;
    let (full, lora) = report.reference_bytes();
    let ours: Vec<(u32, f64)> = report
        .rounds
        .iter()
        .filter(|r| r.bytes_uploaded > 0)
        .map(|r| (r.round, r.bytes_uploaded as f64))
        .collect();
    let top = (full.max(lora).max(1) as f64) * 4.0;
    let bottom = ours.iter().map(|p| p.1).fold(top, f64::min) / 4.0;
    let root = BitMapBackend::new(file, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Bytes uploaded per round (all clients)", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(1u32..rounds.max(2), (bottom.max(1.0)..top).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("bytes")
        .y_label_formatter(&|v| human_bytes(*v as u64))
        .draw()
        .map_err(|e| e.to_string())?;
    let lines = [
        ("this run", ours, COLORS[0]),
        (
            "full-model FedAvg",
            vec![(1, full as f64), (rounds.max(2), full as f64)],
            COLORS[3],
        ),
        (
            "LoRA FedAvg (r=8, q/v)",
            vec![(1, lora as f64), (rounds.max(2), lora as f64)],
            COLORS[1],
        ),
    ];
    for (name, points, color) in lines {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::MiddleRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
