//! The same metrics over OTLP/gRPC when `telemetry.otlp_endpoint` is set: every
//! `telemetry.otlp_metrics_interval_s` the registry is sent to the collector's MetricsService — counters as
//! cumulative monotonic sums, gauges as gauges, histograms as cumulative explicit-bucket histograms, labels as
//! attributes, `service.name` on the resource. A collector that is down costs a warning, never the service.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::registry::{Points, Snapshot};

/// OTLP's AggregationTemporality CUMULATIVE.
const CUMULATIVE: i32 = 2;

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue { key: k.to_owned(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.to_owned())) }) }
}

fn nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// The families as one OTLP export request.
pub fn request(families: &[Snapshot], service_name: &str, start_ns: u64, now_ns: u64) -> ExportMetricsServiceRequest {
    let metrics = families
        .iter()
        .map(|f| {
            let data = match &f.points {
                Points::Scalar(series) => {
                    let points = series
                        .iter()
                        .map(|(labels, v)| NumberDataPoint {
                            attributes: labels.iter().map(|(k, v)| kv(k, v)).collect(),
                            start_time_unix_nano: start_ns,
                            time_unix_nano: now_ns,
                            value: Some(number_data_point::Value::AsDouble(*v)),
                            ..Default::default()
                        })
                        .collect();
                    if f.kind == "counter" {
                        metric::Data::Sum(Sum {
                            data_points: points,
                            aggregation_temporality: CUMULATIVE,
                            is_monotonic: true,
                        })
                    } else {
                        metric::Data::Gauge(Gauge { data_points: points })
                    }
                }
                Points::Histogram(bounds, series) => metric::Data::Histogram(Histogram {
                    data_points: series
                        .iter()
                        .map(|h| HistogramDataPoint {
                            attributes: h.labels.iter().map(|(k, v)| kv(k, v)).collect(),
                            start_time_unix_nano: start_ns,
                            time_unix_nano: now_ns,
                            count: h.count,
                            sum: Some(h.sum),
                            bucket_counts: h.counts.clone(),
                            explicit_bounds: bounds.to_vec(),
                            ..Default::default()
                        })
                        .collect(),
                    aggregation_temporality: CUMULATIVE,
                }),
            };
            Metric { name: f.name.to_owned(), description: f.help.to_owned(), data: Some(data), ..Default::default() }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource { attributes: vec![kv("service.name", service_name)], ..Default::default() }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "ferrotune".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Sends the registry to `endpoint` every `interval` until the process ends.
pub async fn export_every(endpoint: String, service_name: String, interval: Duration) {
    super::gpu::register();
    let start = nanos(std::time::SystemTime::now());
    let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
        Ok(e) => e.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(10)).connect_lazy(),
        Err(e) => {
            tracing::warn!("telemetry.otlp_endpoint `{endpoint}`: {e}; metrics are not exported");
            return;
        }
    };
    let mut client = MetricsServiceClient::new(channel);
    let mut warned = false;
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let req = request(&super::snapshot(), &service_name, start, nanos(std::time::SystemTime::now()));
        match client.export(req).await {
            Ok(_) => warned = false,
            Err(s) if !warned => {
                tracing::warn!(
                    "OTLP metrics export to {endpoint} failed ({}); retrying every {interval:?}",
                    s.message()
                );
                warned = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::registry::{Histogram as H, Scalar};

    #[test]
    fn families_map_to_otlp_kinds() {
        static C: Scalar = Scalar::counter("o_calls_total", "Calls.", &["method"]);
        static G: Scalar = Scalar::gauge("o_loaded", "Loaded.", &[]);
        static HI: H = H::new("o_wait_seconds", "Wait.", &[], &[0.1, 1.0]);
        C.add(&["Get"], 3.0);
        G.set(&[], 2.0);
        HI.observe(&[], 0.05);
        HI.observe(&[], 5.0);
        let req = request(&[C.snapshot(), G.snapshot(), HI.snapshot()], "svc", 1, 2);
        let m = &req.resource_metrics[0].scope_metrics[0].metrics;
        match &m[0].data {
            Some(metric::Data::Sum(s)) => {
                assert!(s.is_monotonic && s.aggregation_temporality == CUMULATIVE);
                assert_eq!(s.data_points[0].value, Some(number_data_point::Value::AsDouble(3.0)));
                assert_eq!(s.data_points[0].attributes[0].key, "method");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&m[1].data, Some(metric::Data::Gauge(_))));
        match &m[2].data {
            Some(metric::Data::Histogram(h)) => {
                let p = &h.data_points[0];
                assert_eq!(
                    (p.count, p.bucket_counts.clone(), p.explicit_bounds.clone()),
                    (2, vec![1, 0, 1], vec![0.1, 1.0])
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
