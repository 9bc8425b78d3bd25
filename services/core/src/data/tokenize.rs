//! Samples → token ids and labels. Conversations are rendered once with the model's chat template; the
//! character spans of the learned assistant turns are found by rendering the conversation up to each turn
//! (with and without the generation prompt), and tokens starting inside a span get their id as label,
//! all others −100. Each assistant turn's end-of-turn token lies inside its span and so **is** trained;
//! labels are explicit, so a pad id equal to EOS can never mask it out.

use crate::train::loss::IGNORE_INDEX;
use crate::{ChatTemplate, Message, Tokenizer};

use crate::data::formats::{MaskMode, Sample};

/// Ids and aligned labels of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Label per position (−100 = not trained).
    pub labels: Vec<i64>,
}

impl Tokenized {
    /// Positions whose label is trained (excluding position 0, which nothing predicts).
    pub fn trained(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Cuts to at most `max` tokens (keeping the start); returns whether it cut.
    pub fn truncate(&mut self, max: usize) -> bool {
        let cut = self.input_ids.len() > max;
        self.input_ids.truncate(max);
        self.labels.truncate(max);
        cut
    }
}

/// A tokenized sample.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizedSample {
    /// One sequence (SFT).
    Single(Tokenized),
    /// A preference pair; only the chosen / rejected turns are labelled.
    Pair {
        /// Prompt + chosen.
        chosen: Tokenized,
        /// Prompt + rejected.
        rejected: Tokenized,
    },
    /// One completion with its judgement (KTO); only the completion turns are labelled.
    Judged {
        /// Prompt + completion.
        seq: Tokenized,
        /// Desirable or not.
        desirable: bool,
    },
}

/// Renders and tokenizes samples for one model.
pub struct Renderer<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The model's chat template.
    pub template: &'a ChatTemplate,
    /// End-of-sequence id appended to raw text (and to chats whose template does not end turns with one).
    pub eos_id: u32,
    /// End-of-sequence / end-of-turn ids the model knows.
    pub eos_ids: &'a [u32],
    /// What is trained.
    pub mask: MaskMode,
}

impl Renderer<'_> {
    /// Tokenizes a sample; errors are per-record reasons.
    pub fn sample(&self, s: &Sample) -> Result<TokenizedSample, String> {
        match s {
            Sample::Chat(m) => Ok(TokenizedSample::Single(self.chat(m, self.mask)?)),
            Sample::Raw { prompt, completion } => Ok(TokenizedSample::Single(self.raw(prompt, completion)?)),
            Sample::Preference { prompt, chosen, rejected } => {
                let join = |c: &[Message]| prompt.iter().chain(c).cloned().collect::<Vec<_>>();
                // Only the response turns are labelled, whatever the mask (they are what is compared).
                let first = prompt.len();
                Ok(TokenizedSample::Pair {
                    chosen: self.chat_from(&join(chosen), first)?,
                    rejected: self.chat_from(&join(rejected), first)?,
                })
            }
            Sample::Unpaired { prompt, completion, desirable } => {
                let m: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
                Ok(TokenizedSample::Judged { seq: self.chat_from(&m, prompt.len())?, desirable: *desirable })
            }
        }
    }

    fn render(&self, m: &[Message], gen: bool) -> Result<String, String> {
        self.template.render(m, gen).map_err(|e| e.to_string())
    }

    /// Labels the assistant turns chosen by `mask`.
    pub fn chat(&self, m: &[Message], mask: MaskMode) -> Result<Tokenized, String> {
        let last = m.iter().rposition(|x| x.role == "assistant").ok_or("no assistant turn")?;
        match mask {
            MaskMode::Assistant => self.chat_from(m, 0),
            MaskMode::Completion => self.chat_from(m, last),
            MaskMode::All => {
                let full = self.render(m, false)?;
                let (ids, _) = self.tokenizer.encode_with_offsets(&full).map_err(|e| e.to_string())?;
                let labels = ids.iter().map(|&t| t as i64).collect();
                Ok(Tokenized { input_ids: ids, labels })
            }
        }
    }

    /// Labels assistant turns at index ≥ `from`.
    fn chat_from(&self, m: &[Message], from: usize) -> Result<Tokenized, String> {
        let full = self.render(m, false)?;
        let mut spans = Vec::new();
        for (i, msg) in m.iter().enumerate().skip(from) {
            if msg.role != "assistant" {
                continue;
            }
            let before = self.render(&m[..i], true)?;
            let through = self.render(&m[..=i], false)?;
            if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len() {
                return Err(format!("the chat template does not render turn {i} as a prefix of the conversation; cannot locate the assistant's tokens"));
            }
            // Trailing whitespace after the end-of-turn token (ChatML's "\n") is template glue, not output.
            let end = before.len() + through[before.len()..].trim_end().len();
            spans.push((before.len(), end));
        }
        if spans.is_empty() {
            return Err("no assistant turn to learn from".into());
        }
        let (mut ids, offsets) = self.tokenizer.encode_with_offsets(&full).map_err(|e| e.to_string())?;
        let mut labels: Vec<i64> = ids
            .iter()
            .zip(&offsets)
            .map(|(&t, &(s, _))| if spans.iter().any(|&(a, b)| s >= a && s < b) { t as i64 } else { IGNORE_INDEX })
            .collect();
        // A template that does not close the last turn with an EOS / end-of-turn token gets one appended, so
        // that the model learns to stop.
        let last_trained = labels.iter().rposition(|&l| l != IGNORE_INDEX).map(|i| ids[i]);
        if !last_trained.is_some_and(|t| self.eos_ids.contains(&t)) {
            ids.push(self.eos_id);
            labels.push(self.eos_id as i64);
        }
        Ok(Tokenized { input_ids: ids, labels })
    }

    /// Raw prompt (context) + completion (learned) + EOS.
    pub fn raw(&self, prompt: &str, completion: &str) -> Result<Tokenized, String> {
        let enc = |t: &str| {
            if t.is_empty() {
                Ok(vec![])
            } else {
                self.tokenizer.encode_no_special(t).map_err(|e| e.to_string())
            }
        };
        let (p, c) = (enc(prompt)?, enc(completion)?);
        let train_prompt = self.mask == MaskMode::All;
        let mut ids = p.clone();
        let mut labels: Vec<i64> = p.iter().map(|&t| if train_prompt { t as i64 } else { IGNORE_INDEX }).collect();
        ids.extend(&c);
        labels.extend(c.iter().map(|&t| t as i64));
        ids.push(self.eos_id);
        labels.push(self.eos_id as i64);
        Ok(Tokenized { input_ids: ids, labels })
    }
}
