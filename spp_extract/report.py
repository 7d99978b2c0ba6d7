"""One self-contained HTML page to look at results: each near-duplicate group (or each query
with its neighbours) as a row of thumbnails with paths and similarities, largest groups first.
Thumbnails are small JPEGs embedded in the page (at most ``THUMB`` px a side), so the page
opens anywhere and stays small; each links to its original where the path is readable."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import quote

import numpy as np

from .groups import Group
from .listing import PathNames
from .outputs import OutputFile
from .records import Neighbors
from .sources import is_url
from .tars import read_location

THUMB = 160  # px, longest side
GROUP_LIMIT = 1000  # groups (or queries) shown; the rest are counted on the page
MEMBER_LIMIT = 24  # thumbnails shown per group; the rest are counted

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em}h2{font-size:1em;margin:1.2em 0 .3em}
.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;background:#fff;border:1px solid #ddd;padding:4px}
figure.first{border-color:#2a7}figure.broken{border-color:#c33}
figure img{display:block;max-width:160px;max-height:160px;margin:auto}
figcaption{font-size:11px;word-break:break-all}
.missing{height:80px;display:flex;align-items:center;justify-content:center;color:#c33}
.note{color:#666}
"""
_SCRIPT = """
addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0);
  const missing = document.querySelectorAll('.missing').length;
  bad.forEach(i => i.closest('figure').classList.add('broken'));
  document.body.dataset.thumbnails = imgs.length;
  document.body.dataset.decoded = imgs.length - bad.length;
  document.getElementById('status').textContent =
    `${imgs.length - bad.length} of ${imgs.length} thumbnails shown` +
    (bad.length ? ` (${bad.length} could not be decoded, outlined in red)` : '') +
    (missing ? `; ${missing} originals could not be read` : '');
});
"""


def thumbnail(path: str) -> str | None:
    """A data URI of a JPEG thumbnail of the image at ``path`` (a file, a URL, a tar member
    ``…/00000.tar/key.jpg``), or None if it cannot be read."""
    from PIL import Image, ImageOps

    from .images import to_rgb

    try:
        with Image.open(io.BytesIO(read_location(path))) as im:
            im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a reduced scale
            rgb = to_rgb(ImageOps.exif_transpose(im))  # 16-bit, CMYK, alpha as extraction does
            rgb.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            rgb.save(buffer, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - any unreadable file is a placeholder on the page
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _link(path: str) -> str:
    if is_url(path):
        return path
    return "file://" + quote(os.path.abspath(path))


def _figure(path: str, shown: str, caption: str, first: bool) -> str:
    data = thumbnail(path)
    cls = ' class="first"' if first else ""
    inner = (
        f'<img src="{data}" alt="{html.escape(shown)}" decoding="async">'
        if data is not None
        else '<div class="missing">not readable</div>'
    )
    if data is not None and os.path.exists(path):
        inner = f'<a href="{html.escape(_link(path))}">{inner}</a>'
    return f"<figure{cls}>{inner}<figcaption>{html.escape(caption)}</figcaption></figure>"


def write_page(
    stream: IO[str],
    title: str,
    rows: Iterable[tuple[str, Sequence[tuple[str, str, str]]]],
    total: int,
    what: str,
) -> int:
    """The page: ``rows`` of (heading, [(path to read, path shown, caption)]), the first
    ``GROUP_LIMIT`` of ``total``; the first of each row outlined. Returns thumbnails
    written."""
    stream.write(
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        f'<p class="note" id="status">loading thumbnails…</p>\n'
    )
    count = shown = 0
    for heading, items in rows:
        if shown == GROUP_LIMIT:
            break
        shown += 1
        stream.write(f'<section><h2>{html.escape(heading)}</h2><div class="row">')
        for i, (path, name, caption) in enumerate(items[:MEMBER_LIMIT]):
            stream.write(_figure(path, name, caption, first=i == 0))
            count += 1
        if len(items) > MEMBER_LIMIT:
            stream.write(f'<p class="note">… and {len(items) - MEMBER_LIMIT} more</p>')
        stream.write("</div></section>\n")
    if total > shown:
        stream.write(
            f'<p class="note" id="more">{total - shown} more {what} not shown here (the page '
            f"shows the first {GROUP_LIMIT}); the CSV lists them all.</p>\n"
        )
    stream.write(f"<script>{_SCRIPT}</script></body></html>\n")
    return count


def readable(root_joined: str, source: Path) -> str:
    """A path to read an image from: as joined with its input root (absolute where the
    root was), else relative to the folder of the file that lists it."""
    return root_joined if os.path.isabs(root_joined) else str(source.parent / root_joined)


def write_report(
    stream: IO[str],
    found: Neighbors,
    found_groups: list[Group] | None,
    opened: OutputFile,
    base: OutputFile,
    threshold: float,
) -> None:
    """The page of ``find_neighbors``: its groups, or (with a collection, or no groups) each
    query row with its neighbours."""
    shown_q, shown_b = PathNames(opened.file), PathNames(base.file)
    read_q, read_b = PathNames(opened.file, True), PathNames(base.file, True)
    if found_groups is not None:
        limit = found_groups[:GROUP_LIMIT]
        rows = np.concatenate([g.members for g in limit]) if limit else np.zeros(0, np.int64)
        shown, read = shown_q(rows), read_q(rows)

        def items() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
            for number, g in enumerate(limit, 1):
                members = [
                    (
                        readable(read[m], opened.path),
                        shown[m],
                        f"{shown[m]} · {'kept' if i == 0 else f'{s:.4f}'}",
                    )
                    for i, (m, s) in enumerate(
                        zip(g.members.tolist(), g.similarity.tolist(), strict=True)
                    )
                ]
                yield f"group {number} · {len(g.members)} images", members

        title = (
            f"{len(found_groups)} near-duplicate groups in {opened.path.name} "
            f"(similarity ≥ {threshold}; the first of each is the largest image, kept)"
        )
        write_page(stream, title, items(), len(found_groups), "groups")
        return
    listed = np.flatnonzero(found.index[:, 0] >= 0)[:GROUP_LIMIT]
    q_shown, q_read = shown_q(listed), read_q(listed)
    every = found.index[listed].ravel()
    b_shown, b_read = shown_b(every), read_b(every)

    def queries() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
        for row in listed.tolist():
            members = [(readable(q_read[row], opened.path), q_shown[row], "query")]
            for j, s in zip(found.index[row].tolist(), found.similarity[row].tolist(), strict=True):
                if j >= 0:
                    members.append(
                        (readable(b_read[j], base.path), b_shown[j], f"{b_shown[j]} · {s:.4f}")
                    )
            yield q_shown[row], members

    title = f"nearest neighbours of each row of {opened.path.name} in {base.path.name}"
    total = int((found.index[:, 0] >= 0).sum())
    write_page(stream, title, queries(), total, "queries")
