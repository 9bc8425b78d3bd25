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
    fails_with(&["tokenize", "--model", "/nonexistent/model", "--text", "hi"], &["error:", "/nonexistent/model/tokenizer.json"]);
    fails_with(&["import", "gguf", "/nonexistent/x.gguf", "--out", "/tmp/never"], &["error:", "/nonexistent/x.gguf"]);
    fails_with(&["eval", "perplexity", "--model", "/nonexistent/m", "--text-file", "/nonexistent/t.txt"], &["/nonexistent/t.txt"]);
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
    fails_with(&["import", "gguf", p.to_str().unwrap(), "--out", out.to_str().unwrap()], &["bad.gguf", "truncated GGUF"]);
}

#[test]
fn absurd_perplexity_options_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t.txt");
    std::fs::write(&t, "hello there").unwrap();
    let model = ferrotune_tests::fixture("tiny/llama3-rope");
    // The tiny fixture has no tokenizer: the error must say so, naming the file.
    fails_with(&["eval", "perplexity", "--model", model.to_str().unwrap(), "--text-file", t.to_str().unwrap()], &["tokenizer.json"]);
}
