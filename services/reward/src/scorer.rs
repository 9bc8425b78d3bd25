//! Scoring on the service's worker thread: loaded reward models (base + SEQ_CLS adapter + head, the base
//! NF4-quantized when the adapter was trained on one), items rendered exactly as the training data was
//! (the data library's preference rendering: prompt as the user turn, response as the assistant turn with
//! its end-of-turn token), scored at each sequence's last token in one batch.

use std::path::{Path, PathBuf};

use ferrotune_core::data::formats::{MaskMode, Sample};
use ferrotune_core::data::tokenize::{Renderer, TokenizedSample};
use ferrotune_core::train::reward::{load_reward_model, score_sequences};
use ferrotune_core::train::sft::SftExample;
use ferrotune_core::{Message, ModelBundle};
use ferrotune_runtime::lru::Lru;
use ferrotune_runtime::StatusExt;
use tch::{Device, Kind};
use tonic::Status;

/// Loaded reward models, least recently used dropped first.
pub struct Scorers {
    device: Device,
    kind: Kind,
    cache: Lru<(PathBuf, PathBuf), ModelBundle>,
}

impl Scorers {
    /// None loaded yet.
    pub fn new(device: Device, kind: Kind, max: usize) -> Self {
        Self { device, kind, cache: Lru::new(max).metered("reward") }
    }

    fn get(&mut self, base: &Path, adapter: &Path) -> Result<&mut ModelBundle, Status> {
        let key = (base.to_path_buf(), adapter.to_path_buf());
        if !self.cache.touch(&key) && !adapter.join("adapter_config.json").is_file() {
            return Err(Status::not_found(format!(
                "model.learned.adapter: {} is not an adapter directory (no adapter_config.json)",
                adapter.display()
            )));
        }
        let (device, kind) = (self.device, self.kind);
        self.cache.get_or_load(key, || {
            let mut b = ModelBundle::load(base, kind, device).status()?;
            if ferrotune_core::lora::trained_on_nf4(adapter).status()? {
                b.model.quantize_nf4().status()?;
            }
            load_reward_model(&mut b.model, adapter).status()?;
            Ok(b)
        })
    }

    /// Scores of (prompt, response) items under the reward model `base` + `adapter`.
    pub fn score(&mut self, base: &Path, adapter: &Path, items: &[(String, String)]) -> Result<Vec<f32>, Status> {
        let b = self.get(base, adapter)?;
        let eos_id = *b
            .defaults
            .eos_ids
            .first()
            .ok_or_else(|| Status::failed_precondition("the base model declares no EOS token"))?;
        let r = Renderer {
            tokenizer: &b.tokenizer,
            template: &b.template,
            eos_id,
            eos_ids: &b.defaults.eos_ids,
            mask: MaskMode::Assistant,
        };
        let max = b.model.cfg.max_position_embeddings as usize;
        let mut seqs = Vec::with_capacity(items.len());
        for (i, (prompt, response)) in items.iter().enumerate() {
            let reply = vec![Message::new("assistant", response)];
            let sample = Sample::Preference {
                prompt: vec![Message::new("user", prompt)],
                chosen: reply.clone(),
                rejected: reply,
            };
            let ids = match r.sample(&sample).map_err(|e| Status::invalid_argument(format!("items[{i}]: {e}")))? {
                TokenizedSample::Pair { chosen, .. } => chosen.input_ids,
                TokenizedSample::Single(s) | TokenizedSample::Judged { seq: s, .. } => s.input_ids,
            };
            if ids.len() > max {
                return Err(Status::invalid_argument(format!(
                    "items[{i}]: {} tokens exceed the model's {max} positions",
                    ids.len()
                )));
            }
            let n = ids.len();
            seqs.push(SftExample::new(ids, vec![-100; n]));
        }
        let refs: Vec<&SftExample> = seqs.iter().collect();
        let pad = b.defaults.pad_id;
        let scores = tch::no_grad(|| score_sequences(&b.model, &refs, pad)).status()?;
        Vec::<f32>::try_from(&scores.f_to_device(Device::Cpu).map_err(|e| Status::internal(e.to_string()))?)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// The longest `regex:` pattern a rule may hold, in bytes.
pub const MAX_REGEX_BYTES: usize = 1024;
/// The most memory one compiled `regex:` pattern may take.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Whether `pattern` matches anywhere in `text` (Python's `re.search`), with the `regex` crate's syntax.
/// A pattern that does not compile, or compiles too large, is INVALID_ARGUMENT: scoring every response 0
/// would train on a reward that says nothing. Compiled patterns are cached (a few hundred at most).
pub(crate) fn regex_search(pattern: &str, text: &str) -> Result<bool, Status> {
    static CACHE: std::sync::Mutex<Option<std::collections::HashMap<String, regex::Regex>>> =
        std::sync::Mutex::new(None);
    if pattern.is_empty() {
        return Err(Status::invalid_argument("model.rule: empty regex"));
    }
    if pattern.len() > MAX_REGEX_BYTES {
        return Err(Status::invalid_argument(format!(
            "model.rule: regex of {} bytes is longer than the limit of {MAX_REGEX_BYTES}",
            pattern.len()
        )));
    }
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    if let Some(re) = cache.get(pattern) {
        return Ok(re.is_match(text));
    }
    let re = regex::RegexBuilder::new(pattern).size_limit(REGEX_SIZE_LIMIT).build().map_err(|e| {
        let first = e.to_string().lines().last().unwrap_or_default().trim().to_owned();
        Status::invalid_argument(format!(
            "model.rule: invalid regex {}: {first}",
            ferrotune_runtime::paths::quote(pattern)
        ))
    })?;
    let m = re.is_match(text);
    if cache.len() >= 256 {
        cache.clear();
    }
    cache.insert(pattern.to_owned(), re);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let rule_score = |r: &str, t: &str| crate::rules::rule_score(r, t, "");
        assert_eq!(rule_score("length", "héllo").unwrap(), 5.0);
        assert_eq!(rule_score("exact:42", " 42 ").unwrap(), 1.0);
        assert_eq!(rule_score("exact:42", "43").unwrap(), 0.0);
        assert_eq!(rule_score("prefix:Ahoy!", "Ahoy! Cairo.").unwrap(), 1.0);
        assert_eq!(rule_score("regex:^Ahoy!.*Arr.$", "Ahoy! It is Cairo. Arr.").unwrap(), 1.0);
        assert_eq!(rule_score("regex:^Ahoy!.*Arr.$", "It is Cairo. Arr.").unwrap(), 0.0);
        assert_eq!(rule_score("regex:Cai*ro", "in Cairo").unwrap(), 1.0);
        assert_eq!(rule_score("regex:x$", "xy").unwrap(), 0.0);
        assert_eq!(rule_score("regex:^The .* is .*\\.$", "The capital is Rome.").unwrap(), 1.0);
        assert_eq!(rule_score("regex:^The .* is .*\\.$", "The capital is Rome!").unwrap(), 0.0);
        assert_eq!(rule_score("regex:(Rome|Paris)[.!]$", "It is Paris!").unwrap(), 1.0);
        // A pattern that does not compile, or compiles too large, is an error, never a score of 0.
        for bad in ["regex:(", "regex:[a-", "regex:\\p{Nope}", "regex:a{1000}{1000}"] {
            let e = rule_score(bad, "x").unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.message().starts_with("model.rule: invalid regex"), "{bad}: {}", e.message());
        }
        let long = format!("regex:{}", "a".repeat(MAX_REGEX_BYTES + 1));
        assert!(rule_score(&long, "a").unwrap_err().message().contains("longer than the limit"));
        assert_eq!(rule_score("regex:a\\*", "a*").unwrap(), 1.0);
        assert_eq!(rule_score("regex:a\\*", "aa").unwrap(), 0.0);
        assert!(rule_score("regex:", "x").is_err());
        assert!(rule_score("vibes", "x").is_err());
    }
}
