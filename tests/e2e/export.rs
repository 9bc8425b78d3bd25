//! `ferrotune export gguf` through the CLI (embedded MergeService): the tiny chat model with a LoRA adapter
//! trained here goes out as q4_k_m GGUF, imports back, and generates; bad requests are one line naming the field.

use ferrotune_tests::{repo, run_cli, tiny_chat_dir};

#[test]
fn export_gguf_writes_a_file_the_importer_reads_back() {
    let t = tempfile::tempdir().unwrap();
    let adapter = t.path().join("lora");
    let o = run_cli(&[
        "train",
        "sft",
        "--recipe",
        repo("recipes/lora-sft.yaml").to_str().unwrap(),
        "--output-dir",
        adapter.to_str().unwrap(),
        "--set",
        &format!("model={}", tiny_chat_dir().display()),
        "--set",
        &format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display()),
        "--max-steps",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = t.path().join("tiny.gguf");
    let model = tiny_chat_dir();
    let o = run_cli(&[
        "export",
        "gguf",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
        "--type",
        "q4_k_m",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert!(v["bytes"].as_u64().unwrap() > 10_000);
    let back = t.path().join("back");
    let o = run_cli(&["import", "gguf", file.to_str().unwrap(), "--out", back.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o =
        run_cli(&["generate", "--model", back.to_str().unwrap(), "--chat", "--prompt", "Hi", "--max-new-tokens", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = t.path().to_str().unwrap();
    let (m, f) = (model.to_str().unwrap(), file.to_str().unwrap());
    for (args, needle) in [
        (["export", "gguf", "--model", m, "--out", f, "--type", "q4_z"], "q4_z"),
        (["export", "gguf", "--model", m, "--out", dir, "--type", "f16"], "is a directory"),
    ] {
        let o = run_cli(&args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.trim_end().lines().count() == 1 && e.contains(needle), "{e}");
    }
}
