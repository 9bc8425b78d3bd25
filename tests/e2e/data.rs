//! Dataset formatting with SmolLM2's tokenizer and chat template on hand-written records: exactly the
//! assistant turns (with their end-of-turn token) are trained, formats and masks, truncation, splits, and
//! bad records reported by file and line.

use std::path::Path;

use ferrotune_core::data::formats::{parse, Columns, Format, MaskMode};
use ferrotune_core::data::tokenize::{Renderer, Tokenized, TokenizedSample};
use ferrotune_core::data::{build, load_split, BuildOptions};
use ferrotune_core::generation::ModelDefaults;
use ferrotune_core::{ChatTemplate, Message, Tokenizer};
use ferrotune_tests::{run_cli, smollm2_dir};
use serde_json::json;

struct Kit {
    tok: Tokenizer,
    tmpl: ChatTemplate,
    eos: Vec<u32>,
}

fn kit() -> Kit {
    let d = smollm2_dir();
    let tok = Tokenizer::from_dir(&d).unwrap();
    let eos = ModelDefaults::from_dir(&d, &tok).unwrap().eos_ids;
    Kit { tmpl: ChatTemplate::from_dir(&d).unwrap(), tok, eos }
}

fn render(k: &Kit, mask: MaskMode, format: Format, v: serde_json::Value) -> TokenizedSample {
    let r = Renderer { tokenizer: &k.tok, template: &k.tmpl, eos_id: k.eos[0], eos_ids: &k.eos, mask };
    r.sample(&parse(format, &v, &Columns::new()).unwrap()).unwrap()
}

fn single(t: TokenizedSample) -> Tokenized {
    match t {
        TokenizedSample::Single(s) => s,
        _ => panic!("expected one sequence"),
    }
}

/// The trained tokens decoded, each maximal run of trained positions separately.
fn trained_runs(k: &Kit, t: &Tokenized) -> Vec<String> {
    let mut runs = vec![];
    let mut cur = vec![];
    for (&id, &l) in t.input_ids.iter().zip(&t.labels) {
        if l >= 0 {
            assert_eq!(l, id as i64, "a trained label is its own token");
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(k.tok.decode(&cur, false).unwrap());
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(k.tok.decode(&cur, false).unwrap());
    }
    runs
}

#[test]
fn smollm2_data_multi_turn_trains_each_assistant_turn_with_its_end_of_turn() {
    let k = kit();
    let v = json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]});
    let t = single(render(&k, MaskMode::Assistant, Format::Messages, v.clone()));
    assert_eq!(trained_runs(&k, &t), vec!["4<|im_end|>", "Six.<|im_end|>"]);
    // the ids are exactly the template's rendering
    let text = k.tmpl.render(&serde_json::from_value::<Vec<Message>>(v["messages"].clone()).unwrap(), false).unwrap();
    assert_eq!(t.input_ids, k.tok.encode_no_special(&text).unwrap());
    let t = single(render(&k, MaskMode::Completion, Format::Messages, v.clone()));
    assert_eq!(trained_runs(&k, &t), vec!["Six.<|im_end|>"]);
    let t = single(render(&k, MaskMode::All, Format::Messages, v));
    assert_eq!(t.trained(), t.input_ids.len() - 1);
}

#[test]
fn smollm2_data_formats_map_to_the_same_conversation() {
    let k = kit();
    let a = single(render(
        &k,
        MaskMode::Assistant,
        Format::Alpaca,
        json!({"instruction": "Say hi", "input": "politely", "output": "Hello!"}),
    ));
    let m = single(render(
        &k,
        MaskMode::Assistant,
        Format::Messages,
        json!({"messages": [{"role": "user", "content": "Say hi\n\npolitely"}, {"role": "assistant", "content": "Hello!"}]}),
    ));
    let s = single(render(
        &k,
        MaskMode::Assistant,
        Format::Sharegpt,
        json!({"conversations": [{"from": "human", "value": "Say hi\n\npolitely"}, {"from": "gpt", "value": "Hello!"}]}),
    ));
    assert_eq!(a, m);
    assert_eq!(s, m);
    assert_eq!(trained_runs(&k, &a), vec!["Hello!<|im_end|>"]);
    // raw text: everything trained, EOS appended
    let t = single(render(&k, MaskMode::Assistant, Format::Text, json!({"text": "Plain words."})));
    assert_eq!(trained_runs(&k, &t), vec!["Plain words.<|im_end|>"]);
    assert_eq!(*t.input_ids.last().unwrap(), k.eos[0]);
    // raw prompt/completion: prompt masked, completion + EOS trained
    let t = single(render(
        &k,
        MaskMode::Assistant,
        Format::PromptCompletion,
        json!({"prompt": "Q: 2+2\nA:", "completion": " 4"}),
    ));
    assert_eq!(trained_runs(&k, &t), vec![" 4<|im_end|>"]);
    assert_eq!(t.labels[0], -100);
}

#[test]
fn smollm2_data_preference_labels_only_the_responses() {
    let k = kit();
    match render(
        &k,
        MaskMode::Assistant,
        Format::Preference,
        json!({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}),
    ) {
        TokenizedSample::Pair { chosen, rejected } => {
            assert_eq!(trained_runs(&k, &chosen), vec!["Paris.<|im_end|>"]);
            assert_eq!(trained_runs(&k, &rejected), vec!["Rome.<|im_end|>"]);
            let p = chosen.labels.iter().position(|&l| l >= 0).unwrap();
            assert_eq!(chosen.input_ids[..p], rejected.input_ids[..p], "shared prompt");
        }
        _ => panic!("expected a pair"),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(inputs: Vec<std::path::PathBuf>, format: Format) -> BuildOptions {
    BuildOptions {
        chat_template: None,
        inputs,
        format,
        columns: Columns::new(),
        model: smollm2_dir(),
        mask: MaskMode::Assistant,
        max_seq_len: 512,
        eval_fraction: 0.0,
        seed: 1,
        strict: false,
        pack: false,
        max_text_bytes: ferrotune_core::data::read::DEFAULT_MAX_TEXT_BYTES,
    }
}

#[test]
fn smollm2_data_build_reports_bad_records_and_truncates() {
    let t = tempfile::tempdir().unwrap();
    let good = |i: usize| {
        format!(
            "{{\"instruction\": \"Count to {i}\", \"output\": \"{}\"}}",
            (1..=i).map(|x| x.to_string()).collect::<Vec<_>>().join(" ")
        )
    };
    let mut lines: Vec<String> = (1..=10).map(good).collect();
    lines.insert(3, "{\"instruction\": \"no output\"}".into()); // line 4
    lines.insert(6, "{not json".into()); // line 7
    lines.push(String::new()); // blank line skipped
    let input = write(t.path(), "a.jsonl", &lines.join("\n"));
    let out = t.path().join("ds");
    let mut o = opts(vec![input.clone()], Format::Alpaca);
    o.eval_fraction = 0.2;
    let s = build(&o, &out).unwrap();
    assert_eq!((s.records, s.train, s.eval), (12, 8, 2));
    assert_eq!(s.dropped.values().sum::<usize>(), 2);
    assert!(s.errors[0].ends_with("a.jsonl:4: missing field `output`"), "{:?}", s.errors);
    assert!(s.errors[1].contains("a.jsonl:7: invalid JSON"), "{:?}", s.errors);
    let train = load_split(&out, "train").unwrap();
    let eval = load_split(&out, "eval").unwrap();
    assert_eq!((train.len(), eval.len()), (8, 2));
    assert_eq!(s.trained_tokens, train.iter().chain(&eval).map(|e| e.trained_tokens()).sum::<usize>());
    for f in ["stats.json", "dataset_info.json", "chat_template.jinja"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // Same seed → same split; strict mode stops at the first bad record with its location.
    let again = build(&o, &t.path().join("ds2")).unwrap();
    assert_eq!(
        std::fs::read(out.join("train.jsonl")).unwrap(),
        std::fs::read(t.path().join("ds2/train.jsonl")).unwrap()
    );
    assert_eq!(again, s);
    o.strict = true;
    let e = build(&o, &t.path().join("ds3")).unwrap_err().to_string();
    assert!(e.ends_with("a.jsonl:4: missing field `output`"), "{e}");
    // Truncation: short limit cuts long samples; a limit inside the prompt drops them.
    o.strict = false;
    o.eval_fraction = 0.0;
    o.max_seq_len = 40;
    let s = build(&o, &t.path().join("ds4")).unwrap();
    assert!(
        s.truncated > 0 && load_split(&t.path().join("ds4"), "train").unwrap().iter().all(|e| e.input_ids.len() <= 40)
    );
    o.max_seq_len = 8;
    let e = build(&o, &t.path().join("ds5")).unwrap_err().to_string();
    assert!(e.contains("no trained tokens after truncation to 8 tokens"), "{e}");
}

#[test]
fn smollm2_data_reads_csv_and_json_arrays() {
    let t = tempfile::tempdir().unwrap();
    let csv = write(t.path(), "d.csv", "question,answer\nWhat is 1+1?,2\n\"Say \"\"hi\"\"\",hi\n");
    let mut o = opts(vec![csv], Format::Alpaca);
    o.columns = Columns::from([("instruction".into(), "question".into()), ("output".into(), "answer".into())]);
    assert_eq!(build(&o, &t.path().join("c")).unwrap().train, 2);
    let json = write(t.path(), "d.json", r#"[{"text": "one"}, {"text": 2}]"#);
    let s = build(&opts(vec![json], Format::Text), &t.path().join("j")).unwrap();
    assert_eq!((s.train, s.errors.len()), (1, 1));
    assert!(s.errors[0].ends_with("d.json:2: field `text` must be a string, got a number"), "{:?}", s.errors);
}

#[test]
fn smollm2_cli_data_format_and_preview() {
    let t = tempfile::tempdir().unwrap();
    let input = write(t.path(), "chat.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n");
    let m = smollm2_dir();
    let out = t.path().join("ds");
    let o = run_cli(&[
        "data",
        "format",
        "--input",
        input.to_str().unwrap(),
        "--format",
        "messages",
        "--model",
        m.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["train"], 1);
    let o = run_cli(&[
        "data",
        "preview",
        "--input",
        input.to_str().unwrap(),
        "--format",
        "messages",
        "--model",
        m.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("[[Hello!<|im_end|>]]"), "{text}");
    let bad = write(t.path(), "bad.jsonl", "{\"messages\": 3}\n");
    let o = run_cli(&[
        "data",
        "format",
        "--input",
        bad.to_str().unwrap(),
        "--format",
        "messages",
        "--model",
        m.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--strict",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bad.jsonl:1:"), "{err}");
}

#[test]
fn smollm2_data_packing_keeps_every_trained_token() {
    let t = tempfile::tempdir().unwrap();
    let lines: Vec<String> =
        (1..=12).map(|i| format!("{{\"instruction\": \"Say {i}\", \"output\": \"{i}\"}}")).collect();
    let input = write(t.path(), "p.jsonl", &lines.join("\n"));
    let plain = build(&opts(vec![input.clone()], Format::Alpaca), &t.path().join("plain")).unwrap();
    let mut o = opts(vec![input], Format::Alpaca);
    o.pack = true;
    o.max_seq_len = 128;
    let packed = build(&o, &t.path().join("packed")).unwrap();
    let rows = load_split(&t.path().join("packed"), "train").unwrap();
    assert_eq!(packed.packed_rows, rows.len());
    assert!(
        rows.len() < 12 && rows.iter().all(|r| r.input_ids.len() <= 128 && r.segment_ids.len() == r.input_ids.len())
    );
    let samples: usize = rows.iter().map(|r| *r.segment_ids.last().unwrap() as usize).sum();
    assert_eq!(samples, 12);
    // every trained token survives except none: the first token of a sample is never trained anyway
    assert_eq!(rows.iter().map(|r| r.trained_tokens()).sum::<usize>(), plain.trained_tokens);
}

#[test]
fn smollm2_data_reads_parquet() {
    // tests/fixtures/data/*.parquet were written by pyarrow (snappy and gzip; nested list<struct> columns).
    let t = tempfile::tempdir().unwrap();
    let fx = |n: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data").join(n);
    let s = build(&opts(vec![fx("chat.parquet")], Format::Messages), &t.path().join("m")).unwrap();
    assert_eq!((s.records, s.train), (3, 2));
    assert!(s.errors[0].ends_with("chat.parquet:3: `messages` has no assistant turn to learn from"), "{:?}", s.errors);
    let s = build(&opts(vec![fx("alpaca.parquet")], Format::Alpaca), &t.path().join("a")).unwrap();
    assert_eq!(s.train, 2);
    let bad = write(t.path(), "bad.parquet", "PAR1 not really");
    let e = build(&opts(vec![bad], Format::Alpaca), &t.path().join("b")).unwrap_err().to_string();
    assert!(e.contains("bad.parquet") && e.contains("invalid Parquet file"), "{e}");
}
