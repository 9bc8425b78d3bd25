//! A model directory loaded for use: weights, tokenizer, chat template and declared special ids, read
//! together so that every command and service uses the same template the model shipped with.

use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use crate::chat::{ChatTemplate, Message};
use crate::error::{CoreError, Result};
use crate::generation::ModelDefaults;
use crate::models::{load_model_placed, CausalLm};
use crate::tokenizer::Tokenizer;

/// Everything needed to run a model directory.
pub struct ModelBundle {
    /// The directory it was loaded from.
    pub dir: PathBuf,
    /// The network.
    pub model: CausalLm,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template (or the ChatML fallback).
    pub template: ChatTemplate,
    /// Its EOS and pad ids.
    pub defaults: ModelDefaults,
}

impl ModelBundle {
    /// Loads `dir` with weights in `kind` on `device`.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Self::load_placed(dir, kind, device, None)
    }

    /// [`Self::load`] with the layers placed by a `device_map` ([`crate::models::device_map`]).
    pub fn load_placed(dir: &Path, kind: Kind, device: Device, device_map: Option<&serde_json::Value>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(CoreError::format(dir, "model directory not found"));
        }
        let tokenizer = Tokenizer::from_dir(dir)?;
        let template = ChatTemplate::from_dir(dir)?;
        let defaults = ModelDefaults::from_dir(dir, &tokenizer)?;
        let model = load_model_placed(dir, kind, device, device_map)?;
        Ok(Self { dir: dir.to_path_buf(), model, tokenizer, template, defaults })
    }

    /// The ids generation stops at: the model's EOS ids and its chat template's turn end (`<end_of_turn>`,
    /// `<|im_end|>`, …), which a model without a chat template of its own (Gemma 3 pre-trained, imported from a
    /// GGUF) does not list among them. Only for generation: the data and the reward scorer keep the declared
    /// EOS ids, so what is scored ends as what was trained.
    pub fn stop_ids(&self) -> Vec<u32> {
        crate::chat::stop_ids(&self.defaults.eos_ids, &[self.template.source()], &self.tokenizer)
    }

    /// Attaches a PEFT adapter (LoRA or prompt tuning). When the adapter was trained by ferrotune on an NF4 base (QLoRA,
    /// recorded in its `ferrotune_train.json`), the base is quantized the same way first, so inference sees
    /// the weights the adapter was trained against.
    pub fn attach_adapter(&mut self, adapter: &Path) -> Result<()> {
        if crate::lora::trained_on_nf4(adapter)? {
            self.model.quantize_nf4()?;
        }
        crate::prompt_tuning::load_adapter(&mut self.model, adapter)?;
        // An adapter trained with another chat template (the recipe's `chat_template`) is used with it.
        let jinja = adapter.join("chat_template.jinja");
        if crate::fsx::is_file(&jinja) {
            let source = crate::fsx::read_to_string(&jinja).map_err(|e| CoreError::io(&jinja, e))?;
            if source != self.template.source() {
                self.template = self.template.with_source(source, crate::chat::TemplateOrigin::Adapter)?;
            }
        }
        Ok(())
    }

    /// Prompt ids of a chat, rendered with the model's template and ending with the assistant's turn
    /// opener (as `apply_chat_template(messages, add_generation_prompt=True)`).
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        self.tokenizer.encode_no_special(&text)
    }
}

/// Reads a chat file: a JSON list of `{"role", "content"}` messages (or an object with a `messages` list).
pub fn read_chat_file(path: &Path) -> Result<Vec<Message>> {
    let text = crate::fsx::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum ChatFile {
        List(Vec<Message>),
        Object { messages: Vec<Message> },
    }
    let parsed: ChatFile = serde_json::from_str(&text)
        .or_else(|_| {
            // Re-parse as a plain list to report the precise error (line, column, field).
            serde_json::from_str::<Vec<Message>>(&text).map(ChatFile::List)
        })
        .map_err(|e| {
            CoreError::format(
                path,
                format!("invalid chat file (expected a list of {{\"role\", \"content\"}} messages): {e}"),
            )
        })?;
    let messages = match parsed {
        ChatFile::List(m) | ChatFile::Object { messages: m } => m,
    };
    if messages.is_empty() {
        return Err(CoreError::format(path, "chat file has no messages"));
    }
    Ok(messages)
}
