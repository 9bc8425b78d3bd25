//! Score throughput and latency over gRPC at 1, 8 and 32 concurrent clients, with dynamic batching off
//! (`reward.max_batch_size = 1`) and on (32 items, 5 ms), in one run. The reward model is SmolLM2 with a
//! fresh LoRA (r = 8, all linear layers) and score head — scoring cost does not depend on training. Each
//! call scores one (prompt, response) pair. Run: `make bench-score`.

use std::time::{Duration, Instant};

use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_proto::v1::reward_service_client::RewardServiceClient;
use ferrotune_proto::v1::{reward_model_ref, LearnedReward, ModelRef, RewardModelRef, ScoreItem, ScoreRequest};
use ferrotune_runtime::server::Hosting;
use ferrotune_runtime::{ArtifactRoot, Settings};

const CALLS: usize = 96;

fn main() -> anyhow::Result<()> {
    let model = ferrotune_core::registry::pull(ferrotune_core::registry::DEFAULT_MODEL)?;
    let tmp = tempfile::tempdir()?;
    let adapter = tmp.path().join("rm");
    {
        let mut m = ferrotune_core::load_model(&model, tch::Kind::Float, tch::Device::Cpu)?;
        let cfg = LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Targets::AllLinear,
            use_rslora: false,
            use_dora: false,
        };
        m.add_lora(&cfg, 1)?;
        m.add_score_head(2)?;
        ferrotune_core::train::reward::save_reward_model(&mut m, &cfg, &model.display().to_string(), &adapter)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!("Score over gRPC, SmolLM2-135M reward model (f32, CPU), one pair per call, {CALLS} calls per row\n");
    println!("| batching | clients | calls/s | p50 ms | p99 ms | largest batch |");
    println!("|:--|--:|--:|--:|--:|--:|");
    for batching in [false, true] {
        let mut s = Settings::load(None)?;
        s.reward.max_batch_size = if batching { 32 } else { 1 };
        s.reward.max_wait_ms = 5;
        s.jobs.db = Some(tmp.path().join(format!("jobs-{batching}.sqlite")));
        let root = ArtifactRoot::unconfined(tmp.path())?;
        let url = rt.block_on(async {
            let mut h = Hosting::new(s, root);
            ferrotune_reward::host(&mut h)?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            tokio::spawn(h.serve(listener, std::future::pending()));
            anyhow::Ok(url)
        })?;
        let reference = RewardModelRef {
            kind: Some(reward_model_ref::Kind::Learned(LearnedReward {
                base: Some(ModelRef { path: model.display().to_string() }),
                adapter: adapter.display().to_string(),
            })),
        };
        for clients in [1usize, 8, 32] {
            let (lat, secs, largest) = rt.block_on(async {
                let client = RewardServiceClient::connect(url.clone()).await?;
                // Warm-up: load the model.
                let req = |i: usize| ScoreRequest {
                    model: Some(reference.clone()),
                    items: vec![ScoreItem {
                        prompt: format!("What is {i} plus {i}?"),
                        response: format!("Ahoy! {i} plus {i} is {}. Arr.", 2 * i),
                        reference: String::new(),
                    }],
                };
                client.clone().score(req(0)).await?;
                let started = Instant::now();
                let per = CALLS / clients;
                let tasks: Vec<_> = (0..clients)
                    .map(|c| {
                        let mut cl = client.clone();
                        let reqs: Vec<ScoreRequest> = (0..per).map(|k| req(c * per + k)).collect();
                        tokio::spawn(async move {
                            let mut out = vec![];
                            for r in reqs {
                                let t = Instant::now();
                                let resp = cl.score(r).await?.into_inner();
                                out.push((t.elapsed(), resp.batch_size));
                            }
                            anyhow::Ok(out)
                        })
                    })
                    .collect();
                let mut lat: Vec<Duration> = vec![];
                let mut largest = 0;
                for t in tasks {
                    for (d, b) in t.await?? {
                        lat.push(d);
                        largest = largest.max(b);
                    }
                }
                anyhow::Ok((lat, started.elapsed().as_secs_f64(), largest))
            })?;
            let mut ms: Vec<f64> = lat.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            ms.sort_by(f64::total_cmp);
            let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
            println!(
                "| {} | {clients} | {:.1} | {:.0} | {:.0} | {largest} |",
                if batching { "on (32, 5 ms)" } else { "off" },
                ms.len() as f64 / secs,
                pct(0.5),
                pct(0.99)
            );
        }
    }
    Ok(())
}
