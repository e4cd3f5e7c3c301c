"""Catalog expansion: a product catalog and target regions become ad rows (sku x region x size x variant).

A job's `catalog:` section names product files (JSONL, CSV or Parquet, local or s3://; one product per row with
at least `sku` and `tenant`) and regions, each with a prompt template, its locale words and style, and sizes.
Products are planned and read in chunks like manifest rows; each product expands, in the validate stage, into
its rows. A row's id is `<sku>-<region>-<width>x<height>-v<variant>` and its seed a digest of tenant and id, so
both are stable from night to night; its region picks the tenant's style adapter from the tenants registry.

The catalog is a transform over manifest records, not a source of its own: its product files are planned and
read as manifests are, and `CatalogExpansion` turns each product record into the records of its rows, which are
then validated like any manifest row.

A product without a packshot becomes text-to-image rows through its region's `template`. A product with one
(`image`: a path relative to the product file, or an s3:// URI) becomes `edit` rows of that image through its
region's `edit_template` (an instruction that changes the scene and keeps the product), at the region's sizes:
the ad shows the tenant's actual product. Its image is then checked and read like any row's image (the tenant's
input roots, the input safety check), and its bytes' sha256 is what reuse across nights keys on.

Templates are `str.format` fields naming product fields, the region's `fields`, and `{region}`, `{locale}`,
`{style}`; only plain names are allowed (no attribute or index access), and a product that lacks a field its
region's template needs is rejected with the field named. Optional `checks` ask the VLM about every generated or
edited image (a question, or a caption) through the same replica call; answers land in the result's `checks`
column.
"""

from __future__ import annotations

import hashlib
from typing import Any

from factory.jobs.sources.manifests.files import ManifestRecord
from factory.jobs.spec import CatalogSpec, Size, template_fields
from factory.routing.requests import MAX_PROMPT_CHARS, ImageCheck, TaskRequest

class ExpansionError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def stable_seed(tenant: str, row_id: str) -> int:
    """A seed that depends only on the row's tenant and id: the same every night, different for every row."""
    return int.from_bytes(hashlib.sha256(f"{tenant}/{row_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def expand_product(product: dict[str, Any], catalog: CatalogSpec, default_size: Size) -> list[dict[str, Any]]:
    """The rows (manifest-row dicts) of one product: edits of its packshot when it has one, else generations;
    raises ExpansionError naming the field."""
    sku = _text(product.get("sku"))
    if not sku:
        raise ExpansionError("sku", "a product needs a sku (a non-empty string or number)")
    tenant = _text(product.get("tenant"))
    if not tenant:
        raise ExpansionError("tenant", f"product {sku} needs a tenant")
    packshot = _packshot(product, sku)
    values = {key: _text(value) for key, value in product.items() if isinstance(key, str)}
    rows = []
    for region in _regions_of(product, catalog, sku):
        spec = catalog.regions[region]
        template = spec.template or catalog.template
        if packshot is not None:
            template = spec.edit_template or catalog.edit_template
            if template is None:
                raise ExpansionError("image", f"product {sku} has a packshot (image), but region {region} has no "
                                     "edit_template and neither has the catalog")
        words = {**values, **spec.fields, "region": region, "locale": spec.locale, "style": spec.style}
        missing = [name for name in template_fields(template) if not words.get(name)]
        if missing:
            raise ExpansionError(missing[0], f"product {sku}: region {region}'s template needs field "
                                 f"{missing[0]!r}, which the product does not have")
        prompt = " ".join(template.format_map(words).split())
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ExpansionError("prompt", f"product {sku}: the {region} prompt is {len(prompt)} characters, "
                                 f"more than {MAX_PROMPT_CHARS}")
        for size in spec.sizes or catalog.sizes or [default_size]:
            for variant in range(1, catalog.variants + 1):
                row_id = f"{sku}-{region}-{size.width}x{size.height}-v{variant}"
                row = {
                    "id": row_id, "tenant": tenant, "region": region, "task": "generate", "prompt": prompt,
                    "seed": stable_seed(tenant, row_id), "width": size.width, "height": size.height,
                }
                if packshot is not None:
                    row.update(task="edit", image=packshot)
                rows.append(row)
    return rows


def checks_of(catalog: CatalogSpec) -> list[ImageCheck]:
    return [ImageCheck(name=check.name, question=check.question) for check in catalog.checks]


class CatalogExpansion:
    """The transform a product file's records go through before validation: one product record in, the records
    of its rows out (same file and line); after validation, each request gets the catalog's checks."""

    def __init__(self, catalog: CatalogSpec, default_size: Size):
        self.catalog = catalog
        self.default_size = default_size
        self.checks = tuple(checks_of(catalog))

    def records(self, record: ManifestRecord) -> list[ManifestRecord]:
        """The product's rows as manifest records; raises ExpansionError naming the field that stops it."""
        raw = record.raw
        assert raw is not None
        product = {key: value for key, value in raw.items() if not (isinstance(key, str) and key.startswith("_"))}
        rows = expand_product(product, self.catalog, self.default_size)
        return [ManifestRecord(record.source, record.line, row) for row in rows]

    def finish(self, request: TaskRequest) -> TaskRequest:
        """A validated row's request, with the questions the catalog asks of every generated or edited image."""
        return request.model_copy(update={"checks": self.checks}) if self.checks else request


def _packshot(product: dict[str, Any], sku: str) -> str | None:
    """The product's packshot URI, or None (absent, or blank as a CSV cell would be)."""
    image = product.get("image")
    if image is None or (isinstance(image, str) and not image.strip()):
        return None
    if not isinstance(image, str):
        raise ExpansionError("image", f"product {sku}: image must be one path or URI (its packshot)")
    return image.strip()


def _regions_of(product: dict[str, Any], catalog: CatalogSpec, sku: str) -> list[str]:
    listed = product.get(catalog.regions_field)
    if listed is None or listed == "" or listed == []:  # blank, as a CSV cell would be: every region
        return list(catalog.regions)
    names = [part.strip() for part in listed.split(",")] if isinstance(listed, str) else listed
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ExpansionError(catalog.regions_field, f"product {sku}: {catalog.regions_field} must be a list of "
                             "region names or a comma-separated string")
    unknown = sorted({name for name in names if name and name not in catalog.regions})
    if unknown:
        raise ExpansionError(catalog.regions_field, f"product {sku}: unknown region {unknown[0]!r} "
                             f"(the catalog has {', '.join(sorted(catalog.regions))})")
    return [name for name in catalog.regions if name in names]  # catalog order: stable ids and row order


def _text(value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # CSV and Parquet readers may give 1234 as 1234.0
    return str(value).strip()
