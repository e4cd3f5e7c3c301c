"""Whether a profile can run a request: a check on the request and the profile alone, before any model is loaded.

`factory validate` runs it on every row, so a job whose rows its profile cannot run is refused before a GPU is
booked; the batch runner runs it again on every call, so a row that reaches a replica some other way (the API, a
profile changed between validation and the run) is still rejected with the same reason.
"""

from __future__ import annotations

from factory.model.profiles import PROFILES, Profile
from factory.routing.parser import RequestError
from factory.routing.requests import Task, TaskRequest


def check_capabilities(request: TaskRequest, profile: Profile) -> None:
    """Raise `RequestError` naming the field and the profile when `profile` cannot run `request`."""
    if request.task is not Task.EDIT:
        return
    if profile.max_references == 0:
        editors = ", ".join(name for name, p in PROFILES.items() if p.max_references)
        raise RequestError("task", f"profile {profile.name} cannot edit (its generator {profile.generator.source} "
                           f"has no edit pipeline); profiles that edit: {editors}")
    given = len(request.images or ())
    if given > profile.max_references:
        raise RequestError("images", f"{given} reference images; profile {profile.name} takes at most "
                           f"{profile.max_references}")
