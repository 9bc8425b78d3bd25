//! The rollout engine for groups (`generate_groups`) on the tiny chat model: sharing each prompt's prefill
//! among its samples and dropping finished rows from the batch change nothing in what is generated — each
//! sample equals its row of plain batched generation of the prompts repeated without EOS (same sampling
//! stream, nothing shared or compacted) cut after its first EOS, and greedy samples equal each prompt
//! generated alone.

use std::path::Path;

use ferrotune_core::generation::{generate_groups, generate_until, FinishReason};
use ferrotune_core::{GenerateOptions, ModelBundle, SamplingParams};
use tch::{Device, Kind};

#[test]
fn groups_equal_repeated_prompts_with_rows_leaving_early() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-chat");
    let b = ModelBundle::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> =
        ["Ahoy there", "The sea is wide and deep", "Arr"].iter().map(|t| b.tokenizer.encode(t).unwrap()).collect();
    let n = 4;
    let mut sampled = GenerateOptions {
        max_new_tokens: 24,
        sampling: SamplingParams { greedy: false, temperature: 1.3, top_k: None, top_p: None, repetition_penalty: 1.0 },
        seed: 9,
        eos_ids: vec![],
        stop_strings: vec![],
        pad_id: b.defaults.pad_id,
    };
    // The most frequent sampled token as EOS, so that rows finish at different steps and the batch is
    // compacted.
    let free = generate_groups(&b.model, &b.tokenizer, &prompts, n, &sampled, &mut |_| {}, &|| false).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for id in free.iter().flat_map(|x| x.ids.iter().skip(1)) {
        *counts.entry(*id).or_insert(0) += 1;
    }
    let frequent = counts.iter().max_by_key(|(_, &c)| c).map(|(&id, _)| id).unwrap();
    sampled.eos_ids = vec![frequent];
    let g = generate_groups(&b.model, &b.tokenizer, &prompts, n, &sampled, &mut |_| {}, &|| false).unwrap();
    // The reference: the prompts repeated, without EOS — no row ends early, so nothing is compacted and no
    // cache is shared; each row's sampling stream is the same, so a row of the engine is its reference row
    // cut after its first EOS.
    let repeated: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), n)).collect();
    let plain = GenerateOptions { eos_ids: vec![], ..sampled.clone() };
    let want = generate_until(&b.model, &b.tokenizer, &repeated, &plain, &mut |_| {}, &|| false).unwrap();
    assert_eq!(g.len(), prompts.len() * n);
    let lengths: Vec<usize> = g.iter().map(|x| x.ids.len()).collect();
    assert!(lengths.iter().any(|&l| l < 24) && lengths.iter().any(|&l| l > lengths[0].min(3)), "{lengths:?}");
    assert!(g.iter().filter(|x| x.finish_reason == FinishReason::Eos).count() >= 2, "{lengths:?}");
    for (i, (a, w)) in g.iter().zip(&want).enumerate() {
        let cut = w.ids.iter().position(|&t| t == frequent).map_or(w.ids.len(), |p| p + 1);
        assert_eq!(a.ids, w.ids[..cut], "row {i}");
        let eos = cut < w.ids.len() || w.ids.last() == Some(&frequent);
        assert_eq!(a.finish_reason == FinishReason::Eos, eos, "row {i}");
        assert_eq!(a.prompt_tokens, prompts[i / n].len());
        for (x, y) in a.logprobs.iter().zip(&w.logprobs) {
            assert!((x - y).abs() < 1e-4, "row {i}: {x} vs {y}");
        }
    }
    // Greedy: every sample of a prompt is that prompt's generation alone.
    let greedy = GenerateOptions { sampling: SamplingParams::default(), ..sampled.clone() };
    let g = generate_groups(&b.model, &b.tokenizer, &prompts, 2, &greedy, &mut |_| {}, &|| false).unwrap();
    for (p, prompt) in prompts.iter().enumerate() {
        let alone =
            generate_until(&b.model, &b.tokenizer, std::slice::from_ref(prompt), &greedy, &mut |_| {}, &|| false)
                .unwrap();
        assert_eq!(g[2 * p].ids, alone[0].ids);
        assert_eq!(g[2 * p + 1].ids, alone[0].ids);
    }
    assert!(generate_groups(&b.model, &b.tokenizer, &prompts, 0, &greedy, &mut |_| {}, &|| false).is_err());
}
