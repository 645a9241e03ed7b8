//! `report.html`: one self-contained page showing what a run or a protocol did. The charts
//! are inline SVG drawn with plotters, the page is a minijinja template (HTML-escaped); it
//! loads nothing and holds no URL, so it opens from disk anywhere.

use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Serde, Value};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

pub mod text;

use crate::eval::Record;
use crate::records::{
    EvalSummary, ProtocolConfig, ProtocolTable, RunConfig, Score, ScreenConfig, ScreenTable,
    Search, Seconds, StepRecord, Summary, TaskRow, TokenStep,
};
use crate::settings::Method;
use crate::store::{file, task_folder, RunDir};
use text::{
    baseline_gain_text, difference_text, pooled_baseline_text, pooled_text, protocol_markdown,
    screen_markdown, search_table, summary_table, transfer_paired_text, verdict,
};

const TEMPLATE: &str = include_str!("report.html");
const SIZE: (u32, u32) = (780, 300);
const FONT: (&str, u32) = ("sans-serif", 14);

/// The report of the run or protocol in `dir`, as HTML, with its links relative to the
/// folder `written_in`.
pub fn report_html(dir: &Path, written_in: &Path) -> Result<String> {
    if dir.join(file::PROTOCOL_CONFIG).exists() {
        protocol_page(&RunDir::folder(dir)?, written_in)
    } else {
        run_page(&RunDir::open(dir)?)
    }
}

/// Writes `report.html` into `dir` (or to `out`) and returns where.
pub fn write_report(dir: &Path, out: Option<&Path>) -> Result<std::path::PathBuf> {
    let path = out.map_or_else(|| dir.join(file::REPORT), Path::to_path_buf);
    let folder = RunDir::holding(&path)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: not a file name", path.display()))?;
    let html = report_html(dir, &folder.path)?;
    folder.write_atomic(name, html.as_bytes())?;
    Ok(path)
}

/// A finished run's `summary.md` and `report.html`, from its records.
pub fn write_run_outputs(dir: &Path) -> Result<()> {
    let folder = RunDir::open(dir)?;
    let config: RunConfig = folder.read_json(file::CONFIG)?;
    let summary: Summary = folder.read_json(file::SUMMARY)?;
    folder.write_atomic(file::SUMMARY_MD, summary_table(&summary, &config).as_bytes())?;
    write_report(dir, None)?;
    Ok(())
}

/// A protocol's `protocol.md` and `report.html` for the tasks it has finished.
pub fn write_protocol_outputs(
    dir: &Path,
    table: &ProtocolTable,
    config: &ProtocolConfig,
) -> Result<()> {
    RunDir::folder(dir)?
        .write_atomic(file::PROTOCOL_MD, protocol_markdown(table, config).as_bytes())?;
    write_report(dir, None)?;
    Ok(())
}

/// A screening's `screen.md`.
pub fn write_screen_outputs(dir: &Path, table: &ScreenTable, config: &ScreenConfig) -> Result<()> {
    RunDir::folder(dir)?.write_atomic(file::SCREEN_MD, screen_markdown(table, config).as_bytes())
}

// ---- Pages ----

#[derive(Serialize)]
struct StepRow {
    step: usize,
    position: usize,
    /// The prompt after the step, split around the changed text.
    before: String,
    changed: String,
    after: String,
    checked: Vec<CheckedRow>,
    seconds: String,
}

#[derive(Serialize)]
struct CheckedRow {
    token: String,
    gradient: String,
    score: String,
    mistakes: String,
    chosen: bool,
}

#[derive(Serialize)]
struct AccuracyRow {
    label: String,
    prompt: String,
    train: String,
    dev: String,
    test: String,
    /// Test reasonings cut at the budget, and answers that did not parse.
    cut: String,
    unparsed: String,
}

/// One test question under each measured prompt, for the question viewer.
#[derive(Serialize)]
struct QuestionRow {
    question: String,
    gold: String,
    answers: Vec<AnswerCell>,
    /// Every prompt gave the same parsed answer.
    agree: bool,
}

#[derive(Serialize)]
struct AnswerCell {
    parsed: String,
    correct: bool,
    cut: bool,
    reasoning: String,
}

/// The test questions with each evaluation's answer, read from the records the run wrote
/// (an evaluation of a prompt measured under an earlier label shares that one's file).
fn question_rows(dir: &RunDir, evaluations: &[EvalSummary]) -> Result<Vec<QuestionRow>> {
    let mut columns: Vec<Vec<Record>> = Vec::new();
    for e in evaluations {
        let first = evaluations.iter().find(|f| f.prompt == e.prompt).unwrap_or(e);
        let path = dir.path.join(format!("test-{}.jsonl", first.label.file_stem()));
        if !path.exists() {
            return Ok(Vec::new());
        }
        columns.push(read_records(&path)?);
    }
    let n = columns.iter().map(Vec::len).min().unwrap_or(0);
    Ok((0..n)
        .map(|q| {
            let answers: Vec<AnswerCell> = columns
                .iter()
                .map(|c| AnswerCell {
                    parsed: c[q].parsed_answer.clone().unwrap_or_else(|| "(no answer)".into()),
                    correct: c[q].correct,
                    cut: c[q].cut_by_budget,
                    reasoning: c[q].reasoning.clone(),
                })
                .collect();
            let agree = answers.iter().all(|a| a.parsed == answers[0].parsed);
            QuestionRow {
                question: columns[0][q].question.clone(),
                gold: columns[0][q].gold.clone(),
                answers,
                agree,
            }
        })
        .collect())
}

fn run_page(dir: &RunDir) -> Result<String> {
    let config: RunConfig = dir.read_json(file::CONFIG)?;
    let steps: Vec<StepRecord> = dir.read_steps()?;
    let summary: Option<Summary> =
        if dir.exists(file::SUMMARY) { Some(dir.read_json(file::SUMMARY)?) } else { None };
    let s = &config.settings;
    let title = format!("greater run: {} on {}", config.task.name, s.model);
    let setup = match s.method {
        Method::Ape => format!("{}, {} rounds of proposals", config.setup(), steps.len()),
        _ => format!("{}, {} of {} steps", config.setup(), steps.len(), s.steps),
    };
    let mut figures = vec![(
        "Train score of each step's prompt (dots; lower is better) and the best so far (red line)"
            .to_string(),
        train_svg(&steps)?,
    )];
    let mut rows = Vec::new();
    let mut questions = Vec::new();
    let mut labels = Vec::new();
    let mut verdict_line = "The run has not finished: no held-out accuracy yet.".to_string();
    let mut returned = String::new();
    if let Some(sm) = &summary {
        let dev_points: Vec<(usize, f64)> = sm
            .contenders
            .iter()
            .filter_map(|c| Some((step_of(&steps, &c.prompt), c.dev.as_ref()?.accuracy)))
            .collect();
        if !dev_points.is_empty() {
            figures.push((
                "Dev accuracy of the prompts measured on dev, at the step that found them (0: a starting prompt)".into(),
                dev_svg(&dev_points)?,
            ));
        }
        figures.push(accuracy_figure(sm)?);
        rows = accuracy_rows(sm);
        questions = question_rows(dir, &sm.evaluations)?;
        labels = sm.evaluations.iter().map(|e| e.label.to_string()).collect();
        verdict_line = verdict(sm);
        returned = format!("{} (chosen by {}): {}", sm.selected, sm.selected_by, sm.best_prompt);
    }
    figures.push((
        format!(
            "Seconds per step: {}",
            Seconds::PARTS
                .iter()
                .zip(SERIES_NAMES)
                .map(|(p, c)| format!("{p} ({c})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        seconds_svg(&steps)?,
    ));
    let disagreements = questions.iter().filter(|q| !q.agree).count();
    let env = environment()?;
    let html = env.get_template(file::REPORT)?.render(minijinja::context! {
        title, setup, verdict => verdict_line, returned, figures, accuracy => Value::from(Serde(&rows)),
        budget => s.max_reasoning, questions => Value::from(Serde(&questions)), question_labels => labels, disagreements,
        steps => Value::from(Serde(steps.iter().map(step_row).collect::<Vec<_>>())),
    })?;
    Ok(html)
}

/// Test and dev accuracy of each evaluated prompt, as bars with their intervals: the
/// figure's caption and SVG.
fn accuracy_figure(sm: &Summary) -> Result<(String, String)> {
    let mut bars = Vec::new();
    for e in &sm.evaluations {
        let group = e.label.to_string();
        bars.push(Bar { group: group.clone(), series: 0, value: e.accuracy, interval: e.interval });
        let dev = sm.contenders.iter().find(|c| c.prompt == e.prompt).and_then(|c| c.dev.as_ref());
        if let Some(d) = dev {
            bars.push(Bar { group, series: 1, value: d.accuracy, interval: d.interval });
        }
    }
    let floor = vec![Some(sm.majority_floor); sm.evaluations.len()];
    let caption = format!(
        "Accuracy with 95% intervals: test ({}), dev ({}); dashed: the test split's majority-class floor ({:.3})",
        SERIES_NAMES[0], SERIES_NAMES[1], sm.majority_floor
    );
    Ok((caption, bars_svg(&bars, 2, &floor)?))
}

/// One row per contender: its train score, dev and test accuracy, and the test's cut and
/// unparsed counts.
fn accuracy_rows(sm: &Summary) -> Vec<AccuracyRow> {
    let count = |e: Option<&EvalSummary>, n: fn(&EvalSummary) -> Option<usize>| {
        e.map_or("-".into(), |e| count_cell(&[e], n))
    };
    sm.contenders
        .iter()
        .map(|c| {
            let test = sm.evaluations.iter().find(|e| e.prompt == c.prompt);
            AccuracyRow {
                label: c.label.to_string(),
                prompt: c.prompt.clone(),
                train: format!("{:.3} ({})", c.train.score, c.train.mistakes_text()),
                dev: c.dev.as_ref().map_or("-".into(), accuracy_cell),
                test: test.map_or("-".into(), accuracy_cell),
                cut: count(test, |e| e.cut_by_budget),
                unparsed: count(test, |e| e.unparsed),
            }
        })
        .collect()
}

/// Records of an evaluation (one JSON line per question).
fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

#[derive(Serialize)]
struct TaskLine {
    /// The task's number on the chart's axis.
    number: usize,
    task: String,
    zero_shot_cot: String,
    initial: String,
    optimised: String,
    /// The other methods' returned prompts on test, in the protocol's order.
    baselines: Vec<String>,
    floor: String,
    /// Test reasonings cut at the budget and answers that did not parse, over zero-shot
    /// CoT, the initial and the optimised prompt together.
    cut: String,
    unparsed: String,
    dev: String,
    selected: String,
    steps: usize,
    prompt: String,
    report: Option<String>,
    /// Zero-shot CoT and the returned prompt on the transfer model.
    transfer: Option<[String; 2]>,
}

/// "a/b" summed over `evals`, or "-" when one did not count it.
fn count_cell(evals: &[&EvalSummary], count: fn(&EvalSummary) -> Option<usize>) -> String {
    let counted: Option<usize> = evals.iter().map(|e| count(e)).sum();
    counted.map_or("-".into(), |c| format!("{c}/{}", evals.iter().map(|e| e.n).sum::<usize>()))
}

/// `target` as a path relative to the folder `from` (both absolute), with `/` separators.
/// The link from a page in `from` to `target`: a relative path whose every segment is
/// percent-encoded, starting with `./` or `../`, so that no folder name (a task file named
/// `javascript:alert(1);x.toml`, or `https:evil.com.toml`) can be read as a scheme or a host.
pub fn page_link(from: &Path, target: &Path) -> String {
    let (f, t): (Vec<_>, Vec<_>) = (from.components().collect(), target.components().collect());
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let up = std::iter::repeat_n("..".to_string(), f.len() - common);
    let down = t[common..].iter().map(|c| percent_encoded(&c.as_os_str().to_string_lossy()));
    let path = up.chain(down).collect::<Vec<_>>().join("/");
    if path.starts_with("..") {
        path
    } else {
        format!("./{path}")
    }
}

/// `segment` with every byte but RFC 3986's unreserved ones percent-encoded. (Written here:
/// a dozen lines against a dependency for one call.)
fn percent_encoded(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `text` with the characters a page must not carry as they are (control characters, NUL
/// among them, and the bidirectional overrides and isolates, which can make a prompt read as
/// something it is not) written as visible `[U+XXXX]`; newlines and tabs stay.
pub fn visible(text: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
    };
    if !text.chars().any(hidden) {
        return text.into();
    }
    text.chars()
        .map(|c| if hidden(c) { format!("[U+{:04X}]", c as u32) } else { c.to_string() })
        .collect::<String>()
        .into()
}

/// The protocol page; its links to each task's report are relative to `written_in`, the
/// folder the page is written to.
fn protocol_page(dir: &RunDir, written_in: &Path) -> Result<String> {
    let config: ProtocolConfig = dir.read_json(file::PROTOCOL_CONFIG)?;
    if !dir.exists(file::PROTOCOL) {
        bail!("{}: the protocol has finished no task yet", dir.path.display());
    }
    let table: ProtocolTable = dir.read_json(file::PROTOCOL)?;
    let s = &config.settings;
    let methods = config.methods();
    let setup =
        format!("{}; {} of {} tasks done", config.setup(), table.rows.len(), config.tasks.len());
    let here = dir.path.canonicalize()?;
    let written_in = written_in.canonicalize()?;
    // Tables of versions that did not record the floor: the task's run has it.
    let floors: Vec<Option<f64>> = table
        .rows
        .iter()
        .map(|r| {
            let run = || {
                RunDir::open(&here.join(task_folder(&r.task)))
                    .ok()?
                    .read_json::<Summary>(file::SUMMARY)
                    .ok()
            };
            r.majority_floor.or_else(|| run().map(|s| s.majority_floor))
        })
        .collect();
    let lines: Vec<TaskLine> = (table.rows.iter().enumerate())
        .map(|(i, r)| task_line(i + 1, r, &methods, floors[i], &here, &written_in))
        .collect();
    let gain = difference_text(&table.gain());
    let transfer_paired =
        config.transfer_to.as_deref().and_then(|m| transfer_paired_text(&table.rows, m));
    let gain_lines: Vec<String> = (table.baselines.iter())
        .map(|b| baseline_gain_text(b, methods[0], &table.rows))
        .chain(transfer_paired)
        .collect();
    let figures = vec![protocol_figure(&table, &methods, &lines, &floors)?];
    let search = search_table(&table, methods[0]);
    let env = environment()?;
    let html = env.get_template(file::REPORT)?.render(minijinja::context! {
        title => format!("greater protocol: {}", s.model), setup, figures, tasks => Value::from(Serde(&lines)),
        budget => s.max_reasoning,
        pooled => [pooled_text(&table.zero_shot_cot), pooled_text(&table.initial), pooled_text(&table.optimised)],
        methods => methods[1..].iter().map(|m| m.name()).collect::<Vec<_>>(), pooled_baselines => methods[1..].iter().map(|&m| {
            table.baseline(m).map_or("-".into(), |b| pooled_baseline_text(b, table.rows.len()))
        }).collect::<Vec<_>>(),
        gain, gain_lines, transfer_to => config.transfer_to,
        pooled_transfer => table.transfer.as_ref().map(|(zs, opt)| [pooled_text(zs), pooled_text(opt)]),
        tables => Value::from(Serde(search.into_iter().collect::<Vec<_>>())),
    })?;
    Ok(html)
}

/// Task `number` of a protocol's table as its line on the page: accuracy cells, counts, and
/// the relative link to its run's report when there is one.
fn task_line(
    number: usize,
    r: &TaskRow,
    methods: &[Method],
    floor: Option<f64>,
    here: &Path,
    written_in: &Path,
) -> TaskLine {
    let report = here.join(task_folder(&r.task)).join(file::REPORT);
    let evals = [&r.zero_shot_cot, &r.initial, &r.optimised];
    TaskLine {
        number,
        task: r.task.clone(),
        zero_shot_cot: accuracy_cell(&r.zero_shot_cot),
        initial: accuracy_cell(&r.initial),
        optimised: accuracy_cell(&r.optimised),
        baselines: methods[1..]
            .iter()
            .map(|&m| r.baseline(m).map_or("-".into(), |b| accuracy_cell(&b.optimised)))
            .collect(),
        floor: floor.map_or("-".into(), |f| format!("{f:.3}")),
        cut: count_cell(&evals, |e| e.cut_by_budget),
        unparsed: count_cell(&evals, |e| e.unparsed),
        dev: r.dev_accuracy.map_or("-".into(), |a| format!("{a:.3}")),
        selected: r.selected.to_string(),
        steps: r.steps,
        prompt: r.optimised.prompt.clone(),
        report: report.exists().then(|| page_link(written_in, &report)),
        transfer: r
            .transfer
            .as_ref()
            .map(|t| [accuracy_cell(&t.zero_shot_cot), accuracy_cell(&t.optimised)]),
    }
}

/// Test accuracy of every task under each prompt and method, as bars with their intervals
/// and the tasks' floors: the figure's caption and SVG.
fn protocol_figure(
    table: &ProtocolTable,
    methods: &[Method],
    lines: &[TaskLine],
    floors: &[Option<f64>],
) -> Result<(String, String)> {
    let mut bars = Vec::new();
    for (i, r) in table.rows.iter().enumerate() {
        let baselines = methods[1..].iter().map(|&m| r.baseline(m).map(|b| &b.optimised));
        let evaluations = [&r.zero_shot_cot, &r.initial, &r.optimised].into_iter().map(Some);
        for (series, e) in evaluations.chain(baselines).enumerate() {
            let Some(e) = e else { continue };
            let group = (i + 1).to_string();
            bars.push(Bar { group, series, value: e.accuracy, interval: e.interval });
        }
    }
    let mut series = vec![
        "zero-shot CoT".to_string(),
        "initial".into(),
        format!("optimised ({})", methods[0].name()),
    ];
    series.extend(methods[1..].iter().map(|m| m.name().to_string()));
    let colours: Vec<String> =
        series.iter().zip(SERIES_NAMES.iter().cycle()).map(|(s, c)| format!("{s} ({c})")).collect();
    let numbers: Vec<String> = lines.iter().map(|l| format!("{} {}", l.number, l.task)).collect();
    let caption = format!(
        "Test accuracy per task with 95% intervals: {}; dashed: the majority-class floor. Tasks: {}",
        colours.join(", "),
        numbers.join(", ")
    );
    Ok((caption, bars_svg(&bars, series.len(), floors)?))
}

fn environment() -> Result<minijinja::Environment<'static>> {
    let mut env = minijinja::Environment::new();
    // Every value the page prints is escaped and made visible (the SVG figures, marked
    // safe, are drawn here).
    env.set_formatter(|out, state, value| match value.as_str() {
        Some(text) if !value.is_safe() => {
            minijinja::escape_formatter(out, state, &Value::from(visible(text).as_ref()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    });
    env.add_template(file::REPORT, TEMPLATE)?;
    Ok(env)
}

fn accuracy_cell(e: &EvalSummary) -> String {
    format!(
        "{:.3} [{:.3}, {:.3}] ({} of {})",
        e.accuracy, e.interval.0, e.interval.1, e.correct, e.n
    )
}

/// The first step that produced `prompt` (0: it was there before the search): the step that
/// scored it or moved to it (a prompt grown by the filler is scored only at the next step).
fn step_of(steps: &[StepRecord], prompt: &str) -> usize {
    let produced =
        |r: &StepRecord| r.prompt == prompt || r.scored().iter().any(|(p, _)| *p == prompt);
    steps.iter().find(|r| produced(r)).map_or(0, |r| r.step)
}

/// The train score the curve shows for a step: its chosen prompt's, or when the step kept
/// its prompt (or was an `ape` round), the best it scored.
fn step_score(r: &StepRecord) -> f64 {
    r.token()
        .and_then(TokenStep::chosen_checked)
        .map(|c| c.score.score)
        .or_else(|| r.scored().iter().map(|(_, s)| s.score).min_by(f64::total_cmp))
        .unwrap_or(r.best_score)
}

fn step_row(r: &StepRecord) -> StepRow {
    let (before, changed, after) = split_change(&r.prompt_before, &r.prompt);
    let score_cells = |s: &Score| (format!("{:.3}", s.score), s.mistakes_text());
    let (position, checked) = match &r.search {
        Search::Token(t) => {
            let chosen = t.chosen.as_ref().map(|c| c.id);
            let rows = t.checked.iter().map(|c| {
                let (score, mistakes) = score_cells(&c.score);
                let (token, gradient) = (format!("{:?}", c.text), format!("{:.4}", c.gradient));
                CheckedRow { token, gradient, score, mistakes, chosen: Some(c.id) == chosen }
            });
            (t.position, rows.collect())
        }
        // An `ape` proposal changes no single token: the whole instruction shows.
        Search::Round { proposals } => {
            let rows = proposals.iter().map(|p| {
                let (score, mistakes) = score_cells(&p.score);
                let token = p.prompt.clone();
                CheckedRow { token, gradient: String::new(), score, mistakes, chosen: false }
            });
            (0, rows.collect())
        }
    };
    StepRow {
        step: r.step,
        position,
        before,
        changed,
        after,
        checked,
        seconds: format!("{:.1} s: {}", r.seconds.total(), r.seconds),
    }
}

/// `new` split into the text it shares with `old` at the start, the changed middle, and the
/// shared end; the middle is widened to whole words, so a changed token is marked with the
/// word it belongs to.
pub fn split_change(old: &str, new: &str) -> (String, String, String) {
    let mut prefix: usize =
        old.chars().zip(new.chars()).take_while(|(a, b)| a == b).map(|(a, _)| a.len_utf8()).sum();
    let (old_rest, new_rest) = (&old[prefix..], &new[prefix..]);
    let suffix: usize = old_rest
        .chars()
        .rev()
        .zip(new_rest.chars().rev())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a.len_utf8())
        .sum();
    let mut end = new.len() - suffix;
    if old == new {
        return (new.to_string(), String::new(), String::new());
    }
    prefix = new[..prefix].rfind(char::is_whitespace).map_or(0, |i| i + 1);
    end = new[end..].find(char::is_whitespace).map_or(new.len(), |i| end + i);
    (new[..prefix].to_string(), new[prefix..end].to_string(), new[end..].to_string())
}

// ---- Charts ----

/// Draws into an SVG string. Inline SVG in HTML needs no namespace; without it the page
/// holds no URL at all.
fn svg(draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    Ok(out.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1))
}

/// The colours of the series, and their names for the captions (the charts carry no legend,
/// which would cover data: each caption says which colour is which).
const SERIES: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];
const SERIES_NAMES: [&str; 5] = ["blue", "orange", "green", "red", "purple"];

/// Train score of each step's prompt (dots and line) and the best so far, on their own axis.
fn train_svg(steps: &[StepRecord]) -> Result<String> {
    let points: Vec<(f64, f64)> = steps.iter().map(|r| (r.step as f64, step_score(r))).collect();
    let best: Vec<(f64, f64)> = steps.iter().map(|r| (r.step as f64, r.best_score)).collect();
    let top = points.iter().chain(&best).map(|p| p.1).fold(0.1, f64::max) * 1.1;
    let last = steps.len().max(1) as f64 + 0.5;
    svg(|root| {
        let mut chart = cartesian(root, -0.5..last, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("train score")
            .x_label_formatter(&step_label)
            .label_style(FONT)
            .draw()?;
        let (train, best_color) = (SERIES[0], SERIES[3]);
        chart.draw_series(LineSeries::new(points.iter().copied(), train.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, train.filled())))?;
        chart.draw_series(LineSeries::new(best.iter().copied(), best_color.stroke_width(2)))?;
        Ok(())
    })
}

/// Dev accuracy (0 to 1) of the prompts measured on dev, at the step that found them.
fn dev_svg(dev: &[(usize, f64)]) -> Result<String> {
    let last = dev.iter().map(|d| d.0).max().unwrap_or(0) as f64 + 0.5;
    svg(|root| {
        let mut chart = cartesian(root, -0.5..last, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("dev accuracy")
            .x_label_formatter(&step_label)
            .label_style(FONT)
            .draw()?;
        chart.draw_series(
            dev.iter().map(|&(s, a)| TriangleMarker::new((s as f64, a), 7, SERIES[2].filled())),
        )?;
        Ok(())
    })
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart over `x` and `y` with room for the axis labels.
fn cartesian<'a, 'b: 'a>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    x: Range<f64>,
    y: Range<f64>,
) -> Result<Chart<'a, 'b>> {
    Ok(ChartBuilder::on(root)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(x, y)?)
}

/// Step ticks at whole numbers only.
fn step_label(x: &f64) -> String {
    // As an integer: the tick at 0 of an axis from -0.5 reads "0", not "-0".
    if (x - x.round()).abs() < 1e-6 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

struct Bar {
    group: String,
    series: usize,
    value: f64,
    interval: (f64, f64),
}

/// Accuracy bars (0 to 1) grouped by `group` (short labels: they must not collide), one
/// colour per series, each with its interval as an error bar; a dashed line across a group
/// at its majority-class floor where `floors` has one (one entry per group, in order).
fn bars_svg(bars: &[Bar], series: usize, floors: &[Option<f64>]) -> Result<String> {
    let mut groups: Vec<&str> = Vec::new();
    for b in bars {
        if !groups.contains(&b.group.as_str()) {
            groups.push(&b.group);
        }
    }
    let width = 0.8 / series.max(1) as f64;
    let x_of = |b: &Bar| {
        let g = groups.iter().position(|g| *g == b.group).unwrap_or(0) as f64;
        g - 0.4 + width * (b.series as f64 + 0.5)
    };
    svg(|root| {
        let mut chart = cartesian(root, -0.5..groups.len() as f64 - 0.5, 0.0..1.0)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len().max(1) * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    groups.get(i as usize).map_or(String::new(), |g| g.to_string())
                } else {
                    String::new()
                }
            })
            .y_desc("accuracy")
            .label_style(FONT)
            .draw()?;
        for s in 0..series {
            let color = SERIES[s % SERIES.len()];
            let mine: Vec<&Bar> = bars.iter().filter(|b| b.series == s).collect();
            chart.draw_series(mine.iter().map(|b| {
                let x = x_of(b);
                Rectangle::new(
                    [(x - width * 0.45, 0.0), (x + width * 0.45, b.value)],
                    color.filled(),
                )
            }))?;
            chart.draw_series(mine.iter().map(|b| {
                ErrorBar::new_vertical(
                    x_of(b),
                    b.interval.0,
                    b.value,
                    b.interval.1,
                    BLACK.stroke_width(1),
                    8,
                )
            }))?;
        }
        for (g, floor) in floors.iter().enumerate() {
            if let Some(f) = floor {
                let (from, to) = (g as f64 - 0.45, g as f64 + 0.45);
                chart.draw_series(DashedLineSeries::new(
                    [(from, *f), (to, *f)],
                    6,
                    4,
                    BLACK.stroke_width(2),
                ))?;
            }
        }
        Ok(())
    })
}

/// Seconds of each step, stacked: reasoning, proposal, gradient, checking.
fn seconds_svg(steps: &[StepRecord]) -> Result<String> {
    let top = steps.iter().map(|r| r.seconds.total()).fold(1.0, f64::max) * 1.1;
    let last = steps.len().max(1) as f64 + 0.5;
    svg(|root| {
        let mut chart = cartesian(root, 0.5..last, 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("step")
            .y_desc("seconds")
            .x_label_formatter(&step_label)
            .label_style(FONT)
            .draw()?;
        for k in 0..Seconds::PARTS.len() {
            let color = SERIES[k];
            chart.draw_series(steps.iter().map(|r| {
                let p = r.seconds.parts();
                let (lo, hi) = (p[..k].iter().sum::<f64>(), p[..=k].iter().sum::<f64>());
                let x = r.step as f64;
                Rectangle::new([(x - 0.35, lo), (x + 0.35, hi)], color.filled())
            }))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{split_change, step_of};
    use crate::records::{test_step, StepRecord};

    /// A step from `before` that checked `checked`, chose the first and ended with `after`.
    fn step(n: usize, before: &str, checked: &[&str], after: &str) -> StepRecord {
        let score = json!({ "score": 0.5, "mistakes": 1, "n": 2, "nll": 1.0, "answer_nll": 0.0 });
        let checked: Vec<_> = (0..).zip(checked).map(|(i, p)| (i, *p, score.clone())).collect();
        test_step(n, before, &checked, 0, after, 0.5)
    }

    #[test]
    fn a_prompt_belongs_to_the_step_that_checked_or_grew_it() {
        // Step 1 moves to "B" and grows it to "B_", which only step 2 scores.
        let steps = [step(1, "A", &["B", "C"], "B_"), step(2, "B_", &["D"], "D")];
        let at = |p| step_of(&steps, p);
        assert_eq!([at("A"), at("B"), at("C"), at("B_"), at("D"), at("E")], [0, 1, 1, 1, 2, 0]);
    }

    #[test]
    fn the_changed_text_is_marked_as_whole_words() {
        let split = |a, b| {
            let (x, y, z) = split_change(a, b);
            [x, y, z]
        };
        assert_eq!(
            split("more impactful reasoning and", "more impactful wording and"),
            ["more impactful ", "wording", " and"]
        );
        assert_eq!(split("proper logical", "more logical"), ["", "more", " logical"]);
        assert_eq!(
            split("think step by step.", "think step by step._"),
            ["think step by ", "step._", ""]
        );
        assert_eq!(split("same", "same"), ["same", "", ""]);
    }
}
