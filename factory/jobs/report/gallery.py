"""A run's static HTML gallery: thumbnails by tenant and region, captions, answers, verdicts, counts, timings;
each edit beside its reference images (a product's packshot beside the ad made from it).

One self-contained file: thumbnails are embedded as data URIs and the styles inline, so it opens from the file
system, offline, wherever it is copied, and shows an `s3://` run as well as a local one. A blocked, quarantined,
rejected or failed row is a placeholder with its reason, never the image: the gallery reads only `image_uri`,
which the engine sets for images that passed the safety check, and shows an edit's references only beside an edit
that passed (a blocked edit's reference may be the image that was flagged). Big runs are sampled per group
(`per_group` cards, in row-id order) with the rest counted, so the file stays a few megabytes.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass

import structlog
from PIL import Image

from factory.errors import InputError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_table
from factory.jobs.report.quality import figure_cells, row_cells
from factory.quality.groups import GroupScores

log = structlog.get_logger(__name__)

THUMBNAIL_SIDE = 256
REFERENCE_SIDE = 128  # an edit's references, in a narrow column beside it
MAX_SOURCE_BYTES = 64 * 1024 * 1024  # an input image larger than this is not thumbnailed
_COLUMNS = ["id", "tenant", "region", "task", "status", "prompt", "question", "caption", "answer", "image_uri",
            "source_uri", "reference_uris", "adapter", "seed", "width", "height", "latency_ms", "error",
            "safety_verdict", "safety_reason", "performance", "reused_from", "checks", "clip_score", "vqa_accuracy",
            "bleu4"]


@dataclass(frozen=True)
class GalleryStats:
    rows: int
    cards: int
    thumbnails: int
    groups: int


def build_gallery(root: str, storage: Storage, *, per_group: int = 60) -> tuple[str, GalleryStats]:
    """The HTML of the run under `root` (OUTPUT/<run id>), and what went into it."""
    layout = OutputLayout(root)
    table = read_table(storage, layout.results, hive=True)
    if table is None:
        raise InputError(f"{root}: no results here (expected {layout.results}/tenant=.../*.parquet)")
    columns = [name for name in _COLUMNS if name in table.column_names]
    rows = sorted(table.select(columns).to_pylist(), key=lambda row: (row["tenant"], row.get("region") or "", row["id"]))
    summary = _read_json(storage, layout.summary)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["tenant"], row.get("region") or "")].append(row)

    thumbnails = 0
    cards = 0
    sections = []
    references: dict[str, str | None] = {}  # a packshot shown beside each of its product's ads is read once
    by_tenant: dict[str, list[tuple[str, list[dict]]]] = defaultdict(list)
    for (tenant, region), members in groups.items():
        by_tenant[tenant].append((region, members))
    for tenant, regions in sorted(by_tenant.items()):
        tenant_rows = [row for _, members in regions for row in members]
        parts = [f'<section class="tenant"><h2>{_e(tenant)}</h2>', _tenant_table(tenant, tenant_rows, summary)]
        for region, members in regions:
            shown = members[:per_group]
            parts.append(f'<h3>{_e(region) if region else "no region"} <small>{len(members)} rows</small></h3>')
            parts.append('<div class="grid">')
            for row in shown:
                card, has_thumbnail = _card(row, storage, references)
                parts.append(card)
                thumbnails += has_thumbnail
                cards += 1
            parts.append("</div>")
            if len(members) > len(shown):
                parts.append(f'<p class="more">+{len(members) - len(shown)} more rows in this region '
                             f"(see the results Parquet)</p>")
        parts.append("</section>")
        sections.append("\n".join(parts))

    counts = Counter(row["status"] for row in rows)
    page = _PAGE.format(
        title=_e(f"factory run {root}"), root=_e(root), header=_header(rows, counts, summary),
        sections="\n".join(sections),
    )
    return page, GalleryStats(rows=len(rows), cards=cards, thumbnails=thumbnails, groups=len(groups))


def write_gallery(root: str, destination: str, storage: Storage | None = None, *, per_group: int = 60) -> GalleryStats:
    storage = storage or Storage()
    page, stats = build_gallery(root, storage, per_group=per_group)
    storage.write_bytes(destination, page.encode("utf-8"))
    log.info("gallery written", root=root, destination=destination, cards=stats.cards)
    return stats


def _read_json(storage: Storage, uri: str) -> dict:
    try:
        return json.loads(storage.read_bytes(uri))
    except (InputError, ValueError):
        return {}  # an unfinished run has no summary yet; the gallery shows what is committed


def _header(rows: list[dict], counts: Counter, summary: dict) -> str:
    latencies = sorted(row["latency_ms"] for row in rows if row.get("latency_ms") is not None)
    median = f"{latencies[len(latencies) // 2]:.0f} ms" if latencies else "n/a"
    items = [("rows", len(rows))] + sorted(counts.items())
    items += [("median model time per row", median)]
    if summary:
        items += [("run wall time", f"{summary.get('wall_seconds', 0):.1f} s"),
                  ("images/s", f"{summary.get('images_per_second', 0):.2f}"), ("rejects", summary.get("rejects", 0))]
    performance = sorted({row["performance"] for row in rows if row.get("performance")})
    if performance:
        items.append(("made with", ", ".join(performance)))
    return "".join(f'<div class="stat"><b>{_e(str(value))}</b><span>{_e(name)}</span></div>' for name, value in items)


def _tenant_table(tenant: str, rows: list[dict], summary: dict) -> str:
    counts = Counter(row["status"] for row in rows)
    compute = (summary.get("tenants", {}).get(tenant) or {}).get("compute_seconds")
    cells = [f"{len(rows)} rows"] + [f"{count} {status}" for status, count in sorted(counts.items())]
    if compute is not None:
        cells.append(f"{compute:.2f} compute s")
    reused = sum(1 for row in rows if row.get("reused_from"))
    if reused:
        cells.append(f"{reused} reused")
    line = '<p class="counts">' + " · ".join(_e(cell) for cell in cells) + "</p>"
    quality = ((summary.get("quality") or {}).get("groups") or {}).get("tenant", {}).get(tenant)
    if not quality:  # a run without `quality:` (README "Quality")
        return line
    cells = figure_cells(GroupScores.model_validate(quality))
    return line + (f'<p class="counts scores">{_e(" · ".join(cells))}</p>' if cells else "")


def _card(row: dict, storage: Storage, references: dict[str, str | None]) -> tuple[str, bool]:
    status = row["status"]
    image_uri = row.get("image_uri") if status == "ok" else None
    if row["task"] not in ("generate", "edit") and status == "ok":
        image_uri = row.get("source_uri")  # a caption or answer is shown beside the image it describes
    thumbnail_data = thumbnail(storage, image_uri) if image_uri else None
    if thumbnail_data is not None:
        picture = f'<img src="data:image/jpeg;base64,{thumbnail_data}" alt="{_e(row["id"])}">'
        if row["task"] == "edit" and row.get("reference_uris"):
            picture = f'<div class="edit">{picture}{_references(row, storage, references)}</div>'
    else:
        reason = row.get("safety_reason") or row.get("error") or ("no image" if status == "ok" else status)
        picture = f'<div class="placeholder {status}"><span>{_e(status)}</span><small>{_e(str(reason)[:160])}</small></div>'
    text = row.get("caption") or row.get("answer") or row.get("prompt") or ""
    lines = [f'<div class="card {status}">', picture, f'<div class="meta"><b>{_e(row["id"])}</b>',
             f'<span class="badge {status}">{_e(status)}</span>']
    if row.get("question"):
        lines.append(f'<p class="q">Q: {_e(row["question"])}</p>')
    if text:
        lines.append(f"<p>{_e(text[:300])}</p>")
    for name, answer in _pairs(row.get("checks")):
        lines.append(f'<p class="q">{_e(name)}: {_e(str(answer)[:200])}</p>')
    scores = row_cells(row)
    if scores:
        lines.append(f'<p class="scores">{_e(" · ".join(scores))}</p>')
    details = [row.get("adapter") or "base", f"seed {row['seed']}" if row.get("seed") is not None else None,
               f"{row['latency_ms']:.0f} ms" if row.get("latency_ms") is not None else None,
               f"reused from {row['reused_from']}" if row.get("reused_from") else None]
    lines.append('<p class="details">' + " · ".join(_e(d) for d in details if d) + "</p></div></div>")
    return "\n".join(lines), thumbnail_data is not None


def _references(row: dict, storage: Storage, cache: dict[str, str | None]) -> str:
    """The column of an edit's reference thumbnails, in order, each named by its file."""
    cells = []
    for uri in row["reference_uris"]:
        if uri not in cache:
            cache[uri] = thumbnail(storage, uri, REFERENCE_SIDE)
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if cache[uri] is None:
            cells.append(f'<div class="reference missing" title="{_e(uri)}">{_e(name)}</div>')
        else:
            cells.append(f'<img class="reference" src="data:image/jpeg;base64,{cache[uri]}" '
                         f'alt="reference {_e(name)}" title="reference: {_e(uri)}">')
    return '<div class="references"><small>from</small>' + "".join(cells) + "</div>"


def _pairs(checks) -> list[tuple[str, str]]:
    """A Parquet map column reads back as (key, value) pairs."""
    if not checks:
        return []
    return sorted(checks.items()) if isinstance(checks, dict) else sorted(tuple(pair) for pair in checks)


def thumbnail(storage: Storage, uri: str, side: int = THUMBNAIL_SIDE) -> str | None:
    """The image at `uri` as a base64 JPEG at most `side` pixels across (for a data URI), or None when it cannot
    be read (a placeholder is drawn instead)."""
    try:
        data = storage.read_bytes(uri, max_bytes=MAX_SOURCE_BYTES)
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (side, side))  # JPEG: decode at a reduced size
            picture = image.convert("RGB")
            picture.thumbnail((side, side))
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=82)
    except Exception as error:  # noqa: BLE001 - a missing or odd image is a placeholder, never a broken gallery
        log.warning("no thumbnail", uri=uri, error=str(error)[:200])
        return None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(text: str) -> str:
    return html.escape(text, quote=True)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; background: #f6f6f4; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 12px; }} h2 {{ margin: 28px 0 4px; }} h3 {{ margin: 16px 0 8px; }}
h3 small, .counts, .more {{ color: #666; font-weight: normal; font-size: 13px; }}
.stats {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.stat {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; }}
.stat b {{ display: block; font-size: 18px; }} .stat span {{ font-size: 12px; color: #666; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px; }}
.card {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; overflow: hidden; }}
.card img {{ width: 100%; aspect-ratio: 1; object-fit: cover; display: block; background: #eee; }}
.placeholder {{ width: 100%; aspect-ratio: 1; display: flex; flex-direction: column; align-items: center;
  justify-content: center; background: repeating-linear-gradient(45deg, #e4e4e4, #e4e4e4 10px, #efefef 10px,
  #efefef 20px); color: #555; text-align: center; }}
.placeholder span {{ font-weight: bold; text-transform: uppercase; }}
.placeholder small {{ padding: 4px 8px; overflow-wrap: anywhere; }}
.edit {{ display: grid; grid-template-columns: 2fr 1fr; background: #eee; }}
.references {{ display: flex; flex-direction: column; gap: 4px; padding: 4px; font-size: 11px; color: #666; }}
.card .references img.reference {{ width: 100%; aspect-ratio: auto; object-fit: contain; background: #fff; }}
.reference.missing {{ padding: 4px; overflow-wrap: anywhere; }}
.meta {{ padding: 8px; font-size: 13px; }} .meta p {{ margin: 4px 0; }} .details, .q {{ color: #666; }}
.scores {{ color: #2d5d8a; }}
.badge {{ float: right; font-size: 11px; padding: 1px 6px; border-radius: 8px; background: #ddd; }}
.badge.ok {{ background: #cdebd3; }} .badge.blocked, .badge.quarantined {{ background: #f3c9c9; }}
.badge.failed, .badge.rejected {{ background: #f1dfb8; }}
</style></head>
<body><h1>{root}</h1><div class="stats">{header}</div>
{sections}
</body></html>
"""
