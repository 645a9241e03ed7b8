//! Which tokens may go at a prompt position: the model's own top-k, agreed on by random
//! subsets of the train examples, then ranked by the gradient.

use std::collections::BTreeSet;

use rand::seq::index::sample;
use rand::Rng;

use crate::records::Score;
use crate::settings::{Accept, GradientSum};

/// How candidate tokens are proposed (stage 2 of a step).
#[derive(Debug, Clone, PartialEq)]
pub struct ProposalConfig {
    /// Initial k of each example's top-k (reference: 40).
    pub top_k: usize,
    /// Number of random example subsets (reference: 5 to 6).
    pub subsets: usize,
    /// Examples per subset (reference: 5).
    pub subset_size: usize,
    /// Widen k by 2 until the union holds at least this many tokens (2 x shortlist).
    pub min_candidates: usize,
}

/// The candidate set: draw `subsets` random subsets of examples, intersect the examples'
/// top-k token sets inside each subset, take the union over subsets; while the union has
/// fewer than `min_candidates` tokens, widen k by 2 (same subsets). `ranked[e]` is example
/// `e`'s admissible tokens, most likely first. The current token is always included; the
/// result is sorted by token id.
pub fn propose(
    ranked: &[Vec<u32>],
    current: u32,
    cfg: &ProposalConfig,
    rng: &mut impl Rng,
) -> Vec<u32> {
    let subsets = draw_subsets(ranked.len(), cfg.subsets, cfg.subset_size, rng);
    candidates_from_subsets(ranked, &subsets, current, cfg.top_k, cfg.min_candidates)
}

/// `count` random subsets of `size` distinct examples out of `n` (all of them when fewer),
/// each sorted.
pub fn draw_subsets(n: usize, count: usize, size: usize, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    (0..count.max(1))
        .map(|_| {
            let mut s = sample(rng, n, size.min(n).max(1)).into_vec();
            s.sort_unstable();
            s
        })
        .collect()
}

/// The union over `subsets` of the intersection of their members' top-k sets, with k
/// widened by 2 until it holds `min_candidates` tokens (or k covers every ranking).
pub fn candidates_from_subsets(
    ranked: &[Vec<u32>],
    subsets: &[Vec<usize>],
    current: u32,
    top_k: usize,
    min_candidates: usize,
) -> Vec<u32> {
    let longest = ranked.iter().map(Vec::len).max().unwrap_or(0);
    let mut k = top_k.max(1);
    loop {
        let mut union: BTreeSet<u32> = BTreeSet::new();
        for subset in subsets {
            let mut members = subset
                .iter()
                .map(|&e| ranked[e].iter().take(k).copied().collect::<BTreeSet<u32>>());
            let first = members.next().unwrap_or_default();
            union.extend(members.fold(first, |acc, s| acc.intersection(&s).copied().collect()));
        }
        union.insert(current);
        if union.len() >= min_candidates || k >= longest {
            return union.into_iter().collect();
        }
        k += 2;
    }
}

/// The `m` candidates with the most negative gradient, best first, leaving out `excluded`
/// (the current token, when it may not be kept); ties keep the lower token id.
pub fn shortlist(
    candidates: &[u32],
    gradient: &[f32],
    excluded: Option<u32>,
    m: usize,
) -> Vec<(u32, f32)> {
    let mut pairs: Vec<(u32, f32)> = candidates
        .iter()
        .copied()
        .zip(gradient.iter().copied())
        .filter(|(t, _)| Some(*t) != excluded)
        .collect();
    pairs.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    pairs.truncate(m);
    pairs
}

/// The per-example gradients combined into one ranking.
pub fn combine_gradients(gradients: &[Vec<f32>], how: GradientSum) -> Vec<f32> {
    let len = gradients.first().map_or(0, Vec::len);
    let mut total = vec![0f32; len];
    for g in gradients {
        let scale = match how {
            GradientSum::Raw => 1.0,
            GradientSum::PerExample => {
                let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm == 0.0 {
                    continue;
                }
                1.0 / norm
            }
        };
        for (t, x) in total.iter_mut().zip(g) {
            *t += x * scale;
        }
    }
    total
}

/// Which checked token a step takes, given their real scores in gradient order: the lowest
/// score, ties to the later one (the reference's `<=`); the last one when the sentence-end
/// rule took it (`at_once`). Under [`Accept::NotWorse`] nothing is taken when that score is
/// worse than the current prompt's; under [`Accept::Margin`] only candidates with at least
/// that many fewer mistakes than the current prompt compete. Without a current score every
/// candidate may be taken.
pub fn choose(
    scores: &[Score],
    at_once: bool,
    current: Option<&Score>,
    accept: Accept,
) -> Option<usize> {
    let enough_saved = |s: &Score| match (accept, current) {
        (Accept::Margin(n), Some(c)) => s.mistakes + n <= c.mistakes,
        _ => true,
    };
    let mut best: Option<usize> = None;
    for (i, s) in scores.iter().enumerate().filter(|(_, s)| enough_saved(s)) {
        if best.is_none_or(|b| s.score <= scores[b].score) {
            best = Some(i);
        }
    }
    if at_once {
        best = scores.len().checked_sub(1).filter(|&i| enough_saved(&scores[i]));
    }
    let worse = |i: usize| current.is_some_and(|c| scores[i].score > c.score);
    match accept {
        Accept::NotWorse => best.filter(|&i| !worse(i)),
        Accept::Always | Accept::Margin(_) => best,
    }
}
