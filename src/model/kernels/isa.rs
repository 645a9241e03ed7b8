//! Which vector instructions the kernels may use: what the CPU reports, capped by the
//! `GREATER_ISA` environment variable.
//!
//! Machines of the same kind differ in their CPU (AVX-512 with VNNI and BF16 on some, only
//! AVX2 and FMA on others). Every kernel chooses its path from [`features`] alone, so that
//! `GREATER_ISA=avx2` (or `scalar`) on an AVX-512 machine runs what an AVX2-only one runs and
//! its tests catch what that machine would fail. The cap only lowers: a path the CPU lacks is
//! never chosen.
//!
//! The f32 products that go to candle (the gemm crate) choose their own instructions; the cap
//! does not reach them.

use std::sync::OnceLock;

/// The environment variable that caps the instruction sets.
pub const ENV: &str = "GREATER_ISA";

/// An instruction-set level, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// No SIMD: the reference kernels.
    Scalar,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 (with VNNI and BF16 where the CPU has them).
    Avx512,
}

impl std::str::FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scalar" => Ok(Isa::Scalar),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            _ => Err(format!("{ENV}={s:?} is not one of scalar, avx2, avx512")),
        }
    }
}

/// The instruction sets the kernels may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// AVX2 and FMA.
    pub avx2: bool,
    /// AVX-512 F and BW (512-bit f32 and byte arithmetic).
    pub avx512: bool,
    /// AVX-512 VNNI (`vpdpbusd`), with F and BW.
    pub avx512_vnni: bool,
    /// AVX-512 BF16 (`vdpbf16ps`), with F and BW.
    pub avx512_bf16: bool,
}

impl Features {
    /// What the CPU this runs on reports, uncapped.
    pub fn of_cpu() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
            Features {
                avx2: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                avx512,
                avx512_vnni: avx512 && is_x86_feature_detected!("avx512vnni"),
                avx512_bf16: avx512 && is_x86_feature_detected!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Features::default()
    }

    /// These features with nothing above `isa`.
    pub fn capped(self, isa: Isa) -> Self {
        let avx512 = isa >= Isa::Avx512;
        Features {
            avx2: self.avx2 && isa >= Isa::Avx2,
            avx512: self.avx512 && avx512,
            avx512_vnni: self.avx512_vnni && avx512,
            avx512_bf16: self.avx512_bf16 && avx512,
        }
    }

    /// The names of the features present, for messages.
    pub fn names(self) -> String {
        let all = [
            (self.avx2, "avx2+fma"),
            (self.avx512, "avx512f+bw"),
            (self.avx512_vnni, "avx512_vnni"),
            (self.avx512_bf16, "avx512_bf16"),
        ];
        let on: Vec<&str> = all.iter().filter(|(has, _)| *has).map(|(_, n)| *n).collect();
        if on.is_empty() {
            "none".into()
        } else {
            on.join(" ")
        }
    }
}

/// The cap `GREATER_ISA` asks for (None when it is not set).
fn cap_from_env() -> Result<Option<Isa>, String> {
    match std::env::var(ENV) {
        Ok(s) => s.parse().map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(s)) => Err(format!("{ENV}={s:?} is not valid text")),
    }
}

fn chosen() -> &'static Result<Features, String> {
    static CHOSEN: OnceLock<Result<Features, String>> = OnceLock::new();
    CHOSEN.get_or_init(|| {
        let cpu = Features::of_cpu();
        Ok(cap_from_env()?.map_or(cpu, |isa| cpu.capped(isa)))
    })
}

/// The features the kernels use: the CPU's, capped by `GREATER_ISA`. Read once per process.
/// A malformed `GREATER_ISA` caps nothing here; [`check_env`] reports it before a model opens.
pub fn features() -> Features {
    chosen().clone().unwrap_or_else(|_| Features::of_cpu())
}

/// An error naming the variable and its values when `GREATER_ISA` is malformed.
pub fn check_env() -> anyhow::Result<()> {
    chosen().as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e}"))
}
