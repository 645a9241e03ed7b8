//! The task layer: answer parsing for every kind, the benchmark files, splits, generated
//! and custom tasks, and the errors for malformed input.

use std::path::PathBuf;

use greater::tasks::{AnswerKind, Count, ExtractorOptions, Split, Task, TaskOptions};

fn parse(kind: AnswerKind, raw: &str) -> Option<String> {
    kind.parse(raw)
}

fn table(kind: AnswerKind, cases: &[(&str, Option<&str>)]) {
    for (raw, want) in cases {
        assert_eq!(parse(kind, raw).as_deref(), *want, "{kind:?} parsing {raw:?}");
    }
}

#[test]
fn choice_answers() {
    table(
        AnswerKind::Choice { options: 5 },
        &[
            ("$A", Some("A")),
            ("(A)", Some("A")),
            ("A.", Some("A")),
            ("**B**", Some("B")),
            (" C) because the red ball moved", Some("C")),
            ("e", Some("E")),
            ("(D) Rocky IV", Some("D")),
            ("Option B", Some("B")),
            ("F", None),
            ("Alice", None),
            ("The answer is A", None),
            ("", None),
            ("12", None),
        ],
    );
}

#[test]
fn label_answers() {
    table(
        AnswerKind::YesNo,
        &[
            (" yes", Some("yes")),
            ("Yes.", Some("yes")),
            ("NO, because", Some("no")),
            ("maybe", None),
            ("yesterday", None),
        ],
    );
    table(
        AnswerKind::TrueFalse,
        &[
            ("True", Some("True")),
            ("$false.", Some("False")),
            ("**True**", Some("True")),
            ("Truely", None),
            ("1", None),
        ],
    );
    table(
        AnswerKind::ValidInvalid,
        &[
            ("valid", Some("valid")),
            (" Invalid.", Some("invalid")),
            ("invalidated", None),
            ("yes", None),
        ],
    );
    table(
        AnswerKind::TrueFalseUncertain,
        &[
            ("Uncertain", Some("Uncertain")),
            ("unknown", Some("Uncertain")),
            ("False.", Some("False")),
            ("Maybe", None),
        ],
    );
}

#[test]
fn integer_answers() {
    table(
        AnswerKind::Integer,
        &[
            ("12", Some("12")),
            ("12.0", Some("12")),
            ("1,234", Some("1234")),
            ("$ -7", Some("-7")),
            ("- 7", Some("-7")),
            ("-0", Some("0")),
            ("42 apples in total.", Some("42")),
            ("1,234,567.00", Some("1234567")),
            ("3, 4 and 5", Some("3")),
            ("12.5", None),
            ("twelve", None),
            ("", None),
        ],
    );
}

#[test]
fn text_answers() {
    table(
        AnswerKind::Text,
        &[
            ("] ) }", Some("] ) }")),
            ("  ]   )  }.", Some("] ) }")),
            ("Apple Banana cherry\nsecond line", Some("apple banana cherry")),
            ("**apple banana**", Some("apple banana")),
            ("", None),
        ],
    );
}

#[test]
fn extractors_follow_the_paper() {
    assert_eq!(
        AnswerKind::Choice { options: 3 }.default_extractor(),
        "Therefore, the final answer (use exact format: '$A' or '$B' or '$C') is $"
    );
    // Labels: a space after `$`, and the trailing space the reference's texts have.
    assert_eq!(
        AnswerKind::YesNo.default_extractor(),
        "Therefore, the final answer (use exact format: '$ Yes' or '$ No') is $ "
    );
    assert_eq!(
        AnswerKind::ValidInvalid.default_extractor(),
        "Therefore, the final answer (use exact format: '$ valid' or '$ invalid') is $ "
    );
    assert_eq!(
        AnswerKind::Integer.default_extractor(),
        "Therefore, the final answer (use exactly this format: $NUMBER$, where NUMBER is a positive or negative integer) is $"
    );
}

#[test]
fn the_data_dir_may_be_the_benchmark_folder_itself() {
    if !data_dir().join("bbh").exists() {
        eprintln!("SKIPPED: no BBH data");
        return;
    }
    let inside = TaskOptions { data_dir: Some(data_dir().join("bbh")), ..opts() };
    assert_eq!(
        Task::load("navigate", &inside).unwrap().examples,
        Task::load("navigate", &opts()).unwrap().examples
    );
    let gsm = TaskOptions { data_dir: Some(data_dir().join("gsm8k")), ..opts() };
    assert_eq!(Task::load("gsm8k", &gsm).unwrap().examples.len(), 1319);
}

#[test]
fn bbh_tasks_use_the_reference_extractors_and_the_data_spelling_as_target() {
    if !data_dir().join("bbh").exists() {
        eprintln!("SKIPPED: no BBH data");
        return;
    }
    let load = |name: &str| Task::load(name, &opts()).unwrap();
    let counting = load("object_counting");
    assert_eq!(
        counting.extractor,
        "Therefore, the final answer (use exactly this format: $NUMBER$, where NUMBER is a positive integer) is $"
    );
    let sports = load("sports_understanding");
    assert_eq!(
        sports.extractor,
        "Therefore, the final answer (use exact format: '$ yes' or '$ no') is $ "
    );
    assert!(sports.examples.iter().all(|e| e.target == e.answer));
    let navigate = load("navigate");
    assert_eq!(
        navigate.extractor,
        "Therefore, the final answer (use exact format: '$ Yes' or '$ No') is $ "
    );
    // The gold stays normalised for evaluation; the target keeps the data's casing.
    let e = &navigate.examples[0];
    assert_eq!(
        (e.answer.as_str(), e.target.as_str()),
        (e.target.to_lowercase().as_str(), e.target.as_str())
    );
    assert!(navigate.examples.iter().all(|e| e.target == "Yes" || e.target == "No"));
    let hyperbaton = load("hyperbaton");
    assert_eq!(
        hyperbaton.extractor,
        "Therefore, the final answer (use exact format: '$A' or '$B') is $"
    );
    assert!(hyperbaton.examples.iter().all(|e| e.target == e.answer && e.target.len() == 1));
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn opts() -> TaskOptions {
    TaskOptions { data_dir: Some(data_dir()), seed: 3, difficulty: 2, count: 300 }
}

#[test]
fn every_bbh_file_loads_in_full_with_parseable_golds() {
    let dir = data_dir().join("bbh");
    if !dir.exists() {
        eprintln!("SKIPPED: no BBH data at {}", dir.display());
        return;
    }
    let tasks: Vec<_> = greater::tasks::builtin_tasks()
        .into_iter()
        .filter(|t| t.source.starts_with("bbh"))
        .collect();
    assert_eq!(tasks.len(), 27);
    for info in tasks {
        let task = Task::load(&info.name, &opts()).unwrap();
        let raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{}.json", info.name))).unwrap(),
        )
        .unwrap();
        assert_eq!(task.examples.len(), raw["examples"].as_array().unwrap().len(), "{}", info.name);
        for e in &task.examples {
            // Golds are stored in normal form: parsing them again is the identity.
            assert_eq!(
                task.kind.parse(&e.answer).as_deref(),
                Some(e.answer.as_str()),
                "{}",
                info.name
            );
        }
    }
    // The option text of a mis-split BBH option list names its letter.
    let ruin = Task::load("ruin_names", &opts()).unwrap();
    let e = ruin.examples.iter().find(|e| e.question.contains("'earth, wind, & fire'")).unwrap();
    assert_eq!(e.answer, "I");
}

#[test]
fn the_chance_level_counts_each_questions_own_options() {
    if !data_dir().join("bbh").exists() {
        eprintln!("SKIPPED: no BBH data under {}", data_dir().display());
        return;
    }
    let chance = |name: &str| {
        let task = Task::load(name, &opts()).unwrap();
        task.chance_level(&task.examples.iter().collect::<Vec<_>>())
    };
    assert_eq!(chance("hyperbaton"), 0.5);
    assert_eq!(chance("navigate"), 0.5);
    assert_eq!(chance("object_counting"), 0.0);
    assert!((chance("folio") - 1.0 / 3.0).abs() < 1e-12);
    // geometric_shapes lists 10 or 11 options a question: the mean of one over each
    // question's count of option lines, read from the file itself.
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("bbh/geometric_shapes.json")).unwrap(),
    )
    .unwrap();
    let questions = raw["examples"].as_array().unwrap();
    let want = questions
        .iter()
        .map(|q| {
            let text = q["input"].as_str().unwrap();
            1.0 / text
                .lines()
                .filter(|l| l.starts_with('(') && l.as_bytes().get(2) == Some(&b')'))
                .count() as f64
        })
        .sum::<f64>()
        / questions.len() as f64;
    assert!(
        (chance("geometric_shapes") - want).abs() < 1e-12,
        "{} against {want}",
        chance("geometric_shapes")
    );
}

#[test]
fn gsm8k_and_folio_golds_parse() {
    if !data_dir().join("gsm8k").exists() {
        eprintln!("SKIPPED: no GSM8K / FOLIO data under {}", data_dir().display());
        return;
    }
    let train = Task::load("gsm8k-train", &opts()).unwrap();
    assert_eq!(train.examples.len(), 7473);
    assert_eq!(train.examples[0].answer, "72");
    assert!(train.examples.iter().all(|e| e.answer.parse::<i64>().is_ok()));
    assert_eq!(Task::load("gsm8k", &opts()).unwrap().examples.len(), 1319);
    for (name, n) in [("folio", 204), ("folio-train", 1004)] {
        let folio = Task::load(name, &opts()).unwrap();
        assert_eq!(folio.examples.len(), n);
        assert!(folio
            .examples
            .iter()
            .all(|e| ["True", "False", "Uncertain"].contains(&e.answer.as_str())));
        assert!(folio.examples[0].question.starts_with("Premises:\n- "));
    }
}

#[test]
fn splits_are_deterministic_and_disjoint() {
    let a = Split::new(250, 50, 100, 100, 7).unwrap();
    assert_eq!(a, Split::new(250, 50, 100, 100, 7).unwrap());
    assert_ne!(a, Split::new(250, 50, 100, 100, 8).unwrap());
    let mut all: Vec<usize> = a.train.iter().chain(&a.dev).chain(&a.test).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 250);
    // A larger test split draws from the same shuffle: the train split is unchanged.
    assert_eq!(Split::new(300, 50, 0, 200, 7).unwrap().train.len(), 50);
    let err = Split::new(187, 50, 100, 100, 0).unwrap_err().to_string();
    assert_eq!(
        err,
        "the split needs 250 examples (train 50 + dev 100 + test 100) but the task has 187"
    );
}

#[test]
fn a_rest_test_split_holds_every_question_not_in_train_or_dev() {
    // A BBH task (250 questions) and a generated one (300 unless more are asked for).
    let (task, split) = Task::load_split("arithmetic", None, 3, 1, (30, 100, Count::Rest)).unwrap();
    assert_eq!((task.examples.len(), split.test.len()), (300, 170));
    let (_, fixed) = Task::load_split("arithmetic", None, 3, 1, (30, 100, Count::N(170))).unwrap();
    assert_eq!(fixed, split, "rest is the same split as its number");
    // Written as a number or the word, in flags, TOML and config.json alike.
    assert_eq!("rest".parse::<Count>(), Ok(Count::Rest));
    assert_eq!("57".parse::<Count>(), Ok(Count::N(57)));
    assert_eq!("all".parse::<Count>().unwrap_err(), "\"all\": a number of questions or rest");
    assert_eq!(serde_json::to_string(&Count::Rest).unwrap(), "\"rest\"");
    assert_eq!(serde_json::to_string(&Count::N(4)).unwrap(), "4");
    assert_eq!(serde_json::from_str::<Count>("\"rest\"").unwrap(), Count::Rest);
    assert_eq!(serde_json::from_str::<Count>("4").unwrap(), Count::N(4));
    assert!(serde_json::from_str::<Count>("\"most\"").is_err());
    let settings = greater::settings::OptimizeConfig::default();
    assert_eq!(settings.with_toml("test = \"rest\"\n").unwrap().test, Count::Rest);
}

/// Python evaluates the generated questions independently.
fn python_eval(expressions: &[String]) -> Vec<String> {
    let script = "import sys, json\nfor e in json.load(sys.stdin): print(eval(e))";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(expressions).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn generated_tasks_are_seeded_and_their_golds_are_right() {
    for (name, suffix) in [("arithmetic", " ="), ("boolean", " is")] {
        let task =
            Task::load(name, &TaskOptions { data_dir: None, seed: 5, difficulty: 3, count: 200 })
                .unwrap();
        assert_eq!(task.examples.len(), 200);
        let again =
            Task::load(name, &TaskOptions { data_dir: None, seed: 5, difficulty: 3, count: 200 })
                .unwrap();
        assert_eq!(task.examples, again.examples);
        let other =
            Task::load(name, &TaskOptions { data_dir: None, seed: 6, difficulty: 3, count: 200 })
                .unwrap();
        assert_ne!(task.examples, other.examples);
        let expressions: Vec<String> = task
            .examples
            .iter()
            .map(|e| e.question.strip_suffix(suffix).unwrap().to_string())
            .collect();
        let golds: Vec<String> = task.examples.iter().map(|e| e.answer.clone()).collect();
        assert_eq!(python_eval(&expressions), golds, "{name}");
        // Difficulty is the number of binary operators.
        let ops = task.examples[0].question.matches(['+', '*']).count()
            + task.examples[0].question.matches(" - ").count()
            + task.examples[0].question.matches(" and ").count()
            + task.examples[0].question.matches(" or ").count();
        assert_eq!(ops, 3, "{}", task.examples[0].question);
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_err(spec: &str) -> String {
    format!("{:#}", Task::load(spec, &opts()).unwrap_err())
}

#[test]
fn custom_toml_tasks_read_jsonl_csv_and_json() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "pets.jsonl",
        "{\"animal\": \"cat\", \"legs\": 4, \"q\": \"How many legs?\"}\n\n{\"animal\": \"bird\", \"legs\": \"2\", \"q\": \"How many legs?\"}\n",
    );
    let toml = write(
        dir.path(),
        "pets.toml",
        "data = \"pets.jsonl\"\nquestion_template = \"A {animal}. {q}\"\nanswer = \"legs\"\nanswer_kind = \"integer\"\ninitial_prompt = \"Count carefully.\"\n",
    );
    let task = Task::load(toml.to_str().unwrap(), &opts()).unwrap();
    assert_eq!(task.name, "pets");
    assert_eq!(task.initial_prompt, "Count carefully.");
    assert_eq!(task.extractor, AnswerKind::Integer.default_extractor());
    assert_eq!(
        task.examples.iter().map(|e| (e.question.as_str(), e.answer.as_str())).collect::<Vec<_>>(),
        vec![("A cat. How many legs?", "4"), ("A bird. How many legs?", "2")]
    );

    write(dir.path(), "mc.csv", "question,label\n\"Pick one, please\",(B)\nAnother,c\n");
    let toml = write(
        dir.path(),
        "mc.toml",
        "name = \"mc\"\ndata = \"mc.csv\"\nquestion = \"question\"\nanswer = \"label\"\nanswer_kind = \"choice\"\nchoices = 3\nextractor = \"So the answer is $\"\n",
    );
    let task = Task::load(toml.to_str().unwrap(), &opts()).unwrap();
    assert_eq!(task.kind, AnswerKind::Choice { options: 3 });
    assert_eq!(task.extractor, "So the answer is $");
    assert_eq!(task.examples[0].question, "Pick one, please");
    assert_eq!(task.examples.iter().map(|e| e.answer.as_str()).collect::<Vec<_>>(), vec!["B", "C"]);

    write(dir.path(), "yn.json", "[{\"q\": \"Is it?\", \"a\": \"Yes\"}]");
    let toml = write(
        dir.path(),
        "yn.toml",
        "data = \"yn.json\"\nquestion = \"q\"\nanswer = \"a\"\nanswer_kind = \"yes_no\"\n",
    );
    let yn = Task::load(toml.to_str().unwrap(), &opts()).unwrap();
    assert_eq!((yn.examples[0].answer.as_str(), yn.examples[0].target.as_str()), ("yes", "Yes"));
}

#[test]
fn a_task_whose_questions_repeat_says_how_many_where_it_names_its_data() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "d.jsonl",
        "{\"q\": \"x\", \"a\": 1}\n{\"q\": \"y\", \"a\": 2}\n{\"q\": \"x\", \"a\": 1}\n",
    );
    let toml = write(
        dir.path(),
        "t.toml",
        "data = \"d.jsonl\"\nquestion = \"q\"\nanswer = \"a\"\nanswer_kind = \"integer\"\n",
    );
    let task = Task::load(toml.to_str().unwrap(), &opts()).unwrap();
    assert_eq!(task.examples.len(), 3);
    assert!(
        task.source.ends_with("d.jsonl (1 of its questions repeat an earlier one)"),
        "{}",
        task.source
    );
    let bbh = Task::load("causal_judgement", &TaskOptions { data_dir: Some(data_dir()), ..opts() })
        .unwrap();
    assert!(
        bbh.source.ends_with("causal_judgement.json (2 of its questions repeat an earlier one)"),
        "{}",
        bbh.source
    );
}

#[test]
fn malformed_input_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = |toml: &str, data_name: &str, data: &str| -> String {
        write(d, data_name, data);
        let p = write(d, "t.toml", toml);
        load_err(p.to_str().unwrap())
    };
    let base = "data = \"d.jsonl\"\nquestion = \"q\"\nanswer = \"a\"\nanswer_kind = \"integer\"\n";
    let err = spec(base, "d.jsonl", "{\"q\": \"x\", \"a\": 1}\n{\"q\": \"y\", \"a\": \n");
    assert!(err.contains("d.jsonl:2: invalid JSON"), "{err}");
    // Invalid UTF-8 on line 3 is reported with that line.
    write(d, "d.jsonl", "");
    std::fs::write(
        d.join("d.jsonl"),
        b"{\"q\": \"x\", \"a\": 1}\n{\"q\": \"y\", \"a\": 2}\n{\"q\": \"\xff\", \"a\": 3}\n",
    )
    .unwrap();
    let err = load_err(write(d, "t.toml", base).to_str().unwrap());
    assert!(err.contains("d.jsonl:3: invalid UTF-8"), "{err}");
    let err = spec(base, "d.jsonl", "{\"q\": \"x\", \"a\": 1}\n{\"q\": \"y\"}\n");
    assert!(err.contains("d.jsonl:2: missing field 'a'"), "{err}");
    let err = spec(base, "d.jsonl", "");
    assert!(err.contains("d.jsonl: no examples"), "{err}");
    let err = spec(base, "d.jsonl", "{\"q\": \"x\", \"a\": 1}\n{\"q\": \" \\n\", \"a\": 2}\n");
    assert!(err.contains("d.jsonl:2: the question is empty"), "{err}");
    let err = spec(base, "d.jsonl", "{\"q\": \"x\", \"a\": \"many\"}\n");
    assert!(err.contains("d.jsonl:1: gold answer 'many' is not a valid integer answer"), "{err}");
    let choice = "data = \"d.csv\"\nquestion = \"q\"\nanswer = \"a\"\nanswer_kind = \"choice\"\nchoices = 4\n";
    let err = spec(choice, "d.csv", "q,a\nfirst,A\nsecond,E\n");
    assert!(err.contains("d.csv:3: gold answer 'E' is not a valid choice A-D answer"), "{err}");
    let err = spec(choice, "d.csv", "q,a\nfirst,A,extra\n");
    assert!(err.contains("d.csv:2: "), "{err}");
    let err = spec("data = \"d.jsonl\"\nquestoin = \"q\"\n", "d.jsonl", "{}\n");
    assert!(err.contains("t.toml: ") && err.contains("unknown field `questoin`"), "{err}");
    let err = spec(
        "data = \"missing.jsonl\"\nquestion = \"q\"\nanswer = \"a\"\nanswer_kind = \"integer\"\n",
        "d.jsonl",
        "",
    );
    assert!(err.contains("cannot read") && err.contains("missing.jsonl"), "{err}");

    let bad_bbh = write(
        d,
        "navigate.json",
        "{\"examples\": [\n {\"input\": \"Go\", \"target\": \"Yes\"},\n {\"input\": \"x\"}\n]}",
    );
    let err = load_err(bad_bbh.to_str().unwrap());
    assert!(err.contains("navigate.json:3:"), "{err}");
    assert!(err.contains("missing field `target`"), "{err}");

    let err = load_err("object_countin");
    assert_eq!(
        err,
        "unknown task 'object_countin'; did you mean 'object_counting'? (`greater tasks` lists them; a .toml file describes your own)"
    );
    let err = format!("{:#}", Task::load("navigate", &TaskOptions::default()).unwrap_err());
    assert!(err.contains("task 'navigate' reads bbh/navigate.json: pass --data-dir DIR"), "{err}");
}

/// The extractor of each of the 21 tasks in the reference's run script
/// (`experiments/run_llama3_all.sh`), as that script writes it.
const REFERENCE_EXTRACTORS: [(&str, &str); 21] = [
    ("multistep_arithmetic_two", "Therefore, the final answer (use exactly this format: $NUMBER$, where NUMBER is a positive or negative integer) is $"),
    ("tracking_shuffled_objects_five_objects", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D' or '$E') is $"),
    ("object_counting", "Therefore, the final answer (use exactly this format: $NUMBER$, where NUMBER is a positive integer) is $"),
    ("date_understanding", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D' or '$E') is $"),
    ("disambiguation_qa", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C') is $"),
    ("formal_fallacies", "Therefore, the final answer (use exact format: '$ valid' or '$ invalid') is $ "),
    ("geometric_shapes", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D' or '$E' or '$F' or '$G' or '$H' or '$I' or '$J') is $"),
    ("salient_translation_error_detection", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D' or '$E' or '$F') is $"),
    ("penguins_in_a_table", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D' or '$E') is $"),
    ("causal_judgement", "Therefore, the final answer (use exact format: '$ Yes' or '$ No') is $ "),
    ("logical_deduction_five_objects", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D' or '$E') is $"),
    ("movie_recommendation", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D') is $"),
    ("navigate", "Therefore, the final answer (use exact format: '$ Yes' or '$ No') is $ "),
    ("web_of_lies", "Therefore, the final answer (use exact format: '$ Yes' or '$ No') is $ "),
    ("sports_understanding", "Therefore, the final answer (use exact format: '$ yes' or '$ no') is $ "),
    ("reasoning_about_colored_objects", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D' or '$E' or '$F' or '$G' or '$H' or '$I' or '$J' or '$K' or '$L' or '$M' or '$N' or '$O' or '$P' or '$Q' or '$R') is $"),
    ("hyperbaton", "Therefore, the final answer (use exact format: '$A' or '$B') is $"),
    ("ruin_names", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D') is $"),
    ("snarks", "Therefore, the final answer (use exact format: '$A' or '$B') is $"),
    ("temporal_sequences", "Therefore, the final answer (use exact format: '$A' or '$B' or '$C' or '$D') is $"),
    ("boolean_expressions", "Therefore, the final answer (use exact format: '$ True' or '$ False') is $ "),
];

#[test]
fn reference_extractor_options_give_the_reference_scripts_extractor_for_its_21_tasks() {
    let opts = TaskOptions { data_dir: Some(data_dir()), seed: 0, difficulty: 1, count: 0 };
    for (name, want) in REFERENCE_EXTRACTORS {
        let task = Task::load(name, &opts).unwrap();
        let data_options = task.extractor.clone();
        assert_eq!(
            task.with_extractor_options(ExtractorOptions::Reference).extractor,
            want,
            "{name}"
        );
        // Where the data has more options, `data` lists them all.
        if name == "movie_recommendation" {
            assert!(data_options.contains("'$E'"), "{data_options}");
        }
    }
}
