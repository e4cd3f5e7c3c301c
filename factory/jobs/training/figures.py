"""A training run's figures: `train_report.json` (the run's counts, losses and adapter) and `loss_curve.png`, the
training loss of every step, its moving average, and the held-out loss at each validation against the base
model's (drawn with Pillow). Written by stage 2 (`fit`); `factory report` makes a page of them.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from factory.model.training.loop import Progress
from factory.routing.executor import encode_png

_WIDTH, _HEIGHT, _MARGIN = 900, 420, 60
_AVERAGE = 10  # steps in the moving average
_RAW, _SMOOTH, _HELD, _BASE, _INK, _GRID = (190, 200, 225), (40, 80, 200), (210, 60, 40), (120, 120, 120), \
    (20, 20, 20), (232, 232, 232)


class TrainReport(BaseModel):
    """`train_report.json`."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The run")
    tenant: str = Field(description="Whose adapter")
    region: str | None = Field(description="The region it styles, if any")
    adapter: str = Field(description="Its name in the registry")
    adapter_uri: str = Field(description="The adapter file")
    adapter_sha256: str = Field(description="sha256 of its bytes")
    format: str = Field(description="diffusers or kohya")
    profile: str = Field(description="The profile whose transformer was trained")
    base_model: str = Field(description="The profile's generator checkpoint")
    steps: int = Field(description="Optimizer steps done")
    images: int = Field(description="Captioned images encoded")
    held_out_images: int = Field(description="Of those, kept out of training")
    rejects: int = Field(description="Inputs rejected (reasons under rejects/)")
    data_digest: str = Field(description="sha256 over every sample's id, image digest and caption")
    base_held_out_loss: float | None = Field(description="Held-out flow-matching loss of the base model")
    final_held_out_loss: float | None = Field(description="Held-out loss after the last step")
    final_train_loss: float | None = Field(description="Mean training loss of the last 10 steps")
    train_seconds: float = Field(description="Time in training steps (validation excluded), all attempts")
    losses: list[float] = Field(description="Training loss of each step (mean over the global batch)")
    held_out: dict[str, float] = Field(description="Held-out loss by step (step 0: the base model)")
    validation_prompts: list[str] = Field(description="Prompts of the validation images, in order")
    validation_steps: list[int] = Field(description="Steps with validation images (0: the base model's)")
    registry: str | None = Field(default=None, description="The tenants registry it is registered in, if asked")
    registered: bool | None = Field(
        default=None, description="What the last attempt did to the registry: True, added the adapter; False, "
        "found it registered already; None, not asked to register")


def moving_average(values: list[float], window: int = _AVERAGE) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        out.append(total / min(index + 1, window))
    return out


def loss_curve_png(progress: Progress) -> bytes:
    """The loss curve as a PNG: steps across, loss up (log scale when it spans more than a decade)."""
    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    losses = progress.losses
    values = losses + list(progress.held_out.values())
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    use_log = low > 0 and high / low > 10
    scale = math.log if use_log else (lambda v: v)
    bottom, top = scale(low), scale(high)
    if top == bottom:
        bottom, top = bottom - 0.5, top + 0.5
    steps = max(progress.step, 1)
    left, right, upper, lower = _MARGIN, _WIDTH - 20, 20, _HEIGHT - _MARGIN

    def at(step: float, value: float) -> tuple[float, float]:
        return (left + (right - left) * step / steps, lower - (lower - upper) * (scale(value) - bottom) / (top - bottom))

    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = lower - (lower - upper) * fraction
        draw.line([(left, y), (right, y)], fill=_GRID)
        value = bottom + (top - bottom) * fraction
        draw.text((4, y - 6), f"{math.exp(value) if use_log else value:.3g}", fill=_INK)
    draw.line([(left, upper), (left, lower), (right, lower)], fill=_INK)
    draw.text((left, lower + 8), "0", fill=_INK)
    draw.text((right - 40, lower + 8), f"step {steps}", fill=_INK)
    if len(losses) > 1:
        draw.line([at(i + 1, v) for i, v in enumerate(losses)], fill=_RAW, width=1)
        draw.line([at(i + 1, v) for i, v in enumerate(moving_average(losses))], fill=_SMOOTH, width=2)
    if 0 in progress.held_out:
        y = at(0, progress.held_out[0])[1]
        for x in range(left, right, 12):
            draw.line([(x, y), (min(x + 6, right), y)], fill=_BASE, width=1)
    held = sorted(progress.held_out.items())
    if len(held) > 1:
        draw.line([at(s, v) for s, v in held], fill=_HELD, width=2)
    for step, value in held:
        x, y = at(step, value)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=_HELD)
    legend = [("training loss", _RAW), (f"moving average ({_AVERAGE})", _SMOOTH), ("held-out loss", _HELD),
              ("base model, held out", _BASE)]
    for row, (label, colour) in enumerate(legend):
        y = upper + 4 + 16 * row
        draw.line([(right - 200, y + 6), (right - 180, y + 6)], fill=colour, width=3)
        draw.text((right - 172, y), label, fill=_INK)
    return encode_png(image)
