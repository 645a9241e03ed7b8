//! Choosing the prompt a run returns: the best few by train score, the initial prompt and
//! zero-shot CoT, measured on the dev split; the test split never takes part.

use anyhow::Result;

use crate::records::{Contender, EvalSummary, Score};
use crate::tasks::Example;

/// The prompts with the `n` lowest train scores (ties: the shorter text, then the text),
/// best first.
pub fn best_by_train<'a>(
    scores: impl Iterator<Item = (&'a String, &'a Score)>,
    n: usize,
) -> Vec<(String, Score)> {
    let mut all: Vec<(String, Score)> = scores.map(|(p, s)| (p.clone(), s.clone())).collect();
    all.sort_by(|a, b| {
        a.1.score.total_cmp(&b.1.score).then(a.0.len().cmp(&b.0.len())).then(a.0.cmp(&b.0))
    });
    all.truncate(n);
    all
}

/// Measures every contender on `dev` and returns the index of the best: the highest dev
/// accuracy, ties to the lower train score, then to the earlier contender. Without dev
/// questions the lowest train score wins.
pub fn choose_on_dev(
    contenders: &mut [Contender],
    dev: &[&Example],
    measure: &mut dyn FnMut(&Contender, &[&Example]) -> Result<EvalSummary>,
) -> Result<usize> {
    if !dev.is_empty() {
        for c in contenders.iter_mut() {
            c.dev = Some(measure(c, dev)?);
        }
    }
    let key = |c: &Contender| (c.dev.as_ref().map_or(0.0, |d| d.accuracy), -c.train.score);
    let mut best = 0;
    for (i, c) in contenders.iter().enumerate() {
        let (a, b) = (key(c), key(&contenders[best]));
        if a.0 > b.0 || (a.0 == b.0 && a.1 > b.1) {
            best = i;
        }
    }
    Ok(best)
}
