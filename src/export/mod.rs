//! Export: a run's optimised prompt laid out for the stacks the model is served with, so that
//! they read the ids the prompt was optimised for.
//!
//! Every target is written from one [`Laid`]: the chat text before the question, the
//! connector and the prompt after it, the end of the user turn, and the extractor that
//! follows the reasoning, in text and (where a target takes them) in the run's own ids.
//!
//! - `jinja` and `llamacpp`: a chat template (for `llama-server --jinja
//!   --chat-template-file`, or `chat_template` in `tokenizer_config.json`) that renders one
//!   user message as the run did, and, when the last message is the assistant's reasoning,
//!   continues it with the extractor (Hugging Face's `continue_final_message`).
//! - `hf`: `tokenizer_config.json` with that template as its `chat_template`.
//! - `ollama`: a Modelfile. Its template cannot add the extractor after a reply; the file
//!   says how to send that second step in raw mode.
//! - `python`: a script for `llama-cpp-python` that answers questions with both steps at the
//!   token level and parses the answer as greater does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::layout::Layout;
use crate::records::RunConfig;
use crate::runtime::LanguageModel;
use crate::store::{file, RunDir};
use crate::tasks::answer::AnswerKind;
use crate::tokenizer::SystemTurn;

/// Where the prompt is exported to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A chat template (Jinja).
    Jinja,
    /// The chat template, with the llama-server command that uses it.
    Llamacpp,
    /// An Ollama Modelfile.
    Ollama,
    /// A Hugging Face `tokenizer_config.json` whose `chat_template` it is.
    Hf,
    /// A Python script for llama-cpp-python.
    Python,
}

/// A run's layout, as every target needs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Laid {
    /// The run folder.
    pub run: PathBuf,
    /// The model file the run used.
    pub model_path: String,
    /// Chat text before the question (the system turn as the run had it).
    pub before: String,
    /// The connector, then the prompt with its separating space.
    pub connector_and_prompt: String,
    /// The connector alone.
    pub connector: String,
    /// The end of the user turn and the assistant header.
    pub after: String,
    /// The extractor as it follows the reasoning.
    pub extractor: String,
    /// The run's system text, when it had one of its own.
    pub system: Option<String>,
    /// The prompt's ids, as the run optimised them.
    pub prompt_ids: Vec<u32>,
    /// The ids of `after`.
    pub after_ids: Vec<u32>,
    /// The ids of `extractor`.
    pub extractor_ids: Vec<u32>,
    /// The tokens that end a turn, as ids and text.
    pub stop_ids: Vec<u32>,
    /// The stop tokens' texts.
    pub stops: Vec<String>,
    /// The reasoning budget.
    pub max_reasoning: usize,
    /// Tokens of answer after the extractor.
    pub answer_tokens: usize,
    /// How the answer is parsed.
    pub answer_kind: AnswerKind,
    /// Positions the model holds.
    pub context: usize,
}

impl Laid {
    /// The layout of the run in `run`, from its settings, its task and its returned prompt,
    /// on its model (which is opened for the tokenizer and the chat template).
    pub fn of_run(run: &Path, log: &mut dyn FnMut(&str)) -> Result<Self> {
        let dir = RunDir::open(run)?;
        let config: RunConfig = dir.read_json(file::CONFIG)?;
        let path = run.join(file::BEST_PROMPT);
        let prompt = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {} (has the run finished?)", path.display()))?;
        let s = &config.settings;
        let (task, _) = s.load_task()?;
        let lm = LanguageModel::open(&config.model_path, &s.open_options(), log)?;
        Self::new(
            run,
            &lm,
            &Layout::new(&lm, &task, &s.system, &s.connector)?,
            &prompt,
            s.max_reasoning,
            task.kind,
        )
    }

    /// The layout of `prompt` under `layout` on `lm`.
    pub fn new(
        run: &Path,
        lm: &LanguageModel,
        layout: &Layout,
        prompt: &str,
        max_reasoning: usize,
        answer_kind: AnswerKind,
    ) -> Result<Self> {
        let (before, after) = layout.texts_around()?;
        let prompt_ids = layout.prompt_ids(prompt)?;
        let connector = layout.connector().to_string();
        let connector_and_prompt =
            format!("{connector}{}", lm.tokenizer.decode_continuation(&prompt_ids)?);
        let (extractor, _) = layout.extractor_texts()?;
        let stops = lm
            .tokenizer
            .stop_ids
            .iter()
            .map(|&id| lm.tokenizer.decode_with_special(&[id]))
            .collect::<Result<_>>()?;
        Ok(Laid {
            run: run.to_path_buf(),
            model_path: lm.path.display().to_string(),
            system: match layout.system() {
                SystemTurn::Text(text) => Some(text.clone()),
                _ => None,
            },
            after_ids: lm.tokenizer.encode_continuation(&after)?,
            extractor_ids: layout.extractor().to_vec(),
            stop_ids: lm.tokenizer.stop_ids.clone(),
            stops,
            before,
            connector,
            connector_and_prompt,
            after,
            extractor,
            prompt_ids,
            max_reasoning,
            answer_tokens: answer_kind.answer_budget(),
            answer_kind,
            context: lm.model.cfg.context(),
        })
    }

    /// The file of `target`, written to `out` when given (atomically; an existing
    /// `tokenizer_config.json` there keeps its other keys), and returned.
    pub fn write(&self, target: Target, out: Option<&Path>) -> Result<String> {
        let Some(path) = out else { return self.render(target, None) };
        let existing = match target {
            Target::Hf if path.exists() => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            ),
            _ => None,
        };
        let file = self
            .render(target, existing.as_deref())
            .with_context(|| format!("{}", path.display()))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: not a file name", path.display()))?;
        RunDir::holding(path)?.write_atomic(name, file.as_bytes())?;
        Ok(file)
    }

    /// The file of `target`; `existing` is the file it replaces, whose other keys a
    /// `tokenizer_config.json` keeps.
    pub fn render(&self, target: Target, existing: Option<&str>) -> Result<String> {
        match target {
            Target::Jinja => Ok(self.chat_template()),
            Target::Llamacpp => Ok(format!(
                "{{#- Use: llama-server -m {} --jinja --chat-template-file THIS_FILE -n {} --temp 0 -#}}\n{}",
                self.model_path,
                self.max_reasoning,
                self.chat_template()
            )),
            Target::Hf => self.tokenizer_config(existing),
            Target::Ollama => self.modelfile(),
            Target::Python => self.python_script(),
        }
    }

    /// A chat template that renders the last user message as the run laid out its
    /// question, and continues an assistant message after it with the extractor.
    fn chat_template(&self) -> String {
        let s = jinja_string;
        format!(
            "{{#- Written by greater export from {run}: one question per conversation, laid out as the run laid it out (a system message of the caller's is not used). With the assistant's reasoning as the last message, the template continues it with the extractor: then generate {answer} tokens to read the answer. -#}}\n\
             {{%- set before = {before} -%}}\n\
             {{%- set after_question = {cp} -%}}\n\
             {{%- set after_prompt = {after} -%}}\n\
             {{%- set extractor = {extractor} -%}}\n\
             {{%- if messages[-1]['role'] == 'assistant' and messages | length > 1 -%}}\n\
             {{{{- before ~ messages[-2]['content'] ~ after_question ~ after_prompt ~ messages[-1]['content'] ~ extractor -}}}}\n\
             {{%- else -%}}\n\
             {{{{- before ~ messages[-1]['content'] ~ after_question ~ after_prompt -}}}}\n\
             {{%- endif -%}}\n",
            run = self.run.display().to_string().replace("#}", "# }"),
            answer = self.answer_tokens,
            before = s(&self.before),
            cp = s(&self.connector_and_prompt),
            after = s(&self.after),
            extractor = s(&self.extractor),
        )
    }

    /// `existing` (a `tokenizer_config.json`) with the chat template set, or a file of it alone.
    fn tokenizer_config(&self, existing: Option<&str>) -> Result<String> {
        let mut config = match existing {
            Some(text) => serde_json::from_str::<serde_json::Value>(text)
                .context("the tokenizer_config.json to update is not JSON")?,
            None => serde_json::json!({}),
        };
        let Some(object) = config.as_object_mut() else {
            bail!("the tokenizer_config.json to update is not a JSON object");
        };
        object.insert("chat_template".into(), self.chat_template().into());
        Ok(serde_json::to_string_pretty(&config)? + "\n")
    }

    /// An Ollama Modelfile: the GGUF file, the layout as its template (the run's system text
    /// as `SYSTEM`), the stop tokens and the reasoning budget, decoded greedily.
    fn modelfile(&self) -> Result<String> {
        let literal = |text: &str| -> Result<String> {
            if text.contains("\"\"\"") {
                bail!("the layout holds \"\"\", which a Modelfile cannot quote");
            }
            // Outside an action a Go template writes text as it is, but for "{{".
            Ok(text.replace("{{", "{{ \"{{\" }}"))
        };
        let before = match &self.system {
            Some(system) => {
                let (head, tail) = self.before.split_once(system.as_str()).with_context(|| {
                    "the system text is not in the chat text before the question".to_string()
                })?;
                format!("{}{{{{ .System }}}}{}", literal(head)?, literal(tail)?)
            }
            None => literal(&self.before)?,
        };
        let mut file = format!(
            "# Written by greater export from {run}.\n\
             # The answer step cannot be written in a Modelfile: after the reply, send the whole text\n\
             # again with the extractor in raw mode, and read the answer from what follows it:\n\
             #   POST /api/generate {{\"model\": ..., \"raw\": true, \"options\": {{\"num_predict\": {answer}, \"temperature\": 0}},\n\
             #     \"prompt\": <the rendered prompt> + <the reply> + {extractor}}}\n\
             FROM {model}\n\
             TEMPLATE \"\"\"{before}{{{{ .Prompt }}}}{cp}{after}{{{{ .Response }}}}\"\"\"\n",
            run = self.run.display().to_string().replace('\n', " "),
            answer = self.answer_tokens,
            extractor = serde_json::to_string(&self.extractor)?,
            model = self.model_path,
            cp = literal(&self.connector_and_prompt)?,
            after = literal(&self.after)?,
        );
        if let Some(system) = &self.system {
            file.push_str(&format!("SYSTEM \"\"\"{}\"\"\"\n", literal(system)?));
        }
        for stop in &self.stops {
            file.push_str(&format!("PARAMETER stop {}\n", serde_json::to_string(stop)?));
        }
        file.push_str(&format!(
            "PARAMETER num_predict {}\nPARAMETER num_ctx {}\nPARAMETER temperature 0\n",
            self.max_reasoning, self.context
        ));
        Ok(file)
    }

    /// A script for llama-cpp-python that answers questions as greater evaluates them.
    fn python_script(&self) -> Result<String> {
        use serde_json::json;
        // JSON, which Python reads as literals (the values here hold no true, false or null).
        let constants = [
            ("RUN", json!(self.run.display().to_string())),
            ("MODEL", json!(self.model_path)),
            ("BEFORE_QUESTION", json!(self.before)),
            ("CONNECTOR", json!(self.connector)),
            ("PROMPT_IDS", json!(self.prompt_ids)),
            ("AFTER_PROMPT_IDS", json!(self.after_ids)),
            ("EXTRACTOR_IDS", json!(self.extractor_ids)),
            ("STOP_IDS", json!(self.stop_ids)),
            ("MAX_REASONING", json!(self.max_reasoning)),
            ("ANSWER_TOKENS", json!(self.answer_tokens)),
            ("ANSWER_KIND", json!(self.answer_kind)),
            ("CONTEXT", json!(self.context)),
        ];
        let constants: Vec<String> =
            constants.iter().map(|(name, value)| format!("{name} = {value}")).collect();
        Ok(PYTHON_SCRIPT.replace("# CONSTANTS\n", &(constants.join("\n") + "\n")))
    }
}

/// The script `python` writes; its constants go where `# CONSTANTS` stands.
const PYTHON_SCRIPT: &str = include_str!("answer.py");

/// `text` as a Jinja string literal that Jinja2 and minijinja read back the same: only the
/// backslash, the quote and control characters are escaped.
fn jinja_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
