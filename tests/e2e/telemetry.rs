//! One trace from the CLI into a service: a fake OTLP collector receives the spans of `ferrotune
//! tokenize` (the CLI) and of the data server it calls; the server's request span continues the CLI's
//! trace (same trace id, parent = the CLI's span), carried by the `traceparent` gRPC metadata.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrotune_tests::{run_cli_env, smollm2_dir, Server};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// (service.name, span name, trace id, span id, parent span id, attributes)
type Seen = (String, String, Vec<u8>, Vec<u8>, Vec<u8>, HashMap<String, String>);

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Seen>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attrs = s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect();
                    self.0.lock().unwrap().push((
                        service.clone(),
                        s.name,
                        s.trace_id,
                        s.span_id,
                        s.parent_span_id,
                        attrs,
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn smollm2_one_trace_spans_cli_and_service() {
    smollm2_dir();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let collector = Collector::default();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let svc = TraceServiceServer::new(collector.clone());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let t = tempfile::tempdir().unwrap();
    let env = [("FERROTUNE__TELEMETRY__OTLP_ENDPOINT", otlp.as_str())];
    let server = Server::start("data", t.path(), &env);
    let cli_env =
        [("FERROTUNE__TELEMETRY__OTLP_ENDPOINT", otlp.as_str()), ("FERROTUNE__ENDPOINTS__DATA", server.url.as_str())];
    let o =
        run_cli_env(t.path(), &cli_env, &["tokenize", "--model", "smollm2-135m-instruct", "--text", "hello", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(server.terminate().success());
    let spans = collector.0.lock().unwrap().clone();
    for (svc, name, tid, sid, parent, attrs) in &spans {
        println!("{svc:16} {name:10} trace {} span {} parent {} {attrs:?}", hex(tid), hex(sid), hex(parent));
    }
    let cli =
        spans.iter().find(|s| s.0 == "ferrotune-cli" && s.1 == "ferrotune").expect("the CLI's root span was exported");
    let rpc = spans
        .iter()
        .find(|s| {
            s.0 == "ferrotune-serve"
                && s.1 == "grpc"
                && s.5.get("rpc").is_some_and(|r| r == "/ferrotune.v1.DataService/Tokenize")
        })
        .expect("the server's request span was exported");
    assert_eq!(hex(&rpc.2), hex(&cli.2), "the server span is in the CLI's trace");
    assert_eq!(hex(&rpc.4), hex(&cli.3), "the server span's parent is the CLI's span");
}
