"""Catalog jobs that tests write: a product file, the repository's tenants registry and adapters, and a spec."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_catalog_job(folder: Path, products: list[dict], sections: str) -> Path:
    """`folder/ads.yaml`, a job named `ads` writing to `folder/out` at 64x64 and 2 steps, with the repository's
    tenants and adapters; `sections` is the rest of its YAML (the `catalog:` section among them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "products.jsonl").write_text("".join(json.dumps(product) + "\n" for product in products))
    shutil.copy(REPO / "jobs" / "tenants.yaml", folder / "tenants.yaml")
    shutil.copytree(REPO / "jobs" / "adapters", folder / "adapters", dirs_exist_ok=True)
    spec = folder / "ads.yaml"
    spec.write_text(f"""
name: ads
output: {folder / 'out'}
tenants: tenants.yaml
defaults: {{steps: 2, width: 64, height: 64}}
{sections.strip()}
""")
    return spec
