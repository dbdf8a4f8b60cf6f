//! nginx in a lab namespace, for the benchmarks: the nodes' web server (`bench l4`) and the
//! reference TLS proxy (`bench gateway`). Each instance has its own config, pid file, temp and
//! log directories under the lab's log directory, runs in the foreground under the lab's guard
//! and never closes a keep-alive connection during a run, so keep-alive runs measure requests,
//! not reconnects.

use std::{fmt::Write as _, path::Path};

use anyhow::Context;

use crate::{bench::find_command, lab::Lab};

/// Starts nginx `name` in `netns` with `workers` worker processes and the `http { … }` block's
/// own directives from `http` (given the instance's directory, e.g. for a cache path); returns
/// the master's pid. It does not wait for nginx to listen.
pub fn start(
    lab: &mut Lab,
    name: &str,
    netns: &str,
    workers: usize,
    http: impl FnOnce(&Path) -> String,
) -> anyhow::Result<u32> {
    let nginx = find_command("nginx").context("nginx not found (Debian package nginx)")?;
    let dir = lab.log_dir().join(format!("nginx-{name}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("nginx.conf");
    let text = config_text(&dir, workers, &http(&dir));
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    let error_log = dir.join("error.log");
    let args = [
        "-p".as_ref(),
        dir.as_os_str(),
        "-c".as_ref(),
        config.as_os_str(),
        "-e".as_ref(),
        error_log.as_os_str(),
    ];
    let process = lab.spawn_process(
        &format!("nginx {name}"),
        netns,
        &nginx,
        &args,
        &format!("nginx-{name}"),
    )?;
    Ok(process.pid())
}

fn config_text(dir: &Path, workers: usize, http: &str) -> String {
    let dir = dir.display();
    let mut config = String::new();
    // `daemon off`: the lab holds the master process and stops it with the lab.
    let _ = write!(
        config,
        r#"daemon off;
user root;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
{http}}}
"#
    );
    config
}
