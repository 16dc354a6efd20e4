"""``python -m train pretrain --config FILE [key=value ...]`` and ``python -m train export CKPT --out DIR``.

pretrain runs under torchrun (``torchrun --nproc-per-node 2 -m train pretrain ...``), the
deepspeed launcher (which appends ``--local_rank=N``: accepted) or SLURM via ``python -m launch``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cpu_defaults() -> None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass


def cmd_pretrain(args: argparse.Namespace) -> int:
    from scpretrain.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from scpretrain.train.preempt import EXIT_PREEMPTED
    from scpretrain.train.trainer import pretrain

    result = pretrain(cfg)
    return EXIT_PREEMPTED if result.get("preempted") else 0


def resolve_checkpoint(path: Path) -> tuple[Path, str]:
    """CKPT may be a tag dir, the checkpoints root, or '<root>/latest' (newest committed tag)."""
    from scpretrain.train.checkpoint import MARKER, committed_tags

    if path.name == "latest" or not (path / MARKER).exists():
        root = path.parent if path.name == "latest" else path
        tags = committed_tags(root)
        if not tags:
            raise SystemExit(f"error: {root}: no committed checkpoint (no step-*/{MARKER}); nothing to export")
        return root, tags[0]
    return path.parent, path.name


def cmd_export(args: argparse.Namespace) -> int:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from scpretrain.scmodels.preprocess import PreprocessSpec
    from scpretrain.sharding.manifest import read_vocab
    from scpretrain.train.export import write_export

    from scpretrain.scmodels.atomic import check_replaceable
    from scpretrain.train.checkpoint import verify

    try:
        check_replaceable(Path(args.out), "config.json", "export")
    except FileExistsError as e:
        raise SystemExit(f"error: --out {e}") from None
    root, tag = resolve_checkpoint(Path(args.checkpoint))

    problem = verify(root / tag)
    if problem:
        raise SystemExit(f"error: {problem}; export an older committed checkpoint")
    meta = json.loads((root / tag / "export_meta.json").read_text())
    state = json.loads((root / tag / "trainer_state.json").read_text())
    sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    # the checkpoint's own copy of the vocabulary (older checkpoints: the corpus it was trained on)
    own = root / tag / "vocab.tsv"
    vocab = read_vocab(own if own.exists() else Path(meta["corpus"]))
    out = write_export(args.out, sd, meta["family"], meta["hparams"], PreprocessSpec.from_dict(meta["preprocessing"]),
                       vocab, {"steps": state["step"], "cells_seen": state["cells_seen"], "checkpoint": f"{root}/{tag}",
                               "corpus_manifest_sha256": meta["corpus_manifest_sha256"]})
    print(f"exported {root}/{tag} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    _cpu_defaults()
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("pretrain", help="pretrain an encoder (under torchrun for several processes)")
    pt.add_argument("--config", help="YAML run config, e.g. configs/pretrain/demo_mae.yaml")
    pt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 corpus=DIR")
    pt.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ex = sub.add_parser("export", help="export a checkpoint (any ZeRO stage) to a standalone directory")
    ex.add_argument("checkpoint", help="a checkpoint tag dir, the checkpoints dir, or <checkpoints>/latest")
    ex.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return {"pretrain": cmd_pretrain, "export": cmd_export}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
