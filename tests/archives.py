"""Archives built on the fly for the captioning tests: good images of every kind a rule converts, and every kind
of bad input, as a folder, tar shards, a zip and an s3:// prefix. Real photos from scikit-image, the rest made
with Pillow."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header claims width x height pixels: a decompression bomb's header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def good_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the rule the row must record). Small, so the tiny models run fast."""
    from skimage import data

    chelsea = Image.fromarray(data.chelsea()).resize((150, 100))
    coffee = Image.fromarray(data.coffee()).resize((120, 80))
    camera = Image.fromarray(data.camera()).resize((96, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    frames = [chelsea.convert("P"), coffee.resize((150, 100)).convert("P")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rgba = coffee.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0).point(lambda _: 128))
    sixteen = Image.fromarray((np.asarray(camera, dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "chelsea.jpg": (_save(chelsea, "JPEG", quality=90), "none"),
        "coffee.png": (_save(coffee, "PNG"), "none"),
        "photo_without_extension": (_save(coffee.rotate(180), "JPEG"), "none"),  # recognised by its bytes
        "print-cmyk.jpg": (_save(chelsea.convert("CMYK"), "JPEG"), "cmyk-to-rgb"),
        "scan-16bit.png": (_save(sixteen, "PNG"), "16bit-to-8bit+grayscale-to-rgb"),
        "palette.png": (_save(coffee.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "palette-to-rgb"),
        "logo-alpha.png": (_save(rgba, "PNG"), "alpha-over-white"),
        "phone-rotated.jpg": (_save(chelsea, "JPEG", exif=exif), "exif-rotate"),
        "animated.gif": (animated.getvalue(), "first-frame+palette-to-rgb"),
        "camera-gray.png": (_save(camera, "PNG"), "grayscale-to-rgb"),
    }


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what the row's error must say)."""
    chelsea = _save(Image.fromarray(__import__("skimage").data.chelsea()), "JPEG")
    return {
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "corrupt"),
        "truncated.jpg": (chelsea[: len(chelsea) // 3], "truncated"),
        "empty.png": (b"", "empty file (0 bytes)"),
        "notes-not-image.png": (b"this is text, not a picture\n" * 20, "not an image"),
        "bomb.png": (png_claiming(7000, 7000), "image too large: 7000x7000 pixels, limit is 40000000"),
        "giant-bomb.png": (png_claiming(60000, 60000), "image too large"),
    }


DUPLICATE = ("copy-of-chelsea.jpg", "chelsea.jpg")  # same bytes as chelsea.jpg
COMPANION = ("chelsea.txt", b"a caption someone wrote\n")  # skipped: not a row


def build_folder(root: Path) -> dict[str, str]:
    """The folder source; returns name -> expected status. Holds a symlink and a FIFO (never followed/opened)."""
    goods, bads = good_images(), bad_files()
    expected = {}
    for name, (data, _) in goods.items():
        (root / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "photos" / name).write_bytes(data)
        expected[f"photos/{name}"] = "ok"
    (root / "photos" / DUPLICATE[0]).write_bytes(goods[DUPLICATE[1]][0])
    expected[f"photos/{DUPLICATE[0]}"] = "ok"
    for name, (data, _) in bads.items():
        (root / "bad" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "bad" / name).write_bytes(data)
        expected[f"bad/{name}"] = "rejected"
    (root / "photos" / COMPANION[0]).write_bytes(COMPANION[1])
    os.symlink("/etc/hostname", root / "bad" / "link-out.jpg")
    expected["bad/link-out.jpg"] = "rejected"
    os.mkfifo(root / "bad" / "pipe.jpg")
    expected["bad/pipe.jpg"] = "rejected"
    return expected


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
             linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def build_tar_shards(folder: Path, shards: int = 2) -> tuple[list[Path], dict[str, str]]:
    """WebDataset-style shards (key.jpg + key.txt samples) with every unsafe kind of member; returns the shard
    paths and row id -> expected status."""
    goods, bads = good_images(), bad_files()
    names = list(goods.items())
    expected: dict[str, str] = {}
    paths = []
    for index in range(shards):
        path = folder / f"shard-{index:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for offset, (name, (data, _)) in enumerate(names[index::shards]):
                key = f"{index:03d}{offset:03d}"
                ext = name.rsplit(".", 1)[-1] if "." in name else "bin"
                _tar_add(tar, f"{key}.{ext}", data)
                _tar_add(tar, f"{key}.txt", b"caption from the dataset\n")  # companion: skipped
                expected[f"{path.name}/{key}.{ext}"] = "ok"
            if index == 0:
                for name, (data, _) in bads.items():
                    _tar_add(tar, f"bad/{name}", data)
                    expected[f"{path.name}/bad/{name}"] = "rejected"
                _tar_add(tar, "../escape.jpg", goods["chelsea.jpg"][0])
                _tar_add(tar, "/etc/absolute.jpg", goods["chelsea.jpg"][0])
                _tar_add(tar, "soft.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
                _tar_add(tar, "hard.jpg", kind=tarfile.LNKTYPE, linkname="000000.jpg")
                _tar_add(tar, "dev.jpg", kind=tarfile.CHRTYPE)
                _tar_add(tar, "fifo.jpg", kind=tarfile.FIFOTYPE)
                _tar_add(tar, "dir", kind=tarfile.DIRTYPE)  # not a row
                for name in ("../escape.jpg", "/etc/absolute.jpg", "soft.jpg", "hard.jpg", "dev.jpg", "fifo.jpg"):
                    expected[f"{path.name}/{name}"] = "rejected"
        paths.append(path)
    return paths, expected


def build_zip(path: Path) -> dict[str, str]:
    goods = good_images()
    expected = {}
    with zipfile.ZipFile(path, "w") as archive:
        for name, (data, _) in list(goods.items())[:4]:
            archive.writestr(f"imgs/{name}", data)
            expected[f"{path.name}/imgs/{name}"] = "ok"
        archive.writestr("imgs/readme.txt", b"companion")
        archive.writestr("../escape.png", goods["coffee.png"][0])
        archive.writestr("/abs.png", goods["coffee.png"][0])
        link = zipfile.ZipInfo("imgs/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, b"/etc/passwd")
        archive.writestr("imgs/empty.jpg", b"")
        for name in ("../escape.png", "/abs.png", "imgs/link.png", "imgs/empty.jpg"):
            expected[f"{path.name}/{name}"] = "rejected"
    return expected
