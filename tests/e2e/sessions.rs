//! Policy training sessions' limits against a real `ferrotune serve --services policy` on the tiny chat model:
//! beyond `policy.max_sessions` an Open is RESOURCE_EXHAUSTED, and an idle session is closed by the server's
//! own timer (logged, its slot freed) without waiting for another session call.

use std::time::{Duration, Instant};

use ferrotune_proto::v1::policy_service_client::PolicyServiceClient;
use ferrotune_proto::v1::{LoraSettings, ModelRef, OpenSessionRequest};
use ferrotune_tests::{tiny_chat_in, Server};
use tonic::Code;

fn open(id: &str, model: &str) -> OpenSessionRequest {
    OpenSessionRequest {
        session_id: id.into(),
        model: Some(ModelRef { path: model.into() }),
        lora: Some(LoraSettings { r: 2, lora_alpha: 4.0, ..Default::default() }),
        output_dir: format!("runs/{id}"),
        seed: 1,
        ..Default::default()
    }
}

#[test]
fn sessions_beyond_the_limit_are_refused_and_idle_ones_expire_by_themselves() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_chat_in(t.path());
    let log = t.path().join("policy.log");
    let env = [("FERROTUNE__POLICY__MAX_SESSIONS", "1"), ("FERROTUNE__POLICY__SESSION_IDLE_S", "2")];
    let server = Server::start_logged("policy", t.path(), &env, &log);
    let url = server.url.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let mut policy = PolicyServiceClient::connect(url).await.unwrap();
        policy.open_session(open("a", model)).await.unwrap();
        let e = policy.open_session(open("b", model)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("max_sessions"), "{e:?}");
        // No session call from here on: the server's timer must close `a` on its own.
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("idle too long") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no expiry logged; log:\n{text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(500), "expired before it was idle");
        policy.open_session(open("b", model)).await.unwrap();
    });
    drop(server);
}
