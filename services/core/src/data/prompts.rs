//! Prompt sets for RLHF rollouts: JSONL records with a `prompt` (a string — the user's turn — or a list of
//! chat messages), or a `messages` list whose trailing assistant turn (if any) is dropped. Any other field is
//! ignored, so preference and prompt-completion files work as they are.

use std::path::Path;

use crate::{CoreError, Message};
use serde_json::Value;

use crate::data::{DataError, Result};

fn messages(v: &Value) -> Option<Vec<Message>> {
    v.as_array()?.iter().map(|m| Some(Message::new(m.get("role")?.as_str()?, m.get("content")?.as_str()?))).collect()
}

/// The prompts of `path`, each as chat messages ending with a user (or system) turn.
pub fn load_prompts(path: &Path) -> Result<Vec<Vec<Message>>> {
    let text = crate::fsx::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: &str| DataError::Record { file: path.to_path_buf(), line: i + 1, reason: reason.to_owned() };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        let mut msgs = match (v.get("prompt"), v.get("messages")) {
            (Some(Value::String(s)), _) if !s.trim().is_empty() => vec![Message::new("user", s.clone())],
            (Some(p @ Value::Array(_)), _) => {
                messages(p).ok_or_else(|| bad("`prompt` must be a string or a list of {role, content} messages"))?
            }
            (None, Some(m)) => {
                messages(m).ok_or_else(|| bad("`messages` must be a list of {role, content} messages"))?
            }
            (Some(_), _) => {
                return Err(bad("`prompt` must be a non-empty string or a list of {role, content} messages"))
            }
            (None, None) => return Err(bad("missing field `prompt` (or `messages`)")),
        };
        if msgs.last().is_some_and(|m| m.role == "assistant") {
            msgs.pop();
        }
        if msgs.is_empty() {
            return Err(bad("no prompt turn (only an assistant reply)"));
        }
        out.push(msgs);
    }
    if out.is_empty() {
        return Err(DataError::InvalidArgument(format!("{}: no prompts", path.display())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.jsonl");
        crate::fsx::write(&p, "{\"prompt\": \"Hi?\", \"chosen\": \"a\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"A\"}]}\n{\"prompt\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": \"U\"}]}\n").unwrap();
        let ps = load_prompts(&p).unwrap();
        assert_eq!(ps.len(), 3);
        assert_eq!((ps[0][0].role.as_str(), ps[0][0].content.as_str()), ("user", "Hi?"));
        assert_eq!(ps[1].len(), 1);
        assert_eq!(ps[2].len(), 2);
        for (body, want) in [
            ("{\"text\": \"x\"}", "p.jsonl:2: missing field `prompt`"),
            ("{\"prompt\": 3}", "p.jsonl:2: `prompt` must be"),
            ("not json", "p.jsonl:2: invalid JSON"),
        ] {
            crate::fsx::write(&p, format!("{{\"prompt\": \"ok\"}}\n{body}\n")).unwrap();
            let e = load_prompts(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
