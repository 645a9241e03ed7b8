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
/// `last_text`: the next position; past the end, wrap to 0 after a sentence end, otherwise
/// grow the prompt by one token (the reference's schedule).
pub fn next_position(position: usize, len: usize, last_text: &str) -> Next {
    if position + 1 < len {
        Next::At(position + 1)
    } else if ends_sentence(last_text) {
        Next::At(0)
    } else {
        Next::Grow
    }
}

/// The reference's sentence end: a token whose text holds a `.`.
pub fn ends_sentence(text: &str) -> bool {
    text.contains('.')
}
