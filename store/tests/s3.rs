//! The S3 store against a real S3 API (moto's server, started by scripts/test.sh, address in
//! `FLOTILLA_MOTO_ENDPOINT`): round trips, range reads, promotion, and one clear error for each
//! way a location can be unusable (unknown bucket, missing credentials, unreachable endpoint,
//! http without AWS_ALLOW_HTTP, wrong scheme). No request leaves the loopback interface: the
//! instance-metadata endpoint is pointed at a closed local port.

use flotilla_store::testing::{Relay, Reply, closed_port, create_bucket, env, http_endpoint, moto};
use flotilla_store::{Access, Cause, StoreError, block_on, delete_prefix, get_capped, list, open_with, probe, promote};
use object_store::{ObjectStoreExt, PutPayload};

fn cause_of(result: Result<(), StoreError>) -> (String, Cause) {
    match result {
        Err(e @ StoreError::Unusable { .. }) => {
            let text = e.to_string();
            let StoreError::Unusable { cause, .. } = e else { unreachable!() };
            (text, cause)
        }
        other => panic!("expected an unusable location, got {other:?}"),
    }
}

#[test]
fn s3_round_trip_range_list_promote_delete() {
    let endpoint = moto();
    create_bucket(&endpoint, "flotilla-store-rt");
    let location = open_with("s3://flotilla-store-rt/run-1", env(&endpoint, true)).expect("expected success");
    block_on(async {
        probe(&location, Access::Write).await.expect("writable bucket");
        probe(&location, Access::Read).await.expect("readable bucket");
        let staged = location.key("_staging/part-0");
        let body: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        location.store().put(&staged, PutPayload::from(body.clone())).await.expect("expected success");
        let range = location.store().get_range(&staged, 1000..1010).await.expect("expected success");
        assert_eq!(range.as_ref(), &body[1000..1010]);

        let final_key = location.key("out/part-0");
        promote(&location, &staged, &final_key).await.expect("expected success");
        promote(&location, &staged, &final_key).await.expect("a second leader's promote is a no-op");
        assert_eq!(get_capped(&location, &final_key, 100_000).await.expect("expected success").len(), 100_000);
        let listed: Vec<String> = list(&location, location.prefix())
            .await
            .expect("expected success")
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        assert_eq!(listed, vec!["run-1/out/part-0".to_string()], "staging is empty and the probe object is gone");
        assert_eq!(delete_prefix(&location, location.prefix()).await.expect("expected success"), 1);
        assert!(get_capped(&location, &final_key, 10).await.expect_err("expected an error").is_not_found());
    })
    .expect("expected success");
}

#[test]
fn unknown_bucket_is_named() {
    let location = open_with("s3://flotilla-no-such-bucket/x", env(&moto(), true)).expect("expected success");
    let (text, cause) = cause_of(block_on(probe(&location, Access::Write)).expect("expected success"));
    assert_eq!(cause, Cause::NoBucket, "{text}");
    assert!(text.starts_with("s3://flotilla-no-such-bucket/x cannot be used: the bucket does not exist"), "{text}");
}

#[test]
fn missing_credentials_are_named() {
    let endpoint = moto();
    create_bucket(&endpoint, "flotilla-store-nocreds");
    let location = open_with("s3://flotilla-store-nocreds/x", env(&endpoint, false)).expect("expected success");
    let (text, cause) = cause_of(block_on(probe(&location, Access::Read)).expect("expected success"));
    assert!(matches!(cause, Cause::NoCredentials(_)), "{text}");
    assert!(text.contains("no AWS credentials found: set AWS_ACCESS_KEY_ID"), "{text}");
}

#[test]
fn unreachable_endpoint_is_named_in_seconds() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let location = open_with("s3://flotilla-store/x", env(&endpoint, true)).expect("expected success");
    let (text, cause) = cause_of(block_on(probe(&location, Access::Write)).expect("expected success"));
    assert!(matches!(cause, Cause::Unreachable(_)), "{text}");
    assert!(text.contains("the endpoint is unreachable (check AWS_ENDPOINT_URL"), "{text}");
}

#[test]
fn http_endpoint_without_allow_http_says_how_to_allow_it() {
    let vars: Vec<_> = env(&moto(), true).into_iter().filter(|(k, _)| k != "AWS_ALLOW_HTTP").collect();
    let location = open_with("s3://flotilla-store-rt/x", vars).expect("expected success");
    let err = block_on(probe(&location, Access::Read)).expect("expected success").expect_err("expected an error");
    assert!(err.to_string().contains("AWS_ALLOW_HTTP"), "{err}");
}

#[test]
fn wrong_scheme_is_refused_before_any_request() {
    let err = open_with("gs://bucket/x", env(&moto(), true)).expect_err("expected an error");
    assert_eq!(
        err.to_string(),
        "storage URI `gs://bucket/x` scheme `gs://` is not supported; use file:///absolute/path or s3://bucket/prefix"
    );
}

/// The AWS settings of `env` without keys or a metadata endpoint, plus `extra`.
fn keyless(endpoint: &str, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut vars: Vec<_> = env(endpoint, false).into_iter().filter(|(k, _)| k != "AWS_METADATA_ENDPOINT").collect();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    vars
}

#[test]
fn no_credentials_anywhere_fail_at_open_without_a_request() {
    // An endpoint nothing listens on: a request would fail differently (unreachable).
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let error = open_with("s3://flotilla-store/x", keyless(&endpoint, &[("FLOTILLA_INSTANCE_ROLE", "0".into())]))
        .expect_err("no credentials");
    let text = error.to_string();
    assert!(matches!(error, StoreError::Unusable { cause: Cause::NoCredentials(_), .. }), "{text}");
    assert!(text.starts_with("s3://flotilla-store/x cannot be used: no AWS credentials found"), "{text}");
    assert!(text.contains("FLOTILLA_INSTANCE_ROLE=1"), "{text}");
}

#[test]
fn a_profile_in_the_shared_credentials_file_is_used() {
    let endpoint = moto();
    create_bucket(&endpoint, "flotilla-store-profile");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        "[other]\naws_access_key_id = no\n[ci]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .expect("write");
    let vars = keyless(
        &endpoint,
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", file.display().to_string()),
            ("AWS_PROFILE", "ci".into()),
            ("FLOTILLA_INSTANCE_ROLE", "0".into()),
        ],
    );
    let location = open_with("s3://flotilla-store-profile/x", vars).expect("the profile's keys");
    block_on(probe(&location, Access::Write)).expect("no runtime").expect("writable with the profile's keys");
}

/// A minimal IMDSv2 endpoint with an instance role: a token for a PUT, then the role's name
/// and its credentials for that token. Counts the credential documents it served.
fn instance_role_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    let address = http_endpoint(move |request| {
        let token_ok = request.header("x-aws-ec2-metadata-token") == Some("t0ken");
        match (request.method.as_str(), request.path.as_str()) {
            ("PUT", "/latest/api/token") => Reply::new("200 OK", "t0ken"),
            ("GET", _) if !token_ok => Reply::new("401 Unauthorized", ""),
            ("GET", "/latest/meta-data/iam/security-credentials/") => Reply::new("200 OK", "worker"),
            ("GET", "/latest/meta-data/iam/security-credentials/worker") => {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let document = r#"{"Code":"Success","AccessKeyId":"testing","SecretAccessKey":"testing","Token":"session","Expiration":"2099-01-01T00:00:00Z"}"#;
                Reply::new("200 OK", document)
            }
            _ => Reply::new("404 Not Found", ""),
        }
    });
    (address, served)
}

#[test]
fn the_instance_role_comes_from_the_metadata_endpoint_when_allowed() {
    let endpoint = moto();
    create_bucket(&endpoint, "flotilla-store-role");
    let (metadata, served) = instance_role_endpoint();
    let vars = keyless(&endpoint, &[("FLOTILLA_INSTANCE_ROLE", "1".into()), ("AWS_METADATA_ENDPOINT", metadata)]);
    let location = open_with("s3://flotilla-store-role/x", vars).expect("the instance role");
    block_on(probe(&location, Access::Write)).expect("no runtime").expect("writable with the role's credentials");
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the role's credentials were fetched");
}

/// An S3 endpoint that answers every request with `status` and an S3 error `code` (a store
/// failing on its side), after reading the request's head.
fn failing_endpoint(status: &'static str, code: &'static str) -> String {
    http_endpoint(move |_| Reply::s3_error(status, code))
}

#[test]
fn an_outage_is_told_apart_from_what_waiting_does_not_fix() {
    let endpoint = moto();
    create_bucket(&endpoint, "flotilla-store-outage");
    let relay = Relay::start(&endpoint);
    let location = open_with("s3://flotilla-store-outage/x", env(&relay.endpoint(), true)).expect("opens");
    let key = location.key("part-0");
    let get = |location: &flotilla_store::Location| block_on(get_capped(location, &key, 100)).expect("no runtime");
    block_on(location.store().put(&key, PutPayload::from_static(b"kept"))).expect("no runtime").expect("put");

    // Connections closed by the store's side: an outage, and the object is there once it ends.
    relay.down();
    let error = get(&location).expect_err("the store is down");
    assert!(error.is_outage(), "{error}");
    relay.up();
    assert_eq!(get(&location).expect("the outage ended").as_ref(), b"kept");

    // Server errors and throttling after the client's retries: outages.
    for (status, code) in [("503 Service Unavailable", "SlowDown"), ("500 Internal Server Error", "InternalError")] {
        let failing =
            open_with("s3://flotilla-store-outage/x", env(&failing_endpoint(status, code), true)).expect("opens");
        let error = get(&failing).expect_err("the store fails");
        assert!(error.is_outage(), "{status}: {error}");
    }
    // An endpoint nothing listens on cannot be told from a store that is down: an outage too.
    let closed = open_with("s3://flotilla-store-outage/x", env(&format!("http://127.0.0.1:{}", closed_port()), true));
    let error = get(&closed.expect("opens")).expect_err("nothing listens");
    assert!(error.is_outage(), "{error}");

    // What waiting does not fix: a missing object, a missing bucket, refused credentials.
    let missing = block_on(get_capped(&location, &location.key("no-such-part"), 100)).expect("no runtime");
    assert!(!missing.expect_err("missing").is_outage());
    let no_bucket = open_with("s3://flotilla-no-such-bucket/x", env(&endpoint, true)).expect("opens");
    let error = get(&no_bucket).expect_err("no bucket");
    assert!(!error.is_outage(), "{error}");
    let forbidden =
        open_with("s3://flotilla-store-outage/x", env(&failing_endpoint("403 Forbidden", "AccessDenied"), true));
    let error = get(&forbidden.expect("opens")).expect_err("refused");
    assert!(!error.is_outage(), "{error}");
}
