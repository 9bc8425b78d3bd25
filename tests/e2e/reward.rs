//! A reward model on SmolLM2 through the CLI (`train reward`, embedded reward service), then scored by a
//! real reward server (`ferrotune serve --services reward`): held-out pairwise accuracy, concurrent Score
//! calls gathered into one batch, rule rewards, bad requests.

use ferrotune_proto::v1::reward_service_client::RewardServiceClient;
use ferrotune_proto::v1::{reward_model_ref, LearnedReward, ModelRef, RewardModelRef, ScoreItem, ScoreRequest};
use ferrotune_tests::{repo, run_cli, smollm2_dir, Server};
use tonic::Code;

#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_reward_model_ranks_held_out_pairs_and_batches_concurrent_calls() {
    smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let out = root.join("rm");
    let data = format!("data.path={}", repo("recipes/data/pirate-prefs-train.jsonl").display());
    let o = run_cli(&[
        "train",
        "reward",
        "--recipe",
        repo("recipes/reward.yaml").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        &data,
        "--max-steps",
        "12",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let held: Vec<serde_json::Value> = std::fs::read_to_string(repo("recipes/data/pirate-prefs-eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let server = Server::start("reward", &root, &[("FERROTUNE__REWARD__MAX_WAIT_MS", "50")]);
    let url = server.url.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let client = RewardServiceClient::connect(url).await.unwrap();
        let learned = RewardModelRef {
            kind: Some(reward_model_ref::Kind::Learned(LearnedReward {
                base: Some(ModelRef { path: "smollm2-135m-instruct".into() }),
                adapter: "rm".into(),
            })),
        };
        // One concurrent call per held-out pair (chosen, rejected): the batcher gathers them.
        let calls = held.iter().map(|p| {
            let mut c = client.clone();
            let items = ["chosen", "rejected"]
                .map(|k| ScoreItem {
                    prompt: p["prompt"].as_str().unwrap().into(),
                    response: p[k].as_str().unwrap().into(),
                    reference: String::new(),
                })
                .to_vec();
            let model = learned.clone();
            tokio::spawn(async move { c.score(ScoreRequest { model: Some(model), items }).await.unwrap().into_inner() })
        });
        let mut correct = 0;
        let mut largest = 0;
        for h in calls.collect::<Vec<_>>() {
            let r = h.await.unwrap();
            correct += usize::from(r.scores[0] > r.scores[1]);
            largest = largest.max(r.batch_size);
        }
        println!(
            "reward model: held-out pairwise accuracy {correct}/{}; largest dynamic batch {largest} items",
            held.len()
        );
        assert!(correct as f64 / held.len() as f64 >= 0.875, "{correct}/{}", held.len());
        assert!(largest > 2, "concurrent calls were never batched together");
        // Rules behind the same rpc.
        let mut c = client.clone();
        let rule = |r: &str| Some(RewardModelRef { kind: Some(reward_model_ref::Kind::Rule(r.into())) });
        let items = vec![
            ScoreItem { prompt: "q".into(), response: "Ahoy! Cairo. Arr.".into(), reference: String::new() },
            ScoreItem { prompt: "q".into(), response: "Cairo.".into(), reference: String::new() },
        ];
        let r = c
            .score(ScoreRequest { model: rule("regex:^Ahoy!.*Arr.$"), items: items.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.scores, vec![1.0, 0.0]);
        // Bad requests.
        assert_eq!(
            c.score(ScoreRequest { model: rule("vibes"), items: items.clone() }).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            c.score(ScoreRequest { model: rule("length"), items: vec![] }).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            c.score(ScoreRequest { model: None, items: items.clone() }).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let missing = RewardModelRef {
            kind: Some(reward_model_ref::Kind::Learned(LearnedReward {
                base: Some(ModelRef { path: "smollm2-135m-instruct".into() }),
                adapter: "nope".into(),
            })),
        };
        assert_eq!(c.score(ScoreRequest { model: Some(missing), items }).await.unwrap_err().code(), Code::NotFound);
    });
}

#[test]
fn reward_pool_balances_over_replicas_and_fails_over() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    // Replicas share the artifact root, each with its own job store.
    let a = Server::start("reward", &root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-a.sqlite")]);
    let b = Server::start("reward", &root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-b.sqlite")]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _in_runtime = rt.enter();
    let pool =
        ferrotune_clients::RewardPool::new(&[a.url.clone(), b.url.clone()], ferrotune_clients::ClientAuth::default())
            .unwrap();
    let req = || ScoreRequest {
        model: Some(RewardModelRef { kind: Some(reward_model_ref::Kind::Rule("length".into())) }),
        items: vec![ScoreItem { prompt: "q".into(), response: "four".into(), reference: String::new() }],
    };
    let mut before = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let r = rt.block_on(pool.score(req())).unwrap();
        assert_eq!(r.scores, vec![4.0]);
        before.insert(r.replica);
    }
    assert_eq!(before.len(), 2, "calls should spread over both replicas: {before:?}");
    drop(a); // SIGKILL one replica
    let mut after = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let r = rt.block_on(pool.score(req())).expect("the pool fails over to the live replica");
        after.insert(r.replica);
    }
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(before.contains(after.iter().next().unwrap()));
    drop(b);
    let e = rt.block_on(pool.score(req())).unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}
