"""Folders an archive job cannot list: an unreadable subfolder is a reject naming it and the errno, an unreadable
root stops the run with one line. Never skipped in silence.

The folders are really unreadable (mode 000) to the process that lists them: root ignores permissions, so as root
the listing runs in a forked child that has become `nobody` (in a folder under /tmp: `nobody` cannot enter pytest's
private temporary root)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from factory.errors import ConfigError, InputError
from factory.io.archives import list_folder, read_folder_entries, resolve_sources
from factory.io.storage import Storage


def unprivileged(work: Callable[[], object]) -> dict:
    """`work()` in a forked child, as a user that file permissions apply to: {"value": ...} or
    {"error": "Type: message"}."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            payload = {"value": work()}
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which asserts on it
            payload = {"error": f"{type(error).__name__}: {error}"}
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(json.dumps(payload).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def src():
    """src/photos/{a.jpg, private/ (mode 000, holding b.jpg), z.jpg}."""
    base = Path(tempfile.mkdtemp(prefix="unreadable-", dir="/tmp"))
    photos = base / "src" / "photos"
    (photos / "private").mkdir(parents=True)
    for name in ("a.jpg", "z.jpg", "private/b.jpg"):
        (photos / name).write_bytes(b"not decoded here")
    for folder in (base, base / "src", photos):
        folder.chmod(0o755)
    (photos / "private").chmod(0o000)
    yield base / "src"
    for folder in (base / "src", photos / "private"):
        folder.chmod(0o755)
    shutil.rmtree(base)


def test_an_unreadable_subfolder_is_listed_and_its_reject_names_it_and_the_errno(src):
    def work():
        names = list(list_folder(str(src)))
        entries = {e.name: [e.problem, e.data is not None] for e in read_folder_entries(str(src), names, 1 << 20)}
        return {"names": names, "entries": entries, "resumed": list(list_folder(str(src), after="photos/private"))}

    seen = unprivileged(work)["value"]
    assert seen["names"] == ["photos/a.jpg", "photos/private", "photos/z.jpg"]
    assert seen["entries"]["photos/private"] == [
        f"{src}/photos/private: folder cannot be listed: permission denied (EACCES)", False]
    assert seen["entries"]["photos/a.jpg"] == [None, True]
    assert seen["resumed"] == ["photos/z.jpg"]  # a listing resumed after it lists it once, not twice


def test_an_unreadable_root_is_one_line_not_an_empty_source(src):
    src.chmod(0o000)
    assert unprivileged(lambda: resolve_sources([str(src)], Storage()) and None) == {
        "error": f"{ConfigError.__name__}: archive source {src}: cannot list the folder: permission denied (EACCES)"}
    # Unreadable by the time it is listed (after the run resolved it): the listing fails, it never lists nothing.
    assert unprivileged(lambda: list(list_folder(str(src)))) == {
        "error": f"{InputError.__name__}: {src}: cannot list the folder: permission denied (EACCES)"}
