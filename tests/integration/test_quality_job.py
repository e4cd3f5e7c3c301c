"""Quality end to end on the shared local Ray: a job with `quality:` scores its rows (CLIPScore in the replicas,
VQA accuracy and BLEU where rows are shaped), sums them per tenant, region and adapter, writes quality.json and
shows the scores in the gallery; public benchmark files run as manifests; `factory eval --against` compares two
real runs. Every expected value is computed here, from the runs' own Parquet and PNGs, with the reference
implementations (pycocoevalcap, the scorer on the image files) and rows aligned by this test."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_table
from factory.jobs.report.gallery import build_gallery
from factory.jobs.run import run_job
from factory.jobs.spec import load_spec
from factory.model.clip import ClipScorer
from factory.model.profiles import PROFILES
from factory.quality.bootstrap import paired_delta_interval
from factory.quality.captions import tokenize
from factory.quality.scores import text_scores
from factory.quality.vqa import vqa_accuracy
from tests.benchmark_files import coco_captions, textcaps, vqa_annotations, vqa_questions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMALL = {"width": 64, "height": 64, "steps": 1}
BOOTSTRAP = {"resamples": 300, "seed": 5}


def _rows(root: str) -> list[dict]:
    return read_table(Storage(), OutputLayout(root).results, hive=True).to_pylist()


def _write_spec(folder: Path, name: str, **sections) -> Path:
    spec = {"name": name, "output": str(folder / "out"), "defaults": SMALL,
            "serve": {"replicas": 1, "num_cpus": 0.5, "max_batch_size": 4}, **sections}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _manifest(folder: Path, sample_images, *, seed_offset: int = 0, references=None, answers=None,
              drop: str | None = None, extra: bool = False) -> Path:
    """Generation rows over two tenants, regions and the base model; caption rows with references and VQA rows with
    answers on real photos."""
    for name in ("chelsea", "coffee", "astronaut"):
        shutil.copy(sample_images[name], folder / f"{name}.png")
    rows = [{"id": f"g{i}", "tenant": "acme" if i % 2 else "globex", "region": "eu" if i % 3 else "na",
             "prompt": f"a red bicycle poster, no. {i}", "seed": i + seed_offset} for i in range(6)]
    rows += [{"id": f"c-{name}", "tenant": "acme", "task": "caption", "image": f"{name}.png",
              "references": (references or {}).get(f"c-{name}", [f"a photo of a {name}", "a picture"])}
             for name in ("chelsea", "coffee")]
    rows += [{"id": f"q-{name}", "tenant": "globex", "region": "na", "image": f"{name}.png",
              "question": "What is in the picture?", "answers": (answers or {}).get(f"q-{name}", ["cat"] * 10)}
             for name in ("chelsea", "astronaut")]
    rows = [row for row in rows if row["id"] != drop]
    if extra:
        rows.append({"id": "only-new", "tenant": "acme", "prompt": "a lamp", "seed": 1})
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def scorer(tiny_path):
    return ClipScorer.from_profile(PROFILES["tiny"].quality.clip)


def _benchmark_files(folder: Path, sample_images) -> list[dict]:
    """COCO captions, VQAv2 and TextCaps files in their published layouts, with real photos as their images; the
    `benchmarks:` entries that read them."""
    images = folder / "coco" / "val2014"
    images.mkdir(parents=True)
    names = ["COCO_val2014_000000391895.jpg", "COCO_val2014_000000522418.jpg", "COCO_val2014_000000184613.jpg",
             "COCO_val2014_000000262148.jpg"]
    for name, photo in zip(names, ("chelsea", "coffee", "astronaut", "chelsea")):
        Image.open(sample_images[photo]).convert("RGB").save(images / name)
    (folder / "textcaps" / "train").mkdir(parents=True)
    for image_id, photo in (("0a0bc91825468c45", "coffee"), ("011e7e629fb9ae7b", "chelsea")):
        Image.open(sample_images[photo]).convert("RGB").save(folder / "textcaps" / "train" / f"{image_id}.jpg")
    for name, document in (("captions_val2014.json", coco_captions()), ("questions.json", vqa_questions()),
                           ("annotations.json", vqa_annotations()), ("TextCaps_0.1_val.json", textcaps())):
        (folder / name).write_text(json.dumps(document))
    return [
        {"format": "coco_captions", "annotations": "captions_val2014.json", "images": "coco/val2014", "tenant": "coco"},
        {"format": "vqav2", "questions": "questions.json", "annotations": "annotations.json",
         "images": "coco/val2014", "tenant": "vqa"},
        {"format": "textcaps", "annotations": "TextCaps_0.1_val.json", "images": "textcaps", "tenant": "textcaps"},
    ]


@pytest.fixture(scope="module")
def two_runs(ray_cluster, sample_images, tmp_path_factory):
    """Run `old` scores everything in its replicas. Run `new` (other seeds, one row fewer and one more, references
    and answers that are `old`'s own captions and answers, and three public benchmarks' files) scores its text but
    not its images. Two runs serve every test here: each run deploys and loads its models once."""
    old_dir, new_dir = tmp_path_factory.mktemp("old"), tmp_path_factory.mktemp("new")
    spec = _write_spec(old_dir, "quality-old", inputs=[str(_manifest(old_dir, sample_images))],
                       quality={"bootstrap": BOOTSTRAP})
    old = run_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    by_id = {row["id"]: row for row in _rows(old.output)}
    new_inputs = _manifest(new_dir, sample_images, seed_offset=100, drop="g5", extra=True,
                           references={f"c-{n}": [by_id[f"c-{n}"]["caption"]] for n in ("chelsea", "coffee")},
                           answers={f"q-{n}": [by_id[f"q-{n}"]["answer"]] for n in ("chelsea", "astronaut")})
    spec = _write_spec(new_dir, "quality-new", inputs=[str(new_inputs)],
                       benchmarks=_benchmark_files(new_dir, sample_images),
                       quality={"clip_score": False, "bootstrap": BOOTSTRAP})
    new = run_job(load_spec(spec), address=ray_cluster["address"], show_progress=False)
    return old, new


def test_a_scored_run_has_row_scores_group_sums_quality_json_and_a_gallery(two_runs, scorer):
    old, _ = two_runs
    rows = _rows(old.output)
    made = [row for row in rows if row["task"] == "generate"]
    assert len(made) == 6 and all(row["status"] == "ok" for row in rows)
    # CLIPScore of each image file against its prompt, as the replica scored it in the batch that made it.
    images = [Image.open(io.BytesIO(Storage().read_bytes(row["image_uri"]))) for row in made]
    expected = scorer.score(images, [row["prompt"] for row in made])
    assert [row["clip_score"] for row in made] == pytest.approx(expected, abs=1e-4)
    assert all(0 < row["quality_ms"] <= row["latency_ms"] for row in made)
    for row in rows:
        if row["task"] != "generate":
            assert row["clip_score"] is None and row["quality_ms"] is None
        assert {k: v for k, v in row.items() if k in ("vqa_accuracy", "bleu4") and v is not None} == {
            k: v for k, v in text_scores(caption=row["caption"], answer=row["answer"],
                                         references=row["references"], answers=row["answers"]).items()
            if k in ("vqa_accuracy", "bleu4")}

    # The summary's sums per tenant, region and adapter are the sums of these rows' scores.
    groups = old.quality.groups
    for tenant in ("acme", "globex"):
        clip = [row["clip_score"] for row in made if row["tenant"] == tenant]
        summed = groups["tenant"][tenant].clip_score
        assert (summed.rows, summed.sum, summed.mean) == (len(clip), pytest.approx(sum(clip)),
                                                          pytest.approx(np.mean(clip)))
        adapter = groups["adapter"][f"{tenant}/base"]  # no registry: every row ran the base model
        assert adapter.rows == sum(row["tenant"] == tenant for row in rows)
    eu = [row["clip_score"] for row in made if row["tenant"] == "acme" and row["region"] == "eu"]
    assert groups["region"]["acme/eu"].clip_score.sum == pytest.approx(sum(eu))
    vqa = [row["vqa_accuracy"] for row in rows if row["task"] == "vqa"]
    assert groups["region"]["globex/na"].vqa_accuracy.sum == pytest.approx(sum(vqa))
    captions = [row for row in rows if row["task"] == "caption"]
    counts = old.quality.groups["tenant"]["acme"].bleu
    assert counts.guesses == [sum(row["bleu_guesses"][k] for row in captions) for k in range(4)]
    assert counts.candidate_length == sum(row["bleu_candidate_length"] for row in captions)

    document = json.loads(Storage().read_bytes(OutputLayout(old.output).quality))
    assert document["clip_model"].startswith("tiny-v") and document["bootstrap"]["resamples"] == 300
    interval = document["scores"]["overall"]["clip_score"]["interval"]
    assert interval["low"] <= document["scores"]["overall"]["clip_score"]["mean"] <= interval["high"]
    assert "tokenizer" in document["notes"] and "cider_d" in document["notes"]

    page, _ = build_gallery(old.output, Storage())
    assert f"CLIPScore {made[0]['clip_score']:.2f}" in page
    assert f"BLEU-4 {captions[0]['bleu4']:.3f}" in page and "CIDEr-D" in page


def test_factory_eval_against_compares_two_runs_on_their_shared_rows(two_runs, scorer, tmp_path):
    old, new = two_runs
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, "-m", "factory", "eval", new.output, "--against", old.output, "--resamples", "300",
         "--seed", "5", "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "new - old on 9 paired rows (8 only new, 1 only old)" in done.stdout  # 7 of them: the benchmarks'
    evaluation = json.loads(out.read_text())
    comparison = evaluation["comparison"]
    assert {"new: acme/only-new", "old: acme/g5"} <= set(comparison["unmatched"])
    # `new` scored no images in its run: eval scored them from their files, with the profile's CLIP model.
    assert evaluation["new"]["clip_scored"] == 6 and evaluation["old"]["clip_scored"] == 0

    # Expected values, computed here: rows aligned by (tenant, id), the images scored by the scorer directly.
    new_rows, old_rows = {(r["tenant"], r["id"]): r for r in _rows(new.output)}, {
        (r["tenant"], r["id"]): r for r in _rows(old.output)}
    paired = [(new_rows[key], old_rows[key]) for key in sorted(new_rows.keys() & old_rows.keys())]
    made = [(a, b) for a, b in paired if a["task"] == "generate"]
    new_clip = scorer.score([Image.open(io.BytesIO(Storage().read_bytes(a["image_uri"]))) for a, _ in made],
                            [a["prompt"] for a, _ in made])
    old_clip = [b["clip_score"] for _, b in made]
    expected = paired_delta_interval(new_clip, old_clip, resamples=300, seed=5)
    delta = comparison["overall"]["clip_score"]["delta"]
    assert delta["estimate"] == pytest.approx(np.mean(np.subtract(new_clip, old_clip)), abs=1e-4)
    assert (delta["low"], delta["high"], delta["rows"]) == (pytest.approx(expected.low, abs=1e-4),
                                                            pytest.approx(expected.high, abs=1e-4), 5)
    acme = [(n, o) for (a, _), n, o in zip(made, new_clip, old_clip) if a["tenant"] == "acme"]
    assert comparison["groups"]["tenant"]["acme"]["clip_score"]["delta"]["estimate"] == pytest.approx(
        np.mean([n - o for n, o in acme]), abs=1e-4)

    # `new`'s references and answers are `old`'s own outputs: every new caption and answer is exactly right.
    answered = [(a, b) for a, b in paired if a["task"] == "vqa"]
    vqa = comparison["overall"]["vqa_accuracy"]
    assert vqa["new"] == 1.0 and vqa["old"] == pytest.approx(np.mean([b["vqa_accuracy"] for _, b in answered]))
    assert vqa["delta"]["estimate"] == pytest.approx(1.0 - vqa["old"])
    captioned = [(a, b) for a, b in paired if a["task"] == "caption"]

    def corpus_bleu4(rows):
        references = {i: [tokenize(text) for text in row["references"]] for i, row in enumerate(rows)}
        candidates = {i: [tokenize(row["caption"])] for i, row in enumerate(rows)}
        return Bleu(4).compute_score(references, candidates, verbose=0)[0][3]

    bleu4 = comparison["overall"]["bleu4"]
    assert bleu4["new"] == pytest.approx(corpus_bleu4([a for a, _ in captioned]))
    assert bleu4["old"] == pytest.approx(corpus_bleu4([b for _, b in captioned]))
    assert bleu4["delta"]["estimate"] == pytest.approx(bleu4["new"] - bleu4["old"])


def test_public_benchmark_files_run_as_manifests_and_score_in_quality_json(two_runs):
    _, summary = two_runs
    every_row = _rows(summary.output)
    assert summary.rejects == 0 and {row["status"] for row in every_row} == {"ok"}
    rows = [row for row in every_row if row["tenant"] in ("coco", "vqa", "textcaps")]
    assert sorted((row["tenant"], row["id"]) for row in rows) == [
        ("coco", "184613"), ("coco", "391895"), ("coco", "522418"), ("textcaps", "011e7e629fb9ae7b"),
        ("textcaps", "0a0bc91825468c45"), ("vqa", "262148000"), ("vqa", "262148001")]
    staged = list(Storage().list_files(str(Path(summary.output) / "_inputs")))
    assert sorted(Path(uri).name.split("-")[0] for uri in staged) == ["coco_captions", "textcaps", "vqav2"]

    document = json.loads(Storage().read_bytes(OutputLayout(summary.output).quality))["scores"]
    # The run's CIDEr-D frequencies come from every scored caption row's references: the manifest's two too.
    captioned = [row for row in every_row if row["task"] == "caption" and row["references"]]
    assert len(captioned) == 4 + 2  # COCO's 184613 has no captions: run, but not scored
    references = {i: [tokenize(text) for text in row["references"]] for i, row in enumerate(captioned)}
    candidates = {i: [tokenize(row["caption"])] for i, row in enumerate(captioned)}
    bleu, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    cider, per_row = Cider().compute_score(references, candidates)
    assert document["overall"]["bleu"]["bleu"] == pytest.approx(bleu, rel=1e-9)
    assert document["overall"]["cider_d"]["mean"] == pytest.approx(cider, rel=1e-9)
    textcaps_cider = [score for score, row in zip(per_row, captioned) if row["tenant"] == "textcaps"]
    assert document["groups"]["tenant"]["textcaps"]["cider_d"]["sum"] == pytest.approx(sum(textcaps_cider))
    answered = [row for row in rows if row["task"] == "vqa"]
    assert [len(row["answers"]) for row in answered] == [10, 10]
    assert document["groups"]["tenant"]["vqa"]["vqa_accuracy"]["mean"] == pytest.approx(
        np.mean([vqa_accuracy(row["answer"], row["answers"]) for row in answered]))
    assert document["overall"]["clip_score"] is None
