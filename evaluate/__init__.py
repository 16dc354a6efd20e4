"""Downstream use of an exported encoder: embed, fine-tune a head, annotate, report.

Needs only torch, safetensors, numpy/scipy/pandas, scikit-learn (and performer-pytorch
for Performer exports); never DeepSpeed, TileDB-SOMA, Zarr or the training code.
``anndata`` is not imported here: pass any AnnData you have read yourself.

    import anndata, evaluate
    model = evaluate.load_export("exports/mae_lung_v1")
    adata = anndata.read_h5ad("mine.h5ad")            # raw counts in X (or pass layer=...)
    evaluate.embed(model, adata)                        # adata.obsm["X_mae"]
    evaluate.annotate(model, adata, reference=ref, label_key="cell_type")
    # adata.obs["predicted_cell_type"], adata.obs["predicted_cell_type_probability"]
"""
from evaluate.annotate import annotate
from evaluate.embedding import embed
from evaluate.errors import EvaluateError
from evaluate.export_io import Export, load_export
from evaluate.finetune import finetune
from evaluate.heads import Head
from evaluate.report import report

__all__ = ["EvaluateError", "Export", "Head", "annotate", "embed", "finetune", "load_export", "report"]
