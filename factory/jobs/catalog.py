"""Catalog expansion: a product catalog and target regions become generation rows (sku x region x size x variant).

A job's `catalog:` section names product files (JSONL, CSV or Parquet, local or s3://; one product per row with
at least `sku` and `tenant`) and regions, each with a prompt template, its locale words and style, and sizes.
Products are planned and read in chunks like manifest rows; each product expands, in the validate stage, into
its rows. A row's id is `<sku>-<region>-<width>x<height>-v<variant>` and its seed a digest of tenant and id, so
both are stable from night to night; its region picks the tenant's style adapter from the tenants registry.

Templates are `str.format` fields naming product fields, the region's `fields`, and `{region}`, `{locale}`,
`{style}`; only plain names are allowed (no attribute or index access), and a product that lacks a field its
region's template needs is rejected with the field named. Optional `checks` ask the VLM about every generated
image (a question, or a caption) through the same replica call; answers land in the result's `checks` column.
"""

from __future__ import annotations

import hashlib
import string
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from factory.routing.requests import MAX_PROMPT_CHARS, MAX_SIDE, MIN_SIDE, ImageCheck

_NAME = r"^[a-z][a-z0-9_]{0,63}$"
RESERVED_FIELDS = frozenset({"region", "locale", "style"})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Size(_Section):
    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)


def template_fields(template: str) -> list[str]:
    """The field names a template uses; refuses anything but plain names (attribute or index access, formats)."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"template field {{{name}}} must be a plain name (letters, digits, '_')")
        if spec or conversion:
            raise ValueError(f"template field {{{name}}} takes no format spec or conversion")
        names.append(name)
    return names


class RegionSpec(_Section):
    template: str | None = Field(default=None, description="Prompt template (default: the catalog's template)")
    locale: str = Field(default="", max_length=32, description="Locale tag, available to templates as {locale}")
    style: str = Field(default="", max_length=500, description="Style words, available as {style}")
    fields: dict[str, str] = Field(default_factory=dict, description="Region wording, available by name")
    sizes: list[Size] | None = Field(default=None, min_length=1, description="Sizes (default: the catalog's)")

    @field_validator("template")
    @classmethod
    def _plain_fields(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value


class CheckSpec(_Section):
    """A question about, or a caption of, every generated image, asked of the VLM in the same replica call."""

    name: str = Field(pattern=_NAME, description="Key of the answer in the result's `checks` column")
    question: str | None = Field(default=None, min_length=1, max_length=500)
    caption: bool = Field(default=False, description="Caption the image instead of asking a question")

    @model_validator(mode="after")
    def _one_kind(self) -> CheckSpec:
        if (self.question is None) == (not self.caption):
            raise ValueError("a check has either a question or caption: true")
        return self


class CatalogSpec(_Section):
    products: list[str] = Field(min_length=1, description="Product files (JSONL, CSV, Parquet; local or s3://)")
    regions: dict[str, RegionSpec] = Field(min_length=1, description="Target regions by name")
    template: str = Field(
        default="{name}, {style}", description="Prompt template for regions without their own"
    )
    sizes: list[Size] = Field(default_factory=list, description="Sizes (default: the job's width and height)")
    variants: int = Field(default=1, ge=1, le=16, description="Images per sku, region and size (seeds differ)")
    regions_field: str = Field(
        default="regions", description="Product field listing the regions a product is sold in (a list or a "
        "comma-separated string); a product without it goes to every region"
    )
    checks: list[CheckSpec] = Field(default_factory=list, description="Questions or captions per generated image")

    @field_validator("template")
    @classmethod
    def _plain_fields(cls, value: str) -> str:
        template_fields(value)
        return value

    @field_validator("regions")
    @classmethod
    def _region_names(cls, value: dict[str, RegionSpec]) -> dict[str, RegionSpec]:
        for name in value:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"region name {name!r} must be letters, digits, '-' or '_' (at most 64)")
        return value

    @field_validator("checks")
    @classmethod
    def _unique_checks(cls, value: list[CheckSpec]) -> list[CheckSpec]:
        names = [check.name for check in value]
        if len(names) != len(set(names)):
            raise ValueError("check names must be unique")
        return value

    def rows_per_product(self) -> int:
        """The most rows one product can expand into (for progress totals and shard counts)."""
        return sum(len(region.sizes or self.sizes or [None]) for region in self.regions.values()) * self.variants


class ExpansionError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def stable_seed(tenant: str, row_id: str) -> int:
    """A seed that depends only on the row's tenant and id: the same every night, different for every row."""
    return int.from_bytes(hashlib.sha256(f"{tenant}/{row_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def expand_product(product: dict[str, Any], catalog: CatalogSpec, default_size: Size) -> list[dict[str, Any]]:
    """The generation rows (manifest-row dicts) of one product; raises ExpansionError naming the field."""
    sku = _text(product.get("sku"))
    if not sku:
        raise ExpansionError("sku", "a product needs a sku (a non-empty string or number)")
    tenant = _text(product.get("tenant"))
    if not tenant:
        raise ExpansionError("tenant", f"product {sku} needs a tenant")
    values = {key: _text(value) for key, value in product.items() if isinstance(key, str)}
    rows = []
    for region in _regions_of(product, catalog, sku):
        spec = catalog.regions[region]
        template = spec.template or catalog.template
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
                rows.append({
                    "id": row_id, "tenant": tenant, "region": region, "task": "generate", "prompt": prompt,
                    "seed": stable_seed(tenant, row_id), "width": size.width, "height": size.height,
                })
    return rows


def checks_of(catalog: CatalogSpec) -> list[ImageCheck]:
    return [ImageCheck(name=check.name, question=check.question) for check in catalog.checks]


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
