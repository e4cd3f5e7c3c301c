"""Nightly localized-ad runs on one shared local Ray: a product catalog expanded per region, scheduled run ids
that are idempotent, images reused from an earlier run when a row's inputs did not change (counted in model
calls, not only files), and the run's gallery opened in a real headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_table
from factory.jobs.run import run_job
from factory.jobs.sources.manifests.catalog import stable_seed
from factory.jobs.spec import load_spec
from tests.catalogs import write_catalog_job

pytestmark = pytest.mark.slow

PRODUCTS = [
    {"sku": "shoe-1", "tenant": "acme", "name": "running shoes", "regions": ["eu", "na"]},
    {"sku": "mug-2", "tenant": "acme", "name": "coffee mug", "regions": "eu"},
    {"sku": "tent-3", "tenant": "globex", "name": "camping tent"},
    {"sku": "knife-4", "tenant": "globex", "name": "forbidden knife", "regions": ["eu"]},  # the prompt filter blocks it
    {"sku": "lamp-5", "tenant": "acme", "name": "desk lamp", "regions": ["mars"]},  # rejected: unknown region
]


def write_job(folder: Path, products: list[dict]) -> Path:
    return write_catalog_job(folder, products, """
commit: {rows: 4, seconds: 0.5}
safety: {prompt_terms: [forbidden]}
catalog:
  products: [products.jsonl]
  template: "advertisement for {name}, {claim}, {style}"
  regions:
    eu: {style: minimal, fields: {claim: jetzt neu}}
    na: {style: bold, fields: {claim: new this season}, sizes: [{width: 64, height: 96}]}
  checks:
    - {name: product_visible, question: "Is the product visible?"}
""")


def run(spec: Path, run_id: str, address: str):
    return run_job(load_spec(spec), run_id=run_id, address=address, show_progress=False)


def results(root: Path) -> dict[str, dict]:
    table = read_table(Storage(), OutputLayout(str(root)).results, hive=True)
    return {row["id"]: row for row in table.to_pylist()}


def snapshot(root: Path) -> dict[str, int]:
    """Every data file of a run with its modification time (the run's summary is rewritten by design)."""
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")
            if path.is_file() and path.suffix in (".parquet", ".png")}


@pytest.fixture(scope="module")
def nights(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nightly")
    spec = write_job(folder, PRODUCTS)
    first = run(spec, "2026-11-24", ray_cluster["address"])
    return {"folder": folder, "spec": spec, "first": first, "address": ray_cluster["address"]}


def test_a_catalog_expands_into_stable_rows_per_region_with_checks(nights):
    rows = results(nights["folder"] / "out" / "2026-11-24")
    assert set(rows) == {"shoe-1-eu-64x64-v1", "shoe-1-na-64x96-v1", "mug-2-eu-64x64-v1", "tent-3-eu-64x64-v1",
                         "tent-3-na-64x96-v1", "knife-4-eu-64x64-v1"}
    shoe = rows["shoe-1-eu-64x64-v1"]
    assert shoe["prompt"] == "advertisement for running shoes, jetzt neu, minimal"
    assert shoe["region"] == "eu" and shoe["adapter"] == "acme/eu-minimal" and shoe["status"] == "ok"
    assert (rows["tent-3-na-64x96-v1"]["width"], rows["tent-3-na-64x96-v1"]["height"]) == (64, 96)
    assert rows["tent-3-eu-64x64-v1"]["adapter"] == "globex/brand"  # globex has no eu adapter: its default
    assert dict(shoe["checks"])["product_visible"]  # the VLM answered about the generated image
    knife = rows["knife-4-eu-64x64-v1"]
    assert knife["status"] == "blocked" and knife["image_uri"] is None and knife["checks"] is None
    rejects = read_table(Storage(), OutputLayout(str(nights["folder"] / "out" / "2026-11-24")).rejects,
                         hive=True).to_pylist()
    assert [(row["tenant"], row["id"], row["field"]) for row in rejects] == [("acme", "lamp-5", "regions")]
    assert "unknown region 'mars'" in rejects[0]["reason"]
    assert shoe["seed"] == stable_seed("acme", "shoe-1-eu-64x64-v1")  # from tenant and id: the same every night


def test_the_same_run_id_again_writes_nothing_new(nights):
    root = nights["folder"] / "out" / "2026-11-24"
    before = snapshot(root)
    again = run(nights["spec"], "2026-11-24", nights["address"])
    assert snapshot(root) == before
    assert again.model_rows == 0 and again.rows == nights["first"].rows


def test_a_new_night_regenerates_only_the_changed_product_and_reuses_the_rest(nights):
    changed = [dict(product) for product in PRODUCTS]
    changed[0]["name"] = "trail running shoes"  # shoe-1: both its regions change
    write_job(nights["folder"], changed)
    second = run(nights["spec"], "2026-11-25", nights["address"])
    rows = results(nights["folder"] / "out" / "2026-11-25")
    regenerated = {row_id for row_id, row in rows.items() if row["reused_from"] is None and row["status"] == "ok"}
    reused = {row_id for row_id, row in rows.items() if row["reused_from"] is not None}
    assert regenerated == {"shoe-1-eu-64x64-v1", "shoe-1-na-64x96-v1"}
    assert reused == {"mug-2-eu-64x64-v1", "tent-3-eu-64x64-v1", "tent-3-na-64x96-v1"}
    # Model calls, not only files: the replicas saw the two changed rows and the blocked one (blocked images
    # are never recorded for reuse), nothing else.
    assert second.model_rows == 3 and second.reused == 3
    first_root = nights["folder"] / "out" / "2026-11-24"
    mug = rows["mug-2-eu-64x64-v1"]
    assert mug["reused_from"] == str(first_root / "images" / "acme" / "mug-2-eu-64x64-v1.png")
    assert Path(mug["image_uri"]).read_bytes() == Path(mug["reused_from"]).read_bytes()
    assert mug["checks"] and mug["attempts"] == 0 and mug["latency_ms"] is None
    assert mug["seed"] == results(first_root)["mug-2-eu-64x64-v1"]["seed"]


def test_the_gallery_shows_thumbnails_in_headless_chromium(nights, tmp_path):
    root = nights["folder"] / "out" / "2026-11-24"
    report = tmp_path / "report.html"
    made = subprocess.run([sys.executable, "-m", "factory", "report", str(root), "-o", str(report)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    page = report.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # opens offline
    assert page.count('<img src="data:image/jpeg;base64,') == 5  # five ok rows; the blocked one is a placeholder
    assert "knife-4-eu-64x64-v1" in page and "BLOCKED" in page.upper()

    shot = tmp_path / "shot.png"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the test setup installs Debian's chromium"
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1400", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    # The page is light grey and white with dark text; the tiny model's images are colourful noise. Thumbnails
    # are there when a good share of the pixels is saturated colour that no text or background has.
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    colourful = saturation > 60
    assert colourful.mean() > 0.03, colourful.mean()  # five 200-px cards of 1200x1400 are about 6 %
    # And they are pictures, not flat boxes: tens of thousands of distinct colours, where text, badges and
    # backgrounds have a few hundred.
    distinct = np.unique(pixels[colourful].astype(int) @ np.array([65536, 256, 1]))
    assert len(distinct) > 10_000, len(distinct)
