"""Reductions of spp-extract files: a ``Projection`` (power -> L2 -> centre -> project ->
whiten -> L2, the retrieval practice for MAC/SPoC/R-MAC/GeM descriptors) fitted on a sample
(``fit_projection``), stored in a file's ``reduce/`` group, checked against the vectors it is
given (their ``Provenance``), and applied to every row of a file (``project_file``;
``reduce`` does both). Everything is read in row blocks: memory depends on the block size,
the sample and the output dimension, never on the number of rows.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from torch import Tensor

from .config import Config
from .devices import device_named
from .errors import ConfigError, option
from .outputs import OutputFile, identify, open_output
from .pca import _float64_rows, l2_normalize, numerical_rank, pca, preprocess
from .provenance import Provenance, plain
from .reader import block_rows_for
from .records import Progress
from .rng import seeded
from .storage import check_destinations, copy_as_merged, written_atomically

ORDER = "power -> l2 -> centre -> project -> whiten -> l2"
NON_FINITE = (
    "the stored vector holds NaN or inf (or projects beyond float32); it is left out of "
    "reductions and neighbours"
)
_ARRAYS = ("mean", "components", "explained_variance", "scale")
SAMPLE_DEFAULT = 100_000
SAMPLE_BYTES = 2 << 30  # the default sample is capped to about this much float32


@dataclass(frozen=True)
class Projection:
    """A fitted reduction: ``power -> L2 -> centre -> project -> whiten -> L2``.

    ``Projection.load("small.h5")(vectors)`` applies it to new vectors (ndarray or Tensor
    ``[n, D]`` or ``[D]``) and returns float32 ``ndarray[n, dim]`` (or ``[dim]``).
    """

    mean: np.ndarray  # (D,) float32
    components: np.ndarray  # (dim, D) float32, orthonormal rows
    explained_variance: np.ndarray  # (dim,) float64, on the (pre-processed) sample
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

    def _apply(self, x: Tensor) -> Tensor:
        """Tensor[n, D] -> Tensor[n, dim] float32, on ``x``'s device."""
        device = x.device
        mean = torch.from_numpy(self.mean).to(device)
        components = torch.from_numpy(self.components).to(device)
        y = (preprocess(x, self.power, self.l2) - mean) @ components.T  # (n, dim)
        if self.scale is not None:
            y = y * torch.from_numpy(self.scale).to(device)
        return l2_normalize(y) if self.l2 else y

    def __call__(self, vectors: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Vectors ``[n, D]`` or ``[D]`` -> float32 ``[n, dim]`` or ``[dim]``, of the same kind:
        an ndarray gives an ndarray, a Tensor a Tensor (on its device). ValueError for vectors
        of another length, or holding NaN or inf."""
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
            y = self._apply(x)
        beyond = (~torch.isfinite(y).all(dim=1)).nonzero().flatten().tolist()
        if beyond:
            raise ValueError(
                f"{len(beyond)} vectors project beyond float32 (rows {beyond[:5]}): their "
                "values are far larger than the ones the projection was fitted on"
            )
        y = y if isinstance(vectors, Tensor) else y.cpu().numpy()
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
            settings = {k: plain(v) for k, v in group.attrs.items()} | {"file": str(path)}
            arrays = {name: group[name][:] for name in group if name in _ARRAYS}
        for name, values in arrays.items():  # (shapes and types: outputs.validate)
            if not np.isfinite(values).all() or (name == "scale" and (values <= 0).any()):
                raise ConfigError(
                    f"'{path}' is not a well-formed spp-extract file: reduce/{name} holds "
                    f"{'values <= 0' if np.isfinite(values).all() else 'NaN or inf'}"
                )
        return cls(
            mean=arrays["mean"].astype(np.float32),
            components=arrays["components"].astype(np.float32),
            explained_variance=arrays["explained_variance"].astype(np.float64),
            scale=arrays["scale"].astype(np.float32) if "scale" in arrays else None,
            power=float(settings["power"]),
            l2=bool(settings["l2"]),
            source=attrs,
            settings=settings,
        )


def check_projection(projection: Projection, provenance: Provenance) -> None:
    """Refuse (ConfigError, each differing key with both values) vectors made otherwise than
    the ones ``projection`` was fitted on (dtype and precision may differ: rounding only)."""
    fitted = Provenance.of_attrs(projection.source).projection_values()
    here = provenance.projection_values()
    diff = [
        f"{k}: {fitted.get(k)!r} (projection) vs {here.get(k)!r}"
        for k in {**fitted, **here}
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
        target = device_named(device)
        index = _sample_index(n, rows, seed)
        x, left_out = _read_sample(opened, index, target, power, l2, progress)
    if left_out:  # rows that are not finite are no data: the sample is the rest
        rows = x.shape[0]
        _check_rows(path, n, dim, rows, left_out)
    # PCA is scale-equivariant: a sample of huge values (a broken weights file) is fitted
    # scaled down, so that float32 sums and the SVD do not overflow.
    peak = float(x.abs().max()) if x.numel() else 0.0
    factor = peak if peak > 1e15 else 1.0
    if factor != 1.0:
        x /= factor
    with seeded(seed, [target]):  # svd_lowrank draws its random test matrix from torch's RNG
        mean, components, variance = pca(x, dim, method=method, inplace=True)
    mean, variance = mean * factor, variance * factor**2
    # the sample's total variance (x is centred now)
    total = sum(float(block.square().sum()) for block in _float64_rows(x)) / max(rows - 1, 1)
    total *= factor**2
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
        scale = variance.rsqrt().float().cpu().numpy()
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
        x[kept : kept + len(block)] = preprocess(torch.from_numpy(block).to(target), power, l2)
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
        check_destinations([dest], [source], overwrite=overwrite, folders=opened.folders)
        check_projection(projection, Provenance.of_attrs(opened.attrs))
        target = device_named(device)
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
                    usable = np.isfinite(block).all(axis=1)  # (rows,)
                    x = torch.from_numpy(block[usable]).to(target)
                    y = projection._apply(x).cpu().numpy()  # (usable rows, dim)
                    fits = np.isfinite(y).all(axis=1)  # within float32 once projected
                    usable[np.flatnonzero(usable)[~fits]] = False
                    left_out += (start + np.flatnonzero(~usable)).tolist()
                    target_ds[kept : kept + int(fits.sum())] = y[fits]
                    kept += int(fits.sum())
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


def load_for_extract(project: Path, config: Config, output: Path, mode: str) -> Projection:
    """``extract(..., project=...)``: the projection, checked against the run's configuration
    and output before anything is extracted (ConfigError otherwise)."""
    from .backbones import provenance_of

    projection = Projection.load(project)
    check_projection(projection, provenance_of(config))
    check_destinations([output, full_output(output)], [project], overwrite=True)
    if output.exists():
        try:
            identify(output)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; refusing to replace it: move it away or choose another output"
            ) from None
        if mode == "new":
            raise ConfigError(
                f"output '{output}' already exists; pass {option('mode', 'resume')} to "
                f"continue it or {option('mode', 'overwrite')} to replace it"
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
    with open_output(source) as opened:  # refused before the fit: a bad source or destination
        check_destinations([dest], [source], overwrite=overwrite, folders=opened.folders)
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
