// Connects polkadot-api (papi) to a sim-node and prints one JSON line summarising what the client
// saw; tests/tests/papi.rs runs it and asserts on the summary.
//
// papi picks the new JSON-RPC spec when the node lists it in `rpc_methods`: the chain spec comes
// from chainSpec_v1_*, blocks from a chainHead_v1_follow subscription, the runtime metadata from
// chainHead_v1_call Metadata_metadata_at_version, storage from chainHead_v1_storage.
//
// Usage: node --experimental-websocket papi-check.mjs ws://127.0.0.1:PORT
// (Node 20 has WebSocket only behind that flag; papi's WebSocket provider uses the global one.)

import { createClient } from 'polkadot-api';
import { getWsProvider } from 'polkadot-api/ws';

const url = process.argv[2];
const TIMEOUT_MS = 45_000;
const BEST_BLOCKS_WANTED = 3;

// Problems papi has with what a node serves show as console warnings or errors; collect them so
// the test can insist there are none.
const warnings = [];
for (const level of ['warn', 'error']) {
  console[level] = (...args) => warnings.push(args.map(String).join(' '));
}

function fail(message) {
  process.stdout.write(JSON.stringify({ error: message, warnings }) + '\n');
  process.exit(1);
}

setTimeout(() => fail(`timed out after ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

const block = ({ hash, number, parent }) => ({ hash, number, parent });

// The first `wanted` distinct best blocks papi reports, in order.
function followBestBlocks(client, wanted) {
  return new Promise((resolve, reject) => {
    const seen = [];
    const subscription = client.bestBlocks$.subscribe({
      next: (blocks) => {
        const best = blocks[0];
        if (seen.length > 0 && seen[seen.length - 1].hash === best.hash) return;
        seen.push(block(best));
        if (seen.length === wanted) {
          subscription?.unsubscribe();
          resolve(seen);
        }
      },
      error: reject,
    });
    if (seen.length === wanted) subscription.unsubscribe();
  });
}

async function main() {
  const client = createClient(getWsProvider(url));

  const chainSpec = await client.getChainSpecData();
  const finalized = await client.getFinalizedBlock();
  // papi unpins a finalized block once a newer one is finalized and nothing uses it; held, the
  // query below stays on chainHead_v1_storage instead of papi's archive fallback.
  const release = client.hodlBlock(finalized.hash);
  const api = client.getUnsafeApi();
  // Typed storage and constants need the decoded metadata: both prove papi read it.
  const systemNumber = await api.query.System.Number.getValue({ at: finalized.hash });
  release();
  const version = await api.constants.System.Version();
  const bestBlocks = await followBestBlocks(client, BEST_BLOCKS_WANTED);

  const summary = {
    chainName: chainSpec.name,
    genesisHash: chainSpec.genesisHash,
    properties: chainSpec.properties,
    finalized: block(finalized),
    systemNumber,
    specName: version.spec_name,
    specVersion: version.spec_version,
    bestBlocks,
    warnings,
  };
  client.destroy();
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exit(0);
}

main().catch((error) => fail(String(error?.stack ?? error?.message ?? error)));
