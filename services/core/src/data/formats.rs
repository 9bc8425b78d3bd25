//! The record formats and how each becomes a [`Sample`]: a conversation whose assistant turns are what
//! is learned, a raw prompt/completion pair, or a preference pair.
//!
//! | format | fields (renamable with column maps) |
//! |---|---|
//! | `alpaca` | `instruction`, optional `input`, `output`, optional `system` |
//! | `messages` | `messages`: `[{"role", "content"}]` (OpenAI / ChatML) |
//! | `sharegpt` | `conversations`: `[{"from": "human"/"gpt"/"system", "value"}]` |
//! | `text` | `text` (every token trained) |
//! | `prompt-completion` | `prompt`, `completion` (strings, or message lists for chat) |
//! | `preference` | `prompt`, `chosen`, `rejected` (strings or message lists) |
//! | `unpaired` | `prompt`, `completion` (strings or message lists), `label` (boolean: desirable or not; KTO) |

use std::collections::HashMap;

use crate::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Input format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// instruction / input / output.
    Alpaca,
    /// OpenAI-style messages.
    Messages,
    /// ShareGPT conversations.
    Sharegpt,
    /// Plain text.
    Text,
    /// prompt / completion.
    PromptCompletion,
    /// prompt / chosen / rejected.
    Preference,
    /// prompt / completion / label (KTO's unpaired feedback).
    Unpaired,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "alpaca" => Self::Alpaca,
            "messages" | "chatml" | "openai" => Self::Messages,
            "sharegpt" => Self::Sharegpt,
            "text" => Self::Text,
            "prompt-completion" | "prompt_completion" => Self::PromptCompletion,
            "preference" | "dpo" => Self::Preference,
            "unpaired" | "kto" => Self::Unpaired,
            _ => {
                return Err(format!(
                    "unknown format `{s}` (alpaca, messages, sharegpt, text, prompt-completion, preference, unpaired)"
                ))
            }
        })
    }
}

/// Which tokens are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MaskMode {
    /// Every assistant turn (with its end-of-turn token); everything else masked.
    #[default]
    Assistant,
    /// Only the last assistant turn / the completion.
    Completion,
    /// Every token.
    All,
}

impl std::str::FromStr for MaskMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "assistant" => Ok(Self::Assistant),
            "completion" | "completion-only" => Ok(Self::Completion),
            "all" | "none" => Ok(Self::All),
            _ => Err(format!("unknown mask `{s}` (assistant, completion, all)")),
        }
    }
}

/// A parsed record.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// A conversation (rendered with the chat template).
    Chat(Vec<Message>),
    /// Raw text: `prompt` (context) then `completion` (learned), EOS appended.
    Raw {
        /// Context (may be empty).
        prompt: String,
        /// Learned text.
        completion: String,
    },
    /// A preference pair over a shared prompt.
    Preference {
        /// The prompt turns.
        prompt: Vec<Message>,
        /// Preferred assistant turn(s).
        chosen: Vec<Message>,
        /// Dispreferred assistant turn(s).
        rejected: Vec<Message>,
    },
    /// One completion with a binary judgement (KTO).
    Unpaired {
        /// The prompt turns.
        prompt: Vec<Message>,
        /// The assistant turn(s).
        completion: Vec<Message>,
        /// Desirable (`label: true`) or not.
        desirable: bool,
    },
}

/// Column renames: canonical field name → the record's key.
pub type Columns = HashMap<String, String>;

fn field<'a>(v: &'a Value, cols: &Columns, name: &str) -> Option<&'a Value> {
    let key = cols.get(name).map(String::as_str).unwrap_or(name);
    v.get(key).filter(|x| !x.is_null())
}

fn string(v: &Value, cols: &Columns, name: &str) -> Result<String, String> {
    match field(v, cols, name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("field `{name}` is empty")),
        Some(other) => Err(format!("field `{name}` must be a string, got {}", kind(other))),
        None => Err(format!("missing field `{name}`")),
    }
}

fn opt_string(v: &Value, cols: &Columns, name: &str) -> Result<Option<String>, String> {
    match field(v, cols, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone()).filter(|s| !s.is_empty())),
        Some(other) => Err(format!("field `{name}` must be a string, got {}", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

fn messages(
    v: &Value,
    name: &str,
    role_key: &str,
    content_key: &str,
    map_role: &dyn Fn(&str) -> Option<&'static str>,
) -> Result<Vec<Message>, String> {
    let list = v.as_array().ok_or_else(|| format!("field `{name}` must be a list of messages, got {}", kind(v)))?;
    if list.is_empty() {
        return Err(format!("field `{name}` has no messages"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get(role_key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{name}[{i}]: missing string `{role_key}`"))?;
            let role = map_role(role).ok_or_else(|| format!("{name}[{i}]: unknown role `{role}`"))?;
            let content = m
                .get(content_key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{name}[{i}]: missing string `{content_key}`"))?;
            Ok(Message::new(role, content))
        })
        .collect()
}

fn openai_role(r: &str) -> Option<&'static str> {
    ROLES.iter().copied().find(|&x| x == r)
}

fn sharegpt_role(r: &str) -> Option<&'static str> {
    Some(match r {
        "human" | "user" => "user",
        "gpt" | "assistant" | "model" | "bot" => "assistant",
        "system" => "system",
        "tool" | "function" | "observation" => "tool",
        _ => return None,
    })
}

/// A string or a message list, as used by prompt-completion and preference records.
fn turns(v: &Value, cols: &Columns, name: &str, default_role: &str) -> Result<Vec<Message>, String> {
    match field(v, cols, name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(vec![Message::new(default_role, s.clone())]),
        Some(Value::String(_)) => Err(format!("field `{name}` is empty")),
        Some(list @ Value::Array(_)) => messages(list, name, "role", "content", &openai_role),
        Some(other) => Err(format!("field `{name}` must be a string or a list of messages, got {}", kind(other))),
        None => Err(format!("missing field `{name}`")),
    }
}

fn require_assistant(m: &[Message], name: &str) -> Result<(), String> {
    if m.iter().any(|x| x.role == "assistant") {
        Ok(())
    } else {
        Err(format!("`{name}` has no assistant turn to learn from"))
    }
}

/// Parses one record of `format`.
pub fn parse(format: Format, v: &Value, cols: &Columns) -> Result<Sample, String> {
    if !v.is_object() {
        return Err(format!("a record must be a JSON object, got {}", kind(v)));
    }
    match format {
        Format::Alpaca => {
            let instruction = string(v, cols, "instruction")?;
            let input = opt_string(v, cols, "input")?;
            let output = string(v, cols, "output")?;
            let mut m = Vec::new();
            if let Some(s) = opt_string(v, cols, "system")? {
                m.push(Message::new("system", s));
            }
            let user = match input {
                Some(i) => format!("{instruction}\n\n{i}"),
                None => instruction,
            };
            m.push(Message::new("user", user));
            m.push(Message::new("assistant", output));
            Ok(Sample::Chat(m))
        }
        Format::Messages => {
            let m = messages(
                field(v, cols, "messages").ok_or("missing field `messages`")?,
                "messages",
                "role",
                "content",
                &openai_role,
            )?;
            require_assistant(&m, "messages")?;
            Ok(Sample::Chat(m))
        }
        Format::Sharegpt => {
            let m = messages(
                field(v, cols, "conversations").ok_or("missing field `conversations`")?,
                "conversations",
                "from",
                "value",
                &sharegpt_role,
            )?;
            require_assistant(&m, "conversations")?;
            Ok(Sample::Chat(m))
        }
        Format::Text => Ok(Sample::Raw { prompt: String::new(), completion: string(v, cols, "text")? }),
        Format::PromptCompletion => match (field(v, cols, "prompt"), field(v, cols, "completion")) {
            (Some(Value::Array(_)), _) | (_, Some(Value::Array(_))) => {
                let mut m = turns(v, cols, "prompt", "user")?;
                m.extend(turns(v, cols, "completion", "assistant")?);
                require_assistant(&m, "completion")?;
                Ok(Sample::Chat(m))
            }
            _ => Ok(Sample::Raw {
                prompt: opt_string(v, cols, "prompt")?.unwrap_or_default(),
                completion: string(v, cols, "completion")?,
            }),
        },
        Format::Preference => {
            let prompt = turns(v, cols, "prompt", "user")?;
            let chosen = turns(v, cols, "chosen", "assistant")?;
            let rejected = turns(v, cols, "rejected", "assistant")?;
            require_assistant(&chosen, "chosen")?;
            require_assistant(&rejected, "rejected")?;
            Ok(Sample::Preference { prompt, chosen, rejected })
        }
        Format::Unpaired => {
            let prompt = turns(v, cols, "prompt", "user")?;
            let completion = turns(v, cols, "completion", "assistant")?;
            require_assistant(&completion, "completion")?;
            let desirable = match field(v, cols, "label") {
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(format!("field `label` must be a boolean (true = desirable), got {}", kind(other)))
                }
                None => return Err("missing field `label`".into()),
            };
            Ok(Sample::Unpaired { prompt, completion, desirable })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(f: Format, v: Value) -> Result<Sample, String> {
        parse(f, &v, &Columns::new())
    }

    #[test]
    fn alpaca_builds_system_user_assistant() {
        let s = p(Format::Alpaca, json!({"instruction": "Add", "input": "2+2", "output": "4", "system": "Be brief"}))
            .unwrap();
        assert_eq!(
            s,
            Sample::Chat(vec![
                Message::new("system", "Be brief"),
                Message::new("user", "Add\n\n2+2"),
                Message::new("assistant", "4")
            ])
        );
        let s = p(Format::Alpaca, json!({"instruction": "Hi", "input": "", "output": "Hello"})).unwrap();
        assert_eq!(s, Sample::Chat(vec![Message::new("user", "Hi"), Message::new("assistant", "Hello")]));
    }

    #[test]
    fn sharegpt_maps_roles_and_columns_can_be_renamed() {
        let s = p(
            Format::Sharegpt,
            json!({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}),
        )
        .unwrap();
        assert_eq!(s, Sample::Chat(vec![Message::new("user", "Q"), Message::new("assistant", "A")]));
        let cols = Columns::from([
            ("instruction".to_owned(), "question".to_owned()),
            ("output".to_owned(), "answer".to_owned()),
        ]);
        let s = parse(Format::Alpaca, &json!({"question": "Q", "answer": "A"}), &cols).unwrap();
        assert_eq!(s, Sample::Chat(vec![Message::new("user", "Q"), Message::new("assistant", "A")]));
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        let e = |f, v| p(f, v).unwrap_err();
        assert_eq!(e(Format::Alpaca, json!({"instruction": "x"})), "missing field `output`");
        assert_eq!(
            e(Format::Alpaca, json!({"instruction": 3, "output": "y"})),
            "field `instruction` must be a string, got a number"
        );
        assert_eq!(
            e(Format::Messages, json!({"messages": [{"role": "wizard", "content": "x"}]})),
            "messages[0]: unknown role `wizard`"
        );
        assert_eq!(
            e(Format::Messages, json!({"messages": [{"role": "user", "content": "x"}]})),
            "`messages` has no assistant turn to learn from"
        );
        assert_eq!(
            e(Format::Messages, json!({"messages": [{"role": "user"}]})),
            "messages[0]: missing string `content`"
        );
        assert_eq!(e(Format::Text, json!({"text": "  "})), "field `text` is empty");
        assert_eq!(e(Format::Preference, json!({"prompt": "p", "chosen": "c"})), "missing field `rejected`");
        assert_eq!(e(Format::Text, json!([1, 2])), "a record must be a JSON object, got a list");
        assert_eq!(
            e(Format::Unpaired, json!({"prompt": "p", "completion": "c", "label": "yes"})),
            "field `label` must be a boolean (true = desirable), got a string"
        );
        assert_eq!(e(Format::Unpaired, json!({"prompt": "p", "completion": "c"})), "missing field `label`");
        assert_eq!(
            p(Format::Unpaired, json!({"prompt": "Q", "completion": "A", "label": false})).unwrap(),
            Sample::Unpaired {
                prompt: vec![Message::new("user", "Q")],
                completion: vec![Message::new("assistant", "A")],
                desirable: false
            }
        );
    }

    #[test]
    fn prompt_completion_and_preference_accept_strings_or_messages() {
        assert_eq!(
            p(Format::PromptCompletion, json!({"prompt": "2+2=", "completion": "4"})).unwrap(),
            Sample::Raw { prompt: "2+2=".into(), completion: "4".into() }
        );
        let s = p(Format::PromptCompletion, json!({"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]})).unwrap();
        assert_eq!(s, Sample::Chat(vec![Message::new("user", "Q"), Message::new("assistant", "A")]));
        let s = p(Format::Preference, json!({"prompt": "Q", "chosen": "good", "rejected": "bad"})).unwrap();
        assert_eq!(
            s,
            Sample::Preference {
                prompt: vec![Message::new("user", "Q")],
                chosen: vec![Message::new("assistant", "good")],
                rejected: vec![Message::new("assistant", "bad")]
            }
        );
    }
}
