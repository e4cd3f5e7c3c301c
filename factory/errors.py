"""Errors a user can act on. Each carries a one-line message that names what was wrong.

Also the one way a pydantic `ValidationError` is put into words, so a job spec, a tenants file, a manifest row
and a CLI request all say the same thing about the same mistake: ``serve.replicas: Input should be greater than
or equal to 1, got 0``, ``colour: unknown field``, ``name: required``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

Loc = tuple[str | int, ...]
_MAX_SHOWN = 60  # an input longer than this is cut: the line names the problem, it need not repeat a prompt


class FactoryError(Exception):
    """Base for every error factory reports to a person as one line (never a traceback)."""


class ConfigError(FactoryError):
    """A job spec, profile, registry or policy file is invalid."""


class InputError(FactoryError):
    """An input (manifest row, image, adapter file) cannot be used."""


class StorageUnavailable(FactoryError):
    """The store kept failing (5xx, throttling, dropped connections) after every retry: an outage, not bad input.
    Work that meets it is left undone, to be redone by a re-run, rather than recorded as a bad row."""


class ModelError(FactoryError):
    """A model could not be built, loaded or run."""


class UnsafeCluster(FactoryError):
    """The Ray a command would run on lets callers in without a token, or listens beyond where it should."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where (a dotted field, "" for the input as a whole) and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


def validation_problems(error: ValidationError, suggest: Callable[[Loc], str] | None = None) -> list[Problem]:
    """Every problem pydantic found, in its order, in our words.

    `suggest(loc)` may return text to append to an unknown field's reason (" (did you mean x?)"): only a caller
    that knows the model can say what was meant.
    """
    return [_problem(detail, suggest) for detail in error.errors(include_url=False)]


def one_line(problems: Sequence[Problem], limit: int = 3) -> str:
    """The first `limit` problems on one line, and how many more there are."""
    shown = "; ".join(str(problem) for problem in problems[:limit])
    if len(problems) > limit:
        shown += f" (and {len(problems) - limit} more)"
    return shown


def _dotted(loc: Loc) -> str:
    """``("serve", "replicas")`` -> ``serve.replicas``; ``("items", 0, "x")`` -> ``items[0].x``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(detail: Any, suggest: Callable[[Loc], str] | None) -> Problem:
    loc = tuple(detail["loc"])
    kind = detail["type"]
    if kind == "extra_forbidden":
        reason = "unknown field" + (suggest(loc) if suggest is not None else "")
    elif kind == "missing":
        reason = "required"
    elif kind == "value_error":
        # Our own validators already say what they got, when that helps.
        reason = str(detail["msg"]).removeprefix("Value error, ")
    else:
        reason = str(detail["msg"]) + _got(detail.get("input"))
    return Problem(_dotted(loc), reason)


def _got(value: Any) -> str:
    # Scalars only (bool is an int): a whole mapping or list would not fit on the line.
    if not isinstance(value, str | int | float):
        return ""
    shown = repr(value)
    return f", got {shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN - 3] + '...'}"
