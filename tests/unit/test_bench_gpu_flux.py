"""`bench/gpu_flux.py --small` runs every code path of the GPU benchmark at toy sizes on this CPU: each variant
gives a row with figures or an explicit reason it was skipped, the rows that must not change numbers do not,
and LoRA hot-swap on the compiled transformer switches 10 adapters without recompiling.

One subprocess run (about 1-2 minutes on an idle 2-core machine, five when others share it: two regional compiles on
CPU) answers every test of the module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_flux

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXACT = ("plain diffusers", "compile regional", "batch of 4 (per image)", "fused QKV (eager, CPU check)")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-flux") / "small.json"
    # A generous start budget: which rows run must not depend on how busy this machine is.
    done = subprocess.run([sys.executable, "bench/gpu_flux.py", "--small", "--budget-s", "1000", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def rows_by_name(result: dict) -> dict[str, dict]:
    return {row["name"]: row for row in result["rows"]}


def test_every_variant_has_a_row_with_figures_or_a_reason(small_run):
    result, _ = small_run
    rows = rows_by_name(result)
    expected = gpu_flux.variants()
    assert set(rows) == {v.name for v in expected}
    for variant in expected:
        row = rows[variant.name]
        if variant.performance.cuda_requirements() and variant.path != "hotswap":
            assert row["status"] == "skipped" and row["reason"].startswith("skipped: needs CUDA"), row
        elif variant.needs_flag:
            assert row["status"] == "skipped" and "--compile-full" in row["reason"], row
        else:
            assert row["status"] == "ok", row
            assert row["s_per_image"] > 0 and row["tflops"] > 0 and row["warmup_s"] > 0
            assert 0 < row["peak_fraction"] < 10 and row["peak_mem_mb"] > 0
    assert result["mode"] == "small" and result["matmul_peak_tflops"] > 0
    assert result["transformer_tflop_per_step"]["dev"] > 0


def test_rows_that_must_not_change_numbers_match_plain(small_run):
    result, _ = small_run
    rows = rows_by_name(result)
    for name in EXACT:
        assert rows[name]["cosine"] > 0.9999, rows[name]
    # plain diffusers and the factory's generator are the same computation.
    assert rows["plain diffusers"]["identical"]
    # Drift sees the network: the final latents are far from the starting noise they share.
    assert result["latents_moved"]["dev"] > 0.1


def test_hotswap_switches_ten_adapters_without_recompiling(small_run):
    result, stdout = small_run
    row = rows_by_name(result)["LoRA hot-swap (compiled)"]
    assert row["status"] == "ok" and row["tag"] == "compile=regional", row
    assert row["recompiles"] == 0 and row["graphs"] > 0
    assert row["adapters"] == 10 and max(row["ranks"]) == row["hotswap_rank"] == 64
    assert len(row["switch_ms_all"]) == 10 and row["switch_ms_max"] >= row["switch_ms_median"] > 0
    assert row["adapters_differ"]  # each switch changed the image: the swap really happened
    assert "fp8 skipped: needs CUDA" in row["note"]
    assert "0 recompiles over 10 adapters" in stdout


def test_flux2_klein_and_kontext_rows_edit_with_their_references(small_run):
    result, _ = small_run
    rows = rows_by_name(result)
    for name, model, references in (("klein plain", "klein", 0), ("klein edit, 1 reference", "klein", 1),
                                    ("klein edit, 3 references", "klein", 3), ("Kontext edit, 1 reference", "kontext", 1)):
        row = rows[name]
        assert row["status"] == "ok" and (row["model"], row["references"]) == (model, references), row
        assert row["runs_agree"] and row["s_per_image"] > 0
    assert rows["klein compile + FP8"]["aim"] == "<= 0.57 s/image"
    flops = result["transformer_tflop_per_step"]
    # Reference tokens join the image's in every block: each reference adds about what the image costs.
    assert flops["klein+3ref"] > flops["klein+1ref"] > 1.5 * flops["klein"] and flops["kontext+1ref"] > 1.5 * flops["dev"]


def test_the_report_says_what_the_figures_are(small_run):
    _, stdout = small_run
    assert "not image quality" in stdout and "not a speed figure" in stdout
    assert "elapsed:" in stdout and "TFLOP" in stdout
