//! The `asr` binary: `features` writes [windows, n_mels, 3000] float32 .npy files, and asking a
//! running feature service (`--remote`) gives the same bytes as computing locally.

use std::path::Path;
use std::process::Command;

use e2e_support::{assets, corpus_clips, read_npy, start_feature_service, wav_i16};
use feature_service::FeatureServiceConfig;

fn asr_features(file: &Path, out: &Path, extra: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_asr"))
        .arg("features")
        .arg(file)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("running asr");
    assert!(
        output.status.success(),
        "asr features failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_locally_and_remotely_give_the_same_bytes() {
    let server = start_feature_service(FeatureServiceConfig::default()).await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let long = dir.path().join("long.wav");
    let speech: Vec<f32> = corpus_clips("test", 15).concat();
    std::fs::write(&long, wav_i16(&speech[..31 * 16_000], 16_000, 1)).expect("write");
    let cases = [
        (
            assets().join("aishell/BAC009S0764W0121.wav"),
            "80",
            vec![1, 80, 3000],
        ),
        (long, "128", vec![2, 128, 3000]),
    ];
    for (i, (file, n_mels, shape)) in cases.into_iter().enumerate() {
        let local = dir.path().join(format!("local{i}.npy"));
        let remote = dir.path().join(format!("remote{i}.npy"));
        let (file2, local2, remote2, url2) =
            (file.clone(), local.clone(), remote.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            asr_features(&file2, &local2, &["--n-mels", n_mels]);
            asr_features(
                &file2,
                &remote2,
                &[
                    "--n-mels",
                    n_mels,
                    "--remote",
                    &url2,
                    "--chunk-bytes",
                    "1000",
                ],
            );
        })
        .await
        .expect("asr runs");
        let (got_shape, values) = read_npy(&local);
        assert_eq!(got_shape, shape, "{}", file.display());
        assert!(
            values
                .iter()
                .all(|v| v.is_finite() && (-1.5..=3.0).contains(v)),
            "normalised range"
        );
        assert_eq!(
            std::fs::read(&local).expect("local"),
            std::fs::read(&remote).expect("remote"),
            "local and remote bytes differ"
        );
    }
    server.stop().await;
}

/// `asr train --dry-run` builds whisper-large-v2 from its config alone and prints PEFT's
/// trainable-parameter line for the recipe's adapter.
#[test]
fn train_dry_run_prints_pefts_count_for_large_v2() {
    let config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/configs/whisper-large-v2.json");
    let output = Command::new(env!("CARGO_BIN_EXE_asr"))
        .args(["train", "--dry-run", "--model-config"])
        .arg(&config)
        .output()
        .expect("running asr train");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "asr train failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(
            "trainable params: 1,966,080 || all params: 1,545,271,040 || trainable%: 0.1272"
        ),
        "unexpected output: {stdout}"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_asr"))
        .args([
            "train",
            "--dry-run",
            "--target-modules",
            "nothing_here",
            "--model-config",
        ])
        .arg(&config)
        .output()
        .expect("running asr train");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("match no linear layer"));
}
