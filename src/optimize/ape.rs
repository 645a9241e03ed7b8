//! The APE baseline (Zhou et al. 2023, forward generation): the task model reads a few
//! train questions with their gold answers and writes the instruction they were solved
//! with; every instruction is scored on the train questions exactly as a GReaTer candidate
//! is, round after round until the token budget is spent. The best few by train score then
//! meet the dev split like any other run's prompts.

use std::time::Instant;

use anyhow::Result;
use rand::seq::index::sample;
use rand::Rng;

use super::Optimizer;
use crate::model::generate::{generate, GenerateConfig, Request, Sampling};
use crate::records::{Proposal, Search, Seconds, State, StepRecord};

/// Instructions sampled (and then scored) together in one round.
pub const PROPOSALS_PER_ROUND: usize = 4;
/// Train question/answer pairs shown for one proposal.
pub const DEMOS: usize = 5;
/// APE samples its proposals at temperature 0.9.
const TEMPERATURE: f64 = 0.9;
/// An instruction is one sentence: the proposal stops here at the latest.
pub const MAX_INSTRUCTION_TOKENS: usize = 48;

/// The user turn asking for the instruction behind `demos` (question, answer), to be
/// written after `start` (the connector's last word, see [`reply_start`]).
pub fn proposal_request(demos: &[(&str, &str)], start: &str) -> String {
    let mut text = String::from("Here are some questions, each with its correct answer.\n\n");
    for (question, answer) in demos {
        text.push_str(&format!("Question: {question}\nAnswer: {answer}\n\n"));
    }
    text.push_str("Write one sentence of advice for solving questions like these.");
    if !start.is_empty() {
        text.push_str(&format!(" Start it with \"{start}\"."));
    }
    text
}

/// The instruction in a sampled reply: its first line, without quotes or a trailing space.
pub fn instruction_from_reply(reply: &str) -> String {
    let line = reply.trim_start().lines().next().unwrap_or("");
    line.trim().trim_matches(|c| c == '"' || c == '\'').trim().to_string()
}

/// The reply is written after the connector's last word, so an instruction reads as the
/// layout will place it ("... Use" + " step-by-step reasoning ...").
pub fn reply_start(connector: &str) -> &str {
    connector.trim_start_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
}

/// The APE baseline over a prepared train set: only the optimiser's public surface (its
/// model, settings, train pairs, random draws and scoring), none of GReaTer's step.
pub struct Ape<'o, 'a> {
    train: &'o Optimizer<'a>,
}

impl<'o, 'a> Ape<'o, 'a> {
    /// APE over `train`'s questions, scored as GReaTer scores its candidates.
    pub fn new(train: &'o Optimizer<'a>) -> Self {
        Ape { train }
    }

    /// One APE round: `proposals` instructions sampled from random train demonstrations,
    /// the new ones scored on train. A round is a step of the log.
    pub fn round(&self, state: &mut State, proposals: usize) -> Result<StepRecord> {
        let train = self.train;
        let prompt_before = train.prompt_text(&state.best_prompt)?;
        let mut secs = Seconds::default();
        let t = Instant::now();
        let mut rng = train.step_rng(state.step);
        let (lm, settings) = (train.model(), train.settings());
        let start = reply_start(&settings.connector);
        let pairs = train.train_pairs();
        let mut requests = Vec::with_capacity(proposals);
        for _ in 0..proposals {
            let picked = sample(&mut rng, pairs.len(), DEMOS.min(pairs.len()));
            let demos: Vec<(&str, &str)> = picked.iter().map(|i| pairs[i]).collect();
            let text = format!(
                "{}{start}",
                lm.chat_text(&settings.system, &proposal_request(&demos, start))?
            );
            requests.push(Request {
                prefix: Default::default(),
                ids: lm.tokenizer.encode(&text, false)?,
            });
        }
        let sampling = Sampling { temperature: TEMPERATURE, top_p: 1.0, seed: rng.random() };
        let cfg = GenerateConfig {
            cancel: Some(train.interrupt()),
            ..lm.generate_config(MAX_INSTRUCTION_TOKENS, Some(sampling))
        };
        let replies = generate(&lm.model, requests, &cfg)?;
        // A reply that stops at once still decoded its stop token.
        let mut generated_tokens: usize = replies.iter().map(|g| g.ids.len().max(1)).sum();
        let mut instructions: Vec<(String, Vec<u32>)> = Vec::new();
        for g in &replies {
            let text = instruction_from_reply(&lm.tokenizer.decode(&g.ids)?);
            if text.is_empty() {
                continue;
            }
            let ids = train.prompt_ids(&text)?;
            // The text as it reads back from its ids: the key the scores are kept under.
            let text = train.prompt_text(&ids)?;
            if !instructions.iter().any(|(t, _)| *t == text) {
                instructions.push((text, ids));
            }
        }
        secs.proposal = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let unscored: Vec<Vec<u32>> = instructions
            .iter()
            .filter(|(text, _)| !state.scores.contains_key(text))
            .map(|(_, ids)| ids.clone())
            .collect();
        for (p, (reasoning, score)) in unscored.iter().zip(train.reason_and_score_all(&unscored)?) {
            generated_tokens += reasoning.iter().map(Vec::len).sum::<usize>();
            state.scores.insert(train.prompt_text(p)?, score);
        }
        secs.checking = t.elapsed().as_secs_f64();

        let mut scored = Vec::with_capacity(instructions.len());
        for (text, ids) in &instructions {
            let score = state.scores[text].clone();
            if score.score < state.best_score {
                state.best_score = score.score;
                state.best_prompt = ids.clone();
            }
            scored.push(Proposal { prompt: text.clone(), score });
        }
        state.step += 1;
        state.generated_tokens += generated_tokens;
        let best_prompt = train.prompt_text(&state.best_prompt)?;
        Ok(StepRecord {
            step: state.step,
            prompt_before,
            search: Search::Round { proposals: scored },
            prompt: best_prompt.clone(),
            best_prompt,
            best_score: state.best_score,
            seconds: secs,
            generated_tokens,
        })
    }
}
