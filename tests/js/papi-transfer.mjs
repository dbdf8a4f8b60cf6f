// Sends a signed balance transfer from //Alice to //Bob with polkadot-api (papi), follows it
// until it is in a best block, and prints one JSON line summarising what the client saw;
// tests/tests/real_clients.rs runs it against chopsticks (a real runtime), straight and through
// the gateway, and asserts on the summary. //Alice must hold funds already. The papi equivalent
// of transfer.mjs.
//
// papi builds the transaction from the runtime metadata (`getUnsafeApi`: no generated
// descriptors), signs it with papi's own signer (`getPolkadotSigner`) around //Alice's sr25519
// key, submits it with `transaction_v1_broadcast` (or `transactionWatch_v1_submitAndWatch` on a
// node without it) and finds it in the blocks of its chainHead_v1 follow subscription.
//
// Usage: node --experimental-websocket papi-transfer.mjs ws[s]://HOST:PORT[/KEY] AMOUNT
// (Node 20 has WebSocket only behind that flag; papi's WebSocket provider uses the global one.)

import { createClient } from 'polkadot-api';
import { getPolkadotSigner } from 'polkadot-api/signer';
import { getWsProvider } from 'polkadot-api/ws';
// The one sr25519 key derivation already in tests/js (no other package for //Alice's key).
import { Keyring } from '@polkadot/api';

const [url, amountText] = process.argv.slice(2);
const TIMEOUT_MS = 60_000;

const warnings = [];
for (const level of ['warn', 'error']) {
  console[level] = (...args) => warnings.push(args.map(String).join(' '));
}

// What the script was doing, so a failure (a timeout above all) says where it stuck.
let step = 'connecting';

function fail(message) {
  process.stdout.write(JSON.stringify({ error: message, step, warnings }) + '\n');
  process.exit(1);
}

setTimeout(() => fail(`timed out after ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

// //Alice and //Bob as papi signers: papi builds and encodes the transaction, the key only
// signs the bytes papi gives it.
function devAccount(keyring, uri) {
  const pair = keyring.addFromUri(uri);
  return {
    address: pair.address,
    signer: getPolkadotSigner(pair.publicKey, 'Sr25519', (bytes) => pair.sign(bytes)),
  };
}

async function freeBalance(api, address, at) {
  const account = await api.query.System.Account.getValue(address, { at });
  return account.data.free;
}

// Signs and submits the transfer, following papi's events until it reports the transaction in
// a best block; resolves with the event types seen and what papi found there.
function transferUntilInBestBlock(api, from, to, amount) {
  const transfer = api.tx.Balances.transfer_keep_alive({
    dest: { type: 'Id', value: to },
    value: amount,
  });
  const seen = [];
  return new Promise((resolve, reject) => {
    const subscription = transfer.signSubmitAndWatch(from.signer).subscribe({
      next: (event) => {
        seen.push(event.type === 'txBestBlocksState' ? `${event.type}:${event.found}` : event.type);
        step = `following the transfer: ${seen.join(' → ')}`;
        if (event.type === 'txBestBlocksState' && event.found) {
          subscription?.unsubscribe();
          resolve({ statuses: seen, txHash: event.txHash, ok: event.ok, found: event });
        }
      },
      error: reject,
    });
  });
}

async function main() {
  // The methods papi sent, in the order it first sent them: what crossed the gateway.
  const methods = [];
  const provider = getWsProvider(url, {
    logger: (event) => {
      if (event.type !== 'OUT') return;
      const method = JSON.parse(event.msg).method;
      if (method && !methods.includes(method)) methods.push(method);
    },
  });
  const client = createClient(provider);
  step = 'reading the chain spec and metadata';
  const chainSpec = await client.getChainSpecData();
  const api = client.getUnsafeApi();
  const version = await api.constants.System.Version();
  const keyring = new Keyring({ type: 'sr25519', ss58Format: chainSpec.properties.ss58Format });
  const alice = devAccount(keyring, '//Alice');
  const bob = devAccount(keyring, '//Bob');
  const amount = BigInt(amountText);

  step = 'reading balances';
  const head = await client.getFinalizedBlock();
  const release = client.hodlBlock(head.hash);
  const before = {
    alice: await freeBalance(api, alice.address, head.hash),
    bob: await freeBalance(api, bob.address, head.hash),
  };
  release();
  step = 'submitting the transfer and waiting for a best block that holds it';
  const { statuses, txHash, ok, found } = await transferUntilInBestBlock(api, alice, bob.address, amount);
  step = 'reading balances at the block that holds the transfer';
  const at = found.block.hash;
  const after = {
    alice: await freeBalance(api, alice.address, at),
    bob: await freeBalance(api, bob.address, at),
  };

  const summary = {
    specName: version.spec_name,
    chain: chainSpec.name,
    statuses,
    txHash,
    ok,
    block: found.block,
    events: found.events.map((event) => `${event.type}.${event.value.type}`),
    amount: amount.toString(),
    before: { alice: before.alice.toString(), bob: before.bob.toString() },
    after: { alice: after.alice.toString(), bob: after.bob.toString() },
    methods,
    warnings,
  };
  client.destroy();
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exit(0);
}

main().catch((error) => fail(String(error?.stack ?? error?.message ?? error)));
