//! Text generation with a KV cache: batched prompts (left-padded), greedy or sampled decoding
//! ([`crate::sampling`]), stop on EOS / end-of-turn ids and on stop strings, per-token log-probs.
//!
//! The log-prob of each generated token is under the model's own distribution (raw logits, before
//! repetition penalty, temperature and filtering), which is what PPO's importance ratios need.

use std::path::Path;

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::models::CausalLm;
use crate::sampling::{choose, log_prob, Rng, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Options of one generation request.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate per sequence.
    pub max_new_tokens: usize,
    /// Token selection.
    pub sampling: SamplingParams,
    /// Seed of the sampling streams (sequence i uses stream (seed, i)).
    pub seed: u64,
    /// Generation ends at any of these ids (included in the output ids).
    pub eos_ids: Vec<u32>,
    /// Generation ends when the text contains one of these (the text is cut before it).
    pub stop_strings: Vec<String>,
    /// Id used for left padding.
    pub pad_id: u32,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS / end-of-turn id was generated.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` (or the model's context) was reached.
    Length,
}

/// One generated sequence.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    /// New token ids (with the EOS id when it ended on one).
    pub ids: Vec<u32>,
    /// Text of the new tokens, special tokens skipped, cut before a stop string.
    pub text: String,
    /// log p(token) under the model for each new token.
    pub logprobs: Vec<f32>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
}

/// Defaults a model directory declares: EOS ids (generation_config.json, config.json and the tokenizer's
/// eos token, merged) and the pad id (pad, else the first EOS).
#[derive(Debug, Clone)]
pub struct ModelDefaults {
    /// End-of-sequence / end-of-turn ids.
    pub eos_ids: Vec<u32>,
    /// Padding id.
    pub pad_id: u32,
}

impl ModelDefaults {
    /// Reads the model directory's declared EOS and pad ids.
    pub fn from_dir(dir: &Path, tok: &Tokenizer) -> Result<Self> {
        let read = |name: &str| -> Result<serde_json::Value> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(serde_json::Value::Null);
            }
            let text = crate::fsx::read_to_string(&p).map_err(|e| CoreError::io(&p, e))?;
            serde_json::from_str(&text).map_err(|e| CoreError::format(&p, format!("invalid JSON: {e}")))
        };
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            match v {
                serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
                _ => vec![],
            }
        };
        let (gen, cfg, tc) = (read("generation_config.json")?, read("config.json")?, read("tokenizer_config.json")?);
        let token = |key: &str| crate::chat::special_token(&tc, key).and_then(|t| tok.token_to_id(&t));
        let mut eos_ids = ids(&gen["eos_token_id"]);
        for extra in ids(&cfg["eos_token_id"]).into_iter().chain(token("eos_token")) {
            if !eos_ids.contains(&extra) {
                eos_ids.push(extra);
            }
        }
        let pad_id = ids(&gen["pad_token_id"])
            .first()
            .copied()
            .or_else(|| ids(&cfg["pad_token_id"]).first().copied())
            .or_else(|| token("pad_token"))
            .or_else(|| eos_ids.first().copied())
            .unwrap_or(0);
        Ok(Self { eos_ids, pad_id })
    }
}

/// One step of streaming output: sequence `row` produced token `id`.
#[derive(Debug, Clone, Copy)]
pub struct StepToken {
    /// Which prompt.
    pub row: usize,
    /// The new token.
    pub id: u32,
}

/// Generates continuations of `prompts` (token ids) in one batch. `on_step` sees every new token as
/// it is produced (for streaming).
pub fn generate(
    model: &CausalLm,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(&[StepToken]),
) -> Result<Vec<Generated>> {
    generate_until(model, tok, prompts, opts, on_step, &|| false)
}

/// [`generate`] that gives up with [`CoreError::Cancelled`] before the next token once `cancelled` says so
/// (a service's caller went away or ran past its deadline).
pub fn generate_until(
    model: &CausalLm,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(&[StepToken]),
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Generated>> {
    opts.sampling.validate()?;
    if prompts.is_empty() {
        return Err(CoreError::InvalidArgument("no prompts".into()));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(CoreError::InvalidArgument(format!("prompt #{i} is empty")));
    }
    if opts.max_new_tokens == 0 {
        return Err(CoreError::InvalidArgument("max_new_tokens must be at least 1".into()));
    }
    let vocab = model.cfg.vocab_size as u32;
    if let Some((i, t)) = prompts.iter().enumerate().find_map(|(i, p)| p.iter().find(|&&t| t >= vocab).map(|&t| (i, t)))
    {
        return Err(CoreError::InvalidArgument(format!(
            "prompt #{i}: token id {t} is outside the vocabulary ({vocab})"
        )));
    }
    let ctx = model.cfg.max_position_embeddings as usize;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest >= ctx {
        return Err(CoreError::InvalidArgument(format!(
            "prompt of {longest} tokens does not fit the model's context of {ctx} tokens"
        )));
    }
    let max_new = opts.max_new_tokens.min(ctx - longest);
    let b = prompts.len();
    let cap = longest + max_new;
    let dev = model.device();
    let _guard = tch::no_grad_guard();

    // Left-pad into [b, longest]; the mask covers the whole capacity and grows one column per step.
    let padded = prompts.iter().any(|p| p.len() != longest);
    let mut ids = vec![opts.pad_id as i64; b * longest];
    let mut mask = vec![0i64; b * cap];
    for (r, p) in prompts.iter().enumerate() {
        let off = longest - p.len();
        for (j, &t) in p.iter().enumerate() {
            ids[r * longest + off + j] = t as i64;
        }
        for j in off..cap {
            mask[r * cap + j] = 1;
        }
    }
    let mask_upto = |len: usize| -> Result<Option<Tensor>> {
        if !padded {
            return Ok(None);
        }
        let m = Tensor::f_from_slice(&mask)?.f_view([b as i64, cap as i64])?.f_narrow(1, 0, len as i64)?;
        Ok(Some(m.f_to_device(dev)?))
    };
    let mut cache = model.new_cache(b as i64, cap as i64)?;
    let input = Tensor::f_from_slice(&ids)?.f_view([b as i64, longest as i64])?.f_to_device(dev)?;
    let hidden = model.forward_hidden_cached(&input, mask_upto(longest)?.as_ref(), None, Some(&mut cache))?;
    let mut logits = model.logits(&hidden.f_select(1, longest as i64 - 1)?)?;

    let mut rngs: Vec<Rng> = (0..b).map(|r| Rng::for_row(opts.seed, r)).collect();
    let mut seen: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Generated> = prompts
        .iter()
        .map(|p| Generated {
            ids: vec![],
            text: String::new(),
            logprobs: vec![],
            finish_reason: FinishReason::Length,
            prompt_tokens: p.len(),
        })
        .collect();
    let mut done = vec![false; b];
    for step in 0..max_new {
        if cancelled() {
            return Err(CoreError::Cancelled);
        }
        let host: Vec<f32> = Vec::try_from(logits.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?;
        let v = host.len() / b;
        let mut next = vec![opts.pad_id as i64; b];
        let mut events = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                continue;
            }
            let row = &host[r * v..(r + 1) * v];
            let mut work = row.to_vec();
            let id = choose(&mut work, &seen[r], &opts.sampling, &mut rngs[r]);
            let g = &mut out[r];
            g.ids.push(id);
            g.logprobs.push(log_prob(row, id as usize));
            seen[r].push(id);
            next[r] = id as i64;
            events.push(StepToken { row: r, id });
            if opts.eos_ids.contains(&id) {
                g.finish_reason = FinishReason::Eos;
                done[r] = true;
            } else if !opts.stop_strings.is_empty() {
                let text = tok.decode(&g.ids, true)?;
                if opts.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    g.finish_reason = FinishReason::Stop;
                    done[r] = true;
                }
            }
        }
        on_step(&events);
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        let input = Tensor::f_from_slice(&next)?.f_view([b as i64, 1])?.f_to_device(dev)?;
        let hidden =
            model.forward_hidden_cached(&input, mask_upto(longest + step + 1)?.as_ref(), None, Some(&mut cache))?;
        logits = model.logits(&hidden.f_select(1, 0)?)?;
    }
    for g in &mut out {
        let body: &[u32] = match g.finish_reason {
            FinishReason::Eos => &g.ids[..g.ids.len() - 1],
            _ => &g.ids,
        };
        let mut text = tok.decode(body, true)?;
        if let Some(cut) = opts.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        g.text = text;
    }
    Ok(out)
}
