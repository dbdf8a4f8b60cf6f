#!/bin/sh
# Sets up a node host behind the lb-control load balancer, as root:
#   - polkadot-rpc.service: the polkadot binary (/usr/local/bin/polkadot) as a public RPC node
#     (safe methods only, RPC on the private address, room for the gateway's connections,
#     Prometheus);
#   - lb-node.service: registers the node with the load balancer once it is ready (join
#     token), and takes it out, drained, when stopped.
#
# Before: install polkadot and lb-control in /usr/local/bin, and put the join token (from
# `lb-control token create --scope join --service VIP:PORT --name NAME` on the load balancer)
# in /etc/lb-node/join.token. Run it from this directory; edit /etc/lb-node/node.env when it
# asks, then run it again.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"

[ "$(id -u)" -eq 0 ] || { echo "install.sh: run it as root" >&2; exit 1; }
for binary in /usr/local/bin/polkadot /usr/local/bin/lb-control; do
    [ -x "$binary" ] || { echo "install.sh: $binary is missing: install it first" >&2; exit 1; }
done
command -v curl >/dev/null || { echo "install.sh: curl is missing (lb-node uses it for readiness)" >&2; exit 1; }

install -d -m 755 /etc/lb-node /usr/local/lib/lb-node
if [ ! -f /etc/lb-node/node.env ]; then
    install -m 644 "$here/node.env.example" /etc/lb-node/node.env
    echo "install.sh: wrote /etc/lb-node/node.env: set this host's values, then run install.sh again"
    exit 1
fi
[ -s /etc/lb-node/join.token ] || {
    echo "install.sh: put the join token in /etc/lb-node/join.token (lb-control token create on the load balancer)" >&2
    exit 1
}
chmod 600 /etc/lb-node/join.token

id polkadot >/dev/null 2>&1 || useradd --system --home-dir /var/lib/polkadot --shell /usr/sbin/nologin polkadot
install -d -o polkadot -g polkadot -m 750 /var/lib/polkadot

install -m 755 "$here/lb-node" /usr/local/lib/lb-node/lb-node
install -m 644 "$here/polkadot-rpc.service" "$here/lb-node.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now polkadot-rpc.service
# Returns once the node is ready and in rotation (it may sync first): see `journalctl -u lb-node`.
systemctl enable --now --no-block lb-node.service
echo "install.sh: polkadot-rpc runs; lb-node joins it once it is ready (journalctl -fu lb-node)"
