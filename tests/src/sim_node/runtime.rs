//! The runtime sim-node pretends to run: the real Substrate `node` runtime's version and
//! metadata (fixtures from `@polkadot/types-support` 16.5.6, see `tests/fixtures/metadata`),
//! and the runtime API calls that `state_call` answers from them.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::primitives::prefixed_hex;
use super::scale::{decode_u32, encode_bytes, encode_compact, encode_u32_vec};

/// Raw `state_getMetadata` output: the `meta` magic followed by metadata V14.
const METADATA_V14: &[u8] = include_bytes!("../../fixtures/metadata/substrate-v14.scale");
/// `Metadata_metadata_at_version(15)` output: `Option<OpaqueMetadata>`, already wrapped.
const METADATA_AT_V15: &[u8] = include_bytes!("../../fixtures/metadata/substrate-v15.scale");
/// `Metadata_metadata_at_version(16)` output: `Option<OpaqueMetadata>`, already wrapped.
const METADATA_AT_V16: &[u8] = include_bytes!("../../fixtures/metadata/substrate-v16.scale");
/// `state_getRuntimeVersion` output of the same runtime.
const RUNTIME_VERSION_JSON: &str =
    include_str!("../../fixtures/metadata/substrate-runtime-version.json");

/// The metadata versions the runtime can return, as `Metadata_metadata_versions` lists them.
pub const METADATA_VERSIONS: [u32; 3] = [14, 15, 16];

/// Why a runtime call failed; the RPC layer turns this into the node's error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuntimeCallError {
    #[error("Exported method {0} is not found")]
    UnknownFunction(String),
    #[error("Bad input data provided to {function}: {reason}")]
    BadInput {
        function: &'static str,
        reason: &'static str,
    },
}

/// The runtime version as the new JSON-RPC API reports it (`finalizedBlockRuntime.spec`,
/// `ChainHeadRuntimeVersion` in `sc-rpc-spec-v2`): `apis` is an object keyed by the hex API id,
/// sorted, and the fields the spec leaves out (`authoringVersion`, `systemVersion`) are absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    pub spec_name: String,
    pub impl_name: String,
    pub spec_version: u32,
    pub impl_version: u32,
    pub apis: BTreeMap<String, u32>,
    pub transaction_version: u32,
}

/// The runtime version, parsed once from the fixture.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Served verbatim, so field order and formatting are the real node's.
    version_json: Box<RawValue>,
    version: RuntimeVersion,
    /// `version.apis` with the ids decoded.
    apis: Vec<([u8; 8], u32)>,
    /// `state_getMetadata` result, hex-encoded on first use (1.2 MB; shared, not copied).
    metadata_v14_hex: OnceLock<Arc<str>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeVersion {
    spec_name: String,
    impl_name: String,
    authoring_version: u32,
    spec_version: u32,
    impl_version: u32,
    apis: Vec<(String, u32)>,
    transaction_version: u32,
    system_version: u8,
}

/// The fixture is compiled in, so it failing to parse is a build defect, not a run-time input.
#[derive(Debug, thiserror::Error)]
#[error("embedded runtime version fixture is invalid: {0}")]
pub struct RuntimeFixtureError(String);

impl Runtime {
    pub fn load() -> Result<Self, RuntimeFixtureError> {
        let version_json = RawValue::from_string(RUNTIME_VERSION_JSON.trim().to_owned())
            .map_err(|err| RuntimeFixtureError(err.to_string()))?;
        let version: RuntimeVersion = serde_json::from_str(version_json.get())
            .map_err(|err| RuntimeFixtureError(err.to_string()))?;
        let apis = version
            .apis
            .iter()
            .map(|(api_id, api_version)| {
                decode_api_id(api_id)
                    .map(|id| (id, *api_version))
                    .ok_or_else(|| {
                        RuntimeFixtureError(format!("api id {api_id} is not 8 bytes of hex"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            version_json,
            version,
            apis,
            metadata_v14_hex: OnceLock::new(),
        })
    }

    /// `state_getRuntimeVersion` result, exactly as the real node printed it.
    pub fn version_json(&self) -> &RawValue {
        &self.version_json
    }

    /// The runtime version in the new API's form.
    pub fn chain_head_spec(&self) -> RuntimeSpec {
        let v = &self.version;
        RuntimeSpec {
            spec_name: v.spec_name.clone(),
            impl_name: v.impl_name.clone(),
            spec_version: v.spec_version,
            impl_version: v.impl_version,
            apis: self
                .apis
                .iter()
                .map(|(id, version)| (prefixed_hex(id), *version))
                .collect(),
            transaction_version: v.transaction_version,
        }
    }

    /// The runtime code under `:code`: a stand-in, since the real `node` runtime's WebAssembly is
    /// not among the fixtures. It is a valid WebAssembly module with no code and the one custom
    /// section a real runtime carries for nodes to read its version without running it,
    /// `runtime_version`, holding the same SCALE `RuntimeVersion` as `Core_version` returns.
    /// Clients hash it to tell runtimes apart (polkadot-api keys its metadata by it); nothing
    /// can execute it.
    pub fn code(&self) -> Vec<u8> {
        const WASM_HEADER: [u8; 8] = *b"\0asm\x01\0\0\0";
        const CUSTOM_SECTION: u8 = 0;
        const NAME: &[u8] = b"runtime_version";
        let version = self.encode_version();
        let mut section = Vec::with_capacity(NAME.len() + version.len() + 2);
        encode_leb128(NAME.len(), &mut section);
        section.extend_from_slice(NAME);
        section.extend_from_slice(&version);
        let mut code = WASM_HEADER.to_vec();
        code.push(CUSTOM_SECTION);
        encode_leb128(section.len(), &mut code);
        code.extend_from_slice(&section);
        code
    }

    /// `state_getMetadata` result as the RPC returns it: `0x`-prefixed hex.
    pub fn metadata_v14_hex(&self) -> Arc<str> {
        self.metadata_v14_hex
            .get_or_init(|| prefixed_hex(METADATA_V14).into())
            .clone()
    }

    /// Executes runtime API `function` with SCALE-encoded `input`, as `state_call` does.
    pub fn call(&self, function: &str, input: &[u8]) -> Result<Vec<u8>, RuntimeCallError> {
        match function {
            "Core_version" => Ok(self.encode_version()),
            "Metadata_metadata" => {
                let mut out = Vec::with_capacity(METADATA_V14.len() + 5);
                encode_bytes(METADATA_V14, &mut out);
                Ok(out)
            }
            "Metadata_metadata_versions" => Ok(encode_u32_vec(&METADATA_VERSIONS)),
            "Metadata_metadata_at_version" => {
                let version = decode_u32(input).ok_or(RuntimeCallError::BadInput {
                    function: "metadata_at_version",
                    reason: "Could not decode `version`",
                })?;
                Ok(metadata_at_version(version))
            }
            other => Err(RuntimeCallError::UnknownFunction(other.to_owned())),
        }
    }

    /// SCALE `RuntimeVersion` as `Core_version` returns it. The runtime's Core API is at
    /// version 5, whose struct ends with `system_version: u8`.
    fn encode_version(&self) -> Vec<u8> {
        let v = &self.version;
        let mut out = Vec::with_capacity(64 + 12 * self.apis.len());
        encode_bytes(v.spec_name.as_bytes(), &mut out);
        encode_bytes(v.impl_name.as_bytes(), &mut out);
        out.extend_from_slice(&v.authoring_version.to_le_bytes());
        out.extend_from_slice(&v.spec_version.to_le_bytes());
        out.extend_from_slice(&v.impl_version.to_le_bytes());
        encode_compact(self.apis.len() as u64, &mut out);
        for (api_id, api_version) in &self.apis {
            out.extend_from_slice(api_id);
            out.extend_from_slice(&api_version.to_le_bytes());
        }
        out.extend_from_slice(&v.transaction_version.to_le_bytes());
        out.push(v.system_version);
        out
    }
}

/// `Option<OpaqueMetadata>`: `0x00` for a version the runtime does not have.
fn metadata_at_version(version: u32) -> Vec<u8> {
    match version {
        14 => {
            let mut out = Vec::with_capacity(METADATA_V14.len() + 6);
            out.push(1);
            encode_bytes(METADATA_V14, &mut out);
            out
        }
        15 => METADATA_AT_V15.to_vec(),
        16 => METADATA_AT_V16.to_vec(),
        _ => vec![0],
    }
}

/// Appends `value` as unsigned LEB128, WebAssembly's integer encoding.
fn encode_leb128(mut value: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn decode_api_id(hex_id: &str) -> Option<[u8; 8]> {
    let bytes = hex::decode(hex_id.strip_prefix("0x")?).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Runtime {
        Runtime::load().expect("fixture parses")
    }

    #[test]
    fn core_version_encodes_the_fixture_fields_in_struct_order() {
        let encoded = runtime().call("Core_version", &[]).expect("known function");
        // spec_name "node": compact length 4 (0x10) + bytes.
        assert_eq!(&encoded[..5], b"\x10node");
        // impl_name "substrate-node": compact length 14 (0x38) + bytes.
        assert_eq!(&encoded[5..20], b"\x38substrate-node");
        let numbers = &encoded[20..32];
        assert_eq!(numbers[..4], 10u32.to_le_bytes(), "authoring_version");
        assert_eq!(numbers[4..8], 268u32.to_le_bytes(), "spec_version");
        assert_eq!(numbers[8..12], 0u32.to_le_bytes(), "impl_version");
        // 26 apis: compact 26 (0x68), then 12 bytes each; Core (0xdf6acb689907609b) v5 first.
        assert_eq!(encoded[32], 26 << 2);
        assert_eq!(
            encoded[33..41],
            [0xdf, 0x6a, 0xcb, 0x68, 0x99, 0x07, 0x60, 0x9b]
        );
        assert_eq!(encoded[41..45], 5u32.to_le_bytes());
        let tail = &encoded[33 + 26 * 12..];
        assert_eq!(
            tail,
            [2, 0, 0, 0, 1],
            "transaction_version 2, system_version 1"
        );
    }

    #[test]
    fn code_is_a_wasm_module_whose_runtime_version_section_is_core_version() {
        let runtime = runtime();
        let code = runtime.code();
        assert_eq!(&code[..8], b"\0asm\x01\0\0\0");
        assert_eq!(code[8], 0, "custom section");
        let version = runtime.call("Core_version", &[]).expect("known function");
        let name_at = code
            .windows(15)
            .position(|w| w == b"runtime_version")
            .expect("name");
        assert_eq!(&code[name_at + 15..], version.as_slice());
        let mut size = Vec::new();
        encode_leb128(code.len() - name_at + 1, &mut size);
        assert_eq!(
            &code[9..name_at - 1],
            size.as_slice(),
            "section size covers name and version"
        );
    }

    #[test]
    fn leb128_splits_into_seven_bit_groups() {
        let leb = |value| {
            let mut out = Vec::new();
            encode_leb128(value, &mut out);
            out
        };
        assert_eq!(leb(0), [0]);
        assert_eq!(leb(127), [127]);
        assert_eq!(leb(128), [0x80, 1]);
        assert_eq!(leb(624_485), [0xe5, 0x8e, 0x26]);
    }

    #[test]
    fn chain_head_spec_keys_apis_by_hex_id() {
        let spec = serde_json::to_value(runtime().chain_head_spec()).expect("serializes");
        assert_eq!(spec["specName"], "node");
        assert_eq!(spec["implName"], "substrate-node");
        assert_eq!(spec["specVersion"], 268);
        assert_eq!(spec["transactionVersion"], 2);
        assert_eq!(spec["apis"]["0xdf6acb689907609b"], 5, "Core");
        assert_eq!(spec["apis"].as_object().map(|apis| apis.len()), Some(26));
        assert!(spec.get("authoringVersion").is_none());
    }

    #[test]
    fn metadata_versions_lists_14_15_16() {
        assert_eq!(
            runtime()
                .call("Metadata_metadata_versions", &[])
                .expect("known function"),
            [0x0c, 14, 0, 0, 0, 15, 0, 0, 0, 16, 0, 0, 0]
        );
    }

    #[test]
    fn metadata_at_version_wraps_metadata_in_some_and_answers_none_for_unknown_versions() {
        let runtime = runtime();
        for version in METADATA_VERSIONS {
            let blob = runtime
                .call("Metadata_metadata_at_version", &version.to_le_bytes())
                .expect("known function");
            assert_eq!(blob[0], 1, "v{version} is Some");
            // After the Option tag and the compact length: the `meta` magic and the version.
            let magic_at = blob.windows(4).position(|w| w == b"meta").expect("magic");
            assert!(
                magic_at <= 5,
                "v{version}: magic right after the length prefix"
            );
            assert_eq!(blob[magic_at + 4], version as u8);
        }
        assert_eq!(
            runtime.call("Metadata_metadata_at_version", &17u32.to_le_bytes()),
            Ok(vec![0])
        );
        assert!(matches!(
            runtime.call("Metadata_metadata_at_version", &[1]),
            Err(RuntimeCallError::BadInput { .. })
        ));
    }

    #[test]
    fn metadata_call_is_state_get_metadata_with_a_length_prefix() {
        let runtime = runtime();
        let blob = runtime
            .call("Metadata_metadata", &[])
            .expect("known function");
        let v14 = METADATA_V14;
        assert_eq!(&v14[..5], b"meta\x0e");
        assert_eq!(&blob[blob.len() - v14.len()..], v14);
        let mut prefix = Vec::new();
        encode_compact(v14.len() as u64, &mut prefix);
        assert_eq!(&blob[..prefix.len()], prefix.as_slice());
    }

    #[test]
    fn unknown_runtime_function_is_refused_by_name() {
        assert_eq!(
            runtime().call("Foo_bar", &[]),
            Err(RuntimeCallError::UnknownFunction("Foo_bar".into()))
        );
    }
}
