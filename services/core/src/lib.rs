//! ferrotune's model core: HF-compatible decoder-only language models on libtorch (`tch`), weights from
//! safetensors (single or sharded, memory-mapped) and from llama.cpp GGUF files, HF tokenizers, and
//! chat templates, generation and perplexity evaluation. Services and the CLI build on this crate; it knows nothing of gRPC.

mod alloc;
pub mod bundle;
pub mod chat;
pub mod combine;
pub mod data;
pub mod dist;
pub mod dora;
pub mod error;
pub mod fsx;
pub mod generation;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_import;
pub mod gguf_quantize;
pub mod gguf_quants;
pub mod gguf_rope;
pub mod gguf_spm;
pub mod grad_sync;
pub mod kernels;
pub mod logprobs;
pub mod lora;
pub mod merge;
pub mod models;
pub mod nccl;
pub mod nf4;
pub mod perplexity;
pub mod prefix_tuning;
pub mod prompt_tuning;
pub mod registry;
pub mod sampling;
pub mod threads;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use bundle::ModelBundle;
pub use chat::{ChatTemplate, Message};
pub use error::{CoreError, ErrorKind, Kinded, Result};
pub use generation::{generate, GenerateOptions, Generated, ModelDefaults};
pub use models::{load_model, parse_device, parse_dtype, CausalLm, DecoderConfig};
pub use perplexity::{perplexity, Perplexity, PerplexityOptions};
pub use sampling::SamplingParams;
pub use tokenizer::Tokenizer;
