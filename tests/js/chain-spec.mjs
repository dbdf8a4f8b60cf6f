// Writes the raw chain spec (genesis state with the runtime wasm) of a chain that
// @substrate/connect-known-chains ships to a file: the lab starts chopsticks offline from it
// (tests/src/lab/chopsticks.rs).
//
// Usage: node chain-spec.mjs CHAIN OUT   (CHAIN: one of the package's exports, e.g.
// rococo_v2_2_asset_hub)

import { writeFileSync } from 'node:fs';

const [chain, out] = process.argv.slice(2);
const { chainSpec } = await import(`@substrate/connect-known-chains/${chain}`);
writeFileSync(out, chainSpec);
