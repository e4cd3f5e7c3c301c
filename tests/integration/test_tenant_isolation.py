"""Tenants confined in a real job: each reads only under its roots and writes only its own rejects.

Two tenants share one bucket and one local disk. acme's manifest names images everywhere a hostile row would look
(an absolute path, '..', links to a file and to a folder outside, file://, globex's prefix, percent-encoded '..',
a look-alike prefix); every one is a reject naming `image` before any byte is read, while its in-root rows run.
Both tenants use the id `p1` and both run. A link that is swapped between `factory validate` and `factory run`
is caught at the fetch.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_table
from factory.jobs.report.gallery import build_gallery
from factory.jobs.run import run_job, validate_job
from factory.jobs.spec import load_spec
from tests.integration.test_job import results_of
from tests.s3server import new_bucket

pytestmark = pytest.mark.slow

SECRET_COLOUR = (255, 0, 255)  # only the out-of-root image has it: a thumbnail of that colour would be a leak


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, "PNG")
    return buffer.getvalue()


def lines(rows: list) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def test_rows_read_only_under_their_tenants_roots_and_rejects_stay_with_their_tenant(ray_cluster, s3_endpoint,
                                                                                    tmp_path):
    storage = Storage()
    bucket = new_bucket(s3_endpoint, "roots")
    acme, secret, shared, jobs = (tmp_path / name for name in ("acme", "secret", "shared", "jobs"))
    for folder in (acme, secret, shared, jobs):
        folder.mkdir()
    (acme / "in.png").write_bytes(png((20, 120, 20)))
    (shared / "x.png").write_bytes(png((20, 20, 160)))
    (secret / "s.png").write_bytes(png(SECRET_COLOUR))
    (acme / "link.png").symlink_to(secret / "s.png")
    (acme / "linkdir").symlink_to(secret)
    (acme / "swap.png").symlink_to(acme / "in.png")  # inside while validated, swapped before the run
    storage.write_bytes(f"{bucket}/acme/a.png", png((200, 200, 20)))
    storage.write_bytes(f"{bucket}/globex/g.png", png((0, 160, 160)))
    storage.write_bytes(f"{bucket}/acme-evil/e.png", png(SECRET_COLOUR))

    (tmp_path / "tenants.yaml").write_text(json.dumps({"tenants": {
        "acme": {"inputs": ["acme", f"{bucket}/acme/"]}, "globex": {"inputs": [f"{bucket}/globex/"]}}}))
    caption = {"task": "caption"}
    (jobs / "globex.jsonl").write_text(lines([
        {"id": "p1", "tenant": "globex", "prompt": "a globex poster"},
        {"id": "g-own", "tenant": "globex", "image": f"{bucket}/globex/g.png", **caption},
        {"id": "g-shared", "tenant": "globex", "image": str(shared / "x.png"), **caption},
    ]))
    outside = {
        "out-absolute": str(secret / "s.png"),
        "out-dotdot": f"{acme}/../secret/s.png",
        "out-relative": "../secret/s.png",
        "out-link": str(acme / "link.png"),
        "out-linkdir": str(acme / "linkdir" / "s.png"),
        "out-file-uri": f"file://{secret}/s.png",
        "out-other-tenant": f"{bucket}/globex/g.png",
        "out-encoded": f"{acme}/%2e%2e/secret/s.png",
        "out-s3-encoded": f"{bucket}/acme/%2e%2e/globex/g.png",
        "out-lookalike": f"{bucket}/acme-evil/e.png",
    }
    (jobs / "acme.jsonl").write_text(lines([
        {"id": "p1", "tenant": "acme", "prompt": "an acme poster"},
        {"id": "p1", "tenant": "acme", "prompt": "acme's own duplicate"},
        {"id": "a-local", "tenant": "acme", "image": str(acme / "in.png"), **caption},
        {"id": "a-s3", "tenant": "acme", "image": f"{bucket}/acme/a.png", **caption},
        {"id": "a-shared", "tenant": "acme", "image": str(shared / "x.png"), **caption},
        {"id": "a-swap", "tenant": "acme", "image": str(acme / "swap.png"), **caption},
        *({"id": row_id, "tenant": "acme", "image": image, **caption} for row_id, image in outside.items()),
        {"id": "w1", "tenant": "wayne", "prompt": "a tenant nobody registered"},
        '{"id": "broken", "tenant": "acme", ',
    ]))
    spec_path = tmp_path / "isolation.yaml"
    spec_path.write_text(
        f"name: isolation\ninputs: [jobs/globex.jsonl, jobs/acme.jsonl]\noutput: {tmp_path / 'out'}\n"
        f"tenants: tenants.yaml\ninput_roots: [shared]\ndefaults: {{steps: 2, width: 64, height: 64}}\n"
        "serve: {replicas: 1, num_cpus: 1, max_batch_size: 4}\nreuse: false\n"
    )
    spec = load_spec(spec_path)

    validation = validate_job(spec, run_id="r1", address=ray_cluster["address"], show_progress=False)
    assert validation.reject_fields == {"image": len(outside), "row": 1, "tenant": 1}
    assert validation.reject_tenants == {"_unknown": 2, "acme": len(outside) + 1}  # + acme's own duplicate

    (acme / "swap.png").unlink()
    (acme / "swap.png").symlink_to(secret / "s.png")
    run_job(spec, run_id="r1", address=ray_cluster["address"], show_progress=False)
    root = str(tmp_path / "out" / "r1")
    layout = OutputLayout(root)

    results = {(row["tenant"], row["id"]): row for row in results_of(storage, root)}
    assert {key: row["status"] for key, row in results.items()} == {
        ("globex", "p1"): "ok", ("globex", "g-own"): "ok", ("globex", "g-shared"): "ok",
        ("acme", "p1"): "ok", ("acme", "a-local"): "ok", ("acme", "a-s3"): "ok", ("acme", "a-shared"): "ok",
        ("acme", "a-swap"): "rejected",
    }
    swapped = results[("acme", "a-swap")]
    assert swapped["error"].startswith(f"image: {acme / 'swap.png'} is outside the inputs of tenant acme: "
                                       f"it resolves to {secret / 's.png'}")
    assert results[("acme", "p1")]["image_uri"] == layout.image("acme", "p1")
    assert results[("globex", "p1")]["image_uri"] == layout.image("globex", "p1")

    rejects = read_table(storage, layout.rejects, hive=True).to_pylist()
    by_id = {(row["tenant"], row["id"]): row for row in rejects}
    assert len(by_id) == len(rejects) == len(outside) + 3
    for row_id, image in outside.items():
        reject = by_id[("acme", row_id)]
        assert reject["field"] == "image" and "is outside the inputs of tenant acme" in reject["reason"], reject
        assert reject["reason"].endswith(f"(allowed: {acme}/, {bucket}/acme/, {shared}/)")
    duplicate = by_id[("acme", "p1")]
    assert duplicate["reason"] == f"duplicate id 'p1' (first at {jobs / 'acme.jsonl'}#1)"
    assert all(row["manifest"] == str(jobs / "acme.jsonl") for row in rejects)  # never globex's manifest
    assert {key for key in by_id if key[0] == "_unknown"} == {("_unknown", "w1"), ("_unknown", None)}
    assert {Path(uri).parent.name for uri in storage.list_files(layout.rejects)} == {
        "tenant=acme", "tenant=_unknown"}

    # Nothing from outside a root reached the results or the gallery: no source, no thumbnail of it.
    sources = {row["source_uri"] for row in results.values() if row["status"] == "ok" and row["source_uri"]}
    assert sources == {f"{bucket}/globex/g.png", str(shared / "x.png"), str(acme / "in.png"), f"{bucket}/acme/a.png"}
    page, stats = build_gallery(root, storage)
    assert stats.thumbnails == 7  # two generated images, five captioned inputs, all in their roots
    for encoded in re.findall(r'data:image/jpeg;base64,([^"]+)', page):
        colour = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB").resize((1, 1)).getpixel((0, 0))
        assert sum(abs(a - b) for a, b in zip(colour, SECRET_COLOUR, strict=True)) > 120, colour
