"""Several corpora mixed with weights: every batch holds cells of each corpus in fixed proportions.

A ``MixedLoader`` runs one ``StreamingLoader`` per corpus. A rank's batch of ``batch_size`` cells
is the concatenation of one sub-batch from each corpus, ``sizes[i]`` cells from corpus i, where
``sizes`` is ``batch_size * weights / sum(weights)`` rounded by largest remainder (at least one
cell each). So:

* each corpus keeps its own guarantees: its own epoch plan, every one of its cells exactly once
  per *its* epoch, equal batch counts on every rank (hence no DDP hang in the mix);
* a corpus of small weight or few cells cycles through its epochs faster or slower than the
  others; one ``iter()`` of the mix is one epoch of the *primary* corpus (index 0 unless
  ``primary`` says otherwise), while the others roll over into their next epoch when they run
  out (a mature stream's "epoch = the anchor dataset" rule);
* the state is the list of the corpora's global stream states, so a resumed mix continues with
  exactly the cells each corpus has not yet delivered, also under another world size or worker
  count.

Batches carry ``corpus`` (int16 [B]: which corpus each cell came from) beside ``cell_id`` (the id
within that corpus): ``(corpus, cell_id)`` names a cell. All corpora must share one gene
vocabulary (the manifests' vocabulary hash), and every requested obs column must exist in each.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from scpretrain.data_loader.stream import StreamingLoader


def split_batch(batch_size: int, weights: Sequence[float]) -> list[int]:
    """Cells per corpus in a batch: ``batch_size * w / sum(w)`` by largest remainder, each >= 1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights: need one positive weight per corpus, got {list(weights)}")
    if batch_size < len(w):
        raise ValueError(f"batch_size {batch_size} is smaller than the number of corpora ({len(w)}): "
                         "every corpus needs at least one cell per batch")
    exact = batch_size * w / w.sum()
    sizes = np.maximum(np.floor(exact).astype(np.int64), 1)
    while sizes.sum() > batch_size:  # the minimum of one cell took cells from the largest shares
        sizes[np.argmax(sizes - exact)] -= 1
    rest = exact - sizes
    for i in np.argsort(-rest, kind="stable")[: batch_size - int(sizes.sum())]:
        sizes[i] += 1
    return sizes.tolist()


def _common_dtype(tensors: list[torch.Tensor], wider: torch.dtype) -> torch.dtype:
    """The one dtype of ``tensors``, or ``wider`` when they differ (torch does not promote uint16)."""
    kinds = {t.dtype for t in tensors}
    return kinds.pop() if len(kinds) == 1 else wider


def concat_batches(parts: list[dict], primary: int = 0) -> dict:
    """One CSR batch from sub-batches (same vocabulary), with ``corpus`` telling each cell's origin.
    Gene indices become int64 and counts float32 where the corpora store different dtypes."""
    indptrs, off = [], 0
    for p in parts:
        ip = p["indptr"]
        indptrs.append(ip[1:] - ip[0] + off if indptrs else ip - ip[0])
        off += int(ip[-1] - ip[0])
    dtype_i = _common_dtype([p["indices"] for p in parts], torch.int64)
    dtype_d = _common_dtype([p["data"] for p in parts], torch.float32)
    obs = {k: np.concatenate([np.asarray(p["obs"][k]) for p in parts]) for k in parts[0]["obs"]}
    return {
        "indptr": torch.cat(indptrs),
        "indices": torch.cat([p["indices"].to(dtype_i) for p in parts]),
        "data": torch.cat([p["data"].to(dtype_d) for p in parts]),
        "cell_id": torch.cat([p["cell_id"] for p in parts]),
        "corpus": torch.cat([torch.full((len(p["cell_id"]),), i, dtype=torch.int16) for i, p in enumerate(parts)]),
        "obs": obs,
        "epoch": parts[primary]["epoch"],
        "epochs": [p["epoch"] for p in parts],
    }


class MixedLoader:
    """Batches mixing several corpora in fixed proportions (see the module docstring).

    Args:
        corpora: corpus directories (each ``python -m sharding build``).
        weights: one positive weight per corpus (proportions of every batch).
        batch_size: cells per batch per rank, split among the corpora by ``split_batch``.
        primary: the corpus whose epoch is the mix's epoch.
        backends: ``"zarr"`` or ``"soma"`` for all corpora, or one per corpus.
        **kw: any other ``StreamingLoader`` argument (seed, rank, world_size, num_workers,
            block_size, window_batches, obs_columns, split, ...), the same for every corpus.
    """

    def __init__(self, corpora: Sequence[str | Path], weights: Sequence[float], batch_size: int = 64,
                 primary: int = 0, backends: str | Sequence[str] = "zarr", **kw):
        if len(corpora) != len(weights):
            raise ValueError(f"mix: {len(corpora)} corpora but {len(weights)} weights; give one weight per corpus")
        if not 0 <= primary < len(corpora):
            raise ValueError(f"mix: primary={primary} is not a corpus index (0..{len(corpora) - 1})")
        self.weights = [float(w) for w in weights]
        self.sizes = split_batch(batch_size, self.weights)
        self.batch_size, self.primary = batch_size, primary
        backends = [backends] * len(corpora) if isinstance(backends, str) else list(backends)
        self.loaders = [StreamingLoader(c, backend=b, batch_size=s, **kw)
                        for c, b, s in zip(corpora, backends, self.sizes)]
        vocab = {str(c): ld.manifest["vocab"]["sha256"] for c, ld in zip(corpora, self.loaders)}
        if len(set(vocab.values())) > 1:
            first = str(corpora[0])
            other = next(c for c, h in vocab.items() if h != vocab[first])
            raise ValueError(f"{other}/manifest.json: vocab.sha256 differs from {first}'s; corpora mixed in one "
                             "batch need one gene vocabulary (build both with the same --vocab)")
        self._its: list[Iterator | None] = [None] * len(self.loaders)

    @property
    def epoch(self) -> int:
        return self.loaders[self.primary].epoch

    @property
    def n_cells(self) -> int:
        return sum(ld.n_cells for ld in self.loaders)

    @property
    def manifest(self) -> dict:
        return self.loaders[self.primary].manifest

    def batches_in_epoch(self) -> int:
        return self.loaders[self.primary].batches_in_epoch()

    def _next(self, i: int) -> dict | None:
        """The next sub-batch of corpus i; a secondary corpus rolls into its next epoch."""
        for _attempt in range(2):
            if self._its[i] is None:
                self._its[i] = iter(self.loaders[i])
            try:
                return next(self._its[i])
            except StopIteration:
                self._its[i] = None
                if i == self.primary:
                    return None
        raise RuntimeError(f"mix: corpus {i} yields no batch in a whole epoch (is it empty after its split filter?)")

    def __iter__(self) -> Iterator[dict]:
        while True:
            head = self._next(self.primary)
            if head is None:
                return
            parts = [head if i == self.primary else self._next(i) for i in range(len(self.loaders))]
            yield concat_batches(parts, self.primary)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` of the primary corpus (the others keep their own positions)."""
        self.loaders[self.primary].set_epoch(epoch)
        self._its[self.primary] = None

    def state_dict(self) -> dict:
        return {"mix": {"weights": self.weights, "sizes": self.sizes, "primary": self.primary},
                "corpora": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, d: dict) -> None:
        if "corpora" not in d or len(d["corpora"]) != len(self.loaders):
            got = len(d.get("corpora", [])) if isinstance(d, dict) else "?"
            raise ValueError(f"mix state: saved for {got} corpora, this mix has {len(self.loaders)}; "
                             "resume with the same corpora in the same order")
        for ld, st in zip(self.loaders, d["corpora"]):
            ld.load_state_dict(st)
        self._its = [None] * len(self.loaders)
