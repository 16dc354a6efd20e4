"""What decides a corpus build (``BuildConfig``) and the checks on it made before any file is touched."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scpretrain.sharding import zarr_store
from scpretrain.sharding.errors import InputError
from scpretrain.sharding.obs import FIXED_COLUMNS
from scpretrain.sharding.validate import parse_holdout, parse_matrix

FORMATS = ("zarr", "soma", "both")


@dataclass
class BuildConfig:
    """Everything that decides a corpus; all but out, overwrite, progress and jobs enter the resume
    fingerprint."""

    sources: list[str]
    out: Path
    vocab: Path | None = None
    format: str = "zarr"
    cells_per_shard: int = 16_384
    keep_obs: list[str] = field(default_factory=list)
    label_key: str | None = None
    dataset_key: str | None = None
    matrix: str | None = None
    min_genes: int = 1
    holdout: str | None = None
    codec: str = "blosc-lz4"
    x_dtype: str = "auto"
    seed: int = 0
    min_coverage: float = 0.5
    allow_non_integer: bool = False
    jobs: int = 1  # phase-1 tasks and phase-2 worker processes; 0: auto (see pass2_jobs); same corpus for any
    census_uri: str | None = None
    census_version: str | None = None
    census_filter: str | None = None
    block_rows: int = 8192
    spool_bytes: int = 256 << 20
    overwrite: bool = False
    progress: bool | None = None  # None: tqdm decides (shown on a terminal)


def check_config(cfg: BuildConfig) -> None:
    if not cfg.sources:
        raise InputError("no --source given; pass --source PATH.h5ad or --source synthetic://cells=1000")
    if cfg.format not in FORMATS:
        raise InputError(f"--format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    if cfg.cells_per_shard < 1 or cfg.min_genes < 0 or cfg.block_rows < 1 or cfg.jobs < 0:
        raise InputError("--cells-per-shard must be >= 1, --min-genes >= 0 and --jobs >= 0")
    if not 0.0 <= cfg.min_coverage <= 1.0:
        raise InputError(f"--min-coverage {cfg.min_coverage}: must be between 0 and 1")
    zarr_store.make_codec(cfg.codec)
    zarr_store.check_x_dtype(cfg.x_dtype)
    parse_matrix(cfg.matrix)
    parse_holdout(cfg.holdout)


def keep_columns(cfg: BuildConfig) -> list[str]:
    return [c for c in dict.fromkeys(cfg.keep_obs) if c not in FIXED_COLUMNS]


def config_to_dict(cfg: BuildConfig) -> dict:
    """The config as JSON-ready values (paths as strings), for a distributed build's plan."""
    from dataclasses import asdict

    d = asdict(cfg)
    d["out"] = str(cfg.out)
    d["vocab"] = None if cfg.vocab is None else str(cfg.vocab)
    return d


def config_from_dict(d: dict) -> BuildConfig:
    vocab = d.get("vocab")
    return BuildConfig(**{**d, "out": Path(d["out"]), "vocab": None if vocab is None else Path(vocab)})
