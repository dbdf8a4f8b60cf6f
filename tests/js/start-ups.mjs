// Many polkadot.js start-ups at one endpoint: CONNECTIONS WebSocket connections (WsProvider)
// opened evenly over SPREAD_MS, each carrying PER_CONNECTION start-ups one after the other.
// Prints one JSON line summarising what the clients got; tests/tests/real_clients.rs runs it
// through the gateway and counts what reached the nodes.
//
// The first start-up on each connection is a real `ApiPromise.create`; the script records
// every request it sends (genesis hash, runtime version, chain, properties, RPC methods,
// metadata, the runtime-version subscription) and the later start-ups on that connection send
// exactly those again, checking each answer against the real start-up's. Decoding the
// metadata costs ~0.4 s of CPU per `ApiPromise.create`, so 1000 real ones would need minutes
// on two cores; what the gateway and the nodes see is the same.
//
// Usage: node start-ups.mjs ws[s]://HOST:PORT[/KEY] CONNECTIONS PER_CONNECTION SPREAD_MS

import { createHash } from 'node:crypto';
import { ApiPromise, WsProvider } from '@polkadot/api';

const [url, ...numbers] = process.argv.slice(2);
const [connections, perConnection, spreadMs] = numbers.map(Number);
const TIMEOUT_MS = spreadMs + 60_000;

const warnings = new Set();
for (const level of ['warn', 'error']) {
  // Without the timestamp, so a warning every client prints is listed once.
  console[level] = (...args) => warnings.add(args.map(String).join(' ').replace(/^\S+ \S+\s+/, ''));
}

function fail(message) {
  process.stdout.write(JSON.stringify({ error: message, warnings: [...warnings] }) + '\n');
  process.exit(1);
}

setTimeout(() => fail(`timed out after ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

function digest(value) {
  return createHash('sha256').update(JSON.stringify(value)).digest('hex');
}

// Runs `ApiPromise.create` on `provider`, recording every request it sends with a digest of
// its answer (subscriptions, which WsProvider sends with a subscription argument: the request,
// not its notifications).
async function createRecording(provider) {
  const calls = [];
  const { send } = provider;
  provider.send = async (method, params, isCacheable, subscription) => {
    const call = { method, params, type: subscription?.type };
    calls.push(call);
    const result = await send.call(provider, method, params, isCacheable, subscription);
    if (!subscription) {
      call.answer = digest(result);
    }
    return result;
  };
  try {
    const api = await ApiPromise.create({ provider, throwOnConnect: true });
    return { api, calls };
  } finally {
    provider.send = send;
  }
}

// Sends `calls` again, in order, as the next start-up on this connection.
async function replay(provider, calls) {
  for (const call of calls) {
    if (call.type) {
      await provider.subscribe(call.type, call.method, call.params, () => {});
      continue;
    }
    const answer = digest(await provider.send(call.method, call.params));
    if (answer !== call.answer) {
      throw new Error(`${call.method} ${JSON.stringify(call.params)}: a different answer than the real start-up got`);
    }
  }
}

async function runConnection(index, totals) {
  await new Promise((resolve) => setTimeout(resolve, (index * spreadMs) / connections));
  // No automatic reconnect: a dropped connection must fail the run, not be papered over.
  const provider = new WsProvider(url, false);
  await provider.connect();
  const { api, calls } = await createRecording(provider);
  totals.learnt.add(
    JSON.stringify({
      genesisHash: api.genesisHash.toHex(),
      specName: api.runtimeVersion.specName.toString(),
      specVersion: api.runtimeVersion.specVersion.toNumber(),
      metadataVersion: api.runtimeMetadata.version,
    }),
  );
  totals.sequences.add(calls.map((call) => call.method).join(' '));
  totals.real += 1;
  for (let i = 1; i < perConnection; i++) {
    await replay(provider, calls);
    totals.replayed += 1;
  }
  await api.disconnect();
}

async function main() {
  const started = Date.now();
  const totals = { real: 0, replayed: 0, learnt: new Set(), sequences: new Set() };
  await Promise.all(Array.from({ length: connections }, (_, index) => runConnection(index, totals)));
  const summary = {
    startUps: totals.real + totals.replayed,
    real: totals.real,
    replayed: totals.replayed,
    learnt: [...totals.learnt].map((text) => JSON.parse(text)),
    requestSequences: [...totals.sequences],
    elapsedMs: Date.now() - started,
    warnings: [...warnings],
  };
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exit(0);
}

// A failed WebSocket connection rejects with an event object, which has a message but no stack.
main().catch((error) => fail(String(error?.stack ?? error?.message ?? error)));
