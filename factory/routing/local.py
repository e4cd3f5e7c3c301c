"""Helpers for running requests in this process (CLI) with the same rules as the job."""

from __future__ import annotations

from PIL import Image

from factory.model.profiles import Profile
from factory.routing.parser import GenerationDefaults
from factory.routing.requests import TaskRequest


def profile_defaults(profile: Profile) -> GenerationDefaults:
    g = profile.generator
    return GenerationDefaults(steps=g.steps, width=g.width, height=g.height, guidance=g.guidance)


def load_request_image(request: TaskRequest, allow_http: bool = False) -> Image.Image | None:
    if request.image is None:
        return None
    from factory.jobs.fetch import load_image
    from factory.jobs.storage import Storage

    return load_image(request.image, Storage(), allow_http=allow_http)
