//! The learning-rate schedule: linear warm-up, then linear decay to zero
//! (transformers' `get_linear_schedule_with_warmup`).

/// Warm-up steps for a run of `total` optimiser steps: `ceil(ratio × total)` (transformers'
/// `TrainingArguments.get_warmup_steps`).
pub fn warmup_steps(total: usize, warmup_ratio: f64) -> usize {
    (warmup_ratio * total as f64).ceil() as usize
}

/// Multiplier of the peak learning rate at optimiser step `step` (0-based: the first update uses
/// `step = 0`). Rises linearly from 0 over `warmup` steps, then falls linearly to 0 at `total`.
pub fn lr_factor(step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    let decay_len = total.saturating_sub(warmup).max(1) as f64;
    (remaining / decay_len).max(0.0)
}

/// Learning rate at optimiser step `step`, for a peak learning rate `peak`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    peak * lr_factor(step, total, warmup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_rounded_up() {
        assert_eq!(warmup_steps(1000, 0.006), 6);
        assert_eq!(warmup_steps(100, 0.006), 1); // 0.6 → 1
        assert_eq!(warmup_steps(100, 0.0), 0);
    }

    #[test]
    fn warmup_then_linear_decay_to_zero() {
        // total 10, warm-up 4: steps 0..4 give 0, 1/4, 2/4, 3/4; step 4 is the peak;
        // then (10 - s) / 6 down to 0 at step 10.
        let f: Vec<f64> = (0..=10).map(|s| lr_factor(s, 10, 4)).collect();
        let expected = [
            0.0,
            0.25,
            0.5,
            0.75,
            1.0,
            5.0 / 6.0,
            4.0 / 6.0,
            0.5,
            2.0 / 6.0,
            1.0 / 6.0,
            0.0,
        ];
        for (s, (a, e)) in f.iter().zip(expected).enumerate() {
            assert!((a - e).abs() < 1e-12, "step {s}: {a} vs {e}");
        }
        assert!((lr_at(4, 10, 4, 5e-5) - 5e-5).abs() < 1e-18);
        assert_eq!(lr_factor(12, 10, 4), 0.0);
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        assert_eq!(lr_factor(0, 4, 0), 1.0);
        assert_eq!(lr_factor(2, 4, 0), 0.5);
    }
}
