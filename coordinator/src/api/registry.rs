//! `RegistryService`: the model registry. Versions are created by the state machine when a job
//! succeeds (`JobFinished` with its artifact); this service lists and resolves them
//! (`NAME`, `NAME@VERSION`, `NAME@ALIAS`), sets aliases through Raft, and streams artifacts
//! from the cluster's store.

use flotilla_core::state::{Applied, Command, Model, ModelVersion as CoreVersion, State};
use flotilla_proto::convert::spec_to_proto;
use flotilla_proto::v1::registry_service_server::RegistryService;
use flotilla_proto::v1::*;
use flotilla_proto::{ApiError, ErrorKind, auth};
use object_store::ObjectStoreExt;
use tonic::{Request, Response, Status};

use super::status;
use crate::raft::node::NodeHandle;

/// Bytes per streamed artifact chunk.
const CHUNK_BYTES: usize = 1 << 20;
/// Longest model reference accepted.
const REFERENCE_LEN_MAX: usize = 256;
pub struct RegistryApi {
    pub node: NodeHandle,
    pub tokens: auth::ApiTokens,
    /// The cluster store: artifacts are served only from inside it.
    pub store: flotilla_store::Location,
}

fn to_proto(model: &Model, v: &CoreVersion) -> ModelVersion {
    ModelVersion {
        name: model.name.clone(),
        version: v.version,
        aliases: model.aliases.iter().filter(|(_, n)| **n == v.version).map(|(a, _)| a.clone()).collect(),
        job_id: v.job_id.to_string(),
        source_checkpoint: v.checkpoint.as_ref().map(flotilla_proto::convert::checkpoint_to_proto),
        dataset_sha256: v.dataset_sha256.clone(),
        spec: Some(spec_to_proto(&v.spec)),
        metrics: v.metrics.map(|m| JobMetrics {
            val_accuracy: m.val_accuracy,
            val_loss: m.val_loss,
            train_loss: m.train_loss,
            samples_per_s: None,
            val_step: m.val_step,
        }),
        preemptions_survived: v.preemptions,
        cost_usd: v.cost_usd,
        artifact_uri: v.artifact_uri.clone(),
        created_at_unix_ms: v.created_at_unix_ms,
        features_per_row: v.shape.features_per_row,
        classes: v.shape.classes,
        feature_scale: v.shape.feature_scale,
    }
}

fn resolve(state: &State, reference: &str) -> Result<ModelVersion, ApiError> {
    state
        .resolve_model(reference)
        .map(|(model, version)| to_proto(model, version))
        .map_err(|e| ApiError::new(ErrorKind::NotFound, e.to_string()))
}

fn reference(text: &str) -> Result<String, Status> {
    if text.is_empty() || text.len() > REFERENCE_LEN_MAX {
        return Err(status(ApiError::new(
            ErrorKind::InvalidArgument,
            format!("reference must be NAME, NAME@VERSION or NAME@ALIAS (1 to {REFERENCE_LEN_MAX} bytes)"),
        )));
    }
    Ok(text.to_string())
}

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        self.tokens.authorize(request.metadata(), auth::Role::Read, "read models").map_err(status)?;
        let request = request.into_inner();
        let (name, limit) = (request.name, super::page_limit(request.limit));
        // `<name>@<version>` of the last version listed.
        let after = match request.page_token.rsplit_once('@') {
            None if request.page_token.is_empty() => None,
            Some((model, version)) if version.parse::<u32>().is_ok() => {
                Some((model.to_string(), version.parse::<u32>().unwrap_or(0)))
            }
            _ => return Err(super::bad_page_token(&request.page_token)),
        };
        let (versions, next) = self
            .node
            .read(move |state| {
                let sorted = state
                    .models
                    .values()
                    .filter(|m| name.is_empty() || m.name == name)
                    .flat_map(|m| m.versions.iter().map(move |v| ((m.name.clone(), v.version), (m, v))));
                let (page, next) = super::page(sorted, after, limit);
                (page.into_iter().map(|(m, v)| to_proto(m, v)).collect(), next)
            })
            .await
            .map_err(status)?;
        let next_page_token = next.map(|(model, version)| format!("{model}@{version}")).unwrap_or_default();
        Ok(Response::new(ListModelsResponse { versions, next_page_token }))
    }

    async fn get_model(&self, request: Request<GetModelRequest>) -> Result<Response<ModelVersion>, Status> {
        self.tokens.authorize(request.metadata(), auth::Role::Read, "read models").map_err(status)?;
        let reference = reference(&request.get_ref().reference)?;
        let version = self.node.read(move |state| resolve(state, &reference)).await.map_err(status)?.map_err(status)?;
        Ok(Response::new(version))
    }

    async fn set_alias(&self, request: Request<SetAliasRequest>) -> Result<Response<Ack>, Status> {
        self.tokens.authorize(request.metadata(), auth::Role::Admin, "set a model alias").map_err(status)?;
        let r = request.into_inner();
        match self.node.propose(Command::SetModelAlias { name: r.name, version: r.version, alias: r.alias }).await {
            Ok(Applied::ModelChanged { .. }) => Ok(Response::new(Ack {})),
            Ok(other) => Err(status(ApiError::new(ErrorKind::Internal, format!("alias produced {other:?}")))),
            Err(e) => Err(status(e)),
        }
    }

    type DownloadModelStream = tokio_stream::wrappers::ReceiverStream<Result<ArtifactChunk, Status>>;

    async fn download_model(
        &self,
        request: Request<DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        self.tokens.authorize(request.metadata(), auth::Role::Read, "download models").map_err(status)?;
        let r = request.into_inner();
        if ArtifactFormat::try_from(r.format) != Ok(ArtifactFormat::Safetensors) {
            return Err(status(ApiError::new(
                ErrorKind::InvalidArgument,
                "format: safetensors is the artifact format registered models have (the exact training \\
                 state is the version's source checkpoint)",
            )));
        }
        let reference = reference(&r.reference)?;
        let version = self.node.read(move |state| resolve(state, &reference)).await.map_err(status)?.map_err(status)?;
        let key = self.store.key_in(&version.artifact_uri).filter(|key| key.prefix_matches(self.store.prefix()));
        let Some(key) = key else {
            return Err(status(ApiError::new(
                ErrorKind::FailedPrecondition,
                format!("artifact {} is not in this cluster's store {}", version.artifact_uri, self.store.uri()),
            )));
        };
        // A local artifact is read only as the regular file it was written as (a link swapped
        // into the store would point the download anywhere the coordinator can read).
        crate::confine::check_regular_file("artifact", &version.artifact_uri)
            .map_err(|e| status(ApiError::new(ErrorKind::FailedPrecondition, e)))?;
        let artifact = self.store.store().get(&key).await.map_err(|e| {
            let error = flotilla_store::StoreError::op(version.artifact_uri.clone(), e);
            let kind = if error.is_not_found() { ErrorKind::NotFound } else { ErrorKind::Unavailable };
            status(ApiError::new(kind, format!("artifact: {error}")))
        })?;
        let uri = version.artifact_uri.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut parts = artifact.into_stream();
            while let Some(part) = parts.next().await {
                let sent = match part {
                    Ok(bytes) => {
                        let mut sent = true;
                        for chunk in bytes.chunks(CHUNK_BYTES) {
                            sent &= tx.send(Ok(ArtifactChunk { data: chunk.to_vec() })).await.is_ok();
                        }
                        sent
                    }
                    Err(e) => {
                        let message = format!("artifact {uri}: {e}");
                        let _ = tx.send(Err(status(ApiError::new(ErrorKind::Unavailable, message)))).await;
                        false
                    }
                };
                if !sent {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
