"""Run tracking: metrics.jsonl + MLflow (``tracking.mlflow``, default on), on rank 0 only."""
from __future__ import annotations

import json
from pathlib import Path

from scpretrain.sharding.manifest import redact
from scpretrain.train.config import RunConfig, to_flat


def keep_mlflow_out(cfg: RunConfig) -> None:
    """With ``tracking.mlflow=false`` mlflow is never imported: DeepSpeed's autotuner imports it at
    ``import deepspeed`` whenever it is installed, so it is marked absent before DeepSpeed loads."""
    import sys

    if not cfg.tracking.mlflow and "deepspeed" not in sys.modules:
        sys.modules.setdefault("mlflow", None)


def default_tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.mlflow_uri or f"sqlite:///{(Path(cfg.out_dir).resolve().parent / 'mlflow.db')}"


def _experiment(mlflow, cfg: RunConfig) -> None:
    """Select the experiment; a new one stores artifacts beside the local store, not in the CWD."""
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        loc = None
        if cfg.tracking.mlflow_uri is None:
            loc = (Path(cfg.out_dir).resolve().parent / "mlartifacts").as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=loc)
    mlflow.set_experiment(cfg.tracking.experiment)


class Tracker:
    """Writes ``metrics.jsonl`` and logs to MLflow. Inactive (no-op) on ranks other than 0."""

    def __init__(self, cfg: RunConfig, rank: int, run_id: str | None = None, resume_step: int = 0):
        self.active = rank == 0
        self.cfg = cfg
        self.run_id = run_id
        self.mlflow = None
        if not self.active:
            return
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        _truncate_after(self.metrics_path, resume_step)  # steps after the checkpoint are redone
        self._file = open(self.metrics_path, "a")
        if not cfg.tracking.mlflow:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(default_tracking_uri(cfg))
        _experiment(mlflow, cfg)
        sysm = cfg.tracking.system_metrics
        run = (mlflow.start_run(run_id=run_id, log_system_metrics=sysm) if run_id
               else mlflow.start_run(run_name=cfg.name, log_system_metrics=sysm))
        self.run_id = run.info.run_id
        if not run_id:
            params = {k: redact(str(v)) for k, v in to_flat(cfg).items()}
            mlflow.log_params(params)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def params(self, params: dict) -> None:
        """Extra run parameters (MLflow); logged once, on a fresh run."""
        if self.active and self.mlflow is not None:
            try:
                self.mlflow.log_params({k: redact(str(v)) for k, v in params.items()})
            except Exception as e:  # noqa: BLE001 - MLflow refuses changed values of a resumed run's params
                print(f"[train] MLflow params not logged ({type(e).__name__}); they are in the run directory")

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        if self.active and self.mlflow is not None and Path(path).exists():
            if Path(path).is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path=subdir)
            else:
                self.mlflow.log_artifact(str(path), artifact_path=subdir)

    def close(self, status: str = "FINISHED") -> None:
        if self.active:
            self._file.close()
            if self.mlflow is not None:
                self.mlflow.end_run(status=status)


def _truncate_after(path: Path, step: int) -> None:
    """Keep only metric lines up to ``step`` (a resumed run re-logs the steps after its checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def plot_loss(metrics_path: Path, out_png: Path, title: str) -> Path | None:
    rows = [r for r in (json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
