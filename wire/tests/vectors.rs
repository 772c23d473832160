//! The shared test vectors (`testdata/vectors.json`), which the TypeScript and Go clients' tests
//! read too: tokens and edge configurations must mean the same in all three languages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use remoteingress_wire::config::PortTargets;
use remoteingress_wire::token::{ConnectionToken, TokenError};
use remoteingress_wire::EdgeConfig;
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cases<'a>(vectors: &'a Value, key: &str) -> &'a Vec<Value> {
    let cases = vectors[key].as_array().unwrap();
    assert!(!cases.is_empty(), "no {key} vectors");
    cases
}

fn token_from(fields: &Value) -> ConnectionToken {
    ConnectionToken {
        hub_host: fields["hubHost"].as_str().unwrap().into(),
        hub_port: u16::try_from(fields["hubPort"].as_u64().unwrap()).unwrap(),
        edge_id: fields["edgeId"].as_str().unwrap().into(),
        secret: fields["secret"].as_str().unwrap().into(),
        pin: fields["pin"].as_str().map(str::to_owned),
        hubs: fields["hubs"]
            .as_array()
            .map(|hubs| {
                hubs.iter()
                    .filter_map(|h| h.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[test]
fn tokens_encode_and_decode_exactly() {
    let vectors = vectors();
    for case in cases(&vectors, "tokens") {
        let expected = token_from(&case["fields"]);
        let token = case["token"].as_str().unwrap();
        assert_eq!(expected.encode(), token, "{}", case["name"]);
        assert_eq!(
            ConnectionToken::decode(token).unwrap(),
            expected,
            "{}",
            case["name"]
        );
    }
    for case in cases(&vectors, "decodeOnly") {
        let decoded = ConnectionToken::decode(case["token"].as_str().unwrap());
        assert_eq!(
            decoded.unwrap(),
            token_from(&case["fields"]),
            "{}",
            case["name"]
        );
    }
}

#[test]
fn invalid_tokens_fail_with_their_kind() {
    let vectors = vectors();
    for case in cases(&vectors, "invalidTokens") {
        let error = ConnectionToken::decode(case["token"].as_str().unwrap())
            .expect_err(case["name"].as_str().unwrap());
        let kind = match error {
            TokenError::TooLong => "tooLong",
            TokenError::Base64(_) => "base64",
            TokenError::Json(_) => "json",
            TokenError::BadPin => "badPin",
        };
        assert_eq!(kind, case["error"], "{}", case["name"]);
    }
}

#[test]
fn edge_configs_validate_as_expected() {
    let vectors = vectors();
    for case in cases(&vectors, "edges") {
        let name = case["name"].as_str().unwrap();
        let config: EdgeConfig = serde_json::from_value(case["edge"].clone()).unwrap();
        let targets: PortTargets = serde_json::from_value(case["edge"].clone()).unwrap();
        let validated = config.validate().and_then(|()| targets.validate());
        match (validated, case["valid"].as_bool().unwrap()) {
            (Ok(()), true) => {}
            (Err(error), false) => {
                let field = case["field"].as_str().unwrap();
                assert!(
                    error
                        .problems
                        .iter()
                        .any(|p| p.starts_with(&format!("{field}: "))),
                    "{name}: {error}"
                );
            }
            (result, _) => panic!("{name}: unexpected {result:?}"),
        }
    }
}
