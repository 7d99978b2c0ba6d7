"""Retrieval: reduce (PCA / PCA-whitening), projection of new vectors, exact cosine
neighbours, near-duplicate pairs, reading rows and blocks. References are obviously correct
and small: numpy SVD in float64, a brute-force argsort of all similarities, plain slices."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import FAST_CONFIG, Terminal, cli, one_line, synthetic
from PIL import Image, ImageEnhance, ImageOps

import spp_extract
from spp_extract import Config, ConfigError, read_features
from spp_extract.backbones import provenance_of
from spp_extract.neighbors import Neighbors, neighbors, pairs_above
from spp_extract.pca import pca
from spp_extract.projection import (
    Projection,
    check_projection,
    fit_projection,
    project_file,
    reduce,
)
from spp_extract.provenance import Provenance
from spp_extract.reader import iter_features
from spp_extract.storage import ROW_FIELDS

FAST = FAST_CONFIG
_run = cli


def spectrum_matrix(n: int, d: int, seed: int = 0, decay: float = 0.8) -> np.ndarray:
    """Rows with a decaying spectrum and non-zero mean, like CNN features (distinct gaps)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, min(n, d))))[0]  # (d, r) orthonormal
    scales = decay ** np.arange(basis.shape[1]) * 10
    coeffs = rng.standard_normal((n, basis.shape[1])) * scales
    return (coeffs @ basis.T + rng.uniform(0, 3, d)).astype(np.float32)


def numpy_pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    mean = x.mean(0)
    _, s, vh = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vh[:dim], s[:dim] ** 2 / (len(x) - 1)


# ----------------------------------------------------------------------------- PCA maths


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "lowrank"])
@pytest.mark.parametrize("shape", [(300, 80), (120, 700)])
def test_pca_matches_numpy_svd(method, shape):
    x = spectrum_matrix(*shape)
    dim = 16
    mean, components, variance = pca(torch.from_numpy(x), dim, method=method)
    ref_mean, ref_components, ref_variance = numpy_pca(x, dim)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(variance.numpy(), ref_variance, rtol=1e-4)
    c = components.double().numpy()
    np.testing.assert_allclose(c @ c.T, np.eye(dim), rtol=0, atol=1e-5)  # orthonormal rows
    np.testing.assert_allclose(
        c.T @ c, ref_components.T @ ref_components, rtol=0, atol=1e-4
    )  # same subspace


@pytest.mark.slow
def test_whitening_gives_identity_covariance_on_the_sample(tmp_path, real_h5):
    x = spectrum_matrix(200, 64, seed=3)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    fitted = fit_projection(src, dim=10, whiten=True, l2=False, sample=200)
    y = fitted(x).astype(np.float64)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(10), rtol=0, atol=1e-4)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(fitted.components @ fitted.components.T, np.eye(10), atol=1e-5)


def test_reduce_file_equals_one_shot_projection_and_reference(tmp_path, real_h5):
    x = spectrum_matrix(500, 96, seed=1)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    dest = tmp_path / "small.h5"
    fitted = reduce(src, dest, dim=12, sample=500)  # plain PCA: no power, no L2
    got = read_features(dest).features
    mean, components, _ = numpy_pca(x, 12)
    ref = (x - mean) @ components.T  # reference scores, up to each axis's sign
    signs = np.sign(np.sum(got * ref, axis=0))
    np.testing.assert_allclose(got, ref * signs, rtol=0, atol=2e-3 * np.abs(ref).max())
    np.testing.assert_allclose(got, fitted(x), rtol=0, atol=1e-5)  # chunked == one shot
    # small blocks through project_file: the same rows
    again = tmp_path / "again.h5"
    project_file(src, again, Projection.load(dest), block_rows=7)
    np.testing.assert_allclose(read_features(again).features, got, rtol=0, atol=1e-5)


def test_reduced_file_keeps_rows_attributes_and_projection(tmp_path, real_h5):
    dest = tmp_path / "small.h5"
    result = _run("reduce", real_h5, dest, "--dim", 4, "--whiten", "--power", 0.5)
    assert result.exit_code == 0, result.output
    with h5py.File(real_h5) as src, h5py.File(dest) as out:
        assert out["features"].shape == (src["features"].shape[0], 4)
        for name in ("paths", *ROW_FIELDS, "failed/paths", "failed/errors"):
            np.testing.assert_array_equal(out[name][:], src[name][:])
        assert [bytes(b) for b in out["path_bytes"][:]] == [bytes(b) for b in src["path_bytes"][:]]
        for key, value in src.attrs.items():
            if key not in ("layout", "shards"):
                np.testing.assert_array_equal(out.attrs[key], value)
        assert out.attrs["layout"] == "merged" and "shards" not in out.attrs
        group = out["reduce"]
        assert group["components"].shape == (4, src["features"].shape[1])
        assert {"mean", "explained_variance", "scale"} <= set(group)
        assert group.attrs["whiten"] and group.attrs["l2"] and group.attrs["power"] == 0.5
        assert (
            group.attrs["source_file"] == real_h5.name
            and len(group.attrs["source_config_sha256"]) == 64
        )
    norms = np.linalg.norm(read_features(dest).features, axis=1)
    np.testing.assert_allclose(norms, 1, atol=1e-5)  # L2 after whitening by default


def test_projection_load_reproduces_reduce(tmp_path, real_h5):
    dest = tmp_path / "small.h5"
    reduce(real_h5, dest, dim=5, whiten=True, power=0.5)
    projection = Projection.load(dest)
    full = read_features(real_h5).features
    np.testing.assert_allclose(projection(full), read_features(dest).features, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        projection(torch.from_numpy(full[3])), read_features(dest).features[3], atol=1e-5
    )


# ----------------------------------------------------------------------------- neighbours


def cosines(x: np.ndarray) -> np.ndarray:
    """Every pair's cosine in float64 (a zero row: 0 with everything)."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return unit @ unit.T


def assert_brute_force(found: Neighbors, x: np.ndarray, k: int) -> None:
    """Against a plain loop over all others, sorted by (cosine desc, row asc): the same k
    similarities; the same rows wherever the cosines are apart by more than float32 rounding
    (cosines equal in exact arithmetic but not as float32 are not ties); each listed row's
    true cosine is the one reported; never the row itself, never twice."""
    sim = cosines(x)
    for i in range(len(x)):
        order = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-sim[i, j], j))
        want = sim[i, order[: k + 1]]
        np.testing.assert_allclose(
            found.similarity[i], want[:k], rtol=0, atol=1e-5, err_msg=f"row {i}"
        )
        np.testing.assert_allclose(sim[i, found.index[i]], found.similarity[i], rtol=0, atol=1e-5)
        apart = np.abs(np.diff(want)) > 1e-5  # position p is decided if p is apart from p-1 and p+1
        decided = np.concatenate([[True], apart])[:k] & apart[:k]
        np.testing.assert_array_equal(
            found.index[i][decided], np.array(order[:k])[decided], err_msg=f"row {i}"
        )
        assert i not in found.index[i] and len(set(found.index[i])) == k


def tie_matrix(seed: int = 0) -> np.ndarray:
    """A few hundred small-integer rows with exact duplicates (ties), a scaled copy (cosine 1)
    and a zero row."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=(300, 24)).astype(np.float32)
    x[50] = x[10]
    x[200] = x[10]  # three identical rows
    x[120] = 3 * x[7]  # same direction
    x[77] = 0  # zero row: similarity 0 with everything
    return x


@pytest.mark.parametrize(
    ("block_rows", "use_faiss"), [(None, False), (37, False), (None, True), (37, True)]
)
def test_neighbors_match_brute_force(tmp_path, real_h5, block_rows, use_faiss):
    x = tie_matrix()
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    k = 6
    found = neighbors(src, k, block_rows=block_rows, use_faiss=use_faiss)
    assert found.engine == ("faiss" if use_faiss else "torch") and found.method == "exact"
    assert_brute_force(found, x, k)
    assert found.index.dtype == np.int64 and found.similarity.dtype == np.float32
    assert (np.diff(found.similarity, axis=1) <= 0).all()
    assert not (found.index == np.arange(len(x))[:, None]).any()  # never itself
    assert list(found.index[10][:2]) == [50, 200]  # identical rows, lower row first
    np.testing.assert_array_equal(found.similarity[77], 0)  # the zero row
    assert list(found.index[77]) == [0, 1, 2, 3, 4, 5]  # all tied at 0: lowest rows


def test_neighbors_out_of_memory_budget_streams_the_same(tmp_path, real_h5):
    x = tie_matrix(seed=1)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    cached = neighbors(src, 4, block_rows=64, use_faiss=False)
    streamed = neighbors(src, 4, block_rows=64, memory_bytes=0)  # FAISS or not: torch streams
    np.testing.assert_array_equal(streamed.index, cached.index)
    np.testing.assert_array_equal(streamed.similarity, cached.similarity)


def test_pairs_each_once_above_threshold():
    found = Neighbors(
        np.array([[1, 2], [0, 2], [0, 1], [2, 0]]),
        np.array([[0.99, 0.5], [0.98, 0.96], [0.5, 0.96], [0.97, 0.1]], np.float32),
    )
    lo, hi, sims = pairs_above(found, 0.95)
    assert list(zip(lo.tolist(), hi.tolist(), strict=True)) == [(0, 1), (1, 2), (2, 3)]
    np.testing.assert_allclose(sims, [0.99, 0.96, 0.97])  # (0,1) as row 0 sees it


def test_neighbors_command_writes_index_similarity_paths_and_pairs(tmp_path, real_h5):
    x = tie_matrix()
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    out, pairs = tmp_path / "nn.h5", tmp_path / "dups.csv"
    result = _run("neighbors", src, "-k", 3, "-o", out, "--threshold", 0.999, "--pairs", pairs)
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert_brute_force(Neighbors(f["neighbors/index"][:], f["neighbors/similarity"][:]), x, 3)
        assert list(f["paths"].asstr()[:]) == [f"img{i:05d}.jpg" for i in range(len(x))]
    rows = list(csv.reader(io.StringIO(pairs.read_text())))
    assert rows[0] == ["path_a", "path_b", "similarity"]
    got = {(a, b) for a, b, _ in rows[1:]}
    expected = {
        (f"img{i:05d}.jpg", f"img{j:05d}.jpg")
        for i, j in [(7, 120), (10, 50), (10, 200), (50, 200)]
    }
    assert got == expected
    assert all(abs(float(s) - 1) < 1e-5 for *_, s in rows[1:])


# ----------------------------------------------------------------------------- refusals


def _one_line_exit_2(result, fragment: str) -> None:
    assert fragment in one_line(result, 2)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--dim", "20000"], "choose 1 to 10752"),
        (["--dim", "12"], "needs at least 13 sampled rows"),
        (["--dim", "4", "--sample", "3"], "needs at least 5 sampled rows"),
        (["--dim", "0"], "dim 0 is invalid"),
        (["--dim", "2", "--power", "-1"], "power -1.0 is invalid"),
    ],
)
def test_reduce_refusals(tmp_path, real_h5, args, fragment):
    result = _run("reduce", real_h5, tmp_path / "out.h5", *args)
    _one_line_exit_2(result, fragment)
    assert not list(tmp_path.iterdir())


def test_refuses_foreign_and_missing_shards(tmp_path, real_h5):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    _one_line_exit_2(_run("reduce", foreign, tmp_path / "out.h5", "--dim", 2), "did not write")
    _one_line_exit_2(_run("neighbors", foreign, "-o", tmp_path / "nn.h5"), "did not write")
    # a view whose shards are gone (the view copied elsewhere, shards left behind)
    lonely = tmp_path / "lonely" / "features.h5"
    lonely.parent.mkdir()
    lonely.write_bytes(real_h5.read_bytes())
    for args in (
        ["reduce", lonely, tmp_path / "out.h5", "--dim", 2],
        ["neighbors", lonely, "-o", tmp_path / "nn.h5"],
    ):
        result = _run(*args)
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
        assert "missing" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.h5", "lonely"]


def test_neighbors_refuses_k_too_large(tmp_path, real_h5):
    _one_line_exit_2(
        _run("neighbors", real_h5, "-k", 12, "-o", tmp_path / "nn.h5"), "choose k from 1 to 11"
    )
    assert not list(tmp_path.iterdir())


def test_check_projection_names_differing_keys(tmp_path, real_h5):
    dest = tmp_path / "small.h5"
    reduce(real_h5, dest, dim=3)
    projection = Projection.load(dest)
    check_projection(projection, provenance_of(FAST))  # the same configuration: accepted
    check_projection(projection, Provenance.of_attrs(read_features(real_h5).attrs))
    with pytest.raises(ConfigError) as caught:
        check_projection(
            projection,
            provenance_of(Config(backbone="resnet18", weights="none", seed=1, levels=(2, 1))),
        )
    message = str(caught.value)
    assert "levels: [4, 2, 1] (projection) vs [2, 1]" in message and "seed: 0" in message
    assert "feature_dim" in message and "backbone" not in message


def test_extract_project_refuses_mismatch_before_extracting(tmp_path, real_h5, example_dir):
    dest = tmp_path / "small.h5"
    reduce(real_h5, dest, dim=3)
    out = tmp_path / "q.h5"
    result = _run(
        "extract",
        example_dir,
        "-o",
        out,
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--layer",
        "layer3",
        "--workers",
        0,
        "-q",
        "--project",
        dest,
    )
    _one_line_exit_2(result, "layer: 'layer4' (projection) vs 'layer3'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.h5"]


@pytest.mark.slow
def test_extract_project_gives_the_rows_of_reduce(tmp_path, real_h5, example_dir):
    dest = tmp_path / "small.h5"
    reduce(real_h5, dest, dim=6, whiten=True)
    out = tmp_path / "q.h5"
    result = _run(
        "extract",
        example_dir,
        "-o",
        out,
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--workers",
        0,
        "-q",
        "--project",
        dest,
    )
    assert result.exit_code == 0, result.output
    got, want = read_features(out), read_features(dest)
    assert got.paths == want.paths
    np.testing.assert_allclose(got.features, want.features, rtol=0, atol=1e-5)
    assert (tmp_path / "q.h5.full.h5").is_file()  # the full vectors, a view over its shards


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "rows",
    [
        slice(2, 9),
        slice(None, None, 3),
        slice(-4, None),
        [7, 1, 1, 3, -1],
        np.array([], np.int64),
        np.arange(12) % 3 == 0,
    ],
)
def test_read_features_rows_equal_slices_of_the_full_read(real_h5, rows):
    full = read_features(real_h5)
    part = read_features(real_h5, rows=rows)
    index = np.arange(len(full.paths))[rows]
    np.testing.assert_array_equal(part.features, full.features[index])
    assert part.paths == [full.paths[i] for i in index]
    np.testing.assert_array_equal(part.image_size, full.image_size[index])
    np.testing.assert_array_equal(part.feature_map_size, full.feature_map_size[index])
    assert part.failed_paths == full.failed_paths


def test_read_features_rows_sparse_and_out_of_range(tmp_path, real_h5):
    x = np.random.default_rng(0).standard_normal((5000, 3)).astype(np.float32)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    index = np.array([4999, 3, 2500, 3])  # sparse: fancy reads, not one slice
    np.testing.assert_array_equal(read_features(src, rows=index).features, x[index])
    with pytest.raises(IndexError, match="row 5000 is out of range"):
        read_features(src, rows=[5000])


@pytest.mark.parametrize("block_rows", [None, 5, 100])
def test_iter_features_blocks_cover_the_file(real_h5, block_rows):
    full = read_features(real_h5)
    starts, features, paths = [], [], []
    for start, block, names in iter_features(real_h5, block_rows=block_rows):
        starts.append(start)
        features.append(block)
        paths += names
    step = block_rows or len(full.paths)
    assert starts == list(range(0, len(full.paths), step))
    np.testing.assert_array_equal(np.concatenate(features), full.features)
    assert paths == full.paths


# ----------------------------------------------------------------------------- end to end


def altered_copies(folder: Path) -> dict[str, str]:
    """Next to each photographic example, four altered copies; returns copy -> original."""
    made = {}
    for name in (
        "landscape.jpg",
        "portrait.png",
        "rotated_exif.jpg",
        "cmyk.jpg",
        "sub/nested.bmp",
        "sub/UPPER.TIFF",
        "transparent.png",
        "gray.png",
    ):
        with Image.open(folder / name) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
        stem = Path(name).with_suffix("")
        w, h = rgb.size
        variants = {
            "q30.jpg": (rgb, {"quality": 30}),
            "bright.png": (ImageEnhance.Brightness(rgb).enhance(1.2), {}),
            "crop90.png": (
                rgb.crop((round(w * 0.05), round(h * 0.05), round(w * 0.95), round(h * 0.95))),
                {},
            ),
            "small80.png": (
                rgb.resize((round(w * 0.8), round(h * 0.8)), Image.Resampling.BICUBIC),
                {},
            ),
        }
        for suffix, (image, options) in variants.items():
            copy = f"{stem}.alt-{suffix}"
            image.save(folder / copy, **options)
            made[copy] = name
    return made


@pytest.mark.slow
def test_end_to_end_altered_copies_find_their_original(tmp_path):
    """Random weights (no downloads): layer3 rather than layer4, where random deep features
    confused 80%-size copies with other images (2-4 of 32 copies wrong, max or avg pooling);
    PCA without whitening, since whitening fitted on 44 rows overfits (2-7 wrong at dim 8-16)."""
    from make_examples import make_examples

    folder = tmp_path / "photos"
    make_examples(folder)
    copies = altered_copies(folder)
    out, small = tmp_path / "f.h5", tmp_path / "small.h5"
    spp_extract.extract(
        [folder], out, config=Config(backbone="resnet18", weights="none", workers=0, layer="layer3")
    )
    reduce(out, small, dim=16, power=0.5)
    for path in (out, small):
        found = neighbors(path, 1)
        paths = read_features(path).paths
        family = {p: copies.get(p, p) for p in paths}
        top = {p: paths[found.index[i, 0]] for i, p in enumerate(paths)}
        wrong = [(p, top[p]) for p in paths if p in copies and family[top[p]] != family[p]]
        assert not wrong, (path.name, wrong)
    assert len(copies) == 32


# ----------------------------------------------------------------------------- progress


def test_progress_bars_for_both_phases_of_reduce_and_for_neighbors(tmp_path, real_h5):
    from spp_extract.cli import ProgressBar

    stream = Terminal()
    progress = ProgressBar(stream)
    reduce(real_h5, tmp_path / "small.h5", dim=3, sample=8, progress=progress)
    progress.close()
    assert "8/8" in stream.getvalue() and "12/12" in stream.getvalue()  # fit on 8, project 12
    calls: list[tuple[int, int]] = []
    neighbors(real_h5, 2, block_rows=5, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(5, 12), (10, 12), (12, 12)]
