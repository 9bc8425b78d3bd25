//! Adapter combination against PEFT's `add_weighted_adapter` (`tests/fixtures/make_combine.py`): every
//! combined lora_A / lora_B tensor, and the logits of base + combined adapter.

use std::path::{Path, PathBuf};

use ferrotune_core::combine::{combine, Combination};
use ferrotune_core::load_model;
use ferrotune_core::lora::load_peft;
use ferrotune_core::weights::WeightFiles;
use tch::{Device, Kind};

use crate::common::{max_abs_diff, tiny_dir};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-lora/combine").join(name)
}

#[test]
fn combinations_equal_peft_add_weighted_adapter() {
    let reference = WeightFiles::open_files(&[dir("reference.safetensors")]).unwrap();
    let ids = reference.load_raw("input_ids").unwrap();
    let cases = [
        ("linear", vec![("a", 0.7), ("b", -0.4)], Combination::Linear, 4),
        ("cat", vec![("a", 0.7), ("b", -0.4)], Combination::Cat, 8),
        ("ties", vec![("a", 0.7), ("b", 0.6)], Combination::Ties(0.5), 4),
        ("cat_ac", vec![("a", 1.0), ("c", 0.5)], Combination::Cat, 6),
    ];
    let t = tempfile::tempdir().unwrap();
    for (case, inputs, how, rank) in cases {
        let out = t.path().join(case);
        let adapters: Vec<(PathBuf, f64)> = inputs.iter().map(|(n, w)| (dir(n), *w)).collect();
        assert_eq!(combine(&adapters, how, &out).unwrap(), rank, "{case}");
        let ours = WeightFiles::open_files(&[out.join("adapter_model.safetensors")]).unwrap();
        let want: Vec<&str> =
            reference.names().filter(|n| n.starts_with(&format!("{case}/")) && !n.ends_with("/logits")).collect();
        assert_eq!(ours.names().count(), want.len(), "{case}: tensor count");
        for name in want {
            let key = name.strip_prefix(&format!("{case}/")).unwrap();
            let d = max_abs_diff(&ours.load_raw(key).unwrap(), &reference.load_raw(name).unwrap());
            assert!(d < 1e-6, "{case} {key}: max |Δ| {d}");
        }
        // The combined adapter in use: same logits as PEFT's.
        let mut model = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
        let cfg = load_peft(&mut model, &out).unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha), (rank, rank as f64));
        let got = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
        let d = max_abs_diff(&got, &reference.load_raw(&format!("{case}/logits")).unwrap());
        assert!(d < 1e-5, "{case}: logits max |Δ| {d}");
    }
}

#[test]
fn bad_combinations_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let e =
        combine(&[(dir("a"), 1.0), (dir("c"), 1.0)], Combination::Linear, &t.path().join("x")).unwrap_err().to_string();
    assert!(e.contains("one rank") && e.contains("cat"), "{e}");
    let e = combine(&[(dir("a"), 1.0), (dir("b"), 1.0)], Combination::Ties(0.0), &t.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("density"), "{e}");
    let e = combine(&[(dir("a"), f64::NAN)], Combination::Linear, &t.path().join("x")).unwrap_err().to_string();
    assert!(e.contains("not finite"), "{e}");
    let e = combine(&[(dir("missing"), 1.0)], Combination::Cat, &t.path().join("x")).unwrap_err().to_string();
    assert!(e.contains("missing/adapter_config.json"), "{e}");
    assert!(combine(&[], Combination::Cat, &t.path().join("x")).is_err());
}
