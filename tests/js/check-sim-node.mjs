// Connects @polkadot/api to a sim-node and prints one JSON line summarising what the client
// saw; tests/tests/polkadot_js.rs runs it and asserts on the summary.
//
// Usage: node check-sim-node.mjs ws://127.0.0.1:PORT

import { ApiPromise, WsProvider } from '@polkadot/api';

const url = process.argv[2];
const TIMEOUT_MS = 30_000;
const HEADS_WANTED = 3;

// polkadot.js reports problems with what a node serves through console warnings; collect them
// so the test can insist there are none.
const warnings = [];
for (const level of ['warn', 'error']) {
  console[level] = (...args) => warnings.push(args.map(String).join(' '));
}

function fail(message) {
  process.stdout.write(JSON.stringify({ error: message, warnings }) + '\n');
  process.exit(1);
}

setTimeout(() => fail(`timed out after ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

async function main() {
  // No automatic reconnect: a connection failure must fail the check, not retry forever.
  const provider = new WsProvider(url, false);
  await provider.connect();
  const api = await ApiPromise.create({ provider, throwOnConnect: true });

  const header = await api.rpc.chain.getHeader();
  const block = await api.rpc.chain.getBlock(header.hash);
  const systemNumber = await api.query.system.number();
  const timestampNow = await api.query.timestamp.now();

  const heads = await new Promise((resolve) => {
    const numbers = [];
    const unsubscribe = api.rpc.chain.subscribeNewHeads((head) => {
      numbers.push(head.number.toNumber());
      if (numbers.length === HEADS_WANTED) {
        unsubscribe.then((stop) => stop());
        resolve(numbers);
      }
    });
  });

  const summary = {
    specName: api.runtimeVersion.specName.toString(),
    specVersion: api.runtimeVersion.specVersion.toNumber(),
    transactionVersion: api.runtimeVersion.transactionVersion.toNumber(),
    metadataVersion: api.runtimeMetadata.version,
    chain: (await api.rpc.system.chain()).toString(),
    genesisHash: api.genesisHash.toHex(),
    header: { number: header.number.toNumber(), hash: header.hash.toHex() },
    blockExtrinsics: block.block.extrinsics.map((x) => `${x.method.section}.${x.method.method}`),
    systemNumber: systemNumber.toNumber(),
    timestampNow: timestampNow.toNumber(),
    heads,
    warnings,
  };
  await api.disconnect();
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exit(0);
}

// A failed WebSocket connection rejects with an event object, which has a message but no stack.
main().catch((error) => fail(String(error?.stack ?? error?.message ?? error)));
