//! The model's own Jinja chat template, rendered with minijinja the way Hugging Face's
//! `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string methods).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::budget::with_budget;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl Message {
    /// A message of `role` with `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// What goes before the user turn.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SystemTurn {
    /// No system turn at all (the reference's), even where the template adds a default one.
    None,
    /// Whatever the template writes when no system message is given (Qwen's and SmolLM2's
    /// write a default system text).
    #[default]
    Template,
    /// A system turn with this text.
    Text(String),
}

impl FromStr for SystemTurn {
    type Err = std::convert::Infallible;
    /// `none`, `template`, or any other text as the system turn's text.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => SystemTurn::None,
            "template" => SystemTurn::Template,
            text => SystemTurn::Text(text.to_string()),
        })
    }
}

impl fmt::Display for SystemTurn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SystemTurn::None => f.write_str("none"),
            SystemTurn::Template => f.write_str("template"),
            SystemTurn::Text(t) => f.write_str(t),
        }
    }
}

impl Serialize for SystemTurn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for SystemTurn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(text.parse().unwrap_or_else(|e: std::convert::Infallible| match e {}))
    }
}

/// Instructions a chat template may run per rendering.
const TEMPLATE_FUEL: u64 = 2_000_000;
/// Bytes a rendering may allocate in all (see [`super::budget`]): many times what a turn with
/// a long question needs.
const TEMPLATE_BYTES: usize = 512 << 20;

/// Stands for the system text while the template's own system turn is located.
const SYSTEM_MARK: &str = "\u{2}SYSTEM\u{2}";

/// A model's Jinja chat template, rendered with limits (fuel and memory).
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; BOS/EOS strings are exposed to it as `bos_token` / `eos_token`.
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid");
        env.set_syntax(syntax);
        // A template that loops without end runs out of fuel and errors out instead of
        // hanging; rendering a turn or two takes a small fraction of it.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // Templates that look for `strftime_now` fall back to a fixed date without it,
        // which keeps prompts (and so runs) reproducible.
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("invalid chat template: {e}"))?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            bos: bos.unwrap_or_default().into(),
            eos: eos.unwrap_or_default().into(),
        })
    }

    /// One user turn after `system`, ready for the reply.
    pub fn render_turn(&self, system: &SystemTurn, user: &str) -> Result<String> {
        let user_only = [Message::new("user", user)];
        match system {
            SystemTurn::Template => self.render(&user_only, true),
            SystemTurn::Text(text) => {
                self.render(&[Message::new("system", text), user_only[0].clone()], true)
            }
            SystemTurn::None => self.without_system(user),
        }
    }

    /// The user turn with no system turn. A template that writes a default system turn when
    /// given none renders the user-only text as `A + default + B`, where it renders a system
    /// message M as `A + M + B`; A is the system turn's header (after BOS), and B ends with
    /// the user turn, whose header is taken to be A's with `system` read as `user`.
    fn without_system(&self, user: &str) -> Result<String> {
        let plain = self.render(&[Message::new("user", user)], true)?;
        // A template without a system role (it raises, or drops the text) has no system turn.
        let Ok(marked) =
            self.render(&[Message::new("system", SYSTEM_MARK), Message::new("user", user)], true)
        else {
            return Ok(plain);
        };
        let Some((a, b)) = marked.split_once(SYSTEM_MARK) else { return Ok(plain) };
        if plain.len() < a.len() + b.len() || !plain.starts_with(a) || !plain.ends_with(b) {
            return Ok(plain); // no default system turn
        }
        let header = a.strip_prefix(self.bos.as_str()).unwrap_or(a);
        let user_header = header.replace("system", "user");
        let Some(at) = b.find(&format!("{user_header}{user}")) else {
            bail!("system none: cannot find where this chat template's user turn starts (expected {user_header:?})");
        };
        Ok(format!("{}{}", &a[..a.len() - header.len()], &b[at..]))
    }

    /// The conversation as the template writes it, within the template's fuel and memory
    /// budget.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = Arc::clone(&self.env);
        let ctx = context! {
            messages => minijinja::value::Serde(messages.to_vec()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        };
        let rendered = with_budget(TEMPLATE_BYTES, move || {
            env.get_template("chat").expect("template added in new").render(ctx)
        })
        .map_err(|over| {
            anyhow!(
                "cannot render the chat template: it allocated more than {} MiB",
                over.bytes >> 20
            )
        })?;
        rendered.map_err(|e| anyhow!("cannot render the chat template: {e}"))
    }
}
