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

function fail(message) {
  process.stdout.write(JSON.stringify({ error: message, warnings }) + '\n');
  process.exit(1);
}

setTimeout(() => fail(`timed out after ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

async function freeBalance(api, address) {
  const account = await api.query.system.account(address);
  return account.data.free.toBigInt();
}

// Signs and submits the transfer; resolves with every status seen up to InBlock.
function transferUntilInBlock(api, from, to, amount) {
  return new Promise((resolve, reject) => {
    const statuses = [];
    api.tx.balances
      .transferKeepAlive(to, amount)
      .signAndSend(from, ({ status, dispatchError, events }) => {
        statuses.push(status.type);
        if (dispatchError) {
          reject(new Error(`dispatch error: ${dispatchError.toString()}`));
        } else if (status.isInvalid || status.isDropped || status.isUsurped) {
          reject(new Error(`transaction ${status.type}`));
        } else if (status.isInBlock) {
          resolve({
            statuses,
            blockHash: status.asInBlock.toHex(),
            events: events.map(({ event }) => `${event.section}.${event.method}`),
          });
        }
      })
      .then((unsubscribe) => unsubscribe, reject);
  });
}

async function main() {
  // No automatic reconnect: a broken connection must fail the check, not retry forever.
  const provider = new WsProvider(url, false);
  await provider.connect();
  const api = await ApiPromise.create({ provider, throwOnConnect: true });
  const keyring = new Keyring({ type: 'sr25519', ss58Format: api.registry.chainSS58 });
  const alice = keyring.addFromUri('//Alice');
  const bob = keyring.addFromUri('//Bob');
  const amount = BigInt(amountText);

  const before = { alice: await freeBalance(api, alice.address), bob: await freeBalance(api, bob.address) };
  const inBlock = await transferUntilInBlock(api, alice, bob.address, amount);
  // Balances as of the block that holds the transfer, not whatever head the node has now.
  const at = await api.at(inBlock.blockHash);
  const after = {
    alice: (await at.query.system.account(alice.address)).data.free.toBigInt(),
    bob: (await at.query.system.account(bob.address)).data.free.toBigInt(),
  };
  const block = await api.rpc.chain.getBlock(inBlock.blockHash);

  const summary = {
    specName: api.runtimeVersion.specName.toString(),
    chain: (await api.rpc.system.chain()).toString(),
    ...inBlock,
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
