//! The adapter-registry RPCs: ListAdapters, GetAdapter, LoadAdapter, UnloadAdapter,
//! DeleteAdapter, MergeAdapters.

use asr_proto::v1 as pb;
use asr_whisper::lora_combine::Combination;
use tonic::{Request, Response};

use super::{page_size, trim_page, ModelServer, RpcResult};
use crate::engine::Engine;
use crate::error::ModelError;
use crate::registry::validate_name;

/// ListAdapters: one page in name order, with each adapter's `loaded` flag.
pub(super) async fn list_adapters(
    server: &ModelServer,
    request: Request<pb::ListAdaptersRequest>,
) -> RpcResult<pb::ListAdaptersResponse> {
    let request = request.into_inner();
    let page_size = page_size(request.page_size);
    if !request.page_token.is_empty() {
        validate_name(&request.page_token, "page_token")?;
    }
    let loaded = server
        .engine
        .as_ref()
        .map(Engine::loaded_adapters)
        .unwrap_or_default();
    let mut adapters: Vec<pb::AdapterInfo> = server
        .registry
        .list()?
        .into_iter()
        .filter(|a| request.page_token.is_empty() || a.name > request.page_token)
        .map(|a| {
            let mut info = a.info;
            info.loaded = loaded.contains(&a.name);
            info
        })
        .filter(|info| !request.loaded_only || info.loaded)
        .take(page_size + 1)
        .collect();
    let next_page_token = trim_page(&mut adapters, page_size, |a| a.name.clone());
    Ok(Response::new(pb::ListAdaptersResponse {
        adapters,
        next_page_token,
    }))
}

/// GetAdapter.
pub(super) async fn get_adapter(
    server: &ModelServer,
    request: Request<pb::GetAdapterRequest>,
) -> RpcResult<pb::AdapterInfo> {
    Ok(Response::new(
        server.adapter_info(&request.into_inner().name)?,
    ))
}

/// LoadAdapter: from the registry, or imported from `source_dir` first.
pub(super) async fn load_adapter(
    server: &ModelServer,
    request: Request<pb::LoadAdapterRequest>,
) -> RpcResult<pb::AdapterInfo> {
    let request = request.into_inner();
    validate_name(&request.name, "name")?;
    let engine = server.engine()?;
    engine.ready()?;
    let stored = if request.source_dir.is_empty() {
        server.registry.get(&request.name)?
    } else {
        let registry = server.registry.clone();
        let (name, source) = (request.name.clone(), request.source_dir.clone());
        tokio::task::spawn_blocking(move || registry.import(&name, &source))
            .await
            .map_err(ModelError::internal)??
    };
    engine.load_adapter(&stored.name, stored.dir).await?;
    tracing::info!(adapter = %request.name, "adapter loaded");
    Ok(Response::new(server.adapter_info(&request.name)?))
}

/// UnloadAdapter: frees its memory; the registry keeps it.
pub(super) async fn unload_adapter(
    server: &ModelServer,
    request: Request<pb::UnloadAdapterRequest>,
) -> RpcResult<pb::AdapterInfo> {
    let name = request.into_inner().name;
    server.registry.get(&name)?;
    if let Some(engine) = &server.engine {
        engine.unload_adapter(&name).await?;
    }
    Ok(Response::new(server.adapter_info(&name)?))
}

/// DeleteAdapter, refused while a Transcribe stream uses it.
pub(super) async fn delete_adapter(
    server: &ModelServer,
    request: Request<pb::DeleteAdapterRequest>,
) -> RpcResult<pb::DeleteAdapterResponse> {
    let name = request.into_inner().name;
    server.registry.get(&name)?;
    let users = server
        .adapter_users
        .lock()
        .map(|u| u.get(&name).copied().unwrap_or(0))
        .unwrap_or(0);
    if users > 0 {
        return Err(ModelError::FailedPrecondition(format!(
            "adapter {name:?} is used by {users} Transcribe stream(s)"
        ))
        .into());
    }
    if let Some(engine) = &server.engine {
        engine.unload_adapter(&name).await?;
    }
    server.registry.delete(&name)?;
    tracing::info!(adapter = %name, "adapter deleted");
    Ok(Response::new(pb::DeleteAdapterResponse {}))
}

/// MergeAdapters: the weighted combination written to a staging directory, then installed.
pub(super) async fn merge_adapters(
    server: &ModelServer,
    request: Request<pb::MergeAdaptersRequest>,
) -> RpcResult<pb::AdapterInfo> {
    let request = request.into_inner();
    let engine = server.engine()?;
    let (inputs, base_model) = ModelServer::merge_inputs(&server.registry, &request)?;
    let combination = match pb::AdapterCombination::try_from(request.combination) {
        Ok(pb::AdapterCombination::Unspecified | pb::AdapterCombination::Linear) => {
            Combination::Linear
        }
        Ok(pb::AdapterCombination::Cat) => Combination::Cat,
        Err(_) => {
            return Err(ModelError::invalid(
                "combination",
                format!("unknown value {}", request.combination),
            )
            .into())
        }
    };
    let name = &request.output_name;
    let staging = server
        .registry
        .dir_of(&format!(".merge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let merged = engine
        .merge_adapters(inputs, combination, staging.clone(), base_model)
        .await;
    let installed = merged.and_then(|()| server.registry.install(name, &staging, "merged", "", ""));
    let _ = std::fs::remove_dir_all(&staging);
    let stored = installed?;
    if request.load {
        engine.load_adapter(&stored.name, stored.dir).await?;
    }
    tracing::info!(adapter = %name, "adapters merged");
    Ok(Response::new(server.adapter_info(name)?))
}
