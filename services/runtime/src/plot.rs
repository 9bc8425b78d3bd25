//! The loss curve of a training run as SVG, drawn from its `metrics.jsonl` (one JSON object per
//! optimizer step with `step`, `loss` and, on evaluation steps, `eval_loss`).

use std::path::Path;

use plotters::prelude::*;

/// (step, value) points of one curve.
pub type Series = Vec<(f64, f64)>;

/// Reads (step, loss) and (step, eval_loss) series from a metrics file.
pub fn read_series(metrics: &Path) -> anyhow::Result<(Series, Series)> {
    let text =
        ferrotune_core::fsx::read_to_string(metrics).map_err(|e| anyhow::anyhow!("{}: {e}", metrics.display()))?;
    let (mut train, mut eval) = (vec![], vec![]);
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", metrics.display(), i + 1))?;
        let Some(step) = v["step"].as_f64() else { continue };
        if let Some(l) = v["loss"].as_f64().filter(|l| l.is_finite()) {
            train.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64().filter(|l| l.is_finite()) {
            eval.push((step, l));
        }
    }
    Ok((train, eval))
}

/// Writes the loss curve of `metrics` to `out` (SVG).
pub fn loss_curve(metrics: &Path, out: &Path, title: &str) -> anyhow::Result<()> {
    let (train, eval) = read_series(metrics)?;
    if train.is_empty() {
        anyhow::bail!("{}: no steps to plot", metrics.display());
    }
    let max_step = train.iter().chain(&eval).map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = train.iter().chain(&eval).fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    ferrotune_core::fsx::checked_for_write(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let root = SVGBackend::new(out, (800, 480)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))?;
        chart.configure_mesh().x_desc("optimizer step").y_desc("loss").draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), &RED))?
                .label("eval loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn plots_train_and_eval_series() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("metrics.jsonl");
        ferrotune_core::fsx::write(
            &m,
            "{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"loss\":2.0,\"eval_loss\":2.2}\n{\"step\":3,\"loss\":1.5}\n",
        )
        .unwrap();
        let (t, e) = super::read_series(&m).unwrap();
        assert_eq!(t, vec![(1.0, 2.5), (2.0, 2.0), (3.0, 1.5)]);
        assert_eq!(e, vec![(2.0, 2.2)]);
        let out = d.path().join("loss.svg");
        super::loss_curve(&m, &out, "t").unwrap();
        let svg = ferrotune_core::fsx::read_to_string(&out).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("eval loss"),
            "{}",
            &svg[..200.min(svg.len())]
        );
        ferrotune_core::fsx::write(&m, "").unwrap();
        assert!(super::loss_curve(&m, &out, "t").is_err());
    }
}
