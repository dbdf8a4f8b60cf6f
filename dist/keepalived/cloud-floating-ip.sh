#!/bin/sh
# keepalived's notify_master on a cloud where a floating IP is an API call, not ARP: move the
# provider's floating IP to this server, then tell lb-control it is master. Not tested here
# (the lab has no cloud); adapt the API call to your provider. Example: Hetzner Cloud.
#
#   notify_master "/usr/local/lib/lb-control/cloud-floating-ip.sh"
#
# /etc/lb-control/cloud.env (mode 0600) holds:
#   HCLOUD_TOKEN=…           an API token with write access to the floating IP
#   FLOATING_IP_ID=…         the floating IP's id
#   SERVER_ID=…              this server's id
set -eu
. /etc/lb-control/cloud.env

# Assign the floating IP to this server; retried, since the takeover waits on it.
for attempt in 1 2 3 4 5; do
    if curl -fsS --max-time 5 -X POST \
        -H "Authorization: Bearer ${HCLOUD_TOKEN}" -H 'Content-Type: application/json' \
        -d "{\"server\": ${SERVER_ID}}" \
        "https://api.hetzner.cloud/v1/floating_ips/${FLOATING_IP_ID}/actions/assign" >/dev/null
    then
        break
    fi
    logger -t lb-ha "floating IP assign failed (attempt ${attempt}), retrying"
    sleep 1
done

# The address itself is on this host already: keepalived's virtual_ipaddress (or the
# provider's guest agent) configures it; the gateway is bound to it ahead of time.
exec /usr/bin/lb-control ha notify master --config /etc/lb-control/lb.toml
