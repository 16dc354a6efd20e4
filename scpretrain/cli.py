"""``scpretrain``: one command for every part, installed on the PATH.

    scpretrain annotate --export EXPORT --reference ref.h5ad --query mine.h5ad --out mine_annotated.h5ad
    scpretrain embed --export EXPORT --adata mine.h5ad --out mine_embedded.h5ad
    scpretrain build --source 'data/*.h5ad' --out corpora/mine          (needs scpretrain[train])
    scpretrain pretrain --config configs/pretrain/demo_mae.yaml          (under torchrun: python -m scpretrain.train)
    scpretrain import-weights --from scbert --checkpoint panglao_pretrain.pth --genes genes.txt --out EXPORT
    scpretrain --version

Downstream commands (embed, finetune, annotate, knn, report, genept, langcell, interpret, integrate) are those of
``python -m evaluate``; build / inspect / verify of ``python -m sharding``; pretrain / export /
import-weights / export-weights of ``python -m train``; ``launch`` of ``python -m launch``; ``trace`` of ``python -m data_loader``.
"""
from __future__ import annotations

import sys

EVALUATE = ("embed", "finetune", "annotate", "knn", "report", "genept", "langcell", "interpret", "integrate")
SHARDING = ("build", "inspect", "verify")
TRAIN = ("pretrain", "export", "import-weights", "export-weights")


def _version() -> str:
    from scpretrain import __version__
    from scpretrain.evaluate.export_io import SUPPORTED_FORMAT_VERSION

    return f"scpretrain {__version__} (reads exports of format_version <= {SUPPORTED_FORMAT_VERSION})"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if args[0] == "--version":
        print(_version())
        return 0
    cmd = args[0]
    if cmd in EVALUATE:
        from scpretrain.evaluate.__main__ import main as run
        return run(args)
    if cmd in SHARDING:
        if cmd == "build" and argv is None:  # the installed command, not a call from Python
            from scpretrain.sharding.hugepages import restart_with_huge_pages

            restart_with_huge_pages()
        from scpretrain.sharding.__main__ import main as run
        return run(args)
    if cmd in TRAIN:
        from scpretrain.train.__main__ import main as run
        return run(args)
    if cmd == "launch":
        from scpretrain.launch.__main__ import main as run
        return run(args[1:])
    if cmd == "trace":
        from scpretrain.data_loader.__main__ import main as run
        return run(args)
    print(f"scpretrain: unknown command {cmd!r}; one of {', '.join(EVALUATE + SHARDING + TRAIN)}, launch, trace, "
          "--version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
