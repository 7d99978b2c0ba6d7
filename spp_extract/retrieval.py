"""Retrieval post-processing of spp-extract files: PCA(-whitening) reduction fitted on a
sample, the same transform for new vectors, exact cosine nearest neighbours.

The transform, in this order (retrieval practice for MAC/SPoC/R-MAC/GeM descriptors):
signed power -> L2 -> centre -> project -> whiten -> L2. Everything is read in row blocks
(``reader.read_rows`` / ``reader.iter_features``), so memory depends on the block size, the
sample and the output dimension, never on the number of rows; nothing needs a D x D matrix
(D reaches 102,400): the principal axes come from the SVD of the centred sample itself, exact
(``torch.linalg.svd``) when the sample's smaller side is small, randomised
(``torch.svd_lowrank``, Halko et al. 2011) otherwise.

It writes its own files (a reduced copy, a neighbours file) with the atomic helpers of
``storage``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from torch import Tensor

from .config import Config
from .errors import ConfigError, option, printable
from .outputs import OutputFile, identify, open_output
from .reader import block_rows_for
from .rng import seeded
from .storage import check_destinations, copy_as_merged, written_atomically

Progress = Callable[[int, int], None]
ORDER = "power -> l2 -> centre -> project -> whiten -> l2"
# What decides the vectors a projection accepts (dtype and precision only add rounding).
FINGERPRINT_KEYS = (
    "backbone",
    "layer",
    "weights",
    "levels",
    "pooling",
    "mean",
    "std",
    "feature_dim",
)
NON_FINITE = "the stored vector holds NaN or inf; it is left out of reductions and neighbours"
SAMPLE_DEFAULT = 100_000
SAMPLE_BYTES = 2 << 30  # the default sample is capped to about this much float32
EXACT_SIDE = 1024  # exact SVD when the sample's smaller side is at most this (or near 2 x dim)


# ----------------------------------------------------------------------------- maths


def signed_power(x: Tensor, power: float) -> Tensor:
    """``sign(x) * |x| ** power`` (power normalisation; ``power = 1`` is the identity)."""
    return x if power == 1 else x.sign() * x.abs().pow(power)


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` (Tensor[N, D]) scaled to unit L2 norm; a zero row stays zero."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (N, 1)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def prepare(x: Tensor, power: float, l2: bool) -> Tensor:
    """The steps before centring: signed power, then L2 (Tensor[n, D] -> float32)."""
    x = signed_power(x.float(), power)
    return l2_normalize(x) if l2 else x


def pca(
    x: Tensor,
    dim: int,
    *,
    method: Literal["auto", "exact", "lowrank"] = "auto",
    oversample: int | None = None,
    niter: int = 6,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Principal axes of the rows of ``x`` (Tensor[n, D], float32), without a D x D matrix.

    Returns ``(mean Tensor[D], components Tensor[dim, D] with orthonormal rows, explained
    variance Tensor[dim])``, variance with the ``n - 1`` denominator, largest first. Each
    component's largest-magnitude entry is positive, so the signs do not depend on the device.
    ``exact``: ``torch.linalg.svd`` of the centred sample (cost n·D·min(n, D));
    ``lowrank``: ``torch.svd_lowrank`` with ``dim + oversample`` columns and ``niter`` power
    iterations (cost about n·D·(dim + oversample)·(2·niter + 2)); ``auto``: exact when
    ``min(n, D) <= 1024`` or when dim + oversample is at least half of it. ``inplace``: centre
    ``x`` itself instead of a copy (the sample can be most of the memory).
    """
    n, d = x.shape
    mean = _blockwise_mean(x)
    x = x.sub_(mean.to(x.dtype)) if inplace else x - mean.to(x.dtype)  # (n, D), centred
    side = min(n, d)
    q = min(side, dim + (oversample if oversample is not None else max(10, dim // 2)))
    if method == "auto":
        method = "exact" if side <= EXACT_SIDE or 2 * q >= side else "lowrank"
    if method == "exact":
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # s (side,), vh (side, D)
        components, s = vh[:dim], s[:dim]
    else:
        _, s, v = torch.svd_lowrank(x, q=q, niter=niter)  # v (D, q)
        components, s = v[:, :dim].T, s[:dim]
    signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()  # (dim, 1)
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    variance = s.double().square() / max(n - 1, 1)
    return mean.float(), components.contiguous(), variance.float()


def _float64_rows(x: Tensor) -> Iterator[Tensor]:
    """``x`` in float64 blocks of about 64 MiB: sums in float64 without a float64 copy of
    the whole sample."""
    step = max(1, (64 << 20) // (8 * max(1, x.shape[1])))
    for start in range(0, x.shape[0], step):
        yield x[start : start + step].double()


def _blockwise_mean(x: Tensor) -> Tensor:
    return sum(block.sum(0) for block in _float64_rows(x)) / x.shape[0]


@dataclass(frozen=True)
class Projection:
    """A fitted reduction: ``power -> L2 -> centre -> project -> whiten -> L2``.

    ``Projection.load("small.h5")(vectors)`` applies it to new vectors (ndarray or Tensor
    ``[n, D]`` or ``[D]``) and returns float32 ``ndarray[n, dim]`` (or ``[dim]``).
    """

    mean: np.ndarray  # (D,) float32
    components: np.ndarray  # (dim, D) float32, orthonormal rows
    explained_variance: np.ndarray  # (dim,) float32, on the (pre-processed) sample
    scale: np.ndarray | None  # (dim,) 1/sqrt(variance) when whitened
    power: float = 1.0  # 1: off
    l2: bool = False  # L2-normalise before centring and after the projection
    source: dict[str, Any] = field(default_factory=dict)  # root attributes of the fitted file
    settings: dict[str, Any] = field(default_factory=dict)  # how it was fitted (reduce/ attrs)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    def apply(self, x: Tensor) -> Tensor:
        """Tensor[n, D] -> Tensor[n, dim] float32, on ``x``'s device."""
        device = x.device
        mean = torch.from_numpy(self.mean).to(device)
        components = torch.from_numpy(self.components).to(device)
        y = (prepare(x, self.power, self.l2) - mean) @ components.T  # (n, dim)
        if self.scale is not None:
            y = y * torch.from_numpy(self.scale).to(device)
        return l2_normalize(y) if self.l2 else y

    def __call__(self, vectors: np.ndarray | Tensor) -> np.ndarray:
        x = torch.as_tensor(vectors)
        single = x.dim() == 1
        x = x[None] if single else x
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"expected vectors of shape (n, {self.input_dim}), got {tuple(x.shape)}"
            )
        bad = (~torch.isfinite(x).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{len(bad)} vectors hold NaN or inf (rows {bad[:5]}); there is no projection "
                "of them: leave them out"
            )
        with torch.inference_mode():
            y = self.apply(x).cpu().numpy()
        return y[0] if single else y

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Projection:
        """The projection stored in a file written by ``reduce`` (its ``reduce/`` group)."""
        path = Path(path)
        with open_output(path) as opened:
            f, attrs = opened.file, opened.attrs
            if "reduce" not in f:
                raise ConfigError(
                    f"'{path}' holds no projection (no reduce/ group); make one "
                    "with `spp-extract reduce`"
                )
            group = f["reduce"]
            settings = {k: _plain(v) for k, v in group.attrs.items()} | {"file": str(path)}
            return cls(
                mean=group["mean"][:].astype(np.float32),
                components=group["components"][:].astype(np.float32),
                explained_variance=group["explained_variance"][:].astype(np.float32),
                scale=group["scale"][:].astype(np.float32) if "scale" in group else None,
                power=float(settings["power"]),
                l2=bool(settings["l2"]),
                source=attrs,
                settings=settings,
            )


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ----------------------------------------------------------------------------- compatibility


def fingerprint(attrs_or_config: dict[str, Any] | Config) -> dict[str, Any]:
    """The values that decide the vectors (``FINGERPRINT_KEYS``, plus ``seed`` for random
    weights), from a file's root attributes or from a Config (resolved, nothing loaded)."""
    if isinstance(attrs_or_config, Config):
        from .backbones import describe, resolve
        from .pooling import spp_dim

        config = attrs_or_config
        resolved = resolve(config)
        _, channels, _ = describe(resolved.backbone, resolved.layer)
        values = {
            "backbone": resolved.backbone,
            "layer": resolved.layer,
            "weights": _weights(resolved),
            "levels": list(config.levels),
            "pooling": config.pooling,
            "mean": list(resolved.mean),
            "std": list(resolved.std),
            "feature_dim": spp_dim(channels, config.levels),
        }
        if resolved.weights == "none":
            values["seed"] = config.seed
        return values
    attrs = attrs_or_config
    values = {key: _plain(attrs.get(key)) for key in FINGERPRINT_KEYS}
    if str(values["weights"]).startswith("file:"):  # a weights file counts by its content
        values["weights"] = _plain(attrs.get("weights_id", values["weights"]))
    values["levels"] = [int(v) for v in values["levels"] or []]
    values["mean"] = [float(v) for v in values["mean"] or []]
    values["std"] = [float(v) for v in values["std"] or []]
    if values["weights"] == "none":
        try:
            values["seed"] = tomllib.loads(str(attrs.get("config", ""))).get("seed")
        except tomllib.TOMLDecodeError:
            values["seed"] = None
    return values


def _weights(resolved: Any) -> str:
    """What identifies the weights: the torchvision name, "none", or a file's sha256."""
    return resolved.weights_id if resolved.weights.startswith("file:") else resolved.weights


def check_projection(projection: Projection, attrs_or_config: dict[str, Any] | Config) -> None:
    """Refuse (ConfigError, each differing key with both values) vectors made with another
    configuration than the one ``projection`` was fitted on."""
    fitted = fingerprint(projection.source)
    here = fingerprint(attrs_or_config)
    keys = [k for k in (*FINGERPRINT_KEYS, "seed") if k in fitted or k in here]
    diff = [
        f"{k}: {fitted.get(k)!r} (projection) vs {here.get(k)!r}"
        for k in keys
        if fitted.get(k) != here.get(k)
    ]
    if diff:
        name = projection.settings.get("file", "the projection")
        raise ConfigError(
            f"{name} was fitted on vectors of another configuration ("
            + "; ".join(diff)
            + "); extract with the same settings, or reduce anew"
        )


def _config_sha256(attrs: dict[str, Any]) -> str:
    return hashlib.sha256(str(attrs.get("config", "")).encode("utf-8", "surrogatepass")).hexdigest()


# ----------------------------------------------------------------------------- files


def _device(device: str | torch.device | None) -> torch.device:
    """The device by the extraction's own rules (``auto``: CUDA, then MPS, then CPU);
    ConfigError, one line, for a bad or unavailable one."""
    from .config import Config
    from .runtime import Dist, resolve_device

    return resolve_device(Config(device=str(device or "auto")), Dist())


def _sample_index(n: int, sample: int, seed: int) -> np.ndarray:
    """``sample`` distinct row numbers out of ``n``, sorted (h5py reads increasing indices)."""
    if sample >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False)).astype(
        np.int64
    )


def fit_projection(
    path: str | os.PathLike[str],
    *,
    dim: int,
    whiten: bool = False,
    power: float | None = None,
    l2: bool | None = None,
    sample: int | None = None,
    seed: int = 0,
    method: Literal["auto", "exact", "lowrank"] = "auto",
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> Projection:
    """Fit PCA (``whiten``: PCA-whitening) to ``dim`` dimensions on a seeded random sample of
    the rows of an spp-extract file.

    ``power``: signed power normalisation first (None: off); ``l2``: L2-normalise rows before
    centring and after the projection (None: on when whitening). ``sample``: rows to fit on
    (None: 100,000, at most about 2 GiB of float32, at most N). The sample is held in memory
    as float32 (sample x D x 4 bytes); it is read in sorted row blocks.
    """
    path = Path(path)
    l2 = whiten if l2 is None else l2
    power = 1.0 if power is None else float(power)
    if not (math.isfinite(power) and power > 0):
        raise ConfigError(f"power {power} is invalid; expected a number > 0 (0.5 is usual)")
    if seed < 0:
        raise ConfigError(f"seed {seed} is invalid; expected an integer >= 0")
    with open_output(path) as opened:
        attrs = opened.attrs
        if "reduce" in opened.file:
            raise ConfigError(
                f"'{path}' is already reduced (it has a reduce/ group); reduce the "
                "original file instead"
            )
        n, d = opened.rows, opened.dim
        rows = _sample_rows(path, n, d, dim, sample)
        target = _device(device)
        index = _sample_index(n, rows, seed)
        x, left_out = _read_sample(opened, index, target, power, l2, progress)
    if left_out:  # rows that are not finite are no data: the sample is the rest
        rows = x.shape[0]
        _check_rows(path, n, dim, rows, left_out)
    with seeded(seed, [target]):  # svd_lowrank draws its random test matrix from torch's RNG
        mean, components, variance = pca(x, dim, method=method, inplace=True)
    # the sample's total variance (x is centred now)
    total = sum(float(block.square().sum()) for block in _float64_rows(x)) / max(rows - 1, 1)
    del x
    scale = None
    rank = numerical_rank(variance, rows, d)
    if whiten:
        if float(variance[0]) <= 0:
            raise ConfigError(
                f"the {rows} sampled rows of {path.name} are all the same vector: there is no "
                "variance to whiten; reduce without --whiten or sample more rows"
            )
        # Axes at rounding level are noise: whitening would scale them by millions.
        components, variance = components[:rank], variance[:rank]
        scale = variance.double().rsqrt().float().cpu().numpy()
    settings = {
        "dim": int(components.shape[0]),
        "requested_dim": dim,
        "rank": rank,
        "whiten": whiten,
        "power": power,
        "l2": l2,
        "order": ORDER,
        "sample_rows": rows,
        "sample_non_finite": left_out,
        "seed": seed,
        "method": method,
        "source_file": path.name,
        "source_rows": n,
        "source_dim": d,
        "source_config_sha256": _config_sha256(attrs),
        "total_variance": total,
    }
    return Projection(
        mean.cpu().numpy(),
        components.cpu().numpy(),
        variance.cpu().numpy(),
        scale,
        power,
        l2,
        attrs,
        settings,
    )


def numerical_rank(variance: Tensor, rows: int, dim: int) -> int:
    """How many principal axes of a float32 sample carry more than rounding: singular values
    over ``s_max * max(rows, dim) * eps`` (the rule of ``numpy.linalg.matrix_rank``), with
    ``variance = s**2 / (rows - 1)``, largest first. At least 1."""
    if not len(variance) or float(variance[0]) <= 0:
        return 1
    tolerance = max(rows, dim) * torch.finfo(torch.float32).eps
    ratio = (variance.double() / float(variance[0])).clamp_min(0).sqrt()  # s / s_max
    return max(1, int((ratio > tolerance).sum()))


def _sample_rows(path: Path, n: int, d: int, dim: int, sample: int | None) -> int:
    """How many rows to fit on; ConfigError when ``dim`` or ``sample`` cannot work."""
    if sample is None:
        rows = min(n, SAMPLE_DEFAULT, max(2, SAMPLE_BYTES // (4 * max(d, 1))))
    elif sample < 2:
        raise ConfigError(f"sample {sample} is invalid; expected at least 2 rows")
    else:
        rows = min(n, sample)
    if not 1 <= dim <= d:
        raise ConfigError(
            f"dim {dim} is invalid for {path.name}: its vectors have {d} values; choose 1 to {d}"
        )
    _check_rows(path, n, dim, rows)
    return rows


def _check_rows(path: Path, n: int, dim: int, rows: int, left_out: int = 0) -> None:
    """``dim`` needs ``dim + 1`` rows in the sample (``left_out``: sampled rows that were not
    finite, so the sample is what is left)."""
    if dim > rows - 1:
        dropped = f", {left_out} sampled rows left out as not finite" if left_out else ""
        fix = f"lower {option('dim')}"
        if rows + left_out < n:
            fix += f" or raise {option('sample')}"
        raise ConfigError(
            f"dim {dim} needs at least {dim + 1} sampled rows, and the sample has {rows} (file "
            f"rows: {n}{dropped}); {fix}"
        )


def _read_sample(
    opened: OutputFile,
    index: np.ndarray,
    target: torch.device,
    power: float,
    l2: bool,
    progress: Progress | None,
) -> tuple[Tensor, int]:
    """Rows ``index`` (sorted) of the file, prepared (power, L2), as ``Tensor[n, D]`` float32
    on ``target``, read in sorted blocks; rows that are not finite are left out (n is the
    rest). Returns (the sample, how many were left out)."""
    rows, d = len(index), opened.dim
    x = torch.empty(rows, d, dtype=torch.float32, device=target)  # (sample, D)
    kept = 0
    step = block_rows_for(d, opened.features.dtype.itemsize)
    for positions, block in opened.read_rows(index, step):
        block = block[np.isfinite(block).all(axis=1)]
        x[kept : kept + len(block)] = prepare(torch.from_numpy(block).to(target), power, l2)
        kept += len(block)
        if progress is not None:
            progress(int(positions[-1]) + 1, rows)
    return x[:kept], rows - kept


def project_file(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    projection: Projection,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    block_rows: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Write ``dest``: a self-contained copy (``layout = "merged"``) of the spp-extract file
    ``source`` with ``features (N, dim)`` float32 projected by ``projection``, every other
    dataset and group (paths, sizes, failures) and the root attributes kept, and a
    ``reduce/`` group holding the projection. Written under a temporary name, then renamed.
    Returns the number of rows."""
    source, dest = Path(source), Path(dest)
    advice = "nothing was written; free space or choose another destination, then run again"
    with open_output(source) as opened:
        check_destinations([dest], [source], overwrite=overwrite)
        check_projection(projection, opened.attrs)
        target = _device(device)
        n, d = opened.rows, opened.dim
        if d != projection.input_dim:
            raise ConfigError(
                f"{source.name} has {d}-value vectors, the projection takes {projection.input_dim}"
            )
        step = block_rows or block_rows_for(d, opened.features.dtype.itemsize)
        chunk = max(1, min(max(n, 1), (1 << 20) // (4 * projection.dim)))
        with written_atomically(dest, advice) as fh, h5py.File(fh, "w") as out:
            target_ds = out.create_dataset(
                "features",
                shape=(n, projection.dim),
                maxshape=(None, projection.dim),
                dtype=np.float32,
                chunks=(chunk, projection.dim),
            )
            kept, left_out = 0, []  # rows that are not finite become failures
            with torch.inference_mode():
                for start in range(0, n, step):
                    block = opened.read(start, start + step)
                    finite = np.isfinite(block).all(axis=1)
                    left_out += (start + np.flatnonzero(~finite)).tolist()
                    x = torch.from_numpy(block[finite]).to(target)
                    target_ds[kept : kept + len(x)] = projection.apply(x).cpu().numpy()
                    kept += len(x)
                    fh.check()  # a write error or a signal's exception, at once
                    if progress is not None:
                        progress(start + len(block), n)
            target_ds.resize((kept, projection.dim))
            copy_as_merged(
                opened.file,
                out,
                skip=("features", "reduce"),
                failing=(np.asarray(left_out, np.int64), "non_finite", NON_FINITE),
            )
            _write_projection(out.create_group("reduce"), projection)
    return kept


def full_output(output: Path) -> Path:
    """Where ``extract --project`` keeps the full vectors: ``<output>.full.h5`` (a view over
    ``<output>.full.h5.shards/``), so that ``--resume`` works on it as on any run."""
    return output.with_name(output.name + ".full.h5")


def load_for_extract(
    project: Path, config: Config, output: Path, *, resume: bool, overwrite: bool
) -> Projection:
    """``extract --project``: the projection, checked against the run's configuration and
    output before anything is extracted (ConfigError otherwise)."""
    projection = Projection.load(project)
    check_projection(projection, config)
    if output.exists() and output.resolve() == project.resolve():
        raise ConfigError(f"'{output}' is the projection file itself; choose another output")
    if output.exists() and not output.is_dir():
        try:
            identify(output)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; refusing to replace it: move it away or choose another output"
            ) from None
        if not (resume or overwrite):
            raise ConfigError(
                f"output '{output}' already exists; pass {option('resume')} to continue "
                f"it or {option('overwrite')} to replace it"
            )
    return projection


def _write_projection(group: h5py.Group, projection: Projection) -> None:
    group.create_dataset("mean", data=projection.mean)
    group.create_dataset("components", data=projection.components)
    group.create_dataset("explained_variance", data=projection.explained_variance)
    if projection.scale is not None:
        group.create_dataset("scale", data=projection.scale)
    for key, value in projection.settings.items():
        if key != "file":
            group.attrs[key] = value


def reduce(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    dim: int,
    whiten: bool = False,
    power: float | None = None,
    l2: bool | None = None,
    sample: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    method: Literal["auto", "exact", "lowrank"] = "auto",
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> Projection:
    """Fit a projection on a sample of ``source`` (``fit_projection``) and write every row,
    projected, to ``dest`` (``project_file``). Everything is checked before anything is
    written; returns the projection."""
    source, dest = Path(source), Path(dest)
    with open_output(source):  # refused before the fit: a bad source or destination
        check_destinations([dest], [source], overwrite=overwrite)
    fitted = fit_projection(
        source,
        dim=dim,
        whiten=whiten,
        power=power,
        l2=l2,
        sample=sample,
        seed=seed,
        method=method,
        device=device,
        progress=progress,
    )
    project_file(source, dest, fitted, overwrite=overwrite, device=device, progress=progress)
    return fitted


# ----------------------------------------------------------------------------- neighbours

_LOW = (1 << 32) - 1


def _keys(sim: Tensor, rows: Tensor) -> Tensor:
    """Similarities (Tensor[q, m] float32) of database ``rows`` (int64, broadcastable) ->
    int64 keys whose order is (similarity descending, row ascending): the float's
    order-preserving bits above, ``2^32 - 1 - row`` below. ``topk`` on the keys gives exact,
    deterministic ties."""
    bits = (sim + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, one value for zero
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return (ordered << 32) | (_LOW - rows)


def _block_topk(sim: Tensor, first: int, k: int) -> Tensor:
    """Keys of the top-``k`` of one block (Tensor[q, m]; columns are rows ``first...``). A
    float ``topk`` first (cheap); rows where values equal to the k-th cross the cut (ties
    ``topk`` may break either way) are redone exactly on keys."""
    k = min(k, sim.shape[1])
    values, columns = sim.topk(k, dim=1)  # (q, k)
    keys = _keys(values, columns + first)
    crowded = ((sim >= values[:, -1:]).sum(1) > k).nonzero().flatten()
    if len(crowded):
        every = torch.arange(first, first + sim.shape[1], device=sim.device, dtype=torch.int64)
        keys[crowded] = _keys(sim[crowded], every).topk(k, dim=1).values
    return keys


def _unkey(keys: Tensor) -> tuple[Tensor, Tensor]:
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return _LOW - (keys & _LOW), bits.view(torch.float32)


def topk_cosine(
    queries: Tensor,
    first_query: int,
    database: Iterator[tuple[int, Tensor, Tensor]],
    k: int,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` database rows by dot product for each query row (all rows L2-normalised, so
    the dot is the cosine). ``queries``: Tensor[q, D], rows ``first_query...`` of the same
    database (a row never matches itself); ``database``: (first row, Tensor[m, D], left out
    Tensor[m] bool) blocks; rows left out are never anyone's neighbour. Returns (index
    Tensor[q, k] int64, similarity Tensor[q, k] float32), similarity descending, equal
    similarities by lower row first."""
    q = queries.shape[0]
    best = torch.full(
        (q, k), torch.iinfo(torch.int64).min, dtype=torch.int64, device=queries.device
    )
    own = torch.arange(q, device=queries.device)
    for first, block, left_out in database:
        sim = queries @ block.T  # (q, m)
        column = own + first_query - first  # where each query's own row is in this block
        mine = (column >= 0) & (column < block.shape[0])
        sim[own[mine], column[mine]] = -math.inf
        sim[:, left_out] = -math.inf
        best = torch.cat([best, _block_topk(sim, first, k)], 1).topk(k, dim=1).values  # (q, k)
    return _unkey(best)


@dataclass
class Neighbors:
    index: np.ndarray  # (N, k) int64 row numbers; -1 for the rows left out
    similarity: np.ndarray  # (N, k) float32, descending; 0 for the rows left out
    # rows whose vectors are not finite: in no list, and with no list of their own
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    excluded_paths: list[str] = field(default_factory=list)


def neighbors(
    path: str | os.PathLike[str],
    k: int,
    *,
    device: str | torch.device | None = None,
    block_rows: int | None = None,
    memory_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> Neighbors:
    """Exact cosine top-``k`` of every row of an spp-extract file among the other rows.

    Rows are L2-normalised; a zero row has similarity 0 with everything. Query blocks against
    database blocks with a running top-k: memory is a few blocks (``block_rows``, default
    about 256 MiB of float32 and at most 4,096 rows), plus the normalised database itself when
    it fits ``memory_bytes`` (otherwise it is read again for each query block)."""
    with open_output(path) as opened:
        return search(
            opened,
            k,
            device=device,
            block_rows=block_rows,
            memory_bytes=memory_bytes,
            progress=progress,
        )


def search(
    opened: OutputFile,
    k: int,
    *,
    device: str | torch.device | None = None,
    block_rows: int | None = None,
    memory_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> Neighbors:
    """``neighbors`` of an open file."""
    path, target = opened.path, _device(device)
    n, d = opened.rows, opened.dim
    step = block_rows or min(4096, block_rows_for(d, 4))

    def read(start: int) -> tuple[int, Tensor, Tensor]:
        block = opened.read(start, start + step)
        left_out = ~np.isfinite(block).all(axis=1)
        x = torch.from_numpy(block).to(target).float()
        x[torch.from_numpy(left_out).to(target)] = 0.0
        return start, l2_normalize(x), torch.from_numpy(left_out).to(target)

    starts = range(0, n, step)
    if n * d * 4 <= memory_bytes:
        cache = [read(s) for s in starts]
        left_out = [b[2].cpu().numpy() for b in cache]
    else:
        cache = None
        left_out = [~np.isfinite(opened.read(s, s + step)).all(axis=1) for s in starts]
    excluded = np.flatnonzero(np.concatenate(left_out)) if n else np.zeros(0, np.int64)
    usable = n - len(excluded)
    if not 1 <= k <= usable - 1:
        not_finite = f" ({len(excluded)} of {n} rows are not finite)" if len(excluded) else ""
        raise ConfigError(
            f"k {k} is invalid for {path.name}: it has {usable} usable rows{not_finite}, so "
            f"each has at most {max(usable - 1, 0)} neighbours; choose k from 1 to "
            f"{max(usable - 1, 0)}"
            if usable > 1
            else f"{path.name} has {usable} usable rows{not_finite}: nothing to compare"
        )

    def database() -> Iterator[tuple[int, Tensor, Tensor]]:
        return iter(cache) if cache is not None else (read(s) for s in starts)

    index = np.empty((n, k), np.int64)
    similarity = np.empty((n, k), np.float32)
    with torch.inference_mode():
        for first, queries, _ in database():
            rows, sims = topk_cosine(queries, first, database(), k)
            index[first : first + len(queries)] = rows.cpu().numpy()
            similarity[first : first + len(queries)] = sims.cpu().numpy()
            if progress is not None:
                progress(first + len(queries), n)
    index[excluded], similarity[excluded] = -1, 0.0  # no list for a row that is not finite
    paths = opened.file["paths"].asstr()
    return Neighbors(index, similarity, excluded, list(paths[excluded]) if len(excluded) else [])


def pairs_above(found: Neighbors, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unordered pairs (i < j) where one row has the other among its k neighbours with
    similarity >= ``threshold``, each once, sorted by (i, j); the similarity is the one seen
    from row i when i lists j (else from j). Returns (i, j, similarity)."""
    n, k = found.index.shape
    a = np.repeat(np.arange(n, dtype=np.int64), k)
    b = found.index.ravel()
    s = found.similarity.ravel()
    keep = (s >= threshold) & (b >= 0)  # -1: a row left out has no list
    a, b, s = a[keep], b[keep], s[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((a != lo, hi, lo))  # by (lo, hi), the lower row's own view first
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], s[first]


def find_neighbors(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None,
    k: int,
    *,
    pairs: str | os.PathLike[str] | None = None,
    threshold: float = 0.95,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> Neighbors:
    """``neighbors`` of ``source`` written to ``dest`` (``neighbors/index``,
    ``neighbors/similarity``, the source's ``paths`` and ``path_bytes``) and, with ``pairs``,
    the near-duplicate pairs (``pairs_above(threshold)``) as CSV ``path_a,path_b,similarity``."""
    source = Path(source)
    if dest is None and pairs is None:
        raise ConfigError(f"nothing to write; give {option('output')} and/or {option('pairs')}")
    if not (math.isfinite(threshold) and -1 <= threshold <= 1):
        raise ConfigError(f"threshold {threshold} is invalid; expected a cosine from -1 to 1")
    with open_output(source) as opened:
        src = opened.file
        outputs = [Path(out) for out in (dest, pairs) if out is not None]
        check_destinations(outputs, [source], overwrite=overwrite)
        found = search(opened, k, device=device, progress=progress)
        if dest is not None:
            dest = Path(dest)
            advice = "nothing was written; free space or choose another destination, then run again"
            with (
                written_atomically(dest, advice) as fh,
                h5py.File(fh, "w") as out,
            ):
                group = out.create_group("neighbors")
                group.create_dataset("index", data=found.index)
                group.create_dataset("similarity", data=found.similarity)
                group.create_dataset("excluded", data=found.excluded, dtype=np.int64)
                for name in ("paths", "path_bytes"):
                    src.copy(src[name], out, name=name)
                out.attrs.update(
                    k=k,
                    metric="cosine",
                    source_file=source.name,
                    ties="equal similarities: lower row first",
                    config=str(src.attrs.get("config", "")),
                )
        if pairs is not None:
            lo, hi, sims = pairs_above(found, threshold)
            paths = src["paths"].asstr()
            needed = np.unique(np.concatenate([lo, hi]))
            names = dict(zip(needed.tolist(), (paths[needed] if len(needed) else []), strict=True))
            _write_csv(
                Path(pairs),
                [
                    (printable(names[i]), printable(names[j]), f"{s:.6f}")
                    for i, j, s in zip(lo.tolist(), hi.tolist(), sims.tolist(), strict=True)
                ],
            )
    return found


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    advice = "the pairs were not written; free space or choose another file, then run again"
    with (
        written_atomically(path, advice) as fh,
        io.TextIOWrapper(fh, encoding="utf-8", newline="") as text,
    ):
        writer = csv.writer(text)
        writer.writerow(["path_a", "path_b", "similarity"])
        writer.writerows(rows)
