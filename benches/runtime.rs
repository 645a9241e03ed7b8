//! Runtime speed on the real models: greedy decoding at batch 1, 8 and 32 and prefill of a
//! 300-token prompt, in f32 and in the mixed precision (integer dot products), the greedy
//! choice of the next token from the vocabulary head, and forward+backward of the one-hot
//! gradient over 400 tokens.
//! Baselines measured in the same run: candle-transformers' quantised model decoding the
//! same prompt, our own forward pass without the backward, and the machine's ceiling: the
//! GFLOP/s of one large f32 matrix product of the model's FFN shape, against which the
//! forward and the gradient pass's matrix products are put, and the few-row product of
//! decoding at a checking batch.
//!
//!     cargo bench --bench runtime                 # smollm2-135m and qwen2.5-coder-0.5b
//!     cargo bench --bench runtime -- smollm2-135m

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use greater::model::generate::{generate, prefill, run_all, GenerateConfig, Request};
use greater::model::gradient::{cross_entropy, loss_and_gradient, OneHotInput};
use greater::model::Precision;
use greater::model::{KvCache, ModelConfig, Pass};
use greater::runtime::{LanguageModel, OpenOptions};

const NEW_TOKENS: usize = 64;
const TEXT: &str = "Alice, Bob and Claire are playing a game. At the start of the game, they are each \
holding a ball: Alice has a red ball, Bob has a blue ball, and Claire has a green ball. As the game \
progresses, pairs of players trade balls. First, Alice and Bob swap balls. Then, Bob and Claire swap \
balls. Finally, Alice and Claire swap balls. At the end of the game, which ball does Bob have? ";

fn seconds<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

/// Ids of TEXT repeated until `n` tokens.
fn long_ids(lm: &LanguageModel, n: usize) -> Vec<u32> {
    let ids = lm.tokenizer.encode(&TEXT.repeat(n / 60 + 2), false).unwrap();
    ids[..n].to_vec()
}

fn quantized_baseline_decode(lm: &LanguageModel, prompt: &[u32]) -> f64 {
    use candle_transformers::models::{quantized_llama, quantized_qwen2};
    let mut file = std::fs::File::open(&lm.path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let arch = content.metadata["general.architecture"].to_string().unwrap().clone();
    type Forward = Box<dyn FnMut(&Tensor, usize) -> Tensor>;
    let mut step: Forward = match arch.as_str() {
        "llama" => {
            let mut m =
                quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
            Box::new(move |x, p| m.forward(x, p).unwrap())
        }
        "qwen2" => {
            let mut m =
                quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
            Box::new(move |x, p| m.forward(x, p).unwrap())
        }
        other => panic!("no baseline for {other}"),
    };
    let x = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut next = step(&x, 0).squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
    let (secs, _) = seconds(|| {
        for i in 0..NEW_TOKENS {
            let x = Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            next = step(&x, prompt.len() + i)
                .squeeze(0)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
        }
    });
    NEW_TOKENS as f64 / secs
}

/// Multiply-adds x 2 of one token through every layer's matrix products (no logits).
fn flops_per_token(cfg: &ModelConfig) -> f64 {
    let (d, q, kv) = (cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    let per_layer = 2 * d * q + 2 * d * kv + 3 * d * cfg.intermediate_size;
    2.0 * (cfg.n_layers * per_layer) as f64
}

/// GFLOP/s of `x` [400, hidden] times the up projection's transpose [hidden, intermediate],
/// the best of three after a warm-up: what gemm reaches on this machine at the gradient
/// pass's shape in f32, and our bf16 product (None without AVX512-BF16).
fn gemm_ceiling(cfg: &ModelConfig) -> (f64, Option<f64>) {
    use greater::model::kernels::bf16::{self, Right};
    let (n, d, f) = (400, cfg.hidden_size, cfg.intermediate_size);
    let x = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1.0, (f, d), &Device::Cpu).unwrap();
    let rate = |product: &dyn Fn()| {
        product();
        let best = (0..3).map(|_| seconds(product).0).fold(f64::INFINITY, f64::min);
        2.0 * (n * d * f) as f64 / best / 1e9
    };
    let f32_rate = rate(&|| drop(x.matmul(&w.t().unwrap()).unwrap()));
    let (xv, wv) = (
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let bf16_rate = bf16::available()
        .then(|| rate(&|| drop(bf16::matmul(&xv, d, &wv, f, d, Right::Transposed))));
    (f32_rate, bf16_rate)
}

/// GFLOP/s of the products that decoding runs at `m` rows (1: batch 1; 60: a checking batch
/// of 3 prompts x 20 examples) over a Q8_0 weight of the up projection's shape: the f32
/// few-row product over its packed integers, and the integer product with 8- and 16-bit
/// inputs (`mixed`, `mixed16`);
/// the best of three rounds of 20.
fn decode_product_rates(cfg: &ModelConfig, m: usize) -> (f64, f64, f64) {
    use candle_core::quantized::{GgmlDType, QTensor};
    use greater::model::kernels::{few_rows, int8, packed::PackedWeight};
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let w = Tensor::randn(0f32, 1.0, (f, d), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let packed =
        PackedWeight::from_ggml(GgmlDType::Q8_0, f, d, &q.data().unwrap()).unwrap().unwrap();
    let ints = int8::Int8Weight::from_packed(&packed);
    let x: Vec<f32> = (0..m * d).map(|i| (i % 97) as f32 / 97.0).collect();
    let rate = |product: &dyn Fn() -> Vec<f32>| {
        product(); // warm-up
        let round = || seconds(|| (0..20).for_each(|_| drop(product()))).0 / 20.0;
        let best = (0..3).map(|_| round()).fold(f64::INFINITY, f64::min);
        2.0 * (m * d * f) as f64 / best / 1e9
    };
    (
        rate(&|| few_rows::matmul_packed(&x, &packed, m)),
        rate(&|| int8::matmul(&x, &ints, int8::InputBits::Eight)),
        rate(&|| int8::matmul(&x, &ints, int8::InputBits::Sixteen)),
    )
}

/// GFLOP/s of the integer product with 16-bit inputs at batch 1 over a weight of the up
/// projection's shape in `dtype`, with its groups as stored (4 or 5 bits, unpacked in every
/// product) and as loading lays them out for this CPU's kernel
/// ([`int8::Int8Weight::for_kernel`]); the best of three rounds of 10.
fn int8_layout_rates(cfg: &ModelConfig, dtype: candle_core::quantized::GgmlDType) -> (f64, f64) {
    use candle_core::quantized::QTensor;
    use greater::model::kernels::{int8, packed::PackedWeight};
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let w = Tensor::randn(0f32, 1.0, (f, d), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let packed = PackedWeight::from_ggml(dtype, f, d, &q.data().unwrap()).unwrap().unwrap();
    let stored = int8::Int8Weight::from_packed(&packed);
    let laid = int8::Int8Weight::from_packed(&packed).for_kernel(int8::Kernel::best());
    let x: Vec<f32> = (0..d).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect();
    let product = |w: &int8::Int8Weight| int8::matmul(&x, w, int8::InputBits::Sixteen);
    assert_eq!(product(&stored), product(&laid), "the layouts give different products");
    let rate = |w: &int8::Int8Weight| {
        let round = || seconds(|| (0..10).for_each(|_| drop(product(w)))).0 / 10.0;
        let best = (0..3).map(|_| round()).fold(f64::INFINITY, f64::min);
        2.0 * (d * f) as f64 / best / 1e9
    };
    (rate(&stored), rate(&laid))
}

/// Seconds of `lm`'s next-token choice for `m` rows of real final hidden states (the last
/// four positions of the prompts' prefills): the vocabulary head's full product and its
/// argmax, against `Model::greedy_tokens` (which must give the same tokens); the best of
/// five after a warm-up.
fn greedy_choice_seconds(lm: &LanguageModel, prompts: &[Vec<u32>], m: usize) -> (f64, f64) {
    let reqs = prompts.iter().map(|p| Request { prefix: KvCache::default(), ids: p.clone() });
    let states: Vec<Tensor> = run_all(&lm.model, reqs.collect())
        .unwrap()
        .into_iter()
        .flat_map(|(_, h)| {
            let len = h.dim(0).unwrap();
            (len - 4..len).map(move |i| h.narrow(0, i, 1).unwrap())
        })
        .take(m)
        .collect();
    let hidden = Tensor::cat(&states, 0).unwrap();
    let full = || lm.model.logits(&hidden).unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let screened = || lm.model.greedy_tokens(&hidden).unwrap();
    assert_eq!(full(), screened(), "the screened choice differs from the full head's");
    let best =
        |f: &dyn Fn() -> Vec<u32>| (0..5).map(|_| seconds(f).0).fold(f64::INFINITY, f64::min);
    (best(&full), best(&screened))
}

/// Greedy decoding tokens/s at batch 1, 8 and 32 (prefill subtracted), and the seconds of a
/// 300-token prefill.
fn decode_and_prefill(lm: &LanguageModel, prompts: &[Vec<u32>]) -> (Vec<(usize, f64)>, f64) {
    let cfg = GenerateConfig { max_tokens: NEW_TOKENS, ..Default::default() };
    let req = |p: &Vec<u32>| Request { prefix: KvCache::default(), ids: p.clone() };
    let mut rates = Vec::new();
    for batch in [1usize, 8, 32] {
        let reqs: Vec<Request> = prompts[..batch].iter().map(req).collect();
        // Prefill is timed separately below; subtract it by timing a 1-token run.
        let one = GenerateConfig { max_tokens: 1, ..cfg.clone() };
        let (t_prefill, _) = seconds(|| generate(&lm.model, reqs.clone(), &one).unwrap());
        let (t_all, out) = seconds(|| generate(&lm.model, reqs, &cfg).unwrap());
        let tokens: usize = out.iter().map(|g| g.ids.len() - 1).sum();
        rates.push((batch, tokens as f64 / (t_all - t_prefill)));
    }
    let ids = long_ids(lm, 300);
    prefill(&lm.model, KvCache::default(), &ids[..16]).unwrap(); // warm-up
    let (t, _) = seconds(|| prefill(&lm.model, KvCache::default(), &ids).unwrap());
    (rates, t)
}

fn bench(alias: &str) {
    let open = |precision| {
        LanguageModel::open(alias, &OpenOptions { precision, ..Default::default() }, &mut |m| {
            eprintln!("{m}")
        })
        .unwrap()
    };
    let lm = open(Precision::F32);
    let model = &lm.model;
    println!("== {alias}");
    let questions = [
        "What is 17 + 25?",
        "Name three colours.",
        "Why is the sky blue?",
        "What is a prime number?",
        "Describe a cat.",
        "How do plants grow?",
        "What is the capital of Italy?",
        "Count from one to ten.",
    ];
    let prompts: Vec<Vec<u32>> = (0..32)
        .map(|i| {
            lm.chat_ids(&Default::default(), &format!("{} ({})", questions[i % 8], i / 8)).unwrap()
        })
        .collect();

    let base = quantized_baseline_decode(&lm, &prompts[0]);
    println!("baseline: candle-transformers quantised decode, batch 1: {base:.1} tokens/s");
    let (f32_rates, f32_prefill) = decode_and_prefill(&lm, &prompts);
    for p in [Precision::Mixed, Precision::Mixed16] {
        let other = format!("{p:?}").to_lowercase();
        let mixed_lm = open(p);
        let (mixed_rates, mixed_prefill) = decode_and_prefill(&mixed_lm, &prompts);
        for ((batch, exact), (_, mixed)) in f32_rates.iter().zip(&mixed_rates) {
            println!(
                "greedy decode, batch {batch}: f32 {exact:.1} tokens/s ({:.2}x baseline), {other} {mixed:.1} tokens/s ({:.2}x f32, {:.2}x baseline)",
                exact / base,
                mixed / exact,
                mixed / base
            );
        }
        if p == Precision::Mixed16 {
            for m in [1, 32, 128] {
                let (full, screened) = greedy_choice_seconds(&mixed_lm, &prompts, m);
                println!(
                    "greedy choice of {m} tokens, {other}: full vocabulary head {:.2} ms, screened by 8-bit inputs {:.2} ms ({:.2}x)",
                    full * 1e3,
                    screened * 1e3,
                    full / screened
                );
            }
        }
        println!(
            "prefill, 300 tokens: f32 {f32_prefill:.2} s ({:.0} tokens/s), {other} {mixed_prefill:.2} s ({:.0} tokens/s, {:.2}x f32)",
            300.0 / f32_prefill,
            300.0 / mixed_prefill,
            f32_prefill / mixed_prefill
        );
    }

    let ids = long_ids(&lm, 400);
    let candidates: Vec<u32> = ids[100..120].to_vec();
    let mut weights = vec![0f32; candidates.len()];
    weights[0] = 1.0;
    let loss_positions: Vec<usize> = (389..399).collect();
    let targets: Vec<u32> = ids[390..400].to_vec();
    let input = OneHotInput {
        prefix: &KvCache::default(),
        ids: &ids,
        position: 100,
        candidates: &candidates,
        weights: &weights,
        loss_positions: &loss_positions,
    };
    // Best of three after a warm-up, as a step's gradient pass runs in memory the earlier
    // steps already mapped (the first pass of a process also pays for faulting it in).
    let warm_best = |f: &dyn Fn()| {
        f();
        (0..3).map(|_| seconds(f).0).fold(f64::INFINITY, f64::min)
    };
    let t_fwd = warm_best(&|| {
        let mut cache = [KvCache::default()];
        let x = model.embed(&ids).unwrap().unsqueeze(0).unwrap();
        model.forward(&x, &mut cache, Pass::Differentiable).unwrap();
    });
    let gradient_pass = |model| {
        warm_best(&|| {
            loss_and_gradient(model, &input, |logits| cross_entropy(logits, &targets, 0.2))
                .unwrap();
        })
    };
    // The gradient pass is the same for `mixed` and `mixed16` (bf16 products).
    let mixed_lm = open(Precision::Mixed);
    let (t_bwd, t_mixed) = (gradient_pass(model), gradient_pass(&mixed_lm.model));
    println!(
        "forward+backward, 400 tokens, warm, best of 3: f32 {t_bwd:.2} s ({:.2}x the differentiable forward alone, {t_fwd:.2} s), mixed {t_mixed:.2} s ({:.2}x f32)",
        t_bwd / t_fwd,
        t_bwd / t_mixed
    );
    let ((ceiling, bf16_rate), work) =
        (gemm_ceiling(&model.cfg), 400.0 * flops_per_token(&model.cfg) / 1e9);
    if let Some(r) = bf16_rate {
        println!(
            "bf16 product at the same shape: {r:.0} GFLOP/s ({:.2}x the f32 gemm)",
            r / ceiling
        );
    }
    println!(
        "matrix products: ceiling {ceiling:.0} GFLOP/s (400 x {} x {}); forward {:.0} GFLOP/s, forward+backward {:.0} GFLOP/s (input gradient only: twice the forward's products)",
        model.cfg.hidden_size,
        model.cfg.intermediate_size,
        work / t_fwd,
        2.0 * work / t_bwd
    );
    for dtype in [candle_core::quantized::GgmlDType::Q4_0, candle_core::quantized::GgmlDType::Q5_0]
    {
        let (stored, laid) = int8_layout_rates(&model.cfg, dtype);
        println!(
            "integer product at batch 1 over {dtype:?} ({:?}): groups as stored {stored:.0} GFLOP/s, laid out at load for the kernel {laid:.0} GFLOP/s ({:.2}x)",
            greater::model::kernels::int8::Kernel::best(),
            laid / stored
        );
    }
    if greater::model::kernels::few_rows::available() {
        let (d, f) = (model.cfg.hidden_size, model.cfg.intermediate_size);
        for m in [1, 60] {
            let (exact, mixed, mixed16) = decode_product_rates(&model.cfg, m);
            println!(
                "decoding's product, {m} rows x {d} x {f} over packed Q8_0: f32 {exact:.0} GFLOP/s, integer ({:?}) {mixed:.0} GFLOP/s ({:.2}x), with 16-bit inputs {mixed16:.0} GFLOP/s ({:.2}x)",
                greater::model::kernels::int8::Kernel::best(),
                mixed / exact,
                mixed16 / exact
            );
        }
    }
}

fn main() {
    greater::runtime::stop_candle_spinning();
    println!("{}", greater::model::kernels::describe());
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let aliases: Vec<&str> = if args.is_empty() {
        vec!["smollm2-135m", "qwen2.5-coder-0.5b"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    for alias in aliases {
        bench(alias);
    }
}
