//! Dynamic loss scaling for f16 compute, with the defaults of `torch.amp.GradScaler` (the seed's
//! `fp16=True`): the loss is multiplied by 2^k before the backward pass so that small f16 gradients do not
//! flush to zero; gradients are divided by it again before clipping; a step whose gradients overflowed is
//! skipped and k decreases by one; after 2000 good steps in a row k increases by one. k lives in the
//! checkpointed [`super::Position`], so a resumed run scales exactly as an uninterrupted one.

/// GradScaler's `init_scale` = 2^16.
pub const INIT_LOG2: i32 = 16;
/// GradScaler's `growth_interval`.
pub const GROWTH_INTERVAL: u64 = 2000;

/// Scale state: log2 of the scale and good steps since the last change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossScale {
    /// The scale is 2^log2.
    pub log2: i32,
    /// Consecutive steps with finite gradients.
    pub good_steps: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        Self { log2: INIT_LOG2, good_steps: 0 }
    }
}

impl LossScale {
    /// The multiplier.
    pub fn scale(&self) -> f64 {
        2f64.powi(self.log2)
    }

    /// After a step: `finite` says whether its gradients were. Returns whether the optimizer may step.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps == GROWTH_INTERVAL {
                self.log2 += 1;
                self.good_steps = 0;
            }
        } else {
            // backoff_factor 0.5; never below 1 (2^0) so that a genuinely infinite loss still surfaces.
            self.log2 = (self.log2 - 1).max(0);
            self.good_steps = 0;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_the_interval() {
        let mut s = LossScale::default();
        assert_eq!(s.scale(), 65536.0);
        assert!(!s.update(false));
        assert_eq!((s.log2, s.good_steps), (15, 0));
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.log2, 15);
        s.update(true);
        assert_eq!((s.log2, s.good_steps), (16, 0));
        // An overflow resets the run of good steps.
        for _ in 0..10 {
            s.update(true);
        }
        s.update(false);
        assert_eq!((s.log2, s.good_steps), (15, 0));
        let mut low = LossScale { log2: 0, good_steps: 0 };
        low.update(false);
        assert_eq!(low.log2, 0);
    }
}
