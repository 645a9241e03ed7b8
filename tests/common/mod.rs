//! Shared by the tests that need a real model: each test binary opens it once.
#![allow(dead_code)]

use std::sync::OnceLock;

use greater::runtime::{LanguageModel, OpenOptions};

/// SmolLM2-135M-Instruct, fetched into the cache on first use.
pub fn smollm2() -> &'static LanguageModel {
    static MODEL: OnceLock<LanguageModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        LanguageModel::open("smollm2-135m", &OpenOptions::default(), &mut |m| eprintln!("{m}"))
            .expect("smollm2-135m loads")
    })
}

/// A fixed English text for logits comparisons.
pub const PARITY_TEXT: &str = "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon, \
and Neil Armstrong became the first person to walk on its surface. Scientists still study the rocks \
the astronauts brought back, because they tell us how the Moon formed, how old it is, and what the early solar system was like.";
