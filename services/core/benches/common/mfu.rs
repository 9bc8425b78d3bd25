//! Model-FLOP utilisation for the training bench: the machine's f32 GEMM peak measured on the model's own
//! linear shapes, and the matrix-product FLOPs one training step needs (counted from the config, the same
//! for ferrotune and PEFT, so MFU compares the two fairly).

use std::path::Path;

use tch::{Device, Kind, Tensor};

/// The shapes that matter: per layer and for the head.
pub(crate) struct Shapes {
    pub(crate) layers: f64,
    pub(crate) hidden: f64,
    pub(crate) q: f64,
    pub(crate) kv: f64,
    pub(crate) inter: f64,
    pub(crate) vocab: f64,
}

impl Shapes {
    pub(crate) fn from_dir(dir: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
        let heads = f("num_attention_heads");
        let head_dim = c["head_dim"].as_f64().unwrap_or(f("hidden_size") / heads);
        let kv_heads = c["num_key_value_heads"].as_f64().unwrap_or(heads);
        Ok(Self {
            layers: f("num_hidden_layers"),
            hidden: f("hidden_size"),
            q: heads * head_dim,
            kv: kv_heads * head_dim,
            inter: f("intermediate_size"),
            vocab: f("vocab_size"),
        })
    }

    /// (out, in) of each decoder linear layer.
    fn linears(&self) -> [(f64, f64); 7] {
        let (h, q, kv, i) = (self.hidden, self.q, self.kv, self.inter);
        [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    }

    /// Matrix-product FLOPs of one training step of LoRA rank `r` on `targets` ("qv" or "all") over `batch`
    /// rows of `seq` tokens: the frozen products forward (2·N·P) and for the input gradients backward (2·N·P;
    /// the first layer's projections need none), the attention products over the causal triangle (Q·Kᵀ and
    /// P·V: forward 2·N·S·d_q per layer, backward twice that — what a causal kernel computes, so MFU is not
    /// flattered by masked work), the head forward and backward, the LoRA products (forward, input and weight
    /// gradients), and with checkpointing the decoder forward again.
    pub(crate) fn step_flops(&self, targets: &str, r: f64, batch: f64, seq: f64, checkpointing: bool) -> f64 {
        let n = batch * seq;
        let per_layer: f64 = self.linears().iter().map(|(o, i)| o * i).sum();
        let attention = 2.0 * n * seq * self.q;
        let layer_fwd = 2.0 * n * per_layer + attention;
        let head = 2.0 * n * self.vocab * self.hidden;
        let lora_modules: Vec<(f64, f64)> = match targets {
            "qv" => vec![self.linears()[0], self.linears()[2]],
            _ => self.linears().to_vec(),
        };
        let lora_fwd: f64 = lora_modules.iter().map(|(o, i)| 2.0 * n * r * (o + i)).sum::<f64>() * self.layers;
        let forward = self.layers * layer_fwd + head + lora_fwd;
        let backward =
            2.0 * n * per_layer * (self.layers - 1.0) + 2.0 * attention * self.layers + head + 2.0 * lora_fwd;
        let recompute = if checkpointing { self.layers * layer_fwd + lora_fwd } else { 0.0 };
        forward + backward + recompute
    }

    /// The best f32 (or `kind`) GEMM rate on the model's shapes, `x[rows, in] · Wᵀ` as a linear layer computes
    /// it: (peak GFLOP/s, the FLOP-weighted rate over one layer's products plus the head, per-shape rates).
    pub(crate) fn gemm_peak(&self, rows: i64, kind: Kind, device: Device) -> (f64, f64, Vec<(String, f64)>) {
        let mut shapes: Vec<(f64, f64)> = self.linears().to_vec();
        shapes.dedup();
        shapes.push((self.vocab, self.hidden));
        let mut per = Vec::new();
        let (mut flops, mut secs) = (0.0, 0.0);
        for (o, i) in shapes {
            let f = 2.0 * rows as f64 * o * i;
            let best = product_secs(rows, o, i, false, kind, device);
            let weight = if o == self.vocab { 1.0 } else { self.layers };
            flops += weight * f;
            secs += weight * best;
            per.push((format!("{o}×{i}"), f / best / 1e9));
        }
        let peak = per.iter().map(|p| p.1).fold(0.0, f64::max);
        (peak, flops / secs / 1e9, per)
    }

    /// What fusing a layer's projections into one product would buy on this machine: for q/k/v and for
    /// gate/up, the seconds of the separate products and of the one fused product, forward (`x·Wᵀ`) plus the
    /// input gradient (`g·W`; the separate gradients also pay their sum): (name, separate, fused).
    pub(crate) fn fusion(&self, rows: i64, kind: Kind, device: Device) -> Vec<(&'static str, f64, f64)> {
        let (h, q, kv, i) = (self.hidden, self.q, self.kv, self.inter);
        let both =
            |o: f64| product_secs(rows, o, h, false, kind, device) + product_secs(rows, o, h, true, kind, device);
        let sum_secs = |n: usize| {
            let a = Tensor::randn([rows, h as i64], (kind, device));
            let b = Tensor::randn([rows, h as i64], (kind, device));
            best_secs(device, (10_000 / rows.max(1)).clamp(5, 50) as usize, &|| {
                let mut acc = a.shallow_clone();
                for _ in 1..n {
                    acc = &acc + &b;
                }
                acc
            })
        };
        vec![
            ("q/k/v", both(q) + 2.0 * both(kv) + sum_secs(3), both(q + 2.0 * kv)),
            ("gate/up", 2.0 * both(i) + sum_secs(2), both(2.0 * i)),
        ]
    }
}

/// Best seconds of one `x[rows, in] · Wᵀ` (`input_grad`: `g[rows, out] · W`, a linear layer's input gradient)
/// for a weight `[out, in]`.
fn product_secs(rows: i64, out: f64, inp: f64, input_grad: bool, kind: Kind, device: Device) -> f64 {
    let w = Tensor::randn([out as i64, inp as i64], (kind, device));
    let x = Tensor::randn([rows, if input_grad { out } else { inp } as i64], (kind, device));
    let f = 2.0 * rows as f64 * out * inp;
    let reps = ((2e10 / f).ceil() as usize).clamp(2, 50);
    best_secs(device, reps, &|| if input_grad { x.mm(&w) } else { x.linear::<Tensor>(&w, None) })
}

/// Best of 3 timings of `reps` calls of `f` (after one untimed call), seconds per call.
fn best_secs(device: Device, reps: usize, f: &dyn Fn() -> Tensor) -> f64 {
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
    };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let _ = f();
        sync();
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let _ = f();
        }
        sync();
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

/// The CPU's model name (from /proc/cpuinfo) and its widest vector extension, so tables from different
/// machines are never mixed.
pub(crate) fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info.lines().find_map(|l| l.strip_prefix("model name")).map(|l| l.trim_start_matches([' ', '\t', ':']));
    let flags = info.lines().find_map(|l| l.strip_prefix("flags")).unwrap_or_default();
    let simd = if flags.contains(" avx512f") {
        "AVX-512"
    } else if flags.contains(" avx2") {
        "AVX2"
    } else {
        "no AVX2"
    };
    format!("{} ({simd}, {} logical CPUs)", name.unwrap_or("unknown CPU"), info.matches("processor\t").count())
}
