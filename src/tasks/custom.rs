//! A user's own task, described by a TOML file next to its data (JSONL, CSV or a JSON array):
//!
//! ```toml
//! name = "reviews"
//! data = "reviews.jsonl"                       # relative to this file
//! question = "text"                            # the field holding the question, or
//! # question_template = "{title}\n{text}"      # several fields
//! answer = "label"                             # the field holding the gold answer
//! answer_kind = "choice"                       # choice, yes_no, true_false, valid_invalid,
//! choices = 4                                  # true_false_uncertain, integer, text
//! # extractor = "..."                          # default: the paper's hint for the kind
//! # initial_prompt = "..."
//! ```

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use super::sources::{example, field, read, read_jsonl};
use super::{AnswerKind, Task};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    name: Option<String>,
    data: String,
    question: Option<String>,
    question_template: Option<String>,
    answer: String,
    answer_kind: String,
    choices: Option<usize>,
    extractor: Option<String>,
    initial_prompt: Option<String>,
}

type Row = serde_json::Map<String, Value>;

pub fn load(path: &Path) -> Result<Task> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read task file {}", path.display()))?;
    let spec: Spec =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let kind = match (spec.answer_kind.as_str(), spec.choices) {
        ("choice", Some(n)) if (2..=26).contains(&n) => AnswerKind::Choice { options: n },
        ("choice", _) => bail!("{}: answer_kind = \"choice\" needs choices = N (2 to 26)", path.display()),
        ("yes_no", _) => AnswerKind::YesNo,
        ("true_false", _) => AnswerKind::TrueFalse,
        ("valid_invalid", _) => AnswerKind::ValidInvalid,
        ("true_false_uncertain", _) => AnswerKind::TrueFalseUncertain,
        ("integer", _) => AnswerKind::Integer,
        ("text", _) => AnswerKind::Text,
        (other, _) => bail!(
            "{}: unknown answer_kind '{other}' (choice, yes_no, true_false, valid_invalid, true_false_uncertain, integer, text)",
            path.display()
        ),
    };
    let data = path.parent().unwrap_or(Path::new(".")).join(&spec.data);
    let rows = read_rows(&data)?;
    if rows.is_empty() {
        bail!("{}: no examples", data.display());
    }
    let question_of = |row: &Row, place: &dyn Fn() -> String| -> Result<String> {
        match (&spec.question, &spec.question_template) {
            (Some(f), None) => field(row, f, place),
            (None, Some(t)) => fill_template(t, row, place),
            _ => bail!(
                "{}: give exactly one of question = \"field\" or question_template = \"...\"",
                path.display()
            ),
        }
    };
    let examples = rows
        .iter()
        .map(|(place, row)| {
            let place = || place.clone();
            let question = question_of(row, &place)?;
            if question.trim().is_empty() {
                bail!("{}: the question is empty", place());
            }
            example(kind, question, &field(row, &spec.answer, &place)?, &place)
        })
        .collect::<Result<Vec<_>>>()?;
    let name = spec.name.unwrap_or_else(|| {
        path.file_stem().and_then(|s| s.to_str()).unwrap_or("custom").to_string()
    });
    let mut task = Task::new(&name, kind, examples, data.display().to_string());
    if let Some(e) = spec.extractor {
        task.extractor = e;
    }
    if let Some(p) = spec.initial_prompt {
        task.initial_prompt = p;
    }
    Ok(task)
}

/// Rows with a description of where each came from ("file:line").
fn read_rows(path: &Path) -> Result<Vec<(String, Row)>> {
    let shown = path.display().to_string();
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => {
            Ok(read_jsonl(path)?.into_iter().map(|(l, r)| (format!("{shown}:{l}"), r)).collect())
        }
        Some("json") => {
            let text = read(path)?;
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{shown}:{}:{}: {e}", e.line(), e.column()))?;
            let Value::Array(items) = value else {
                bail!("{shown}: expected a JSON array of objects")
            };
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Object(m) => Ok((format!("{shown}: element {}", i + 1), m)),
                    _ => bail!("{shown}: element {} is not an object", i + 1),
                })
                .collect()
        }
        Some("csv") => {
            let mut reader =
                csv::Reader::from_path(path).with_context(|| format!("cannot read {shown}"))?;
            let headers = reader.headers().map_err(|e| anyhow::anyhow!("{shown}:1: {e}"))?.clone();
            reader
                .records()
                .map(|rec| {
                    let rec = rec.map_err(|e| {
                        let line = e.position().map(|p| p.line()).unwrap_or(0);
                        anyhow::anyhow!("{shown}:{line}: {e}")
                    })?;
                    let line = rec.position().map(|p| p.line()).unwrap_or(0);
                    let row: Row = headers
                        .iter()
                        .zip(rec.iter())
                        .map(|(h, v)| (h.to_string(), Value::String(v.into())))
                        .collect();
                    Ok((format!("{shown}:{line}"), row))
                })
                .collect()
        }
        _ => bail!("{shown}: data must be .jsonl, .csv or .json"),
    }
}

/// `{field}` replaced by each field's value.
fn fill_template(template: &str, row: &Row, place: &dyn Fn() -> String) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .with_context(|| format!("unclosed '{{' in question_template: {template}"))?;
        out.push_str(&rest[..open]);
        out.push_str(&field(row, &rest[open + 1..close], place)?);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
