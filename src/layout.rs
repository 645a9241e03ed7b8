//! The prompt layout: how every sequence is built, segment by segment, for the optimiser and
//! the evaluator alike, so that the ids optimised are the ids evaluated.
//!
//! ```text
//! chat header (system turn: none, the template's, or a text) + question + connector | prompt | end of user turn + assistant header
//!     | reasoning | extractor | answer
//! ```
//! The reference writes the user turn as `{question}. Use{prompt}`, the prompt starting with a
//! space ("... (B) 3/7. Use proper logical reasoning ..."); zero-shot CoT goes in the same slot.

use anyhow::{bail, Context, Result};

use crate::runtime::LanguageModel;
use crate::tasks::Task;
use crate::tokenizer::SystemTurn;

/// The reference's fixed text between the question and the prompt.
pub const REFERENCE_CONNECTOR: &str = ". Use";

/// Marks where the prompt goes when the chat template is rendered.
const SLOT: &str = "\u{1}PROMPT\u{1}";

/// The parts of one question's sequence that do not depend on the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionIds {
    /// Chat header, question and connector: the same for every prompt (its KV cache is shared).
    pub head: Vec<u32>,
    /// End of the user turn and the assistant header.
    pub tail: Vec<u32>,
}

/// How every sequence is laid out: chat turn, question, connector, prompt, reasoning, extractor, answer. The optimiser and the evaluator build their ids here, so both read the same tokens.
#[derive(Clone)]
pub struct Layout<'a> {
    lm: &'a LanguageModel,
    system: SystemTurn,
    connector: String,
    extractor: Vec<u32>,
    /// The extractor's trailing spaces ("... is $ "), which go with the answer: the answer
    /// is " Yes" after "$", the tokens the reference's target text "... is $ Yes" has, not a
    /// lone space token followed by "Yes".
    answer_prefix: String,
}

impl<'a> Layout<'a> {
    /// The layout of `task` on `lm`, with `system` before the user turn and `connector` between question and prompt.
    pub fn new(
        lm: &'a LanguageModel,
        task: &Task,
        system: &SystemTurn,
        connector: &str,
    ) -> Result<Self> {
        let trimmed = task.extractor.trim_end();
        let extractor = lm.tokenizer.encode_continuation(&format!(" {trimmed}"))?;
        let answer_prefix = task.extractor[trimmed.len()..].to_string();
        Ok(Layout {
            lm,
            system: system.clone(),
            connector: connector.to_string(),
            extractor,
            answer_prefix,
        })
    }

    /// The ids around the prompt slot for `question`; an error naming the question when it does not fit the model's context.
    pub fn question(&self, question: &str) -> Result<QuestionIds> {
        let text =
            self.lm.chat_text(&self.system, &format!("{question}{}{SLOT}", self.connector))?;
        let (head, tail) = text.split_once(SLOT).expect("the chat template keeps the user text");
        let ids = QuestionIds {
            head: self.lm.tokenizer.encode(head, false)?,
            tail: self.lm.tokenizer.encode_continuation(tail)?,
        };
        let start: String = question.chars().take(60).collect();
        self.lm
            .check_context(ids.head.len() + ids.tail.len())
            .with_context(|| format!("the question that starts {start:?}"))?;
        Ok(ids)
    }

    /// The chat text before a question and after its prompt (the end of the user turn and
    /// the assistant header), as [`Layout::question`] renders them around any question.
    pub fn texts_around(&self) -> Result<(String, String)> {
        const QUESTION: &str = "\u{1}QUESTION\u{1}";
        let user = format!("{QUESTION}{}{SLOT}", self.connector);
        let text = self.lm.chat_text(&self.system, &user)?;
        let (before, rest) =
            text.split_once(QUESTION).expect("the chat template keeps the user text");
        let (_, after) = rest.split_once(SLOT).expect("the chat template keeps the user text");
        Ok((before.to_string(), after.to_string()))
    }

    /// What goes before the user turn.
    pub fn system(&self) -> &SystemTurn {
        &self.system
    }

    /// The text between a question and the prompt.
    pub fn connector(&self) -> &str {
        &self.connector
    }

    /// The text of the extractor as it follows the reasoning, and the spaces that go with
    /// the answer after it.
    pub fn extractor_texts(&self) -> Result<(String, &str)> {
        Ok((self.lm.tokenizer.decode_continuation(&self.extractor)?, &self.answer_prefix))
    }

    /// An error naming `question` when its user turn (`user_len` tokens), `reasoning` tokens
    /// of reasoning, the extractor and `answer` tokens of answer would run past the model's
    /// context, with the reasoning budget that would fit.
    pub fn check_room(
        &self,
        question: &str,
        user_len: usize,
        reasoning: usize,
        answer: usize,
    ) -> Result<()> {
        let context = self.lm.model.cfg.context();
        let after = self.extractor.len() + answer;
        if user_len + reasoning + after <= context {
            return Ok(());
        }
        let start: String = question.chars().take(60).collect();
        let room = context.saturating_sub(user_len + after);
        bail!(
            "the question that starts {start:?} needs {} positions ({user_len} for the question and prompt, {reasoning} of reasoning, {after} for the extractor and the answer) but the model's context holds {context}: lower --max-reasoning to {room} or less",
            user_len + reasoning + after
        )
    }

    /// Prompt ids as they follow the connector: the text with its separating space (none
    /// for an empty prompt).
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.lm.tokenizer.encode_continuation(&format!(" {text}"))
    }

    /// The prompt's text, without the separating space.
    pub fn prompt_text(&self, ids: &[u32]) -> Result<String> {
        let text = self.lm.tokenizer.decode_continuation(ids)?;
        Ok(text.strip_prefix(' ').unwrap_or(&text).to_string())
    }

    /// The user turn and the assistant header: what the reasoning continues.
    pub fn user_turn(&self, q: &QuestionIds, prompt: &[u32]) -> Result<Vec<u32>> {
        let ids = [&q.head[..], prompt, &q.tail].concat();
        self.lm.check_context(ids.len())?;
        Ok(ids)
    }

    /// The extractor as it follows the reasoning, without its trailing spaces.
    pub fn extractor(&self) -> &[u32] {
        &self.extractor
    }

    /// The gold answer's ids as they follow the extractor.
    pub fn answer_ids(&self, target: &str) -> Result<Vec<u32>> {
        self.lm.tokenizer.encode_continuation(&format!("{}{target}", self.answer_prefix))
    }
}
