// Validates an OpenAPI document read from standard input against the OpenAPI JSON schema of
// its version (unresolvable $refs fail too). Prints the verdict as JSON; exits 1 when the
// document is not valid. Driven by lb-control/tests/admin_api.rs.
import { Validator } from "@seriousme/openapi-schema-validator";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const document = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const validator = new Validator();
const result = await validator.validate(document);
console.log(JSON.stringify({ ...result, version: validator.version }, null, 2));
process.exit(result.valid ? 0 : 1);
