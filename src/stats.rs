//! The statistics every report states: intervals for an accuracy and for a mean over tasks,
//! the paired test between two prompts on the same questions, and medians. Pure functions
//! of counts and numbers; no other module of the crate is imported here.

/// Two-sided 95% normal quantile.
const Z95: f64 = 1.959_963_984_540_054;

/// 95% Wilson score interval for `k` successes in `n` trials.
pub fn wilson_interval(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = k as f64 / n;
    let denom = 1.0 + Z95 * Z95 / n;
    let center = (p + Z95 * Z95 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + Z95 * Z95 / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// Two-sided exact McNemar p-value of `b` questions only one prompt got right against `c`
/// only the other did: twice the Binomial(b + c, 1/2) tail at the smaller count, at most 1.
/// Each term is taken from logs, since 2^-(b+c) underflows for a few thousand questions.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    let mut ln_choose = 0.0;
    let mut tail = 0.0;
    for i in 0..=b.min(c) {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64 / i as f64).ln();
        }
        tail += (ln_choose - n as f64 * std::f64::consts::LN_2).exp();
    }
    (2.0 * tail).min(1.0)
}

/// The mean of `values` (None when empty).
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The mean of `values` (0 when empty) with a 95% normal interval from their spread (None
/// with fewer than two values).
pub fn mean_with_interval(values: &[f64]) -> (f64, Option<(f64, f64)>) {
    let mean = mean(values).unwrap_or(0.0);
    let k = values.len() as f64;
    let interval = (values.len() >= 2).then(|| {
        let var = values.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (k - 1.0);
        let half = Z95 * (var / k).sqrt();
        (mean - half, mean + half)
    });
    (mean, interval)
}

/// The median of `values` (None when empty).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}
