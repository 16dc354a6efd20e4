"""Downstream use of an exported encoder: embed, fine-tune, annotate, report.

Needs only torch, safetensors, numpy/scipy/pandas, scikit-learn (and performer-pytorch
for Performer exports; matplotlib and umap-learn for the pictures); never DeepSpeed,
TileDB-SOMA, Zarr or the training code. ``anndata`` is not imported here: pass any
AnnData you have read yourself.

    import anndata
    from scpretrain import evaluate
    model = evaluate.load_export("exports/mae_lung_v1")
    adata = anndata.read_h5ad("mine.h5ad")            # raw counts in X (or pass layer=...)
    evaluate.embed(model, adata)                        # adata.obsm["X_mae"]
    evaluate.annotate(model, adata, reference=ref, label_key="cell_type")
    # adata.obs["predicted_cell_type"], adata.obs["predicted_cell_type_probability"]
    clf = evaluate.finetune(model, ref, "cell_type", mode="partial", save_to="heads/v1",
                            fit=evaluate.FitOptions(max_epochs=20, loss="gaussian_inflation"))
    evaluate.annotate(model, adata, head="heads/v1")    # the saved head, no reference needed
    evaluate.report(model, ref, "cell_type", out_dir="report/")  # held-out scores beside the baselines

Five functions and two option types (``ReadOptions``: how cells are read; ``FitOptions``: how a head
trains); the rest lives in the submodules (``evaluate.classifier``,
``evaluate.heads``, ...).

Methods from the field (issue 8): ``FitOptions(loss="gaussian_inflation", hard_mining=True)``
for rare cell types (``evaluate.longtail``); ``evaluate.genept.genept_embed`` / ``genept_annotate``,
the GenePT-w baseline from a per-gene embedding file, and ``genept_s_embed`` / ``genept_annotate(mode=
"sentence")``, GenePT-s (cells as gene-symbol sentences, a local text model); ``evaluate.langcell.
langcell_annotate``, zero-shot labels from label-text embeddings. Judging embeddings:
``evaluate.integrate.integrate`` (scIB's batch-correction and bio-conservation metrics beside a PCA
baseline) and ``evaluate.interpret.interpret`` (the genes that drive each type).
"""
from scpretrain.evaluate.annotate import annotate
from scpretrain.evaluate.embedding import embed
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.export_io import load_export
from scpretrain.evaluate.finetune import finetune
from scpretrain.evaluate.options import FitOptions, ReadOptions
from scpretrain.evaluate.report import report

__all__ = ["EvaluateError", "FitOptions", "ReadOptions", "annotate", "embed", "finetune", "load_export", "report"]
