"""The edit task in a job's pre-pass and keys, without Ray: every reference resolved and judged against its tenant's
roots, what the profile cannot run refused with the field, staged requests that keep their references, packshot
products expanded into edits, reuse keyed on the references' bytes, and the estimate `factory validate` prints."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_table
from factory.jobs.sources.manifests.catalog import ExpansionError, expand_product
from factory.jobs.sources.manifests.plan import build_plan
from factory.jobs.sources.manifests.reuse import ReuseContext, ReuseRecord, content_key, reused_result
from factory.jobs.sources.manifests.validate import ValidateContext, staged_requests, validate_chunk
from factory.jobs.spec import CatalogSpec, JobSpec, Size, generation_defaults
from factory.model.profiles import get_profile
from factory.routing.batch import reference_digests
from factory.routing.parser import GenerationDefaults, parse_request
from factory.routing.requests import TaskRequest

DEFAULTS = GenerationDefaults(steps=4, width=64, height=64, guidance=3.5, edit_guidance=2.5)


def context(root: Path, profile: str) -> ValidateContext:
    return ValidateContext(run_id="r1", layout=OutputLayout(str(root)), storage=Storage(), defaults=DEFAULTS,
                           profile=get_profile(profile), shards=1)


def validated(tmp_path: Path, rows: list[dict], profile: str = "tiny-flux2"):
    job = tmp_path / "job"
    job.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        (job / name).write_bytes(b"a packshot")
    manifest = job / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ctx = context(tmp_path / f"out-{profile}", profile)
    stats, _ = validate_chunk(ctx, build_plan([str(manifest)], Storage(), 100).chunks[0])
    table = read_table(ctx.storage, ctx.layout.rejects, hive=True)
    rejects = {row["id"]: row for row in table.to_pylist()} if table is not None else {}
    return job, ctx, stats, rejects


def edit_row(row_id: str, **fields) -> dict:
    return {"id": row_id, "tenant": "acme", "task": "edit", "prompt": "on a beach"} | fields


def test_every_reference_is_resolved_beside_its_manifest_and_judged_against_the_tenants_roots(tmp_path):
    job, ctx, stats, rejects = validated(tmp_path, [
        edit_row("two", images=["a.png", "b.png"]),
        edit_row("second-outside", images=["a.png", "../elsewhere/c.png"]),
        edit_row("first-outside", images=["/etc/hostname", "a.png"]),
        edit_row("one-outside", image="%2e%2e/elsewhere/c.png"),
    ])
    assert {row_id: row["field"] for row_id, row in rejects.items()} == {
        "second-outside": "images[1]", "first-outside": "images[0]", "one-outside": "image"}
    assert rejects["second-outside"]["reason"] == (f"{tmp_path}/elsewhere/c.png is outside the inputs of tenant acme "
                                                   f"(allowed: {job}/)")
    (staged,) = staged_requests(ctx, build_plan([str(job / "m.jsonl")], Storage(), 100).chunks[0].id).to_pylist()
    request = TaskRequest.model_validate({key: value for key, value in staged.items() if key != "line"})
    assert request.images == (str(job / "a.png"), str(job / "b.png")) and request.image is None  # a tuple again
    assert stats.tasks == {"edit": 1} and stats.references == 2


def test_what_the_profile_cannot_run_is_a_reject_naming_the_field_and_the_profile(tmp_path):
    rows = [edit_row("two", images=["a.png", "b.png"]), edit_row("one", image="a.png"),
            {"id": "poster", "tenant": "acme", "prompt": "a poster"}]
    _, _, stats, rejects = validated(tmp_path, rows, profile="tiny")
    assert {row_id: row["field"] for row_id, row in rejects.items()} == {"two": "images"}
    assert rejects["two"]["reason"] == "2 reference images; profile tiny takes at most 1"
    _, _, stats, rejects = validated(tmp_path, rows, profile="flux-schnell")
    assert {row_id: row["field"] for row_id, row in rejects.items()} == {"two": "task", "one": "task"}
    assert "profile flux-schnell cannot edit" in rejects["one"]["reason"] and "flux2-klein" in rejects["one"]["reason"]
    assert stats.tasks == {"generate": 1}


def test_the_estimate_counts_edit_pixels_and_a_safety_check_per_reference(tmp_path):
    _, _, stats, _ = validated(tmp_path, [
        edit_row("sized", images=["a.png", "b.png"], width=128, height=64, steps=2),
        edit_row("own-size", image="a.png", steps=3),
        {"id": "poster", "tenant": "acme", "prompt": "a poster", "steps": 2},
    ])
    generator = get_profile("tiny-flux2").generator
    assert stats.edit_step_megapixels == pytest.approx(
        (2 * generator.edit_pixels(2, 128, 64) + 3 * generator.edit_pixels(1)) / 1e6)
    assert stats.edit_step_megapixels == pytest.approx((2 * (128 * 64 + 2 * 256 * 256) + 3 * (256 * 256 * 2)) / 1e6)
    assert stats.generate_step_megapixels == pytest.approx(2 * 64 * 64 / 1e6) and stats.references == 3


def test_edit_rows_take_the_profiles_edit_guidance():
    for name, expected in (("flux-kontext", 2.5), ("tiny", 3.5)):
        spec = JobSpec.model_validate({"name": "j", "inputs": ["m.jsonl"], "output": "out", "profile": name})
        defaults = generation_defaults(spec)
        request = parse_request({"id": "e", "tenant": "t", "prompt": "Edit: x", "image": "a.png"}, defaults)
        assert request.guidance == expected
        assert parse_request({"id": "g", "tenant": "t", "prompt": "x"}, defaults).guidance == defaults.guidance


# ---- catalog products with a packshot ------------------------------------------------------------------------


def catalog(**fields) -> CatalogSpec:
    base = {"products": ["p.jsonl"], "template": "ad for {name}, {style}",
            "edit_template": "place the product on a {scene}, {style}; keep it unchanged",
            "regions": {"eu": {"style": "minimal", "fields": {"scene": "marble counter"}},
                        "na": {"style": "bold", "fields": {"scene": "picnic table"},
                               "edit_template": "the product at a {scene}", "sizes": [{"width": 64, "height": 96}]}}}
    return CatalogSpec.model_validate(base | fields)


def test_a_product_with_a_packshot_becomes_edits_of_it_per_region_and_one_without_stays_text_to_image():
    rows = expand_product({"sku": "cup", "tenant": "acme", "name": "cup", "image": "shots/cup.png"}, catalog(),
                          Size(width=64, height=64))
    assert [(row["id"], row["task"], row["image"], row["prompt"]) for row in rows] == [
        ("cup-eu-64x64-v1", "edit", "shots/cup.png", "place the product on a marble counter, minimal; keep it unchanged"),
        ("cup-na-64x96-v1", "edit", "shots/cup.png", "the product at a picnic table"),
    ]
    assert (rows[1]["width"], rows[1]["height"]) == (64, 96)
    plain = expand_product({"sku": "shoe", "tenant": "acme", "name": "shoe", "image": ""}, catalog(),
                           Size(width=64, height=64))
    assert {row["task"] for row in plain} == {"generate"} and "image" not in plain[0]
    assert plain[0]["prompt"] == "ad for shoe, minimal"


@pytest.mark.parametrize(("product", "spec", "reason"), [
    ({"image": "a.png"}, {"edit_template": None}, "region eu has no edit_template"),
    ({"image": ["a.png", "b.png"]}, {}, "image must be one path or URI"),
])
def test_a_packshot_product_that_cannot_expand_names_the_image(product, spec, reason):
    with pytest.raises(ExpansionError) as refused:
        expand_product({"sku": "s", "tenant": "t", "name": "n"} | product, catalog(**spec), Size(width=64, height=64))
    assert refused.value.field == "image" and reason in refused.value.reason


# ---- reuse keyed on the references' bytes ----------------------------------------------------------------------


def test_an_edit_is_reused_only_with_the_same_reference_bytes():
    ctx = ReuseContext(index_root="out/_reuse", profile="tiny", model_version="v", performance="plain", safety="s")
    request = parse_request(edit_row("e", image="cup.png", seed=1), DEFAULTS)
    same = content_key(request, ctx, reference_digests([b"packshot"]))
    assert same == content_key(request, ctx, reference_digests([b"packshot"])) is not None
    assert content_key(request, ctx, reference_digests([b"re-shot packshot"])) != same
    assert content_key(request, ctx) is None  # its references unread: never reused blind
    generation = parse_request({"id": "g", "tenant": "acme", "prompt": "on a beach", "seed": 1}, DEFAULTS)
    assert content_key(generation, ctx) != same
    record = ReuseRecord(image_uri="out/r0/images/acme/e.png", run_id="r0", row_id="e")
    made = io.BytesIO()
    Image.new("RGB", (80, 48)).save(made, "PNG")
    reused = reused_result(request, record, made.getvalue(), "tiny", reference_digests([b"packshot"]))
    assert reused.reference_uris == ["cup.png"] and reused.reference_sha256 == reference_digests([b"packshot"])
    assert (reused.width, reused.height) == (80, 48)  # sized by its reference: the size it was made at
