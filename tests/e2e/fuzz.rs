//! A bounded mutation fuzzer over the parsers that take untrusted bytes: JSONL / JSON / CSV / Parquet records,
//! GGUF (open and import), safetensors headers and tensors, PEFT adapters, recipes and chat templates. Each
//! target starts from its committed corpus (`tests/fuzz/corpus/<target>/`) and runs a fixed number of
//! deterministic mutations (`FERROTUNE_FUZZ_ITERS`, default 1000 per target; `FERROTUNE_FUZZ_SEED` picks
//! another sequence). An input passes when the parser returns, Ok or Err, within the time limit; a panic
//! or a hang fails the test and leaves the input under `target/fuzz-failures/` to reproduce.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use ferrotune_core::Message;
use ferrotune_tests::fixture;

/// Per-input time limit: a parser that takes longer is treated as hung.
const LIMIT: Duration = Duration::from_secs(20);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Integers that sit on the edges parsers get wrong (counts, lengths, dimensions, offsets).
const INTERESTING: [u64; 10] = [0, 1, 0x7f, 0xff, 0x7fff_ffff, 0xffff_ffff, 1 << 32, 1 << 40, u64::MAX / 2, u64::MAX];

/// One to four random edits of `input`.
fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                b[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'\n', b','][rng.below(8)];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = (1 + rng.below(32)).min(len - i);
                b.drain(i..i + n);
            }
            4 if len > 8 => {
                // An interesting little-endian integer over 8 bytes (4 for u32 fields).
                let i = rng.below(len - 8);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                b[i..i + w].copy_from_slice(&v[..w]);
            }
            5 if len > 0 => b.truncate(rng.below(len)),
            6 if len > 1 => {
                // Duplicate a slice elsewhere (repeated records, keys, tensors).
                let i = rng.below(len);
                let n = (1 + rng.below(64)).min(len - i);
                let chunk = b[i..i + n].to_vec();
                let at = rng.below(len + 1);
                b.splice(at..at, chunk);
            }
            _ => {
                // An ASCII digit run made huge: lengths and dimensions in text formats.
                let i = rng.below(len + 1);
                b.splice(i..i, b"99999999999999999999".iter().copied());
            }
        }
    }
    b
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty corpus for {target}");
    v
}

fn iterations() -> usize {
    std::env::var("FERROTUNE_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000)
}

/// Runs `parse` on the corpus and `iterations()` mutations of it; `parse` gets the input written to a file
/// with the seed's name (extension included) in a fresh directory.
fn fuzz(target: &str, parse: impl Fn(&Path) + Send + Sync + 'static) {
    let seed: u64 = std::env::var("FERROTUNE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let mut rng = Rng(seed ^ target.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64)));
    let seeds = corpus(target);
    let parse = std::sync::Arc::new(parse);
    let n = iterations();
    for i in 0..=n {
        let (name, base) = &seeds[i % seeds.len()];
        let input = if i < seeds.len() { base.clone() } else { mutate(base, &mut rng) };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, &input).unwrap();
        let (tx, rx) = mpsc::channel();
        let (p, at) = (parse.clone(), path.clone());
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p(&at)));
            let _ = tx.send(r.map_err(|e| ferrotune_runtime::worker::panic_message(e.as_ref())));
        });
        let failure = match rx.recv_timeout(LIMIT) {
            Ok(Ok(())) => continue,
            Ok(Err(msg)) => format!("panicked: {msg}"),
            Err(_) => format!("took more than {LIMIT:?}"),
        };
        let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures").join(target);
        std::fs::create_dir_all(&keep).unwrap();
        let saved = keep.join(format!("{i}-{name}"));
        std::fs::write(&saved, &input).unwrap();
        panic!("fuzz {target}: input {i} (mutation of {name}, seed {seed}) {failure}; saved as {}", saved.display());
    }
}

#[test]
fn fuzz_records() {
    for target in ["jsonl", "json", "csv", "parquet"] {
        fuzz(target, |p| {
            let _ = ferrotune_core::data::read::read_records(p, 1 << 20);
        });
    }
}

#[test]
fn fuzz_gguf() {
    fuzz("gguf", |p| {
        if ferrotune_core::gguf::GgufFile::open(p).is_ok() {
            let out = p.parent().unwrap().join("imported");
            if ferrotune_core::gguf_import::import_gguf(p, &out).is_ok() {
                let _ = ferrotune_core::load_model(&out, tch::Kind::Float, tch::Device::Cpu);
                let _ = ferrotune_core::Tokenizer::from_dir(&out).and_then(|t| t.encode("ab ba"));
            }
        }
    });
}

#[test]
fn fuzz_safetensors() {
    fuzz("safetensors", |p| {
        if let Ok(files) = ferrotune_core::weights::WeightFiles::open_files(&[p.to_path_buf()]) {
            let names: Vec<String> = files.names().map(str::to_owned).collect();
            for n in names {
                let _ = files.load_raw(&n);
            }
        }
    });
}

/// PEFT adapters loaded onto the tiny llama fixture: the corpus holds the fixture's `adapter_config.json` and
/// `adapter_model.safetensors`; whichever one is fuzzed is paired with the fixture's other file.
#[test]
fn fuzz_peft_adapters() {
    let lora = fixture("tiny-lora/llama3-all-linear");
    let model_dir = fixture("tiny/llama3-rope");
    fuzz("peft", move |p| {
        let dir = p.parent().unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            if !dir.join(f).exists() {
                std::fs::copy(lora.join(f), dir.join(f)).unwrap();
            }
        }
        let mut m = ferrotune_core::load_model(&model_dir, tch::Kind::Float, tch::Device::Cpu).unwrap();
        let _ = ferrotune_core::lora::load_peft(&mut m, dir);
    });
}

#[test]
fn fuzz_recipes() {
    fuzz("recipe", |p| {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
        let _ = ferrotune_training::recipe::parse(&text, p, &[]);
        let _ = ferrotune_training::recipe::parse(&text, p, &["training.max_steps=3".into(), "adapter.r=4".into()]);
    });
}

#[test]
fn fuzz_chat_templates() {
    let chat = vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Hi?"),
        Message::new("assistant", "Ahoy!"),
        Message::new("user", "And?"),
    ];
    fuzz("template", move |p| {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
        if let Ok(t) = ferrotune_core::ChatTemplate::from_source(&text, Some("<s>"), Some("</s>")) {
            let _ = t.render(&chat, true);
            let _ = t.render(&chat[..1], false);
        }
    });
}
