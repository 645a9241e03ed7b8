//! The SIMD kernels of the frozen products and what chooses among them: integer dot products
//! over the GGUF blocks ([`int8`]), bf16 products for the gradient pass ([`bf16`]), f32
//! products for a few rows ([`few_rows`]), the weights as the kernels read them
//! ([`packed`]), the dispatch among them (`frozen_matmul`), and the instruction sets each
//! may use ([`isa`]). Nothing here knows an architecture.

pub mod bf16;
pub mod few_rows;
pub(crate) mod frozen_matmul;
pub mod int8;
pub mod isa;
pub mod packed;

/// One line saying which path each kernel takes on this machine, for `-v` and the benches.
pub fn describe() -> String {
    let f = isa::features();
    let cap = std::env::var(isa::ENV).map_or(String::new(), |v| format!(", {}={v}", isa::ENV));
    let int8 = match int8::Kernel::choose(f) {
        int8::Kernel::Avx512Vnni => "avx512-vnni",
        int8::Kernel::Avx2 => "avx2",
        int8::Kernel::Scalar => "scalar",
    };
    let few_rows = if few_rows::available() { "avx512" } else { "candle gemm" };
    let bf16 = if bf16::available() { "avx512-bf16" } else { "f32 (no bf16 path)" };
    format!(
        "kernels: integer products {int8}, f32 few-row products {few_rows}, gradient products \
         {bf16} (CPU: {}{cap})",
        isa::Features::of_cpu().names()
    )
}
