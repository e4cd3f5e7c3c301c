"""Job specs: a typed YAML file saying what to read, where to write, which profile to run and how hard to push.

Every field has a description, and unknown keys are errors (`extra="forbid"`), so a typo such as
`serve.replcas` is reported by name instead of silently running with the default. `load_spec` applies
``--set key=value`` overrides before validation and turns every problem into one `ConfigError` line.
"""

from __future__ import annotations

import difflib
import os
import re
import string
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator,
)
from pydantic_core import PydanticCustomError

from factory.errors import ConfigError, Loc, one_line, validation_problems
from factory.io.roots import normalise_root
from factory.io.storage import join
from factory.model.clip import pin_clip, scoring_model
from factory.model.lora.ref import BASE_ADAPTER
from factory.model.performance import Performance
from factory.model.profiles import get_profile, with_revisions
from factory.model.revisions import hub_revisions, pin_revisions
from factory.model.training.options import TrainOptions
from factory.quality.groups import BootstrapOptions
from factory.routing.parser import GenerationDefaults
from factory.routing.requests import MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, MIN_SIDE
from factory.routing.tenants import is_name
from factory.safety.policy import SafetyPolicy

log = structlog.get_logger(__name__)

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_CONTEXT_SPEC_DIR = "spec_dir"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Defaults(_Section):
    """Values for rows that leave them out. A row's own value always wins."""

    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Denoising steps for generate rows")
    width: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16, description="Image width in pixels (multiple of 16)"
    )
    height: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16, description="Image height in pixels (multiple of 16)"
    )
    guidance: float | None = Field(default=None, ge=0.0, le=30.0, description="Guidance scale for generate rows")


class ServeConfig(_Section):
    """How the Serve replicas that do the work are deployed."""

    app_name: str | None = Field(
        default=None,
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Serve application to run in. Unset: the job's own app, `factory-<job name>`, deployed for "
        "the run (and deleted after it unless keep_warm). Set: an app to join, such as a warm serving fleet; "
        "it is deployed if absent, and a job refuses it if it is serving another config",
    )
    keep_warm: bool = Field(
        default=False,
        description="Leave the job's own app running after the run, so the next run of the same config starts "
        "warm; otherwise its replicas give their CPUs/GPUs back when the run ends",
    )
    replicas: int = Field(default=1, ge=1, description="Number of model replicas (one per GPU or CPU slot)")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per replica")
    num_gpus: float | None = Field(
        default=None, ge=0,
        description="GPUs reserved per replica. Unset: 1 when the profile's generator or VLM runs on a GPU "
        "(device 'cuda' or 'auto', as flux-dev and flux-schnell do), 0 for a CPU profile such as tiny; set 0 to "
        "run a GPU profile on CPU (a CPU-only cluster). A run fails at once when the cluster has fewer GPUs than "
        "one replica needs",
    )
    gpus_on_demand: bool = Field(
        default=False,
        description="The cluster adds GPU nodes when replicas ask for them (KubeRay or launcher autoscaling from "
        "zero GPU workers): skip the up-front check that the cluster has a GPU, and wait for one up to "
        "ready_timeout_s instead",
    )
    ready_timeout_s: float = Field(
        default=1800.0, gt=0,
        description="Replicas must be running within this many seconds of the deploy (model download, load and "
        "compile warm-up included), or the run stops with one line saying why, instead of waiting forever on "
        "replicas the cluster cannot place",
    )
    max_ongoing_requests: int = Field(
        default=8, ge=1,
        description="Requests a replica accepts at once; keep low for diffusion, about 2x max_batch_size so "
        "the next batch is queued while one runs",
    )
    max_batch_size: int = Field(default=4, ge=1, description="Most requests a replica runs in one model call")
    batch_wait_timeout_s: float = Field(
        default=0.05, ge=0, description="How long a replica waits to fill a batch before running a smaller one"
    )
    max_adapters: int = Field(
        default=4, ge=1, description="LoRA adapters a replica keeps loaded (LRU); also Serve's "
        "max_num_models_per_replica, so requests go to replicas that already hold their adapter"
    )
    max_adapter_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="Bytes of LoRA weights a replica keeps loaded (LRU)"
    )
    lora_hotswap_rank: int | None = Field(
        default=None, ge=1,
        description="Load adapters by hot-swapping them into fixed slots padded to this rank, so a "
        "torch.compile'd transformer is not recompiled per adapter; adapters of a higher rank, or with "
        "text-encoder layers, are refused. Pair it with max_adapters: 1. Unset: plain loading, except on a "
        "compiled profile, which hot-swaps into one slot at the largest rank of the job's adapters",
    )


class ErrorBudget(_Section):
    """How many failed rows a job tolerates before it stops (a broken model should not burn a whole run)."""

    max_failed: int | None = Field(default=None, ge=0, description="Stop once more rows than this have failed")
    max_failed_fraction: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Stop once more than this fraction of finished rows have failed"
    )
    min_rows: int = Field(
        default=20,
        ge=1,
        description="Finished rows needed before the fraction is judged (one early failure is not 100 %)",
    )

    def exceeded(self, failed: int, finished: int) -> bool:
        """True once `failed` of `finished` rows is over budget."""
        if self.max_failed is not None and failed > self.max_failed:
            return True
        return finished >= self.min_rows and failed > self.max_failed_fraction * finished


def _input_from_spec_dir(value: str, info: ValidationInfo) -> str:
    # Per item, so an error names inputs[i] (or sources[i]) rather than the whole list.
    return _resolve_location(value, _spec_dir(info))


def _root_from_spec_dir(value: str, info: ValidationInfo) -> str:
    return normalise_root(value, _spec_dir(info))


class RetryConfig(_Section):
    """Transient faults (a replica that died, a timeout, a dropped connection, Serve shedding load) are retried
    with exponential backoff before a row is called failed."""

    attempts: int = Field(default=4, ge=1, le=20, description="Calls per row, the first included")
    backoff_s: float = Field(default=1.0, ge=0, description="Wait before the second call; doubles per attempt")
    max_backoff_s: float = Field(default=30.0, ge=0, description="Longest wait between two calls")


class CommitConfig(_Section):
    """Rows are committed in whole Parquet files; smaller, more frequent files lose less work to a crash."""

    rows: int = Field(default=256, ge=1, description="Commit once this many of a chunk's rows are waiting")
    seconds: float = Field(default=5.0, gt=0, description="Commit at least this often while rows are waiting")


class ArchiveSpec(_Section):
    """Image archives to caption (`factory caption`): every image in them becomes a result row, with a caption,
    an optional answer, a safety verdict and its metadata. Decoding and resizing happen in the job's workers."""

    sources: list[Annotated[str, Field(min_length=1), AfterValidator(_input_from_spec_dir)]] = Field(
        min_length=1,
        description="Local folders (recursive), s3:// prefixes, tar shards in the WebDataset layout (brace "
        "patterns such as shard-{000..009}.tar, local or s3://; .tar, .tar.gz, .tgz) and zip files; relative "
        "paths are relative to the spec file's folder",
    )
    prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS,
        description="Caption instruction ('Describe: ...' or plain text); unset: the profile's caption prompt",
    )
    question: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="Also ask every image this question (answer column)"
    )
    sidecars: bool = Field(
        default=False,
        description="Write dataset/<name>.<ext> (a copy of each passed image) and dataset/<name>.txt (its "
        "caption): the layout kohya sd-scripts and ai-toolkit train LoRAs from",
    )
    tenant: str = Field(
        default="archive", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Tenant the rows are charged to (results/tenant=<tenant>/)",
    )
    chunk_objects: int = Field(
        default=1000, ge=1, le=100_000,
        description="Objects per chunk of a folder, prefix or zip (a tar shard is one chunk): the unit of work, "
        "commit and resume",
    )
    dedup: bool = Field(
        default=True, description="Caption each distinct image (by sha256 of its bytes) once; every other copy "
        "gets a row linked to it (duplicate_of) with the same caption and verdict",
    )
    dedup_wait_s: float = Field(
        default=120.0, ge=0, description="How long a copy waits at the end of its chunk for the captioned row "
        "of a copy in another chunk; past it, it is captioned itself",
    )
    max_bytes: int = Field(default=32 * 1024 * 1024, ge=1, description="Larger files and members are rejected")
    max_pixels: int = Field(
        default=40_000_000, ge=1, description="Images with more pixels are rejected (decompression bombs)"
    )


# ---- the quality and benchmarks sections (scored by factory.jobs.engine.scores and factory.jobs.report.quality;
#      benchmark files staged as manifests by factory.jobs.sources.manifests.benchmarks) ---------------------


class QualitySpec(_Section):
    """What a run scores (README "Quality"). With the section, the scores it turns on are result columns, summed
    per tenant, region and adapter in the summary and written with bootstrap intervals to quality.json; without
    it nothing is scored and no CLIP model is loaded."""

    clip_score: bool = Field(
        default=True, description="CLIPScore of every ok generated or edited image against its prompt, in the "
        "replica that made it, with the profile's quality.clip model (loaded once per replica)"
    )
    vqa: bool = Field(default=True, description="VQA accuracy of ok VQA rows that carry `answers`")
    captions: bool = Field(
        default=True, description="BLEU-1..4 and CIDEr-D of ok caption rows that carry `references`"
    )
    clip_revision: str | None = Field(
        default=None, description="The CLIP model's hub revision (a commit, branch or tag; unset: the profile's), "
        "resolved to its commit once when the job starts, like `revisions`"
    )
    bootstrap: BootstrapOptions = Field(
        default_factory=BootstrapOptions, description="How quality.json's confidence intervals are drawn"
    )


class BenchmarkSpec(_Section):
    """A public benchmark's published files, read as the rows of a manifest: COCO captions (caption rows with their
    human captions as `references`), VQAv2 questions with their annotations (VQA rows with the ten human
    `answers`), TextCaps (caption rows with `references`)."""

    format: Literal["coco_captions", "vqav2", "textcaps"] = Field(description="The published layout")
    annotations: Annotated[str, Field(min_length=1), AfterValidator(_input_from_spec_dir)] | None = Field(
        default=None, description="coco_captions: captions_<split>.json; vqav2: v2_mscoco_<split>_annotations.json "
        "(unset for a test split: rows without answers); textcaps: TextCaps_0.1_<split>.json. Local or s3://, "
        "relative to the spec file's folder"
    )
    questions: Annotated[str, Field(min_length=1), AfterValidator(_input_from_spec_dir)] | None = Field(
        default=None, description="vqav2: v2_OpenEnded_mscoco_<split>_questions.json"
    )
    images: Annotated[str, Field(min_length=1), AfterValidator(_root_from_spec_dir)] = Field(
        description="The folder (or s3:// prefix) holding the benchmark's images; this entry's rows may read "
        "images there (an input root for them alone), as the operator names it"
    )
    tenant: str = Field(
        default="eval", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Tenant the rows belong to (results/tenant=<tenant>/)"
    )
    file_pattern: str | None = Field(
        default=None, description="COCO and VQAv2: an image's file name from its id, e.g. '%012d.jpg' for the 2017 "
        "splits (default: COCO_val2014_%012d.jpg; COCO captions files that name their images are read by name)"
    )
    flat: bool = Field(
        default=False, description="textcaps: images are found by file name alone (TextVQA's flat train_images/)"
    )
    limit: int | None = Field(default=None, ge=1, description="Only the first this many rows (a quick evaluation)")

    @model_validator(mode="after")
    def _files_of_the_format(self) -> BenchmarkSpec:
        if self.format == "vqav2" and self.questions is None:
            raise ValueError("questions: required for vqav2 (the questions file)")
        if self.format != "vqav2" and self.questions is not None:
            raise ValueError(f"questions: only vqav2 has a questions file, not {self.format}")
        if self.format != "vqav2" and self.annotations is None:
            raise ValueError(f"annotations: required for {self.format}")
        if self.file_pattern is not None and self.format == "textcaps":
            raise ValueError("file_pattern: textcaps names its images itself")
        return self


# ---- the train section (read by factory.jobs.sources.training, trained by factory.jobs.training) ---------


def _name(value: str) -> str:
    if not is_name(value):
        raise ValueError(f"{value!r} must be a name of letters, digits, '.', '_' or '-' (not a path)")
    return value


Name = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_name)]


class TrainScaling(_Section):
    """Ray Train's `ScalingConfig`: data-parallel workers, one per GPU (DDP, NCCL) or per CPU slot (gloo)."""

    workers: int = Field(default=1, ge=1, le=1024, description="Training workers; options.batch_size is split "
                         "evenly between them")
    use_gpu: bool | None = Field(default=None, description="One GPU per worker; unset: when the profile runs on "
                                 "a GPU")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each worker reserves (torch uses as many "
                                   "threads)")


class TrainEncoding(_Section):
    """The training data set's model stage: Ray Data actors holding only the VAE and text encoders, each image and
    caption encoded once."""

    actors: int = Field(default=1, ge=1, le=256, description="Encoder actors (each loads the encoders once)")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Images an actor encodes between two reads "
                            "ahead (each image is encoded on its own: its latents never depend on its neighbours)")
    chunk_images: int = Field(default=64, ge=1, le=100_000, description="Images (with their captions) per chunk "
                              "of a folder or prefix: the unit of work, commit and resume; a tar shard or a "
                              "results file is one chunk")


class TrainSection(_Section):
    """One style adapter for a tenant (and region), trained from captioned images: the run's chunks are those
    images, encoded once (its model stage), and the adapter is trained on Ray Train from what they became."""

    tenant: Name = Field(description="Tenant the adapter is trained for and registered under")
    region: Name | None = Field(default=None, description="Region the adapter styles; registered as the tenant's "
                                "adapter for that region. Unset: registered as the tenant's default adapter")
    adapter: Name = Field(description="Adapter name in the tenant's registry entry (a name, not a path)")
    sources: list[Annotated[str, Field(min_length=1), AfterValidator(_input_from_spec_dir)]] = Field(
        min_length=1,
        description="Captioned images: folders and s3:// prefixes of images with a .txt, .caption or .json "
        "caption beside each (a `factory caption --sidecars` run's dataset/ folder is one), tar shards in the "
        "WebDataset layout (brace patterns such as shard-{000..009}.tar), or a caption run's results (a .parquet "
        "file, or its results/ folder); relative paths are relative to the spec file's folder",
    )
    format: Literal["diffusers", "kohya"] = Field(
        default="diffusers", description="Adapter file layout: diffusers/peft (what diffusers' training scripts "
        "write) or kohya keys (lora_down/lora_up, read back by diffusers' converter)")
    add_to_registry: bool = Field(default=False, description="Register the trained adapter in the job's tenants "
                                  "registry (`tenants`) under the tenant and region, with its sha256 (`factory "
                                  "train --register`)")
    options: TrainOptions = Field(default_factory=TrainOptions, description="How the adapter is trained")
    scaling: TrainScaling = Field(default_factory=TrainScaling, description="Training workers (Ray Train "
                                  "ScalingConfig)")
    encoding: TrainEncoding = Field(default_factory=TrainEncoding, description="The encode-once model stage "
                                    "(Ray Data)")

    @field_validator("adapter")
    @classmethod
    def _not_base(cls, value: str) -> str:
        if value == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for the base model")
        return value

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainSection:
        if self.options.batch_size % self.scaling.workers:
            raise ValueError(f"options.batch_size: {self.options.batch_size} is not a multiple of scaling.workers "
                             f"({self.scaling.workers})")
        return self


def check_trainable_profile(name: str) -> None:
    """Training runs on a FLUX.1 transformer (FluxTransformer2DModel); any other profile is one line."""
    try:
        profile = get_profile(name)
    except ConfigError as error:  # its line names the known profiles
        raise ValueError(str(error).removeprefix("profile: ")) from None
    if profile.generator.family != "flux1":
        raise ValueError(f"profile {name!r} runs {profile.generator.family}; training supports FLUX.1 profiles "
                         "(FluxTransformer2DModel)")


# ---- the catalog section (expanded by factory.jobs.sources.manifests.catalog) -------------------------------

_CHECK_NAME = r"^[a-z][a-z0-9_]{0,63}$"


class _CatalogSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Size(_CatalogSection):
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


def _plain_template(template: str) -> str:
    template_fields(template)
    return template


Template = Annotated[str, AfterValidator(_plain_template)]


class RegionSpec(_CatalogSection):
    template: Template | None = Field(default=None, description="Prompt template (default: the catalog's template)")
    edit_template: Template | None = Field(
        default=None, description="Instruction template for products with a packshot (`image`), which become edit "
        "rows (default: the catalog's edit_template)"
    )
    locale: str = Field(default="", max_length=32, description="Locale tag, available to templates as {locale}")
    style: str = Field(default="", max_length=500, description="Style words, available as {style}")
    fields: dict[str, str] = Field(default_factory=dict, description="Region wording, available by name")
    sizes: list[Size] | None = Field(default=None, min_length=1, description="Sizes (default: the catalog's)")


class CheckSpec(_CatalogSection):
    """A question about, or a caption of, every generated image, asked of the VLM in the same replica call."""

    name: str = Field(pattern=_CHECK_NAME, description="Key of the answer in the result's `checks` column")
    question: str | None = Field(default=None, min_length=1, max_length=500)
    caption: bool = Field(default=False, description="Caption the image instead of asking a question")

    @model_validator(mode="after")
    def _one_kind(self) -> CheckSpec:
        if (self.question is None) == (not self.caption):
            raise ValueError("a check has either a question or caption: true")
        return self


class CatalogSpec(_CatalogSection):
    products: list[str] = Field(min_length=1, description="Product files (JSONL, CSV, Parquet; local or s3://)")
    regions: dict[str, RegionSpec] = Field(min_length=1, description="Target regions by name")
    template: Template = Field(
        default="{name}, {style}", description="Prompt template for regions without their own"
    )
    edit_template: Template | None = Field(
        default=None, description="Instruction template for regions without their own, for products that carry a "
        "packshot in `image` (relative to the product file, or s3://): such a product becomes edit rows that keep "
        "it and change the scene, e.g. 'place the product on a {scene}, {style}; keep the product, its label and "
        "its colours unchanged'. A product without `image` stays text-to-image"
    )
    sizes: list[Size] = Field(default_factory=list, description="Sizes (default: the job's width and height)")
    variants: int = Field(default=1, ge=1, le=16, description="Images per sku, region and size (seeds differ)")
    regions_field: str = Field(
        default="regions", description="Product field listing the regions a product is sold in (a list or a "
        "comma-separated string); a product without it goes to every region"
    )
    checks: list[CheckSpec] = Field(default_factory=list, description="Questions or captions per generated image")

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


class JobSpec(_Section):
    """One batch job: manifests in, images / captions / answers and a rejects table out."""

    name: str = Field(description="Job name (a slug: lowercase letters, digits, '-', '_'); names the run")
    archive: ArchiveSpec | None = Field(
        default=None, description="Image archives to caption instead of manifests (see ArchiveSpec)"
    )
    catalog: CatalogSpec | None = Field(
        default=None, description="A product catalog expanded into ad rows (generations, or edits of a product's "
        "packshot) per region, size and variant "
        "(see factory.jobs.sources.manifests.catalog); with or without manifest inputs",
    )
    train: TrainSection | None = Field(
        default=None, description="Captioned images to train a tenant's style adapter from, instead of manifests "
        "(see TrainSection): the run encodes them once, then trains the adapter on Ray Train",
    )
    benchmarks: list[BenchmarkSpec] = Field(
        default_factory=list, description="Public benchmark files (COCO captions, VQAv2, TextCaps) read as "
        "manifests, with or without manifest inputs (see BenchmarkSpec)",
    )
    inputs: list[Annotated[str, Field(min_length=1), AfterValidator(_input_from_spec_dir)]] | None = Field(
        default=None, validate_default=True,
        description="Manifest files, folders, local globs or s3:// prefixes; relative paths are relative to "
        "the spec file's folder (a job has inputs or an archive section)",
    )
    output: str = Field(
        min_length=1, description="Output folder or s3:// prefix; a relative path is relative to the working directory"
    )
    profile: str = Field(default="tiny", min_length=1, description="Model profile to load (see factory.model.profiles)")
    defaults: Defaults = Field(default_factory=Defaults, description="Values for rows that leave them out")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serve deployment of the model replicas")
    chunk_rows: int = Field(
        default=4096, ge=1, le=1_000_000,
        description="Manifest lines per chunk: the unit of work, commit and resume. A re-run skips finished chunks "
        "and redoes at most the uncommitted rows of the chunks that were in progress",
    )
    in_flight: int = Field(
        default=8, ge=1, description="Most requests each caller keeps in flight to the replicas, sent in batches of "
        "serve.max_batch_size (raise it with serve.replicas: about 2 x replicas x max_batch_size keeps every "
        "replica busy)"
    )
    adapter_window: int | None = Field(
        default=None, ge=1, description="A chunk's rows are ordered by adapter (stable), within windows of this "
        "many rows or, unset, the whole chunk, so replicas switch adapters far less often than a shuffled manifest "
        "would make them (1 keeps manifest order)"
    )
    callers: int = Field(
        default=1, ge=1, description="Ray Data actors calling the replicas; each keeps up to in_flight requests going"
    )
    chunks_per_caller: int = Field(
        default=2, ge=1, description="Chunks a caller works on at once, so one chunk's tail overlaps the next's start"
    )
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Retries of transient faults per row")
    retry_failed: bool = Field(
        default=True, description="A re-run of a run retries its rows that ended failed (ok, blocked and rejected "
        "rows stay final); false keeps failed rows as they are"
    )
    error_budget: ErrorBudget = Field(
        default_factory=ErrorBudget, description="Failures tolerated before the job stops"
    )
    row_timeout_s: float = Field(
        default=600.0, gt=0, description="A replica call (one batch of up to serve.max_batch_size rows) that takes "
        "longer is cancelled and retried; rows whose every attempt timed out are failed (and count against the "
        "error budget)"
    )
    commit: CommitConfig = Field(
        default_factory=CommitConfig, description="How often finished rows are committed to results"
    )
    allow_http: bool = Field(
        default=False,
        description="Allow http(s):// image inputs (public addresses only); off because rows come from users",
    )
    input_roots: list[Annotated[str, Field(min_length=1), AfterValidator(_root_from_spec_dir)]] = Field(
        default_factory=list,
        description="Where every tenant's images may be, added to each tenant's own `inputs` in the tenants "
        "registry: local folders (relative to the spec file's folder), s3://bucket/prefix/ or "
        "http(s)://host/prefix/. A row whose image resolves elsewhere (after '..', percent-escapes and symbolic "
        "links) is rejected before it is read. A tenant with no roots from either reads only under its own "
        "manifest's folder",
    )
    tenants: str | None = Field(
        default=None, description="Tenants registry YAML; a relative path is relative to the spec file's folder"
    )
    safety: SafetyPolicy = Field(
        default_factory=SafetyPolicy,
        description="NSFW policy: detector, per-label thresholds, block or quarantine, prompt term lists; "
        "always on, defaults block exposed-anatomy labels at 0.5",
    )
    reuse: bool = Field(
        default=True,
        description="Reuse an earlier run's image when a generation row's resolved inputs are unchanged (prompt, "
        "seed, size, steps, guidance, checks, the profile with its speed options and version, the adapter's "
        "sha256), instead of generating it again; the row records where it came from in `reused_from`",
    )
    performance: dict[str, Any] | None = Field(
        default=None,
        description="Generator speed options that replace the profile's, by name (see "
        "factory.model.performance.Performance: compile, fuse_qkv, quantization, attention_backend, cache, "
        "vae_channels_last, vae_tiling_min_pixels, warmup); the options not named keep the profile's values",
    )
    revisions: dict[str, str] | None = Field(
        default=None,
        description="Hub revisions for the profile's checkpoints, by component (generator, vlm): a commit, branch "
        "or tag. When the job starts, each hub checkpoint's revision (these or the profile's) is resolved to its "
        "commit once; every replica loads that commit and results and reuse keys record it",
    )
    quality: QualitySpec | None = Field(
        default=None, description="Scores of the run's rows (CLIPScore, VQA accuracy, BLEU and CIDEr-D), per tenant, "
        "region and adapter; unset: nothing is scored (see QualitySpec)",
    )

    @field_validator("quality")
    @classmethod
    def _profile_scores(cls, value: QualitySpec | None, info: ValidationInfo) -> QualitySpec | None:
        if value is not None and info.data.get("train") is not None:
            raise ValueError("a training job makes no result rows to score: score runs made with its adapter "
                             "(factory eval NEW --against OLD)")
        if value is not None and value.clip_score and "profile" in info.data:
            try:
                scoring_model(get_profile(info.data["profile"]))
            except ConfigError as error:
                raise ValueError(str(error).removeprefix("quality.clip_score: ")) from None
        return value

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks_are_manifests(cls, value: list[BenchmarkSpec], info: ValidationInfo) -> list[BenchmarkSpec]:
        if value and (info.data.get("archive") is not None or info.data.get("train") is not None):
            raise ValueError("benchmarks are read as manifests: not with archive or train")
        return value

    @field_validator("revisions")
    @classmethod
    def _known_components(cls, value: dict[str, str] | None, info: ValidationInfo) -> dict[str, str] | None:
        if value:
            try:
                with_revisions(get_profile(info.data.get("profile", "tiny")), value)
            except ConfigError as error:
                raise ValueError(str(error).removeprefix("revisions: ")) from None
        return value

    @field_validator("performance")
    @classmethod
    def _known_performance_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            Performance.model_validate(value)  # names and values checked here, not on a replica minutes later
        return value

    @field_validator("catalog")
    @classmethod
    def _products_from_spec_dir(cls, value: CatalogSpec | None, info: ValidationInfo) -> CatalogSpec | None:
        if value is None:
            return None
        if info.data.get("archive") is not None:
            raise ValueError("a job captions archives (archive) or expands a catalog (catalog), not both")
        products = [_resolve_location(uri, _spec_dir(info)) for uri in value.products]
        return value.model_copy(update={"products": products})

    @field_validator("train")
    @classmethod
    def _trains_alone(cls, value: TrainSection | None, info: ValidationInfo) -> TrainSection | None:
        if value is not None and (info.data.get("archive") is not None or info.data.get("catalog") is not None):
            raise ValueError("a job trains an adapter (train) or captions archives / expands a catalog, not both")
        return value

    @field_validator("profile")
    @classmethod
    def _trainable_profile(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("train") is not None:
            check_trainable_profile(value)
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs_or_archive(cls, value: list[str] | None, info: ValidationInfo) -> list[str]:
        # `archive` is validated first (it comes first), so whether the job has one is known here.
        if info.data.get("train") is not None:
            if value:
                raise ValueError("a job reads manifests (inputs) or trains an adapter (train), not both")
            return []
        has_archive = info.data.get("archive") is not None
        if value is None:
            if not has_archive and info.data.get("catalog") is None and not info.data.get("benchmarks"):
                raise PydanticCustomError("missing", "required")
            return []
        if has_archive and value:
            raise ValueError("a job reads manifests (inputs) or archives (archive), not both")
        if not value and not has_archive:
            raise ValueError("List should have at least 1 item")
        return value

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(
                f"must be a slug (lowercase letters, digits, '-' and '_', at most 64), got {value!r}"
            )
        return value

    @field_validator("output")
    @classmethod
    def _output_from_cwd(cls, value: str) -> str:
        # Made absolute now: Ray workers do not share the driver's working directory.
        return _resolve_location(value, os.getcwd())

    @field_validator("tenants")
    @classmethod
    def _tenants_from_spec_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _resolve_location(value, _spec_dir(info))


def _spec_dir(info: ValidationInfo) -> str:
    context = info.context or {}
    return str(context.get(_CONTEXT_SPEC_DIR) or os.getcwd())


def _resolve_location(uri: str, base: str) -> str:
    if uri.startswith("s3://"):
        if len(uri) <= len("s3://") + 2:
            raise ValueError(f"not a valid s3://bucket/prefix URI: {uri!r}")
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise ValueError(f"must be a local path or an s3:// URI, got {uri!r}")
    path = os.path.expanduser(uri)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def output_root(spec: JobSpec, run_id: str) -> str:
    """Where a run of the job writes: OUTPUT/<run id>."""
    return join(spec.output, run_id)


def generation_defaults(spec: JobSpec) -> GenerationDefaults:
    """What a generation row that leaves a value out gets: the job's `defaults`, else its profile's; an edit row's
    guidance is the profile's edit guidance (Kontext's 2.5), else the same."""
    profile = get_profile(spec.profile).generator
    given = spec.defaults
    return GenerationDefaults(
        steps=given.steps or profile.steps, width=given.width or profile.width,
        height=given.height or profile.height,
        guidance=given.guidance if given.guidance is not None else profile.guidance,
        edit_guidance=profile.edit.guidance if profile.edit is not None else None,
    )


def resolved_num_gpus(spec: JobSpec) -> float:
    """GPUs one replica reserves: serve.num_gpus when set, else one for a GPU profile and none for a CPU one."""
    return get_profile(spec.profile).replica_gpus(spec.serve.num_gpus)


def pin_models(spec: JobSpec) -> JobSpec:
    """The spec with `revisions` naming the commit of each of its profile's hub checkpoints, resolved now: once per
    job, so its replicas, its results and its reuse keys all name the same weights. Raises `ModelError`."""
    profile = with_revisions(get_profile(spec.profile), spec.revisions)
    pinned = {"revisions": hub_revisions(pin_revisions(profile)) or None}
    if spec.quality is not None and spec.quality.clip_score:
        clip = pin_clip(scoring_model(profile), spec.quality.clip_revision)
        pinned["quality"] = spec.quality.model_copy(update={"clip_revision": clip.revision})
    return spec.model_copy(update=pinned)


# ---- loading -----------------------------------------------------------------------------------------


def load_spec(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply ``key.sub=value`` overrides, validate. Any problem is one `ConfigError` line."""
    spec_path = Path(path)
    overrides = list(overrides)
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{spec_path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{spec_path}: is a directory, not a spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{spec_path}: cannot read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{spec_path}: invalid YAML{_yaml_where(exc)}") from exc
    if data is None:
        raise ConfigError(f"{spec_path}: empty spec")
    if not isinstance(data, dict):
        raise ConfigError(f"{spec_path}: expected key: value pairs at the top level, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    try:
        spec = JobSpec.model_validate(data, context={_CONTEXT_SPEC_DIR: os.path.abspath(spec_path.parent)})
    except ValidationError as exc:
        raise ConfigError(f"{spec_path}: {one_line(validation_problems(exc, _meant))}") from exc
    log.debug("spec.loaded", path=str(spec_path), name=spec.name, overrides=list(overrides))
    return spec


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b=value`` in `data` (value parsed as YAML). The key must exist in `JobSpec`."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected key=value")
    parts = key.split(".")
    _check_key(parts)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML{_yaml_where(exc)}") from exc
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section in the spec")
        node = child
    node[parts[-1]] = value


def _check_key(parts: list[str]) -> None:
    model: type[BaseModel] | None = JobSpec
    for i, part in enumerate(parts):
        if model is None:
            return  # below a free-form dict section: any key is allowed
        dotted = ".".join(parts[: i + 1])
        field = model.model_fields.get(part)
        if field is None:
            full = ".".join(parts)
            named = "" if dotted == full else f" {dotted}"
            raise ConfigError(f"--set {full}: unknown field{named}{_suggest(part, model, parts[:i])}")
        sub, free = _section_of(field.annotation)
        if i < len(parts) - 1 and sub is None and not free:
            raise ConfigError(f"--set {'.'.join(parts)}: {dotted} is a value, not a section")
        model = sub


def _section_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model a field holds, or None; whether it is a free-form dict)."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for arg in candidates:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, False
    free = any(typing.get_origin(arg) is dict or arg is dict for arg in candidates)
    return None, free


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None or not isinstance(part, str):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _section_of(field.annotation)[0]
    return model


def _suggest(key: str, model: type[BaseModel] | None, parents: Iterable[Any] = ()) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    if not close:
        return ""
    prefix = "".join(f"{p}." for p in parents if isinstance(p, str))
    return f" (did you mean {prefix}{close[0]}?)"


def _meant(loc: Loc) -> str:
    """The did-you-mean for an unknown key at `loc` in a spec file, or ""."""
    return _suggest(str(loc[-1]), _model_at(JobSpec, loc[:-1]), loc[:-1])


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}" if problem else where
