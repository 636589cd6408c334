//! The pure URI rules and the local store, end to end on a real folder.

use super::*;

fn parsed(uri: &str) -> (Root, String) {
    let p = parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
    (p.root, p.prefix.to_string())
}

fn refused(uri: &str) -> String {
    parse(uri).expect_err(uri).to_string()
}

#[test]
fn accepted_uris_name_their_store_and_prefix() {
    assert_eq!(parsed("file:///var/lib/flotilla/"), (Root::File, "var/lib/flotilla".into()));
    assert_eq!(parsed("/var/lib//flotilla"), (Root::File, "var/lib/flotilla".into()));
    assert_eq!(
        parsed("s3://my-bucket.1/ckpt/job-3/"),
        (Root::S3 { bucket: "my-bucket.1".into() }, "ckpt/job-3".into())
    );
    assert_eq!(parsed("s3://b12"), (Root::S3 { bucket: "b12".into() }, String::new()));
    let p = parse("s3://b12/a/b").expect("expected success");
    assert_eq!(p.root.uri_of(&p.prefix), "s3://b12/a/b");
    assert_eq!(Root::File.uri_of(&Path::from("tmp/x")), "file:///tmp/x");
}

#[test]
fn refused_uris_say_why_and_what_works() {
    assert!(refused("gs://bucket/x").contains("scheme `gs://` is not supported"), "{}", refused("gs://b/x"));
    assert!(refused("data/train.csv").contains("relative path"));
    assert!(refused("file://relative/x").contains("must be absolute"));
    assert!(refused("s3:///key").contains("names no bucket"));
    assert!(refused("s3://Upper/key").contains("bucket name"));
    assert!(refused("/tmp/../etc").contains("`..`"));
    assert!(refused("s3://b12/a/./b").contains("`..`"));
}

#[test]
fn join_key_in_and_resolve_stay_in_one_store() {
    let root = open("/tmp/flotilla-test-root").expect("expected success");
    let child = root.join("jobs/7/ckpt");
    assert_eq!(child.uri(), "file:///tmp/flotilla-test-root/jobs/7/ckpt");
    assert_eq!(
        root.key_in("file:///tmp/flotilla-test-root/a").expect("expected success").to_string(),
        "tmp/flotilla-test-root/a"
    );
    assert!(root.key_in("s3://bucket/a").is_none());
    let other = root.resolve("/elsewhere/x").expect("expected success");
    assert!(Arc::ptr_eq(other.store(), root.store()), "a file URI reuses the local store");
}

#[test]
fn local_probe_write_read_list_promote_and_delete() {
    let dir = tempfile::tempdir().expect("expected success");
    let uri = format!("{}/store", dir.path().display());
    let location = open(&uri).expect("expected success");
    block_on(async {
        probe(&location, Access::Read).await.expect("an absent local prefix reads as empty");
        probe(&location, Access::Write).await.expect("writable temp dir");
        assert!(
            list(&location, location.prefix()).await.expect("expected success").is_empty(),
            "the probe object is gone"
        );

        let staged = location.key("_staging/part-0");
        let final_key = location.key("out/part-0");
        location.store().put(&staged, PutPayload::from_static(b"rows")).await.expect("expected success");
        promote(&location, &staged, &final_key).await.expect("expected success");
        promote(&location, &staged, &final_key).await.expect("promoting twice is a finished move");
        assert_eq!(get_capped(&location, &final_key, 4).await.expect("expected success").as_ref(), b"rows");
        let too_big = get_capped(&location, &final_key, 3).await.expect_err("expected an error");
        assert!(matches!(too_big, StoreError::TooLarge { size_bytes: 4, .. }), "{too_big}");
        let missing = promote(&location, &location.key("_staging/none"), &location.key("out/none")).await;
        assert!(matches!(missing, Err(StoreError::NotFound { .. })), "{missing:?}");

        assert_eq!(delete_prefix(&location, &location.key("out")).await.expect("expected success"), 1);
        assert_eq!(delete_prefix(&location, &location.key("out")).await.expect("expected success"), 0);
        let gone = get_capped(&location, &final_key, 4).await.expect_err("expected an error");
        assert!(gone.is_not_found(), "{gone}");
    })
    .expect("expected success");
}

#[test]
fn local_probe_names_an_unwritable_folder() {
    let dir = tempfile::tempdir().expect("expected success");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("expected success");
    // A prefix below a regular file can never be created, even by root.
    let location = open(&format!("{}/below", file.display())).expect("expected success");
    let err = block_on(probe(&location, Access::Write)).expect("expected success").expect_err("expected an error");
    let text = err.to_string();
    assert!(text.contains(&format!("file://{}/below cannot be used", file.display())), "{text}");
}

#[test]
fn block_on_refuses_inside_a_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("expected success");
    let inner = runtime.block_on(async { block_on(async { 1 }) });
    assert!(matches!(inner, Err(StoreError::InsideAsyncRuntime)));
}
