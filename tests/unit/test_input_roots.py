"""Tenants confined to their inputs: the one roots rule (factory.io.roots), where roots come from (registry, job,
manifest folder, API narrowing), rejects at validation and the check again at fetch time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from factory.errors import ConfigError, InputError
from factory.io.images import fetch_bytes
from factory.io.layout import OutputLayout
from factory.io.roots import InputRoots, OutsideRoots, normalise_root
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_table
from factory.jobs.sources.manifests.plan import build_plan
from factory.jobs.spec import JobSpec, load_spec
from factory.jobs.sources.manifests.validate import TenantRoots, ValidateContext, validate_chunk
from factory.model.profiles import get_profile
from factory.routing.api_models import ApiSettings
from factory.routing.parser import GenerationDefaults
from factory.routing.tenants import TenantRegistry

ACME_S3 = "s3://bucket/acme/"


@pytest.fixture
def disk(tmp_path) -> dict[str, Path]:
    """acme's folder with a file, a link to a file outside, a link to a folder outside; a secret beside it."""
    acme, secret = tmp_path / "acme", tmp_path / "secret"
    acme.mkdir()
    secret.mkdir()
    (acme / "in.png").write_bytes(b"acme's own")
    (secret / "s.png").write_bytes(b"not acme's")
    (acme / "link.png").symlink_to(secret / "s.png")
    (acme / "linkdir").symlink_to(secret)
    (acme / "inner").symlink_to(acme / "in.png")  # a link that stays inside is fine
    return {"acme": acme, "secret": secret, "root": tmp_path}


def acme_roots(disk) -> InputRoots:
    return InputRoots.of("tenant acme", [ACME_S3, str(disk["acme"])])


def refused(roots: InputRoots, reference: str) -> str:
    with pytest.raises(OutsideRoots) as caught:
        roots.check(reference)
    message = str(caught.value)
    assert "outside the inputs of tenant acme" in message and "\n" not in message
    assert f"(allowed: {ACME_S3}, {disk_root(roots)}/)" in message  # names the rule: what acme may read
    return message


def disk_root(roots: InputRoots) -> str:
    return next(root for root in roots.roots if not root.startswith("s3://")).rstrip("/")


def test_inside_references_are_read_where_they_were_judged(disk):
    roots = acme_roots(disk)
    assert roots.check(str(disk["acme"] / "in.png")) == str(disk["acme"] / "in.png")
    assert roots.check(f"file://{disk['acme']}/in.png") == str(disk["acme"] / "in.png")
    assert roots.check(str(disk["acme"] / "inner")) == str(disk["acme"] / "in.png")  # the link's real target
    assert roots.check(f"{disk['acme']}//sub/../in.png") == str(disk["acme"] / "in.png")
    assert roots.check("s3://bucket/acme/x.png") == "s3://bucket/acme/x.png"
    assert roots.check("s3://bucket/acme/sku%2F12.png") == "s3://bucket/acme/sku%2F12.png"  # factory's own names


@pytest.mark.parametrize("reference", [
    "/etc/passwd",                                       # an absolute path
    "{acme}/../secret/s.png",                            # '..'
    "{acme}/link.png",                                   # a link to a file outside
    "{acme}/linkdir/s.png",                              # a link to a folder outside
    "file://{secret}/s.png",                             # file://
    "file://{acme}/../secret/s.png",
    "{acme}/%2e%2e/secret/s.png",                        # percent-encoded dots
    "{acme}/%2E%2e%2fsecret%2fs.png",                    # ... and slashes, mixed case
    "{acme}/%252e%252e/secret/s.png",                    # encoded twice
    "s3://bucket/globex/g.png",                          # another tenant's s3:// prefix
    "s3://bucket/acme-evil/x.png",                       # a prefix that only starts like acme's
    "s3://bucket/acme",                                  # the prefix itself, without its boundary
    "s3://other-bucket/acme/x.png",                      # the same prefix in another bucket
    "s3://bucket/acme/../globex/g.png",                  # a literal '..' key segment
    "s3://bucket/acme/%2e%2e/globex/g.png",              # an encoded one
    "s3://bucket/acme/%2E%2e%2fglobex/g.png",
    "s3://bucket/acme/./x.png",
    "s3://bucket//acme/x.png",                           # a key starting with '/' is not under acme/
])
def test_outside_references_are_refused_naming_the_rule(disk, reference):
    message = refused(acme_roots(disk), reference.format(acme=disk["acme"], secret=disk["secret"]))
    if "link" in reference:
        assert f"it resolves to {disk['secret']}" in message
    if "%2" in reference:
        assert "decoded: " in message


def test_unsupported_schemes_and_unusable_paths_are_refused(disk):
    roots = acme_roots(disk)
    for reference in ("ftp://host/x.png", "S3://bucket/acme/x.png", "gs://bucket/acme/x.png"):
        with pytest.raises(InputError, match="unsupported scheme"):
            roots.check(reference)
    message = refused(roots, f"{disk['acme']}/a\0b\n.png")
    assert "\\x00" in message and "\\n" in message  # still one line


def test_a_root_that_is_itself_a_link_covers_its_target(disk):
    (disk["root"] / "alias").symlink_to(disk["acme"])
    roots = InputRoots.of("tenant acme", [str(disk["root"] / "alias")])
    assert roots.check(str(disk["acme"] / "in.png")) == str(disk["acme"] / "in.png")
    assert roots.check(str(disk["root"] / "alias" / "in.png")) == str(disk["acme"] / "in.png")
    with pytest.raises(OutsideRoots):
        roots.check(str(disk["secret"] / "s.png"))


def test_a_manifest_folder_with_percent_escapes_in_its_name_still_covers_its_files(tmp_path):
    folder = tmp_path / "batch%41 100%"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"x")
    roots = TenantRoots(context(tmp_path), str(folder / "m.jsonl")).of("acme")
    assert roots.check(str(folder / "x.png")) == str(folder / "x.png")
    s3 = TenantRoots(context(tmp_path), "s3://bucket/in%2Fx/m.jsonl").of("acme")
    assert s3.check("s3://bucket/in%2Fx/x.png") == "s3://bucket/in%2Fx/x.png"
    with pytest.raises(OutsideRoots):
        roots.check(f"{folder}/%2e%2e/x.png")


def test_http_is_left_to_allow_http_unless_the_tenant_has_http_roots():
    assert InputRoots.of("tenant acme", [ACME_S3]).check("https://cdn.example.com/x.png")
    roots = InputRoots.of("tenant acme", ["https://CDN.example.com/acme"])
    assert roots.check("https://cdn.example.com/acme/x.png")
    for reference in ("https://cdn.example.com/acme-evil/x.png", "https://cdn.example.com/acme/../b/x.png",
                      "https://cdn.example.com/acme/%2e%2e/b/x.png", "http://cdn.example.com/acme/x.png"):
        with pytest.raises(OutsideRoots):
            roots.check(reference)


def test_roots_are_normalised_and_bad_ones_refused(tmp_path):
    assert normalise_root("s3://bucket/acme") == "s3://bucket/acme/"
    assert normalise_root("s3://bucket") == "s3://bucket/"
    assert normalise_root("data/acme", str(tmp_path)) == f"{tmp_path}/data/acme/"
    assert normalise_root(f"file://{tmp_path}//x/../y") == f"{tmp_path}/y/"
    for bad in ("s3://bucket/acme/../x", "s3://bucket/a%2e", "s3://b/x", "ftp://host/x", "", "s3://bucket//x"):
        with pytest.raises(ValueError):
            normalise_root(bad)


def test_a_narrowing_list_keeps_only_what_both_allow():
    roots = InputRoots.of("tenant acme", ["s3://bucket/acme/", "s3://bucket/shared/", "s3://other/acme/"])
    assert roots.narrowed(["s3://bucket/"]).roots == ("s3://bucket/acme/", "s3://bucket/shared/")
    assert roots.narrowed(["s3://bucket/acme/uploads/"]).roots == ("s3://bucket/acme/uploads/",)
    assert roots.narrowed(["s3://bucket/acme-evil/", "s3://bucket/globex/"]).roots == ()
    with pytest.raises(OutsideRoots, match=r"\(allowed: none\)"):
        roots.narrowed([]).check("s3://bucket/acme/x.png")


# ---- where roots come from ---------------------------------------------------------------------------------------


def write_registry(folder: Path, tenants: dict) -> Path:
    path = folder / "tenants.yaml"
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def test_registry_inputs_are_relative_to_the_registry_file_and_checked(tmp_path):
    registry = TenantRegistry.from_file(write_registry(tmp_path, {
        "acme": {"inputs": ["data/acme", "s3://bucket/acme"]}, "globex": {}}))
    assert registry.input_roots("acme") == (f"{tmp_path}/data/acme/", "s3://bucket/acme/")
    assert registry.input_roots("globex") == () and registry.input_roots("wayne") == ()
    with pytest.raises(ConfigError, match=r"tenants\.acme\.inputs"):
        TenantRegistry.from_file(write_registry(tmp_path, {"acme": {"inputs": ["s3://bucket/acme/../globex"]}}))


def test_job_input_roots_are_relative_to_the_spec_file(tmp_path):
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text("name: j\ninputs: [m.jsonl]\noutput: out\ninput_roots: [shared, 's3://bucket/all']\n")
    assert load_spec(spec_path).input_roots == [f"{tmp_path}/shared/", "s3://bucket/all/"]
    spec_path.write_text("name: j\ninputs: [m.jsonl]\noutput: out\ninput_roots: ['s3://bucket/%2e%2e']\n")
    with pytest.raises(ConfigError, match=r"input_roots\[0\]"):
        load_spec(spec_path)


def context(root: Path, registry: TenantRegistry | None = None, job_roots: tuple[str, ...] = ()) -> ValidateContext:
    return ValidateContext(run_id="r1", layout=OutputLayout(str(root)), storage=Storage(), shards=1,
                           defaults=GenerationDefaults(steps=2, width=64, height=64, guidance=0.0),
                           profile=get_profile("tiny"),
                           registry=registry, input_roots=job_roots)


def test_a_tenant_gets_its_registry_roots_plus_the_jobs_or_else_its_manifests_folder(tmp_path):
    registry = TenantRegistry.from_file(write_registry(tmp_path, {
        "acme": {"inputs": ["s3://bucket/acme/"]}, "initech": {}}))
    manifest = str(tmp_path / "jobs" / "m.jsonl")
    job = (normalise_root("s3://bucket/shared/"),)
    assert TenantRoots(context(tmp_path, registry, job), manifest).of("acme").roots == (
        "s3://bucket/acme/", "s3://bucket/shared/")
    assert TenantRoots(context(tmp_path, registry, job), manifest).of("initech").roots == ("s3://bucket/shared/",)
    assert TenantRoots(context(tmp_path, registry), manifest).of("acme").roots == ("s3://bucket/acme/",)
    assert TenantRoots(context(tmp_path, registry), manifest).of("initech").roots == (f"{tmp_path}/jobs/",)
    assert TenantRoots(context(tmp_path), "s3://bucket/in/m.jsonl").of("anyone").roots == ("s3://bucket/in/",)


def test_validation_rejects_out_of_root_images_in_the_tenants_own_rejects_folder(disk):
    job = disk["root"] / "job"
    job.mkdir()
    (job / "here.png").write_bytes(b"beside the manifest")
    manifest = job / "m.jsonl"
    rows = [
        {"id": "beside", "tenant": "acme", "task": "caption", "image": "here.png"},
        {"id": "up", "tenant": "acme", "task": "caption", "image": "../secret/s.png"},
        {"id": "abs", "tenant": "acme", "task": "caption", "image": str(disk["acme"] / "in.png")},
        {"id": "encoded", "tenant": "globex", "task": "caption", "image": "%2e%2e/secret/s.png"},
        {"id": "s3", "tenant": "globex", "task": "caption", "image": "s3://bucket/acme/x.png"},
    ]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    chunk = build_plan([str(manifest)], Storage(), 100).chunks[0]
    ctx = context(disk["root"] / "out")  # no registry, no job roots: each manifest's own folder only
    stats, staged = validate_chunk(ctx, chunk)
    assert staged.column("id").to_pylist() == ["beside"]
    rejects = {row["id"]: row for row in read_table(ctx.storage, ctx.layout.rejects, hive=True).to_pylist()}
    assert set(rejects) == {"up", "abs", "encoded", "s3"}
    assert {row["field"] for row in rejects.values()} == {"image"}
    assert {row_id: row["tenant"] for row_id, row in rejects.items()} == {
        "up": "acme", "abs": "acme", "encoded": "globex", "s3": "globex"}
    assert rejects["up"]["reason"] == (f"{disk['secret']}/s.png is outside the inputs of tenant acme "
                                       f"(allowed: {job}/)")
    assert stats.reject_fields == {"image": 4} and stats.reject_tenants == {"acme": 2, "globex": 2}


def test_a_reject_of_an_unknown_tenant_goes_to_the_unknown_folder(tmp_path):
    registry = TenantRegistry.from_file(write_registry(tmp_path, {"acme": {}}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "a", "tenant": "wayne", "prompt": "x"}, {"id": "b", "tenant": "../acme", "prompt": "x"},
        {"id": "c", "prompt": "x"}, {"id": "d", "tenant": "acme", "prompt": "x", "width": 100}]))
    chunk = build_plan([str(manifest)], Storage(), 100).chunks[0]
    ctx = context(tmp_path / "out", registry)
    stats, _ = validate_chunk(ctx, chunk)
    assert stats.reject_tenants == {"_unknown": 3, "acme": 1}
    rejects = read_table(ctx.storage, ctx.layout.rejects, hive=True).to_pylist()
    assert {row["id"]: row["tenant"] for row in rejects} == {"a": "_unknown", "b": "_unknown", "c": "_unknown",
                                                             "d": "acme"}


# ---- at fetch time ---------------------------------------------------------------------------------------------


def test_a_link_swapped_after_validation_is_refused_at_the_fetch(disk):
    roots, storage = acme_roots(disk), Storage()
    swap = disk["acme"] / "swap.png"
    swap.symlink_to(disk["acme"] / "in.png")
    assert fetch_bytes(str(swap), storage, roots=roots) == b"acme's own"
    swap.unlink()
    swap.symlink_to(disk["secret"] / "s.png")
    with pytest.raises(OutsideRoots, match="it resolves to"):
        fetch_bytes(str(swap), storage, roots=roots)
    assert fetch_bytes(str(swap), storage) == b"not acme's"  # what the check stood between


def test_the_api_narrows_registry_roots_and_without_a_registry_uses_its_own_list():
    narrowing = ApiSettings(input_prefixes=["s3://bucket/uploads/"])
    acme = narrowing.input_roots("acme", ("s3://bucket/uploads/acme/", "s3://bucket/private/", "/data/acme/"))
    assert acme.roots == ("s3://bucket/uploads/acme/",)  # the registry's private root is not the server's
    assert narrowing.input_roots("initech", ()).roots == ()  # no inputs in the registry: base64 only
    assert narrowing.input_roots("anyone", None).roots == ("s3://bucket/uploads/",)  # no registry at all
    assert ApiSettings().input_roots("acme", ("s3://bucket/acme/",)).roots == ("s3://bucket/acme/",)
    assert ApiSettings().input_roots("anyone", None).roots == ()
    with pytest.raises(ValueError):
        ApiSettings(input_prefixes=["s3://bucket/a/../b/"])


def test_spec_defaults_have_no_job_roots():
    spec = JobSpec.model_validate({"name": "j", "inputs": ["m.jsonl"], "output": "out"})
    assert spec.input_roots == []
    assert os.path.isabs(JobSpec.model_validate(
        {"name": "j", "inputs": ["m.jsonl"], "output": "out", "input_roots": ["x"]}).input_roots[0])
