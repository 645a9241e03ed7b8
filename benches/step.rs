//! One GReaTer step, warm, on the real models and BBH tasks of `../shared/data`: seconds
//! per step split as the reference splits it (reasoning, proposal, gradient, checking),
//! reasoning tokens decoded, the cores each part kept busy (of the machine's), resident
//! memory after each step and at its peak, and the ratio against the seconds per step
//! recorded below for an earlier version of this code and for the reference. Each setup
//! runs in f32 and then in the mixed precision (integer dot products for decoding), whose
//! ratio to f32 is taken in the same run.
//!
//!     cargo bench --bench step                # both setups
//!     cargo bench --bench step -- smollm2     # setups whose name contains "smollm2"

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use greater::model::Precision;
use greater::optimize::Optimizer;
use greater::records::Seconds;
use greater::runtime::{LanguageModel, OpenOptions};
use greater::settings::{OptimizeConfig, StartFrom};
use greater::tasks::{Count, Task};
use greater::tokenizer::SystemTurn;

struct Setup {
    name: &'static str,
    model: &'static str,
    task: &'static str,
    train: usize,
    steps: usize,
    /// Mean seconds per step of commit fec5889 (before this bench's work), idle machine.
    recorded: Option<f64>,
    /// Mean seconds per step of the reference harness (`../shared/reference/run.sh TASK 5 2
    /// smollm2`, GREATER_MAX_NEW_TOKENS=256, 2 threads), measured next to this bench on the
    /// idle machine on 2026-12-03. Machines of the same kind differ: the reference took 17.5
    /// and 100.2 s on the one of 2026-12-02, 25.2 and 142.0 s on an earlier one, so only a
    /// ratio taken beside the reference on the same machine means anything.
    reference: Option<f64>,
}

const SETUPS: [Setup; 3] = [
    Setup {
        name: "smollm2 navigate",
        model: "smollm2-135m",
        task: "navigate",
        train: 5,
        steps: 3,
        recorded: Some(12.9),
        reference: Some(23.8),
    },
    Setup {
        name: "smollm2 object_counting",
        model: "smollm2-135m",
        task: "object_counting",
        train: 5,
        steps: 3,
        recorded: None,
        reference: Some(121.7),
    },
    Setup {
        name: "qwen object_counting",
        model: "qwen2.5-coder-0.5b",
        task: "object_counting",
        train: 20,
        steps: 2,
        recorded: Some(409.0),
        reference: None,
    },
];

/// "recorded 12.9 s: 1.96x faster", or that nothing was recorded.
fn against(what: &str, recorded: Option<f64>, mean: f64) -> String {
    match recorded {
        Some(r) => format!("{what} {r:.1} s: {:.2}x faster", r / mean),
        None => format!("{what}: not measured"),
    }
}

/// Resident set size now and at its peak, in MiB (Linux).
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system, all threads) this process has used: fields 14 and 15 of
/// /proc/self/stat, in the kernel's fixed 100 ticks per second.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after it start at field 3.
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(f64::NAN))
        .collect();
    match fields.get(11..13) {
        Some([user, system]) => (user + system) / 100.0,
        _ => f64::NAN,
    }
}

/// (seconds since start, CPU seconds) every 50 ms, recorded by a thread of its own.
struct CpuSampler {
    start: Instant,
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
    stop: Arc<AtomicBool>,
}

impl CpuSampler {
    fn start() -> Self {
        let (start, samples, stop) =
            (Instant::now(), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (s, halt) = (Arc::clone(&samples), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                s.lock().unwrap().push((start.elapsed().as_secs_f64(), cpu_seconds()));
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        CpuSampler { start, samples, stop }
    }

    /// Mean cores busy between two moments (seconds since start), from the nearest samples.
    fn cores(&self, from: f64, to: f64) -> f64 {
        let samples = self.samples.lock().unwrap();
        let at = |t: f64| {
            samples.iter().min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs())).copied()
        };
        match (at(from), at(to)) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) / (b.0 - a.0),
            _ => f64::NAN,
        }
    }

    /// "proposal 1.1, gradient 1.9, checking 1.6": cores busy in each part of a step that
    /// began at `began` (the parts run one after the other in the order of Seconds::PARTS).
    fn per_part(&self, began: f64, seconds: &Seconds) -> String {
        let mut t = began;
        let mut out = Vec::new();
        for (name, s) in Seconds::PARTS.iter().zip(seconds.parts()) {
            if s >= 0.5 {
                out.push(format!("{name} {:.2}", self.cores(t, t + s)));
            }
            t += s;
        }
        out.join(", ")
    }
}

impl Drop for CpuSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Mean seconds per step of `setup` in `precision`.
fn bench(setup: &Setup, data: &Path, precision: Precision) -> f64 {
    println!(
        "== {} (first {} examples, top-k 40, 256 reasoning tokens), {precision:?}",
        setup.name, setup.train
    );
    let opts = OpenOptions { precision, ..Default::default() };
    let lm = LanguageModel::open(setup.model, &opts, &mut |m| eprintln!("{m}")).unwrap();
    // The first examples of the file, as the reference harness takes them.
    let (task, _) =
        Task::load_split(setup.task, Some(data.to_path_buf()), 0, 1, (setup.train, 0, Count::N(0)))
            .unwrap();
    let train: Vec<_> = task.examples[..setup.train].iter().collect();
    // The layout and start the recorded numbers were measured with.
    let cfg = OptimizeConfig {
        top_k: 40,
        max_reasoning: 256,
        system: SystemTurn::Template,
        start: StartFrom::Initial,
        ..OptimizeConfig::default()
    };
    let optimizer =
        Optimizer::new(&lm, &task, &train, &cfg, Arc::new(AtomicBool::new(false))).unwrap();
    let t = Instant::now();
    let mut state = optimizer.initial_state(&[task.initial_prompt.as_str()]).unwrap();
    println!("initial reasoning and score: {:.1} s", t.elapsed().as_secs_f64());
    let mut total = 0.0;
    let sampler = CpuSampler::start();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    for _ in 0..setup.steps {
        let began = sampler.start.elapsed().as_secs_f64();
        let r = optimizer.step(&mut state).unwrap();
        let secs = sampler.start.elapsed().as_secs_f64() - began;
        total += secs;
        let (rss, peak) = memory_mib();
        println!(
            "step {}: {secs:.1} s = {}; {} tokens decoded; resident {rss:.0} MiB, peak {peak:.0} MiB; prompt {:?}",
            r.step, r.seconds, r.generated_tokens, r.prompt
        );
        println!(
            "  cores busy (of {cores}): step {:.2}; {}",
            sampler.cores(began, began + secs),
            sampler.per_part(began, &r.seconds)
        );
    }
    let mean = total / setup.steps as f64;
    println!(
        "mean: {mean:.1} s per step; {}; {}",
        against("recorded for fec5889", setup.recorded, mean),
        against("reference", setup.reference, mean)
    );
    mean
}

fn main() {
    greater::runtime::stop_candle_spinning();
    println!("{}", greater::model::kernels::describe());
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !data.join("bbh").is_dir() {
        eprintln!("the step bench reads BBH from {}: not found", data.display());
        std::process::exit(1);
    }
    // Arguments: parts of setup names, and `mixed` / `mixed16` to measure only those beside f32.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let name = |p: Precision| format!("{p:?}").to_lowercase();
    let lower = [Precision::Mixed, Precision::Mixed16];
    let (named, filters): (Vec<String>, Vec<String>) =
        args.into_iter().partition(|a| lower.iter().any(|&p| name(p) == *a));
    for setup in SETUPS
        .iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.name.contains(f.as_str())))
    {
        let exact = bench(setup, &data, Precision::F32);
        for p in lower.into_iter().filter(|&p| named.is_empty() || named.contains(&name(p))) {
            let mixed = bench(setup, &data, p);
            println!(
                "{}: {} {mixed:.1} s per step against f32 {exact:.1} s: {:.2}x",
                setup.name,
                name(p),
                exact / mixed
            );
        }
    }
}
