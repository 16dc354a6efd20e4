"""The one place that builds the DeepSpeed config and the engine."""
from __future__ import annotations

from typing import Any

import torch

from scpretrain.train.config import RunConfig


def use_bf16(cfg: RunConfig, device_type: str) -> bool:
    if cfg.engine.precision == "fp32":
        return False
    if cfg.engine.precision == "bf16":
        return True
    return device_type == "cuda" and torch.cuda.is_bf16_supported()


def deepspeed_config(cfg: RunConfig, world_size: int, device_type: str) -> dict:
    """DeepSpeed JSON config from the typed run config. Nothing else edits this dict."""
    e, o = cfg.engine, cfg.optim
    if e.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage: {e.zero_stage} is not one of 0, 1, 2, 3")
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": e.grad_accum,
        "train_batch_size": cfg.data.batch_size * e.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        # torch's Adam(W): DeepSpeed's fused/CPU Adam ops compile for minutes on first use.
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(cfg.max_steps, 1), "warmup_num_steps": max(o.warmup_steps, 1),
            "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}},
        "bf16": {"enabled": use_bf16(cfg, device_type)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int, device_type: str) -> tuple[Any, dict]:
    import deepspeed

    ds_cfg = deepspeed_config(cfg, world_size, device_type)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_cfg)
    return engine, ds_cfg


class CastInputs:
    """The engine as the objectives call it, for bf16 training: floating inputs are cast to the
    parameters' dtype (DeepSpeed casts the weights, not the batch) and floating outputs come back
    as float32, so losses, masks and metrics are computed in fp32. Everything else (``backward``,
    ``module``, ``train()``) is the engine's."""

    def __init__(self, engine, dtype: torch.dtype):
        self._engine, self._dtype = engine, dtype

    def __call__(self, *args, **kwargs):
        def cast(v):
            return v.to(self._dtype) if torch.is_tensor(v) and v.is_floating_point() else v

        out = self._engine(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
        return _to_fp32(out)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def _to_fp32(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_fp32(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_to_fp32(v) for v in out)
    return out


def forward_view(engine: Any, cfg: RunConfig, device_type: str) -> Any:
    """What the objectives call: the engine itself in fp32, ``CastInputs`` around it in bf16."""
    return CastInputs(engine, torch.bfloat16) if use_bf16(cfg, device_type) else engine
