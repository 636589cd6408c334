use super::*;

fn open_dir(dir: &std::path::Path) -> (std::sync::Arc<dyn object_store::ObjectStore>, object_store::path::Path) {
    let location = store::open(dir.to_str().expect("utf-8")).expect("store");
    (location.store().clone(), location.prefix().clone())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime")
}

fn parts() -> Vec<(&'static str, Bytes)> {
    vec![
        ("model", f32_to_bytes(&[1.0, -2.5, 3.25])),
        ("optim", f32_to_bytes(&[0.0; 7])),
        ("meta", Bytes::from_static(b"{\"step\":7}")),
    ]
}

#[test]
fn a_written_checkpoint_reads_back_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, prefix) = open_dir(dir.path());
    let prefix = prefix.join("ckpt").join("7");
    let rt = runtime();
    let written = rt.block_on(write(store.as_ref(), &prefix, &parts())).expect("write");
    assert_eq!(written.total_bytes(), 12 + 28 + 10);
    let (manifest, read_parts) = rt.block_on(read(store.as_ref(), &prefix)).expect("read");
    assert_eq!(manifest, written);
    assert_eq!(bytes_to_f32(&read_parts["model"], "model").expect("f32"), [1.0, -2.5, 3.25]);
    assert!(dir.path().join("ckpt/7/MANIFEST").exists());
}

#[test]
fn partial_truncated_and_corrupted_checkpoints_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, root) = open_dir(dir.path());
    let rt = runtime();
    let prefix = root.clone().join("c");
    rt.block_on(write(store.as_ref(), &prefix, &parts())).expect("write");
    let on_disk = dir.path().join("c");

    // Corrupt one byte of a part: refused, and the part is named.
    let model = on_disk.join("model");
    let mut bytes = std::fs::read(&model).expect("read part");
    bytes[0] ^= 0xff;
    std::fs::write(&model, &bytes).expect("corrupt");
    let err = rt.block_on(read(store.as_ref(), &prefix)).expect_err("corrupt part");
    assert!(err.to_string().contains("`model` does not match its checksum"), "{err}");

    // Truncate it: refused with the sizes.
    std::fs::write(&model, &bytes[..5]).expect("truncate");
    let err = rt.block_on(read(store.as_ref(), &prefix)).expect_err("truncated part");
    assert!(err.to_string().contains("has 5 bytes"), "{err}");

    // Delete the manifest: the checkpoint is partial.
    std::fs::remove_file(on_disk.join(MANIFEST)).expect("remove manifest");
    let err = rt.block_on(read(store.as_ref(), &prefix)).expect_err("no manifest");
    assert!(matches!(err, CheckpointError::Partial { .. }), "{err}");

    // A garbage manifest is corrupt, not a panic.
    std::fs::write(on_disk.join(MANIFEST), b"{not json").expect("garbage");
    assert!(matches!(rt.block_on(read_manifest(store.as_ref(), &prefix)), Err(CheckpointError::Corrupt { .. })));
    assert!(bytes_to_f32(&[1, 2, 3], "model").is_err());
}

#[test]
fn bad_part_names_and_uris_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, root) = open_dir(dir.path());
    let rt = runtime();
    for name in ["", "MANIFEST", "a/b", "x y"] {
        let err = rt.block_on(write(store.as_ref(), &root, &[(name, Bytes::new())])).expect_err(name);
        assert!(matches!(err, CheckpointError::Invalid(_)), "{name}: {err}");
    }
    for uri in ["relative/dir", "file://relative", "gs://bucket/x"] {
        assert!(store::open(uri).is_err(), "{uri}");
    }
}

#[test]
fn f32_parts_are_little_endian_bytes_and_decode_from_any_address() {
    let values = [1.0f32, -0.0, f32::from_bits(0x7fc0_1234), f32::MIN_POSITIVE, -3.0e38, 0.1];
    let expected: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(f32_to_bytes(&values).as_ref(), expected.as_slice());
    assert_eq!(f32s_to_bytes(&[&values[..2], &values[2..]]).as_ref(), expected.as_slice(), "runs concatenate");
    // Bytes at an odd address (inside a larger buffer) decode bit for bit.
    let mut shifted = vec![0u8];
    shifted.extend_from_slice(&expected);
    let back = bytes_to_f32(&shifted[1..], "model").expect("f32");
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back), bits(&values));
}
