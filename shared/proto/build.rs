//! Compiles `proto/asr/v1/*.proto` with the vendored `protoc`, generating
//! message types plus tonic clients and servers, and writes the file
//! descriptor set used for gRPC reflection.

use std::env;
use std::error::Error;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    // A vendored protoc, so no system installation is needed.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    env::set_var("PROTOC", protoc);

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let v1_dir = proto_root.join("asr/v1");

    let mut protos: Vec<PathBuf> = std::fs::read_dir(&v1_dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    protos.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    protos.sort();
    if protos.is_empty() {
        return Err(format!("no .proto files in {}", v1_dir.display()).into());
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out_dir.join("asr_v1_descriptor.bin"))
        .compile_protos(&protos, std::slice::from_ref(&proto_root))?;

    // Rerun when any file under proto/ is added, removed or edited.
    println!("cargo:rerun-if-changed={}", proto_root.display());
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
