//! Shared helpers: fixture paths, reference loading, tensor comparison.

use std::path::{Path, PathBuf};

use ferrotune_core::weights::WeightFiles;
use tch::{Kind, Tensor};

/// The tiny-model fixtures made by `tests/fixtures/make_tiny.py`.
pub(crate) const TINY: &[&str] =
    &["llama3-rope", "llama-linear-sharded", "mistral-window", "qwen2-bias", "qwen3-qknorm", "gemma3-window"];

pub(crate) fn tiny_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny").join(name)
}

/// (input_ids [2, T], logits [2, T, V]) computed by transformers.
pub(crate) fn reference(name: &str) -> (Tensor, Tensor) {
    let f = WeightFiles::open_files(&[tiny_dir(name).join("reference.safetensors")]).expect("reference file");
    (f.load_raw("input_ids").expect("input_ids"), f.load_raw("logits").expect("logits"))
}

pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Copies a fixture model into a fresh temporary directory (for tests that damage it).
pub(crate) fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(tiny_dir(name)).expect("fixture dir") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, tmp.path().join(p.file_name().expect("name"))).expect("copy");
    }
    tmp
}
