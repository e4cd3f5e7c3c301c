"""API keys: stored as salted hashes, mapped to tenants, checked in constant time; and the serving config."""

from __future__ import annotations

import pytest

from factory.errors import ConfigError
from factory.routing.auth import ApiKey, Keyring, new_key, presented_key


def test_a_new_key_maps_to_its_tenant_and_the_config_never_holds_it():
    made = new_key("acme")
    assert made.key.startswith(f"fk_{made.entry.id}_")
    secret = made.key.rsplit("_", 1)[1]
    assert secret not in made.entry.hash and made.entry.hash.startswith("sha256$")
    ring = Keyring([made.entry, new_key("globex").entry])
    assert ring.tenant_of(made.key) == "acme"


@pytest.mark.parametrize("key", [None, "", "fk_", "nonsense", "fk_000000000000_" + "0" * 64])
def test_anything_but_a_configured_key_is_refused(key):
    assert Keyring([new_key("acme").entry]).tenant_of(key) is None


def test_a_key_with_one_wrong_digit_or_another_keys_id_is_refused():
    first, second = new_key("acme"), new_key("globex")
    ring = Keyring([first.entry, second.entry])
    last = first.key[-1]
    assert ring.tenant_of(first.key[:-1] + ("0" if last != "0" else "1")) is None
    # the id of one key with the secret of another
    assert ring.tenant_of(f"fk_{first.entry.id}_{second.key.rsplit('_', 1)[1]}") is None


def test_same_key_twice_gets_different_hashes():
    made = new_key("acme")
    from factory.routing.auth import hash_secret

    secret = made.key.rsplit("_", 1)[1]
    assert hash_secret(secret, b"a" * 16) != hash_secret(secret, b"b" * 16)


def test_a_plain_key_in_the_config_is_refused():
    made = new_key("acme")
    with pytest.raises(ValueError, match="never a plain key"):
        ApiKey(id=made.entry.id, tenant="acme", hash=made.key)
    with pytest.raises(ValueError, match="listed twice"):
        Keyring([made.entry, made.entry])


@pytest.mark.parametrize(("authorization", "x_api_key", "expected"), [
    ("Bearer abc", None, "abc"), ("bearer  abc ", None, "abc"), (None, "abc", "abc"), ("Basic xyz", None, None),
    ("Bearer ", None, None), (None, None, None), ("Basic xyz", "k", "k"),
])
def test_where_a_key_is_read_from(authorization, x_api_key, expected):
    assert presented_key(authorization, x_api_key) == expected


def test_serving_config_checks_keys_against_the_tenants_registry(tmp_path):
    from pathlib import Path

    from factory.routing.app import load_serving

    tenants = Path(__file__).resolve().parents[2] / "jobs" / "tenants.yaml"
    ok = load_serving({"tenants": str(tenants), "api": {"keys": [new_key("acme").entry.model_dump()]}})
    assert ok.registry is not None and ok.registry.tenants == ["acme", "globex", "initech", "umbrella"]
    with pytest.raises(ConfigError, match="'nobody' is not in the tenants registry"):
        load_serving({"tenants": str(tenants), "api": {"keys": [new_key("nobody").entry.model_dump()]}})
    with pytest.raises(ConfigError, match="api.max_in_flight"):
        load_serving({"api": {"max_in_flight": 0}})
    with pytest.raises(ConfigError, match="unknown field"):
        load_serving({"serve": {"replcas": 2}})
    config = tmp_path / "serve.yaml"
    config.write_text(f"tenants: {tenants}\napi: {{input_prefixes: ['s3://bucket/in']}}\n")
    assert load_serving(path=config).config.api.input_prefixes == ["s3://bucket/in/"]


def test_the_fleet_fingerprint_is_a_jobs_fingerprint():
    """A job whose profile, serve sizing, safety and tenants equal the serving config's computes the same
    fingerprint in factory.jobs.cluster.deploy, so it joins the warm fleet rather than being refused."""
    from pathlib import Path

    from factory.jobs.spec import JobSpec, resolved_num_gpus
    from factory.routing.app import load_serving, replica_fingerprint
    from factory.routing.replica import ReplicaConfig
    from factory.routing.tenants import TenantRegistry

    tenants = Path(__file__).resolve().parents[2] / "jobs" / "tenants.yaml"
    serve = {"replicas": 2, "num_cpus": 1, "max_batch_size": 4, "batch_wait_timeout_s": 0.01,
             "max_ongoing_requests": 8}
    serving = load_serving({"tenants": str(tenants), "serve": {**serve, "max_queued_requests": 5},
                            "safety": {"prompt_terms": ["x"]}})
    spec = JobSpec.model_validate({"name": "j", "inputs": ["m.jsonl"], "output": "out", "tenants": str(tenants),
                                   "serve": {**serve, "app_name": "factory-api"}, "safety": {"prompt_terms": ["x"]}})
    registry = TenantRegistry.from_file(tenants)
    # as deploy() builds them
    config = ReplicaConfig(
        profile=spec.profile, max_batch_size=spec.serve.max_batch_size,
        batch_wait_timeout_s=spec.serve.batch_wait_timeout_s, threads=max(1, int(spec.serve.num_cpus)),
        safety=spec.safety, max_adapters=spec.serve.max_adapters, max_adapter_bytes=spec.serve.max_adapter_bytes,
        lora_hotswap_rank=spec.serve.lora_hotswap_rank, performance=spec.performance,
        adapters={ref.key: ref for ref in registry.adapters()},
    )
    sizing = {"replicas": spec.serve.replicas, "num_cpus": spec.serve.num_cpus, "num_gpus": resolved_num_gpus(spec),
              "max_ongoing_requests": spec.serve.max_ongoing_requests}
    assert serving.fingerprint() == replica_fingerprint(config, sizing)
    other = load_serving({"tenants": str(tenants), "serve": {**serve, "replicas": 1}, "safety": {"prompt_terms": ["x"]}})
    assert other.fingerprint() != serving.fingerprint()


def test_serve_run_config_and_the_application_builder():
    """`serve run infra/serve.yaml` imports factory.routing.app:build_app with the file's args: Serve's own schema
    accepts the file, the builder builds the ingress in front of the replicas, and the gRPC servicer imports."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from factory.routing.api_models import GrpcOptions
    from factory.routing.app import build_app, load_serving, proxy_options

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "infra" / "serve.yaml").read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config.http_options.host == "127.0.0.1" and not config.grpc_options.grpc_servicer_functions  # no gRPC
    (application,) = config.applications
    module, _, name = application.import_path.partition(":")
    assert getattr(importlib.import_module(module), name) is build_app
    # the commented gRPC block, added back, is what `factory serve` starts for infra/serve-api.yaml's limits
    grpc_block = yaml.safe_load("\n".join(line[4:] for line in text.splitlines() if line.startswith("#   ")))
    with_grpc = ServeDeploySchema.model_validate({**yaml.safe_load(text), **grpc_block})
    (servicer,) = with_grpc.grpc_options.grpc_servicer_functions
    module, _, function = servicer.rpartition(".")
    assert callable(getattr(importlib.import_module(module), function))
    served = load_serving(path=repo / "infra" / "serve-api.yaml").config.api
    options = proxy_options(served.model_copy(update={"grpc": GrpcOptions(enabled=True, all_interfaces=True)}))
    assert with_grpc.grpc_options.model_dump(include={"port", "enable_reflection", "grpc_servicer_functions"}) == \
        options["grpc_options"]
    assert with_grpc.controller_options.runtime_env == options["controller_options"]["runtime_env"]
    # as the file stands (HTTP only), its proxy reads no further into a body than `factory serve`'s would
    http_only = proxy_options(served)
    assert config.controller_options.runtime_env == http_only["controller_options"]["runtime_env"]
    import os

    cwd = os.getcwd()
    try:
        os.chdir(repo)  # `serve run` is started from the repository root; its args name files from there
        app = build_app(application.args)
    finally:
        os.chdir(cwd)
    ingress = app._bound_deployment  # Serve's own inspection of a built app (no public accessor in Ray 2.60)
    replicas, ingress_config = ingress.init_args
    assert (ingress.name, replicas._bound_deployment.name) == ("ApiIngress", "StackReplica")
    assert ingress_config["tenants"]["tenants"]["acme"]["default"] == "brand"
    with pytest.raises(ConfigError, match="not both"):
        build_app({"config": "x.yaml", "profile": "tiny"})


def test_factory_api_key_prints_a_key_and_the_entry_that_accepts_it(tmp_path):
    import json

    from typer.testing import CliRunner

    from factory.cli import app

    result = CliRunner().invoke(app, ["api-key", "acme"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.output.splitlines())
    key, entry = lines["key"].strip(), json.loads(lines["config"].split("#")[0])
    assert Keyring([ApiKey.model_validate(entry)]).tenant_of(key) == "acme"
    bad = tmp_path / "serve.yaml"
    bad.write_text("api: {keys: [{id: abc, tenant: acme, hash: plain-key}]}\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "factory", "serve", "--config", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "api.keys[0].id" in done.stderr and "Traceback" not in done.stderr
