//! The benchmark's lab: 2 sim-nodes, lb-control with its gateway (an API key made with the
//! CLI) and nginx in the LB namespace, both serving TLS with one certificate from the lab's CA;
//! the wrk scripts; and what is read around the runs: the gateway's cache lookups and the
//! resident memory of lb-control and nginx.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use lb_tests::{
    lab::{
        Lab, LabConfig, SIM_NODE_RPC_PORT, backends_toml, certs::GatewayCerts, command_in_netns,
        run_checked,
    },
    nginx,
    proc_usage::{ProcessMemory, children},
    prometheus, wrk,
};

use crate::{CACHED_METHOD, NODES, Settings, Target, UNCACHED_METHOD, call_of};

/// The gateway's TLS port, on the LB's client-side address.
const GATEWAY_PORT: u16 = 8443;
/// nginx terminating TLS and proxying every request to the nodes.
const NGINX_PROXY_PORT: u16 = 9443;
/// nginx terminating TLS with `proxy_cache` on POST bodies.
const NGINX_CACHE_PORT: u16 = 9444;
/// nginx terminating TLS and passing WebSockets through to the nodes.
const NGINX_WEBSOCKET_PORT: u16 = 9445;
/// nginx's header saying whether its cache answered.
const CACHE_STATUS_HEADER: &str = "X-Cache-Status";
/// How long the gateway and nginx get to answer their first request.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// The running lab and what the runs need from it.
pub struct Setup {
    pub lab: Lab,
    ca: PathBuf,
    secret: String,
    lb_control: u32,
    nginx: u32,
    cached_script: PathBuf,
    uncached_script: PathBuf,
    flood_script: PathBuf,
}

impl Setup {
    /// Builds the lab, starts lb-control and nginx, makes a key and checks that every target
    /// answers its call (and that the cached ones come from a cache).
    pub fn start(settings: &Settings) -> anyhow::Result<Setup> {
        let mut lab = Lab::start(LabConfig {
            nodes: NODES,
            start_sim_nodes: true,
            ..LabConfig::default()
        })?;
        let dir = lab.log_dir().to_owned();
        let GatewayCerts { ca, cert, key } =
            GatewayCerts::write(&dir, "gateway", &[lab.lb().addr_v4.into()])?;

        let config = dir.join("lb-control.toml");
        std::fs::write(&config, lb_control_config(&lab, &cert, &key))
            .with_context(|| format!("writing {}", config.display()))?;
        let config = config.to_str().context("the lab's path is not UTF-8")?;
        let lb_control = lab.spawn_lb_control(&["--config", config])?.pid();
        let secret = lab
            .create_api_key("bench")
            .context("creating an API key with lb-control")?;

        let (lb_netns, lb_addr) = (lab.lb().netns.clone(), lab.lb().addr_v4);
        let nodes: Vec<Ipv4Addr> = lab.nodes().iter().map(|node| node.addr_v4).collect();
        let nginx = nginx::start(&mut lab, "tls", &lb_netns, settings.nginx_workers, |dir| {
            nginx_http(lb_addr, &nodes, dir, &cert, &key)
        })?;

        let (cached_script, uncached_script, flood_script) = (
            dir.join("wrk-cached.lua"),
            dir.join("wrk-uncached.lua"),
            dir.join("wrk-made-up-keys.lua"),
        );
        for (path, script) in [
            (&cached_script, wrk::script(&call_of(CACHED_METHOD), &[])),
            (
                &uncached_script,
                wrk::script(&call_of(UNCACHED_METHOD), &[]),
            ),
            (
                &flood_script,
                wrk::made_up_keys_script(&call_of(CACHED_METHOD)),
            ),
        ] {
            std::fs::write(path, script).with_context(|| format!("writing {}", path.display()))?;
        }
        let setup = Setup {
            lab,
            ca,
            secret,
            lb_control,
            nginx,
            cached_script,
            uncached_script,
            flood_script,
        };
        for &target in &settings.targets {
            setup
                .check_answers(target)
                .with_context(|| format!("checking that {} answers", target.label()))?;
        }
        Ok(setup)
    }

    /// Where `target`'s requests go (a WebSocket target's server and path, over HTTPS: its
    /// answer is checked with a POST).
    pub fn url(&self, target: Target) -> String {
        match self.server(target) {
            Some((server, path)) => format!("https://{server}{path}"),
            None => self.lab.node_rpc_url(0) + "/",
        }
    }

    /// The TLS server on the LB and the request path of `target`; None for the node's own.
    pub fn server(&self, target: Target) -> Option<(SocketAddr, String)> {
        let lb = self.lab.lb().addr_v4;
        let (port, path) = match target {
            gateway if gateway.is_gateway() => (GATEWAY_PORT, format!("/{}", self.secret)),
            Target::NginxProxy => (NGINX_PROXY_PORT, "/".to_owned()),
            Target::NginxHit => (NGINX_CACHE_PORT, "/".to_owned()),
            Target::NginxWs => (NGINX_WEBSOCKET_PORT, "/".to_owned()),
            _ => return None,
        };
        Some((SocketAddr::from((lb, port)), path))
    }

    /// The lab CA's certificate, which the clients trust.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// The wrk script sending `target`'s call.
    pub fn script(&self, target: Target) -> &Path {
        if target.is_cached_call() {
            &self.cached_script
        } else {
            &self.uncached_script
        }
    }

    /// Where the made-up key flood goes: the gateway (its script puts a key in every path).
    pub fn flood_url(&self) -> String {
        format!("https://{}:{GATEWAY_PORT}/", self.lab.lb().addr_v4)
    }

    /// The wrk script of the made-up key flood.
    pub fn flood_script(&self) -> &Path {
        &self.flood_script
    }

    /// lb-control's state store calls so far (`lb_store_calls_total`): reads, writes.
    pub fn store_calls(&self) -> anyhow::Result<(u64, u64)> {
        let metrics = self.lab.lb_control_metrics()?;
        let calls = |kind: &str| {
            prometheus::sum(&metrics, "lb_store_calls_total", |sample| {
                sample.label("kind") == Some(kind)
            }) as u64
        };
        Ok((calls("read"), calls("write")))
    }

    /// Key checks the gateway refused so far (`lb_gateway_auth_failures_total`).
    pub fn auth_failures(&self) -> anyhow::Result<u64> {
        let metrics = self.lab.lb_control_metrics()?;
        Ok(prometheus::sum(&metrics, "lb_gateway_auth_failures_total", |_| true) as u64)
    }

    /// The gateway's cache lookups so far, from lb-control's `/metrics`.
    pub fn cache_lookups(&self) -> anyhow::Result<CacheLookups> {
        Ok(CacheLookups::parse(&self.lab.lb_control_metrics()?))
    }

    /// lb-control's and nginx's (master, then workers) resident memory now.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let mut nginx = vec![ProcessMemory::read(self.nginx)?];
        let workers = children(self.nginx)?;
        if workers.is_empty() {
            bail!("nginx (pid {}) has no worker processes", self.nginx);
        }
        for worker in workers {
            nginx.push(ProcessMemory::read(worker)?);
        }
        Ok(Memory {
            lb_control: ProcessMemory::read(self.lb_control)?,
            nginx,
        })
    }

    /// Posts `target`'s call twice with curl from the client (retrying while the server comes
    /// up) and checks the answers: HTTP 200 with a JSON-RPC result and, for the cached call, a
    /// second answer from the cache.
    fn check_answers(&self, target: Target) -> anyhow::Result<()> {
        let gateway_hits = self.cache_lookups()?.hit;
        let deadline = Instant::now() + READY_TIMEOUT;
        let first = loop {
            match self.post(target) {
                Ok(answer) => break answer,
                Err(error) if Instant::now() >= deadline => {
                    return Err(error.context(format!("no answer within {READY_TIMEOUT:?}")));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        };
        let second = self.post(target)?;
        for answer in [&first, &second] {
            ensure!(
                answer.starts_with("HTTP/1.1 200") && answer.contains("\"result\""),
                "unexpected answer: {answer:?}"
            );
        }
        match target {
            Target::NginxHit => ensure!(
                second.to_ascii_lowercase().contains(&format!(
                    "{}: hit",
                    CACHE_STATUS_HEADER.to_ascii_lowercase()
                )),
                "nginx did not answer the second call from its cache: {second:?}"
            ),
            Target::GatewayHit
            | Target::GatewayHitLight
            | Target::GatewayHitUnderFlood
            | Target::GatewayWsHit => ensure!(
                self.cache_lookups()?.hit > gateway_hits,
                "the gateway did not answer the second call from its cache"
            ),
            Target::NginxProxy
            | Target::GatewayMiss
            | Target::Node
            | Target::GatewayMissSerial
            | Target::NodeSerial
            | Target::GatewayWsMiss
            | Target::NginxWs => {}
        }
        Ok(())
    }

    /// One POST of `target`'s call over HTTP/1.1 (as wrk sends it); the status line, headers
    /// and body.
    fn post(&self, target: Target) -> anyhow::Result<String> {
        let mut command = command_in_netns(&self.lab.client().netns, "curl")?;
        command
            .args(["-sS", "-i", "--http1.1", "--max-time", "5", "--cacert"])
            .arg(&self.ca)
            .args(["-H", "Content-Type: application/json", "-d", &target.call()])
            .arg(self.url(target));
        let output = run_checked(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// lb-control's config: one VIP over every node (never checked, so `up` at once) and the
/// gateway on the LB's client-side address.
fn lb_control_config(lab: &Lab, cert: &Path, key: &Path) -> String {
    let lb = lab.lb().addr_v4;
    format!(
        "[dataplane]\nnat_source_v4 = \"{lb}\"\n\n\
         [[services]]\nvip = \"10.200.0.10\"\nport = {SIM_NODE_RPC_PORT}\ncheck = \"none\"\n\
         backends = [{}]\n\n\
         [gateway]\nlisten = \"{lb}:{GATEWAY_PORT}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        backends_toml(lab.nodes().iter().map(|node| node.addr_v4)),
        cert.display(),
        key.display(),
    )
}

/// nginx's `http` directives: the nodes as an upstream with idle keep-alive connections, and
/// three TLS servers with the gateway's certificate, one proxying, one caching POST answers by
/// their body (`$request_body` is set because the body is read into the buffer before
/// proxying; `client_body_buffer_size` keeps it in memory), one passing WebSocket upgrades
/// through (`Upgrade`/`Connection` forwarded, as nginx's WebSocket proxying documents).
fn nginx_http(lb: Ipv4Addr, nodes: &[Ipv4Addr], dir: &Path, cert: &Path, key: &Path) -> String {
    let servers: String = nodes
        .iter()
        .map(|node| format!("        server {node}:{SIM_NODE_RPC_PORT};\n"))
        .collect();
    let (dir, cert, key) = (dir.display(), cert.display(), key.display());
    let proxy = "proxy_pass http://nodes;\n            proxy_http_version 1.1;\n            \
                 proxy_set_header Connection \"\";";
    format!(
        r#"    upstream nodes {{
{servers}        keepalive 64;
    }}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' "";
    }}
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=rpc:10m max_size=64m inactive=1h use_temp_path=off;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen {lb}:{NGINX_PROXY_PORT} ssl reuseport backlog=4096;
        location / {{
            {proxy}
        }}
    }}
    server {{
        listen {lb}:{NGINX_CACHE_PORT} ssl reuseport backlog=4096;
        client_body_buffer_size 64k;
        location / {{
            {proxy}
            proxy_cache rpc;
            proxy_cache_methods POST;
            proxy_cache_key "$request_uri|$request_body";
            proxy_cache_valid 200 1h;
            add_header {CACHE_STATUS_HEADER} $upstream_cache_status;
        }}
    }}
    server {{
        listen {lb}:{NGINX_WEBSOCKET_PORT} ssl reuseport backlog=4096;
        location / {{
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
        }}
    }}
"#
    )
}

/// The gateway's response cache lookups by result (`lb_gateway_cache_lookups_total`).
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheLookups {
    pub hit: u64,
    pub miss: u64,
    pub coalesced: u64,
}

impl CacheLookups {
    fn parse(metrics: &str) -> CacheLookups {
        let lookups = |result: &str| {
            prometheus::sum(metrics, "lb_gateway_cache_lookups_total", |sample| {
                sample.label("result") == Some(result)
            }) as u64
        };
        CacheLookups {
            hit: lookups("hit"),
            miss: lookups("miss"),
            coalesced: lookups("coalesced"),
        }
    }

    pub fn since(&self, earlier: &CacheLookups) -> CacheLookups {
        CacheLookups {
            hit: self.hit.saturating_sub(earlier.hit),
            miss: self.miss.saturating_sub(earlier.miss),
            coalesced: self.coalesced.saturating_sub(earlier.coalesced),
        }
    }
}

impl fmt::Display for CacheLookups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hits {}, misses {}, coalesced {}",
            self.hit, self.miss, self.coalesced
        )
    }
}

/// Resident memory of lb-control and of nginx.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    pub lb_control: ProcessMemory,
    /// The master first, then its workers.
    pub nginx: Vec<ProcessMemory>,
}

impl Memory {
    pub fn nginx_rss_kib(&self) -> u64 {
        self.nginx.iter().map(|process| process.rss_kib).sum()
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RSS lb-control {:.1} MiB, nginx {:.1} MiB",
            self.lb_control.rss_kib as f64 / 1024.0,
            self.nginx_rss_kib() as f64 / 1024.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lookups_parse_prometheus_lines() {
        let lookups = CacheLookups::parse(
            "# HELP lb_gateway_cache_lookups Response cache lookups by result\n\
             lb_gateway_cache_lookups_total{result=\"hit\"} 120\n\
             lb_gateway_cache_lookups_total{result=\"miss\"} 3\n",
        );
        assert_eq!((lookups.hit, lookups.miss, lookups.coalesced), (120, 3, 0));
    }
}
