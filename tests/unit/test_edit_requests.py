"""The `edit` task without models: how a row becomes an edit, what it must carry, the output size it gets when it
names none, and which profiles can run it (the check `factory validate` and the replicas share)."""

from __future__ import annotations

import pytest

from factory.model.generator import fit_size
from factory.model.profiles import PROFILES, get_profile
from factory.routing.capabilities import check_capabilities
from factory.routing.local import profile_defaults
from factory.routing.parser import GenerationDefaults, RequestError, parse_request, with_adapter
from factory.routing.requests import Task
from factory.routing.tenants import TenantRegistry

DEFAULTS = GenerationDefaults(steps=4, width=256, height=256, guidance=3.5, edit_guidance=2.5)


def edit(**row):
    return parse_request({"id": "r1", "tenant": "acme"} | row, DEFAULTS)


# ---- the size an edit without width/height gets --------------------------------------------------------------


@pytest.mark.parametrize(("size", "pixels", "expected"), [
    ((1024, 1024), 256 * 256, (256, 256)),        # square stays square
    ((4000, 3000), 256 * 256, (288, 224)),        # 4:3 -> 1.29, the closest multiples of 16 within the budget
    ((3000, 4000), 256 * 256, (224, 288)),        # portrait mirrors landscape
    ((1920, 1080), 1024 * 1024, (1360, 768)),     # 16:9 at one megapixel
    ((451, 300), 256 * 256, (304, 208)),          # a small photo is scaled up to the budget
    ((10000, 100), 256 * 256, (2048, 16)),        # a banner: its long side capped, the short one follows
    ((7, 5), 256 * 256, (304, 208)),
])
def test_the_output_keeps_the_first_references_aspect_within_the_pixel_budget(size, pixels, expected):
    width, height = fit_size(*size, pixels)
    assert (width, height) == expected
    assert width % 16 == 0 and height % 16 == 0 and width * height <= pixels


def test_fit_size_never_exceeds_the_budget_and_stays_close_to_the_aspect():
    for width in range(16, 4000, 37):
        for height in (17, 300, 1000, 3999):
            fitted = fit_size(width, height, 256 * 256)
            assert fitted[0] * fitted[1] <= 256 * 256 and fitted[0] % 16 == 0 == fitted[1] % 16
            if 1 / 8 < width / height < 8:  # far from the side limits: within one step of 16 of the aspect
                assert abs(fitted[0] / fitted[1] - width / height) <= 16 / min(fitted) * (1 + width / height)


# ---- parsing ------------------------------------------------------------------------------------------------


def test_an_explicit_task_or_an_edit_prompt_with_an_image_make_an_edit():
    by_task = edit(task="edit", prompt="put it on a beach", image="shoe.png")
    by_prefix = edit(prompt="Edit: put it on a beach", image="shoe.png")
    for request in (by_task, by_prefix):
        assert request.task is Task.EDIT and request.prompt == "put it on a beach"
        assert request.images == ("shoe.png",) and request.image is None and request.inputs == ("shoe.png",)
        assert (request.width, request.height) == (None, None)  # decided from the reference
        assert request.steps == 4 and request.guidance == 2.5  # the profile's edit guidance
        assert request.seed == edit(prompt="a beach", id="r1").seed  # derived from (tenant, id) as for generation
    assert edit(task="generate", prompt="Edit: a poster").task is Task.GENERATE  # the explicit task wins


def test_several_references_from_a_list_or_a_csv_cell():
    listed = edit(prompt="Edit: the two together", images=["a.png", "s3://b/c.png"])
    from_csv = edit(prompt="Edit: the two together", images='["a.png", "s3://b/c.png"]')
    assert listed.images == from_csv.images == ("a.png", "s3://b/c.png")
    assert edit(task="edit", prompt="x", images="one.png").images == ("one.png",)
    sized = edit(task="edit", prompt="x", image="a.png", width=512, height=256, seed=9, steps=2, guidance=1.0)
    assert (sized.width, sized.height, sized.seed, sized.steps, sized.guidance) == (512, 256, 9, 2, 1.0)


@pytest.mark.parametrize(("row", "field", "reason"), [
    ({"task": "edit", "prompt": "put it on a beach"}, "image", "required for edit"),
    ({"prompt": "Edit: put it on a beach"}, "image", "required for edit"),
    ({"task": "edit", "image": "a.png"}, "prompt", "required for edit"),
    ({"prompt": "Edit:  ", "image": "a.png"}, "prompt", "required for edit"),
    ({"task": "edit", "prompt": "x", "image": "a.png", "images": ["b.png"]}, "images", "not both"),
    ({"task": "edit", "prompt": "x", "images": []}, "images", "at least 1"),
    ({"task": "edit", "prompt": "x", "images": "[not json"}, "images", "JSON list"),
    ({"task": "edit", "prompt": "x", "images": [f"{i}.png" for i in range(11)]}, "images", "at most 10"),
    ({"task": "edit", "prompt": "x", "image": "a.png", "width": 512}, "height", "together"),
    ({"prompt": "a poster", "images": ["a.png"]}, "images", "text-to-image takes no input image"),
    ({"task": "caption", "images": ["a.png"]}, "images", "only edit rows take several images"),
    ({"task": "paint", "prompt": "x"}, "task", "generate, caption, vqa or edit"),
])
def test_malformed_edit_rows_name_their_field(row, field, reason):
    with pytest.raises(RequestError) as refused:
        edit(**row)
    assert refused.value.field == field and reason in refused.value.reason


def test_edit_rows_carry_their_tenants_adapter(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  acme:\n    default: brand\n    adapters:\n      brand: {uri: /a/brand.safetensors}\n")
    registry = TenantRegistry.from_file(path)
    assert with_adapter(edit(task="edit", prompt="x", image="a.png"), registry).adapter == "acme/brand"
    assert with_adapter(edit(task="caption", image="a.png"), registry).adapter is None


def test_profile_defaults_carry_the_edit_guidance():
    assert profile_defaults(get_profile("flux-kontext")).edit_guidance == 2.5
    assert profile_defaults(get_profile("flux-dev")).edit_guidance is None


# ---- capabilities -----------------------------------------------------------------------------------------------


def test_profiles_declare_what_they_edit_and_under_which_licence():
    assert {name: p.max_references for name, p in PROFILES.items() if p.max_references} == {
        "tiny": 1, "tiny-flux2": 4, "flux-kontext": 1, "flux2-klein": 4}
    assert get_profile("flux2-klein").licence.startswith("Apache-2.0")
    assert get_profile("flux-schnell").licence.startswith("Apache-2.0")
    assert "Non-Commercial" in get_profile("flux-dev").licence and "Non-Commercial" in get_profile("flux-kontext").licence
    kontext = get_profile("flux-kontext")
    assert kontext.edit_transformer.source == "black-forest-labs/FLUX.1-Kontext-dev"
    assert "edit_transformer" in kontext.components  # pinned to a commit with the rest, recorded in model_version
    assert get_profile("flux2-klein").generator.source == "black-forest-labs/FLUX.2-klein-4B"
    for name in ("flux-kontext", "flux2-klein"):  # the replica warms up an edit before its first row
        assert any(shape.references for shape in get_profile(name).generator.performance.warmup)
    # What `factory validate` multiplies by steps for an edit: output plus reference pixels.
    assert get_profile("flux2-klein").generator.edit_pixels(3) == 4 * 1024 * 1024


def test_a_profile_that_cannot_edit_refuses_edit_rows_naming_the_profile():
    request = edit(task="edit", prompt="x", image="a.png")
    with pytest.raises(RequestError) as refused:
        check_capabilities(request, get_profile("flux-dev"))
    assert refused.value.field == "task"
    assert "profile flux-dev cannot edit" in refused.value.reason and "flux2-klein" in refused.value.reason
    check_capabilities(edit(prompt="a poster"), get_profile("flux-dev"))  # generation rows are fine


@pytest.mark.parametrize(("profile", "references", "allowed"), [
    ("tiny", 1, True), ("tiny", 2, False), ("flux-kontext", 2, False), ("tiny-flux2", 4, True),
    ("tiny-flux2", 5, False), ("flux2-klein", 3, True),
])
def test_several_references_only_where_the_profile_takes_them(profile, references, allowed):
    request = edit(task="edit", prompt="x", images=[f"{i}.png" for i in range(references)])
    if allowed:
        check_capabilities(request, get_profile(profile))
        return
    with pytest.raises(RequestError) as refused:
        check_capabilities(request, get_profile(profile))
    assert refused.value.field == "images"
    assert refused.value.reason == (f"{references} reference images; profile {profile} takes at most "
                                    f"{get_profile(profile).max_references}")
