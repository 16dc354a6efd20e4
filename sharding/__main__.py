"""python -m sharding build | inspect | verify

  python -m sharding build --source 'data/*.h5ad' --source synthetic://cells=50000 --out corpus/ --format both
  python -m sharding build --source 'runs/*/outs/filtered_feature_bc_matrix' --source s1.h5 --out corpus/
  python -m sharding build --source 'soma://atlas.soma?measurement=RNA&layer=raw&filter=tissue == "lung"' ...
  python -m sharding build --source census:homo_sapiens --census-uri /data/census \
      --census-filter "tissue_general == 'lung' and is_primary_data == True" --out corpus/
  # one build as independent tasks (a SLURM array: launch/build_corpus.sbatch), identical to the one-process build
  python -m sharding build --source 'data/*.h5ad' --out corpus/ --plan --tasks 16
  python -m sharding build --out corpus/ --task 3 --phase 1     # every task, then every task of phase 2
  python -m sharding build --out corpus/ --finish
  python -m sharding inspect corpus/
  python -m sharding verify corpus/      # exit 0 and "OK", or 1 naming each bad shard

Bad input prints one line, ``error: <message>``, on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scpretrain.sharding.errors import InputError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding", description="Build, inspect and verify corpora.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a corpus from sources")
    b.add_argument("--source", action="append", default=[], metavar="SPEC",
                   help="an .h5ad path or glob; a 10x matrix.mtx directory or CellRanger .h5 (globs too); "
                        "soma://PATH[?measurement=RNA&layer=raw&filter=EXPR]; "
                        "census:ORGANISM[?uri=&version=&filter=EXPR]; or "
                        "synthetic://cells=N,genes=G,types=T,datasets=D,seed=S,density=F (repeatable)")
    b.add_argument("--out", required=True, type=Path, metavar="DIR")
    b.add_argument("--vocab", type=Path, metavar="FILE",
                   help="vocab.tsv (gene_id<TAB>symbol); default: the union of the sources' genes")
    b.add_argument("--format", default="zarr", choices=("zarr", "soma", "both"))
    b.add_argument("--cells-per-shard", type=int, default=16_384, metavar="N")
    b.add_argument("--keep-obs", default="", metavar="COL,COL",
                   help="extra obs columns to keep (as strings)")
    b.add_argument("--label-key", metavar="KEY", help="obs column copied into cell_type (default: cell_type)")
    b.add_argument("--dataset-key", metavar="KEY",
                   help="obs column copied into dataset_id (default: dataset_id, else the file name)")
    b.add_argument("--matrix", metavar="X|raw|layer:NAME", help="which matrix holds counts (default: detect)")
    b.add_argument("--min-genes", type=int, default=1, metavar="N",
                   help="drop cells with fewer expressed vocabulary genes")
    b.add_argument("--min-coverage", type=float, default=0.5, metavar="F",
                   help="refuse a source when fewer of its genes are in the vocabulary")
    b.add_argument("--holdout", metavar="COL=VAL[,VAL] | COL:FRACTION",
                   help="mark cells split=holdout: those with the listed values, or about FRACTION of the "
                        "column's distinct values, chosen by a seeded hash (e.g. donor_id:0.1)")
    # blosc-lz4 (byte shuffle) over uint16 arrays: about 2x the loader's cells/s of blosc-zstd for 1/3 more
    # bytes on disk; blosc releases the GIL so chunks decode in parallel (BENCHMARKS.md, loader)
    b.add_argument("--codec", default="blosc-lz4", choices=("zstd", "lz4", "blosc-zstd", "blosc-lz4"),
                   help="X codec: blosc-lz4 (default, fastest to stream), blosc-zstd (smallest), zstd, lz4")
    b.add_argument("--x-dtype", default="auto", choices=("auto", "float32"),
                   help="stored X dtypes: auto = uint16 gene indices (<= 65,536 genes) and uint16 counts when all "
                        "are integers <= 65,535 (else float32); float32 = int32 indices + float32 counts")
    b.add_argument("--allow-non-integer", action="store_true", help="accept non-integer (normalized) values")
    b.add_argument("--census-uri", metavar="URI",
                   help="a local or remote copy of the Census (default: the hosted Census, needs network)")
    b.add_argument("--census-version", metavar="VERSION",
                   help="Census release, e.g. 2025-01-30 (default: stable; checked against the build of "
                        "--census-uri)")
    b.add_argument("--census-filter", metavar="EXPR",
                   help="obs value filter for census: sources, e.g. \"tissue_general == 'lung' and "
                        "is_primary_data == True\"")
    b.add_argument("--overwrite", action="store_true", help="rebuild over an existing corpus")
    b.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="processes: phase 1 runs as N tasks and N processes write shards (default 1; 0: one per "
                        "core, at most 4, for corpora of 100k cells or more); the corpus is the same for any N")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t = b.add_argument_group("a build as independent tasks (the result is identical to the one-process build)")
    t.add_argument("--plan", action="store_true",
                   help="check the inputs and write the task list (DIR/.build/plan.json); with --tasks N")
    t.add_argument("--tasks", type=int, default=1, metavar="N", help="phase-1 and phase-2 tasks of --plan")
    t.add_argument("--task", type=int, default=None, metavar="I",
                   help="run task I of --phase 1 (read, deal, spool) or 2 (write shards); needs only --out")
    t.add_argument("--phase", type=int, choices=(1, 2), default=None, help="the phase of --task")
    t.add_argument("--finish", action="store_true", help="check every task is done and publish the manifest")
    i = sub.add_parser("inspect", help="print a summary of a corpus")
    i.add_argument("dir", type=Path)
    v = sub.add_parser("verify", help="check a corpus against its manifest")
    v.add_argument("dir", type=Path)
    return p


def _build(args: argparse.Namespace) -> int:
    from scpretrain.sharding.build import BuildConfig, build, finish_build, plan_build, run_task

    if args.task is not None or args.finish:
        if args.plan or args.source:
            raise InputError("--task / --finish read everything from the plan: pass only --out (and --phase)")
        if args.finish:
            finish_build(args.out)
        elif args.phase is None:
            raise InputError("--task I needs --phase 1 or --phase 2")
        else:
            run_task(args.out, args.task, args.phase, jobs=args.jobs)
        return 0
    if not args.source:
        raise InputError("no --source given; pass --source PATH.h5ad or --source synthetic://cells=1000")
    cfg = BuildConfig(
        sources=args.source, out=args.out, vocab=args.vocab, format=args.format,
        cells_per_shard=args.cells_per_shard, keep_obs=[c for c in args.keep_obs.split(",") if c],
        label_key=args.label_key, dataset_key=args.dataset_key, matrix=args.matrix, min_genes=args.min_genes,
        holdout=args.holdout, codec=args.codec, x_dtype=args.x_dtype, seed=args.seed,
        min_coverage=args.min_coverage,
        allow_non_integer=args.allow_non_integer, overwrite=args.overwrite, census_uri=args.census_uri,
        census_version=args.census_version, census_filter=args.census_filter, jobs=args.jobs,
        progress=False if args.no_progress else None)
    if args.plan:
        plan_build(cfg, args.tasks)
    else:
        build(cfg)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from scpretrain.sharding.check import verify

    problems = verify(args.dir)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print("OK")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from scpretrain.sharding.check import summarize

    print(summarize(args.dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"build": _build, "inspect": _inspect, "verify": _verify}[args.command](args)
    except InputError as exc:
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    if sys.argv[1:2] == ["build"]:
        from scpretrain.sharding.hugepages import restart_with_huge_pages

        restart_with_huge_pages()
    sys.exit(main())
