//! AlignmentService: one front door for every `align` command. GRPO and RLOO run here as orchestrator jobs
//! (this process's job manager) that drive a policy session and the reward replicas over gRPC; the offline
//! preference methods (DPO, ORPO, SimPO, KTO) and PPO run as jobs of the policy co-hosted in this server
//! (they train on the policy's job thread).

use ferrotune_proto::v1::alignment_service_client::AlignmentServiceClient;
use ferrotune_proto::v1::alignment_service_server::AlignmentService;
use ferrotune_proto::v1::{StartJobResponse, StartRecipeJobRequest};
use ferrotune_runtime::jobs::JobManager;
use ferrotune_runtime::ArtifactRoot;
use ferrotune_training::queue_recipe_job;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The service state.
pub struct Alignment {
    /// Where recipe paths resolve.
    pub root: ArtifactRoot,
    /// This process's jobs.
    pub jobs: JobManager,
    /// The policy device (DPO and PPO jobs run there).
    pub device: String,
    /// The policy's device map (`policy.device_map`), for jobs whose recipe sets none.
    pub device_map: Option<serde_json::Value>,
    /// Whether reward replicas are configured (PPO, GRPO and RLOO score on them).
    pub has_reward: bool,
    /// Whether a policy endpoint is configured (GRPO and RLOO drive a session there).
    pub has_policy: bool,
    /// The reward replicas, to check a recipe's reward functions before its job is queued.
    pub rewards: Option<ferrotune_clients::RewardPool>,
    /// The policy server's AlignmentService, where DPO and PPO start when the policy is not hosted here.
    pub remote: Option<AlignmentServiceClient<InterceptedService<Channel, ferrotune_clients::ClientAuth>>>,
}

/// The offline preference methods: policy jobs on a dataset, with no reward service.
fn offline(kind: &str) -> bool {
    matches!(kind, "dpo" | "orpo" | "simpo" | "kto")
}

const NO_REWARD: &str = "scores rollouts on reward services, and none is configured: set endpoints.reward (or FERROTUNE__ENDPOINTS__REWARD=http://HOST:PORT,…), or host reward in this server (serve --services policy,reward)";

impl Alignment {
    /// Scores one empty completion with each of the recipe's reward functions: a bad rule or an unknown
    /// reward model is refused now (INVALID_ARGUMENT / NOT_FOUND naming it), not at the first step.
    async fn check_rewards(&self, kind: &str, r: &StartRecipeJobRequest) -> Result<(), Status> {
        let (Some(pool), Ok(recipe)) = (
            &self.rewards,
            ferrotune_training::recipe::parse(&r.recipe_yaml, std::path::Path::new("recipe"), &r.overrides),
        ) else {
            return Ok(()); // recipe errors are reported by queue_recipe_job
        };
        let funcs = match kind {
            "grpo" => recipe.grpo.map(|c| c.rewards),
            "rloo" => recipe.rloo.map(|c| c.rewards),
            _ => recipe.ppo.as_ref().map(|p| crate::ppo::as_group(p).rewards),
        };
        for (i, f) in funcs.unwrap_or_default().iter().enumerate() {
            let req = ferrotune_proto::v1::ScoreRequest {
                model: Some(ferrotune_training::rewards::reward_ref(&f.source)),
                items: vec![ferrotune_proto::v1::ScoreItem {
                    prompt: String::new(),
                    response: String::new(),
                    reference: if f.reference_field.is_some() { "0".into() } else { String::new() },
                }],
            };
            if let Err(s) = pool.score(req).await {
                if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound) {
                    let field = if kind == "ppo" { "ppo.reward".to_owned() } else { format!("{kind}.rewards[{i}]") };
                    return Err(Status::new(s.code(), format!("{field}: {}", s.message())));
                }
            }
        }
        Ok(())
    }

    async fn start(&self, kind: &str, r: StartRecipeJobRequest) -> Result<Response<StartJobResponse>, Status> {
        if offline(kind) && !self.jobs.runs(kind) {
            if let Some(remote) = &self.remote {
                return self.start_on_policy(kind, r, remote.clone()).await;
            }
        }
        if !self.jobs.runs(kind) {
            return Err(Status::failed_precondition(format!(
                "{} runs as a job of the policy service, which this server does not host: start it where the policy runs (serve --services policy,… hosts AlignmentService too)",
                kind.to_uppercase()
            )));
        }
        if !offline(kind) && !self.has_reward {
            return Err(Status::failed_precondition(format!("{} {NO_REWARD}", kind.to_uppercase())));
        }
        if matches!(kind, "grpo" | "rloo" | "ppo") && !self.has_policy {
            return Err(Status::failed_precondition(format!(
                "{} drives a training session on a policy service, and none is configured: set endpoints.policy (FERROTUNE__ENDPOINTS__POLICY=http://HOST:PORT) or host policy in this server",
                kind.to_uppercase()
            )));
        }
        if matches!(kind, "grpo" | "rloo" | "ppo") {
            self.check_rewards(kind, &r).await?;
        }
        let job = queue_recipe_job(
            kind,
            &r.recipe_yaml,
            &r.overrides,
            r.resume,
            &self.root,
            (&self.device, self.device_map.as_ref()),
            &self.jobs,
        )?;
        Ok(Response::new(StartJobResponse { job: Some(job) }))
    }
}

impl Alignment {
    /// DPO, ORPO, SimPO, KTO or PPO on the policy server, followed here by a job of this service (see [`crate::follow`]).
    async fn start_on_policy(
        &self,
        kind: &str,
        r: StartRecipeJobRequest,
        mut remote: AlignmentServiceClient<InterceptedService<Channel, ferrotune_clients::ClientAuth>>,
    ) -> Result<Response<StartJobResponse>, Status> {
        let started = match kind {
            "dpo" => remote.start_dpo(r).await,
            "orpo" => remote.start_orpo(r).await,
            "simpo" => remote.start_simpo(r).await,
            "kto" => remote.start_kto(r).await,
            _ => remote.start_ppo(r).await,
        };
        let job = started?.into_inner().job.ok_or_else(|| Status::internal("the policy returned no job"))?;
        let spec = serde_json::json!({"remote": job.id, "kind": kind});
        let local = self
            .jobs
            .submit("follow", spec, job.output_dir.into())
            .map_err(|e| ferrotune_runtime::status::to_status(&e))?;
        tracing::info!(job = %local.id, remote = %job.id, "following a policy job");
        Ok(Response::new(StartJobResponse { job: Some(local) }))
    }
}

#[tonic::async_trait]
impl AlignmentService for Alignment {
    async fn start_dpo(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        self.start("dpo", req.into_inner()).await
    }

    async fn start_ppo(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        self.start("ppo", req.into_inner()).await
    }

    async fn start_grpo(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        self.start("grpo", req.into_inner()).await
    }

    async fn start_rloo(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        self.start("rloo", req.into_inner()).await
    }

    async fn start_orpo(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        self.start("orpo", req.into_inner()).await
    }

    async fn start_simpo(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        self.start("simpo", req.into_inner()).await
    }

    async fn start_kto(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        self.start("kto", req.into_inner()).await
    }
}
