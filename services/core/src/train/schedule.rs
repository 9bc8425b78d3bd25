//! Learning-rate schedules as transformers' `get_scheduler` computes them: linear warmup from 0, then
//! constant, linear decay to 0, or half-cosine decay to 0, over the total number of optimizer steps.

use serde::{Deserialize, Serialize};

/// Shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Constant after warmup.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

/// Learning rate for optimizer step `step` (0-based) of `total`, with `warmup` warmup steps.
pub fn lr_at(kind: ScheduleKind, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / decay_steps;
    match kind {
        ScheduleKind::Constant => base,
        ScheduleKind::Linear => base * ((total.saturating_sub(step)) as f64 / decay_steps).max(0.0),
        ScheduleKind::Cosine => base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers_formulas() {
        // warmup 2 of 10 steps, base 1.0
        let lin: Vec<f64> = (0..10).map(|s| lr_at(ScheduleKind::Linear, 1.0, s, 2, 10)).collect();
        assert_eq!(lin[..3], [0.0, 0.5, 1.0]);
        assert!((lin[6] - 0.5).abs() < 1e-12); // (10-6)/8
        let cos: Vec<f64> = (0..10).map(|s| lr_at(ScheduleKind::Cosine, 1.0, s, 2, 10)).collect();
        assert!((cos[6] - 0.5).abs() < 1e-12); // halfway through decay
        assert!((cos[4] - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-12);
        assert_eq!(lr_at(ScheduleKind::Constant, 2e-4, 7, 2, 10), 2e-4);
        assert_eq!(lr_at(ScheduleKind::Constant, 2e-4, 0, 0, 10), 2e-4);
    }
}
