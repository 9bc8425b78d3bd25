//! AlignmentService: DPO and PPO jobs, queued on the policy process's job manager (they train the policy on
//! the policy's device). PPO needs reward replicas (`endpoints.reward`), checked when the job is started.

use ferrotune_proto::v1::alignment_service_server::AlignmentService;
use ferrotune_proto::v1::{StartJobResponse, StartRecipeJobRequest};
use ferrotune_runtime::jobs::JobManager;
use ferrotune_runtime::ArtifactRoot;
use tonic::{Request, Response, Status};

use ferrotune_training::queue_recipe_job;

/// The service state.
pub struct Alignment {
    /// Where recipe paths resolve.
    pub root: ArtifactRoot,
    /// The policy process's jobs.
    pub jobs: JobManager,
    /// The policy device (jobs run there).
    pub device: String,
    /// Whether reward replicas are configured (PPO needs them).
    pub has_reward: bool,
}

impl Alignment {
    fn start(&self, kind: &str, r: StartRecipeJobRequest) -> Result<Response<StartJobResponse>, Status> {
        let job = queue_recipe_job(kind, &r.recipe_yaml, &r.overrides, r.resume, &self.root, &self.device, &self.jobs)?;
        Ok(Response::new(StartJobResponse { job: Some(job) }))
    }
}

#[tonic::async_trait]
impl AlignmentService for Alignment {
    async fn start_dpo(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        self.start("dpo", req.into_inner())
    }

    async fn start_ppo(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        if !self.has_reward {
            return Err(Status::failed_precondition(
                "PPO scores rollouts on reward services, and none is configured: set endpoints.reward (or FERROTUNE__ENDPOINTS__REWARD=http://HOST:PORT,…), or host reward in this server (serve --services policy,reward)",
            ));
        }
        self.start("ppo", req.into_inner())
    }
}
