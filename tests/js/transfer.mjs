// Sends a signed balance transfer from //Alice to //Bob with @polkadot/api, follows it until
// it is in a block, and prints one JSON line summarising what the client saw;
// tests/tests/real_clients.rs runs it against chopsticks (a real runtime), straight and through
// the gateway, and asserts on the summary. //Alice must hold funds already.
//
// Usage: node transfer.mjs ws[s]://HOST:PORT[/KEY] AMOUNT

import { ApiPromise, Keyring, WsProvider } from '@polkadot/api';

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

async function freeBalance(api, address) {
  const account = await api.query.system.account(address);
  return account.data.free.toBigInt();
}

// Signs and submits the transfer, following its status until InBlock; resolves with the
// statuses seen and the block. Watches the raw status stream: `signAndSend` fetches a block's
// events before it reports InBlock and drops that report when Finalized comes first, which
// chopsticks makes likely (it finalizes 100 ms after the block).
async function transferUntilInBlock(api, from, to, amount) {
  const transfer = await api.tx.balances.transferKeepAlive(to, amount).signAsync(from);
  const statuses = [];
  let unsubscribe;
  const blockHash = await new Promise((resolve, reject) => {
    api.rpc.author
      .submitAndWatchExtrinsic(transfer, (status) => {
        statuses.push(status.type);
        step = `following the transfer: ${statuses.join(' → ')}`;
        if (status.isInBlock) {
          resolve(status.asInBlock.toHex());
        } else if (status.isInvalid || status.isDropped || status.isUsurped) {
          reject(new Error(`transaction ${status.type}`));
        }
      })
      .then((stop) => (unsubscribe = stop), reject);
  });
  unsubscribe();
  return { statuses, blockHash, hash: transfer.hash.toHex() };
}

async function main() {
  // No automatic reconnect: a broken connection must fail the check, not retry forever.
  const provider = new WsProvider(url, false);
  await provider.connect();
  step = 'ApiPromise.create';
  const api = await ApiPromise.create({ provider, throwOnConnect: true });
  const keyring = new Keyring({ type: 'sr25519', ss58Format: api.registry.chainSS58 });
  const alice = keyring.addFromUri('//Alice');
  const bob = keyring.addFromUri('//Bob');
  const amount = BigInt(amountText);

  step = 'reading balances';
  const before = { alice: await freeBalance(api, alice.address), bob: await freeBalance(api, bob.address) };
  step = 'submitting the transfer and waiting for InBlock';
  const inBlock = await transferUntilInBlock(api, alice, bob.address, amount);
  step = 'reading the block that holds the transfer';
  const block = await api.rpc.chain.getBlock(inBlock.blockHash);
  const index = block.block.extrinsics.findIndex((x) => x.hash.toHex() === inBlock.hash);
  // Balances and events as of that block, not whatever head the node has now.
  const at = await api.at(inBlock.blockHash);
  const events = (await at.query.system.events())
    .filter(({ phase }) => phase.isApplyExtrinsic && phase.asApplyExtrinsic.toNumber() === index)
    .map(({ event }) => `${event.section}.${event.method}`);
  const after = {
    alice: (await at.query.system.account(alice.address)).data.free.toBigInt(),
    bob: (await at.query.system.account(bob.address)).data.free.toBigInt(),
  };

  const summary = {
    specName: api.runtimeVersion.specName.toString(),
    chain: (await api.rpc.system.chain()).toString(),
    ...inBlock,
    events,
    blockNumber: block.block.header.number.toNumber(),
    blockExtrinsics: block.block.extrinsics.map((x) => `${x.method.section}.${x.method.method}`),
    amount: amount.toString(),
    before: { alice: before.alice.toString(), bob: before.bob.toString() },
    after: { alice: after.alice.toString(), bob: after.bob.toString() },
    warnings,
  };
  await api.disconnect();
  process.stdout.write(JSON.stringify(summary) + '\n');
  process.exit(0);
}

// A failed WebSocket connection rejects with an event object, which has a message but no stack.
main().catch((error) => fail(String(error?.stack ?? error?.message ?? error)));
