//! GReaTer: one prompt position per step. The model proposes candidate tokens, the
//! gradient of the answer loss through the model's own reasoning ranks them, and the best
//! few are checked for real by regenerating the reasoning.

pub mod ape;
pub mod candidates;
pub mod run;
pub mod schedule;
pub mod select;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::layout::{Layout, QuestionIds};
use crate::model::generate::{
    generate, prefill, run_all, Cancelled, GenerateConfig, Generated, Request, StopReason,
};
use crate::model::gradient::{cross_entropy, loss_and_gradients, OneHotInput};
use crate::model::KvCache;
use crate::records::{Checked, Score, Search, Seconds, State, StepRecord, TokenStep, TokenText};
use crate::runtime::LanguageModel;
use crate::settings::{Accept, Filler, Method, OptimizeConfig, Vocabulary};
use crate::tasks::{Example, Task};

use candidates::{choose, combine_gradients, propose, shortlist, ProposalConfig};
use schedule::{ends_sentence, next_position, restarts, Next};

/// What stages 1-4 of a step found (see [`Optimizer::shortlist`]).
pub struct Shortlist {
    /// The current prompt's reasoning per train example.
    pub reasoning: Vec<Vec<u32>>,
    /// Its score, when the reasoning was generated here.
    pub reasoning_score: Option<Score>,
    /// The candidate tokens the proposal admitted for the position.
    pub candidates: Vec<u32>,
    /// The best candidates by gradient, best first, with their gradients.
    pub short: Vec<(u32, f32)>,
    /// Wall time of the stages so far.
    pub seconds: Seconds,
}

/// A train example prepared once: the ids before the prompt (with their KV cache) and after
/// it, and the gold answer's tokens.
#[derive(Clone)]
struct TrainExample {
    question: String,
    target: String,
    ids: QuestionIds,
    head_cache: KvCache,
    /// Log-probabilities of the token after the head (the prompt's first token).
    head_logprobs: Tensor,
    answer: Vec<u32>,
}

/// How many admissible tokens of each example's ranking the proposal may use.
const RANKED: usize = 64;

/// GReaTer's optimiser over one task's train questions: each step proposes tokens for one prompt position, ranks them by the gradient of the answer loss through the reasoning, checks the best few for real and moves on.
pub struct Optimizer<'a> {
    lm: &'a LanguageModel,
    cfg: &'a OptimizeConfig,
    layout: Layout<'a>,
    examples: Vec<TrainExample>,
    interrupt: Arc<AtomicBool>,
}

fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}

impl<'a> Optimizer<'a> {
    /// Prepares the train questions (their ids, caches and answers) for `cfg`'s layout.
    pub fn new(
        lm: &'a LanguageModel,
        task: &Task,
        train: &[&Example],
        cfg: &'a OptimizeConfig,
        interrupt: Arc<AtomicBool>,
    ) -> Result<Self> {
        if train.is_empty() {
            bail!("the train split is empty: pass --train N");
        }
        let layout = Layout::new(lm, task, &cfg.system, &cfg.connector)?;
        let mut examples = Vec::with_capacity(train.len());
        for ex in train {
            let ids = layout.question(&ex.question)?;
            let (head_cache, logits) = prefill(&lm.model, KvCache::default(), &ids.head)?;
            let answer = layout.answer_ids(&ex.target)?;
            examples.push(TrainExample {
                question: ex.question.clone(),
                target: ex.target.clone(),
                ids,
                head_cache,
                head_logprobs: log_softmax(&logits)?,
                answer,
            });
        }
        if let Some(b) = cfg.train_batch.filter(|&b| b >= examples.len()) {
            bail!(
                "train_batch {b} must be below the train split's {} questions, the pool it draws from (leave it out to use them all)",
                examples.len()
            );
        }
        Ok(Optimizer { lm, cfg, layout, examples, interrupt })
    }

    /// The train questions (positions in the train split) step `step` uses with
    /// `train_batch`: a fresh draw from the pool each step, by the run's seed and the step
    /// alone, so a resumed run draws what an uninterrupted one does. Fresh rather than a
    /// fixed rotation: a rotation's period would line up with the positions' cycle and
    /// show each position the same few questions. None: every step uses them all.
    pub fn step_questions(&self, step: usize) -> Option<Vec<usize>> {
        let b = self.cfg.train_batch?;
        let mut rng = self.step_rng(step);
        // Its own stream: the proposal's draws stay those of a run without batches.
        rng.set_stream(1);
        let mut questions = rand::seq::index::sample(&mut rng, self.examples.len(), b).into_vec();
        questions.sort_unstable();
        Some(questions)
    }

    /// The same optimiser over only these train questions.
    fn on_questions(&self, questions: &[usize]) -> Optimizer<'a> {
        Optimizer {
            examples: questions.iter().map(|&i| self.examples[i].clone()).collect(),
            layout: self.layout.clone(),
            interrupt: Arc::clone(&self.interrupt),
            ..*self
        }
    }

    /// Ctrl-C stops the run with the same error as a cancelled generation; the last
    /// checkpoint stands.
    fn check_interrupt(&self) -> Result<()> {
        if self.interrupt.load(Ordering::Relaxed) {
            return Err(Cancelled.into());
        }
        Ok(())
    }

    /// The model the search runs on.
    pub fn model(&self) -> &LanguageModel {
        self.lm
    }

    /// The run's settings.
    pub fn settings(&self) -> &OptimizeConfig {
        self.cfg
    }

    /// The train questions with their gold answers as the data spells them.
    pub fn train_pairs(&self) -> Vec<(&str, &str)> {
        self.examples.iter().map(|e| (e.question.as_str(), e.target.as_str())).collect()
    }

    /// The flag that stops the run (Ctrl-C), for generations of a method's own.
    pub fn interrupt(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.interrupt)
    }

    /// Prompt ids as they follow the connector (see [`Layout::prompt_ids`]).
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            bail!("the initial prompt is empty");
        }
        self.layout.prompt_ids(text)
    }

    /// The prompt's text as it reads back from `ids`: the key scores are kept under.
    pub fn prompt_text(&self, ids: &[u32]) -> Result<String> {
        self.layout.prompt_text(ids)
    }

    /// What the model reads for train example `e` under `prompt`, before its reasoning.
    #[cfg(feature = "testing")]
    pub fn user_ids(&self, e: usize, prompt: &[u32]) -> Result<Vec<u32>> {
        self.layout.user_turn(&self.examples[e].ids, prompt)
    }

    fn token_text(&self, id: u32) -> Result<TokenText> {
        Ok(TokenText { id, text: self.lm.tokenizer.decode_with_special(&[id])? })
    }

    /// The random draws of step (or `ape` round) `step`: the run seed's, independent of
    /// every other step's, so a resumed run draws what an uninterrupted one does.
    pub fn step_rng(&self, step: usize) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64)
    }

    /// May `token` stand at `position` of `prompt`? Not special, its text in the
    /// vocabulary, not the token before the position (at 0: the prompt's last, as in the
    /// reference), and the prompt's text must encode back to the same ids (so the printed
    /// prompt is exactly the optimised one).
    fn admissible(&self, prompt: &[u32], position: usize, token: u32) -> Result<bool> {
        let tok = &self.lm.tokenizer;
        let previous = if position == 0 { prompt.last() } else { prompt.get(position - 1) };
        if tok.is_special(token) || previous == Some(&token) {
            return Ok(false);
        }
        if !in_vocabulary(self.cfg.vocabulary, &tok.decode_with_special(&[token])?) {
            return Ok(false);
        }
        let mut ids = prompt.to_vec();
        if position == ids.len() {
            ids.push(token);
        } else {
            ids[position] = token;
        }
        self.round_trips(&ids)
    }

    /// Does the prompt's text encode back to `ids`?
    fn round_trips(&self, ids: &[u32]) -> Result<bool> {
        Ok(self.layout.prompt_ids(&self.layout.prompt_text(ids)?)? == ids)
    }

    /// Final-normed hidden states of each prompt after every example's head, one batched
    /// run for all: per prompt, [examples x len, hidden].
    fn prompt_hidden(&self, prompts: &[Vec<u32>]) -> Result<Vec<Tensor>> {
        let requests = prompts
            .iter()
            .flat_map(|p| {
                self.examples
                    .iter()
                    .map(move |ex| Request { prefix: ex.head_cache.clone(), ids: p.clone() })
            })
            .collect();
        let mut hidden = run_all(&self.lm.model, requests)?.into_iter().map(|(_, h)| h);
        prompts
            .iter()
            .map(|_| {
                Ok(Tensor::cat(&hidden.by_ref().take(self.examples.len()).collect::<Vec<_>>(), 0)?)
            })
            .collect()
    }

    /// Mean prompt NLL over the examples, and (for `row`) each example's admissible tokens
    /// for that prompt position, most likely first. `hidden` is the prompt's [`Self::prompt_hidden`].
    fn prompt_stats(
        &self,
        prompt: &[u32],
        hidden: &Tensor,
        row: Option<usize>,
    ) -> Result<(f64, Vec<Vec<u32>>)> {
        let len = prompt.len();
        // One vocabulary projection for all examples: its weight is read once, not per example.
        let all = log_softmax(&self.lm.model.logits(hidden)?)?;
        let targets = Tensor::new(prompt, all.device())?.unsqueeze(1)?;
        let mut nll_sum = 0.0;
        let mut ranked = Vec::new();
        let mut memo: HashMap<u32, bool> = HashMap::new();
        for (e, ex) in self.examples.iter().enumerate() {
            // Row j predicts prompt token j; the last row predicts a token after the prompt.
            let rows =
                Tensor::cat(&[ex.head_logprobs.unsqueeze(0)?, all.narrow(0, e * len, len)?], 0)?;
            let picked = rows.narrow(0, 0, len)?.gather(&targets, 1)?;
            nll_sum -= picked.mean_all()?.to_scalar::<f32>()? as f64;
            if let Some(r) = row {
                let logprobs = rows.get(r)?.to_vec1::<f32>()?;
                let mut order: Vec<u32> = (0..logprobs.len() as u32).collect();
                order.sort_by(|&a, &b| {
                    logprobs[b as usize].total_cmp(&logprobs[a as usize]).then(a.cmp(&b))
                });
                let mut keep = Vec::with_capacity(RANKED);
                for t in order {
                    let ok = match memo.get(&t) {
                        Some(&ok) => ok,
                        None => *memo.entry(t).or_insert(self.admissible(prompt, r, t)?),
                    };
                    if ok {
                        keep.push(t);
                        if keep.len() == RANKED {
                            break;
                        }
                    }
                }
                ranked.push(keep);
            }
        }
        Ok((nll_sum / self.examples.len() as f64, ranked))
    }

    /// Mean prompt NLL over the examples of each prompt, from the prompt rows of its
    /// reasoning's prefill (`replies[i]` for `prompts[i]`, which [`Self::reason`] began with
    /// the prompt): no second forward over the prompts.
    fn prompt_nll(&self, prompts: &[Vec<u32>], replies: &[Vec<Generated>]) -> Result<Vec<f64>> {
        prompts
            .iter()
            .zip(replies)
            .map(|(p, rs)| {
                let rows = rs
                    .iter()
                    .map(|r| r.prefill.narrow(0, 0, p.len()))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(self.prompt_stats(p, &Tensor::cat(&rows, 0)?, None)?.0)
            })
            .collect()
    }

    /// Tokens of reasoning the search lets the model write: none for `gcg`, whose answer
    /// follows the prompt directly.
    fn search_reasoning(&self) -> usize {
        match self.cfg.method {
            Method::Gcg => 0,
            Method::Greater | Method::Ape | Method::ApeGreater => self.cfg.max_reasoning,
        }
    }

    /// The whole sequence whose answer the search scores: the user turn under `prompt`,
    /// the reasoning, the extractor and the gold answer of train example `e`.
    pub fn scored_ids(&self, e: usize, prompt: &[u32], reasoning: &[u32]) -> Vec<u32> {
        let ex = &self.examples[e];
        [&ex.ids.head[..], prompt, &ex.ids.tail, reasoning, self.layout.extractor(), &ex.answer]
            .concat()
    }

    /// Greedy reasoning of every example under each prompt, decoded in one batch.
    fn reason(&self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<Generated>>> {
        self.check_interrupt()?;
        for (p, ex) in prompts.iter().flat_map(|p| self.examples.iter().map(move |ex| (p, ex))) {
            let user_len = ex.ids.head.len() + p.len() + ex.ids.tail.len();
            let reasoning = self.search_reasoning();
            self.layout.check_room(&ex.question, user_len, reasoning, ex.answer.len())?;
        }
        let requests: Vec<Request> = prompts
            .iter()
            .flat_map(|p| {
                self.examples.iter().map(move |ex| Request {
                    prefix: ex.head_cache.clone(),
                    ids: [&p[..], &ex.ids.tail].concat(),
                })
            })
            .collect();
        let cfg = GenerateConfig {
            cancel: Some(Arc::clone(&self.interrupt)),
            ..self.lm.generate_config(self.search_reasoning(), None)
        };
        let mut replies = generate(&self.lm.model, requests, &cfg)?.into_iter();
        Ok(prompts.iter().map(|_| replies.by_ref().take(self.examples.len()).collect()).collect())
    }

    /// Real scores of prompts given their reasoning (`replies[i]` for `prompts[i]`, whose
    /// caches are consumed): an example is right when greedy decoding would pick every gold
    /// answer token, teacher-forced after the reasoning and the extractor, and (with
    /// `cut_is_mistake`) its reasoning ended before the budget.
    fn score(&self, prompts: &[Vec<u32>], replies: Vec<Vec<Generated>>) -> Result<Vec<Score>> {
        self.check_interrupt()?;
        let nlls = self.prompt_nll(prompts, &replies)?;
        let cut_flags: Vec<bool> =
            replies.iter().flatten().map(|r| r.stop != StopReason::StopToken).collect();
        let lengths: Vec<usize> = replies.iter().flatten().map(|r| r.ids.len()).collect();
        let requests: Vec<Request> = replies
            .into_iter()
            .flat_map(|rs| {
                rs.into_iter().zip(&self.examples).map(|(r, ex)| Request {
                    ids: [&r.ids[r.fed..], self.layout.extractor(), &ex.answer].concat(),
                    prefix: r.cache,
                })
            })
            .collect();
        let examples = || prompts.iter().flat_map(|_| &self.examples);
        // The rows that predict the answer tokens, for every prompt and example at once.
        let states: Vec<Tensor> = run_all(&self.lm.model, requests)?
            .into_iter()
            .zip(examples())
            .map(|((_, h), ex)| {
                let n = ex.answer.len();
                Ok(h.narrow(0, h.dim(0)? - n - 1, n)?)
            })
            .collect::<Result<_>>()?;
        let logits = self.lm.model.logits(&Tensor::cat(&states, 0)?)?;
        let picked = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let gold: Vec<u32> = examples().flat_map(|ex| ex.answer.iter().copied()).collect();
        let gold_logprobs = log_softmax(&logits)?
            .gather(&Tensor::new(gold.as_slice(), logits.device())?.unsqueeze(1)?, 1)?;
        let gold_logprobs = gold_logprobs.flatten_all()?.to_vec1::<f32>()?;
        let (mut rest, mut rest_lp) = (picked.as_slice(), gold_logprobs.as_slice());
        let n = self.examples.len();
        let mut scores = Vec::with_capacity(prompts.len());
        for ((nll, cut_flags), lengths) in
            nlls.into_iter().zip(cut_flags.chunks(n)).zip(lengths.chunks(n))
        {
            let (mut mistakes, mut answer_nll) = (0, 0.0);
            for (ex, &cut) in self.examples.iter().zip(cut_flags) {
                let (mine, tail) = rest.split_at(ex.answer.len());
                let (lp, lp_tail) = rest_lp.split_at(ex.answer.len());
                let wrong = mine != ex.answer.as_slice();
                mistakes += usize::from(wrong || (cut && self.cfg.cut_is_mistake));
                answer_nll -= lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len().max(1) as f64;
                (rest, rest_lp) = (tail, lp_tail);
            }
            let answer_nll = answer_nll / n as f64;
            let score = self.real_score(mistakes, n, nll, answer_nll);
            let cut = Some(cut_flags.iter().filter(|&&c| c).count());
            let reasoning_tokens = Some(lengths.iter().sum::<usize>() as f64 / n as f64);
            scores.push(Score { score, mistakes, cut, n, nll, answer_nll, reasoning_tokens });
        }
        Ok(scores)
    }

    /// The real score of a prompt from its mistakes on `n` questions and its mean NLLs:
    /// mistake rate + control_weight / 10 x prompt NLL + answer_weight x answer NLL.
    fn real_score(&self, mistakes: usize, n: usize, nll: f64, answer_nll: f64) -> f64 {
        mistakes as f64 / n as f64
            + self.cfg.control_weight / 10.0 * nll
            + self.cfg.answer_weight * answer_nll
    }

    /// Per train example: the loss (answer CE at temperature T plus control_weight x the mean
    /// NLL of all prompt tokens) and its gradient with respect to the one-hot over
    /// `candidates` at `position`, through the example's reasoning.
    pub fn example_gradients(
        &self,
        prompt: &[u32],
        position: usize,
        candidates: &[u32],
        reasoning: &[Vec<u32>],
    ) -> Result<Vec<(f64, Vec<f32>)>> {
        let hot = candidates
            .iter()
            .position(|&c| c == prompt[position])
            .expect("current token is a candidate");
        let mut weights = vec![0f32; candidates.len()];
        weights[hot] = 1.0;
        let len = prompt.len();
        self.check_interrupt()?;
        // As many examples as there are reasonings (the first alone, for timing).
        let ids: Vec<Vec<u32>> =
            reasoning.iter().enumerate().map(|(e, r)| self.scored_ids(e, prompt, r)).collect();
        // Logits at p predict the token at p + 1. The first prompt token is predicted by the
        // head (cached, no gradient): its NLL enters the loss as a constant.
        let loss_positions: Vec<Vec<usize>> = self
            .examples
            .iter()
            .zip(&ids)
            .map(|(ex, ids)| {
                let (start, answer_at) = (ex.ids.head.len(), ids.len() - ex.answer.len());
                (answer_at - 1..ids.len() - 1).chain((1..len).map(|j| start + j - 1)).collect()
            })
            .collect();
        let inputs: Vec<OneHotInput> = self
            .examples
            .iter()
            .zip(ids.iter().zip(&loss_positions))
            .map(|(ex, (ids, loss_positions))| OneHotInput {
                prefix: &ex.head_cache,
                ids,
                position: ex.ids.head.len() + position,
                candidates,
                weights: &weights,
                loss_positions,
            })
            .collect();
        loss_and_gradients(&self.lm.model, &inputs, |e, logits| {
            let ex = &self.examples[e];
            let first_nll = -(ex.head_logprobs.get(prompt[0] as usize)?.to_scalar::<f32>()? as f64);
            let n_answer = ex.answer.len();
            let answer =
                cross_entropy(&logits.narrow(0, 0, n_answer)?, &ex.answer, self.cfg.temperature)?;
            let mut nll_sum = (answer.ones_like()? * first_nll)?;
            if len > 1 {
                let rest = cross_entropy(&logits.narrow(0, n_answer, len - 1)?, &prompt[1..], 1.0)?;
                nll_sum = (nll_sum + (rest * (len - 1) as f64)?)?;
            }
            Ok((answer + (nll_sum * (self.cfg.control_weight / len as f64))?)?)
        })
    }

    /// d loss / d one-hot over `candidates` at `position`, combined over the train examples
    /// as the settings say.
    pub fn gradient(
        &self,
        prompt: &[u32],
        position: usize,
        candidates: &[u32],
        reasoning: &[Vec<u32>],
    ) -> Result<Vec<f32>> {
        let per_example: Vec<Vec<f32>> = self
            .example_gradients(prompt, position, candidates, reasoning)?
            .into_iter()
            .map(|(_, g)| g)
            .collect();
        Ok(combine_gradients(&per_example, self.cfg.gradient_sum))
    }

    /// One gradient pass at the current position over a reasoning of `reasoning_len` tokens
    /// (for timing: a pass costs the same whatever the tokens, and the state holds no
    /// reasoning when the prompt has just grown).
    pub fn time_one_gradient(&self, state: &State, reasoning_len: usize) -> Result<()> {
        let current = state.prompt[state.position];
        let reasoning = vec![vec![current; reasoning_len]];
        self.gradient(&state.prompt, state.position, &[current], &reasoning)?;
        Ok(())
    }

    /// Reasoning (per example) and real score of each prompt on the train examples.
    pub fn reason_and_score_all(
        &self,
        prompts: &[Vec<u32>],
    ) -> Result<Vec<(Vec<Vec<u32>>, Score)>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let replies = self.reason(prompts)?;
        let reasoning: Vec<Vec<Vec<u32>>> =
            replies.iter().map(|rs| rs.iter().map(|g| g.ids.clone()).collect()).collect();
        Ok(reasoning.into_iter().zip(self.score(prompts, replies)?).collect())
    }

    /// Reasoning (per example) and real score of `prompt` on the train examples.
    pub fn reason_and_score(&self, prompt: &[u32]) -> Result<(Vec<Vec<u32>>, Score)> {
        Ok(self.reason_and_score_all(&[prompt.to_vec()])?.remove(0))
    }

    /// The train score of a prompt given as text.
    pub fn score_text(&self, text: &str) -> Result<Score> {
        Ok(self.reason_and_score(&self.prompt_ids(text)?)?.1)
    }

    /// The state before the first step: each starting prompt scored, the search starting
    /// from the best (the first on ties).
    pub fn initial_state(&self, starts: &[&str]) -> Result<State> {
        let mut scores = BTreeMap::new();
        let mut best: Option<(Vec<u32>, Vec<Vec<u32>>, f64)> = None;
        let mut generated_tokens = 0;
        for text in starts {
            let prompt = self.prompt_ids(text)?;
            let (reasoning, score) = self.reason_and_score(&prompt)?;
            generated_tokens += reasoning.iter().map(Vec::len).sum::<usize>();
            let value = score.score;
            scores.insert(self.prompt_text(&prompt)?, score);
            if best.as_ref().is_none_or(|b| value < b.2) {
                best = Some((prompt, reasoning, value));
            }
        }
        let Some((prompt, reasoning, best_score)) = best else { bail!("no starting prompt") };
        Ok(State {
            generated_tokens,
            step: 0,
            position: 0,
            reasoning: Some(reasoning),
            best_prompt: prompt.clone(),
            best_score,
            steps_since_best: 0,
            initial_len: prompt.len(),
            scores,
            prompt,
            dev_checks: Vec::new(),
            token_search_from: None,
        })
    }

    /// The token search's start after APE's rounds (`ape+greater`): APE's best instruction
    /// by train score, from its first position, its reasoning regenerated at the first step.
    pub fn start_token_search(&self, state: &mut State) {
        state.prompt = state.best_prompt.clone();
        state.position = 0;
        state.reasoning = None;
        state.initial_len = state.prompt.len();
        state.steps_since_best = 0;
        state.token_search_from = Some(state.step);
    }

    /// Does the sentence-end rule take `token` at `position` at once?
    fn takes_at_once(&self, state: &State, position: usize, token: u32) -> Result<bool> {
        Ok(self.cfg.sentence_end_rule
            && 2 * position >= state.initial_len
            && ends_sentence(&self.lm.tokenizer.decode_with_special(&[token])?))
    }

    /// Stages 1-4 of a step at `state.position`: the current prompt's reasoning (regenerated
    /// when `state` does not hold it), candidate tokens from the model's own distribution,
    /// ranked by the gradient over that reasoning, and the best few shortlisted.
    pub fn shortlist(&self, state: &State) -> Result<Shortlist> {
        let mut secs = Seconds::default();
        let (prompt, position) = (&state.prompt, state.position);

        // 1. The reasoning of the current prompt (known from the last check unless it grew).
        let t = Instant::now();
        let (reasoning, reasoning_score) = match state.reasoning.clone() {
            Some(r) => (r, None),
            None => {
                let (reasoning, score) = self.reason_and_score(prompt)?;
                (reasoning, Some(score))
            }
        };
        secs.reasoning += t.elapsed().as_secs_f64();

        // 2. Candidates from the model's own next-token distribution at the position.
        let t = Instant::now();
        let (_, ranked) = self.prompt_stats(
            prompt,
            &self.prompt_hidden(std::slice::from_ref(prompt))?[0],
            Some(position),
        )?;
        let proposal = ProposalConfig {
            top_k: self.cfg.top_k,
            subsets: self.cfg.top_q,
            subset_size: self.cfg.subset_size,
            min_candidates: 2 * self.cfg.shortlist,
        };
        let mut rng = self.step_rng(state.step);
        let candidates = propose(&ranked, prompt[position], &proposal, &mut rng);
        secs.proposal += t.elapsed().as_secs_f64();

        // 3-4. The gradient over reasoning ranks them; the best few are shortlisted.
        let t = Instant::now();
        let grad = self.gradient(prompt, position, &candidates, &reasoning)?;
        let excluded = (!self.cfg.keep_current).then_some(prompt[position]);
        let short = shortlist(&candidates, &grad, excluded, self.cfg.shortlist);
        secs.gradient += t.elapsed().as_secs_f64();
        Ok(Shortlist { reasoning, reasoning_score, candidates, short, seconds: secs })
    }

    /// One step of the method at `state.position`, on the step's train questions; `state`
    /// moves on.
    pub fn step(&self, state: &mut State) -> Result<StepRecord> {
        match self.step_questions(state.step) {
            None => self.step_on_all(state),
            Some(questions) => self.step_on_batch(state, questions),
        }
    }

    /// A step on a batch of the train questions. Scores measured on other questions do not
    /// compare with this batch's, so the step sees only its own: the running best re-scored
    /// on the batch (the paired comparison), the current prompt's reasoning regenerated.
    /// The run keeps each prompt's latest batch score.
    fn step_on_batch(&self, state: &mut State, questions: Vec<usize>) -> Result<StepRecord> {
        let batch = self.on_questions(&questions);
        let (best_reasoning, best) = batch.reason_and_score(&state.best_prompt)?;
        let best_tokens: usize = best_reasoning.iter().map(Vec::len).sum();
        let mut local = State {
            reasoning: (state.prompt == state.best_prompt).then_some(best_reasoning),
            best_score: best.score,
            scores: BTreeMap::from([(self.prompt_text(&state.best_prompt)?, best.clone())]),
            ..state.clone()
        };
        let mut record = batch.step_on_all(&mut local)?;
        record.generated_tokens += best_tokens;
        local.generated_tokens += best_tokens;
        if let Search::Token(t) = &mut record.search {
            t.questions = Some(questions);
            t.best_on_questions = Some(Box::new(best));
        }
        let mut scores = std::mem::take(&mut state.scores);
        scores.append(&mut local.scores);
        *state = State { scores, reasoning: None, ..local };
        Ok(record)
    }

    /// One step at `state.position` on every train question of this optimiser.
    fn step_on_all(&self, state: &mut State) -> Result<StepRecord> {
        let (prompt, position) = (state.prompt.clone(), state.position);
        let prompt_before = self.prompt_text(&prompt)?;
        // 1-4. Reasoning, candidates, gradient, shortlist.
        let Shortlist { reasoning, reasoning_score, candidates, mut short, mut seconds } =
            self.shortlist(state)?;
        let mut generated_tokens = 0;
        if let Some(score) = &reasoning_score {
            state.scores.insert(prompt_before.clone(), score.clone());
            generated_tokens += reasoning.iter().map(Vec::len).sum::<usize>();
        }
        let at_once = self.stop_at_sentence_end(state, &mut short)?;
        // 5. Check the shortlist for real: regenerate the reasoning and score.
        let t = Instant::now();
        // The current prompt's score (the check adds only prompts not scored before).
        let current = state.scores.get(&prompt_before).cloned();
        let (checked, mut fresh, tokens) = self.check(state, &short, at_once, current.as_ref())?;
        seconds.checking += t.elapsed().as_secs_f64();
        generated_tokens += tokens;
        // 6. Move to the chosen prompt; remember the best.
        let current_score = current.as_ref().map(|s| s.score);
        // A candidate out of the race cannot be chosen: it competes as never right.
        let scores: Vec<Score> = checked
            .iter()
            .map(|c| match c.raced_out_after {
                None => c.score.clone(),
                Some(_) => {
                    Score { score: f64::INFINITY, mistakes: usize::MAX / 2, ..c.score.clone() }
                }
            })
            .collect();
        let chosen =
            choose(&scores, at_once, current.as_ref(), self.cfg.accept).map(|i| checked[i].clone());
        remember_best(state, &checked);
        if let Some(c) = chosen.as_ref().filter(|c| c.id != prompt[position]) {
            state.prompt[position] = c.id;
            state.reasoning = fresh.remove(&state.prompt);
        }
        // 7. Move on: the next position, wrapping after a sentence end, growing the prompt, or
        // restarting at 0.
        let t = Instant::now();
        self.move_on(state, chosen.as_ref().map(|c| c.score.score).or(current_score))?;
        seconds.proposal += t.elapsed().as_secs_f64();
        state.step += 1;
        state.generated_tokens += generated_tokens;
        Ok(StepRecord {
            step: state.step,
            prompt_before,
            search: Search::Token(TokenStep {
                position,
                candidates: candidates
                    .iter()
                    .map(|&c| self.token_text(c))
                    .collect::<Result<_>>()?,
                checked,
                chosen: chosen.map(|c| TokenText { id: c.id, text: c.text }),
                next_position: state.position,
                current: reasoning_score,
                questions: None,
                best_on_questions: None,
            }),
            prompt: self.prompt_text(&state.prompt)?,
            best_prompt: self.prompt_text(&state.best_prompt)?,
            best_score: state.best_score,
            seconds,
            generated_tokens,
        })
    }

    /// The sentence-end rule: the shortlist ends at the first token it takes at once, and
    /// whether there is one.
    fn stop_at_sentence_end(&self, state: &State, short: &mut Vec<(u32, f32)>) -> Result<bool> {
        for i in 0..short.len() {
            if self.takes_at_once(state, state.position, short[i].0)? {
                short.truncate(i + 1);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Stage 5: each shortlisted prompt's reasoning regenerated and scored (unless a
    /// prompt of the same text was scored before), raced with `race` (see [`Self::race`]).
    /// The checked prompts in shortlist order, the new reasonings by prompt, and the tokens
    /// decoded.
    #[allow(clippy::type_complexity)]
    fn check(
        &self,
        state: &mut State,
        short: &[(u32, f32)],
        at_once: bool,
        current: Option<&Score>,
    ) -> Result<(Vec<Checked>, HashMap<Vec<u32>, Vec<Vec<u32>>>, usize)> {
        let with = |token: u32| {
            let mut p = state.prompt.clone();
            p[state.position] = token;
            p
        };
        let texts: Vec<String> =
            short.iter().map(|&(tok, _)| self.prompt_text(&with(tok))).collect::<Result<_>>()?;
        let unscored: Vec<Vec<u32>> = short
            .iter()
            .zip(&texts)
            .filter(|(_, text)| !state.scores.contains_key(*text))
            .map(|(&(tok, _), _)| with(tok))
            .collect();
        let known: Vec<&Score> = texts.iter().filter_map(|t| state.scores.get(t)).collect();
        // The sentence-end rule takes its token whatever the scores: nothing to race.
        let results = if self.cfg.race && !at_once {
            self.race(&unscored, &known, current, state.best_score)?
        } else {
            self.reason_and_score_all(&unscored)?.into_iter().map(|(r, s)| (r, s, None)).collect()
        };
        let mut fresh = HashMap::new();
        let mut raced = HashMap::new();
        let mut tokens = 0;
        for (p, (reasoning, score, out_after)) in unscored.iter().zip(results) {
            tokens += reasoning.iter().map(Vec::len).sum::<usize>();
            let text = self.prompt_text(p)?;
            match out_after {
                // A partial score is not a train score: it stays out of the run's scores.
                Some(seen) => {
                    raced.insert(text, (score, seen));
                }
                None => {
                    state.scores.insert(text, score);
                    fresh.insert(p.clone(), reasoning);
                }
            }
        }
        let mut checked = Vec::with_capacity(short.len());
        for (&(id, gradient), text) in short.iter().zip(texts) {
            let (score, raced_out_after) = match raced.get(&text) {
                Some((score, seen)) => (score.clone(), Some(*seen)),
                None => (state.scores[&text].clone(), None),
            };
            checked.push(Checked {
                id,
                text: self.lm.tokenizer.decode_with_special(&[id])?,
                gradient,
                prompt: text,
                score,
                raced_out_after,
            });
        }
        Ok((checked, fresh, tokens))
    }

    /// The race of stage 5: `prompts` reasoned and scored a batch of questions at a time,
    /// all of them together; a prompt leaves the race once its score so far, with every
    /// remaining question right and its NLLs at 0, is above a score that it would have to
    /// beat: a `known` candidate's full score (ties go to the later candidate, so only
    /// above), the current prompt's under `not_worse`; under `margin:N`, also once it has too
    /// many mistakes to save N and is above the best so far. Then it can be neither chosen nor
    /// the new best, and the step's choice is the full check's. Per prompt: the reasoning
    /// decoded, the score on the questions met, and how many it met when it left the race.
    #[allow(clippy::type_complexity)]
    fn race(
        &self,
        prompts: &[Vec<u32>],
        known: &[&Score],
        current: Option<&Score>,
        best_score: f64,
    ) -> Result<Vec<(Vec<Vec<u32>>, Score, Option<usize>)>> {
        let n = self.examples.len();
        // The scores a racer must beat: those of candidates that compete for the choice.
        let competes = |s: &Score| match (self.cfg.accept, current) {
            (Accept::Margin(m), Some(c)) => s.mistakes + m <= c.mistakes,
            _ => true,
        };
        let mut bar =
            known.iter().filter(|s| competes(s)).map(|s| s.score).fold(f64::INFINITY, f64::min);
        if let (Accept::NotWorse, Some(c)) = (self.cfg.accept, current) {
            bar = bar.min(c.score);
        }
        let mut parts: Vec<Vec<(Vec<Vec<u32>>, Score)>> = vec![Vec::new(); prompts.len()];
        let mut out: Vec<Option<usize>> = vec![None; prompts.len()];
        // Without a score to beat, the first prompt is checked in full to set one.
        let mut first = 0;
        if bar.is_infinite() && !prompts.is_empty() {
            let (reasoning, score) = self.reason_and_score(&prompts[0])?;
            if competes(&score) {
                bar = bar.min(score.score);
            }
            parts[0].push((reasoning, score));
            first = 1;
        }
        let mut start = 0;
        while start < n {
            // Half of the questions left each round: scores of a step's candidates lie close
            // together, so a racer is mostly out near the end, where the rounds are short.
            let questions: Vec<usize> = (start..start + (n - start).div_ceil(2)).collect();
            let racing: Vec<usize> = (first..prompts.len()).filter(|&i| out[i].is_none()).collect();
            if racing.is_empty() {
                break;
            }
            let batch = self.on_questions(&questions);
            let these: Vec<Vec<u32>> = racing.iter().map(|&i| prompts[i].clone()).collect();
            for (&i, result) in racing.iter().zip(batch.reason_and_score_all(&these)?) {
                parts[i].push(result);
                let seen = start + questions.len();
                if seen == n {
                    continue;
                }
                let so_far = self.pooled(&parts[i]);
                // Every remaining answer right and every NLL at 0: the lowest it can end at.
                let lowest = so_far.score * seen as f64 / n as f64;
                // Mistakes only add up: one that cannot save enough now never will.
                if lowest > bar || (!competes(&so_far) && lowest > best_score) {
                    out[i] = Some(seen);
                }
            }
            start += questions.len();
        }
        Ok(parts
            .into_iter()
            .zip(out)
            .map(|(p, out)| {
                let reasoning = p.iter().flat_map(|(r, _)| r.iter().cloned()).collect();
                (reasoning, self.pooled(&p), out)
            })
            .collect())
    }

    /// One score over disjoint question batches' scores, as if scored together.
    fn pooled(&self, parts: &[(Vec<Vec<u32>>, Score)]) -> Score {
        let n: usize = parts.iter().map(|(_, s)| s.n).sum();
        let mean = |f: &dyn Fn(&Score) -> f64| {
            parts.iter().map(|(_, s)| f(s) * s.n as f64).sum::<f64>() / n.max(1) as f64
        };
        let mistakes = parts.iter().map(|(_, s)| s.mistakes).sum::<usize>();
        let (nll, answer_nll) = (mean(&|s| s.nll), mean(&|s| s.answer_nll));
        Score {
            score: self.real_score(mistakes, n.max(1), nll, answer_nll),
            mistakes,
            cut: parts.iter().map(|(_, s)| s.cut).sum(),
            n,
            nll,
            answer_nll,
            reasoning_tokens: Some(mean(&|s| s.reasoning_tokens.unwrap_or(0.0))),
        }
    }

    /// Stage 7: the next position after a step whose prompt scored `score`; a prompt that
    /// grows gets its filler token and loses its reasoning.
    fn move_on(&self, state: &mut State, score: Option<f64>) -> Result<()> {
        let last =
            self.lm.tokenizer.decode_with_special(&state.prompt[state.prompt.len() - 1..])?;
        let restart = restarts(score, self.cfg.restart_below);
        state.position = match next_position(state.position, state.prompt.len(), &last, restart) {
            Next::At(p) => p,
            Next::Grow => match self.filler(&state.prompt)? {
                Some(token) => {
                    state.prompt.push(token);
                    state.reasoning = None;
                    state.prompt.len() - 1
                }
                None => 0,
            },
        };
        Ok(())
    }

    /// The token appended when the prompt grows, such that the prompt still encodes back
    /// to its ids: the underscore (the reference's), or when it would merge with the token
    /// before it (`_` after a kept `_`: every later candidate would then fail the round
    /// trip and the search would stall) or with `filler = likely`, the admissible token
    /// most examples rank first. None when there is none: the search goes back to 0.
    pub fn filler(&self, prompt: &[u32]) -> Result<Option<u32>> {
        if self.cfg.filler == Filler::Underscore {
            let ids = self.lm.tokenizer.encode_continuation("_")?;
            let underscore = *ids.last().expect("'_' has a token");
            if self.round_trips(&[prompt, &[underscore]].concat())? {
                return Ok(Some(underscore));
            }
        }
        let (_, ranked) = self.prompt_stats(
            prompt,
            &self.prompt_hidden(&[prompt.to_vec()])?[0],
            Some(prompt.len()),
        )?;
        Ok(most_often_first(&ranked))
    }
}

/// Is a token's text in the vocabulary?
pub fn in_vocabulary(vocabulary: Vocabulary, text: &str) -> bool {
    match vocabulary {
        Vocabulary::Reference => {
            matches!(text, "." | "," | " ")
                || (!text.is_empty() && text.chars().all(|c| c.is_ascii_alphabetic() || c == ' '))
        }
        Vocabulary::Ascii => {
            !text.trim().is_empty() && text.bytes().all(|b| (0x20..0x7f).contains(&b))
        }
    }
}

/// The token most examples rank first: a likely placeholder for a new position.
fn most_often_first(ranked: &[Vec<u32>]) -> Option<u32> {
    let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
    for r in ranked {
        if let Some(&t) = r.first() {
            *votes.entry(t).or_default() += 1;
        }
    }
    votes.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).map(|(t, _)| t)
}

/// The best score and prompt so far, after `checked`; the count of steps without a better one.
fn remember_best(state: &mut State, checked: &[Checked]) {
    let mut improved = false;
    for c in checked.iter().filter(|c| c.raced_out_after.is_none()) {
        if c.score.score < state.best_score {
            state.best_score = c.score.score;
            state.best_prompt = state.prompt.clone();
            state.best_prompt[state.position] = c.id;
            improved = true;
        }
    }
    state.steps_since_best = if improved { 0 } else { state.steps_since_best + 1 };
}
