//! Bad input on the command line: a non-zero exit and one line on stderr that says where and what.

use ferrotune_tests::run_cli;

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = run_cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ferrotune {args:?} should fail");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error expected, got: {err}");
    for n in needles {
        assert!(err.contains(n), "ferrotune {args:?}: `{n}` not in: {err}");
    }
}

#[test]
fn unknown_paths_are_named() {
    fails_with(
        &["tokenize", "--model", "/nonexistent/model", "--text", "hi"],
        &["error:", "/nonexistent/model/tokenizer.json"],
    );
    fails_with(&["import", "gguf", "/nonexistent/x.gguf", "--out", "/tmp/never"], &["error:", "/nonexistent/x.gguf"]);
    fails_with(
        &["eval", "perplexity", "--model", "/nonexistent/m", "--text-file", "/nonexistent/t.txt"],
        &["/nonexistent/t.txt"],
    );
}

#[test]
fn unknown_model_name_lists_known_ones() {
    fails_with(&["models", "pull", "gpt-5"], &["unknown model `gpt-5`", "smollm2-135m-instruct"]);
}

#[test]
fn corrupt_gguf_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00").unwrap();
    let out = tmp.path().join("out");
    fails_with(
        &["import", "gguf", p.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &["bad.gguf", "truncated GGUF"],
    );
}

#[test]
fn absurd_perplexity_options_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t.txt");
    std::fs::write(&t, "hello there").unwrap();
    let model = ferrotune_tests::fixture("tiny/llama3-rope");
    // The tiny fixture has no tokenizer: the error must say so, naming the file.
    fails_with(
        &["eval", "perplexity", "--model", model.to_str().unwrap(), "--text-file", t.to_str().unwrap()],
        &["tokenizer.json"],
    );
}

#[test]
fn bad_ppo_recipes_and_prompt_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = ferrotune_tests::repo("recipes/ppo.yaml");
    let r = recipe.to_str().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    fails_with(
        &["align", "ppo", "--recipe", r, "--output-dir", o, "--set", "ppo.reward.rule=null"],
        &["ppo.reward: set either `rule` or both `model` and `adapter`"],
    );
    fails_with(
        &["align", "ppo", "--recipe", r, "--output-dir", o, "--set", "ppo.cliprange=2"],
        &["ppo.cliprange must be in (0, 1)"],
    );
    fails_with(
        &["align", "ppo", "--recipe", r, "--output-dir", o, "--set", "ppo.kl_estimator=k9"],
        &["ppo.yaml", "unknown variant `k9`, expected `k1` or `k3`"],
    );
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"What is the capital of Peru?\"}\n{\"question\": \"no prompt here\"}\n")
        .unwrap();
    let data = format!("data.path={}", prompts.display());
    ferrotune_tests::smollm2_dir();
    fails_with(
        &["align", "ppo", "--recipe", r, "--output-dir", o, "--set", &data, "--set", "data.eval_path=null", "--json"],
        &["prompts.jsonl:2: missing field `prompt` (or `messages`)"],
    );
}

#[test]
fn smollm2_empty_and_non_utf8_data_files_are_named() {
    let m = ferrotune_tests::smollm2_dir();
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = empty.to_str().unwrap();
    fails_with(&["data", "preview", "--input", e, "--format", "messages", "--model", m], &["no records to preview"]);
    let bad = tmp.path().join("latin1.jsonl");
    std::fs::write(&bad, b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    let b = bad.to_str().unwrap();
    let out = tmp.path().join("ds");
    let o = out.to_str().unwrap();
    fails_with(
        &["data", "format", "--input", b, "--format", "text", "--model", m, "--out", o],
        &["latin1.jsonl", "line 2: not UTF-8 text"],
    );
}
