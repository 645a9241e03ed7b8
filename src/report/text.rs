//! The Markdown and plain-text renderings of the records: a run's summary table and verdict,
//! a protocol's and a screening's tables.

use crate::records::{
    human_duration, Difference, EvalSummary, MethodPooled, Pooled, ProtocolConfig, ProtocolTable,
    RunConfig, ScreenConfig, ScreenTable, SearchTrace, Summary, TaskRow,
};
use crate::settings::Method;

/// Share of test reasonings (cut by the budget, or whose answer did not parse) above which
/// the summary says so.
const WARNING_SHARE: f64 = 0.1;

/// (counted, of how many) over the evaluations that counted it, when over the share.
fn over_share(
    evaluations: &[EvalSummary],
    count: impl Fn(&EvalSummary) -> Option<usize>,
) -> Option<(usize, usize)> {
    let (c, n) = evaluations
        .iter()
        .filter_map(|e| Some((count(e)?, e.n)))
        .fold((0, 0), |(c, n), (ec, en)| (c + ec, n + en));
    (n > 0 && c as f64 > WARNING_SHARE * n as f64).then_some((c, n))
}

/// A sentence when many test reasonings ran into the budget: their answers were forced
/// mid-reasoning, so the accuracies measure the budget as much as the prompts.
pub fn budget_warning(evaluations: &[EvalSummary], budget: usize) -> Option<String> {
    over_share(evaluations, |e| e.cut_by_budget).map(|(cut, n)| {
        format!(
            "{cut} of {n} test reasonings ran into the {budget}-token reasoning budget and had their answer forced mid-reasoning; with a larger `--max-reasoning` these accuracies may differ."
        )
    })
}

/// A sentence when many test answers did not parse: they count as wrong, so the accuracies
/// measure the answer format as much as the reasoning.
pub fn unparsed_warning(evaluations: &[EvalSummary]) -> Option<String> {
    over_share(evaluations, |e| e.unparsed).map(|(unparsed, n)| {
        format!(
            "{unparsed} of {n} test answers did not parse and count as wrong: the extractor may not suit this model or task (the raw answers are in test-*.jsonl)."
        )
    })
}

/// One plain sentence: did the returned prompt beat both baselines on the test questions?
pub fn verdict(summary: &Summary) -> String {
    let [zs, initial, optimised] = match summary.evaluations.as_slice() {
        [a, b, c] => [a, b, c],
        _ => return "No test questions: nothing is claimed.".into(),
    };
    let points = |e: &EvalSummary| 100.0 * (optimised.accuracy - e.accuracy);
    let (over_zs, over_initial) = (points(zs), points(initial));
    if summary.selected.is_baseline() {
        return format!(
            "No gain: no searched prompt did better on dev than the {} prompt, which is returned ({:+.1} points over zero-shot CoT, {:+.1} over the initial prompt on {} test questions).",
            summary.selected, over_zs, over_initial, optimised.n
        );
    }
    let word = if over_zs > 0.0 && over_initial > 0.0 { "Gain" } else { "No gain" };
    let mut text = format!(
        "{word}: the optimised prompt scores {over_zs:+.1} points over zero-shot CoT and {over_initial:+.1} over the initial prompt on {} test questions.",
        optimised.n
    );
    if let Some(p) = &summary.paired {
        text.push_str(&format!(
            " Question by question: {} right only with the optimised prompt, {} only with zero-shot CoT (exact McNemar p = {:.3}).",
            p.only_first, p.only_second, p.p_value
        ));
    }
    text
}

/// The Markdown table of a run's test accuracies (zero-shot CoT, initial, optimised) with their intervals.
pub fn summary_table(summary: &Summary, config: &RunConfig) -> String {
    let mut out = format!("# greater run\n\n{}, {} steps\n\n", config.setup(), summary.steps);
    let budget = config.settings.max_reasoning;
    out.push_str(&format!(
        "| prompt | test accuracy | 95% interval | reasoning cut at {budget} tokens | answers unparsed | text |\n|---|---|---|---|---|---|\n"
    ));
    for e in &summary.evaluations {
        out.push_str(&format!(
            "| {} | {:.3} ({}/{}) | [{:.3}, {:.3}] | {} | {} | {} |\n",
            e.label,
            e.accuracy,
            e.correct,
            e.n,
            e.interval.0,
            e.interval.1,
            e.cut_by_budget.map_or("-".into(), |c| format!("{c}/{}", e.n)),
            e.unparsed.map_or("-".into(), |c| format!("{c}/{}", e.n)),
            e.prompt.replace('|', "\\|")
        ));
    }
    out.push_str(&format!("\n{}\n", verdict(summary)));
    for line in
        [budget_warning(&summary.evaluations, budget), unparsed_warning(&summary.evaluations)]
            .into_iter()
            .flatten()
    {
        out.push_str(&format!("\n{line}\n"));
    }
    // With no test questions there is no test split whose floor could be given.
    let floor = if summary.evaluations.is_empty() {
        String::new()
    } else {
        format!("majority-class floor {:.3}. ", summary.majority_floor)
    };
    out.push_str(&format!(
        "\n{floor}The optimised prompt is `{}`, chosen by {} among:\n\n",
        summary.selected, summary.selected_by
    ));
    out.push_str("| prompt | train score | train mistakes | dev accuracy | 95% interval | text |\n|---|---|---|---|---|---|\n");
    for c in &summary.contenders {
        let dev = c.dev.as_ref().map_or(("-".to_string(), "-".to_string()), |d| {
            (
                format!("{:.3} ({}/{})", d.accuracy, d.correct, d.n),
                format!("[{:.3}, {:.3}]", d.interval.0, d.interval.1),
            )
        });
        out.push_str(&format!(
            "| {} | {:.3} | {} | {} | {} | {} |\n",
            c.label,
            c.train.score,
            c.train.mistakes_text(),
            dev.0,
            dev.1,
            c.prompt.replace('|', "\\|")
        ));
    }
    out
}
fn cell(e: &EvalSummary) -> String {
    format!("{:.3} [{:.3}, {:.3}]", e.accuracy, e.interval.0, e.interval.1)
}

/// Per task, how many test reasonings of zero-shot CoT, the initial and the optimised prompt
/// `count` counts (tasks of versions that did not count it are left out): "`what`: task a/b, ...".
fn per_task_line(
    t: &ProtocolTable,
    what: &str,
    count: fn(&EvalSummary) -> Option<usize>,
) -> Option<String> {
    let tasks: Vec<String> = t
        .rows
        .iter()
        .filter_map(|r| {
            let evals = [&r.zero_shot_cot, &r.initial, &r.optimised];
            let counted: usize = evals.iter().map(|e| count(e)).sum::<Option<usize>>()?;
            Some(format!("{} {counted}/{}", r.task, evals.iter().map(|e| e.n).sum::<usize>()))
        })
        .collect();
    (!tasks.is_empty()).then(|| {
        format!("{what} (zero-shot CoT, initial and optimised together): {}\n\n", tasks.join(", "))
    })
}

/// The Markdown of a protocol's table (`protocol.md`).
pub fn protocol_markdown(t: &ProtocolTable, config: &ProtocolConfig) -> String {
    let methods = config.methods();
    let mut out = format!("# greater protocol\n\n{}\n\n", config.setup());
    let target = config.transfer_to.as_deref();
    let mut head =
        format!("| task | zero-shot CoT | initial | optimised ({}) |", methods[0].name());
    for m in &methods[1..] {
        head.push_str(&format!(" {} |", m.name()));
    }
    head.push_str(" dev (optimised) | returned | steps | wall time |");
    if let Some(m) = target {
        head.push_str(&format!(" zero-shot CoT on `{m}` | optimised on `{m}` |"));
    }
    head.push_str(" optimised prompt |");
    let columns = head.matches('|').count() - 1;
    out.push_str(&format!("{head}\n|{}\n", "---|".repeat(columns)));
    for r in &t.rows {
        let mut line = format!(
            "| {} | {} | {} | {} |",
            r.task,
            cell(&r.zero_shot_cot),
            cell(&r.initial),
            cell(&r.optimised)
        );
        for &m in &methods[1..] {
            line.push_str(&format!(
                " {} |",
                r.baseline(m).map_or("-".into(), |b| cell(&b.optimised))
            ));
        }
        line.push_str(&format!(
            " {} | {} | {} | {} |",
            r.dev_accuracy.map_or("-".into(), |a| format!("{a:.3}")),
            r.selected,
            r.steps,
            human_duration(r.wall_seconds)
        ));
        match (&r.transfer, target) {
            (Some(tr), _) => {
                line.push_str(&format!(" {} | {} |", cell(&tr.zero_shot_cot), cell(&tr.optimised)))
            }
            (None, Some(_)) => line.push_str(" - | - |"),
            (None, None) => {}
        }
        out.push_str(&format!("{line} {} |\n", r.optimised.prompt.replace('|', "\\|")));
    }
    let mut line = format!(
        "| all tasks (pooled) | {} | {} | {} |",
        pooled_text(&t.zero_shot_cot),
        pooled_text(&t.initial),
        pooled_text(&t.optimised)
    );
    for &m in &methods[1..] {
        let cell = t.baseline(m).map_or("-".into(), |b| pooled_baseline_text(b, t.rows.len()));
        line.push_str(&format!(" {cell} |"));
    }
    line.push_str(" | | | |");
    match (&t.transfer, target) {
        (Some((zs, opt)), _) => {
            line.push_str(&format!(" {} | {} |", pooled_text(zs), pooled_text(opt)))
        }
        (None, Some(_)) => line.push_str(" | |"),
        (None, None) => {}
    }
    out.push_str(&format!("{line} |\n\n"));
    let budget = config.settings.max_reasoning;
    let cut = per_task_line(t, &format!("test reasonings cut at the {budget}-token budget"), |e| {
        e.cut_by_budget
    });
    let unparsed = per_task_line(t, "test answers that did not parse", |e| e.unparsed);
    for line in [cut, unparsed].into_iter().flatten() {
        out.push_str(&line);
    }
    out.push_str(&format!(
        "Mean gain of {} over zero-shot CoT: {}\n",
        methods[0].name(),
        difference_text(&t.gain())
    ));
    for b in &t.baselines {
        out.push_str(&format!("{}\n", baseline_gain_text(b, methods[0], &t.rows)));
    }
    if let Some(line) = target.and_then(|m| transfer_paired_text(&t.rows, m)) {
        out.push_str(&format!("{line}\n"));
    }
    out.push_str(&search_table(t, methods[0]).map_or(String::new(), |t| t.markdown()));
    out
}

/// "0.317 [0.279, 0.357]": a pooled accuracy and its 95% interval.
pub fn pooled_text(p: &Pooled) -> String {
    format!("{:.3} [{:.3}, {:.3}]", p.accuracy, p.interval.0, p.interval.1)
}

/// A baseline's pooled accuracy, with "(on 2 of 5 tasks)" when it did not run on all `tasks`
/// of the table: beside the first method's pool over every task it would read as comparable.
pub fn pooled_baseline_text(b: &MethodPooled, tasks: usize) -> String {
    let text = pooled_text(&b.optimised);
    match b.fewer_tasks(tasks) {
        Some(ran) => format!("{text} (on {ran} of {tasks} tasks)"),
        None => text,
    }
}

/// "+0.012 (95% interval over tasks [-0.020, +0.044])", or the mean alone without one.
pub fn difference_text(d: &Difference) -> String {
    match d.interval {
        Some((lo, hi)) => format!("{:+.3} (95% interval over tasks [{lo:+.3}, {hi:+.3}])", d.mean),
        None => format!("{:+.3}", d.mean),
    }
}

/// A baseline's mean gain over zero-shot CoT, the tasks it ran on when not all of `rows`',
/// the lead of the `first` method over it on those tasks, and their test questions only one
/// of the two got right, per task.
pub fn baseline_gain_text(b: &MethodPooled, first: Method, rows: &[TaskRow]) -> String {
    let tasks = rows.len();
    let mut text = format!(
        "Mean gain of {} over zero-shot CoT: {}",
        b.method.name(),
        difference_text(&b.gain())
    );
    if let Some(ran) = b.fewer_tasks(tasks) {
        text.push_str(&format!(", on the {ran} of {tasks} tasks it ran on"));
    }
    if let Some(lead) = &b.first_lead {
        text.push_str(&format!(
            "; {} minus {} on the same tasks: {}",
            first.name(),
            b.method.name(),
            difference_text(lead)
        ));
    }
    let paired: Vec<String> = rows
        .iter()
        .filter_map(|r| Some(format!("{} {}", r.task, r.baseline(b.method)?.first_against?.text())))
        .collect();
    if !paired.is_empty() {
        text.push_str(&format!(
            "; test questions right only with {} / only with {} (exact McNemar p): {}",
            first.name(),
            b.method.name(),
            paired.join(", ")
        ));
    }
    text
}

/// Per task, the test questions the returned prompt and zero-shot CoT each alone got right
/// on the transfer model `target` (None when no transfer kept its question counts).
pub fn transfer_paired_text(rows: &[TaskRow], target: &str) -> Option<String> {
    let paired: Vec<String> = rows
        .iter()
        .filter_map(|r| Some(format!("{} {}", r.task, r.transfer.as_ref()?.paired?.text())))
        .collect();
    (!paired.is_empty()).then(|| {
        format!(
            "On `{target}`, test questions right only with the optimised prompt / only with \
             zero-shot CoT (exact McNemar p): {}",
            paired.join(", ")
        )
    })
}

/// The search traces as a table: a gain is made on train, kept through dev selection and
/// confirmed on test, and each column shows one of those stages.
/// A table as titled header and rows of text cells, rendered as Markdown here and as HTML in
/// the report page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TextTable {
    /// Heading.
    pub title: String,
    /// Text under the heading.
    pub note: String,
    /// Column names.
    pub header: Vec<String>,
    /// Cells, row by row.
    pub rows: Vec<Vec<String>>,
}

impl TextTable {
    /// The table as Markdown.
    pub fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | ").replace('\n', " "));
        let mut out = format!("\n## {}\n\n{}\n\n", self.title, self.note);
        out += &line(&self.header);
        out += &format!("|{}\n", "---|".repeat(self.header.len()));
        for row in &self.rows {
            out += &line(row);
        }
        out
    }
}

/// Where the first method's search gained or lost on each task, from its step log and its
/// dev evaluations (None before any task has a trace).
pub fn search_table(t: &ProtocolTable, method: Method) -> Option<TextTable> {
    let traced: Vec<(&TaskRow, &SearchTrace)> =
        t.rows.iter().filter_map(|r| Some((r, r.search.as_ref()?))).collect();
    if traced.is_empty() {
        return None;
    }
    let dev = |a: Option<f64>| a.map_or("-".into(), |a| format!("{a:.3}"));
    let count = |n: Option<usize>| n.map_or("-".into(), |n| n.to_string());
    let rows = traced
        .into_iter()
        .map(|(r, s)| {
            vec![
                r.task.clone(),
                format!("{} -> {} of {}", s.start_mistakes, s.fewest_mistakes, s.train_n),
                format!("{} of {}", s.improving_steps, r.steps),
                s.worse_moves.to_string(),
                format!("{} / {}", s.current_shortlisted, s.current_kept),
                format!("{} -> {}", dev(s.dev_baseline), dev(r.dev_accuracy)),
                format!("{} -> {}", count(s.dev_baseline_cut), count(s.dev_returned_cut)),
                format!("{:.3} -> {:.3}", r.zero_shot_cot.accuracy, r.optimised.accuracy),
                r.paired.map_or("-".into(), |p| p.text()),
                s.step_seconds.map_or("-".into(), |t| format!("{t:.0}")),
            ]
        })
        .collect();
    let header = [
        "task",
        "train mistakes: start -> fewest scored",
        "steps lowering the best train score",
        "steps moving to a worse prompt",
        "current prompt shortlisted / kept",
        "dev: better of zero-shot CoT and initial -> returned",
        "dev reasonings cut at the budget: better start -> returned",
        "test: zero-shot CoT -> optimised",
        "test questions right only with optimised / only with zero-shot CoT (exact McNemar p)",
        "seconds a step (median)",
    ];
    Some(TextTable {
        title: format!("Where {} gained or lost", method.name()),
        note: "From each task's `steps.jsonl` and its dev evaluations.".into(),
        header: header.iter().map(|h| h.to_string()).collect(),
        rows,
    })
}

/// A screening's table: a row per (configuration, task), then each configuration's mean gain.
pub fn screen_markdown(table: &ScreenTable, config: &ScreenConfig) -> String {
    let mut md = String::from(
        "Dev accuracy (no test question was evaluated). Gain: the best searched prompt's dev accuracy minus the \
better of zero-shot CoT and the initial prompt, on the questions that chose it (compare configurations, not the \
gain itself).\n\n| configuration | task | dev n | zero-shot CoT | initial | best searched | gain | train mistakes \
(initial -> fewest) | steps | dev reasonings cut | search minutes | best searched prompt |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let or_none = |v: Option<f64>, signed: bool| match v {
        Some(v) if signed => format!("{v:+.3}"),
        Some(v) => format!("{v:.3}"),
        None => "none".into(),
    };
    for r in &table.rows {
        let configuration = match &r.same_search_as {
            Some(earlier) => format!("{} (= {earlier}'s search)", r.configuration),
            None => r.configuration.clone(),
        };
        md += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {} | {} | {} -> {} | {} | {} | {:.1} | {} |\n",
            configuration,
            r.task,
            r.dev_n,
            r.zero_shot,
            r.initial,
            or_none(r.best_searched, false),
            or_none(r.gain, true),
            r.train_mistakes_initial,
            r.train_mistakes_best,
            r.steps,
            r.dev_cut,
            r.search_seconds / 60.0,
            r.best_prompt.as_deref().unwrap_or("").replace('|', "\\|")
        );
    }
    md += "\n| configuration | settings it changes | mean gain over its tasks |\n|---|---|---|\n";
    for (name, changes) in &config.configurations {
        let changes = changes.trim().replace('\n', "; ").replace('|', "\\|");
        md += &format!("| {name} | {changes} | {} |\n", or_none(table.mean_gain(name), true));
    }
    md
}
