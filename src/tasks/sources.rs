//! Readers for the standard benchmark files: BBH JSON, GSM8K JSONL, FOLIO JSONL.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AnswerKind, Example};

use AnswerKind::*;

/// The 27 BIG-Bench Hard tasks and their answer kinds. Option counts are the largest in
/// each task's data.
pub const BBH: &[(&str, AnswerKind)] = &[
    ("boolean_expressions", TrueFalse),
    ("causal_judgement", YesNo),
    ("date_understanding", Choice { options: 6 }),
    ("disambiguation_qa", Choice { options: 4 }),
    ("dyck_languages", Text),
    ("formal_fallacies", ValidInvalid),
    ("geometric_shapes", Choice { options: 11 }),
    ("hyperbaton", Choice { options: 2 }),
    ("logical_deduction_five_objects", Choice { options: 5 }),
    ("logical_deduction_seven_objects", Choice { options: 7 }),
    ("logical_deduction_three_objects", Choice { options: 3 }),
    ("movie_recommendation", Choice { options: 5 }),
    ("multistep_arithmetic_two", Integer),
    ("navigate", YesNo),
    ("object_counting", Integer),
    ("penguins_in_a_table", Choice { options: 5 }),
    ("reasoning_about_colored_objects", Choice { options: 18 }),
    ("ruin_names", Choice { options: 11 }),
    ("salient_translation_error_detection", Choice { options: 6 }),
    ("snarks", Choice { options: 2 }),
    ("sports_understanding", YesNo),
    ("temporal_sequences", Choice { options: 4 }),
    ("tracking_shuffled_objects_five_objects", Choice { options: 5 }),
    ("tracking_shuffled_objects_seven_objects", Choice { options: 7 }),
    ("tracking_shuffled_objects_three_objects", Choice { options: 3 }),
    ("web_of_lies", YesNo),
    ("word_sorting", Text),
];

pub fn bbh_kind(name: &str) -> Option<AnswerKind> {
    BBH.iter().find(|(n, _)| *n == name).map(|&(_, k)| k)
}

/// A text file; invalid UTF-8 is reported with its line.
pub fn read(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!("{}:{line}: invalid UTF-8 (byte {at})", path.display())
    })
}

/// The option letters the reference's run script lists in the extractor of each
/// multiple-choice task it runs, fixed per task rather than taken from the data (where some
/// questions have more).
pub const REFERENCE_OPTIONS: &[(&str, usize)] = &[
    ("date_understanding", 5),
    ("disambiguation_qa", 3),
    ("geometric_shapes", 10),
    ("hyperbaton", 2),
    ("logical_deduction_five_objects", 5),
    ("movie_recommendation", 4),
    ("penguins_in_a_table", 5),
    ("reasoning_about_colored_objects", 18),
    ("ruin_names", 4),
    ("salient_translation_error_detection", 6),
    ("snarks", 2),
    ("temporal_sequences", 4),
    ("tracking_shuffled_objects_five_objects", 5),
];

/// Which options a multiple-choice extractor lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ExtractorOptions {
    /// As many letters as the task's data has options.
    #[default]
    Data,
    /// The reference's fixed list per task (its run script), the data's where it has none.
    Reference,
}

/// The extractor of a BBH task: the answer kind's, except that sports_understanding asks
/// for lower-case labels (its data is lower case), object_counting for positive numbers,
/// and multiple-choice tasks list the letters `options` says.
pub fn bbh_extractor(name: &str, kind: AnswerKind, options: ExtractorOptions) -> String {
    let reference = REFERENCE_OPTIONS.iter().find(|(n, _)| *n == name).map(|&(_, o)| o);
    match (name, kind, reference, options) {
        ("sports_understanding", ..) => {
            "Therefore, the final answer (use exact format: '$ yes' or '$ no') is $ ".into()
        }
        ("object_counting", ..) => AnswerKind::integer_extractor("a positive integer"),
        (_, Choice { .. }, Some(options), ExtractorOptions::Reference) => {
            Choice { options }.default_extractor()
        }
        _ => kind.default_extractor(),
    }
}

/// A question with its gold answer in normal form and as the data spells it, or an error
/// naming where the gold came from.
pub fn example(
    kind: AnswerKind,
    question: String,
    raw: &str,
    place: &dyn Fn() -> String,
) -> Result<Example> {
    let answer = match kind.parse(raw) {
        Some(gold) => gold,
        None => match (kind, option_by_text(&question, raw)) {
            (Choice { .. }, Some(letter)) => letter,
            _ => {
                bail!("{}: gold answer '{raw}' is not a valid {} answer", place(), kind.describe())
            }
        },
    };
    let target = kind.target(raw, &answer);
    Ok(Example { question, answer, target })
}

/// A few BBH golds are an option's text rather than its letter, and their option lists were
/// split at commas ("dearth, wind, & fire" became "(I) dearth", "(J) wind", ...): the
/// option the gold starts with names the intended answer.
fn option_by_text(input: &str, gold: &str) -> Option<String> {
    input
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('(')?;
            let (letter, text) = rest.split_once(") ")?;
            (letter.len() == 1 && !text.trim().is_empty() && gold.starts_with(text.trim()))
                .then(|| (text.trim().len(), letter.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, letter)| letter)
}

pub fn load_bbh(path: &Path, kind: AnswerKind) -> Result<Vec<Example>> {
    #[derive(Deserialize)]
    struct File {
        examples: Vec<Raw>,
    }
    #[derive(Deserialize)]
    struct Raw {
        input: String,
        target: String,
    }
    let text = read(path)?;
    let file: File = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
    if file.examples.is_empty() {
        bail!("{}: no examples", path.display());
    }
    file.examples
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let place = || format!("{}: example {}", path.display(), i + 1);
            example(kind, r.input, &r.target, &place)
        })
        .collect()
}

/// Non-empty lines of a JSONL file as JSON objects, with their 1-based line numbers.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let text = read(path)?;
    let rows: Vec<_> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(m)) => Ok((i + 1, m)),
            Ok(_) => bail!("{}:{}: expected a JSON object", path.display(), i + 1),
            Err(e) => bail!("{}:{}: invalid JSON: {e}", path.display(), i + 1),
        })
        .collect::<Result<_>>()?;
    if rows.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(rows)
}

/// A string field of a JSON row (numbers and booleans are written out).
pub fn field(
    row: &serde_json::Map<String, Value>,
    name: &str,
    place: &dyn Fn() -> String,
) -> Result<String> {
    match row.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
        Some(_) => bail!("{}: field '{name}' is not a string", place()),
        None => bail!("{}: missing field '{name}'", place()),
    }
}

pub fn load_gsm8k(path: &Path) -> Result<Vec<Example>> {
    read_jsonl(path)?
        .into_iter()
        .map(|(line, row)| {
            let place = || format!("{}:{line}", path.display());
            let question = field(&row, "question", &place)?;
            let answer = field(&row, "answer", &place)?;
            let Some((_, number)) = answer.rsplit_once("####") else {
                bail!("{}: answer has no '#### <number>'", place());
            };
            example(Integer, question, number, &place)
        })
        .collect()
}

pub fn load_folio(path: &Path) -> Result<Vec<Example>> {
    read_jsonl(path)?
        .into_iter()
        .map(|(line, row)| {
            let place = || format!("{}:{line}", path.display());
            let premises = match row.get("premises") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|p| p.as_str().map(|s| format!("- {}", s.trim())))
                    .collect::<Option<Vec<_>>>()
                    .with_context(place)?
                    .join("\n"),
                Some(Value::String(s)) => s.clone(),
                _ => bail!("{}: missing field 'premises'", place()),
            };
            let conclusion = field(&row, "conclusion", &place)?;
            let label = field(&row, "label", &place)?;
            let question = format!(
                "Premises:\n{premises}\nConclusion: {}\nGiven the premises, is the conclusion True, False, or Uncertain?",
                conclusion.trim()
            );
            example(TrueFalseUncertain, question, &label, &place)
        })
        .collect()
}
