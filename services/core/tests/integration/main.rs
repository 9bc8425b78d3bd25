//! Integration tests of the model core (one binary, to keep link time down): tiny random models of each
//! family against logits computed by HF transformers, padding invariance, GGUF import round trips, and
//! clear errors on bad files.

mod bad_inputs;
mod combine;
mod common;
mod device_map;
mod dora;
mod dpo;
mod gguf_export;
mod gguf_quants;
mod gguf_roundtrip;
mod kv_cache;
mod lora;
mod new_families;
mod nf4;
mod optim8;
mod ppo;
mod preference;
mod prefix;
mod reward;
mod rollout;
mod session;
mod tiny_models;
mod tinyllama;
mod train;
