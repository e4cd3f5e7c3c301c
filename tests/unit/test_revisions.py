"""Pinned model revisions: `org/name@<commit>` in profiles, and hub IDs resolved to their commit once per job.

There is no Hub here: resolution reads a hub cache laid out as huggingface_hub lays it out (`models--org--name/
refs/<branch>` holding the commit, `snapshots/<commit>/`), which is how it resolves a branch offline.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
from pydantic import ValidationError

from factory.errors import ModelError
from factory.io.storage import Storage
from factory.jobs.sources.manifests.reuse import reuse_context
from factory.jobs.spec import JobSpec, pin_models
from factory.model import generator, vlm
from factory.model.profiles import GeneratorProfile, get_profile, with_revisions
from factory.model.revisions import hub_revisions, pin_revisions
from factory.model.stack import model_version
from factory.routing.app import replica_setup

FLUX, QWEN = "black-forest-labs/FLUX.1-dev", "Qwen/Qwen2.5-VL-3B-Instruct"
FLUX_MAIN, QWEN_MAIN, FLUX_V2 = "1" * 40, "2" * 40, "3" * 40


def cache_ref(cache: Path, repo: str, ref: str, commit: str) -> None:
    """What a download of `repo` at `ref` leaves in a hub cache: the ref's commit, and that commit's snapshot."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding FLUX.1-dev and Qwen2.5-VL at main (what HF_HUB_OFFLINE=1 and HF_HUB_CACHE set)."""
    cache = tmp_path / "hub"
    cache_ref(cache, FLUX, "main", FLUX_MAIN)
    cache_ref(cache, QWEN, "main", QWEN_MAIN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_commit_written_into_the_source_is_passed_as_the_revision():
    commit = "a" * 40
    profile = GeneratorProfile(source=f"org/flux@{commit}")
    assert (profile.source, profile.revision, profile.pinned) == ("org/flux", commit, True)
    assert generator.load_options(profile)["revision"] == commit
    with pytest.raises(ValidationError, match="names revision"):
        GeneratorProfile(source=f"org/flux@{commit}", revision="main")
    assert GeneratorProfile(source="/models/flux@2").source == "/models/flux@2"  # a path, not a hub ID


def test_a_pinned_profile_needs_no_hub_and_records_its_commits(tmp_path):
    pinned = with_revisions(get_profile("flux-dev"), {"generator": "a" * 40, "vlm": "b" * 40})
    # An empty cache and no network: pinned commits are never looked up.
    assert pin_revisions(pinned, cache_dir=tmp_path, local_files_only=True) == pinned
    assert model_version(pinned) == f"{FLUX}@{'a' * 40}+{QWEN}@{'b' * 40}"


def test_branches_resolve_to_their_commits_from_the_hub_cache(hub_cache):
    pinned = pin_revisions(get_profile("flux-dev"))
    assert hub_revisions(pinned) == {"generator": FLUX_MAIN, "vlm": QWEN_MAIN}
    assert generator.load_options(pinned.generator)["revision"] == FLUX_MAIN
    assert vlm.load_options(pinned.vlm)["revision"] == QWEN_MAIN
    assert model_version(pinned) == f"{FLUX}@{FLUX_MAIN}+{QWEN}@{QWEN_MAIN}"


def test_an_unresolvable_checkpoint_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as refused:
        pin_revisions(get_profile("flux-dev"))
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"{FLUX}@main: cannot resolve")


def job(tmp_path, **fields) -> JobSpec:
    return JobSpec.model_validate({"name": "pins", "inputs": [str(tmp_path / "rows.jsonl")],
                                   "output": str(tmp_path / "out"), "profile": "flux-dev", **fields})


def test_a_job_resolves_once_and_its_replicas_and_reuse_keys_use_those_commits(hub_cache, tmp_path):
    spec = pin_models(job(tmp_path))
    assert spec.revisions == {"generator": FLUX_MAIN, "vlm": QWEN_MAIN}
    cache_ref(hub_cache, FLUX, "main", FLUX_V2)  # main moves while the job runs
    config, _ = replica_setup(spec.profile, spec.serve, spec.safety, spec.performance, None, spec.revisions)
    replica_profile = with_revisions(get_profile(config.profile), config.revisions)  # what StackReplica loads
    assert generator.load_options(replica_profile.generator)["revision"] == FLUX_MAIN
    assert reuse_context(spec, None, Storage()).model_version == f"{FLUX}@{FLUX_MAIN}+{QWEN}@{QWEN_MAIN}"
    assert pin_models(job(tmp_path)).revisions["generator"] == FLUX_V2  # the next job takes the new commit


def test_a_job_may_name_a_tag_and_only_known_components(hub_cache, tmp_path):
    cache_ref(hub_cache, FLUX, "v2", FLUX_V2)
    assert pin_models(job(tmp_path, revisions={"generator": "v2"})).revisions == {
        "generator": FLUX_V2, "vlm": QWEN_MAIN}
    with pytest.raises(ValidationError, match="no component 'editor'"):
        job(tmp_path, revisions={"editor": "main"})


def test_the_tiny_profile_has_nothing_to_resolve(tmp_path):
    spec = pin_models(job(tmp_path, profile="tiny"))
    assert spec.revisions is None
    assert reuse_context(spec, None, Storage()).model_version.startswith("tiny-v")
