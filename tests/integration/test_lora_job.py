"""Per-tenant adapters through the job: each row gets exactly its adapter, whatever its batch neighbours."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from factory.io.storage import Storage
from factory.jobs.run import run_job
from factory.jobs.spec import load_spec
from tests.integration.test_job import REPO, results_of

pytestmark = pytest.mark.slow

SIZE, STEPS = 64, 2


def reference_image(tiny_path, row: dict, adapter_file=None, scale: float = 1.0) -> np.ndarray:
    """A fresh pipeline with only this row's adapter loaded (or none), same seed, size and steps."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_path / "flux", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    if adapter_file is not None:
        pipe.load_lora_weights(str(adapter_file), adapter_name="only", use_safetensors=True)
        pipe.set_adapters(["only"], adapter_weights=[scale])
    image = pipe(prompt=[row["prompt"]], num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=3.5,
                 generator=[torch.Generator("cpu").manual_seed(row["seed"])], max_sequence_length=64).images[0]
    return np.asarray(image).astype(int)


def test_shuffled_tenants_get_exactly_their_adapters_with_a_pool_of_two(ray_cluster, tiny_path, tmp_path):
    adapters = REPO / "jobs" / "adapters"
    registry = tmp_path / "tenants.yaml"
    registry.write_text(
        "tenants:\n"
        f"  alpha:\n    default: brand\n    adapters:\n      brand: {{uri: {adapters / 'acme-brand.safetensors'}}}\n"
        f"      eu: {{uri: {adapters / 'acme-eu.safetensors'}}}\n    regions: {{eu: eu}}\n"
        f"  beta:\n    default: brand\n    adapters:\n      brand: {{uri: {adapters / 'globex-brand.safetensors'}, scale: 1.5}}\n"
        "  gamma: {}\n"
    )
    files = {"alpha/brand": (adapters / "acme-brand.safetensors", 1.0), "alpha/eu": (adapters / "acme-eu.safetensors", 1.0),
             "beta/brand": (adapters / "globex-brand.safetensors", 1.5), None: (None, 1.0)}
    rows = []
    for index in range(24):
        tenant, region = [("alpha", None), ("alpha", "eu"), ("beta", None), ("gamma", None)][index % 4]
        rows.append({"id": f"r{index:02d}", "tenant": tenant, "region": region, "prompt": f"poster {index % 3}",
                     "seed": 100 + index % 5})
    random.Random(7).shuffle(rows)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec_path = tmp_path / "lora.yaml"
    spec_path.write_text(
        f"name: lora\ninputs: [rows.jsonl]\noutput: {tmp_path / 'out'}\ntenants: tenants.yaml\n"
        f"defaults: {{steps: {STEPS}, width: {SIZE}, height: {SIZE}}}\n"
        # Three adapters in rotation through a pool of two, manifest order kept: evictions must happen.
        # keep_warm: the replica's adapter statistics are read after the run.
        "serve: {max_adapters: 2, keep_warm: true}\nadapter_window: 1\n"
    )
    run_job(load_spec(spec_path), address=ray_cluster["address"], show_progress=False)

    results = {row["id"]: row for row in results_of(Storage(), str(tmp_path / "out" / "lora"))}
    assert len(results) == 24 and all(row["status"] == "ok" for row in results.values())
    expected_key = {"alpha": "alpha/brand", "beta": "beta/brand", "gamma": None}
    cache: dict = {}
    for row in rows:
        result = results[row["id"]]
        key = "alpha/eu" if row["region"] == "eu" else expected_key[row["tenant"]]
        assert result["adapter"] == key
        adapter_file, scale = files[key]
        reference_key = (key, row["prompt"], row["seed"])
        if reference_key not in cache:
            cache[reference_key] = reference_image(tiny_path, row, adapter_file, scale)
        produced = np.asarray(Image.open(result["image_uri"]).convert("RGB")).astype(int)
        # Equal up to fp32 rounding between batch sizes (at most one level of 255).
        assert np.abs(produced - cache[reference_key]).max() <= 1, (row, key)
    # Different adapters really give different images for the same prompt and seed.
    same_input = [k for k in cache if k[1:] == ("poster 0", 100)]
    images = [cache[k] for k in same_input]
    assert len(images) >= 2 and all(np.abs(a - b).max() > 10 for i, a in enumerate(images) for b in images[i + 1:])

    from ray import serve

    stats = serve.get_deployment_handle("StackReplica", "factory-lora").adapter_stats.remote().result()
    serve.delete("factory-lora")
    assert stats["evictions"] > 0 and stats["loaded"] <= 2 and stats["misses"] >= 3
