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
use crate::sampling::{choose, log_prob, sample_rows, Rng, SamplingParams};
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
    generate_groups(model, tok, prompts, 1, opts, on_step, cancelled)
}

/// Compact the batch once this share of its rows has finished (dropping rows moves the later rows' caches).
const COMPACT_FRACTION: usize = 16;

/// Generates `n` continuations of each prompt — the rollout engine of group RL. Each prompt is prefilled once
/// and its KV cache shared by its `n` samples; sequences that finish leave the batch (the cache compacted in
/// place once a sixteenth of the rows has finished), so no compute goes to padding; every row is sampled in one pass
/// over the step's logits. Sample `j` of prompt `p` is row `p × n + j` of the output and draws from sampling
/// stream (`seed`, that row) — the same stream as row `p × n + j` of [`generate_until`] on the prompts
/// repeated `n` times. `on_step` sees the rows' new tokens.
pub fn generate_groups(
    model: &CausalLm,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    n: usize,
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(&[StepToken]),
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Generated>> {
    if n == 0 {
        return Err(CoreError::InvalidArgument("samples per prompt must be at least 1".into()));
    }
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
    let p = prompts.len();
    let b = p * n;
    let cap = longest + max_new;
    let dev = model.device();
    let _guard = tch::no_grad_guard();

    // Left-pad the prompts into [p, longest]; each row's mask covers the whole capacity (a row's mask is its
    // prompt's) and grows one column per step.
    let padded = prompts.iter().any(|x| x.len() != longest);
    let mut ids = vec![opts.pad_id as i64; p * longest];
    let mut mask = vec![0i64; p * cap];
    for (r, x) in prompts.iter().enumerate() {
        let off = longest - x.len();
        for (j, &t) in x.iter().enumerate() {
            ids[r * longest + off + j] = t as i64;
        }
        for j in off..cap {
            mask[r * cap + j] = 1;
        }
    }
    // The mask of output rows `rows` up to column `len`.
    let mask_upto = |rows: &[usize], len: usize| -> Result<Option<Tensor>> {
        if !padded {
            return Ok(None);
        }
        let m: Vec<i64> = rows.iter().flat_map(|&r| mask[(r / n) * cap..(r / n) * cap + len].iter().copied()).collect();
        Ok(Some(Tensor::f_from_slice(&m)?.f_view([rows.len() as i64, len as i64])?.f_to_device(dev)?))
    };
    let prompt_rows: Vec<usize> = (0..p).map(|r| r * n).collect();
    let mut cache = model.new_cache(p as i64, cap as i64)?;
    let input = Tensor::f_from_slice(&ids)?.f_view([p as i64, longest as i64])?.f_to_device(dev)?;
    let hidden =
        model.forward_hidden_cached(&input, mask_upto(&prompt_rows, longest)?.as_ref(), None, Some(&mut cache))?;
    let mut logits = model.logits(&hidden.f_select(1, longest as i64 - 1)?)?;
    if n > 1 {
        let rows =
            Tensor::f_arange(p as i64, (tch::Kind::Int64, dev))?.f_repeat_interleave_self_int(n as i64, 0, None)?;
        cache.select_rows(&rows)?;
        logits = logits.f_index_select(0, &rows)?;
    }

    let mut rngs: Vec<Rng> = (0..b).map(|r| Rng::for_row(opts.seed, r)).collect();
    // The repetition penalty's view of each row (prompt and generated so far); unused otherwise.
    let mut seen: Vec<Vec<u32>> =
        (0..b).map(|r| if opts.sampling.repetition_penalty != 1.0 { prompts[r / n].clone() } else { vec![] }).collect();
    let mut out: Vec<Generated> = (0..b)
        .map(|r| Generated {
            ids: vec![],
            text: String::new(),
            logprobs: vec![],
            finish_reason: FinishReason::Length,
            prompt_tokens: prompts[r / n].len(),
        })
        .collect();
    // The output rows in the batch, in batch order; finished rows stay until the next compaction.
    let mut batch: Vec<usize> = (0..b).collect();
    let mut done = vec![false; b];
    for step in 0..max_new {
        if cancelled() {
            return Err(CoreError::Cancelled);
        }
        let chosen = choose_rows(&logits, &batch, &done, &mut seen, &mut rngs, &opts.sampling)?;
        let mut next = vec![opts.pad_id as i64; batch.len()];
        let mut events = Vec::with_capacity(batch.len());
        for (i, &r) in batch.iter().enumerate() {
            if done[r] {
                continue;
            }
            let (id, lp) = chosen[i];
            let g = &mut out[r];
            g.ids.push(id);
            g.logprobs.push(lp);
            next[i] = id as i64;
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
        let live = batch.iter().filter(|&&r| !done[r]).count();
        if live == 0 || step + 1 == max_new {
            break;
        }
        // Finished rows leave the batch once enough have gathered.
        if (batch.len() - live) * COMPACT_FRACTION >= batch.len() {
            let keep: Vec<i64> = (0..batch.len()).filter(|&i| !done[batch[i]]).map(|i| i as i64).collect();
            cache.retain_rows(&keep)?;
            next = keep.iter().map(|&i| next[i as usize]).collect();
            batch = keep.iter().map(|&i| batch[i as usize]).collect();
        }
        let input = Tensor::f_from_slice(&next)?.f_view([batch.len() as i64, 1])?.f_to_device(dev)?;
        let hidden = model.forward_hidden_cached(
            &input,
            mask_upto(&batch, longest + step + 1)?.as_ref(),
            None,
            Some(&mut cache),
        )?;
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

/// The next token and its log-prob for each row of the batch (`batch[i]` is output row of logits row `i`;
/// finished rows get `(0, 0.0)` and draw nothing). Plain sampling ([`SamplingParams::is_plain`]) runs on the
/// logits' device; filtering and the repetition penalty run on the host. Either way each live row draws from
/// its own stream, so a row's token depends only on its logits and its stream.
fn choose_rows(
    logits: &Tensor,
    batch: &[usize],
    done: &[bool],
    seen: &mut [Vec<u32>],
    rngs: &mut [Rng],
    p: &SamplingParams,
) -> Result<Vec<(u32, f32)>> {
    if p.is_plain() {
        let u: Vec<f64> = batch.iter().map(|&r| if done[r] || p.greedy { 0.0 } else { rngs[r].uniform() }).collect();
        let (ids, lps) = sample_rows(logits, &u, p)?;
        return Ok(ids.into_iter().zip(lps).collect());
    }
    let host: Vec<f32> = Vec::try_from(logits.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?;
    let v = host.len() / batch.len();
    let mut out = vec![(0, 0.0); batch.len()];
    for (i, &r) in batch.iter().enumerate() {
        if done[r] {
            continue;
        }
        let row = &host[i * v..(i + 1) * v];
        let id = choose(&mut row.to_vec(), &seen[r], p, &mut rngs[r]);
        if p.repetition_penalty != 1.0 {
            seen[r].push(id);
        }
        out[i] = (id, log_prob(row, id as usize));
    }
    Ok(out)
}
