"""The `edit` task through real jobs on the shared local Ray: `tiny` (FLUX.1 Kontext path, one reference) and
`tiny-flux2` (FLUX.2 [klein], several), a catalog whose products carry packshots, reuse across nights keyed on
the packshot's bytes, and every way an edit row is refused, each with its reason."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import RESULT_SCHEMA, read_table
from factory.jobs.report.gallery import build_gallery
from factory.jobs.run import run_job, validate_job
from factory.jobs.spec import load_spec
from factory.model.generator import fit_size
from tests.catalogs import write_catalog_job

pytestmark = pytest.mark.slow

INSTRUCTION = "place the product on a beach at sunset"


def results(root: Path) -> dict[str, dict]:
    table = read_table(Storage(), OutputLayout(str(root)).results, hive=True)
    return {} if table is None else {row["id"]: row for row in table.to_pylist()}


def rejects(root: Path) -> dict[str, dict]:
    table = read_table(Storage(), OutputLayout(str(root)).rejects, hive=True)
    return {} if table is None else {row["id"]: row for row in table.to_pylist()}


def image_bytes(row: dict) -> bytes:
    return Path(row["image_uri"]).read_bytes()


def pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(row["image_uri"])).astype(int)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def photos_in(folder: Path, sample_images: dict[str, Path]) -> Path:
    """The real photos as a tenant has them, beside its manifest; plus a file that is no image and a small file
    that claims too many pixels (judged on its header)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, path in sample_images.items():
        shutil.copy(path, images / f"{name}.png")
    (images / "notes.png").write_bytes(b"these are notes, not a picture")
    Image.new("1", (9000, 5000)).save(images / "huge.png")  # 45 MP: over the 40 MP input cap
    return images


@pytest.fixture(scope="module")
def tiny_edits(ray_cluster, sample_images, tmp_path_factory):
    """One job on `tiny` covering what an edit row may do and every way it is refused."""
    folder = tmp_path_factory.mktemp("edits-tiny")
    photos_in(folder, sample_images)
    small = {"width": 64, "height": 64}
    write_rows(folder / "rows.jsonl", [
        {"id": "cat", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION, "image": "images/chelsea.png",
         "seed": 5, **small},
        {"id": "cat-again", "tenant": "acme", "prompt": f"Edit: {INSTRUCTION}", "image": "images/chelsea.png",
         "seed": 5, **small},
        {"id": "cups", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION, "image": "images/coffee.png",
         "seed": 5, **small},
        {"id": "cat-own-size", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION,
         "images": ["images/chelsea.png"]},
        {"id": "poster", "tenant": "acme", "prompt": "a poster of a cat on a beach", "seed": 5, **small},
        # refused at validation, before any model: each names its field
        {"id": "no-image", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION},
        {"id": "two-references", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION,
         "images": ["images/chelsea.png", "images/coffee.png"]},
        {"id": "outside", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION, "image": "/etc/hostname"},
        # refused when read or checked: a result row with the reason
        {"id": "not-an-image", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION, "image": "images/notes.png"},
        {"id": "too-many-pixels", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION, "image": "images/huge.png"},
        {"id": "missing", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION, "image": "images/none.png"},
        {"id": "astronaut", "tenant": "acme", "task": "edit", "prompt": INSTRUCTION, "image": "images/astronaut.png",
         **small},
    ])
    spec = folder / "edits.yaml"
    spec.write_text(f"name: edits\ninputs: [rows.jsonl]\noutput: {folder / 'out'}\nprofile: tiny\n"
                    "defaults: {steps: 2, width: 64, height: 64}\n"
                    # The real NudeNet finds FACE_FEMALE on the astronaut photo: a harmless image a policy blocks.
                    "safety: {thresholds: {FACE_FEMALE: 0.5}}\nerror_budget: {max_failed_fraction: 1.0}\n")
    summary = run_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    return {"folder": folder, "root": folder / "out" / "edits", "summary": summary}


def test_same_reference_and_seed_same_bytes_another_reference_another_image_on_tiny(tiny_edits):
    rows = results(tiny_edits["root"])
    cat, again, cups = rows["cat"], rows["cat-again"], rows["cups"]
    for row in (cat, again, cups):
        assert (row["task"], row["status"], row["safety_verdict"]) == ("edit", "ok", "pass"), row
        assert (row["width"], row["height"], row["steps"]) == (64, 64, 2) and row["profile"] == "tiny"
    assert image_bytes(cat) == image_bytes(again)  # an explicit task or an "Edit:" prompt: the same edit
    assert image_bytes(cat) != image_bytes(cups)  # the output depends on the reference
    assert cat["prompt"] == again["prompt"] == INSTRUCTION and cat["guidance"] == 3.5
    photo = tiny_edits["folder"] / "images" / "chelsea.png"
    assert cat["reference_uris"] == [str(photo)] and cat["source_uri"] is None
    assert cat["reference_sha256"] == [sha256(photo)]
    # No size given: the reference's aspect ratio within the profile's default 256x256 pixels.
    own = rows["cat-own-size"]
    expected = fit_size(*Image.open(photo).size, 256 * 256)
    assert (own["width"], own["height"]) == expected == Image.open(own["image_uri"]).size
    table = read_table(Storage(), OutputLayout(str(tiny_edits["root"])).results, hive=True)
    for field in ("reference_uris", "reference_sha256"):
        assert table.schema.field(field).type == RESULT_SCHEMA.field(field).type
    print(f"tiny, 64x64, 2 steps, through a job: edit row {cat['latency_ms']:.1f} ms, "
          f"generation row {rows['poster']['latency_ms']:.1f} ms")


def test_every_refused_edit_says_why(tiny_edits):
    refused = rejects(tiny_edits["root"])
    fields = {row_id: row["field"] for row_id, row in refused.items()}
    assert fields == {"no-image": "image", "two-references": "images", "outside": "image"}
    assert "required for edit" in refused["no-image"]["reason"]
    assert "2 reference images; profile tiny takes at most 1" in refused["two-references"]["reason"]
    assert "/etc/hostname is outside the inputs of tenant acme" in refused["outside"]["reason"]

    rows = results(tiny_edits["root"])
    for row_id, reason in (("not-an-image", "image: "), ("too-many-pixels", "image: "), ("missing", "image: ")):
        row = rows[row_id]
        assert row["status"] == "rejected" and row["error"].startswith(reason) and row["image_uri"] is None, row
    assert "no such file" in rows["missing"]["error"]
    assert "pixels" in rows["too-many-pixels"]["error"]
    blocked = rows["astronaut"]
    assert (blocked["status"], blocked["safety_decided_by"]) == ("blocked", "image_detector")
    assert blocked["safety_reason"].startswith("reference 0:") and blocked["image_uri"] is None
    assert dict(zip(blocked["safety_labels"], blocked["safety_scores"]))["FACE_FEMALE"] >= 0.5
    images = {path.name for path in (tiny_edits["root"] / "images").rglob("*.png")}
    assert images == {f"{row_id}.png" for row_id in ("cat", "cat-again", "cups", "cat-own-size", "poster")}
    # The gallery shows references beside the edits that passed, never beside a blocked one.
    page, _ = build_gallery(str(tiny_edits["root"]), Storage())
    assert page.count('<img class="reference"') == 4 and "images/astronaut.png" not in page


@pytest.fixture(scope="module")
def flux2_edits(ray_cluster, sample_images, tmp_path_factory):
    """One job on `tiny-flux2`: several references per row, from JSON lines and from a CSV cell."""
    folder = tmp_path_factory.mktemp("edits-flux2")
    photos_in(folder, sample_images)
    three = ["images/chelsea.png", "images/coffee.png", "images/astronaut.png"]
    row = {"tenant": "acme", "task": "edit", "prompt": INSTRUCTION, "seed": 9}
    write_rows(folder / "rows.jsonl", [
        {"id": "three", **row, "images": three},
        {"id": "three-again", **row, "images": three},
        {"id": "swapped", **row, "images": three[::-1]},
        {"id": "one", **row, "image": three[0]},
        {"id": "five", **row, "images": three + three[:2]},
        {"id": "outside-second", **row, "images": [three[0], "/etc/hostname"]},
    ])
    (folder / "more.csv").write_text(
        "id,tenant,task,prompt,images,seed\n"
        f"csv-three,acme,edit,{INSTRUCTION},\"{json.dumps(three).replace(chr(34), chr(34) * 2)}\",9\n"
    )
    spec = folder / "flux2.yaml"
    spec.write_text(f"name: flux2\ninputs: [rows.jsonl, more.csv]\noutput: {folder / 'out'}\nprofile: tiny-flux2\n"
                    "defaults: {steps: 2, width: 64, height: 64}\n")
    run_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    return {"folder": folder, "root": folder / "out" / "flux2"}


def test_several_references_on_tiny_flux2(flux2_edits):
    rows = results(flux2_edits["root"])
    for row_id in ("three", "three-again", "swapped", "one", "csv-three"):
        assert (rows[row_id]["status"], rows[row_id]["profile"]) == ("ok", "tiny-flux2"), rows[row_id]
    three = rows["three"]
    assert len(three["reference_uris"]) == len(three["reference_sha256"]) == 3
    assert three["reference_sha256"][1] == sha256(flux2_edits["folder"] / "images" / "coffee.png")
    assert image_bytes(three) == image_bytes(rows["three-again"])  # one pipeline call, the same bytes
    # The CSV row ran in a call of another batch size: fp32 kernels may round a few values by one level, no more
    # (measured: 0.03% of values).
    noise = np.abs(pixels(three) - pixels(rows["csv-three"]))
    assert noise.max() <= 1 and (noise > 0).mean() < 0.01
    # The output depends on the references and their order; no size given: the first one's aspect ratio.
    assert (three["width"], three["height"]) == (304, 208) and pixels(three).shape == (208, 304, 3)
    assert (rows["swapped"]["width"], rows["swapped"]["height"]) == (256, 256)  # the astronaut photo is square
    # The two extra references change far more than batch rounding does: random weights attend to them weakly
    # (a few levels), but across the image (measured: 18% of values).
    assert pixels(three).shape == pixels(rows["one"]).shape and (pixels(three) != pixels(rows["one"])).mean() > 0.05
    refused = rejects(flux2_edits["root"])
    assert refused["five"]["field"] == "images"
    assert "5 reference images; profile tiny-flux2 takes at most 4" in refused["five"]["reason"]
    # every reference is judged against the tenant's roots, not only the first
    assert refused["outside-second"]["field"] == "images[1]"
    assert "/etc/hostname is outside the inputs of tenant acme" in refused["outside-second"]["reason"]


def test_factory_validate_refuses_edits_a_profile_cannot_run_before_any_model(ray_cluster, tiny_edits, tmp_path):
    """flux-schnell has no edit pipeline: every edit row is a reject naming the profile, and no model is loaded
    (its weights are not on this machine at all)."""
    spec = tmp_path / "schnell.yaml"
    spec.write_text(f"name: schnell\ninputs: [{tiny_edits['folder'] / 'rows.jsonl'}]\noutput: {tmp_path / 'out'}\n"
                    "profile: flux-schnell\n")
    summary = validate_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    refused = rejects(tmp_path / "out" / "schnell")
    assert refused["cat"]["field"] == "task" and "profile flux-schnell cannot edit" in refused["cat"]["reason"]
    assert summary.tasks == {"generate": 1} and summary.reject_fields == {"task": 10, "image": 1}


# ---- a catalog with packshots ----------------------------------------------------------------------------------

PRODUCTS = [
    {"sku": "cup-1", "tenant": "acme", "name": "espresso cup", "image": "packshots/cup.png", "regions": ["eu", "na"]},
    {"sku": "cat-2", "tenant": "globex", "name": "cat toy", "image": "packshots/cat.png", "regions": "eu"},
    {"sku": "shoe-3", "tenant": "acme", "name": "running shoes", "regions": ["eu"]},  # no packshot: text-to-image
]


def catalog_job(folder: Path, sample_images: dict[str, Path]) -> Path:
    packshots = folder / "packshots"
    packshots.mkdir(parents=True, exist_ok=True)
    shutil.copy(sample_images["coffee"], packshots / "cup.png")
    shutil.copy(sample_images["chelsea"], packshots / "cat.png")
    return write_catalog_job(folder, PRODUCTS, """
catalog:
  products: [products.jsonl]
  template: "advertisement for {name}, {style}"
  edit_template: "place the product on a {scene}, {style}; keep the product, its label and its colours unchanged"
  regions:
    eu: {style: minimal, fields: {scene: marble kitchen counter}}
    na: {style: bold, fields: {scene: picnic table}, sizes: [{width: 64, height: 96}]}
  checks:
    - {name: product_visible, question: "Is the product visible?"}
""")


def test_a_catalog_with_packshots_makes_per_region_edits_and_reuses_them_until_the_packshot_changes(
        ray_cluster, sample_images, tmp_path):
    spec = catalog_job(tmp_path, sample_images)
    run_job(load_spec(spec), run_id="night-1", address=ray_cluster["address"], show_progress=False)
    first = results(tmp_path / "out" / "night-1")
    assert set(first) == {"cup-1-eu-64x64-v1", "cup-1-na-64x96-v1", "cat-2-eu-64x64-v1", "shoe-3-eu-64x64-v1"}
    cup = first["cup-1-na-64x96-v1"]
    assert (cup["task"], cup["status"], cup["region"], cup["adapter"]) == ("edit", "ok", "na", "acme/na-contrast")
    assert cup["prompt"] == ("place the product on a picnic table, bold; keep the product, its label and its colours "
                             "unchanged")
    assert cup["reference_uris"] == [str(tmp_path / "packshots" / "cup.png")]
    assert cup["reference_sha256"] == [sha256(tmp_path / "packshots" / "cup.png")]
    assert Image.open(cup["image_uri"]).size == (64, 96) and dict(cup["checks"])["product_visible"]
    assert first["shoe-3-eu-64x64-v1"]["task"] == "generate"
    assert first["shoe-3-eu-64x64-v1"]["prompt"] == "advertisement for running shoes, minimal"

    # The next night: the cat toy's packshot was re-shot (same file name, other bytes); nothing else changed.
    shutil.copy(sample_images["astronaut"], tmp_path / "packshots" / "cat.png")
    second_summary = run_job(load_spec(spec), run_id="night-2", address=ray_cluster["address"], show_progress=False)
    second = results(tmp_path / "out" / "night-2")
    made = {row_id for row_id, row in second.items() if row["reused_from"] is None}
    assert made == {"cat-2-eu-64x64-v1"} and second_summary.model_rows == 1
    assert second["cat-2-eu-64x64-v1"]["reference_sha256"] == [sha256(tmp_path / "packshots" / "cat.png")]
    reused = second["cup-1-na-64x96-v1"]
    assert reused["reused_from"] == cup["image_uri"] and reused["reference_sha256"] == cup["reference_sha256"]
    assert reused["reference_uris"] == cup["reference_uris"] and Path(reused["image_uri"]).read_bytes() == \
        Path(cup["image_uri"]).read_bytes()

    # The morning's gallery shows each edit beside its packshot (one reference thumbnail per edit card).
    page, stats = build_gallery(str(tmp_path / "out" / "night-2"), Storage())
    assert page.count('<div class="edit">') == page.count('<img class="reference"') == 3 and stats.thumbnails == 4
    assert 'title="reference: ' + str(tmp_path / "packshots" / "cup.png") in page
