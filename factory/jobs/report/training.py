"""The page `factory report` makes of a training run: one self-contained HTML file, like a run's gallery
(`factory.jobs.report.gallery`): the run's figures (`factory.jobs.training.figures`), the loss curve, and for every
validation prompt its image from the base model beside the adapter's at each checkpoint, then the inputs the run
rejected with their reasons.
"""

from __future__ import annotations

import base64
from html import escape as _e  # quotes too, by default: safe in attributes
from dataclasses import dataclass

import structlog

from factory.errors import InputError
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.commit import read_table
from factory.jobs.report.gallery import thumbnail
from factory.jobs.training.figures import TrainReport
from factory.jobs.training.layout import TrainingLayout

log = structlog.get_logger(__name__)

VALIDATION_SIDE = 192
REJECTS_SHOWN = 200


# ---- the page -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPageStats:
    images: int  # validation images shown
    checkpoints: int  # validations shown (the base model's included)
    rejects: int


def is_training_run(root: str, storage: Storage | None = None) -> bool:
    """Whether `root` (OUTPUT/<run id>) is a training run's: it holds a training report."""
    return (storage or Storage()).exists(TrainingLayout(root).report)


def build_training_page(root: str, storage: Storage) -> tuple[str, TrainingPageStats]:
    """The HTML page of the training run under `root`, and what went into it."""
    layout = TrainingLayout(root)
    try:
        report = TrainReport.model_validate_json(storage.read_bytes(layout.report))
    except (InputError, ValueError) as error:
        raise InputError(f"{root}: no readable training report ({error})") from None
    steps = report.validation_steps or []
    header = "".join(f"<th>{'base model' if step == 0 else f'step {step}'}</th>" for step in steps)
    rows, shown = [], 0
    for index, prompt in enumerate(report.validation_prompts):
        cells = []
        for step in steps:
            data = thumbnail(storage, layout.validation_image(step or None, index), VALIDATION_SIDE)
            shown += data is not None
            cells.append(f'<td><img src="data:image/jpeg;base64,{data}" alt="step {step}"></td>' if data else
                         '<td class="missing">no image</td>')
        rows.append(f'<tr><th class="prompt">{_e(prompt)}</th>{"".join(cells)}</tr>')
    curve = _data_uri(storage, layout.loss_curve)
    rejects = _rejects(storage, root)
    stats = [("steps", report.steps), ("images", report.images), ("held out", report.held_out_images),
             ("rejects", report.rejects), ("held-out loss, base", _loss(report.base_held_out_loss)),
             ("held-out loss, adapter", _loss(report.final_held_out_loss)),
             ("training loss, last 10 steps", _loss(report.final_train_loss)),
             ("training s", f"{report.train_seconds:.1f}")]
    facts = [("adapter", report.adapter_uri), ("sha256", report.adapter_sha256), ("format", report.format),
             ("profile", report.profile), ("base model", report.base_model), ("data digest", report.data_digest),
             ("registered in", report.registry or "not registered")]
    page = _PAGE.format(
        title=_e(f"{report.tenant}/{report.adapter}" + (f" ({report.region})" if report.region else "")),
        root=_e(root), stats="".join(f'<div class="stat"><b>{_e(str(v))}</b><span>{_e(k)}</span></div>'
                                     for k, v in stats),
        facts="".join(f"<tr><th>{_e(k)}</th><td>{_e(str(v))}</td></tr>" for k, v in facts),
        curve=f'<img class="curve" src="data:image/png;base64,{curve}" alt="loss curve">' if curve else
        "<p>no loss curve</p>",
        validation=(f"<table class='validation'><tr><th>prompt</th>{header}</tr>{''.join(rows)}</table>" if rows
                    else "<p>no validation prompts (validation_images: 0, and no held-out images)</p>"),
        rejects=rejects[0],
    )
    return page, TrainingPageStats(images=shown, checkpoints=len(steps), rejects=rejects[1])


def write_training_page(root: str, destination: str, storage: Storage | None = None) -> TrainingPageStats:
    storage = storage or Storage()
    page, stats = build_training_page(root, storage)
    storage.write_bytes(destination, page.encode("utf-8"))
    log.info("training report written", root=root, destination=destination, images=stats.images)
    return stats


def _rejects(storage: Storage, root: str) -> tuple[str, int]:
    table = read_table(storage, OutputLayout(root).rejects, columns=["id", "field", "reason"])
    if table is None:
        return "<p>none</p>", 0
    rows = sorted(table.to_pylist(), key=lambda row: row["id"] or "")
    lines = [f"<tr><td>{_e(row['id'] or '')}</td><td>{_e(row['field'] or '')}</td><td>{_e(row['reason'] or '')}"
             "</td></tr>" for row in rows[:REJECTS_SHOWN]]
    more = f"<p>+{len(rows) - REJECTS_SHOWN} more (see rejects/)</p>" if len(rows) > REJECTS_SHOWN else ""
    return f"<table><tr><th>input</th><th>field</th><th>reason</th></tr>{''.join(lines)}</table>{more}", len(rows)


def _data_uri(storage: Storage, uri: str) -> str | None:
    try:
        return base64.b64encode(storage.read_bytes(uri)).decode("ascii")
    except InputError:
        return None


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; background: #f6f6f4; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }} h2 {{ margin: 28px 0 8px; }} .root {{ color: #666; margin: 0 0 12px; }}
.stats {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.stat {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; }}
.stat b {{ display: block; font-size: 18px; }} .stat span {{ font-size: 12px; color: #666; }}
table {{ border-collapse: collapse; background: #fff; }} th, td {{ border: 1px solid #ddd; padding: 6px;
  text-align: left; vertical-align: top; font-size: 13px; }}
.validation img {{ width: {side}px; height: auto; display: block; }} .prompt {{ max-width: 260px; font-weight: normal; }}
.missing {{ color: #999; }} .curve {{ max-width: 100%; border: 1px solid #ddd; background: #fff; }}
</style></head>
<body><h1>{title}</h1><p class="root">{root}</p><div class="stats">{stats}</div>
<h2>Loss</h2>{curve}
<h2>Validation images: the base model, then the adapter at each checkpoint</h2>{validation}
<h2>Adapter</h2><table>{facts}</table>
<h2>Rejected inputs</h2>{rejects}
</body></html>
""".replace("{side}", str(VALIDATION_SIDE))
