//! `cordon.v1.Mesh`: relayed frames from the other replicas of this deployment, for relay streams held
//! here. Authenticated by the secret the replicas share through the database.

use std::sync::Arc;

use cordon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::control_plane::ControlPlane;
use crate::model::TailnetId;
use crate::relay::Key;

pub struct MeshApi {
    cp: Arc<ControlPlane>,
}

impl MeshApi {
    pub fn new(cp: Arc<ControlPlane>) -> Self {
        MeshApi { cp }
    }
}

#[tonic::async_trait]
impl pb::mesh_server::Mesh for MeshApi {
    async fn forward(&self, req: Request<tonic::Streaming<pb::MeshBatch>>) -> Result<Response<pb::MeshAck>, Status> {
        let Some(cluster) = self.cp.cluster.get() else {
            return Err(Status::failed_precondition("this server is not one of several replicas"));
        };
        if !super::bearer(&req).is_some_and(|t| cluster.is_mesh_secret(t)) {
            return Err(Status::unauthenticated("not a replica of this deployment"));
        }
        let mut batches = req.into_inner();
        while let Some(batch) = batches.message().await? {
            for f in batch.frames {
                let (Ok(tailnet), Ok(from), Ok(to)) = (
                    uuid::Uuid::from_slice(&f.tailnet_id),
                    <Key>::try_from(f.from_key.as_slice()),
                    <Key>::try_from(f.to_key.as_slice()),
                ) else {
                    self.cp.relays.dropped_unknown();
                    continue;
                };
                // Delivered here or nowhere: a frame crosses the mesh once.
                if self.cp.relays.deliver(TailnetId(tailnet), from, to, f.data).is_err() {
                    self.cp.relays.dropped_unknown();
                }
            }
        }
        Ok(Response::new(pb::MeshAck {}))
    }
}
