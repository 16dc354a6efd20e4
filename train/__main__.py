"""``python -m train pretrain --config FILE [key=value ...]``, ``python -m train export CKPT --out DIR``,
``python -m train import-weights --from {scbert,ssl_in_scg} ...`` and ``python -m train export-weights --to ...``.

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

    from scpretrain.scmodels.atomic import check_replaceable
    from scpretrain.scmodels.preprocess import PreprocessSpec
    from scpretrain.sharding.manifest import read_vocab
    from scpretrain.train.checkpoint import verify
    from scpretrain.train.export import write_export

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
                               "corpus_manifest_sha256": meta["corpus_manifest_sha256"],
                               **({"init_from": meta["init_from"]} if meta.get("init_from") else {})})
    print(f"exported {root}/{tag} -> {out}")
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from scpretrain.scmodels.atomic import check_replaceable
    from scpretrain.train.published import WeightsError, import_weights

    try:
        check_replaceable(Path(args.out), "config.json", "export")
        out = import_weights(args.source, args.checkpoint, args.genes, args.out, gene2vec=args.gene2vec,
                             labels=args.labels)
    except (WeightsError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text())
    heads = sorted(p.name for p in (out / "heads").iterdir()) if (out / "heads").is_dir() else []
    print(f"imported {args.source} {args.checkpoint} -> {out} ({cfg['model_family']}, {cfg['n_genes']} genes"
          + (f"; head in {out}/heads/{heads[0]}" if heads else "") + ")")
    for note in cfg["provenance"].get("dropped", []):
        print(f"  dropped: {note}")
    return 0


def cmd_export_weights(args: argparse.Namespace) -> int:
    from scpretrain.train.published import WeightsError, export_weights

    try:
        out, warnings = export_weights(args.export, args.target, args.out)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.target} checkpoint {out} (gene order: {Path(args.export) / 'vocab.tsv'})")
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
    im = sub.add_parser("import-weights", help="a published scBERT / ssl_in_scg checkpoint -> our export",
                        description="Convert a published checkpoint into an export (evaluate embed/annotate/report "
                        "work on it; model.init_from=DIR pretrains from it). Read with torch.load(weights_only=True): "
                        "a file that needs more than tensors is refused.")
    im.add_argument("--from", dest="source", required=True, metavar="{scbert,ssl_in_scg}",
                    help="the layout of --checkpoint")
    im.add_argument("--checkpoint", required=True, help="e.g. panglao_pretrain.pth, finetune_best.pth, RandomMask.ckpt")
    im.add_argument("--genes", required=True, help="the weights' gene order: a text file (one per line), a TSV, an "
                    "h5ad (var_names, e.g. scBERT's panglao_10000.h5ad) or a parquet (scTab's var.parquet)")
    im.add_argument("--gene2vec", help="scBERT: a gene2vec .npy to use instead of the checkpoint's pos_emb")
    im.add_argument("--labels", help="fine-tuned files: class names in output order (text, or a parquet's 'label' "
                    "column); the classifier is then kept as a head in OUT/heads/")
    im.add_argument("--out", required=True, help="export directory to write")
    eb = sub.add_parser("export-weights", help="our export -> a checkpoint in scBERT's / ssl_in_scg's layout")
    eb.add_argument("--export", required=True, help="an export directory")
    eb.add_argument("--to", dest="target", required=True, metavar="{scbert,ssl_in_scg}")
    eb.add_argument("--out", required=True, help="checkpoint file to write (.pth / .ckpt)")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return {"pretrain": cmd_pretrain, "export": cmd_export, "import-weights": cmd_import_weights,
            "export-weights": cmd_export_weights}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
