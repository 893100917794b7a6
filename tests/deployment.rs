//! docker-compose.yml as `docker compose config` reads it (Compose v2 from scripts/setup.sh;
//! no Docker engine needed): it validates, and it deploys what the README says (a GPU model
//! service with a data volume, feature-service replicas, the collector, health checks through
//! the binaries' own gRPC probes, start-up ordered on health); the Dockerfile has the targets
//! it builds. A broken copy is refused, so the check can fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e_support::repo_root;

fn compose_binary() -> PathBuf {
    let path = std::env::var_os("ASR_DOCKER_COMPOSE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            Path::new(&home).join(".cache/asr-lora/docker-compose-2.26.1-4/docker-compose")
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh",
        path.display()
    );
    path
}

/// `docker compose -f FILE [--profile cli] config ARGS...`: (success, stdout, stderr).
fn compose_config(file: &Path, extra: &[&str]) -> (bool, String, String) {
    let output = Command::new(compose_binary())
        .current_dir(repo_root())
        .arg("-f")
        .arg(file)
        .args(["--profile", "cli", "config"])
        .args(extra)
        // Defaults in the file apply, not whatever the developer's shell exports.
        .env_remove("ASR_MODELS_DIR")
        .env_remove("ASR_MODEL_NAME")
        .env_remove("ASR_IMAGE_TAG")
        .output()
        .expect("running docker compose");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn compose_file_validates_and_deploys_what_the_readme_says() {
    let file = repo_root().join("docker-compose.yml");
    let (ok, stdout, stderr) = compose_config(&file, &["--format", "json"]);
    assert!(ok, "docker compose config refused the file:\n{stderr}");
    let config: serde_json::Value = serde_json::from_str(&stdout).expect("config as JSON");
    let services = &config["services"];

    let model = &services["model-service"];
    let devices = &model["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(devices["capabilities"][0], "gpu", "{model:#}");
    assert!(
        model["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["type"] == "volume"
                && v["source"] == "model-data"
                && v["target"] == "/data"),
        "{model:#}"
    );
    assert!(config["volumes"]["model-data"].is_object(), "{config:#}");

    let features = &services["feature-service"];
    assert!(
        features["deploy"]["replicas"].as_u64().expect("replicas") >= 2,
        "{features:#}"
    );
    assert_eq!(
        features["depends_on"]["model-service"]["condition"],
        "service_healthy"
    );
    for (name, binary) in [
        ("model-service", "/usr/local/bin/model-service"),
        ("feature-service", "/usr/local/bin/feature-service"),
    ] {
        let test = &services[name]["healthcheck"]["test"];
        assert_eq!(
            test,
            &serde_json::json!(["CMD", binary, "healthcheck"]),
            "{name}"
        );
        assert_eq!(
            services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"],
            "http://otel-collector:4317"
        );
    }
    assert!(services["otel-collector"].is_object());

    // Every build target exists in the Dockerfile, and every bind-mounted config file exists.
    let dockerfile =
        std::fs::read_to_string(repo_root().join("docker/Dockerfile")).expect("docker/Dockerfile");
    for (name, service) in services.as_object().expect("services") {
        if let Some(target) = service["build"]["target"].as_str() {
            assert!(
                dockerfile
                    .lines()
                    .any(|l| l.starts_with("FROM ") && l.ends_with(&format!(" AS {target}"))),
                "{name}: no stage {target} in docker/Dockerfile"
            );
        }
    }
    let collector = services["otel-collector"]["volumes"][0]["source"]
        .as_str()
        .expect("collector config");
    assert!(Path::new(collector).is_file(), "{collector}");
    // The images' HEALTHCHECK runs the same probe.
    for binary in ["feature-service", "model-service"] {
        assert!(
            dockerfile.contains(&format!(
                "CMD [\"/usr/local/bin/{binary}\", \"healthcheck\"]"
            )),
            "no HEALTHCHECK for {binary}"
        );
    }
}

#[test]
fn a_broken_compose_file_is_refused() {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, broken) in [
        (
            "undefined volume",
            text.replace("- model-data:/data", "- model-dat:/data"),
        ),
        (
            "unknown key",
            text.replacen(
                "    restart: unless-stopped",
                "    restart_after: always",
                1,
            ),
        ),
        (
            "dependency on an unknown service",
            text.replacen(
                "      model-service:\n        condition: service_healthy",
                "      model-servic:\n        condition: service_healthy",
                1,
            ),
        ),
    ] {
        assert_ne!(broken, text, "{what}: the edit did not apply");
        // Beside the original, so relative paths resolve the same way.
        let file = dir.path().join("docker-compose.yml");
        std::fs::write(
            &file,
            broken.replace("context: .", &format!("context: {}", repo_root().display())),
        )
        .expect("write");
        let (ok, _, stderr) = compose_config(&file, &["-q"]);
        assert!(!ok, "{what}: accepted");
        println!("{what}: {}", stderr.trim());
    }
}
