//! bitsandbytes' 8-bit AdamW: three steps equal `bnb.optim.AdamW8bit` (bitsandbytes 0.50.2, CPU) on fixed
//! gradients (`tests/fixtures/make_bnb8.py`): the quantization maps bit for bit, every state code and block
//! absmax exactly, the parameters to an ulp — through the optimizer the trainer uses for the 2-D tensor
//! (`optim: adamw_8bit`), and the 32-bit path bitsandbytes keeps for small tensors.

use std::collections::HashMap;
use std::path::Path;

use ferrotune_core::train::optim::{AdamW, AdamWConfig};
use ferrotune_core::train::optim8::{dynamic_map, maps, step32, step8, State8, Step};
use tch::{Kind, Tensor};

fn fixture() -> HashMap<String, Tensor> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bnb8/adamw8bit.safetensors");
    Tensor::read_safetensors(p).unwrap().into_iter().collect()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::try_from(t.reshape([-1]).to_kind(Kind::Float)).unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    Vec::try_from(t.reshape([-1]).to_kind(Kind::Uint8)).unwrap()
}

fn params_close(ours: &[f32], bnb: &[f32], what: &str) {
    for (i, (a, b)) in ours.iter().zip(bnb).enumerate() {
        assert!((a - b).abs() <= 2.5e-7 * b.abs().max(1.0), "{what}[{i}]: ours {a} vs bitsandbytes {b}");
    }
}

const S: Step = Step { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, t: 0 };

#[test]
fn eight_bit_adamw_equals_bitsandbytes() {
    let f = fixture();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&dynamic_map(true)), bits(&f32s(&f["qmap1"])), "signed map");
    assert_eq!(bits(&dynamic_map(false)), bits(&f32s(&f["qmap2"])), "unsigned map");
    assert_eq!(bits(&maps().0.code), bits(&f32s(&f["qmap1"])));

    // The 2-D tensor through the trainer's optimizer (5,120 elements: 8-bit moments, decayed).
    let w = f["w.init"].copy().set_requires_grad(true);
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, eight_bit: true };
    let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], cfg).unwrap();
    for k in 1..=3 {
        opt.zero_grad().unwrap();
        (&w * &f[&format!("w.grad.step{k}")]).sum(Kind::Float).backward();
        opt.step(1e-2).unwrap();
        params_close(&f32s(&w.detach()), &f32s(&f[&format!("min0.w.param.step{k}")]), &format!("w step {k}"));
        let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        for key in ["state1", "state2"] {
            let (ours, want) = (u8s(&state[&format!("w.{key}")]), u8s(&f[&format!("min0.w.{key}.step{k}")]));
            let differ = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "w {key} step {k}: {differ} codes differ");
        }
        for key in ["absmax1", "absmax2"] {
            assert_eq!(
                bits(&f32s(&state[&format!("w.{key}")])),
                bits(&f32s(&f[&format!("min0.w.{key}.step{k}")])),
                "w {key} step {k}"
            );
        }
    }
    // 8 bytes of f32 moments per element against 2 + the block scales.
    assert_eq!(opt.state_bytes(), 2 * 5120 + 2 * 4 * 20);

    // The 300-element tensor: 8-bit when forced (min_8bit_size=0; two blocks, the last partial) and bitsandbytes'
    // 32-bit formula by default.
    let (mut p8, mut p32) = (f32s(&f["b.init"]), f32s(&f["b.init"]));
    let mut st = State8::new(300);
    let (mut m, mut v) = (vec![0f32; 300], vec![0f32; 300]);
    for k in 1..=3 {
        let g = f32s(&f[&format!("b.grad.step{k}")]);
        step8(&mut p8, &g, &mut st, Step { t: k, ..S });
        step32(&mut p32, &g, &mut m, &mut v, Step { t: k, ..S });
        params_close(&p8, &f32s(&f[&format!("min0.b.param.step{k}")]), &format!("b (8-bit) step {k}"));
        assert_eq!(st.state1, u8s(&f[&format!("min0.b.state1.step{k}")]), "b state1 step {k}");
        assert_eq!(st.state2, u8s(&f[&format!("min0.b.state2.step{k}")]), "b state2 step {k}");
        assert_eq!(bits(&st.absmax1), bits(&f32s(&f[&format!("min0.b.absmax1.step{k}")])));
        params_close(&p32, &f32s(&f[&format!("default.b.param.step{k}")]), &format!("b (32-bit) step {k}"));
        params_close(&m, &f32s(&f[&format!("default.b.state1.step{k}")]), &format!("b exp_avg step {k}"));
    }
}

#[test]
fn eight_bit_state_survives_a_checkpoint() {
    let f = fixture();
    let cfg = AdamWConfig { eight_bit: true, ..Default::default() };
    let run = |resume_at: Option<i64>| {
        let w = f["w.init"].copy().set_requires_grad(true);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], cfg).unwrap();
        for k in 1..=3 {
            if resume_at == Some(k) {
                // Through a checkpoint file, as the trainer writes and reads it.
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("optimizer.safetensors");
                ferrotune_core::weights::save_safetensors(&file, &opt.state_tensors()).unwrap();
                let step = opt.step;
                opt = AdamW::new(vec![("w".into(), w.shallow_clone())], cfg).unwrap();
                let files = ferrotune_core::weights::WeightFiles::open_files(&[file]).unwrap();
                opt.load_state(&|n| files.load_raw(n), step).unwrap();
            }
            opt.zero_grad().unwrap();
            (&w * &f[&format!("w.grad.step{k}")]).sum(Kind::Float).backward();
            opt.step(1e-3).unwrap();
        }
        f32s(&w.detach())
    };
    assert_eq!(run(None), run(Some(2)), "a restored 8-bit state continues exactly");
}
