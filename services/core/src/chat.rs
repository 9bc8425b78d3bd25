//! Chat templates rendered exactly as transformers' `apply_chat_template` renders them: the model's Jinja
//! template (from `chat_template.jinja` or `tokenizer_config.json`) through minijinja with Jinja2's
//! `trim_blocks` + `lstrip_blocks`, loop controls, Python string methods, transformers' `tojson`,
//! `raise_exception` and `strftime_now`, and the variables transformers passes (`messages`,
//! `add_generation_prompt`, `tools`/`documents` as none, and the special tokens `bos_token`, `eos_token`,
//! `unk_token`, `pad_token`). A model without a template gets ChatML, and [`ChatTemplate::origin`] says so.

use std::path::Path;

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// One chat message, OpenAI style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.to_owned(), content: content.into() }
    }
}

/// Where a template came from; recorded wherever a template is used, so that training and inference can
/// be checked to use the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateOrigin {
    /// `chat_template.jinja` in the model directory.
    JinjaFile,
    /// `chat_template` in `tokenizer_config.json`.
    TokenizerConfig,
    /// The model has none: ChatML ([`CHATML`]).
    ChatmlFallback,
    /// Named in the recipe (`chat_template: zephyr`, …; see [`NAMED`]).
    Named,
    /// A Jinja file named in the recipe.
    RecipeFile,
    /// The adapter's own `chat_template.jinja`, which differs from the base model's.
    Adapter,
}

/// Zephyr's template (HuggingFaceH4/zephyr-7b-beta, and TinyLlama-1.1B-Chat's), verbatim.
pub const ZEPHYR: &str = include_str!("chat_templates/zephyr.jinja");

/// Gemma 3's instruction template (google/gemma-3-*-it, as TRL keeps it in `trl/chat_templates/gemma3.jinja`).
pub const GEMMA: &str = include_str!("chat_templates/gemma3.jinja");

/// Templates a recipe can name (`chat_template: NAME`).
pub const NAMED: &[(&str, &str)] = &[("chatml", CHATML), ("zephyr", ZEPHYR), ("gemma", GEMMA)];

/// The fallback template: ChatML, as used by SmolLM2 and Qwen2 (without a default system message).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// A model's chat template with its special tokens.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    origin: TemplateOrigin,
    specials: Vec<(&'static str, Option<String>)>,
}

/// A special token from tokenizer_config.json: a string, or transformers' AddedToken dict.
pub(crate) fn special_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        // transformers also writes AddedToken dicts: {"content": "<s>", "lstrip": false, ...}
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

/// `eos` and the turn-end tokens (`<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`, `<|end|>`) that any of the chat
/// templates `sources` (Jinja) writes and the tokenizer knows: where generation stops (see
/// [`crate::ModelBundle::stop_ids`]).
pub fn stop_ids(eos: &[u32], sources: &[&str], tok: &crate::Tokenizer) -> Vec<u32> {
    const TURN_ENDS: [&str; 4] = ["<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>"];
    let mut ids = eos.to_vec();
    for t in TURN_ENDS.iter().filter(|t| sources.iter().any(|s| s.contains(*t))) {
        if let Some(id) = tok.token_to_id(t) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

impl ChatTemplate {
    /// The template a recipe asks for: `spec` names one of [`NAMED`] or a Jinja file; `None` is the model's
    /// own ([`ChatTemplate::from_dir`]). The special tokens are always the model's.
    pub fn for_model(dir: &Path, spec: Option<&str>) -> Result<Self> {
        let base = Self::from_dir(dir)?;
        let Some(spec) = spec.filter(|s| !s.trim().is_empty()) else { return Ok(base) };
        let (source, origin) = match NAMED.iter().find(|(n, _)| *n == spec) {
            Some((_, src)) => ((*src).to_owned(), TemplateOrigin::Named),
            None if crate::fsx::is_file(spec) => {
                let text = crate::fsx::read_to_string(spec).map_err(|e| CoreError::io(Path::new(spec), e))?;
                (text, TemplateOrigin::RecipeFile)
            }
            None => {
                let names: Vec<&str> = NAMED.iter().map(|(n, _)| *n).collect();
                return Err(CoreError::InvalidArgument(format!(
                    "chat_template: `{spec}` is neither a known template ({}) nor a Jinja file",
                    names.join(", ")
                )));
            }
        };
        base.with_source(source, origin)
    }

    /// This template's special tokens with another source.
    pub fn with_source(&self, source: String, origin: TemplateOrigin) -> Result<Self> {
        let t = Self { source, origin, specials: self.specials.clone() };
        t.env()?.template_from_str(&t.source).map_err(|e| template_error(&e))?;
        Ok(t)
    }

    /// The template of the model (or tokenizer) directory `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text = crate::fsx::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| CoreError::format(&cfg_path, format!("invalid JSON: {e}")))?
        } else {
            serde_json::Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, origin) = if jinja.exists() {
            (crate::fsx::read_to_string(&jinja).map_err(|e| CoreError::io(&jinja, e))?, TemplateOrigin::JinjaFile)
        } else {
            match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => (s.clone(), TemplateOrigin::TokenizerConfig),
                // Named templates: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
                Some(serde_json::Value::Array(list)) => {
                    let t = list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template")?.as_str())
                        .ok_or_else(|| CoreError::format(&cfg_path, "chat_template list has no `default` template"))?;
                    (t.to_owned(), TemplateOrigin::TokenizerConfig)
                }
                _ => (CHATML.to_owned(), TemplateOrigin::ChatmlFallback),
            }
        };
        let specials = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .into_iter()
            .map(|k| (k, special_token(&cfg, k)))
            .collect();
        let t = Self { source, origin, specials };
        // Compile once now so that a broken template fails at load, with its line.
        t.env()?.template_from_str(&t.source).map_err(|e| template_error(&e))?;
        Ok(t)
    }

    /// A template from source, with the given special tokens (for tests and for recipes that override it).
    pub fn from_source(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let specials = vec![
            ("bos_token", bos.map(str::to_owned)),
            ("eos_token", eos.map(str::to_owned)),
            ("unk_token", None),
            ("pad_token", None),
        ];
        let t = Self { source: source.to_owned(), origin: TemplateOrigin::TokenizerConfig, specials };
        t.env()?.template_from_str(&t.source).map_err(|e| template_error(&e))?;
        Ok(t)
    }

    /// Where the template came from.
    pub fn origin(&self) -> TemplateOrigin {
        self.origin
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn env(&self) -> Result<Environment<'static>> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_filter("tojson", tojson);
        Ok(env)
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's answer begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(CoreError::InvalidArgument("chat has no messages".into()));
        }
        for (i, m) in messages.iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(CoreError::InvalidArgument(format!(
                    "message #{i}: unknown role `{}` (expected system, user, assistant or tool)",
                    m.role
                )));
            }
        }
        let env = self.env()?;
        let tmpl = env.template_from_str(&self.source).map_err(|e| template_error(&e))?;
        let mut ctx: std::collections::BTreeMap<&str, Value> =
            self.specials.iter().map(|(k, v)| (*k, v.as_deref().map(Value::from).unwrap_or(Value::from(())))).collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        tmpl.render(ctx).map_err(|e| template_error(&e))
    }
}

fn template_error(e: &Error) -> CoreError {
    let mut msg = format!("chat template: {}", e.kind());
    if let Some(d) = e.detail() {
        msg.push_str(&format!(": {d}"));
    }
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (line {line})"));
    }
    CoreError::InvalidArgument(msg)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=False)`, i.e. Python's
/// separators (`", "` and `": "`, or `","` per line when indented) and no HTML escaping.
fn tojson(v: Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let j = serde_json::to_value(&v).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_json(&j, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let (item_sep, nl) = match indent {
        Some(n) => (",".to_owned(), Some(n)),
        None => (", ".to_owned(), None),
    };
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = nl {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&item_sep);
                }
                newline(out, depth + 1);
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(&item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("string serializes"));
                out.push_str(": ");
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).expect("JSON serializes")),
    }
}

/// `strftime_now(fmt)` in UTC, for the codes chat templates use: `%d %m %y %Y %b %B %H %M %S %%`.
fn strftime_now(fmt: &str) -> std::result::Result<String, Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(strftime(fmt, secs))
}

fn strftime(fmt: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // civil_from_days (H. Hinnant)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The named templates render [system S, user Hi, assistant Hello, user Bye] + generation prompt as
    /// transformers does (jinja2 3.1.6 with transformers' trim_blocks / lstrip_blocks, rendered outside this repo).
    #[test]
    fn named_templates_render_as_transformers() {
        let chat = [
            Message::new("system", "S"),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello"),
            Message::new("user", "Bye"),
        ];
        let cases = [
            (ZEPHYR, Some("<s>"), Some("</s>"), "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nBye</s>\n<|assistant|>\n"),
            (GEMMA, Some("<bos>"), None, "<bos><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
            (CHATML, None, None, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
        ];
        for (src, bos, eos, want) in cases {
            assert_eq!(ChatTemplate::from_source(src, bos, eos).unwrap().render(&chat, true).unwrap(), want);
        }
        let e = ChatTemplate::from_source(GEMMA, Some("<bos>"), None)
            .unwrap()
            .render(&[Message::new("user", "a"), Message::new("user", "b")], true)
            .unwrap_err();
        assert!(e.to_string().contains("must alternate"), "{e}");
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2026-11-28 14:58:31 UTC
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S (%B, %m/%y) 100%%", 1_795_877_911),
            "28 Nov 2026 14:58:31 (November, 11/26) 100%"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn tojson_uses_python_separators_without_html_escaping() {
        let t = ChatTemplate::from_source("{{ x | tojson }}|{{ x | tojson(indent=2) }}", None, None).unwrap();
        let env = t.env().unwrap();
        let out = env
            .template_from_str(t.source())
            .unwrap()
            .render(minijinja::context! { x => serde_json::json!({"a": [1, "<é>"], "b": {}}) })
            .unwrap();
        assert_eq!(out, "{\"a\": [1, \"<é>\"], \"b\": {}}|{\n  \"a\": [\n    1,\n    \"<é>\"\n  ],\n  \"b\": {}\n}");
    }

    #[test]
    fn template_errors_are_errors() {
        assert!(ChatTemplate::from_source("{% for %}", None, None).unwrap_err().to_string().contains("chat template"));
        let t = ChatTemplate::from_source("{{ raise_exception('only user turns') }}", None, None).unwrap();
        let e = t.render(&[Message::new("user", "x")], false).unwrap_err().to_string();
        assert!(e.contains("only user turns"), "{e}");
        let e = t.render(&[Message::new("wizard", "x")], false).unwrap_err().to_string();
        assert!(e.contains("unknown role `wizard`"), "{e}");
        assert!(t.render(&[], false).is_err());
    }

    #[test]
    fn chatml_fallback_renders_turns() {
        let t = ChatTemplate::from_source(CHATML, None, None).unwrap();
        let s = t.render(&[Message::new("system", "S"), Message::new("user", "U")], true).unwrap();
        assert_eq!(s, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
    }
}
