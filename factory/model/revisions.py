"""Hub checkpoints pinned to commits.

A profile's hub component may name a branch or tag, or nothing (the default branch), and a branch moves. A job
resolves each such component to the commit it points at once, when it starts (`pin_revisions`), and hands the
commits to its replicas, so every replica loads the same weights, even one Serve restarts hours later, and the
commit is what results (`model_version`) and reuse keys record. A commit pinned in the profile
(`org/name@<40 hex>`) needs no resolution and no network.

Resolution is huggingface_hub's `resolve_revision`: the Hub when it can be reached, otherwise (HF_HUB_OFFLINE, no
network, Hub down) the `refs/<revision>` file of the local hub cache, which is how every huggingface_hub download
finds a branch's commit offline. Local folders and the tiny profile are not hub checkpoints: nothing to resolve.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import structlog

from factory.errors import ModelError
from factory.model.profiles import TINY_SOURCE, ModelSource, Profile, with_revisions

log = structlog.get_logger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_source(source: str) -> bool:
    """Whether `source` is a hub ID: shaped `org/name` and not a local folder (nor the tiny profile's)."""
    return source != TINY_SOURCE and _HUB_ID.match(source) is not None and not os.path.isdir(source)


def resolve_commit(repo: str, revision: str | None = None, *, cache_dir: str | Path | None = None,
                   local_files_only: bool | None = None) -> str:
    """The commit `revision` (None: the default branch) of hub model `repo` points at now. `local_files_only`
    None follows HF_HUB_OFFLINE; the local cache answers when the Hub cannot."""
    from huggingface_hub import constants, resolve_revision
    from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    try:
        resolved = resolve_revision(repo, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except (RevisionResolutionError, HfHubHTTPError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"{repo}@{revision or 'main'}: cannot resolve it to a commit ({reason}); pin the commit in the profile "
            f"({repo}@<commit>) or the job's `revisions:`, or fill the hub cache where the job starts"
        ) from None
    return resolved.resolved


def pin_revisions(profile: Profile, *, cache_dir: str | Path | None = None,
                  local_files_only: bool | None = None) -> Profile:
    """`profile` with every hub component's revision a commit (resolved now where it is not one already)."""
    commits = {
        name: resolve_commit(component.source, component.revision, cache_dir=cache_dir,
                             local_files_only=local_files_only)
        for name, component in unpinned(profile).items()
    }
    if commits:
        log.info("model revisions pinned", profile=profile.name, commits=commits)
    return with_revisions(profile, commits)


def unpinned(profile: Profile) -> dict[str, ModelSource]:
    """The profile's hub components whose revision is not a commit yet."""
    return {name: component for name, component in profile.components.items()
            if is_hub_source(component.source) and not component.pinned}


def hub_revisions(profile: Profile) -> dict[str, str]:
    """The commits of a pinned profile's hub components, by component: what a job hands its replicas."""
    return {name: component.revision for name, component in profile.components.items()
            if is_hub_source(component.source) and component.revision is not None}
