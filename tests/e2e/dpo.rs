//! DPO on SmolLM2 through the CLI (`align dpo`, embedded policy service): on held-out preference pairs the
//! policy goes from preferring the rejected (plain) answer to preferring the chosen (pirate) one.

use ferrotune_tests::{repo, run_cli, smollm2_dir};

use crate::preference::{held_out_pairs, preference};

#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_dpo_prefers_the_chosen_answers_on_held_out_pairs() {
    let model = smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let pairs = held_out_pairs(&model, &t.path().join("held"));
    assert_eq!(pairs.len(), 8);
    let (acc0, m0) = preference(&model, None, &pairs);
    let out = t.path().join("dpo");
    let data = format!("data.path={}", repo("recipes/data/pirate-prefs-train.jsonl").display());
    let o = run_cli(&[
        "align",
        "dpo",
        "--recipe",
        repo("recipes/dpo.yaml").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        &data,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last_step: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v.get("loss").is_some() && v.get("done").is_none())
        .unwrap();
    let (acc1, m1) = preference(&model, Some(&out), &pairs);
    println!("held-out preference accuracy (log π(chosen) > log π(rejected)): base {:.0}% (mean margin {m0:.2} nats) → DPO {:.0}% ({m1:.2}); last step {}", acc0 * 100.0, acc1 * 100.0, last_step["metrics"]);
    assert!(acc0 <= 0.25, "the base should prefer the plain answers: {acc0}");
    assert!(acc1 >= 0.875, "after DPO: {acc1}");
    assert!(last_step["metrics"]["rewards/accuracies"].as_f64().unwrap() > 0.9);
    // The reference log-probs were cached with the dataset, keyed by the base.
    let cache: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("dataset/reference_logps.json")).unwrap()).unwrap();
    assert_eq!(cache["train"].as_array().unwrap().len(), 32);
    // Bad DPO settings are one-line errors naming the key.
    let o = run_cli(&[
        "align",
        "dpo",
        "--recipe",
        repo("recipes/dpo.yaml").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        "dpo.beta=-1",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("dpo.beta must be positive") && e.trim_end().lines().count() == 1, "{e}");
    let o = run_cli(&[
        "align",
        "dpo",
        "--recipe",
        repo("recipes/dpo.yaml").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        "dpo.loss_type=kto",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown variant `kto`"));
}
