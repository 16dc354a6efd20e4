"""Model architectures and preprocessing, pure torch.

Shared by ``train`` (pretraining) and ``evaluate`` (downstream use of exports).
Nothing here imports deepspeed, mlflow, torch.distributed, tiledbsoma or zarr:
an export must be usable with torch + performer-pytorch + safetensors only.
"""
from scpretrain.scmodels.build import FAMILIES, build_model, embedding_key
from scpretrain.scmodels.genes import normalize_gene_id
from scpretrain.scmodels.preprocess import PreprocessSpec, csr_to_dense, preprocess

__all__ = ["FAMILIES", "PreprocessSpec", "build_model", "csr_to_dense", "embedding_key", "normalize_gene_id",
           "preprocess"]
