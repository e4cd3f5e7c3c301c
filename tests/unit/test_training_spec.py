"""Training specs, the tenants registry writer, the report's picture and the CLI's refusals: one line each, before
any Ray starts."""

from __future__ import annotations

import hashlib
import io

import pytest
import yaml
from PIL import Image
from factory.errors import ConfigError
from factory.jobs.training.figures import loss_curve_png, moving_average
from factory.jobs.training.registry import register_adapter, register_file
from factory.jobs.training.spec import fingerprint, load_train_spec
from factory.model.training.loop import Progress
from factory.routing.tenants import TenantRegistry
from tests.training import write_train_job, write_train_spec
from tests.unit.test_cli import factory


def _spec(tmp_path, **overrides):
    return load_train_spec(write_train_spec(tmp_path / "train.yaml", ["data"], tmp_path / "out", **overrides))


def test_a_spec_resolves_paths_and_derives_a_run_id_from_what_decides_the_adapter(tmp_path):
    spec = _spec(tmp_path)
    assert spec.sources == [str(tmp_path / "data")] and spec.output == str(tmp_path / "out")
    assert spec.resolved_run_id.startswith("acme-eu-style-")
    assert _spec(tmp_path, options={"seed": 8}).resolved_run_id != spec.resolved_run_id
    assert _spec(tmp_path, run_id="night-1").resolved_run_id == "night-1"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"optoins": {}}, r"optoins: unknown field \(did you mean options\?\)"),
    ({"options": {"rnak": 4}}, r"options\.rnak: unknown field \(did you mean options\.rank\?\)"),
    ({"options": {"timestep_sampling": "cosine"}}, r"options\.timestep_sampling: Input should be 'uniform'"),
    ({"options": {"buckets": [{"width": 100, "height": 64}]}}, r"options\.buckets\[0\]\.width: .*multiple of 16"),
    ({"options": {"warmup_steps": 30}}, r"warmup_steps \(30\) must be fewer than steps \(24\)"),
    ({"scaling": {"workers": 3}}, r"options\.batch_size: 4 is not a multiple of scaling\.workers \(3\)"),
    ({"adapter": "base"}, r"adapter: 'base' is reserved"),
    ({"tenant": "../x"}, r"tenant: '\.\./x' must be a name"),
    ({"profile": "flux-xl"}, r"profile: unknown profile 'flux-xl'"),
])
def test_a_bad_spec_is_one_line_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        _spec(tmp_path, **overrides)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(tmp_path / "train.yaml"))


def test_the_cli_refuses_a_bad_spec_or_an_impossible_rank_in_one_line(tmp_path, tiny_path):
    bad = write_train_spec(tmp_path / "bad.yaml", ["data"], tmp_path / "out", options={"steps": 0})
    big = write_train_spec(tmp_path / "big.yaml", ["data"], tmp_path / "out", options={"rank": 100})
    for spec, named in ((bad, "options.steps: Input should be greater than or equal to 1"),
                        (big, "options.rank: 100 is more than this profile's transformer can hold in ")):
        done = factory("train", str(spec))
        assert done.returncode == 2 and named in done.stderr, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


@pytest.mark.parametrize(("sources", "options", "message"), [
    (["data"], {"target_modules": ["to_q", "attn"]}, r"options\.target_modules: 'attn' is not a Linear layer"),
    (["gone"], {}, r"archive source .*gone: no such file or folder"),
])
def test_a_bad_target_or_source_is_refused_before_ray_starts_or_the_run_opens(tmp_path, tiny_path, monkeypatch,
                                                                               sources, options, message):
    import ray

    from factory.jobs import run

    def joined(address=None):  # the driver's one door to Ray: reaching it means the refusal came too late
        raise AssertionError("run_job joined Ray before refusing the spec")

    # Another test of the session may have started Ray in this process already: what this call must not do is
    # join it (or start it), so the door is watched rather than Ray's state read.
    monkeypatch.setattr(run, "connect", joined)
    ray_before = ray.is_initialized()
    spec = load_train_spec(write_train_spec(tmp_path / "train.yaml", sources, tmp_path / "out", options=options))
    with pytest.raises(ConfigError, match=message):
        run.run_job(spec.job(), run_id=spec.resolved_run_id)
    assert ray.is_initialized() == ray_before and not (tmp_path / "out").exists()


def test_a_job_specs_train_section_is_the_train_spec_factory_train_runs(tmp_path):
    from factory.jobs.spec import load_spec

    spec = _spec(tmp_path, registry="tenants.yaml", add_to_registry=True)
    job = load_spec(write_train_job(tmp_path / "job.yaml", ["data"], tmp_path / "out", tenants="tenants.yaml",
                                    add_to_registry=True), [])
    assert job.train == spec.job().train and job.inputs == [] and job.tenants == str(tmp_path / "tenants.yaml")
    assert fingerprint(job) == fingerprint(spec.job())


@pytest.mark.parametrize(("extra", "message"), [
    ({"inputs": ["rows.jsonl"]}, r"inputs: a job reads manifests \(inputs\) or trains an adapter"),
    ({"archive": {"sources": ["photos"]}}, r"train: a job trains an adapter \(train\) or captions"),
    ({"profile": "tiny-flux2"}, r"profile: profile 'tiny-flux2' runs flux2; training supports FLUX\.1"),
])
def test_a_train_section_that_cannot_run_is_one_line(tmp_path, extra, message):
    from factory.jobs.spec import load_spec

    path = write_train_job(tmp_path / "job.yaml", ["data"], tmp_path / "out")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **extra}))
    with pytest.raises(ConfigError, match=message) as caught:
        load_spec(path, [])
    assert "\n" not in str(caught.value)


def _adapter(path, content: bytes = b"weights") -> tuple[str, str]:
    path.write_bytes(content)
    return str(path), hashlib.sha256(content).hexdigest()


def test_registering_adds_the_adapter_with_its_sha256_for_its_region_or_as_default(tmp_path):
    registry = tmp_path / "tenants.yaml"
    registry.write_text(yaml.safe_dump({"tenants": {"acme": {"adapters": {"old": {"uri": "old.safetensors"}},
                                                             "default": "old"}, "initech": {}}}))
    eu, eu_sha = _adapter(tmp_path / "eu.safetensors")
    assert register_adapter(registry, tenant="acme", adapter="eu-style", uri=eu, sha256=eu_sha, region="eu")
    brand, brand_sha = _adapter(tmp_path / "brand.safetensors", b"other")
    assert register_adapter(registry, tenant="globex", adapter="brand", uri=brand, sha256=brand_sha)

    loaded = TenantRegistry.from_file(registry)
    assert loaded.resolve_adapter("acme", region="eu").sha256 == eu_sha
    assert loaded.resolve_adapter("acme", region="na").key == "acme/old"  # the default is kept
    assert loaded.resolve_adapter("globex").uri == brand  # a new tenant: its default
    assert yaml.safe_load(registry.read_text())["tenants"]["acme"]["adapters"]["eu-style"]["uri"] == "eu.safetensors"
    assert not register_adapter(registry, tenant="acme", adapter="eu-style", uri=eu, sha256=eu_sha, region="eu")


def test_a_name_taken_by_another_file_is_refused_and_nothing_is_written(tmp_path):
    registry = tmp_path / "tenants.yaml"
    first, first_sha = _adapter(tmp_path / "a.safetensors", b"first")
    register_adapter(registry, tenant="acme", adapter="style", uri=first, sha256=first_sha)
    before = registry.read_bytes()
    other, other_sha = _adapter(tmp_path / "b.safetensors", b"second")
    with pytest.raises(ConfigError, match=r"tenant 'acme' already has an adapter 'style' with another file"):
        register_adapter(registry, tenant="acme", adapter="style", uri=other, sha256=other_sha, region="eu")
    (tmp_path / "a.safetensors").write_bytes(b"changed")  # the same path, other bytes: still another file
    with pytest.raises(ConfigError, match="another file"):
        register_adapter(registry, tenant="acme", adapter="style", uri=first, sha256=hashlib.sha256(b"changed").hexdigest())
    assert registry.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written file left


def test_a_broken_registry_is_reported_never_rewritten(tmp_path):
    registry = tmp_path / "tenants.yaml"
    registry.write_text("tenants:\n  acme:\n    adapters: {x: {uri: a, colour: red}}\n")
    with pytest.raises(ConfigError, match=r"tenants\.acme\.adapters\.x\.colour: unknown field"):
        register_adapter(registry, tenant="acme", adapter="y", uri=str(tmp_path / "y"), sha256="0" * 64)
    assert "colour" in registry.read_text()


def test_lora_register_checks_the_file_is_an_adapter(tmp_path):
    from factory.model.lora import create_lora_for_profile

    adapter = create_lora_for_profile(tmp_path / "a.safetensors", "tiny", rank=4)
    changed, sha = register_file(tmp_path / "t.yaml", tenant="acme", adapter="brand", uri=str(adapter))
    assert changed and sha == hashlib.sha256(adapter.read_bytes()).hexdigest()
    (tmp_path / "fake.safetensors").write_bytes(b"\x80\x04 pickle")
    done = factory("lora", "register", str(tmp_path / "fake.safetensors"), "--registry", str(tmp_path / "t.yaml"),
                   "--tenant", "acme", "--name", "fake")
    assert done.returncode == 2 and "not a safetensors file" in done.stderr, done.stderr
    done = factory("lora", "register", str(adapter), "--registry", str(tmp_path / "t.yaml"), "--tenant", "acme",
                   "--name", "brand")
    assert done.returncode == 0 and "already registered" in done.stdout, done.stderr


def test_the_loss_curve_is_a_picture_of_the_run():
    progress = Progress(step=30, losses=[1.0 - i / 60 for i in range(30)], held_out={0: 1.1, 15: 0.9, 30: 0.8})
    image = Image.open(io.BytesIO(loss_curve_png(progress)))
    assert image.format == "PNG" and image.size == (900, 420)
    red = sum(1 for pixel in image.getdata() if pixel == (210, 60, 40))
    assert red > 50  # the held-out points and line are drawn
    assert moving_average([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
