"""What a training job refuses, in one line, before it spends anything: a target layer or rank the profile's
transformer cannot hold and an adapter name the tenant already gives another file (before Ray starts), a run id
started with other sources, options or weights, and GPUs the cluster does not have."""

from __future__ import annotations

import json

from factory.errors import ConfigError
from factory.io.storage import Storage
from factory.jobs.spec import JobSpec
from factory.jobs.training.layout import TrainingLayout
from factory.jobs.training.registry import check_name_free
from factory.jobs.training.spec import fingerprint
from factory.model.profiles import get_profile, with_revisions
from factory.model.stack import resolve_sources
from factory.model.training.adapter import check_lora_fits


def check_profile_fit(spec: JobSpec) -> None:
    """The train section's targets and rank against the profile's transformer, from its config alone (a
    meta-device skeleton: nothing is loaded)."""
    import torch
    from diffusers import FluxTransformer2DModel

    assert spec.train is not None
    profile = with_revisions(get_profile(spec.profile), spec.revisions)
    source, _, _ = resolve_sources(profile)
    config = FluxTransformer2DModel.load_config(source, subfolder="transformer", revision=profile.generator.revision)
    with torch.device("meta"):
        skeleton = FluxTransformer2DModel.from_config(config)
    check_lora_fits(skeleton, spec.train.options)


def check_registry(spec: JobSpec, root: str) -> None:
    """A job that registers its adapter names a registry, and the tenant does not give the adapter's name to a
    file elsewhere (at this run's own adapter URI, the sha256 decides once the adapter exists)."""
    assert spec.train is not None
    train = spec.train
    if not train.add_to_registry:
        return
    if spec.tenants is None:
        raise ConfigError("train.add_to_registry: the job names no tenants registry to register the adapter in "
                          "(tenants: tenants.yaml; `factory train`: registry: tenants.yaml)")
    check_name_free(spec.tenants, tenant=train.tenant, adapter=train.adapter, uri=TrainingLayout(root).adapter(
        train.adapter))


def check_gpus(needed: int, what: str) -> None:
    """A GPU stage on a cluster without the GPUs it asks for would wait forever for its placement: say so now."""
    import ray

    if not needed:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < needed:
        raise ConfigError(f"{what}: {needed} GPU(s) asked for, the cluster has {gpus:g}; set train.scaling.use_gpu: "
                          "false to encode and train on CPUs")


def open_run(spec: JobSpec, layout: TrainingLayout, storage: Storage) -> None:
    """Record what the run trains (`train_spec.json`); a run id already used for other sources, options or model
    commits is refused."""
    assert spec.train is not None
    digest = fingerprint(spec)
    record = json.dumps({"fingerprint": digest, "profile": spec.profile, "revisions": spec.revisions,
                         "train": spec.train.model_dump(mode="json")}, sort_keys=True, indent=2).encode()
    if storage.put_if_absent(layout.spec, record):
        return
    started = json.loads(storage.read_bytes(layout.spec))
    if started.get("fingerprint") != digest:
        raise ConfigError(f"run {layout.root}: started with other sources, profile, model commits or options "
                          f"({layout.spec}); use another run id")
