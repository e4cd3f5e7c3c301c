"""The files under infra/ name real things: every YAML parses, every `factory` command line in them is one the CLI
takes with a spec and overrides that load, every import path imports, every file they copy or mount from the
repository exists, and the Dockerfile installs exactly what the README tells a GPU cluster to install."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from factory.jobs.cluster.connection import FORWARDED_ENV
from factory.jobs.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
RUN_ID = "2026-11-24"


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((INFRA / name).read_text()) if doc]


def check_factory_command(command: str) -> None:
    """`factory run SPEC [--run-id ID] [--set k=v ...]`: the spec exists and loads with those overrides."""
    command = command.replace("RUN_ID", RUN_ID).replace('"$(date -u +\\%Y-\\%m-\\%d)"', RUN_ID)
    args = shlex.split(command)
    assert args[:2] == ["factory", "run"], args
    from factory.cli import app

    assert "run" in {command.name or command.callback.__name__ for command in app.registered_commands}
    spec, overrides, position = args[2], [], 3
    while position < len(args):
        option = args[position]
        assert option in ("--set", "--run-id"), option
        if option == "--set":
            overrides.append(args[position + 1])
        position += 2
    assert (REPO / spec).is_file(), spec
    loaded = load_spec(REPO / spec, overrides)
    assert loaded.output.startswith("s3://"), "a cluster run writes where it outlives the job"


def test_every_yaml_under_infra_parses():
    names = sorted(path.name for path in INFRA.glob("*.yaml"))
    assert {"rayjob.yaml", "cronjob.yaml", "cluster.yaml", "rayservice.yaml", "serve.yaml", "serve-gpu.yaml"} <= set(names)
    for name in names:
        assert documents(name), name


def test_the_rayjob_runs_a_real_factory_command_with_model_access_on_every_pod():
    (job,) = documents("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    check_factory_command(" ".join(job["spec"]["entrypoint"].split()))
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        names = {env["name"] for env in container["env"]}
        # Every pod has the token itself; a job forwards where the models are, never the secret (the dashboard
        # shows forwarded variables).
        assert {"HF_TOKEN", "HF_HOME"} <= names and "HF_HOME" in FORWARDED_ENV and "HF_TOKEN" not in FORWARDED_ENV
        assert container["image"] == image_of_cluster_yaml()
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"


def test_the_cronjob_creates_that_nights_rayjob():
    kinds = [doc["kind"] for doc in documents("cronjob.yaml")]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "CronJob"]
    cron = documents("cronjob.yaml")[-1]
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "kubectl create -f -" in script and 'sed "s/RUN_ID/$RUN_ID/g" /templates/rayjob.yaml' in script
    role = documents("cronjob.yaml")[1]
    assert role["rules"][0]["resources"] == ["rayjobs"] and "create" in role["rules"][0]["verbs"]


def test_the_plain_cron_line_submits_a_real_factory_command():
    (line,) = [line for line in (INFRA / "cron").read_text().splitlines() if line and not line.startswith("#")]
    fields = line.split(None, 5)
    assert len(fields) == 6 and fields[:5] == ["30", "1", "*", "*", "*"]
    submitted = fields[5].split(" -- ", 1)[1].split(" >>")[0]
    assert "ray job submit" in fields[5] and "--working-dir ." in fields[5]
    check_factory_command(submitted)


def test_the_rayservice_serves_the_application_builder_it_names():
    (service,) = documents("rayservice.yaml")
    assert service["kind"] == "RayService"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    module, _, attribute = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    # The config it mounts is infra/serve-gpu.yaml (a ConfigMap); its paths are the image's (/opt/factory).
    assert application["args"] == {"config": "/etc/factory/serve-gpu.yaml"}
    assert "--from-file=serve-gpu.yaml=infra/serve-gpu.yaml" in (INFRA / "rayservice.yaml").read_text()
    for function in config["grpc_options"]["grpc_servicer_functions"]:
        module, _, attribute = function.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attribute))
    from factory.routing.app import load_serving

    text = (INFRA / "serve-gpu.yaml").read_text().replace("/opt/factory/", f"{REPO}/")
    serving = load_serving(yaml.safe_load(text))
    assert serving.config.profile == "flux-dev" and serving.sizing()["num_gpus"] == 1.0
    assert serving.config.app_name == application["name"]
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    deployments = {d["name"]: d for d in application.get("deployments", [])}
    assert "autoscaling_config" in deployments["StackReplica"]


def test_the_vm_cluster_keeps_the_dashboard_on_loopback():
    (cluster,) = documents("cluster.yaml")
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert cluster["head_node_type"] in cluster["available_node_types"]


def image_of_cluster_yaml() -> str:
    return documents("cluster.yaml")[0]["docker"]["image"]


def pip_installs(text: str) -> list[str]:
    """Each `pip install ...` command, normalised (continuations joined, `python -m pip` as `pip`)."""
    text = text.replace("\\\n", " ")
    found = re.findall(r"(?:python3? -m )?pip install ([^\n&`]+)", text)
    return [" ".join(command.split()) for command in found]


def test_the_dockerfile_installs_what_the_readme_tells_a_gpu_cluster_to_install():
    dockerfile = (INFRA / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**GPU clusters**"):]
    section = section[:section.index("\n\n", section.index("```"))]
    assert pip_installs(dockerfile) == pip_installs(section) != []
    copied = re.findall(r"^COPY ((?:\S+ )+)\./", dockerfile, flags=re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert (REPO / source).exists(), source


@pytest.mark.parametrize("name", ["rayjob.yaml", "cronjob.yaml", "rayservice.yaml", "cluster.yaml"])
def test_no_secret_is_written_into_a_manifest(name):
    text = (INFRA / name).read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text) and "AWS_SECRET_ACCESS_KEY:" not in text
