"""One typed config tree: dataclasses, loaded from YAML, overridden by ``key=value`` arguments.

Unknown keys and wrong types fail with the key's dotted name. The resolved tree is saved with
every run and logged as MLflow params.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    pass


@dataclass
class MixEntry:
    corpus: str
    weight: float = 1.0


@dataclass
class DataConfig:
    corpus: str = "demo_out/corpus"
    # other corpora mixed into every batch (data_loader.MixedLoader): each batch holds
    # weight / (data.weight + sum of weights) of its cells from that corpus; data.corpus is the
    # primary (its epoch is the run's epoch, its held-out cells are the eval set)
    mix: list[MixEntry] = field(default_factory=list)
    weight: float = 1.0
    backend: str = "zarr"  # zarr | soma
    batch_size: int = 64  # cells per micro-batch per rank
    num_workers: int = 0
    block_size: int | None = None  # None: 1,024 rows on our pre-shuffled corpora, 256 on other SOMA
    window_batches: int = 8
    read_ahead: int = 2
    soma_filter: str | None = None
    split: str | None = "train"  # cells of this split only (corpora built with --holdout); null = all
    # SOMA backend: MiB of loader memory to plan for (TileDB buffers, query size, windows in flight); null = 512
    soma_memory_budget: int | None = None


@dataclass
class ModelConfig:
    family: str = "mae"  # mae | performer
    preset: str | None = None  # a file in configs/model/ (without .yaml), applied before params
    params: dict[str, Any] = field(default_factory=dict)  # hyperparameters (n_genes comes from the corpus)
    gene_embedding: str | None = None  # Performer: gene2vec file (.npy + .genes.txt, or word2vec text)
    gene_embedding_genes: str | None = None  # gene list of a .npy embedding (default: <stem>.genes.txt)
    # A file width other than params.dim: "random" projects it once by a fixed seeded matrix,
    # "learned" keeps the full width and trains a Linear(width -> dim) (GenePT-style text embeddings).
    gene_embedding_projection: str = "random"
    # Performer: recompute each layer's activations in the backward pass instead of keeping them
    # (scbert_base at 16,907 positions: a larger batch per GPU for ~1/3 more compute)
    checkpoint_layers: bool = False
    # An export (ours, or published weights imported with `python -m train import-weights`) to start from: its
    # architecture, every gene-independent tensor and the rows of the genes the corpus shares with it; the
    # corpus's other genes start as they would without it. A resumed run loads its checkpoint instead.
    init_from: str | None = None


@dataclass
class ObjectiveConfig:
    # auto: random_mask (mae) or masked_bins (performer). MAE: random_mask | gene_programme |
    # isolated | byol | barlow. Performer: masked_bins.
    kind: str = "auto"
    # default: 0.5 (random_mask), 0.15 (masked_bins), 0.2 (byol/barlow: masking of each view)
    mask_prob: float | None = None
    keep_prob: float = 0.1  # Performer: share of masked positions left unchanged instead of [MASK]
    # The MAE reference divided the masked-entry loss by all entries; True restores that.
    reference_loss_divisor: bool = False
    gmt: str | None = None  # gene_programme / isolated: gene sets (name<TAB>description<TAB>gene...)
    programme_mask_rate: float = 0.25  # gene_programme: share of programmes masked per batch
    nb_dispersion: float = 10.0  # byol/barlow: NB noise inverse dispersion theta (var = mu + mu^2/theta); 0: off
    ema_decay: float = 0.99  # byol: target <- decay * target + (1 - decay) * online, after each optimizer step
    lambda_barlow: float = 0.0051  # barlow: weight of the off-diagonal cross-correlation terms
    proj_hidden: int = 512  # byol/barlow projector hidden width (and BYOL predictor's)
    proj_dim: int = 128  # byol/barlow projection width


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class EngineConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    precision: str = "auto"  # auto (bf16 on GPUs that support it, fp32 on CPU) | fp32 | bf16
    grad_accum: int = 1


@dataclass
class CheckpointConfig:
    every_steps: int = 50
    every_minutes: float | None = None  # also save when this much wall time passed since the last save
    keep: int = 3
    resume: str = "auto"  # auto: newest complete checkpoint | never: refuse if checkpoints exist
    allow_fresh_start: bool = False  # start from step 0 although checkpoints exist
    allow_new_corpus: bool = False  # resume the weights on another corpus (its stream starts at its first cell)
    # on these signals every rank finishes its step, the step is checkpointed and the run exits 75 (train/preempt.py)
    save_on_signal: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class TrackingConfig:
    mlflow: bool = True  # false: metrics.jsonl and the loss plot only; mlflow is never imported
    mlflow_uri: str | None = None  # default: sqlite store in <out_dir>/../mlflow.db
    experiment: str = "scpretrain"
    log_every: int = 5
    progress: bool = True
    system_metrics: bool = True  # MLflow's CPU/GPU/memory sampling (rank 0)
    eval_every: int = 0  # held-out metrics every N steps (corpora built with --holdout); 0 = at the end only
    eval_batches: int = 4  # held-out batches per rank per evaluation (the same cells every time)
    # every rank appends the global cell ids of each step to <run_dir>/cells/rank-<r>.jsonl
    # (trace a loss spike to its cells; audit exactly-once across restarts and world-size changes)
    trace_cells: bool = False


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "demo_out/runs"
    max_steps: int = 100  # the schedule's length
    stop_at_step: int | None = None  # end this launch early (checkpointed, resumable): preemption drills
    seed: int = 0
    export_dir: str | None = None  # where the export goes at the end (default: <out_dir>/<name>/export)
    export: bool = True  # false: no export (benchmarks, drills)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def export_path(self) -> Path | None:
        """Where the run's export goes: ``export_dir``, else inside the run's own directory; None with export=false.

        A run never writes outside ``out_dir`` unless a path is given (a copied config cannot
        overwrite another run's export)."""
        if not self.export:
            return None
        return Path(self.export_dir) if self.export_dir else self.run_dir / "export"


def _check(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errs = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, arm, key)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(f"{key}: expected {tp}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp)
        return [_check(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.match(value):  # YAML 1.1 reads 1e-3 as text
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``d``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in d.items()}
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    d[parts[-1]] = value


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def _parse_value(text: str) -> Any:
    """YAML scalar, plus the floats YAML 1.1 reads as strings (``3e-4``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) + ``key.sub=value`` overrides (values parsed as YAML) -> RunConfig.

    ``corpus=DIR`` is a shortcut for ``data.corpus=DIR``.
    """
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value (e.g. optim.lr=3e-4)")
        k, v = ov.split("=", 1)
        k = {"corpus": "data.corpus"}.get(k, k)
        _set_dotted(raw, k, _parse_value(v))
    return validate(from_dict(RunConfig, raw))


def validate(cfg: RunConfig) -> RunConfig:
    """Values that type-check but cannot work, refused with the key and the fix."""
    import signal

    c = cfg.checkpoint
    checks = [
        (c.keep >= 1, f"checkpoint.keep: {c.keep} would delete every checkpoint; set 1 or more (default 3)"),
        (c.resume in ("auto", "never"), f"checkpoint.resume: {c.resume!r} is not 'auto' (resume from the newest "
                                        "committed checkpoint) or 'never' (refuse when checkpoints exist)"),
        (c.every_steps >= 1, f"checkpoint.every_steps: {c.every_steps}; set 1 or more (a save every N steps)"),
        (c.every_minutes is None or c.every_minutes > 0,
         f"checkpoint.every_minutes: {c.every_minutes}; set a positive number of minutes, or null for none"),
        (cfg.max_steps >= 1, f"max_steps: {cfg.max_steps}; set 1 or more"),
        (cfg.data.batch_size >= 1, f"data.batch_size: {cfg.data.batch_size}; set 1 or more cells per rank"),
        (cfg.engine.grad_accum >= 1, f"engine.grad_accum: {cfg.engine.grad_accum}; set 1 or more"),
    ]
    checks.append((not cfg.model.checkpoint_layers or cfg.model.family == "performer",
                   "model.checkpoint_layers: only the performer family checkpoints its layers (the MAE's "
                   "activations are a few vectors per cell); remove it"))
    checks.append((cfg.model.params.get("decoder", True) is not False,
                   "model.params.decoder: false builds an encoder-only MAE, which cannot pretrain (nothing "
                   "reconstructs); remove it"))
    out = cfg.export_path
    checks.append((out is None or not out.is_dir() or not any(out.iterdir()) or (out / "config.json").is_file(),
                   f"export_dir: {out} exists and is not an export (no config.json); the export replaces it as a "
                   "whole: pass a new or empty folder, or export=false"))
    for name in c.save_on_signal:
        checks.append((isinstance(getattr(signal, str(name), None), signal.Signals),
                       f"checkpoint.save_on_signal: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def resolve_model_params(cfg: ModelConfig) -> dict:
    """Preset file (configs/model/<preset>.yaml) merged with ``params``; family checked."""
    params: dict = {}
    if cfg.preset:
        p = REPO / "configs" / "model" / f"{cfg.preset}.yaml"
        if not p.exists():
            raise ConfigError(f"model.preset: {cfg.preset!r} not found ({p})")
        preset = yaml.safe_load(p.read_text())
        if preset.get("family") != cfg.family:
            raise ConfigError(f"model.preset: {p.name} is family {preset.get('family')!r}, not {cfg.family!r}")
        params.update(preset.get("params", {}))
    params.update(cfg.params)
    return params


def to_flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten for MLflow params."""
    out: dict[str, Any] = {}
    items = dataclasses.asdict(cfg).items() if dataclasses.is_dataclass(cfg) else cfg.items()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(to_flat(v, key + "."))
        else:
            out[key] = v
    return out
