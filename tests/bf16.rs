//! The gradient pass's bf16 product (mixed precision) against f64 sums of the f32 inputs:
//! each input is rounded to bf16 once (relative error at most 2^-9), so a product is off by at
//! most about 2^-8 of the sum of |a| |w| over the summed dimension, plus f32 rounding.

use greater::model::kernels::bf16::{self, Right};

fn value(i: usize, salt: usize) -> f32 {
    (((i * 7919 + salt * 104729) % 2000) as f32 / 1000.0) - 1.0
}

#[test]
fn bf16_products_are_within_the_rounding_bound_of_f64_sums_in_both_orientations() {
    if !bf16::available() {
        eprintln!("SKIPPED: no AVX512-BF16 on this CPU; the gradient pass stays f32 here");
        return;
    }
    // Rows around the 6-row tile, columns around the 32-column panel, odd summed lengths.
    for (m, k, n) in [(1, 1, 1), (5, 7, 3), (6, 64, 32), (7, 33, 35), (13, 896, 70), (400, 130, 64)]
    {
        let a: Vec<f32> = (0..m * k).map(|i| value(i, 1) * (1 + i % 3) as f32).collect();
        let w: Vec<f32> = (0..n * k).map(|i| value(i, 2)).collect(); // [n, k]
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // [k, n]
        let transposed = bf16::matmul(&a, k, &w, n, k, Right::Transposed);
        let plain = bf16::matmul(&a, k, &wt, k, n, Right::Plain);
        // The same pairs summed in the same order: the same bits.
        assert_eq!(
            transposed.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{m}x{k}x{n}"
        );
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|c| a[i * k + c] as f64 * w[j * k + c] as f64).sum();
                let scale: f64 =
                    (0..k).map(|c| (a[i * k + c] as f64 * w[j * k + c] as f64).abs()).sum();
                let got = transposed[i * n + j] as f64;
                let bound = scale * (2f64.powi(-8) + k as f64 * 2f64.powi(-23)) + 1e-30;
                assert!(
                    (got - exact).abs() <= bound,
                    "{m}x{k}x{n} at ({i},{j}): {got} vs {exact}, bound {bound}"
                );
            }
        }
    }
}
