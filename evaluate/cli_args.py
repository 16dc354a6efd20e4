"""The command line's shared pieces: reading and writing h5ad files, and argument groups several
subcommands declare (``python -m evaluate``)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from scpretrain.evaluate.errors import EvaluateError


def read_h5ad(path: str) -> Any:
    import anndata  # here, not at import: the Python API never needs it

    p = Path(path)
    if not p.is_file():
        raise EvaluateError(f"{p}: no such file; pass an existing .h5ad")
    try:
        return anndata.read_h5ad(p)
    except Exception as e:  # h5py / anndata raise many types for foreign or truncated files
        raise EvaluateError(f"{p}: cannot read as h5ad ({type(e).__name__}: {e}); "
                            "pass an AnnData .h5ad file") from e


def write_h5ad(adata: Any, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.h5ad")
    adata.write_h5ad(tmp)
    os.replace(tmp, out)  # a crash never leaves a truncated OUT.h5ad behind
    print(f"wrote {out}")


def neighbour_args(p: argparse.ArgumentParser, k_help: str = "neighbours that vote (default 5)",
                max_distance: bool = True) -> None:
    p.add_argument("--k", type=int, default=5, help=k_help)
    if max_distance:
        p.add_argument("--max-distance", default="auto", metavar="D",
                       help="neighbours farther than this cosine distance do not vote, so cells unlike any "
                       "reference cell become Unassigned (default auto: the reference's own 99th-percentile "
                       "distance to its k-th neighbour; 'none' lets every neighbour vote)")


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", required=True, metavar="DIR",
                   help="export directory (config.json, model.safetensors, vocab.tsv)")
    p.add_argument("--layer", default=None, help="layer with raw counts instead of X ('raw' = adata.raw)")
    p.add_argument("--min-coverage", type=float, default=0.5, metavar="F",
                   help="refuse inputs with fewer than this fraction of the export's genes (default 0.5)")
    p.add_argument("--batch-size", type=int, default=512, metavar="N",
                   help="cells per forward pass (default 512)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--allow-normalized", action="store_true",
                   help="use X as it is when no matrix holds raw integer counts (X, layers['counts'] and raw.X "
                   "are tried in turn; without this flag non-integer or negative values are refused)")
    p.add_argument("--sum-duplicates", action="store_true",
                   help="add up the counts of duplicated gene names (default: refuse them)")
    p.add_argument("--quiet", action="store_true", help="print only results and errors")


def reference_args(p: argparse.ArgumentParser, reference_required: bool = True) -> None:
    p.add_argument("--reference", required=reference_required, metavar="REF.h5ad",
                   help="labelled cells (raw counts) to learn from")
    p.add_argument("--label-key", required=True, metavar="KEY",
                   help="obs column with the labels, e.g. cell_type")
    p.add_argument("--reference-layer", default=None, metavar="LAYER",
                   help="layer of the reference with raw counts (default X)")


def query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query", required=True, metavar="Q.h5ad", help="cells to label (raw counts)")
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="where to write the annotated query")


def head_args(p: argparse.ArgumentParser, seed_help: str, auto_mode: bool = True) -> None:
    p.add_argument("--head", choices=("auto", "linear", "mlp", "scbert"), default="auto",
                   help="head type (default auto: scbert for a Performer export, linear for an MAE export)")
    modes = ("auto", "frozen", "partial", "full") if auto_mode else ("frozen", "partial", "full")
    p.add_argument("--mode", choices=modes, default=modes[0],
                   help="what trains besides the head: frozen = nothing, partial = the last --unfreeze encoder "
                   "blocks (+ a Performer's final norm), full = the whole encoder"
                   + ("; auto (default) fits frozen and full (MAE) or frozen and partial (Performer) and keeps "
                      "the better on held-out reference cells" if auto_mode else " (default frozen)"))
    p.add_argument("--unfreeze", type=int, default=1, metavar="N",
                   help="encoder blocks --mode partial trains, counted from the top (default 1)")
    p.add_argument("--max-epochs", type=int, default=None, metavar="N",
                   help="training epochs at most (default 300 for a frozen linear/mlp head, else 50); "
                   "training stops earlier when the validation loss stops improving")
    p.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    g = p.add_argument_group("rare cell types (evaluate/longtail.py)")
    g.add_argument("--loss", choices=("weighted_ce", "ce", "gaussian_inflation"), default="weighted_ce",
                   help="training loss: weighted_ce = class-weighted cross-entropy (default), ce = plain, "
                   "gaussian_inflation = logits pushed down during training by |N(0,1)| x sigma_c, sigma_c "
                   "growing for rarer classes (0 for the most common)")
    g.add_argument("--inflation-sigma", type=float, default=None, metavar="S",
                   help="sigma of the rarest class (default log(n_max/n_min)/sqrt(2/pi): on average the "
                   "push equals the balanced-error logit adjustment)")
    g.add_argument("--inflation-gamma", type=float, default=0.0, metavar="G",
                   help="shape: sigma_c ~ (n_max/n_c)^G - 1 (default 0: ~ log(n_max/n_c))")
    g.add_argument("--hard-mining", action="store_true",
                   help="second phase: retrain with the training cells the first phase got wrong or right "
                   "by a probability margin below --hard-margin weighted --hard-weight")
    g.add_argument("--hard-margin", type=float, default=0.2, metavar="M",
                   help="p(true) - max p(other) below this is hard (default 0.2)")
    g.add_argument("--hard-weight", type=float, default=4.0, metavar="W",
                   help="loss weight of a hard cell in the second phase (default 4)")


def unassigned_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("Unassigned cells")
    g.add_argument("--threshold", default="auto", metavar="P",
                   help=f"minimum {what}, else 'Unassigned' (default auto: calibrated so that --reject-rate of "
                   "held-out reference cells, whose type is known, would be rejected)")
    g.add_argument("--reject-rate", type=float, default=0.05, metavar="F",
                   help="with --threshold auto: the share of held-out known reference cells rejected at most "
                   "(default 0.05)")
    g.add_argument("--no-unassigned", action="store_true", help="label every cell (no rejection)")
    g.add_argument("--no-baseline", action="store_true",
                   help="skip the logistic regression baseline on held-out reference cells")


def threshold_of(args: argparse.Namespace) -> float | str | None:
    if args.no_unassigned:
        return None
    if str(args.threshold).lower() == "auto":
        return "auto"
    try:
        return float(args.threshold)
    except ValueError:
        raise EvaluateError(f"--threshold {args.threshold!r}: expected a number in [0, 1] or 'auto'") from None


def plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="also write umap.png (coloured by prediction, and by --label-key when the query has "
                   "that column, then also confusion_matrix.png) into DIR")


def distance_of(text: str) -> float | str | None:
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise EvaluateError(f"--max-distance {text!r}: expected a number, 'auto' or 'none'") from None
