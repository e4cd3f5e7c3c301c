"""A job's quality parts without Ray: the `quality:` and `benchmarks:` sections, benchmark files staged as a run's
manifests, a run's results folder scored into its summary and quality.json, `factory eval` on two results folders,
and the console's quality line. The job end to end is `tests/integration/test_quality_job.py`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from factory.errors import ConfigError, InputError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import PART_SCHEMA
from factory.jobs.report.evaluate import evaluate
from factory.jobs.report.quality import write_quality
from factory.jobs.report.summary import RunSummary
from factory.jobs.report.tables import print_summary
from factory.jobs.sources.manifests.benchmarks import stage_benchmarks
from factory.jobs.sources.manifests.validate import TenantRoots, ValidateContext
from factory.jobs.spec import QualitySpec, load_spec
from factory.model.profiles import PROFILES
from factory.quality.bootstrap import paired_delta_interval
from factory.quality.groups import BootstrapOptions
from factory.quality.scores import TEXT_SCORE_COLUMNS, text_scores
from factory.quality.vqa import vqa_accuracy
from factory.routing.parser import GenerationDefaults, parse_request
from tests.benchmark_files import coco_captions, vqa_annotations, vqa_questions

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = {"resamples": 200, "seed": 3}


def _spec(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"name": "q", "output": str(tmp_path / "out"), **sections}))
    return path


def test_quality_and_benchmark_sections_are_checked_with_one_line_each(tmp_path, monkeypatch):
    spec = load_spec(_spec(tmp_path, quality={"vqa": False}, benchmarks=[
        {"format": "vqav2", "questions": "q.json", "annotations": "a.json", "images": "val2014"}]))
    assert spec.inputs == [] and spec.quality.clip_score and not spec.quality.vqa  # benchmarks alone are inputs
    assert spec.benchmarks[0].questions == str(tmp_path / "q.json") and spec.benchmarks[0].tenant == "eval"
    with pytest.raises(ConfigError, match=r"benchmarks\[0\]: questions: required for vqav2"):
        load_spec(_spec(tmp_path, benchmarks=[{"format": "vqav2", "annotations": "a.json", "images": "i"}]))
    with pytest.raises(ConfigError, match=r"benchmarks.*not with archive or train"):
        load_spec(_spec(tmp_path, archive={"sources": ["photos/"]},
                        benchmarks=[{"format": "textcaps", "annotations": "t.json", "images": "i"}]))
    with pytest.raises(ConfigError, match=r"quality: .*a training job makes no result rows to score"):
        load_spec(_spec(tmp_path, train={"tenant": "acme", "adapter": "v2", "sources": ["data"]}, quality={}))
    monkeypatch.setitem(PROFILES, "unscored", PROFILES["tiny"].model_copy(update={"name": "unscored",
                                                                                "quality": None}))
    with pytest.raises(ConfigError, match=r"quality.*profile 'unscored' names no CLIP model"):
        load_spec(_spec(tmp_path, inputs=["rows.jsonl"], profile="unscored", quality={}))
    load_spec(_spec(tmp_path, inputs=["rows.jsonl"], profile="unscored", quality={"clip_score": False}))


def test_benchmark_files_are_staged_once_as_manifests_of_valid_rows(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps(coco_captions()))
    (tmp_path / "questions.json").write_text(json.dumps(vqa_questions()))
    (tmp_path / "annotations.json").write_text(json.dumps(vqa_annotations()))
    spec = load_spec(_spec(tmp_path, benchmarks=[
        {"format": "coco_captions", "annotations": "captions.json", "images": "val2014", "tenant": "coco"},
        {"format": "vqav2", "questions": "questions.json", "annotations": "annotations.json", "images": "val2014",
         "limit": 1}]))
    storage, layout = Storage(), OutputLayout(str(tmp_path / "out" / "run"))
    manifests = stage_benchmarks(spec.benchmarks, storage, layout)
    assert [Path(uri).name.split("-")[0] for uri in manifests] == ["coco_captions", "vqav2"]
    assert stage_benchmarks(spec.benchmarks, storage, layout) == manifests  # a re-run plans the same manifests

    defaults = GenerationDefaults(steps=1, width=64, height=64, guidance=3.5)
    requests = [parse_request(json.loads(line), defaults) for uri in manifests
                for line in Path(uri).read_text().splitlines()]
    assert [(r.tenant, r.task.value, r.id) for r in requests] == [
        ("coco", "caption", "391895"), ("coco", "caption", "522418"), ("coco", "caption", "184613"),
        ("eval", "vqa", "262148000")]
    assert len(requests[0].references) == 3 and requests[2].references is None
    assert requests[3].image == str(tmp_path / "val2014" / "COCO_val2014_000000262148.jpg")
    assert requests[3].answers.count("down") == 7

    (tmp_path / "annotations.json").write_text(json.dumps(vqa_annotations()) + " ")  # the file changed
    assert stage_benchmarks(spec.benchmarks, storage, layout)[1] != manifests[1]


def test_a_benchmarks_images_folder_is_an_input_root_for_its_rows_alone(tmp_path):
    staged, other = str(tmp_path / "out" / "_inputs" / "vqav2-x.jsonl"), str(tmp_path / "rows" / "rows.jsonl")
    ctx = ValidateContext(run_id="r", layout=OutputLayout(str(tmp_path / "out")), storage=Storage(),
                          defaults=GenerationDefaults(steps=1, width=64, height=64, guidance=3.5),
                          profile=PROFILES["tiny"], shards=1, manifest_roots={staged: (str(tmp_path / "coco"),)})
    TenantRoots(ctx, staged).of("eval").check(str(tmp_path / "coco" / "1.jpg"))
    with pytest.raises(InputError, match="outside the inputs of tenant eval"):
        TenantRoots(ctx, staged).of("eval").check(str(tmp_path / "rows" / "cat.png"))
    TenantRoots(ctx, other).of("acme").check(str(tmp_path / "rows" / "cat.png"))  # its own folder, as without
    with pytest.raises(InputError, match="outside the inputs of tenant acme"):
        TenantRoots(ctx, other).of("acme").check(str(tmp_path / "coco" / "1.jpg"))


def _write_results(root: Path, rows: list[dict]) -> str:
    """`rows` as a run's results folder (one part per tenant, the engine's schema)."""
    for tenant in sorted({row["tenant"] for row in rows}):
        folder = root / "results" / f"tenant={tenant}"
        folder.mkdir(parents=True)
        part = [{key: value for key, value in row.items() if key != "tenant"}
                for row in rows if row["tenant"] == tenant]
        pq.write_table(pa.Table.from_pylist(part, schema=PART_SCHEMA), folder / "part-0.parquet")
    return str(root)


def _rows(clip: list[float | None], answers: list[str], captions: list[str]) -> list[dict]:
    """Generation rows (their stored CLIPScores), VQA rows and caption rows over two tenants, scored as a job's."""
    rows = [{"id": f"g{i}", "tenant": "acme" if i % 2 else "globex", "region": "eu" if i < 2 else "na",
             "task": "generate", "status": "ok" if score is not None else "blocked", "prompt": f"a poster {i}",
             "clip_score": score} for i, score in enumerate(clip)]
    rows += [{"id": f"q{i}", "tenant": "globex", "region": "na", "task": "vqa", "status": "ok", "answer": answer,
              "answers": ["2"] * 4 + ["two"] * 3 + ["3"] * 3} for i, answer in enumerate(answers)]
    rows += [{"id": f"c{i}", "tenant": "acme", "task": "caption", "status": "ok", "caption": caption,
              "references": ["a cat on a sofa", "an orange cat sleeping on a couch"]}
             for i, caption in enumerate(captions)]
    for row in rows:
        row.update(text_scores(caption=row.get("caption"), answer=row.get("answer"),
                               references=row.get("references"), answers=row.get("answers")))
    return rows


def test_a_runs_results_become_its_group_sums_and_quality_json(tmp_path):
    rows = _rows([21.5, 30.0, None, 18.25], ["2", "3"], ["a cat on a couch", "a dog"])
    layout = OutputLayout(_write_results(tmp_path / "run", rows))
    sums = write_quality(Storage(), layout, "run", QualitySpec(bootstrap=BOOTSTRAP), "tiny-v9")

    assert (sums.overall.rows, sums.overall.clip_score.sum) == (len(rows), 21.5 + 30.0 + 18.25)
    assert sums.groups["tenant"]["acme"].clip_score.mean == pytest.approx((30.0 + 18.25) / 2)
    assert sums.groups["region"]["acme/eu"].clip_score.sum == 30.0 and "acme/None" not in sums.groups["region"]
    assert sums.groups["adapter"]["acme/base"].rows == 2 + 2  # no adapter: the tenant's base model
    assert sums.groups["tenant"]["globex"].vqa_accuracy.sum == pytest.approx(
        vqa_accuracy("2", rows[4]["answers"]) + vqa_accuracy("3", rows[4]["answers"]))
    assert sums.groups["tenant"]["acme"].bleu.matches == [sum(r["bleu_matches"][n] for r in rows[6:]) for n in range(4)]
    assert sums.overall.clip_score.interval is None  # the summary's sums; intervals are quality.json's

    document = json.loads(Path(layout.quality).read_text())
    assert document["clip_model"] == "tiny-v9" and document["bootstrap"]["resamples"] == 200
    interval = document["scores"]["groups"]["tenant"]["acme"]["cider_d"]["interval"]
    assert interval["low"] <= document["scores"]["groups"]["tenant"]["acme"]["cider_d"]["mean"] <= interval["high"]

    # Scores a job switched off are not summed, though the rows keep what they would be scored against.
    sums = write_quality(Storage(), layout, "run", QualitySpec(captions=False, clip_score=False), None)
    assert sums.overall.bleu is None and sums.overall.cider_d is None and sums.overall.clip_score is None
    assert sums.overall.vqa_accuracy.rows == 2
    empty = write_quality(Storage(), OutputLayout(str(tmp_path / "all-rejected")), "run", QualitySpec(), None)
    assert empty.overall.rows == 0 and empty.groups == {}  # nothing ran: nothing scored, still a quality.json
    assert json.loads(Path(tmp_path / "all-rejected" / "quality.json").read_text())["rows"] == 0


def test_eval_against_gives_each_groups_paired_deltas_with_intervals(tmp_path):
    old = _rows([20.0, 30.0, 25.0, 22.0], ["3", "2"], ["a dog", "a cat"])
    new = _rows([24.0, 29.0, 31.0, None], ["2", "2"], ["a cat on a sofa", "a cat"])
    new = [row for row in new if row["id"] != "c1"] + [{**new[0], "id": "g9"}]
    old = [{key: value for key, value in row.items() if key not in TEXT_SCORE_COLUMNS} for row in old]  # unscored
    options = BootstrapOptions(**BOOTSTRAP)
    evaluation = evaluate(_write_results(tmp_path / "new", new), against=_write_results(tmp_path / "old", old),
                          clip="missing", bootstrap=options)
    comparison = evaluation.comparison
    assert (comparison.matched, comparison.only_new, comparison.only_old) == (len(old) - 1, 1, 1)
    assert sorted(comparison.unmatched) == ["new: globex/g9", "old: acme/c1"]
    assert evaluation.new.clip_scored == 0 and evaluation.clip_model is None  # every ok image had its score

    clip = comparison.overall.clip_score  # g3 is blocked in `new`: paired on g0..g2 only
    expected = paired_delta_interval([24.0, 29.0, 31.0], [20.0, 30.0, 25.0], **options.model_dump())
    assert (clip.new, clip.old) == (pytest.approx(28.0), pytest.approx(25.0))
    assert clip.delta == expected and clip.delta.estimate == pytest.approx(3.0)
    globex = comparison.groups["tenant"]["globex"]
    assert globex.clip_score.delta.estimate == pytest.approx(((24 - 20) + (31 - 25)) / 2)
    answers = old[4]["answers"]
    assert globex.vqa_accuracy.delta.estimate == pytest.approx(
        (2 * vqa_accuracy("2", answers) - vqa_accuracy("3", answers) - vqa_accuracy("2", answers)) / 2)
    assert comparison.groups["region"]["acme/eu"].clip_score.delta.estimate == pytest.approx(-1.0)
    low, high = comparison.overall.bleu4.delta.low, comparison.overall.bleu4.delta.high
    assert low <= comparison.overall.bleu4.delta.estimate <= high


def test_eval_of_a_folder_without_results_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "factory", "eval", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"{tmp_path}: no results here" in done.stderr + done.stdout
    with pytest.raises(InputError, match="no results here"):
        evaluate(str(tmp_path / "missing"))


def test_the_console_says_a_scored_runs_overall_figures(tmp_path):
    rows = _rows([21.5, 30.0], ["2"], ["a cat"])
    quality = write_quality(Storage(), OutputLayout(_write_results(tmp_path, rows)), "run", QualitySpec(), None)
    summary = RunSummary(job="q", run_id="run", output=str(tmp_path), input_rows=len(rows), rows=len(rows),
                         rejects=0, by_status={"ok": len(rows)}, tenants={}, images=2, chunks=1, rows_read=len(rows),
                         wall_seconds=1.0, images_per_second=2.0, rows_per_second=4.0, quality=quality)
    out = io.StringIO()
    print_summary(summary, Console(file=out, width=300))
    line = next(text for text in out.getvalue().splitlines() if text.startswith("quality: "))
    assert f"CLIPScore {np.mean([21.5, 30.0]):.2f} (2 rows)" in line and "VQA accuracy 1.000 (1 rows)" in line
    assert "BLEU-4" in line and "CIDEr-D" in line
    print_summary(summary.model_copy(update={"quality": None}), Console(file=(plain := io.StringIO()), width=300))
    assert "quality:" not in plain.getvalue()
