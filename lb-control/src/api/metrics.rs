//! Prometheus: `GET /metrics` (the control plane's registry plus the kernel's counters, read at
//! scrape time) and the count of every admin request by method, route and status.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet, text},
    metrics::MetricType,
    registry::Registry,
};
use tracing::warn;

use super::{Context, error::ApiError, run_blocking};
use crate::{
    dataplane::{Stats, read_pinned_stats},
    metrics::{AdminRequestLabels, Metrics},
};

/// Counts the request under its route's template; requests no route matched share one label,
/// so a scanner cannot grow the label set.
pub async fn count_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let method = match *request.method() {
        Method::GET | Method::POST | Method::PUT | Method::DELETE | Method::HEAD => {
            request.method().to_string()
        }
        _ => "other".to_owned(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let response = next.run(request).await;
    metrics
        .admin_requests
        .get_or_create(&AdminRequestLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    security(()),
    responses(
        (status = 200, description = "Every metric family, OpenMetrics text",
         content_type = "application/openmetrics-text", body = String),
    )
)]
pub async fn metrics(State(context): State<Context>) -> Result<Response, ApiError> {
    // Reading the kernel maps is a few hundred syscalls: off the async workers.
    let body = run_blocking(move || {
        let mut body = String::new();
        text::encode_registry(&mut body, &context.registry)
            .and_then(|()| text::encode_registry(&mut body, &context.kernel_registry))
            .and_then(|()| text::encode_eof(&mut body))
            .map_err(|error| ApiError::internal(format!("encoding metrics: {error}")))?;
        Ok(body)
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// A registry holding only the kernel collector, encoded beside the control plane's own.
pub fn kernel_registry(pin_dir: PathBuf) -> Registry {
    let mut registry = Registry::with_prefix("lb");
    registry.register_collector(Box::new(KernelCollector { pin_dir }));
    registry
}

/// The XDP program's counters, read from the pinned maps at every scrape (they are per-CPU
/// sums the kernel keeps; copying them into gauges on a timer would only make them stale).
#[derive(Debug)]
struct KernelCollector {
    pin_dir: PathBuf,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = read_pinned_stats(&self.pin_dir);
        if let Err(error) = &stats {
            warn!("metrics: reading the kernel counters: {error}");
        }
        encoder
            .encode_descriptor(
                "xdp_stats_readable",
                "1 when the kernel counters could be read at this scrape",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&i64::from(stats.is_ok()))?;
        match stats {
            Ok(stats) => encode_stats(&mut encoder, &stats),
            Err(_) => Ok(()),
        }
    }
}

/// One counter family: a descriptor and a sample per label set.
fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

fn encode_stats(encoder: &mut DescriptorEncoder, stats: &Stats) -> Result<(), std::fmt::Error> {
    let protocols = || {
        stats
            .protocols
            .by_slot
            .iter()
            .map(|(name, counters)| ([("protocol", *name)], counters))
    };
    encode_counters(
        encoder,
        "xdp_packets",
        "Packets the XDP program saw, by protocol",
        protocols().map(|(labels, c)| (labels, c.packets)),
    )?;
    encode_counters(
        encoder,
        "xdp_bytes",
        "Bytes the XDP program saw (Ethernet header included), by protocol",
        protocols().map(|(labels, c)| (labels, c.bytes)),
    )?;
    encode_counters(
        encoder,
        "xdp_drops",
        "Packets dropped outside any service, by reason",
        stats
            .drops
            .iter()
            .map(|(reason, count)| ([("reason", *reason)], *count)),
    )?;

    encode_counters(
        encoder,
        "xdp_second_chance_packets",
        "Gateway segments second chance sent to the other host of the pair, by mode: handover \
         (the new master, to the old one while it drains) or standing (a host whose gateway \
         had no socket for them: lb-control down)",
        stats
            .second_chance_packets
            .iter()
            .map(|(mode, count)| ([("mode", mode.name())], *count)),
    )?;

    let service = |name: &str| [("service", name.to_owned())];
    encode_counters(
        encoder,
        "service_packets",
        "Packets to the service",
        stats
            .services
            .iter()
            .map(|s| (service(&s.service), s.packets)),
    )?;
    encode_counters(
        encoder,
        "service_bytes",
        "Bytes to the service",
        stats
            .services
            .iter()
            .map(|s| (service(&s.service), s.bytes)),
    )?;
    encode_counters(
        encoder,
        "service_new_flows",
        "New flows the service's Maglev table placed",
        stats
            .services
            .iter()
            .map(|s| (service(&s.service), s.new_flows)),
    )?;
    encode_counters(
        encoder,
        "service_drops",
        "Packets to the service dropped, by reason",
        stats.services.iter().flat_map(|s| {
            s.drops.iter().map(|(reason, count)| {
                (
                    [
                        ("service", s.service.clone()),
                        ("reason", (*reason).to_owned()),
                    ],
                    *count,
                )
            })
        }),
    )?;

    // One series per address: the same node may back two services (the kernel then has two
    // rows for it), and a label set must not repeat.
    let mut backends: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for row in &stats.backends {
        let sums = backends.entry(row.backend.to_string()).or_default();
        sums[0] += row.packets;
        sums[1] += row.bytes;
        sums[2] += row.new_flows;
    }
    for (index, (name, help)) in [
        ("backend_packets", "Packets forwarded to the backend"),
        ("backend_bytes", "Bytes forwarded to the backend"),
        ("backend_new_flows", "New flows placed on the backend"),
    ]
    .into_iter()
    .enumerate()
    {
        encode_counters(
            encoder,
            name,
            help,
            backends
                .iter()
                .map(|(backend, sums)| ([("backend", backend.clone())], sums[index])),
        )?;
    }
    Ok(())
}
