"""Neighbours at scale (issue 19): FAISS's exact search gives torch's lists, approximate search
measures its recall, queries run against a comparable collection (and a saved index), groups
and a page of thumbnails, checked in headless Chromium."""

import csv
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import synthetic
from typer.testing import CliRunner

from spp_extract import engines, read_features
from spp_extract.cli import app
from spp_extract.errors import ConfigError
from spp_extract.groups import connected
from spp_extract.neighbors import find_neighbors, neighbors

runner = CliRunner()


def _decided(sims: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    """Positions of each list whose similarity is apart from its neighbours' in the list."""
    apart = np.abs(np.diff(sims, axis=1)) > tol
    edge = np.ones((len(sims), 1), bool)
    return np.concatenate([edge, apart], 1) & np.concatenate([apart, edge], 1)


def test_faiss_exact_equals_torch_exact(tmp_path, real_h5):
    x = np.random.default_rng(3).standard_normal((1500, 24)).astype(np.float32)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    a = neighbors(src, 5, index="exact", use_faiss=True)
    b = neighbors(src, 5, index="exact", use_faiss=False)
    assert (a.engine, b.engine) == ("faiss", "torch")
    np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-5)
    decided = _decided(b.similarity)
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(a.index[decided], b.index[decided])
    # an independent reference: the plain product, each row's own column removed
    y = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = y.astype(np.float64) @ y.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(a.index[decided], want[decided])


def test_faiss_lists_with_more_duplicates_than_k_never_hold_the_row_itself(tmp_path, real_h5):
    """Twelve identical rows and k = 4: FAISS may return the duplicates in any order and leave
    the row itself out; the lists are still the four lowest other duplicates, as on torch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    dup = [5, 17, 40, 41, 90, 120, 121, 150, 200, 230, 260, 299]
    x[dup] = x[5]
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    a = neighbors(src, 4, use_faiss=True)
    b = neighbors(src, 4, use_faiss=False)
    for row in dup:
        assert list(a.index[row]) == [d for d in dup if d != row][:4], row
    np.testing.assert_array_equal(a.index[dup], b.index[dup])
    assert not (a.index == np.arange(len(x))[:, None]).any()


def test_approximate_search_measures_and_stores_its_recall(tmp_path, real_h5, monkeypatch):
    x = np.random.default_rng(1).standard_normal((3000, 32)).astype(np.float32)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    weak = find_neighbors(src, None, 10, index="approx")  # with the shipped settings
    result = runner.invoke(app, ["neighbors", str(src), "-k", "10", "--index", "approx"])
    assert result.exit_code == 0
    assert re.search(
        r"recall@10 (0\.9\d+|1\.0000) against exact search on 1000 queries", result.stderr
    )
    # a sparse graph, searched narrowly: recall falls below 1, so a recall that is not
    # measured (a constant) cannot pass what follows
    monkeypatch.setattr(engines, "HNSW_M", 4)
    monkeypatch.setattr(engines, "HNSW_EF_SEARCH", 1)
    found = find_neighbors(src, tmp_path / "nn.h5", 10, index="approx")
    assert 0.9 <= weak.recall <= 1.0 and found.recall < weak.recall
    assert found.method == "approx" and found.engine == "faiss"
    assert found.recall_queries == engines.RECALL_SAMPLE
    # the recall the tool reports is the recall against exact lists computed independently
    exact = neighbors(src, 10, use_faiss=False)
    sample = engines.sample_queries(len(x))
    hits = [len(set(found.index[i]) & set(exact.index[i])) for i in sample]
    assert found.recall == pytest.approx(np.mean(hits) / 10)
    with h5py.File(tmp_path / "nn.h5") as f:
        assert f.attrs["index"] == "approx" and f.attrs["index_type"] == "IndexHNSWFlat"
        assert f.attrs["recall_at_k"] == pytest.approx(found.recall)
        assert f.attrs["recall_queries"] == engines.RECALL_SAMPLE


def test_without_faiss_approx_is_one_line_and_auto_stays_exact(tmp_path, real_h5, monkeypatch):
    x = np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ConfigError, match=r'pip install "spp-extract\[faiss\]"'):
        neighbors(src, 3, index="approx")
    found = neighbors(src, 3)
    assert (found.method, found.engine) == ("exact", "torch")
    result = runner.invoke(app, ["neighbors", str(src), "--index", "approx"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["neighbors", str(src), "--index", "fast"])
    assert result.exit_code == 2 and "expected one of: exact, approx, auto" in result.stderr


def test_groups_are_connected_components_with_the_largest_image_kept(tmp_path, real_h5):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    x[[3, 9, 30]] = x[3] + 0.01 * rng.standard_normal((3, 16)).astype(np.float32)
    x[[12, 20]] = x[12]
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    with h5py.File(src, "r+") as f:
        sizes = np.full((40, 2), 100, np.int32)
        sizes[9] = (300, 200)  # the largest of its group
        f["image_size"][...] = sizes  # rows 12 and 20: the same size, kept by path
    found = find_neighbors(src, None, 3, groups=tmp_path / "g.csv", threshold=0.99)
    with open(tmp_path / "g.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["group"], r["representative"], r["path"]) for r in rows] == [
        ("1", "img00009.jpg", "img00009.jpg"),
        ("1", "img00009.jpg", rows[1]["path"]),
        ("1", "img00009.jpg", rows[2]["path"]),
        ("2", "img00012.jpg", "img00012.jpg"),
        ("2", "img00012.jpg", "img00020.jpg"),
    ]
    assert {rows[1]["path"], rows[2]["path"]} == {"img00003.jpg", "img00030.jpg"}
    assert rows[0]["width"] == "200" and rows[0]["height"] == "300"
    assert float(rows[4]["similarity"]) == pytest.approx(1.0, abs=1e-6)
    assert len(found.groups) == 2


def test_connected_components_match_a_plain_search():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 60, 40), rng.integers(0, 60, 40)
    got = {tuple(c.tolist()) for c in connected(60, a, b)}
    adjacency = {i: set() for i in range(60)}
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        adjacency[x].add(y)
        adjacency[y].add(x)
    want, seen = set(), set()
    for start in range(60):
        if start in seen:
            continue
        todo, part = [start], set()
        while todo:
            node = todo.pop()
            if node not in part:
                part.add(node)
                todo += adjacency[node]
        seen |= part
        if len(part) > 1:
            want.add(tuple(sorted(part)))
    assert got == want


def test_against_refuses_vectors_that_are_not_comparable(tmp_path, example_dir):
    base = ["--backbone", "resnet18", "--weights", "none", "--workers", "0", "-q"]
    one = example_dir / "landscape.jpg"
    for name, extra in [("a", []), ("b", ["--levels", "2,1"]), ("c", ["--seed", "7"])]:
        assert (
            runner.invoke(
                app, ["extract", str(one), "-o", str(tmp_path / f"{name}.h5")] + base + extra
            ).exit_code
            == 0
        )
    for other, word in [("b", "levels"), ("c", "seed")]:
        result = runner.invoke(
            app, ["neighbors", str(tmp_path / "a.h5"), "--against", str(tmp_path / f"{other}.h5")]
        )
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert "\n" not in line and "not comparable" in line and word in line


def _copies_apart(tmp_path):
    """Originals in coll/ (the example photos), their altered copies in new/."""
    from make_examples import make_examples
    from test_retrieval import altered_copies

    coll, new = tmp_path / "coll", tmp_path / "new"
    make_examples(coll)
    copies = altered_copies(coll)
    for copy in copies:
        (new / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(coll / copy, new / copy)
    return coll, new, copies


BROWSER = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)


def _dom(page):
    """The page's DOM after load, as headless Chromium renders it."""
    if BROWSER is None:
        if os.environ.get("SPP_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium); .ci/run installs it")
    out = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
        + ["--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


@pytest.mark.slow
def test_against_a_collection_finds_each_copys_original_and_the_pages_open(tmp_path):
    coll, new, copies = _copies_apart(tmp_path)
    base = ["--backbone", "resnet18", "--weights", "none", "--layer", "layer3", "--workers", "0"]
    for folder in (coll, new):
        result = runner.invoke(
            app, ["extract", str(folder), "-o", str(tmp_path / f"{folder.name}.h5"), "-q", *base]
        )
        assert result.exit_code == 0, result.output
    nh5, ch5 = tmp_path / "new.h5", tmp_path / "coll.h5"
    args = ["neighbors", str(nh5), "--against", str(ch5), "-k", "2"]
    result = runner.invoke(
        app,
        args
        + ["-o", str(tmp_path / "nn.h5"), "--pairs", str(tmp_path / "p.csv"), "--threshold", "-1"]
        + ["--save-index", str(tmp_path / "coll.index"), "--html", str(tmp_path / "q.html")],
    )
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "nn.h5") as f:
        index = f["neighbors/index"][:]
        queries = list(f["paths"].asstr()[:])
        originals = list(f["against/paths"].asstr()[:])
        assert f.attrs["against_file"] == "coll.h5"
    # the lists are the plain product's (an independent reference) ...
    a, b = read_features(nh5), read_features(ch5)
    y = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    sim = y(a.features.astype(np.float64)) @ y(b.features.astype(np.float64)).T
    np.testing.assert_array_equal(index, np.argsort(-sim, axis=1, kind="stable")[:, :2])
    # ... and with random weights, 31 of the 32 altered copies find their original first
    # (transparent.png's 80%-size copy lands on cmyk.jpg)
    top = {q: originals[index[i, 0]] for i, q in enumerate(queries)}
    assert len(queries) == 32 and sum(top[q] == copies[q] for q in queries) >= 31
    with open(tmp_path / "p.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 64 and {(p["path_a"], p["path_b"]) for p in pairs} >= set(top.items())
    # the saved index gives the same lists without being rebuilt
    again = runner.invoke(
        app, args + ["--index-file", str(tmp_path / "coll.index"), "--format", "csv", "-q"]
    )
    assert again.exit_code == 0
    listed = [line.split(",") for line in again.stdout.splitlines()[1:]]
    assert {(q, n) for q, rank, n, _ in listed if rank == "1"} == set(top.items())
    # an index refuses a collection it was not built from
    other = runner.invoke(
        app,
        [
            "neighbors",
            str(ch5),
            "--against",
            str(nh5),
            "--index-file",
            str(tmp_path / "coll.index"),
        ],
    )
    assert other.exit_code == 2 and "rebuild it with --save-index" in other.stderr
    # the page: every query with its 2 neighbours, every thumbnail decoded in a real browser
    dom = _dom(tmp_path / "q.html")
    assert 'data-thumbnails="96"' in dom and 'data-decoded="96"' in dom
    assert dom.count("<section>") == 32

    # groups, in one folder with the copies: the page shows them largest first
    shutil.copytree(new, coll, dirs_exist_ok=True)
    result = runner.invoke(app, ["extract", str(coll), "-o", str(tmp_path / "all.h5"), "-q", *base])
    assert result.exit_code == 0
    result = runner.invoke(
        app,
        ["neighbors", str(tmp_path / "all.h5"), "-k", "4", "--threshold", "0.9"]
        + ["--groups", str(tmp_path / "g.csv"), "--html", str(tmp_path / "g.html")],
    )
    assert result.exit_code == 0, result.output
    with open(tmp_path / "g.csv", newline="") as f:
        members = list(csv.DictReader(f))
    sizes = {}
    for m in members:
        sizes[m["group"]] = int(m["size"])
    dom = _dom(tmp_path / "g.html")
    shown = int(re.search(r'data-thumbnails="(\d+)"', dom).group(1))
    assert f'data-decoded="{shown}"' in dom and shown == len(members)
    headings = re.findall(r"<h2>group (\d+) · (\d+) images", dom)
    assert [int(n) for _, n in headings] == sorted(sizes.values(), reverse=True)
    assert [int(g) for g, _ in headings] == list(range(1, len(sizes) + 1))


def test_page_counts_originals_that_cannot_be_read(tmp_path, example_dir):
    """A file moved or deleted since extraction is a labelled placeholder, counted at the top."""
    import io

    from spp_extract.report import write_page

    page = tmp_path / "p.html"
    text = io.StringIO()
    items = [(str(example_dir / "landscape.jpg"), "landscape.jpg", "kept")]
    items.append((str(tmp_path / "gone.jpg"), "gone.jpg", "0.99"))
    assert write_page(text, "t", [("group 1 · 2 images", items)], 1, "groups") == 2
    page.write_text(text.getvalue())
    dom = _dom(page)
    assert 'data-decoded="1"' in dom and "not readable" in dom
    assert "1 of 1 thumbnails shown; 1 originals could not be read" in dom
