"""Images where they already are (issue 20): tar shards read in place, URLs served on loopback
by a real HTTP server (with 404s, slow answers and dropped connections), URL tables (CSV and
Parquet), S3 through moto's server (an S3 emulator from PyPI). Each gives the same vectors as
the same images as loose files on disk, which is the reference."""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FAST_FLAGS,
    assert_same,
    cli,
    crash_cli,
    fast_commits,
    keyed,
    one_line,
    photo,
)
from PIL import Image
from servers import http_server

from spp_extract import Config, ConfigError, extract, read_features, sources
from spp_extract.discovery import find_images

CONFIG = Config(backbone="resnet18", weights="none", workers=0, batch_size=4)
FLAGS = [*FAST_FLAGS, "--batch-size", "4"]
SHARDS = 2
PER_SHARD = 5


def _image_bytes(i: int) -> tuple[str, bytes]:
    """Odd sizes and modes: RGB JPEG, RGBA PNG, palette GIF, grey PNG, a 1x1 BMP."""
    h, w = 23 + 11 * i, 37 + 7 * (i % 4)
    pixels = photo(h, w, seed=i)
    kinds = [("jpg", "JPEG", "RGB"), ("png", "PNG", "RGBA"), ("gif", "GIF", "P")]
    kinds += [("png", "PNG", "L"), ("bmp", "BMP", "RGB")]
    suffix, fmt, mode = kinds[i % len(kinds)]
    img = Image.fromarray(pixels).convert(mode)
    if i % len(kinds) == 4:
        img = img.resize((1, 1))
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return f"{i:06d}.{suffix}", buffer.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes, mtime: int = 1_700_000_000) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), mtime
    tf.addfile(info, io.BytesIO(data))


def write_shards(root: Path, count: int = SHARDS, start: int = 0) -> list[Path]:
    """webdataset-style shards (``key.ext`` + ``key.json`` per sample) in ``root/shards``, and
    the same images as loose files in ``root/loose/<shard>.tar/``: the stored paths agree."""
    tars = []
    for s in range(start, start + count):
        tar = root / "shards" / f"{s:05d}.tar"
        tar.parent.mkdir(parents=True, exist_ok=True)
        loose = root / "loose" / tar.name
        loose.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
            for k in range(PER_SHARD):
                name, data = _image_bytes(s * PER_SHARD + k)
                _add(tf, f"./{name}", data)
                _add(tf, name.rsplit(".", 1)[0] + ".json", b'{"caption": "x"}')
                (loose / name).write_bytes(data)
        tars.append(tar)
    return tars


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collection")
    write_shards(root)
    return root


@pytest.fixture(scope="module")
def reference(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "loose.h5"
    extract(collection / "loose", out, config=CONFIG)
    return keyed(out)


def _by(data: dict, rename) -> dict:  # noqa: ANN001
    return {
        "rows": {rename(k): v for k, v in data["rows"].items()},
        "failed": sorted(rename(k) for k in data["failed"]),
    }


# --- tar shards ----------------------------------------------------------------------------


def test_tar_shards_give_the_same_vectors_as_the_files(collection, reference, tmp_path):
    out = tmp_path / "tars.h5"
    result = extract(collection / "shards", out, config=CONFIG)
    assert result.failed == 0
    got = keyed(out)
    assert all(k.startswith(("00000.tar/", "00001.tar/")) for k in got["rows"])
    assert_same(got, reference, [])
    data = read_features(out)
    assert data.roots == [str(collection / "shards")]
    assert all(p.startswith(str(collection / "shards")) for p in data.absolute_paths())
    with tarfile.open(collection / "shards" / "00001.tar") as tf:
        first = next(m for m in tf if m.name.endswith(".gif") or m.name.endswith(".jpg"))
    row = data.paths.index("00001.tar/" + first.name.lstrip("./"))
    import h5py

    with h5py.File(out) as f:
        assert f["file_size"][row] == first.size
        assert f["mtime_ns"][row] == first.mtime * 10**9
    # named directly, and listed in --files-from: stored as given, then the member
    tars = sorted((collection / "shards").glob("*.tar"))
    listing = tmp_path / "tars.txt"
    listing.write_text("".join(f"{t}\n" for t in tars))
    for kwargs in ({"inputs": tars}, {"inputs": [], "files_from": listing}):
        out = tmp_path / f"direct{len(kwargs)}.h5"
        extract(kwargs.pop("inputs"), out, config=CONFIG, **kwargs)
        prefix = str(collection / "shards") + "/"
        assert_same(_by(keyed(out), lambda k, p=prefix: k.removeprefix(p)), reference, [])


def _member_offsets(tar: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(tar) as tf:
        return [(m.name.lstrip("./"), m.offset, m.offset_data) for m in tf]


def test_damaged_tars_are_failure_rows_never_a_failed_run(collection, reference, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(collection / "shards", folder)
    members = _member_offsets(folder / "00000.tar")
    # cut inside the data of the third image (members alternate image, json)
    cut_name, _, cut_data = members[4]
    with open(folder / "00000.tar", "r+b") as fh:
        fh.truncate(cut_data + 10)
    # the header of the fourth image overwritten with garbage
    bad_name, bad_header, _ = _member_offsets(folder / "00001.tar")[6]
    with open(folder / "00001.tar", "r+b") as fh:
        fh.seek(bad_header)
        fh.write(b"\x01garbage" * 64)
    (folder / "old.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 not read")
    (folder / "empty.tar").write_bytes(b"")
    out = tmp_path / "out.h5"
    extract(folder, out, config=CONFIG)  # never a failed run
    data = read_features(out)
    failed = dict(zip(data.failed_paths, data.failed_classes, strict=True))
    assert failed == {
        f"00000.tar/{cut_name}": "truncated",
        "00000.tar": "truncated_tar",
        "00001.tar": "corrupt_tar",
        "empty.tar": "corrupt_tar",
        "old.tar.gz": "compressed_tar",
    }
    messages = dict(zip(data.failed_paths, data.failed_errors, strict=True))
    assert f"after '{cut_name}' are lost" in messages["00000.tar"]
    assert "decompress it" in messages["old.tar.gz"]
    # every image before the damage has its vector, equal to the file's
    before = [n for n, _, _ in members[:4] if not n.endswith(".json")]
    ok = {p: v for p, v in zip(data.paths, data.features, strict=True)}
    want = {
        p for p in reference["rows"] if p.startswith("00001.tar/") and p.split("/")[1] < bad_name
    }
    want |= {f"00000.tar/{n}" for n in before}
    assert set(ok) == want
    for path in want:
        np.testing.assert_allclose(ok[path], reference["rows"][path], rtol=1e-4, atol=1e-5)
    # a compressed tar named directly: one line, before anything is written
    line = one_line(cli("extract", folder / "old.tar.gz", "-o", tmp_path / "x.h5", *FLAGS), 2)
    assert "compressed tar" in line and "decompress" in line
    assert not (tmp_path / "x.h5").exists()


def test_resume_redoes_only_new_and_changed_members(collection, reference, tmp_path):
    root = tmp_path / "grow"
    shutil.copytree(collection / "shards", root / "shards")
    out = tmp_path / "out.h5"
    totals: list[int] = []
    extract(root / "shards", out, config=CONFIG, progress=lambda d, t: totals.append(t))
    assert totals[0] == SHARDS * PER_SHARD
    write_shards(root, count=1, start=SHARDS)  # a new shard
    tar = root / "shards" / "00000.tar"  # one member changed, the others as they were
    with tarfile.open(tar) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf]  # type: ignore[union-attr]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in kept:
            _add(tf, m.name, data, int(m.mtime) + (5 if m.name.endswith("000001.png") else 0))
    totals.clear()
    extract(
        root / "shards", out, config=CONFIG, mode="resume", progress=lambda d, t: totals.append(t)
    )
    assert totals[0] == PER_SHARD + 1
    got = keyed(out)
    assert len(got["rows"]) == (SHARDS + 1) * PER_SHARD


# --- URLs ----------------------------------------------------------------------------------


def _url_keyed(out: Path, base: str) -> dict:
    return _by(keyed(out), lambda k: k.removeprefix(base))


@pytest.mark.slow  # waits out timeouts and retries
def test_urls_served_locally_give_the_same_vectors_and_resume_asks_nothing_again(
    collection, reference, tmp_path
):
    keys = sorted(reference["rows"])
    with http_server(collection, delay=6.0) as server:
        base = f"{server.url}/loose/"
        bad = {
            f"{server.url}/missing.jpg": "not_found",
            f"{server.url}/slow/loose/{keys[0]}": "timeout",
            f"{server.url}/drop/loose/{keys[1]}": "unreachable",
            f"http://127.0.0.1:{_closed_port()}/x.jpg": "unreachable",
        }
        flaky = f"{server.url}/flaky/loose/{keys[2]}"  # dropped once, then served
        listing = tmp_path / "urls.txt"
        listing.write_text(
            "".join(f"{base}{k}\n" for k in keys) + "".join(f"{u}\n" for u in bad) + flaky + "\n"
        )
        out = tmp_path / "urls.h5"
        config = Config(  # a timeout a loaded machine still meets for a 3 KB loopback read
            backbone="resnet18", weights="none", workers=2, batch_size=4, fetch_timeout=2.0
        )
        result = extract([], out, config=config, files_from=listing)
        assert result.failed == len(bad)
        data = read_features(out)
        assert dict(zip(data.failed_paths, data.failed_classes, strict=True)) == bad
        got = {p: v for p, v in zip(data.paths, data.features, strict=True)}
        np.testing.assert_allclose(got.pop(flaky), reference["rows"][keys[2]], rtol=1e-4, atol=1e-5)
        assert_same(_by({"rows": got, "failed": []}, lambda k: k.removeprefix(base)), reference, [])
        assert data.roots == [str(listing)]  # where the URLs came from
        assert data.absolute_paths() == data.paths  # a URL is where the image is
        # each good image: its header's range, then the whole; a dropped one: 1 + 3 attempts
        assert all(server.requests[f"/loose/{k}"] == 2 for k in keys)
        assert server.requests[f"/drop/loose/{keys[1]}"] == 1 + sources.ATTEMPTS
        assert server.requests[f"/flaky/loose/{keys[2]}"] == 3
        before = dict(server.requests)
        extract([], out, config=config, files_from=listing, mode="resume")
        assert server.requests == before  # nothing done is asked again
        extract([], out, config=config, files_from=listing, mode="resume", retry_failed=True)
        again = {p for p, n in server.requests.items() if n != before.get(p)}
        assert again == {"/missing.jpg", f"/slow/loose/{keys[0]}", f"/drop/loose/{keys[1]}"}


def _closed_port() -> int:
    from servers import unused_port

    return unused_port()


@pytest.mark.slow  # four extractions over HTTP
def test_remote_tar_shard_and_tables_of_urls(collection, reference, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = sorted(reference["rows"])
    with http_server(collection) as server:
        # a tar on a web server, read by ranges
        out = tmp_path / "remote-tar.h5"
        tars = [f"{server.url}/shards/{s:05d}.tar" for s in range(SHARDS)]
        extract(tars, out, config=CONFIG)
        assert_same(_url_keyed(out, f"{server.url}/shards/"), reference, [])
        # img2dataset's input: a parquet table with a url column (and a blank value)
        base = f"{server.url}/loose/"
        table = tmp_path / "urls.parquet"
        urls = [f"{base}{k}" for k in keys]
        pq.write_table(pa.table({"url": [*urls, None], "caption": ["x"] * (len(urls) + 1)}), table)
        out = tmp_path / "parquet.h5"
        extract([], out, config=CONFIG, files_from=table)
        assert_same(_url_keyed(out, base), reference, [])
        assert read_features(out).roots == [str(table)]
        # a CSV with the URLs in another column
        csv = tmp_path / "urls.csv"
        csv.write_text("key,image\n" + "".join(f"{i},{u}\n" for i, u in enumerate(urls)))
        out = tmp_path / "csv.h5"
        extract([], out, config=CONFIG, files_from=csv, column="image")
        assert_same(_url_keyed(out, base), reference, [])
        # the same URLs from another table: the same images, not asked for again
        asked = dict(server.requests)
        extract(
            [],
            tmp_path / "parquet.h5",
            config=CONFIG,
            files_from=csv,
            column="image",
            mode="resume",
        )
        assert server.requests == asked
    line = one_line(cli("extract", "--files-from", csv, "-o", tmp_path / "y.h5", *FLAGS), 2)
    assert "no column 'url'" in line and "'key', 'image'" in line and "--column" in line
    listing = tmp_path / "plain.txt"
    listing.write_text(urls[0] + "\n")
    line = one_line(
        cli("extract", "--files-from", listing, "--column", "url", "-o", tmp_path / "z.h5", *FLAGS),
        2,
    )
    assert "--column applies to .csv, .tsv and .parquet" in line


def test_missing_extras_are_one_line_naming_the_install(monkeypatch):
    sources._filesystem.cache_clear()
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(ConfigError, match=r'fsspec; pip install "spp-extract\[remote\]"'):
        find_images(["https://example.invalid/a.jpg"])
    sources._filesystem.cache_clear()
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r'pyarrow; pip install "spp-extract\[tables\]"'):
        find_images([], files_from="urls.parquet")


# --- S3 ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_bucket_through_moto_server(collection, reference, tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from servers import s3_server

    sources._filesystem.cache_clear()
    with s3_server():
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="photos")
        for path in sorted((collection / "loose").rglob("*")):
            if path.is_file():
                s3.upload_file(
                    str(path), "photos", f"loose/{path.relative_to(collection / 'loose')}"
                )
        s3.upload_file(str(collection / "shards" / "00000.tar"), "photos", "shards/00000.tar")
        out = tmp_path / "s3.h5"
        extract("s3://photos/loose/", out, config=CONFIG)
        assert_same(keyed(out), reference, [])  # keys relative to the prefix, as a folder's
        assert read_features(out).roots == ["s3://photos/loose"]
        out = tmp_path / "s3-tar.h5"
        extract("s3://photos/shards/00000.tar", out, config=CONFIG)
        want = {k: v for k, v in reference["rows"].items() if k.startswith("00000.tar/")}
        assert_same(
            _by(keyed(out), lambda k: k.removeprefix("s3://photos/shards/")),
            {"rows": want, "failed": []},
            [],
        )
    sources._filesystem.cache_clear()


# --- kills ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tars", "urls", "parquet"])
def test_kill_then_resume_each_input_kind(collection, reference, tmp_path, kind):
    with http_server(collection) as server:
        base = f"{server.url}/loose/"
        if kind == "tars":
            inputs, rename = [str(collection / "shards")], (lambda k: k)
        else:
            urls = [f"{base}{k}" for k in sorted(reference["rows"])]
            if kind == "urls":
                listing = tmp_path / "urls.txt"
                listing.write_text("".join(f"{u}\n" for u in urls))
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                listing = tmp_path / "urls.parquet"
                pq.write_table(pa.table({"url": urls}), listing)
            inputs, rename = ["--files-from", str(listing)], (lambda k: k.removeprefix(base))
        out = tmp_path / "out.h5"
        args = ["extract", *inputs, "-o", out, *FLAGS, "--config", fast_commits(tmp_path)]
        killed = crash_cli("kill-after-commit:2", *args)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        resumed = crash_cli("none", *args, "--resume")
        assert resumed.returncode == 0, resumed.stderr
    assert_same(_by(keyed(out), rename), reference, [])
    assert os.path.exists(out)


def test_read_ahead_thread_keeps_order_raises_in_place_and_stops_when_closed():
    """Without decode processes, remote batches are read by a thread ahead of compute."""
    import itertools
    import threading

    from spp_extract.loader import _ahead

    assert list(_ahead(iter(range(10)), 2)) == list(range(10))

    def failing():
        yield 1
        raise OSError("the second batch failed")

    got = []
    with pytest.raises(OSError, match="second batch"):
        for item in _ahead(failing(), 2):
            got.append(item)
    assert got == [1]
    endless = _ahead(itertools.count(), 2)
    assert next(endless) == 0
    endless.close()  # the thread ends: nothing keeps reading
    short = _ahead(iter(range(5)), 4)  # ended, with its queue full, when the consumer stops
    assert next(short) == 0
    short.close()
    assert not any(t.name == "spp-extract-prefetch" for t in threading.enumerate())


def test_report_thumbnails_of_tar_members_and_urls(collection):
    """The page of `neighbors --html` shows thumbnails of rows read from tars and URLs."""
    from spp_extract.report import thumbnail

    tar = collection / "shards" / "00001.tar"
    name = sorted(p.name for p in (collection / "loose" / "00001.tar").iterdir())[0]
    assert thumbnail(f"{tar}/{name}").startswith("data:image/jpeg;base64,")
    assert thumbnail(f"{tar}/no-such-member.jpg") is None
    with http_server(collection) as server:
        assert thumbnail(f"{server.url}/loose/00001.tar/{name}").startswith("data:image/jpeg")
        assert thumbnail(f"{server.url}/shards/00001.tar/{name}").startswith("data:image/jpeg")
        assert thumbnail(f"{server.url}/missing.jpg") is None


@pytest.mark.slow
def test_https_urls_served_locally_give_the_same_vectors(collection, reference, tmp_path):
    """HTTPS for real: a TLS server on loopback with a self-signed certificate the client is
    told to trust (SSL_CERT_FILE), the CLI in a fresh process."""
    pytest.importorskip("cryptography")
    from conftest import run_python
    from servers import certificate

    tls = certificate(tmp_path / "tls")
    keys = sorted(reference["rows"])
    with http_server(collection, tls=tls) as server:
        assert server.url.startswith("https://")
        base = f"{server.url}/loose/"
        listing = tmp_path / "urls.txt"
        listing.write_text("".join(f"{base}{k}\n" for k in keys))
        out = tmp_path / "https.h5"
        args = ["-m", "spp_extract", "extract", "--files-from", listing, "-o", out, *FLAGS]
        done = run_python(*args, env={"SSL_CERT_FILE": str(tls / "cert.pem")})
        assert done.returncode == 0, done.stderr
        assert_same(_url_keyed(out, base), reference, [])
        # without trusting the certificate: every image a failure row, never a failed run
        untrusted = tmp_path / "untrusted.h5"
        args[args.index(out)] = untrusted
        listing.write_text("".join(f"{base}{k}\n" for k in keys[:2]))
        done = run_python(*args, env={"SSL_CERT_FILE": str(tmp_path / "none.pem")})
        assert done.returncode == 0, done.stderr
        data = read_features(untrusted)
        assert data.paths == [] and set(data.failed_classes) == {"unreachable"}
        assert all("certificate" in e.lower() for e in data.failed_errors)


def test_links_sparse_and_nested_members_are_rows_never_dropped(collection, reference, tmp_path):
    """A hard or symbolic link to an image member is a row with that image's vector (as two
    names of one file in a folder are); a sparse member, a tar inside the tar and a link to
    nothing are failure rows, never read wrongly or left out."""
    import shutil as sh
    import subprocess

    name, data = _image_bytes(3)
    folder = tmp_path / "pack"
    folder.mkdir()
    tar = folder / "links.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, name, data)
        for link, kind, target in [
            ("hard.png", tarfile.LNKTYPE, name),
            ("sub/soft.png", tarfile.SYMTYPE, f"../{name}"),
            ("ahead.png", tarfile.SYMTYPE, "later.png"),
            ("nowhere.png", tarfile.SYMTYPE, "nope.png"),
        ]:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = kind, target
            tf.addfile(info)
        _add(tf, "later.png", data)
        _add(tf, "inner.tar", b"\0" * 1024)
    if sh.which("tar"):  # GNU tar writes sparse members (-S); Python's tarfile cannot
        hole = tmp_path / "sparse.bmp"
        bmp = io.BytesIO()
        Image.new("RGB", (512, 512)).save(bmp, "BMP")
        with open(hole, "wb") as fh:
            fh.write(bmp.getvalue()[:54])  # the header; the black pixels become a hole
            fh.seek(len(bmp.getvalue()) - 1)
            fh.write(b"\0")
        sparse = folder / "sparse.tar"
        subprocess.run(
            ["tar", "-S", "--format=gnu", "-cf", sparse, "-C", tmp_path, "sparse.bmp"], check=True
        )
    out = tmp_path / "out.h5"
    extract(folder, out, config=CONFIG)
    data_ = read_features(out)
    rows = dict(zip(data_.paths, data_.features, strict=True))
    want = reference["rows"][f"00000.tar/{name}"]
    for path in (f"links.tar/{name}", "links.tar/hard.png", "links.tar/sub/soft.png"):
        np.testing.assert_allclose(rows[path], want, rtol=1e-4, atol=1e-5)
    assert "links.tar/ahead.png" in rows and "links.tar/later.png" in rows
    failed = dict(zip(data_.failed_paths, data_.failed_classes, strict=True))
    expected = {"links.tar/nowhere.png": "dangling_symlink", "links.tar/inner.tar": "nested_tar"}
    if sh.which("tar"):
        with tarfile.open(folder / "sparse.tar") as tf:
            assert next(iter(tf)).issparse()  # the test really made a sparse member
        expected["sparse.tar/sparse.bmp"] = "unsupported_member"
    assert failed == expected


def test_tables_with_a_byte_order_mark_and_column_alone(collection, reference, tmp_path):
    keys = sorted(reference["rows"])[:3]
    table = tmp_path / "excel.csv"
    lines = "url,note\r\n" + "".join(f'"{collection / "loose" / k}",x\r\n' for k in keys)
    table.write_bytes(b"\xef\xbb\xbf" + lines.encode())  # Excel's "CSV UTF-8"
    found = find_images([], files_from=table)
    assert [r.path for r in found.refs] == [str(collection / "loose" / k) for k in keys]
    with pytest.raises(ConfigError, match="--column names a column of a --files-from table"):
        find_images([collection / "loose"], column="url")
    assert sources.is_tar("https://h/s/00000.tar?X-Amz-Signature=abc")  # a presigned URL


def test_a_url_that_cannot_be_asked_is_one_class_and_not_retried():
    pytest.importorskip("aiohttp")
    with pytest.raises(sources.ImageError) as caught:
        sources.fetch("http://[::1/x.jpg", 1.0)
    assert caught.value.kind == "invalid_url"
    assert "attempts" not in caught.value.message  # asked once: it cannot get better
