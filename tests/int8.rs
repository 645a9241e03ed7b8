//! The `mixed` and `mixed16` precisions' integer product: every kernel the CPU has (and the
//! scalar one) against a plain scalar computation of the same quantised arithmetic, bit for
//! bit, with 8- and 16-bit inputs, on the block integers of every GGUF format kept packed;
//! the dispatch; the error against f32.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use greater::model::kernels::int8::{self, InputBits, Int8Weight, Kernel};
use greater::model::kernels::isa::{self, Features, Isa};
use greater::model::kernels::packed::PackedWeight;

/// One block of a row of x as the kernels see it: the scale d = max|x| / 127 (16 bits:
/// / 16256) and the integers round(x / d).
fn quantised(xs: &[f32], bits: InputBits) -> (f32, Vec<i32>) {
    let top = match bits {
        InputBits::Eight => 127.0,
        InputBits::Sixteen => 16256.0,
    };
    let d = xs.iter().fold(0f32, |a, v| a.max(v.abs())) / top;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    (d, xs.iter().map(|v| (v * inv).round() as i32).collect())
}

/// y = x · w^T the obvious way: each row of x quantised per block ([`quantised`]), each
/// block's integer products summed exactly, then scaled and summed over blocks.
fn reference(x: &[f32], w: &PackedWeight, bits: InputBits) -> Vec<f32> {
    let (n, k, b) = (w.n, w.k, w.block);
    let (m, blocks) = (x.len() / k, k / b);
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let mut acc = 0f32;
            for blk in 0..blocks {
                let (d, qx) = quantised(&x[r * k + blk * b..][..b], bits);
                let qw = &w.q[c * k + blk * b..][..b];
                let dot: i32 = qw.iter().zip(&qx).map(|(&a, &b)| a as i32 * b).sum();
                acc = (dot as f32 * w.scale[c * blocks + blk]).mul_add(d, acc);
                if let Some(off) = &w.offset {
                    let sum: i32 = qx.iter().sum();
                    acc = off[c * blocks + blk].mul_add(d * sum as f32, acc);
                }
            }
            y[r * n + c] = acc;
        }
    }
    y
}

fn value(i: usize, salt: usize) -> f32 {
    (((i * 7919 + salt * 104729) % 1000) as f32 / 250.0) - 2.0
}

/// Kernels this CPU runs: always the scalar one, and each SIMD one it supports and
/// `GREATER_ISA` allows.
fn kernels() -> Vec<Kernel> {
    let f = isa::features();
    let mut ks = vec![Kernel::Scalar];
    if f.avx2 {
        ks.push(Kernel::Avx2);
    }
    if f.avx512_vnni {
        ks.push(Kernel::Avx512Vnni);
    }
    ks
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every kernel equals `reference` bit for bit with 8- and 16-bit inputs, for batches of 1
/// to 9 rows (one with a block of zeros), and each row alone gives the same bits as in the
/// batch; with the weight's groups as stored and as loading lays them out for the kernels
/// that read bytes.
fn check(packed: &PackedWeight, what: &str) {
    let stored = Int8Weight::from_packed(packed);
    let laid = Int8Weight::from_packed(packed).for_kernel(Kernel::Avx2);
    for (w, layout) in [(&stored, "as stored"), (&laid, "laid out for bytes")] {
        check_layout(packed, w, &format!("{what} {layout}"));
    }
}

fn check_layout(packed: &PackedWeight, w: &Int8Weight, what: &str) {
    let k = packed.k;
    for m in [1, 2, 3, 4, 5, 9] {
        let mut x: Vec<f32> = (0..m * k).map(|i| value(i, m) * (1 + i % 5) as f32).collect();
        x[..packed.block].fill(0.0);
        for input in [InputBits::Eight, InputBits::Sixteen] {
            let want = reference(&x, packed, input);
            for kernel in kernels() {
                let got = int8::matmul_with(kernel, &x, w, input);
                assert_eq!(bits(&got), bits(&want), "{what}, {m} rows, {kernel:?}, {input:?}");
                let last = &x[(m - 1) * k..];
                assert_eq!(
                    bits(&int8::matmul_with(kernel, last, w, input)),
                    bits(&want[(m - 1) * packed.n..]),
                    "{what} row alone, {input:?}"
                );
            }
        }
    }
}

#[test]
fn every_kernel_equals_the_plain_quantised_sums_on_every_gguf_format() {
    let k = 512;
    for n in [1, 15, 16, 17, 37] {
        let w = Tensor::from_vec(
            (0..n * k).map(|i| value(i, 7)).collect::<Vec<f32>>(),
            (n, k),
            &Device::Cpu,
        )
        .unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let packed = PackedWeight::from_ggml(dtype, n, k, &q.data().unwrap()).unwrap().unwrap();
            check(&packed, &format!("{dtype:?} [{n}, {k}]"));
        }
    }
}

#[test]
fn every_kernel_equals_the_plain_sums_over_any_range_of_integers() {
    // Integers over the whole byte (a Q8_0 file may hold -128) and ranges stored in 5 and 4
    // bits that start anywhere, blocks of 16 and 32, with and without offsets, k not a
    // multiple of the 64-byte vector.
    for (lo, span) in [(-128, 256), (-20, 32), (-3, 16), (0, 16)] {
        for (block, k, with_offset) in
            [(32, 32, false), (32, 96, true), (16, 48, false), (16, 80, true)]
        {
            let n = 19;
            let q: Vec<i8> =
                (0..n * k).map(|i| (lo + ((i * 7919 + 31) % span) as i32) as i8).collect();
            let scale: Vec<f32> = (0..n * k / block).map(|i| value(i, 3) * 0.01).collect();
            let offset = with_offset.then(|| (0..n * k / block).map(|i| value(i, 4)).collect());
            let packed = PackedWeight { n, k, block, q, scale, offset };
            check(
                &packed,
                &format!(
                    "integers {lo}..{}, block {block}, k {k}, offset {with_offset}",
                    lo + span as i32
                ),
            );
        }
    }
}

#[test]
fn f32_weights_are_quantised_to_8_bit_blocks_of_32() {
    let (n, k) = (21, 64);
    let w: Vec<f32> = (0..n * k).map(|i| value(i, 9) * (1 + i % 7) as f32).collect();
    // Each block of 32 as GGUF's Q8_0 rounds it, with the scale kept in f32.
    let (mut q, mut scale) = (Vec::new(), Vec::new());
    for block in w.chunks(32) {
        let d = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
        q.extend(block.iter().map(|v| (v * (1.0 / d)).round() as i8));
        scale.push(d);
    }
    let packed = PackedWeight { n, k, block: 32, q, scale, offset: None };
    let x: Vec<f32> = (0..3 * k).map(|i| value(i, 5)).collect();
    assert_eq!(
        bits(&int8::matmul(&x, &Int8Weight::quantize(&w, n, k), InputBits::Eight)),
        bits(&reference(&x, &packed, InputBits::Eight))
    );
    assert!(Int8Weight::fits(64) && !Int8Weight::fits(48));
}

#[test]
fn the_integer_product_is_within_a_percent_of_f32_and_16_bit_inputs_far_closer() {
    let (m, n, k) = (4, 64, 896);
    let w: Vec<f32> = (0..n * k).map(|i| value(i, 11)).collect();
    let x: Vec<f32> = (0..m * k).map(|i| value(i, 12) * (1 + i % 3) as f32).collect();
    let q = Int8Weight::quantize(&w, n, k);
    // Against the same quantised weight in f64: what the input's rounding alone costs.
    let mut wq = Vec::new();
    for block in w.chunks(32) {
        let d = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
        wq.extend(block.iter().map(|v| (v * (1.0 / d)).round() as f64 * d as f64));
    }
    let exact: Vec<f64> = (0..m * n)
        .map(|o| (0..k).map(|j| x[o / n * k + j] as f64 * wq[o % n * k + j]).sum())
        .collect();
    let norm = exact.iter().map(|v| v * v).sum::<f64>().sqrt();
    let error = |bits| {
        let y = int8::matmul(&x, &q, bits);
        y.iter().zip(&exact).map(|(&a, b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt() / norm
    };
    let (e8, e16) = (error(InputBits::Eight), error(InputBits::Sixteen));
    assert!(e8 <= 0.01, "8-bit inputs: relative error {e8}");
    assert!(e16 <= 1e-4 && e16 * 50.0 <= e8, "16-bit inputs: relative error {e16} (8-bit {e8})");
}

#[test]
fn dispatch_falls_back_when_a_feature_is_masked_off() {
    let all = Features { avx2: true, avx512: true, avx512_vnni: true, avx512_bf16: true };
    assert_eq!(Kernel::choose(all), Kernel::Avx512Vnni);
    assert_eq!(Kernel::choose(Features { avx512_vnni: false, ..all }), Kernel::Avx2);
    assert_eq!(Kernel::choose(Features::default()), Kernel::Scalar);
    // GREATER_ISA's cap lowers every path at or above it and nothing below.
    assert_eq!(Kernel::choose(all.capped(Isa::Avx2)), Kernel::Avx2);
    assert_eq!(Kernel::choose(all.capped(Isa::Scalar)), Kernel::Scalar);
    assert_eq!(all.capped(Isa::Avx512), all);
    assert_eq!(
        all.capped(Isa::Avx2),
        Features { avx2: true, avx512: false, avx512_vnni: false, avx512_bf16: false }
    );
    let cpu = Features { avx2: true, ..Features::default() };
    assert_eq!(cpu.capped(Isa::Avx512), cpu, "a cap never adds what the CPU lacks");
    let capped = match std::env::var(isa::ENV) {
        Ok(v) => Features::of_cpu().capped(v.parse().unwrap()),
        Err(_) => Features::of_cpu(),
    };
    assert_eq!(isa::features(), capped);
    assert_eq!(Kernel::best(), Kernel::choose(capped));
    assert_eq!(
        "avx512f".parse::<Isa>().unwrap_err(),
        "GREATER_ISA=\"avx512f\" is not one of scalar, avx2, avx512"
    );
}

/// The index of the first largest value, as candle's argmax takes it.
fn candle_argmax(y: &[f32], n: usize) -> Vec<u32> {
    Tensor::from_vec(y.to_vec(), (y.len() / n, n), &Device::Cpu)
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

/// A value in [-1, 1) that does not follow `i` (splitmix64's mixing).
fn noise(i: usize, salt: u64) -> f32 {
    let mut z = (i as u64).wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

#[test]
fn the_screened_argmax_is_the_argmax_of_the_16_bit_product_on_near_ties() {
    // Many unrelated rows, so that each row of x has columns within the 8-bit inputs'
    // rounding of its best one, and copies of rows further down (equal results: the first
    // must win).
    let (rows, copies, k, m) = (1500, 100, 256, 200);
    let n = rows + copies;
    let mut w: Vec<f32> = (0..rows * k).map(|i| noise(i, 1)).collect();
    w.extend_from_within(..copies * k);
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let mut x: Vec<f32> = (0..m * k).map(|i| noise(i, 2)).collect();
    // One row with an outlier block, as the hidden states of real models have.
    x[k..k + 8].iter_mut().for_each(|v| *v *= 40.0);
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q6K] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let packed = PackedWeight::from_ggml(dtype, n, k, &q.data().unwrap()).unwrap().unwrap();
        let weight = Int8Weight::from_packed(&packed);
        let want = candle_argmax(&int8::matmul(&x, &weight, InputBits::Sixteen), n);
        let eight = candle_argmax(&int8::matmul(&x, &weight, InputBits::Eight), n);
        assert_eq!(int8::argmax_sixteen(&x, &weight), want, "{dtype:?}");
        assert!(eight != want, "{dtype:?}: no row where 8-bit inputs pick another column");
        assert!(want.iter().any(|&c| c < copies as u32), "{dtype:?}: no tie to break");
    }
}

#[test]
fn the_screened_argmax_takes_the_full_product_when_an_input_is_not_finite() {
    let (n, k) = (50, 64);
    let w: Vec<f32> = (0..n * k).map(|i| value(i, 19)).collect();
    let weight = Int8Weight::quantize(&w, n, k);
    let mut x: Vec<f32> = (0..2 * k).map(|i| value(i, 23)).collect();
    x[k + 5] = f32::NAN;
    let want = candle_argmax(&int8::matmul(&x, &weight, InputBits::Sixteen), n);
    assert_eq!(int8::argmax_sixteen(&x, &weight), want);
}
