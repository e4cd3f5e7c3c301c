"""GPU profiles reserve GPUs by default, a cluster without them is refused in one line, and a deploy that cannot
become ready says why: the pure parts, without Ray (Serve's status objects are built by hand)."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview
from structlog.testing import capture_logs

from factory.errors import ConfigError
from factory.jobs.cluster.serve_app import check_gpus, deploy_failure, is_ready, not_ready_line, waiting_for
from factory.jobs.spec import JobSpec, ServeConfig, load_spec, resolved_num_gpus


def job(profile: str, **serve) -> JobSpec:
    return JobSpec(name="gpus", inputs=["rows.jsonl"], output="out", profile=profile, serve=ServeConfig(**serve))


# ---- the default ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "gpus"), [("tiny", 0.0), ("flux-dev", 1.0), ("flux-schnell", 1.0)])
def test_unset_num_gpus_is_one_for_gpu_profiles_and_zero_for_cpu_ones(profile, gpus):
    assert ServeConfig().num_gpus is None
    assert resolved_num_gpus(job(profile)) == gpus


@pytest.mark.parametrize(("profile", "given"), [("flux-dev", 0), ("flux-dev", 2), ("tiny", 0.5), ("tiny", 0)])
def test_an_explicit_num_gpus_wins(profile, given):
    assert resolved_num_gpus(job(profile, num_gpus=given)) == given


def test_num_gpus_and_ready_timeout_from_a_spec_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: gpus\ninputs: [rows.jsonl]\noutput: out\nprofile: flux-dev\n")
    spec = load_spec(path, ["serve.num_gpus=0"])
    assert resolved_num_gpus(spec) == 0.0
    assert spec.serve.ready_timeout_s == 1800
    with pytest.raises(ConfigError, match=r"serve\.ready_timeout_s: Input should be greater than 0"):
        load_spec(path, ["serve.ready_timeout_s=0"])
    with pytest.raises(ConfigError, match=r"serve\.num_gpus: Input should be greater than or equal to 0"):
        load_spec(path, ["serve.num_gpus=-1"])


# ---- a cluster too small ----------------------------------------------------------------------------------


def test_a_cluster_without_the_gpus_one_replica_needs_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        check_gpus("flux-dev", 1.0, replicas=2, cluster_gpus=0.0)
    message = str(refused.value)
    assert message == (
        "serve.num_gpus: profile 'flux-dev' needs 1 GPU per replica, the Ray cluster has 0 GPUs; run it on a "
        "cluster with GPUs, set serve.num_gpus: 0 to run the profile on CPU, or serve.gpus_on_demand: true if "
        "the cluster adds GPU nodes when asked"
    )
    with pytest.raises(ConfigError, match="needs 2 GPUs per replica, the Ray cluster has 1 GPU;"):
        check_gpus("flux-dev", 2.0, replicas=1, cluster_gpus=1.0)


def test_gpus_for_some_replicas_warn_and_enough_or_none_needed_pass_quietly():
    with capture_logs() as logs:
        check_gpus("flux-dev", 1.0, replicas=4, cluster_gpus=2.0)
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert (logs[0]["replicas"], logs[0]["cluster_gpus"]) == (4, 2.0)
    with capture_logs() as logs:
        check_gpus("flux-dev", 1.0, replicas=4, cluster_gpus=4.0)
        check_gpus("flux-dev", 0.25, replicas=4, cluster_gpus=1.0)
        check_gpus("tiny", 0.0, replicas=8, cluster_gpus=0.0)
    assert logs == []


# ---- readiness --------------------------------------------------------------------------------------------

# Serve's own words (ray/serve/_private/deployment_state.py) for replicas it cannot place, and for replicas whose
# constructor kept failing.
UNSCHEDULABLE = (
    "Deployment 'StackReplica' in application 'factory-gpus' has 1 replicas that have taken more than 30s to be "
    "scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment to be "
    'installed. Resources required for each replica: {"CPU": 1.0, "GPU": 1.0}, total resources available: '
    '{"CPU": 1.0}. Use `ray status` for more details.'
)
CONSTRUCTOR_FAILED = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
    "initial health check failing. See controller logs for details. Error:\n"
    "ray::ServeReplica:factory-gpus:StackReplica.initialize_and_get_metadata() (pid=1, ip=127.0.0.1)\n"
    "Traceback (most recent call last):\n"
    '  File "factory/model/stack.py", line 10, in from_profile\n'
    "    raise ModelError(...)\n"
    "factory.errors.ModelError: black-forest-labs/FLUX.1-dev: weights not found in the hub cache\n"
)


def app(status: str, deployment: str, message: str = "", **replicas: int) -> ApplicationStatusOverview:
    return ApplicationStatusOverview(
        status=ApplicationStatus(status), message="", last_deployed_time_s=0.0,
        deployments={"StackReplica": DeploymentStatusOverview(
            status=DeploymentStatus(deployment), status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_STARTED,
            replica_states={ReplicaState(state): count for state, count in replicas.items()}, message=message,
        )},
    )


def test_ready_when_running_or_when_the_replicas_that_fit_run():
    assert is_ready(app("RUNNING", "HEALTHY", RUNNING=2))
    assert not is_ready(None)
    assert not is_ready(app("DEPLOYING", "UPDATING", STARTING=2))
    assert not is_ready(app("DEPLOYING", "UPDATING", UNSCHEDULABLE, STARTING=1))
    # Two GPUs for four replicas: Serve keeps the app DEPLOYING, but two replicas take requests.
    assert is_ready(app("DEPLOYING", "UPSCALING", UNSCHEDULABLE, RUNNING=2, STARTING=2))


def test_a_failed_deploy_is_one_line_ending_with_the_replicas_exception():
    assert deploy_failure("factory-gpus", app("DEPLOYING", "UPDATING", STARTING=1)) is None
    assert deploy_failure("factory-gpus", None) is None
    line = deploy_failure("factory-gpus", app("DEPLOY_FAILED", "DEPLOY_FAILED", CONSTRUCTOR_FAILED))
    assert line == ("the replicas of Serve app 'factory-gpus' failed to start: "
                    "ModelError: black-forest-labs/FLUX.1-dev: weights not found in the hub cache")
    bare = deploy_failure("factory-gpus", app("DEPLOY_FAILED", "DEPLOY_FAILED"))
    assert bare is not None and "\n" not in bare and "no reason given" in bare


def test_the_deadline_line_names_the_resources_replicas_wait_for():
    waiting = not_ready_line("factory-gpus", 1800, app("DEPLOYING", "UPDATING", UNSCHEDULABLE, STARTING=1))
    assert waiting == (
        "serve.ready_timeout_s: the replicas of Serve app 'factory-gpus' did not start within 1800 s: they wait "
        'for resources the cluster does not have free (each replica needs {"CPU": 1.0, "GPU": 1.0}, available '
        '{"CPU": 1.0})'
    )
    slow = not_ready_line("factory-gpus", 2.5, app("DEPLOYING", "UPDATING", "slow __init__", STARTING=1))
    assert slow.startswith("serve.ready_timeout_s: the replicas of Serve app 'factory-gpus' did not start within "
                           "2.5 s (model download")
    assert "\n" not in slow and "\n" not in waiting
    assert not_ready_line("factory-gpus", 60, None).endswith("raise serve.ready_timeout_s if they need longer)")
    assert waiting_for("Deployment is updating") is None
