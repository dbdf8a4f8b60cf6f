// polkadot.js clients that stay with an endpoint while the nodes behind it restart: CLIENTS
// clients (ApiPromise on a WsProvider that reconnects by itself) each follow new heads and call
// system_chain every CALL_MS while connected, until standard input closes (at most MAX_SECONDS).
// Prints one JSON line: how often the clients were disconnected and got back in (with heads
// again after their last reconnect), the calls answered, the error answers (JSON-RPC errors)
// and the calls a disconnect cut off, and when each reconnection happened (`reconnections`:
// wall-clock ms of the disconnect, of being connected again and of the first head after it).
// tests/tests/node_lifecycle.rs runs it through a rollout; `cargo xtask bench ha` through a
// takeover of the floating address.
//
// Usage: node follow-restarts.mjs wss://HOST:PORT/KEY CLIENTS MAX_SECONDS READY_FILE
// READY_FILE is written once every client has started and heard a head, and a line "back" is
// added to it once every client has reconnected and heard a head on its new connection.

import { appendFileSync, writeFileSync } from 'node:fs';
import { ApiPromise, WsProvider } from '@polkadot/api';

const [url, clientsArg, maxSecondsArg, readyFile] = process.argv.slice(2);
const CLIENTS = Number(clientsArg);
const MAX_SECONDS = Number(maxSecondsArg);
const CALL_MS = 500;
// How soon WsProvider reconnects after a close (its default is 2.5 s).
const RECONNECT_MS = 250;

const warnings = new Set();
for (const level of ['warn', 'error']) {
  // Without the timestamp, so a warning every client prints is listed once.
  console[level] = (...args) => warnings.add(args.map(String).join(' ').replace(/^\S+ \S+\s+/, ''));
}

function fail(message) {
  process.stdout.write(JSON.stringify({ error: message, warnings: [...warnings] }) + '\n');
  process.exit(1);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let stopping = false;
process.stdin.on('end', () => { stopping = true; });
process.stdin.resume();
setTimeout(() => { stopping = true; }, MAX_SECONDS * 1000).unref();

// What a failed call met: a disconnect (the provider rejects what is in flight when the socket
// closes) or an error answer from the other end.
function isDisconnect(error) {
  return /disconnected|not connected|websocket/i.test(String(error?.message ?? error));
}

let following = 0;
let back = 0;
const reconnections = [];

async function runClient(totals) {
  const provider = new WsProvider(url, RECONNECT_MS);
  const api = await ApiPromise.create({ provider, throwOnConnect: true });
  const client = { disconnects: 0, reconnects: 0, heads: 0, headsSinceReconnect: 0 };
  // The reconnection under way: when the connection dropped (each failed attempt to reconnect
  // emits 'disconnected' again), then when it was back.
  let reconnection = null;
  provider.on('disconnected', () => {
    client.disconnects += 1;
    if (!reconnection || reconnection.up) {
      reconnection = { down: Date.now(), up: null, head: null };
    }
  });
  provider.on('connected', () => {
    if (client.disconnects > client.reconnects) {
      client.reconnects += 1;
      client.headsSinceReconnect = 0;
    }
    if (reconnection) {
      reconnection.up = Date.now();
      reconnections.push(reconnection);
    }
  });
  const unsubscribe = await api.rpc.chain.subscribeNewHeads(() => {
    client.heads += 1;
    client.headsSinceReconnect += 1;
    if (reconnection?.up) {
      reconnection.head = Date.now();
      reconnection = null;
      if (client.reconnects === 1 && ++back === CLIENTS) {
        appendFileSync(readyFile, 'back\n');
      }
    }
    if (client.heads === 1 && ++following === CLIENTS) {
      writeFileSync(readyFile, `${CLIENTS} clients following heads\n`);
    }
  });
  while (!stopping) {
    if (provider.isConnected) {
      try {
        await api.rpc.system.chain();
        totals.answered += 1;
      } catch (error) {
        const text = String(error?.message ?? error);
        if (isDisconnect(error)) {
          totals.cutOff += 1;
          totals.firstCutOff ??= text;
        } else {
          totals.errorAnswers += 1;
          totals.firstErrorAnswer ??= text;
        }
      }
    }
    await sleep(CALL_MS);
  }
  unsubscribe();
  await api.disconnect();
  return client;
}

async function main() {
  const totals = { answered: 0, errorAnswers: 0, cutOff: 0, firstErrorAnswer: null, firstCutOff: null };
  const clients = await Promise.all(Array.from({ length: CLIENTS }, () => runClient(totals)));
  const summary = {
    clients: clients.length,
    reconnected: clients.filter((client) => client.reconnects > 0).length,
    reconnects: clients.reduce((sum, client) => sum + client.reconnects, 0),
    // Got back in: heads again after its last reconnect (the subscription was made anew).
    followingAfterReconnect: clients.filter((client) => client.reconnects > 0 && client.headsSinceReconnect > 0).length,
    heads: clients.reduce((sum, client) => sum + client.heads, 0),
    reconnections,
    ...totals,
    warnings: [...warnings],
  };
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exit(0);
}

// A failed WebSocket connection rejects with an event object, which has a message but no stack.
main().catch((error) => fail(String(error?.stack ?? error?.message ?? error)));
