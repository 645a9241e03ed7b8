//! The maths of the forward pass on tiny random models of every architecture: the one-hot
//! gradient against central finite differences, cached against uncached forwards, the fused
//! generation kernels against the differentiable ones, the few-rows product against plain
//! sums, and batch independence.

use candle_core::{DType, Device, Tensor};
use greater::model::generate::{generate, GenerateConfig, Request};
use greater::model::gradient::{
    cross_entropy, loss_and_gradient, loss_and_gradients, loss_value, OneHotInput,
};
use greater::model::kernels::few_rows;
use greater::model::kernels::packed::PackedWeight;
use greater::model::{Arch, KvCache, Model, Pass};

const ARCHS: [Arch; 5] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma2, Arch::Gemma3];

fn tiny(arch: Arch, dtype: DType) -> Model {
    Model::random(arch.tiny_config(), 7, dtype, &Device::Cpu).unwrap()
}

const IDS: [u32; 12] = [3, 17, 5, 22, 9, 31, 2, 14, 8, 27, 11, 6];

/// Answer-style cross-entropy at T = 0.2 on the last positions plus 0.2 x the NLL of the
/// "prompt" tokens around the one-hot position, as the optimiser builds it.
fn greater_loss(logits: &Tensor) -> anyhow::Result<Tensor> {
    let answer = cross_entropy(&logits.narrow(0, 0, 3)?, &[27, 11, 6], 0.2)?;
    let prompt = cross_entropy(&logits.narrow(0, 3, 2)?, &[9, 31], 1.0)?;
    Ok((answer + (prompt * 0.2)?)?)
}

#[test]
fn onehot_gradient_matches_finite_differences_for_every_architecture() {
    for arch in ARCHS {
        let model = tiny(arch, DType::F64);
        // Positions 0..2 come from a cache computed without gradient tracking.
        let mut prefix = [KvCache::default()];
        let x = model.embed(&IDS[..2]).unwrap().unsqueeze(0).unwrap();
        model.forward(&x, &mut prefix, Pass::Differentiable).unwrap();
        let candidates = [4u32, 9, 13, 21, 30];
        let weights = [0.0f32, 1.0, 0.0, 0.0, 0.0];
        let loss_positions = [8usize, 9, 10, 3, 4];
        let input = |w: &[f32]| -> f64 {
            let inp = OneHotInput {
                prefix: &prefix[0],
                ids: &IDS,
                position: 4,
                candidates: &candidates,
                weights: w,
                loss_positions: &loss_positions,
            };
            loss_value(&model, &inp, greater_loss).unwrap()
        };
        let inp = OneHotInput {
            prefix: &prefix[0],
            ids: &IDS,
            position: 4,
            candidates: &candidates,
            weights: &weights,
            loss_positions: &loss_positions,
        };
        let (loss, grad) = loss_and_gradient(&model, &inp, greater_loss).unwrap();
        assert!((loss - input(&weights)).abs() < 1e-12, "{arch:?}: loss differs between passes");
        let h = 1e-3f32;
        let fd: Vec<f64> = (0..candidates.len())
            .map(|j| {
                let (mut up, mut down) = (weights, weights);
                up[j] += h;
                down[j] -= h;
                (input(&up) - input(&down)) / (2.0 * h as f64)
            })
            .collect();
        let diff: f64 =
            grad.iter().zip(&fd).map(|(g, f)| (*g as f64 - f).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = fd.iter().map(|f| f * f).sum::<f64>().sqrt();
        assert!(norm > 1e-3, "{arch:?}: gradient too small to test ({norm})");
        eprintln!("{arch:?}: |fd| {norm:.3e}, relative error {:.2e}", diff / norm);
        // The weights are f32, so the perturbation h is exact and truncation error is O(h^2).
        assert!(
            diff / norm < 1e-4,
            "{arch:?}: relative error {} (grad {grad:?}, fd {fd:?})",
            diff / norm
        );
    }
}

#[test]
fn batched_gradients_equal_per_example_gradients_for_every_architecture() {
    for arch in ARCHS {
        let model = tiny(arch, DType::F64);
        // Three sequences of different cached and uncached lengths, one-hot positions and
        // candidate sets: one padded pass must give each what it gets alone.
        let prefix_of = |n: usize| {
            let mut cache = [KvCache::default()];
            if n > 0 {
                let x = model.embed(&IDS[..n]).unwrap().unsqueeze(0).unwrap();
                model.forward(&x, &mut cache, Pass::Fast).unwrap();
            }
            cache.into_iter().next().unwrap()
        };
        let prefixes = [prefix_of(2), prefix_of(0), prefix_of(3)];
        let ids: [&[u32]; 3] = [&IDS, &IDS[..7], &IDS[..10]];
        let positions = [4usize, 1, 3];
        let candidates: [&[u32]; 3] = [&[4, 9, 13, 21, 30], &[17, 2], &[22, 5, 8]];
        let weights: [&[f32]; 3] = [&[0.0, 1.0, 0.0, 0.0, 0.0], &[1.0, 0.0], &[0.2, 0.5, 0.3]];
        let loss_positions: [&[usize]; 3] = [&[8, 9, 10, 3, 4], &[4, 5, 6, 0, 1], &[7, 8, 9, 5, 6]];
        let inputs: Vec<OneHotInput> = (0..3)
            .map(|i| OneHotInput {
                prefix: &prefixes[i],
                ids: ids[i],
                position: positions[i],
                candidates: candidates[i],
                weights: weights[i],
                loss_positions: loss_positions[i],
            })
            .collect();
        let batched =
            loss_and_gradients(&model, &inputs, |_, logits| greater_loss(logits)).unwrap();
        for (i, input) in inputs.iter().enumerate() {
            let (loss, grad) = loss_and_gradient(&model, input, greater_loss).unwrap();
            assert!(
                (batched[i].0 - loss).abs() < 1e-12,
                "{arch:?} input {i}: loss {} alone, {} batched",
                loss,
                batched[i].0
            );
            assert_eq!(batched[i].1.len(), grad.len());
            let norm = grad.iter().map(|g| g * g).sum::<f32>().sqrt();
            assert!(norm > 1e-4, "{arch:?} input {i}: gradient too small to compare ({norm})");
            for (b, a) in batched[i].1.iter().zip(&grad) {
                assert!(
                    (b - a).abs() <= 1e-6 * norm,
                    "{arch:?} input {i}: {:?} batched, {grad:?} alone",
                    batched[i].1
                );
            }
        }
    }
}

/// Logits at every position of IDS, in one pass or token by token through the cache.
fn logits_all(model: &Model, pass: Pass, incremental: bool) -> Vec<Vec<f32>> {
    let mut cache = [KvCache::default()];
    let hidden = if incremental {
        let rows: Vec<Tensor> = IDS
            .iter()
            .map(|&t| {
                model
                    .forward(&model.embed(&[t]).unwrap().unsqueeze(0).unwrap(), &mut cache, pass)
                    .unwrap()
            })
            .collect();
        Tensor::cat(&rows, 1).unwrap()
    } else {
        model.forward(&model.embed(&IDS).unwrap().unsqueeze(0).unwrap(), &mut cache, pass).unwrap()
    };
    let logits = model.logits(&hidden.squeeze(0).unwrap()).unwrap();
    logits.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn cached_fused_and_differentiable_forwards_agree() {
    for arch in ARCHS {
        let model = tiny(arch, DType::F32);
        let reference = logits_all(&model, Pass::Differentiable, false);
        for (pass, incremental) in
            [(Pass::Fast, false), (Pass::Fast, true), (Pass::Differentiable, true)]
        {
            let other = logits_all(&model, pass, incremental);
            let d = max_abs_diff(&reference, &other);
            assert!(d < 1e-4, "{arch:?} {pass:?} incremental={incremental}: max |diff| {d}");
        }
    }
}

#[test]
fn a_prompt_decodes_the_same_alone_and_in_a_batch() {
    for arch in ARCHS {
        let model = tiny(arch, DType::F32);
        let cfg = GenerateConfig { max_tokens: 10, ..Default::default() };
        let prompts: Vec<Vec<u32>> = vec![IDS[..5].to_vec(), IDS.to_vec(), IDS[3..6].to_vec()];
        let req = |p: &Vec<u32>| Request { prefix: KvCache::default(), ids: p.clone() };
        let batched = generate(&model, prompts.iter().map(req).collect(), &cfg).unwrap();
        for (p, b) in prompts.iter().zip(&batched) {
            let alone = generate(&model, vec![req(p)], &cfg).unwrap();
            assert_eq!(alone[0], *b, "{arch:?}");
            assert_eq!(b.ids.len(), 10);
        }
    }
}

#[test]
fn generation_stops_at_a_stop_token_and_continues_a_prefix() {
    let model = tiny(Arch::Qwen2, DType::F32);
    let free = GenerateConfig { max_tokens: 6, ..Default::default() };
    let full =
        generate(&model, vec![Request { prefix: KvCache::default(), ids: IDS.to_vec() }], &free)
            .unwrap();
    // Stopping at the third generated token returns the two before it.
    let stop = GenerateConfig { stop_ids: vec![full[0].ids[2]], ..free.clone() };
    let stopped =
        generate(&model, vec![Request { prefix: KvCache::default(), ids: IDS.to_vec() }], &stop)
            .unwrap();
    let first_stop = full[0].ids.iter().position(|&t| t == full[0].ids[2]).unwrap();
    assert_eq!(stopped[0].ids, full[0].ids[..first_stop]);
    assert_eq!(stopped[0].stop, greater::model::generate::StopReason::StopToken);
    // A cached prefix continued with the rest of the prompt gives the same tokens.
    let mut prefix = [KvCache::default()];
    model
        .forward(&model.embed(&IDS[..7]).unwrap().unsqueeze(0).unwrap(), &mut prefix, Pass::Fast)
        .unwrap();
    let [prefix] = prefix;
    let cont = generate(&model, vec![Request { prefix, ids: IDS[7..].to_vec() }], &free).unwrap();
    assert_eq!(cont[0].ids, full[0].ids);
}

#[test]
fn top_p_sampling_keeps_the_smallest_nucleus() {
    use greater::model::generate::sample_top_p;
    let probs = [0.1f32, 0.5, 0.3, 0.1];
    // top_p 0.7 keeps tokens 1 and 2 (mass 0.8); u scans them in order of probability.
    assert_eq!(sample_top_p(&probs, 0.7, 0.0), 1);
    assert_eq!(sample_top_p(&probs, 0.7, 0.6), 1);
    assert_eq!(sample_top_p(&probs, 0.7, 0.63), 2);
    assert_eq!(sample_top_p(&probs, 0.7, 0.999), 2);
    assert_eq!(sample_top_p(&probs, 1.0, 0.95), 3);
}

#[test]
fn few_rows_product_equals_plain_sums_and_each_row_alone() {
    if !few_rows::available() {
        eprintln!("no AVX-512 here: the few-rows product is not used");
        return;
    }
    // Shapes around the tile sizes (4 x rows, 4 weight rows, 16 lanes, 32-row tasks).
    for (m, k, n) in [(1, 1, 1), (5, 15, 3), (7, 16, 33), (4, 17, 70), (13, 100, 5), (64, 576, 131)]
    {
        let value =
            |i: usize, salt: usize| (((i * 7919 + salt * 104729) % 1000) as f32 / 500.0) - 1.0;
        let x: Vec<f32> = (0..m * k).map(|i| value(i, 1)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| value(i, 2)).collect();
        let y = few_rows::matmul(&x, &w, m, k, n);
        for i in 0..m {
            let alone = few_rows::matmul(&x[i * k..(i + 1) * k], &w, 1, k, n);
            assert_eq!(alone, y[i * n..(i + 1) * n], "row {i} of {m}x{k}x{n} differs alone");
            for j in 0..n {
                let exact: f64 = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum();
                let got = y[i * n + j] as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                    "{m}x{k}x{n} at ({i},{j}): {got} vs {exact}"
                );
            }
        }
    }
}

#[test]
fn packed_weights_give_back_candles_dequantised_weights_and_the_same_products_bit_for_bit() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let (n, k) = (37, 512);
    let value = |i: usize| (((i * 7919) % 1000) as f32 / 250.0) - 2.0;
    let w = Tensor::from_vec((0..n * k).map(value).collect::<Vec<f32>>(), (n, k), &Device::Cpu)
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
        let candle: Vec<f32> =
            q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let packed = PackedWeight::from_ggml(dtype, n, k, &q.data().unwrap())
            .unwrap()
            .expect("format kept packed");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(
            bits(&packed.to_f32()),
            bits(&candle),
            "{dtype:?}: weights differ from candle's"
        );
        if !few_rows::available() {
            continue;
        }
        for m in [1, 3, 4, 9, 16, 60] {
            let x: Vec<f32> = (0..m * k).map(|i| value(i + 13)).collect();
            let plain = few_rows::matmul(&x, &candle, m, k, n);
            assert_eq!(
                bits(&few_rows::matmul_packed(&x, &packed, m)),
                bits(&plain),
                "{dtype:?}, {m} rows"
            );
        }
    }
    let f32_weight = QTensor::quantize(&w, GgmlDType::F32).unwrap();
    assert!(PackedWeight::from_ggml(GgmlDType::F32, n, k, &f32_weight.data().unwrap())
        .unwrap()
        .is_none());
    let err = PackedWeight::from_ggml(GgmlDType::Q8_0, n, k, &[0u8; 10])
        .err()
        .expect("short data is an error");
    assert!(err.to_string().contains("do not hold its blocks"), "{err}");
}

#[test]
fn the_mixed_gradient_pass_stays_near_f32_and_runs_in_bf16_only_where_the_cpu_has_it() {
    use greater::model::kernels::bf16;
    use greater::model::weights::WeightSource;
    use greater::model::{transformer::random_weights, ModelConfig, Precision};
    for arch in ARCHS {
        let cfg = ModelConfig { max_position: 128, ..arch.tiny_config() };
        let load = |precision| {
            let weights = random_weights(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
            Model::load(
                &WeightSource::Map(weights),
                cfg.clone(),
                DType::F32,
                &Device::Cpu,
                precision,
            )
            .unwrap()
        };
        // Enough positions for the products to take the bf16 path (64 rows and more).
        let ids: Vec<u32> = IDS.iter().cycle().take(96).copied().collect();
        let candidates = [4u32, 9, 13, 21, 30];
        let weights = [0.0f32, 1.0, 0.0, 0.0, 0.0];
        let loss_positions: Vec<usize> = (80..95).collect();
        let inp = OneHotInput {
            prefix: &KvCache::default(),
            ids: &ids,
            position: 40,
            candidates: &candidates,
            weights: &weights,
            loss_positions: &loss_positions,
        };
        let targets: Vec<u32> = ids[81..96].to_vec();
        let loss = |l: &Tensor| cross_entropy(l, &targets, 0.2);
        let (l32, g32) = loss_and_gradient(&load(Precision::F32), &inp, loss).unwrap();
        let (lmx, gmx) = loss_and_gradient(&load(Precision::Mixed), &inp, loss).unwrap();
        let diff: f64 =
            g32.iter().zip(&gmx).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = g32.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        eprintln!(
            "{arch:?}: loss {l32:.6} / {lmx:.6}, gradient relative difference {:.2e}",
            diff / norm
        );
        // bf16 keeps 8 bits of each product's inputs; through the layers of these random
        // models the one-hot gradient moves by a few percent (Gemma, with its extra norms, the most).
        assert!(
            (l32 - lmx).abs() <= 0.01 * l32.abs() && diff <= 0.15 * norm,
            "{arch:?}: {g32:?} vs {gmx:?}"
        );
        // Without AVX512-BF16 the mixed gradient pass is the f32 one.
        assert_eq!(g32 == gmx, !bf16::available(), "{arch:?}");
    }
}

#[test]
fn generation_at_the_end_of_the_context_keeps_what_it_made() {
    use greater::model::generate::StopReason;
    let cfg = greater::model::ModelConfig { max_position: 12, ..Arch::Llama.tiny_config() };
    let model = Model::random(cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let request = || Request { prefix: Default::default(), ids: vec![1, 2, 3, 4, 5] };
    let gen = |max_tokens| GenerateConfig { max_tokens, ..Default::default() };
    let full = generate(&model, vec![request()], &gen(100)).unwrap();
    // 5 prompt tokens and 7 made fill the 12 positions; the 8th is kept, never fed.
    assert_eq!(full[0].stop, StopReason::ContextLimit);
    assert_eq!(full[0].ids.len(), 8);
    // The same tokens as a run whose budget ends there.
    let budget = generate(&model, vec![request()], &gen(8)).unwrap();
    assert_eq!((budget[0].stop.clone(), &budget[0].ids), (StopReason::Budget, &full[0].ids));
}
