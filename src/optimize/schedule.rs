//! The position schedule: optimise one prompt position per step, left to right.

/// Where the next step works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Optimise this existing position.
    At(usize),
    /// Append one token and optimise it (the new position is the old length).
    Grow,
}

/// After a step at `position` of a prompt of `len` tokens whose last token's text is
/// `last_text`: the next position (the reference's schedule). A restarting step goes back to
/// 0 without growing (where the reference ends its run and starts the next one); otherwise
/// the next position, and past the end, 0 after a sentence end or one token more.
pub fn next_position(position: usize, len: usize, last_text: &str, restart: bool) -> Next {
    if restart {
        Next::At(0)
    } else if position + 1 < len {
        Next::At(position + 1)
    } else if ends_sentence(last_text) {
        Next::At(0)
    } else {
        Next::Grow
    }
}

/// Does a step restart? When the score it ends with (the chosen prompt's, or the current
/// one's if nothing was chosen) is below the threshold.
pub fn restarts(score_after: Option<f64>, restart_below: f64) -> bool {
    score_after.is_some_and(|s| s < restart_below)
}

/// The reference's sentence end: a token whose text holds a `.`.
pub fn ends_sentence(text: &str) -> bool {
    text.contains('.')
}
