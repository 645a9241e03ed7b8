//! `greater export`: the exported chat template renders, in minijinja and in Python's jinja2,
//! the ids greater's own layout reads; the Python script's parser reads answers as greater's.

mod common;

use std::path::Path;

use greater::export::{Laid, Target};
use greater::layout::Layout;
use greater::tasks::answer::AnswerKind;
use greater::tasks::{Task, TaskOptions};
use greater::tokenizer::{ChatTemplate, Message, SystemTurn};

const PROMPT: &str = "Let's think step by step, \"carefully\"\\ and {{ check }} each sum.";

fn questions(task: &Task) -> Vec<&str> {
    task.examples.iter().take(3).map(|e| e.question.as_str()).collect()
}

/// SmolLM2 on generated arithmetic, the layout of a run with `system`.
fn laid(system: &SystemTurn) -> (Task, Laid) {
    let lm = common::smollm2();
    let opts = TaskOptions { data_dir: None, seed: 0, difficulty: 2, count: 3 };
    let task = Task::load("arithmetic", &opts).unwrap();
    let layout = Layout::new(lm, &task, system, ". Use").unwrap();
    let laid = Laid::new(Path::new("run"), lm, &layout, PROMPT, 64, task.kind).unwrap();
    (task, laid)
}

#[test]
fn the_exported_template_renders_the_ids_greater_reads_for_every_system_turn() {
    let lm = common::smollm2();
    for system in [SystemTurn::Template, SystemTurn::None, SystemTurn::Text("Be exact.".into())] {
        let (task, laid) = laid(&system);
        let layout = Layout::new(lm, &task, &system, ". Use").unwrap();
        let template = laid.render(Target::Jinja, None).unwrap();
        let chat = ChatTemplate::new(&template, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        for q in questions(&task) {
            let text = chat.render(&[Message::new("user", q)], true).unwrap();
            let ids = lm.tokenizer.encode(&text, false).unwrap();
            let own =
                layout.user_turn(&layout.question(q).unwrap(), &layout.prompt_ids(PROMPT).unwrap());
            assert_eq!(ids, own.unwrap(), "{system:?}: {text:?}");
            // With the reasoning as the assistant's message: the extractor continues it.
            let reasoning = "2 + 3 is 5.";
            let turns = [Message::new("user", q), Message::new("assistant", reasoning)];
            let continued = chat.render(&turns, false).unwrap();
            assert_eq!(continued, format!("{text}{reasoning}{}", laid.extractor));
            assert_eq!(
                lm.tokenizer.encode_continuation(&laid.extractor).unwrap(),
                layout.extractor()
            );
        }
    }
}

/// `python3 -c code` with `input` on stdin, or None (with the reason printed) when python3 or
/// `module` is missing.
fn python(module: &str, code: &str, input: &str) -> Option<String> {
    use std::io::Write;
    let probe =
        std::process::Command::new("python3").args(["-c", &format!("import {module}")]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: python3 with {module} is not installed");
        return None;
    }
    let mut child = std::process::Command::new("python3")
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3 failed");
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn jinja2_renders_the_exported_template_as_minijinja_does() {
    for system in
        [SystemTurn::Template, SystemTurn::None, SystemTurn::Text("Be \"exact\".\n".into())]
    {
        let (task, laid) = laid(&system);
        let template = laid.render(Target::Jinja, None).unwrap();
        let chat = ChatTemplate::new(&template, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        let conversations: Vec<Vec<Message>> = questions(&task)
            .iter()
            .flat_map(|q| {
                [
                    vec![Message::new("user", q)],
                    vec![Message::new("user", q), Message::new("assistant", "So 5.")],
                ]
            })
            .collect();
        let ours: Vec<String> =
            conversations.iter().map(|c| chat.render(c, c.len() == 1).unwrap()).collect();
        let input = serde_json::json!({ "template": template, "conversations": conversations });
        let code = "import json, sys, jinja2\n\
                    d = json.load(sys.stdin)\n\
                    t = jinja2.Environment().from_string(d['template'])\n\
                    print(json.dumps([t.render(messages=c, add_generation_prompt=len(c) == 1) for c in d['conversations']]))";
        let Some(theirs) = python("jinja2", code, &input.to_string()) else { return };
        let theirs: Vec<String> = serde_json::from_str(&theirs).unwrap();
        assert_eq!(theirs, ours, "{system:?}");
    }
}

#[test]
fn the_python_scripts_parser_reads_answers_as_greater_does() {
    let kinds = [
        AnswerKind::Choice { options: 5 },
        AnswerKind::YesNo,
        AnswerKind::TrueFalse,
        AnswerKind::ValidInvalid,
        AnswerKind::TrueFalseUncertain,
        AnswerKind::Integer,
        AnswerKind::Text,
    ];
    let raws = [
        " (B) because",
        "b.",
        "Option C",
        "F",
        "(E)",
        "Ab",
        "",
        "   \n(A)",
        " $**Yes**$",
        "no.",
        "Nope",
        " True",
        "FALSE!",
        "valid",
        "Invalid",
        "unknown",
        "Uncertain",
        "-7",
        "- 7",
        "1,234",
        "1,2345",
        "12.0",
        "12.5",
        "12 apples",
        "0",
        "-0",
        "$NUMBER$",
        "170141183460469231731687303715884105728",
        " \"Paris.\" ",
        "The  Moon\nsecond line",
        "`x`",
        "é",
        "É1",
        "\r\n5",
        "5\r\n6",
        "$ 3$",
    ];
    let cases: Vec<(AnswerKind, &str)> =
        kinds.iter().flat_map(|&k| raws.iter().map(move |&r| (k, r))).collect();
    let ours: Vec<Option<String>> = cases.iter().map(|(k, r)| k.parse(r)).collect();
    let script =
        include_str!("../src/export/answer.py").replace("# CONSTANTS\n", "STOP_IDS = []\n");
    let code = format!(
        "import json, sys\n__name__ = 'exported'\n{script}\nprint(json.dumps([parse(r, k) for k, r in json.load(sys.stdin)]))"
    );
    let input =
        serde_json::to_string(&cases.iter().map(|(k, r)| (k, r)).collect::<Vec<_>>()).unwrap();
    let Some(theirs) = python("json", &code, &input) else { return };
    let theirs: Vec<Option<String>> = serde_json::from_str(&theirs).unwrap();
    for ((case, a), b) in cases.iter().zip(&ours).zip(&theirs) {
        assert_eq!(a, b, "{case:?}");
    }
}

#[test]
fn the_modelfile_and_the_tokenizer_config_carry_the_runs_layout() {
    let (_, laid) = laid(&SystemTurn::Text("Be exact.".into()));
    let modelfile = laid.render(Target::Ollama, None).unwrap();
    let lines: Vec<&str> = modelfile.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines[0], format!("FROM {}", laid.model_path));
    let template =
        modelfile.split("TEMPLATE \"\"\"").nth(1).unwrap().split("\"\"\"").next().unwrap();
    assert_eq!(
        template,
        format!(
            "{}{{{{ .Prompt }}}}{}{}{{{{ .Response }}}}",
            laid.before.replace("Be exact.", "{{ .System }}"),
            laid.connector_and_prompt.replace("{{", "{{ \"{{\" }}"),
            laid.after
        )
    );
    for line in [
        "SYSTEM \"\"\"Be exact.\"\"\"",
        "PARAMETER stop \"<|im_end|>\"",
        "PARAMETER num_predict 64",
        "PARAMETER temperature 0",
    ] {
        assert!(lines.contains(&line), "{line}: {modelfile}");
    }
    let existing = "{\"model_max_length\": 8192, \"chat_template\": \"old\"}";
    let config: serde_json::Value =
        serde_json::from_str(&laid.render(Target::Hf, Some(existing)).unwrap()).unwrap();
    assert_eq!(config["model_max_length"], 8192);
    assert_eq!(config["chat_template"], laid.render(Target::Jinja, None).unwrap());
    assert!(laid.render(Target::Hf, Some("[1]")).is_err());
}
