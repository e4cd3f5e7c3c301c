"""Catalog expansion and the content key that decides reuse, without Ray."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from factory.jobs.sources.manifests.reuse import ReuseContext, content_key
from factory.jobs.sources.manifests.catalog import ExpansionError, expand_product, stable_seed
from factory.jobs.spec import CatalogSpec, Size
from factory.routing.parser import GenerationDefaults, parse_request
from factory.routing.requests import ImageCheck

DEFAULT = Size(width=256, height=256)


def catalog(**fields) -> CatalogSpec:
    base = {"products": ["p.jsonl"], "template": "ad for {name}, {claim}, {style} ({locale})",
            "regions": {"eu": {"style": "minimal", "locale": "de-DE", "fields": {"claim": "neu"}},
                        "na": {"style": "bold", "locale": "en-US", "fields": {"claim": "new"},
                               "sizes": [{"width": 512, "height": 768}]}}}
    return CatalogSpec.model_validate(base | fields)


def test_a_product_expands_per_region_size_and_variant_with_stable_ids_and_seeds():
    rows = expand_product({"sku": 1234, "tenant": "acme", "name": "shoes"}, catalog(variants=2), DEFAULT)
    assert [row["id"] for row in rows] == ["1234-eu-256x256-v1", "1234-eu-256x256-v2", "1234-na-512x768-v1",
                                           "1234-na-512x768-v2"]
    assert rows[0]["prompt"] == "ad for shoes, neu, minimal (de-DE)" and rows[2]["prompt"] == "ad for shoes, new, bold (en-US)"
    assert (rows[2]["width"], rows[2]["height"], rows[2]["region"]) == (512, 768, "na")
    assert rows[0]["seed"] == stable_seed("acme", "1234-eu-256x256-v1") != rows[1]["seed"]
    again = expand_product({"sku": "1234", "tenant": "acme", "name": "shoes"}, catalog(variants=2), DEFAULT)
    assert again == rows  # the same every night; a numeric sku reads like its text


@pytest.mark.parametrize("regions, expected", [(["na"], ["na"]), ("na, eu", ["eu", "na"]), ([], ["eu", "na"])])
def test_a_product_can_name_its_regions(regions, expected):
    rows = expand_product({"sku": "s", "tenant": "t", "name": "n", "regions": regions}, catalog(), DEFAULT)
    assert [row["region"] for row in rows] == expected


@pytest.mark.parametrize("product, field, reason", [
    ({"tenant": "t", "name": "n"}, "sku", "needs a sku"),
    ({"sku": "s", "name": "n"}, "tenant", "product s needs a tenant"),
    ({"sku": "s", "tenant": "t"}, "name", "region eu's template needs field 'name'"),
    ({"sku": "s", "tenant": "t", "name": "n", "regions": ["mars"]}, "regions", "unknown region 'mars'"),
    ({"sku": "s", "tenant": "t", "name": "n", "regions": 5}, "regions", "must be a list of region names"),
])
def test_a_product_that_cannot_expand_names_the_field(product, field, reason):
    with pytest.raises(ExpansionError) as refused:
        expand_product(product, catalog(), DEFAULT)
    assert refused.value.field == field and reason in refused.value.reason


@pytest.mark.parametrize("template", ["{name.__class__}", "{name[0]}", "{name!r}", "{name:>10}", "{0}"])
@pytest.mark.parametrize("where", ["template", "edit_template", "region template", "region edit_template"])
def test_templates_take_plain_names_only(template, where):
    if where.startswith("region "):
        fields = {"regions": {"eu": {"style": "minimal", where.removeprefix("region "): template}}}
    else:
        fields = {where: template}
    with pytest.raises(ValidationError, match="template field"):
        catalog(**fields)


def test_checks_have_a_question_or_are_captions():
    spec = catalog(checks=[{"name": "visible", "question": "Is the product visible?"}, {"name": "alt", "caption": True}])
    assert [check.caption for check in spec.checks] == [False, True]
    with pytest.raises(ValidationError, match="either a question or caption"):
        catalog(checks=[{"name": "x"}])
    assert catalog(variants=3).rows_per_product() == 6


def request(**changes):
    adapter = changes.pop("adapter", None)  # resolved by the registry, as `tenant/name`
    row = {"id": "r", "tenant": "acme", "prompt": "ad", "seed": 1, "region": "eu"} | changes
    made = parse_request(row, GenerationDefaults(steps=4, width=256, height=256, guidance=3.5))
    return made.model_copy(update={"adapter": adapter})


def context(**changes) -> ReuseContext:
    base = dict(index_root="/o/_reuse", profile="tiny", model_version="tiny-v1", performance="plain", safety="s1",
                adapters={"acme/eu": ("a" * 64, 1.0)})
    return ReuseContext(**(base | changes))


def test_the_content_key_changes_with_every_input_of_the_image_and_nothing_else():
    key = content_key(request(), context())
    assert key == content_key(request(id="another-id"), context())  # the row's id does not make the image
    for changed in (request(prompt="other"), request(seed=2), request(region="na"), request(width=128),
                    request(adapter="acme/eu"), request().model_copy(update={"checks": (ImageCheck(name="v"),)})):
        assert content_key(changed, context()) != key
    for ctx in (context(performance="compile=regional"), context(model_version="tiny-v2"), context(safety="s2")):
        assert content_key(request(), ctx) != key
    assert content_key(request(adapter="acme/eu"), context(adapters={"acme/eu": ("b" * 64, 1.0)})) != \
        content_key(request(adapter="acme/eu"), context())
    assert content_key(request(adapter="acme/unknown"), context()) is None  # unidentifiable file: never reused
    assert content_key(request(task="caption", image="x.png", prompt=None), context()) is None
