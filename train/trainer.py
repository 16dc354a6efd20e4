"""The pretraining loop. Run under torchrun (or the deepspeed launcher / SLURM via ``launch``)::

    torchrun --nproc-per-node 2 -m train pretrain --config configs/pretrain/demo_mae.yaml
    python -m train pretrain --config configs/pretrain/demo_mae.yaml   # one process, CPU
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from scpretrain.data_loader import MixedLoader, StreamingLoader, model_inputs
from scpretrain.scmodels.build import build_model, default_preprocessing, hparams_of
from scpretrain.scmodels.preprocess import PreprocessSpec
from scpretrain.sharding.manifest import read_manifest, read_vocab, redact_tree, vocab_sha256
from scpretrain.train import checkpoint, comm, faults, objectives
from scpretrain.train.config import RunConfig, resolve_model_params
from scpretrain.train.engine import build_engine, forward_view
from scpretrain.train.export import export_module, write_export
from scpretrain.train.preempt import EXIT_PREEMPTED, SignalWatch
from scpretrain.train.tracking import Tracker, keep_mlflow_out, plot_loss


def build_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun/deepspeed/SLURM set up (or a world of one)."""
    import deepspeed

    cuda = torch.cuda.is_available()
    for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(var, default)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        _init_process_group(backend)
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def _init_process_group(backend: str) -> None:
    """Under torchrun, key every attempt's rendezvous data by its restart count.

    torchrun keeps one store across ``--max-restarts``; process groups created after a restart
    (DeepSpeed's ZeRO groups) otherwise read the dead attempt's addresses and fail to connect.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from datetime import timedelta

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(minutes=10))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"scpretrain/attempt{attempt}", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group(backend)


def build_model_for(cfg: RunConfig, n_genes: int, vocab: list[tuple[str, str]] | None = None) -> torch.nn.Module:
    """The training module: the family's model (gene embedding loaded from ``model.gene_embedding``,
    aligned to ``vocab`` or the corpus's vocab.tsv), wrapped with contrastive heads for byol/barlow.
    Identical on every rank (seeded)."""
    params = resolve_model_params(cfg.model)
    start = None
    if cfg.model.init_from:
        from scpretrain.train.init_from import init_params

        params, start = init_params(cfg.model.init_from, cfg.model.family, params, cfg.model.params)
    params["n_genes"] = n_genes
    kind = objectives.resolve_kind(cfg.model.family, cfg.objective.kind)
    emb = None
    if cfg.model.gene_embedding:
        from scpretrain.train.gene_embedding import gene_embedding_for

        emb = gene_embedding_for(cfg.model, params, vocab if vocab is not None else cfg.data.corpus, cfg.seed,
                                 verbose=int(os.environ.get("RANK", "0")) == 0)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.family, params)
    if emb is not None:
        model.load_gene_embedding(emb)
    report = None
    if start is not None:
        from scpretrain.train.init_from import init_from_export

        report = init_from_export(model, start, vocab if vocab is not None else read_vocab(Path(cfg.data.corpus)))
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[train] model.init_from {start.path}: {report['genes_shared']:,} of the corpus's "
                  f"{report['corpus_genes']:,} genes ({report['coverage']:.1%}) take the export's weights; "
                  f"fresh: {', '.join(report['fresh_tensors']) or 'nothing else'}", flush=True)
    if cfg.model.checkpoint_layers:
        model.checkpoint_layers = True
    if kind in objectives.CONTRASTIVE:
        from scpretrain.train.contrastive import ContrastiveConfig, ContrastiveMAE

        o = cfg.objective
        model = ContrastiveMAE(model, ContrastiveConfig(method=kind, proj_hidden=o.proj_hidden, proj_dim=o.proj_dim,
                                                        pred_hidden=o.proj_hidden, ema_decay=o.ema_decay))
    model.init_report = report  # what model.init_from copied (None without it): recorded with the run
    return model


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


class _CellTrace:
    """``tracking.trace_cells``: one line per step and rank, {"step", "epoch", "world_size", "start",
    "cell_ids"}; ``start`` is the step this attempt began at, so after a restart the lines of the newest
    attempt that reached a step are the ones that count."""

    def __init__(self, run_dir: Path, rank: int, world: int, start: int):
        d = run_dir / "cells"
        d.mkdir(parents=True, exist_ok=True)
        self.f = open(d / f"rank-{rank}.jsonl", "a")
        self.world, self.start = world, start

    def add(self, step: int, batch: dict) -> None:
        self.f.write(json.dumps({"step": step, "epoch": int(batch["epoch"]), "world_size": self.world,
                                 "start": self.start, "cell_ids": batch["cell_id"].tolist()}) + "\n")
        self.f.flush()


class Batches:
    """Endless batches across epochs, timing the wait for each (data stall)."""

    def __init__(self, loader: StreamingLoader):
        self.loader, self.it, self.wait = loader, None, 0.0

    def next(self) -> dict:
        t = time.perf_counter()
        while True:
            if self.it is None:
                self.it = iter(self.loader)
            try:
                b = next(self.it)
                break
            except StopIteration:
                self.it = None
        self.wait += time.perf_counter() - t
        return b


def train_step(engine: Any, objective: objectives.Objective, inputs: dict,
               gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The run's objective (``objectives.build_objective``) on one micro-batch. After ``engine.step()`` call
    ``objectives.after_step(engine)`` (moves the BYOL target)."""
    return objective.loss(engine, inputs, gen)


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of the exported module on every rank (ZeRO-3 parameters gathered).

    For contrastive objectives only the MAE backbone is exported (projector/predictor/target are
    training-only)."""
    def grab() -> dict[str, torch.Tensor]:
        sd = export_module(engine.module).state_dict()
        return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone() for k, v in sd.items()}

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return grab()
    return grab()


# long: the training loop reads top to bottom in the order of a step (batch, forward, backward, log, agree on
# signals, save); cut into helpers it would pass a dozen loop variables back and forth.
def pretrain(cfg: RunConfig) -> dict:
    keep_mlflow_out(cfg)
    rank, world, device = build_distributed()
    corpus = Path(cfg.data.corpus)
    manifest = read_manifest(corpus)
    vocab = read_vocab(corpus)
    want = (manifest.get("vocab") or {}).get("sha256")
    if want and vocab_sha256([g for g, _ in vocab]) != want:
        raise ValueError(f"{corpus}/vocab.tsv: its genes do not match the manifest's vocabulary hash (the file was "
                         "edited or copied from another corpus); rebuild the corpus or restore its vocab.tsv")
    model = build_model_for(cfg, len(vocab), vocab).to(device)
    spec = default_preprocessing(cfg.model.family)
    d = cfg.data
    common = dict(backend=d.backend, batch_size=d.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                  num_workers=d.num_workers, block_size=d.block_size, window_batches=d.window_batches,
                  read_ahead=d.read_ahead, soma_filter=d.soma_filter, split=d.split,
                  soma_memory_budget=d.soma_memory_budget)
    if d.mix:
        common["backends"] = common.pop("backend")
        loader = MixedLoader([corpus] + [Path(m.corpus) for m in d.mix], [d.weight] + [m.weight for m in d.mix],
                             **common)
    else:
        loader = StreamingLoader(corpus, **common)
    engine, ds_cfg = build_engine(cfg, model, world, device.type)
    fwd = forward_view(engine, cfg, device.type)  # bf16: inputs cast in, outputs fp32 out
    run_dir, ckpt_root = cfg.run_dir, cfg.run_dir / "checkpoints"
    state = checkpoint.load_latest(engine, ckpt_root, cfg.checkpoint.resume, cfg.checkpoint.allow_fresh_start)
    step, cells = (state["step"], state["cells_seen"]) if state else (0, 0)
    if state:
        _same_corpus(cfg, state, corpus)
        if state["stream"] is not None:
            loader.load_state_dict(state["stream"])
    tracker = Tracker(cfg, rank, run_id=state.get("mlflow_run_id") if state else None, resume_step=step)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # credentials in URIs never reach disk or MLflow (config.yaml is uploaded as an artifact)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(redact_tree(asdict(cfg)), sort_keys=False))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_cfg, indent=2))
        print(f"[train] {cfg.model.family}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"world size {world}, ZeRO-{cfg.engine.zero_stage}, {d.backend} corpus {corpus} "
              f"({manifest['n_cells']:,} cells x {len(vocab):,} genes), "
              + (f"resumed at step {step}" if state else "fresh start"), flush=True)
    init_report = getattr(model, "init_report", None)
    if init_report is not None:
        if rank == 0:
            (run_dir / "init_from.json").write_text(json.dumps(init_report, indent=2))
        tracker.params({f"init_from.{k}": v for k, v in init_report.items() if k != "fresh_tensors"})
    export_meta = {"family": cfg.model.family, "hparams": hparams_of(model), "preprocessing": spec.to_dict(),
                   "corpus": str(corpus.resolve()), "corpus_manifest_sha256": _manifest_hash(corpus),
                   "init_from": init_report}
    batches = Batches(loader)
    objective = objectives.build_objective(cfg.model.family, cfg.objective, vocab=vocab)  # gene programmes read once
    eval_loader = build_eval(cfg, corpus, rank, world, manifest)
    bar = _progress(cfg, rank, step)
    last_loss = float("nan")
    engine.train()
    stop_at = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    last_save = time.monotonic()
    watch = SignalWatch(cfg.checkpoint.save_on_signal)
    preempted, committed = None, False
    trace = _CellTrace(run_dir, rank, world, step) if cfg.tracking.trace_cells else None
    loop_start = time.perf_counter()
    while step < stop_at:
        t0, batches.wait = time.perf_counter(), 0.0
        for micro in range(cfg.engine.grad_accum):
            batch = batches.next()
            inputs = model_inputs(batch, len(vocab), spec, device)
            torch.manual_seed(cfg.seed * 100_003 + rank * 7_919 + step)  # dropout: a function of the step
            gen = objectives.step_generator(cfg.seed, rank, step * cfg.engine.grad_accum + micro, device)
            loss, extra = train_step(fwd, objective, inputs, gen)
            if trace is not None:
                trace.add(step + 1, batch)
            engine.backward(loss)
            engine.step()
            objectives.after_step(engine)  # EMA targets (BYOL) follow applied optimizer steps
            cells += int(batch["cell_id"].numel()) * world
        step += 1
        faults.maybe_kill("kill", rank, step)
        dt = time.perf_counter() - t0
        if step % cfg.tracking.log_every == 0 or step == cfg.max_steps:
            last_loss = _mean_across_ranks(loss.detach().float())
            # wall_s after the loss all-reduce (a device sync): throughput between two rows is exact
            metrics = {"loss": last_loss, "lr": engine.get_lr()[0], "cells_seen": cells, **_memory(device),
                       "wall_s": time.perf_counter() - loop_start,
                       "cells_per_s": cfg.data.batch_size * cfg.engine.grad_accum * world / dt,
                       "data_stall_frac": batches.wait / dt, "epoch": loader.epoch,
                       **{k: float(v) for k, v in extra.items()}}
            gn = engine.get_global_grad_norm()
            if gn is not None:
                metrics["grad_norm"] = float(gn)
            tracker.log(step, metrics)
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", cells_s=f"{metrics['cells_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        faults.maybe_signal(rank, step)
        faults.maybe_sleep()
        if comm.agree(watch.requested, device, everyone=False):  # a signal on any rank stops every rank here
            preempted = watch.received or "a signal on another rank"
            stop_at = step
        if step % cfg.checkpoint.every_steps == 0 or step == stop_at or _time_to_save(cfg, last_save, device):
            last_save = time.monotonic()
            tstate = {"step": step, "cells_seen": cells, "stream": loader.state_dict(),
                      "mlflow_run_id": tracker.run_id, "corpus_manifest_sha256": export_meta["corpus_manifest_sha256"]}
            assert_buffers_in_sync(engine.module, device)
            committed = checkpoint.save(engine, ckpt_root, step, tstate,
                                        {"export_meta.json": json.dumps(export_meta),
                                         "vocab.tsv": (corpus / "vocab.tsv").read_text()}, cfg.checkpoint.keep)
            if not committed and preempted is None:  # storage failing: stop now, not hours of work later
                prev = checkpoint.committed_tags(ckpt_root)
                raise checkpoint.CheckpointError(
                    f"{ckpt_root / checkpoint.tag_of(step)}: the checkpoint of step {step} did not commit (a rank "
                    "failed to write it; its '[rank N] checkpoint ... not written' line names the file and error). "
                    + (f"The newest committed checkpoint, {prev[0]}, is intact: fix the storage and rerun the same "
                       "command to resume from it" if prev else "No checkpoint is committed yet: fix the storage "
                       "and rerun the same command"))
        if eval_loader is not None and ((cfg.tracking.eval_every and step % cfg.tracking.eval_every == 0)
                                        or step == cfg.max_steps):
            tracker.log(step, evaluate_heldout(fwd, objective, cfg, eval_loader, len(vocab), spec, device))
    if bar is not None:
        bar.close()
    if preempted is not None:
        if not committed:
            raise checkpoint.CheckpointError(f"{preempted}: the checkpoint of step {step} did not commit; the next "
                                             "start resumes from the previous committed one")
        if rank == 0:
            (run_dir / "preempted.json").write_text(json.dumps({"signal": preempted, "step": step,
                                                               "checkpoint": str(ckpt_root / checkpoint.tag_of(step))}))
            print(f"[train] {preempted}: stopped after step {step} and committed checkpoint "
                  f"{ckpt_root / checkpoint.tag_of(step)}; resume with the same command (exit {EXIT_PREEMPTED})",
                  flush=True)
        tracker.close(status="KILLED")  # the resumed run continues this MLflow run
        comm.barrier()
        watch.restore()
        return {"step": step, "cells_seen": cells, "final_loss": last_loss, "stopped_early": True,
                "preempted": preempted}
    watch.restore()
    if step < cfg.max_steps:  # stopped early on purpose: checkpointed, nothing to export
        tracker.close()
        comm.barrier()
        return {"step": step, "cells_seen": cells, "final_loss": last_loss, "stopped_early": True}
    weights = full_state_dict(engine, cfg.engine.zero_stage)
    result = {"step": step, "cells_seen": cells, "final_loss": last_loss, "run_dir": str(run_dir)}
    if rank == 0:
        if cfg.export_path is not None:
            write_export(cfg.export_path, weights, cfg.model.family, hparams_of(model), spec, vocab,
                         {"steps": step, "cells_seen": cells, "corpus_manifest_sha256": export_meta["corpus_manifest_sha256"],
                          "code_version": _git_rev(), "run": cfg.name,
                          **({"init_from": init_report} if init_report else {})})
            tracker.artifact(cfg.export_path, "export")
            result["export_dir"] = str(cfg.export_path)
        png = plot_loss(tracker.metrics_path, run_dir / "loss_curve.png", f"{cfg.name}: training loss")
        for art in (png, run_dir / "config.yaml", run_dir / "deepspeed_config.json", tracker.metrics_path):
            if art:
                tracker.artifact(art)
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    tracker.close()
    comm.barrier()
    return result


def build_eval(cfg: RunConfig, corpus: Path, rank: int, world: int, manifest: dict) -> StreamingLoader | None:
    """A loader over the corpus's held-out cells (None when the corpus has none)."""
    if not manifest.get("splits", {}).get("holdout"):
        return None
    d = cfg.data
    return StreamingLoader(corpus, backend=d.backend, batch_size=d.batch_size, seed=cfg.seed, rank=rank,
                           world_size=world, block_size=d.block_size, window_batches=d.window_batches,
                           read_ahead=0, soma_filter=d.soma_filter, split="holdout")


def evaluate_heldout(engine: Any, objective: objectives.Objective, cfg: RunConfig, loader: StreamingLoader,
                     n_genes: int, spec: PreprocessSpec, device: torch.device) -> dict:
    """Mean held-out metrics over the first ``eval_batches`` batches of a fixed epoch (same cells
    every time, same count on every rank), averaged across ranks. Prefixed ``eval_``."""
    loader.set_epoch(0)
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        if n == cfg.tracking.eval_batches:
            break
        inputs = model_inputs(batch, n_genes, spec, device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 10_007 * n)
        for k, v in objectives.held_out_metrics(objective, engine, inputs, gen).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    keys = sorted(sums)
    t = comm.mean([sums[k] / max(n, 1) for k in keys], device)
    return {f"eval_{k}": float(v) for k, v in zip(keys, t)}


def assert_buffers_in_sync(module: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    """Buffers (FAVOR+ projections, redraw counters) must be identical on every rank: DeepSpeed
    synchronises parameters, not buffers. Raises naming the first buffer that differs."""
    named = [(n, b) for n, b in module.named_buffers() if b.is_floating_point() or b.dtype == torch.long]
    if not named:
        return
    sig = torch.tensor([float(b.double().sum()) + float((b.double() ** 2).sum()) for _, b in named],
                       dtype=torch.float64)
    allsig = comm.gather(sig, device)
    for r, other in enumerate(allsig):
        if not torch.equal(other, allsig[0]):
            bad = named[int((other != allsig[0]).nonzero()[0])][0]
            raise RuntimeError(f"buffer {bad!r} differs between rank 0 and rank {r}: ranks have diverged")


def _time_to_save(cfg: RunConfig, last_save: float, device: torch.device) -> bool:
    """Wall-clock checkpoints: rank 0's clock decides for everyone (ranks must save together)."""
    if not cfg.checkpoint.every_minutes:
        return False
    return comm.from_rank0(time.monotonic() - last_save >= 60 * cfg.checkpoint.every_minutes, device)


def _memory(device: torch.device) -> dict:
    import psutil

    out = {"rss_gib": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        out["gpu_max_alloc_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _same_corpus(cfg: RunConfig, state: dict, corpus: Path) -> None:
    """A checkpoint resumes only on the corpus it was trained on (its stream state counts that corpus's
    cells), unless ``checkpoint.allow_new_corpus``: then the stream starts over on the new corpus."""
    saved, now = state.get("corpus_manifest_sha256"), _manifest_hash(corpus)
    if saved is None or saved == now:
        return
    if not cfg.checkpoint.allow_new_corpus:
        raise checkpoint.CheckpointError(
            f"{cfg.run_dir / 'checkpoints'}: the checkpoint of step {state['step']} was trained on a corpus with "
            f"manifest sha256 {saved[:12]}…, but {corpus}/manifest.json is {now[:12]}… (rebuilt or another corpus); "
            "point corpus= at the original, or set checkpoint.allow_new_corpus=true to continue the weights on "
            "this corpus from its first cell")
    state["stream"] = None


def _manifest_hash(corpus: Path) -> str:
    import hashlib

    return hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()


def _mean_across_ranks(t: torch.Tensor) -> float:
    return float(comm.mean(t.detach().double(), t.device)[0])


def _progress(cfg: RunConfig, rank: int, step: int):
    if rank != 0 or not cfg.tracking.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=step, desc=f"pretrain {cfg.name}", unit="step", dynamic_ncols=True)
