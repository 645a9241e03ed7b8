//! Answer kinds: what a gold answer looks like, the extractor text that asks for it, and
//! how a small model's raw answer is parsed into the same normal form.

use serde::{Deserialize, Serialize};

/// What kind of answer a task takes: it decides the extractor, the parser and how gold answers are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AnswerKind {
    /// A letter among the first `options` letters.
    Choice {
        /// How many letters, from (A).
        options: usize,
    },
    /// Yes or No.
    YesNo,
    /// True or False.
    TrueFalse,
    /// valid or invalid.
    ValidInvalid,
    /// True, False or Uncertain (FOLIO).
    TrueFalseUncertain,
    /// An integer (GSM8K, counting, arithmetic).
    Integer,
    /// Exact match after normalisation (case, spaces, surrounding punctuation).
    Text,
}

impl AnswerKind {
    /// Closed label sets, in their canonical spelling.
    fn labels(self) -> Option<&'static [&'static str]> {
        Some(match self {
            AnswerKind::YesNo => &["yes", "no"],
            AnswerKind::TrueFalse => &["True", "False"],
            AnswerKind::ValidInvalid => &["valid", "invalid"],
            AnswerKind::TrueFalseUncertain => &["True", "False", "Uncertain"],
            _ => return None,
        })
    }

    /// How many answers a closed label set allows (none for choices, integers and text).
    pub fn label_count(self) -> Option<usize> {
        self.labels().map(<[&str]>::len)
    }

    /// The reference's answer-format hint (its `run_llama3_all.sh`). It ends with `$` (letters,
    /// numbers) or `$ ` (labels), and the answer's tokens follow it directly.
    pub fn default_extractor(self) -> String {
        match self {
            AnswerKind::Choice { options } => {
                let letters: Vec<String> =
                    (0..options).map(|i| format!("'${}'", (b'A' + i as u8) as char)).collect();
                format!(
                    "Therefore, the final answer (use exact format: {}) is $",
                    letters.join(" or ")
                )
            }
            AnswerKind::Integer => Self::integer_extractor("a positive or negative integer"),
            AnswerKind::Text => "Therefore, the final answer is $".into(),
            kind => {
                let labels: Vec<String> = kind
                    .labels()
                    .unwrap()
                    .iter()
                    .map(|l| format!("'$ {}'", capitalised(l)))
                    .collect();
                format!(
                    "Therefore, the final answer (use exact format: {}) is $ ",
                    labels.join(" or ")
                )
            }
        }
    }

    /// The reference's hint for numbers; `what` says which integers.
    pub fn integer_extractor(what: &str) -> String {
        format!("Therefore, the final answer (use exactly this format: $NUMBER$, where NUMBER is {what}) is $")
    }

    /// The answer as the optimiser targets it: a choice's letter, a number's normal form,
    /// a label or a text as the data spells it (the reference keeps "Yes" and "yes" apart).
    pub fn target(self, raw: &str, answer: &str) -> String {
        let raw = raw.trim();
        match self {
            AnswerKind::Choice { .. } | AnswerKind::Integer => answer.to_string(),
            AnswerKind::Text => raw.to_string(),
            _ if raw.eq_ignore_ascii_case(answer) => raw.to_string(),
            // FOLIO's "Unknown" is asked for as "Uncertain".
            _ => answer.to_string(),
        }
    }

    /// Tokens to generate after the extractor.
    pub fn answer_budget(self) -> usize {
        match self {
            AnswerKind::Text => 48,
            AnswerKind::Integer => 12,
            _ => 6,
        }
    }

    /// The kind as text ("integer", "multiple choice (A)-(E)", ...).
    pub fn describe(self) -> String {
        match self {
            AnswerKind::Choice { options } => {
                format!("choice A-{}", (b'A' + options as u8 - 1) as char)
            }
            AnswerKind::YesNo => "yes/no".into(),
            AnswerKind::TrueFalse => "True/False".into(),
            AnswerKind::ValidInvalid => "valid/invalid".into(),
            AnswerKind::TrueFalseUncertain => "True/False/Uncertain".into(),
            AnswerKind::Integer => "integer".into(),
            AnswerKind::Text => "text".into(),
        }
    }

    /// The normal form of an answer, or None when it is not one of this kind's answers.
    /// Used for gold answers and for what the model writes after the extractor.
    pub fn parse(self, raw: &str) -> Option<String> {
        let line = raw.trim_start().lines().next().unwrap_or("");
        let text = strip_wrapping(line);
        match self {
            AnswerKind::Choice { options } => parse_choice(text, options),
            AnswerKind::Integer => parse_integer(text),
            AnswerKind::Text => {
                let t = normalise_text(text);
                (!t.is_empty()).then_some(t)
            }
            kind => {
                let word: String = text.chars().take_while(|c| c.is_alphabetic()).collect();
                // FOLIO's training split says "Unknown" where its validation split says "Uncertain".
                let word = if kind == AnswerKind::TrueFalseUncertain
                    && word.eq_ignore_ascii_case("unknown")
                {
                    "Uncertain".to_string()
                } else {
                    word
                };
                let labels = kind.labels().unwrap();
                labels.iter().find(|l| l.eq_ignore_ascii_case(&word)).map(|l| l.to_string())
            }
        }
    }
}

/// "yes" -> "Yes"; the reference's extractors capitalise labels ("valid" stays lower case
/// there, as in formal_fallacies' data).
fn capitalised(label: &str) -> String {
    if label == "valid" || label == "invalid" {
        return label.to_string();
    }
    let mut chars = label.chars();
    chars.next().map_or_else(String::new, |c| c.to_uppercase().chain(chars).collect())
}

/// Drops the decorations small models put around an answer: `$`, `**`, quotes,
/// leading spaces.
fn strip_wrapping(s: &str) -> &str {
    s.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '$' | '*' | '"' | '\'' | '`'))
}

fn parse_choice(text: &str, options: usize) -> Option<String> {
    // "(A)", "A", "A.", "A)", "A: text", "Option A".
    let text =
        text.strip_prefix("Option ").or_else(|| text.strip_prefix("option ")).unwrap_or(text);
    let text = text.strip_prefix('(').unwrap_or(text);
    let mut chars = text.chars();
    let letter = chars.next()?.to_ascii_uppercase();
    let after = chars.next();
    let last = (b'A' + options.min(26) as u8 - 1) as char;
    let standalone = after.is_none_or(|c| !c.is_alphanumeric());
    (('A'..=last).contains(&letter) && standalone).then(|| letter.to_string())
}

fn parse_integer(text: &str) -> Option<String> {
    // "-7", "- 7", "1,234", "12.0", "12 apples".
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r.trim_start()),
        None => (false, text),
    };
    let mut digits = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else if c == ',' && !digits.is_empty() {
            // A thousands separator only when three digits follow.
            let ahead: String = chars.clone().skip(1).take(4).collect();
            let three = ahead.chars().take(3).all(|d| d.is_ascii_digit()) && ahead.len() >= 3;
            let fourth_digit = ahead.chars().nth(3).is_some_and(|d| d.is_ascii_digit());
            if !three || fourth_digit {
                break;
            }
        } else {
            break;
        }
        chars.next();
    }
    if digits.is_empty() {
        return None;
    }
    // "12.0" is 12; "12.5" is not an integer.
    if chars.peek() == Some(&'.') {
        let frac: String = chars.skip(1).take_while(|c| c.is_ascii_digit()).collect();
        if frac.chars().any(|d| d != '0') {
            return None;
        }
    }
    let value: i128 = digits.parse().ok()?;
    Some(if negative && value != 0 { format!("-{value}") } else { value.to_string() })
}

/// Lower case, single spaces, no surrounding quotes or final period.
pub fn normalise_text(s: &str) -> String {
    let t = s.trim().trim_end_matches(['.', '$', '*', '"', '\'', '`']).trim();
    t.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}
