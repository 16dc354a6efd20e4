"""The seed projects' published weights, in and out of our export format.

* **scBERT** (TencentAILabHealthcare/scBERT): ``torch.save({'epoch', 'model_state_dict', ...})`` of a
  performer-pytorch ``PerformerLM`` with a gene2vec position embedding (``pos_emb.emb.weight``, n_genes + 1
  rows, the last one zeros). Its fine-tuned file replaces ``to_out`` with a conv head (``to_out.conv1`` ...
  ``to_out.fc3``), which becomes our ``scbert`` annotation head.
* **ssl_in_scg** (theislab/ssl_in_scg): a Lightning checkpoint (``state_dict``) or a bare state dict of an
  ``MLPAutoEncoder`` (``encoder.{0,3,..}``, ``decoder.0.{0,3,..}`` + sigmoid) or an ``MLPClassifier``
  (``classifier.{0,3,..}``, ReLU), which becomes an encoder-only MAE plus a ``linear`` head.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so loading never
runs code stored in the file. Every shape is checked before anything is written; the export is written
atomically (``train.export.write_export``), with what was kept and dropped in its README.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scpretrain.scmodels.atomic import file_sha256

SOURCES = ("scbert", "ssl_in_scg")
SCBERT_HIDDEN = (512, 128)  # scBERT's conv head: fc1 -> 512, fc2 -> 128 (evaluate.heads.ScBertNet)


class WeightsError(ValueError):
    """A checkpoint or gene list that cannot be imported; the message names the file, the key and the fix."""


@dataclass
class Imported:
    """Our side of an imported checkpoint: what ``write_export`` and a head need."""

    family: str
    hparams: dict
    state: dict[str, torch.Tensor]
    head_kind: str | None = None  # "scbert" | "linear" when the file was a fine-tuned classifier
    head_state: dict[str, torch.Tensor] = field(default_factory=dict)
    n_classes: int = 0
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


# --- reading files -----------------------------------------------------------------------------------

def safe_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers; anything else is refused, unexecuted."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global[: ]+([\w.]+)", str(e), re.I)
        what = f"the object {found.group(1)}" if found else "objects other than tensors and plain containers"
        raise WeightsError(f"--checkpoint {path}: refused: unpickling it would build {what}, i.e. run code from "
                           "the file; re-save only its tensors (torch.save(model.state_dict(), ...)) where you "
                           "trust the file") from None
    except Exception as e:  # noqa: BLE001 - zip, EOF and format errors of a file that is not a checkpoint
        raise WeightsError(f"--checkpoint {path}: not a torch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None


def state_dict_of(obj: Any, path: Path, source: str) -> dict[str, torch.Tensor]:
    """The model's tensors inside a loaded checkpoint (scBERT: ``model_state_dict``; Lightning: ``state_dict``;
    or a bare state dict), a DDP ``module.`` prefix dropped."""
    sd = obj
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict"):
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"--checkpoint {path}: no state dict found (expected a dict of tensors, or one under "
                           f"'model_state_dict' / 'state_dict'); is this a {source} checkpoint?")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def read_gene_list(path: str | Path) -> list[tuple[str, str]]:
    """[(gene_id, symbol)] in model order from a text file (one name per line), a TSV/CSV with a header
    (gene_id / feature_id and symbol / feature_name columns, else the first column), an h5ad (var_names)
    or a parquet with ``feature_id`` / ``feature_name`` (scTab's var.parquet)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--genes {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        import anndata

        var = anndata.read_h5ad(path, backed="r").var
        names = [str(x) for x in var.index]
        sym = next((c for c in ("feature_name", "gene_symbols", "symbol") if c in var.columns), None)
        return list(zip(names, [str(x) for x in var[sym]] if sym else names))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        cols = table.column_names
        ids = next((c for c in ("feature_id", "gene_id") if c in cols), cols[0])
        sym = next((c for c in ("feature_name", "symbol") if c in cols), ids)
        return list(zip(map(str, table.column(ids).to_pylist()), map(str, table.column(sym).to_pylist())))
    lines = [ln.rstrip("\r\n") for ln in path.read_text().splitlines() if ln.strip()]
    sep = "\t" if "\t" in (lines[0] if lines else "") else ("," if suffix == ".csv" else None)
    if sep is None:
        return [(ln.strip(), ln.strip()) for ln in lines]
    header = [h.strip().lower() for h in lines[0].split(sep)]
    ids = next((header.index(c) for c in ("gene_id", "feature_id", "ensembl_id") if c in header), 0)
    sym = next((header.index(c) for c in ("symbol", "feature_name", "gene_symbol") if c in header), ids)
    rows = [ln.split(sep) for ln in lines[1:]]
    return [(r[ids].strip(), r[sym].strip()) for r in rows]


def read_labels(path: str | Path) -> list[str]:
    """Class names in output order: a text file (one per line) or a parquet's ``label`` / first column."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--labels {path}: no such file")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        col = "label" if "label" in table.column_names else table.column_names[0]
        return [str(x) for x in table.column(col).to_pylist()]
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


# --- checks ------------------------------------------------------------------------------------------

def _need(sd: dict, key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if key not in sd:
        raise WeightsError(f"--checkpoint {path}: key {key!r} is missing (expected shape {list(shape)}); the file "
                           "is incomplete or another architecture")
    if tuple(sd[key].shape) != tuple(shape):
        raise WeightsError(f"--checkpoint {path}: key {key!r} has shape {list(sd[key].shape)}, expected "
                           f"{list(shape)}")
    return sd[key]


def _linears(sd: dict, prefix: str, path: Path) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(index, weight, bias) of the Linear layers ``prefix{i}.weight`` in order."""
    idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", k)))
    if not idx:
        raise WeightsError(f"--checkpoint {path}: key {prefix}0.weight is missing; the file is not this layout")
    out = []
    for i in idx:
        w = sd[f"{prefix}{i}.weight"]
        if w.ndim != 2:
            raise WeightsError(f"--checkpoint {path}: key '{prefix}{i}.weight' has shape {list(w.shape)}, expected "
                               "a 2-d Linear weight")
        b = _need(sd, f"{prefix}{i}.bias", (w.shape[0],), path)
        out.append((i, w, b))
    for (_, w0, _), (j, w1, _) in zip(out, out[1:]):
        if w1.shape[1] != w0.shape[0]:
            raise WeightsError(f"--checkpoint {path}: key '{prefix}{j}.weight' has shape {list(w1.shape)}, expected "
                               f"[*, {w0.shape[0]}] (the previous layer's width)")
    return out


def _check_genes(genes: list[tuple[str, str]], n: int, path: Path, genes_path: Path, what: str) -> None:
    if len(genes) != n:
        raise WeightsError(f"--genes {genes_path}: {len(genes)} genes, but {path} has {n} ({what}); pass the "
                           "gene list the weights were trained with, in their order")


def _leftover(sd: dict, used: set[str], path: Path) -> None:
    extra = sorted(set(sd) - used)
    if extra:
        raise WeightsError(f"--checkpoint {path}: {len(extra)} key(s) this layout does not have, e.g. {extra[:3]}; "
                           "is this the right --from?")


# --- scBERT ------------------------------------------------------------------------------------------

_L0 = "performer.net.layers.0."


def _scbert_dims(sd: dict, path: Path) -> dict:
    """Hyperparameters read off the tensors' shapes (every shape is then checked against them)."""
    for key in ("token_emb.weight", _L0 + "0.fn.to_q.weight", _L0 + "0.fn.fast_attention.projection_matrix",
                _L0 + "1.fn.fn.w1.weight"):
        if key not in sd:
            raise WeightsError(f"--checkpoint {path}: key {key!r} is missing; not a scBERT PerformerLM state dict")
        if sd[key].ndim != 2:
            raise WeightsError(f"--checkpoint {path}: key {key!r} has shape {list(sd[key].shape)}, expected 2-d")
    n_tokens, dim = sd["token_emb.weight"].shape
    inner = sd[_L0 + "0.fn.to_q.weight"].shape[0]
    nb_features, dim_head = sd[_L0 + "0.fn.fast_attention.projection_matrix"].shape
    if inner % dim_head:
        raise WeightsError(f"--checkpoint {path}: key '{_L0}0.fn.to_q.weight' has {inner} rows, not a multiple of "
                           f"dim_head {dim_head} (projection_matrix columns)")
    depth = len({m.group(1) for k in sd if (m := re.match(r"performer\.net\.layers\.(\d+)\.", k))})
    return {"dim": dim, "depth": depth, "heads": inner // dim_head, "dim_head": dim_head,
            "nb_features": nb_features, "ff_mult": sd[_L0 + "1.fn.fn.w1.weight"].shape[0] // dim,
            "n_tokens": n_tokens, "qkv_bias": _L0 + "0.fn.to_q.bias" in sd}


def _scbert_layer_shapes(h: dict) -> dict[str, tuple[int, ...]]:
    d, inner, ff = h["dim"], h["heads"] * h["dim_head"], h["dim"] * h["ff_mult"]
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(h["depth"]):
        a, f = f"performer.net.layers.{i}.0.", f"performer.net.layers.{i}.1."
        shapes.update({a + "norm.weight": (d,), a + "norm.bias": (d,),
                       a + "fn.fast_attention.projection_matrix": (h["nb_features"], h["dim_head"]),
                       a + "fn.to_out.weight": (d, inner), a + "fn.to_out.bias": (d,),
                       f + "norm.weight": (d,), f + "norm.bias": (d,), f + "fn.fn.w1.weight": (ff, d),
                       f + "fn.fn.w1.bias": (ff,), f + "fn.fn.w2.weight": (d, ff), f + "fn.fn.w2.bias": (d,)})
        for x in "qkv":
            shapes[a + f"fn.to_{x}.weight"] = (inner, d)
            if h["qkv_bias"]:
                shapes[a + f"fn.to_{x}.bias"] = (inner,)
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    return shapes


def import_scbert(sd: dict, path: Path, genes: list[tuple[str, str]], genes_path: Path,
                  gene2vec: np.ndarray | None = None) -> Imported:
    h = _scbert_dims(sd, path)
    d = h["dim"]
    if gene2vec is not None:
        table = torch.from_numpy(np.asarray(gene2vec))
        if table.shape[0] == len(genes):  # the .npy as published (n_genes rows): append the zero pad row
            table = torch.cat([table, table.new_zeros(1, table.shape[1])])
    else:
        table = sd.get("pos_emb.emb.weight")
        if table is None:
            raise WeightsError(f"--checkpoint {path}: key 'pos_emb.emb.weight' (the gene2vec table) is missing; "
                               "pass the gene2vec .npy with --gene2vec")
    if table.ndim != 2 or table.shape[1] != d:
        raise WeightsError(f"gene2vec table ({'--gene2vec' if gene2vec is not None else 'pos_emb.emb.weight'}) has "
                           f"shape {list(table.shape)}, expected [n_genes + 1, {d}]")
    n_genes = table.shape[0] - 1
    _check_genes(genes, n_genes, path, genes_path, "pos_emb rows - 1: scBERT appends one zero position")
    state: dict[str, torch.Tensor] = {"token_emb.weight": sd["token_emb.weight"],
                                      "gene_emb.weight": table.to(torch.float32)}
    for key, shape in _scbert_layer_shapes(h).items():
        state[key] = _need(sd, key, shape, path)
    used = (set(state) - {"gene_emb.weight"}) | ({"pos_emb.emb.weight", "performer.calls_since_last_redraw"} & set(sd))
    state["performer.proj_updater.calls_since_last_redraw"] = sd.get("performer.calls_since_last_redraw",
                                                                     torch.tensor(0)).long()
    state["forward_calls"], state["redraws"] = torch.tensor(0), torch.tensor(0)
    hparams = {"n_genes": n_genes, **h, "dropout": 0.0, "freeze_gene_embedding": True}
    out = Imported("performer", hparams, state)
    if gene2vec is not None and "pos_emb.emb.weight" in sd:
        out.dropped.append("pos_emb.emb.weight (replaced by --gene2vec)")
    if "to_out.conv1.weight" in sd:  # the fine-tuned file: scBERT's conv head replaced the token head
        _scbert_head(sd, path, n_genes + 1, d, out)
        used |= {k for k in sd if k.startswith("to_out.")}
    else:
        out.state["to_out.weight"] = _need(sd, "to_out.weight", (h["n_tokens"], d), path)
        out.state["to_out.bias"] = _need(sd, "to_out.bias", (h["n_tokens"],), path)
        used |= {"to_out.weight", "to_out.bias"}
    _leftover(sd, used, path)
    out.kept = sorted(used)
    return out


def _scbert_head(sd: dict, path: Path, seq_len: int, d: int, out: Imported) -> None:
    conv = _need(sd, "to_out.conv1.weight", (1, 1, 1, d), path)
    fc3 = sd.get("to_out.fc3.weight", torch.empty(0, SCBERT_HIDDEN[1]))
    n = fc3.shape[0]
    h1, h2 = SCBERT_HIDDEN
    out.head_kind, out.n_classes = "scbert", n
    out.head_state = {
        "net.conv.weight": conv.reshape(1, d, 1), "net.conv.bias": _need(sd, "to_out.conv1.bias", (1,), path),
        "net.mlp.1.weight": _need(sd, "to_out.fc1.weight", (h1, seq_len), path),
        "net.mlp.1.bias": _need(sd, "to_out.fc1.bias", (h1,), path),
        "net.mlp.4.weight": _need(sd, "to_out.fc2.weight", (h2, h1), path),
        "net.mlp.4.bias": _need(sd, "to_out.fc2.bias", (h2,), path),
        "net.mlp.7.weight": _need(sd, "to_out.fc3.weight", (max(n, 1), h2), path),
        "net.mlp.7.bias": _need(sd, "to_out.fc3.bias", (max(n, 1),), path)}
    # the token head is gone in a fine-tuned file: zeros (embeddings and the head never use it)
    out.state["to_out.weight"] = torch.zeros(7, d)
    out.state["to_out.bias"] = torch.zeros(7)
    out.dropped.append("to_out (token head; absent from a fine-tuned file: written as zeros)")


# --- ssl_in_scg --------------------------------------------------------------------------------------

def import_ssl(sd: dict, path: Path, genes: list[tuple[str, str]], genes_path: Path) -> Imported:
    if "classifier.0.weight" in sd:
        return _import_ssl_classifier(sd, path, genes, genes_path)
    enc = _linears(sd, "encoder.", path)
    dec = _linears(sd, "decoder.0.", path)
    n_genes = enc[0][1].shape[1]
    _check_genes(genes, n_genes, path, genes_path, "columns of encoder.0.weight")
    hidden, latent = [w.shape[0] for _, w, _ in enc[:-1]], enc[-1][1].shape[0]
    want = [*reversed(hidden), n_genes]
    if [w.shape[0] for _, w, _ in dec] != want or dec[0][1].shape[1] != latent:
        raise WeightsError(f"--checkpoint {path}: decoder widths {[w.shape[0] for _, w, _ in dec]} do not mirror "
                           f"the encoder (expected {want}); our MAE needs a mirrored decoder")
    for prefix, layers in (("encoder.", enc), ("decoder.0.", dec)):
        if [i for i, _, _ in layers] != [3 * j for j in range(len(layers))]:
            raise WeightsError(f"--checkpoint {path}: Linear layers at {prefix}{[i for i, _, _ in layers]}, "
                               "expected every third index (Linear, SELU, Dropout)")
    state: dict[str, torch.Tensor] = {}
    for i, w, b in enc:
        state[f"encoder.{i}.weight"], state[f"encoder.{i}.bias"] = w, b
    for i, w, b in dec:
        state[f"decoder.{i}.weight"], state[f"decoder.{i}.bias"] = w, b
    used = {f"{p}{i}.{t}" for p, layers in (("encoder.", enc), ("decoder.0.", dec)) for i, _, _ in layers
            for t in ("weight", "bias")}
    _leftover(sd, used, path)
    hparams = {"n_genes": n_genes, "hidden": hidden, "latent": latent, "dropout": 0.1, "sigmoid_output": True}
    return Imported("mae", hparams, state, kept=sorted(used))


def _import_ssl_classifier(sd: dict, path: Path, genes: list[tuple[str, str]], genes_path: Path) -> Imported:
    layers = _linears(sd, "classifier.", path)
    if len(layers) < 2:
        raise WeightsError(f"--checkpoint {path}: one classifier layer only; expected hidden layers and an output")
    n_genes = layers[0][1].shape[1]
    _check_genes(genes, n_genes, path, genes_path, "columns of classifier.0.weight")
    *body, (last_i, last_w, last_b) = layers
    hidden, latent = [w.shape[0] for _, w, _ in body[:-1]], body[-1][1].shape[0]
    state = {}
    for j, (_, w, b) in enumerate(body):
        state[f"encoder.{3 * j}.weight"], state[f"encoder.{3 * j}.bias"] = w, b
    used = {f"classifier.{i}.{t}" for i, _, _ in layers for t in ("weight", "bias")}
    dropped = sorted(k for k in sd if k not in used and k in ("class_weights", "child_lookup"))
    _leftover(sd, used | set(dropped), path)
    hparams = {"n_genes": n_genes, "hidden": hidden, "latent": latent, "dropout": 0.1, "activation": "relu",
               "latent_activation": True, "decoder": False}
    return Imported("mae", hparams, state, head_kind="linear", n_classes=last_w.shape[0],
                    head_state={"mean": torch.zeros(latent), "std": torch.ones(latent), "net.0.weight": last_w,
                                "net.0.bias": last_b},
                    kept=sorted(used), dropped=[f"{k} (training-only buffer)" for k in dropped])


# --- writing -----------------------------------------------------------------------------------------

def import_weights(source: str, checkpoint: str | Path, genes_path: str | Path, out: str | Path,
                   gene2vec: str | Path | None = None, labels: str | Path | None = None) -> Path:
    """Read a published checkpoint, check it whole, and write our export (plus its head) atomically."""
    from scpretrain.scmodels.build import build_model, default_preprocessing
    from scpretrain.train.export import write_export

    if source not in SOURCES:
        raise WeightsError(f"--from {source!r}: not one of {', '.join(SOURCES)}")
    path, genes_path = Path(checkpoint), Path(genes_path)
    sd = state_dict_of(safe_load(path), path, source)
    genes = read_gene_list(genes_path)
    if source == "scbert":
        table = np.load(gene2vec, allow_pickle=False) if gene2vec else None
        imp = import_scbert(sd, path, genes, genes_path, table)
    else:
        imp = import_ssl(sd, path, genes, genes_path)
    classes = read_labels(labels) if labels and imp.head_kind else None
    if classes is not None and len(classes) != imp.n_classes:
        raise WeightsError(f"--labels {labels}: {len(classes)} classes, but the classifier in {path} has "
                           f"{imp.n_classes} outputs")
    model = build_model(imp.family, imp.hparams)  # the strict shape check of everything we keep
    missing, unexpected = model.load_state_dict(imp.state, strict=False)
    missing = [k for k in missing if ".proj_updater.instance." not in k]  # aliases of performer.net.*
    if missing or unexpected:
        raise WeightsError(f"--checkpoint {path}: internal mapping left {missing[:3]} unset / {unexpected[:3]} "
                           "unused; please report this file's layout")
    if imp.head_kind and classes is None:
        imp.dropped.append(f"the {imp.head_kind} classifier head ({imp.n_classes} classes): pass --labels to keep it")
    digest = file_sha256(path)
    provenance = {"imported_from": source, "source_file": str(path.resolve()), "source_sha256": digest,
                  "kept": len(imp.kept), "dropped": imp.dropped}
    notes = _card(source, path, digest, imp, genes_path)
    also = _head_writer(imp, classes, Path(out), source) if classes is not None else None
    return write_export(out, model.state_dict(), imp.family, imp.hparams, default_preprocessing(imp.family),
                        [(g, s) for g, s in genes], provenance, notes=notes, also=also)


def _card(source: str, path: Path, digest: str, imp: Imported, genes_path: Path) -> str:
    lines = ["## Imported weights", "", f"- source: {source}, file `{path.name}` (sha256 `{digest}`)",
             f"- gene list: `{genes_path.name}` ({imp.hparams['n_genes']} genes)",
             f"- kept: {len(imp.kept)} tensors", "- dropped: " + ("; ".join(imp.dropped) or "nothing"),
             "- everything else in the file (optimizer, scheduler, epoch, Lightning loops) is not read into the model"]
    if source == "scbert":
        lines.append("- scBERT filtered cells with fewer than 200 expressed genes before training "
                     "(`sc.pp.filter_cells(min_genes=200)`): do the same to cells you embed")
    return "\n".join(lines) + "\n"


def _head_writer(imp: Imported, classes: list[str], out: Path, source: str):
    """Writes ``heads/imported-<kind>`` into the export folder before it is swapped in."""
    from scpretrain.evaluate.heads import Head

    def write(tmp: Path) -> None:
        d = imp.hparams["dim"] if imp.family == "performer" else imp.hparams["latent"]
        head = Head(d, classes, kind=imp.head_kind, seq_len=imp.hparams["n_genes"] + 1 if imp.head_kind == "scbert"
                    else None, dropout=0.0,
                    export_info={"path": str(out), "family": imp.family, "embedding_key": f"X_{imp.family}",
                                 "vocab_sha256": json.loads((tmp / "config.json").read_text())["vocab_sha256"],
                                 "weights_sha256": file_sha256(tmp / "model.safetensors")})
        head.load_state_dict(imp.head_state, strict=True)
        head.training_info = {"imported_from": source}
        hd = tmp / "heads" / f"imported-{imp.head_kind}"
        hd.mkdir(parents=True)
        head.write_files(hd)

    return write


# --- export back -------------------------------------------------------------------------------------

def to_scbert(export: Any) -> dict:
    """Our Performer export as scBERT's ``save_ckpt`` dict (``model_state_dict`` with their keys)."""
    h = export.config["model"]
    if h.get("gene_embedding_dim") not in (None, h["dim"]):
        raise WeightsError(f"--export {export.path}: its gene table is {h['gene_embedding_dim']} wide with a learned "
                           f"projection to {h['dim']}; scBERT's PerformerLM has no such projection")
    if h.get("qkv_bias", True):
        raise WeightsError(f"--export {export.path}: its attention has q/k/v biases, scBERT's PerformerLM has none "
                           "(it would refuse the keys); pretrain with model.params.qkv_bias=false to export to scBERT")
    sd = export.module.state_dict()
    out = {"token_emb.weight": sd["token_emb.weight"], "pos_emb.emb.weight": sd["gene_emb.weight"].double(),
           "performer.calls_since_last_redraw": sd["performer.proj_updater.calls_since_last_redraw"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
           "to_out.weight": sd["to_out.weight"], "to_out.bias": sd["to_out.bias"]}
    out.update({k: v for k, v in sd.items() if k.startswith("performer.net.")})
    return {"epoch": 0, "model_state_dict": {k: v.clone() for k, v in out.items()}, "losses": []}


def to_ssl(export: Any) -> tuple[dict, list[str]]:
    """Our MAE export as an ssl_in_scg Lightning-style checkpoint; warnings where their code computes otherwise."""
    h = export.config["model"]
    if not h.get("decoder", True) or h.get("activation", "selu") != "selu" or h.get("latent_activation"):
        raise WeightsError(f"--export {export.path}: an encoder-only / ReLU MAE (an imported MLPClassifier) has no "
                           "MLPAutoEncoder layout to go back to")
    warnings = [] if h.get("sigmoid_output") else [
        "their MLPAutoEncoder ends the decoder with a sigmoid, this export's decoder is linear: encoder outputs "
        "(embeddings) are identical, reconstructions are not"]
    sd = export.module.state_dict()
    state = {k: v.clone() for k, v in sd.items() if k.startswith("encoder.")}
    state.update({"decoder.0." + k[len("decoder."):]: v.clone() for k, v in sd.items() if k.startswith("decoder.")})
    return ({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.0.0", "state_dict": state,
             "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}, warnings)


def export_weights(export_dir: str | Path, target: str, out: str | Path) -> tuple[Path, list[str]]:
    from scpretrain.evaluate.errors import EvaluateError
    from scpretrain.evaluate.export_io import load_export
    from scpretrain.scmodels.atomic import write_atomic

    if target not in SOURCES:
        raise WeightsError(f"--to {target!r}: not one of {', '.join(SOURCES)}")
    try:
        export = load_export(export_dir)
    except EvaluateError as e:
        raise WeightsError(str(e)) from None
    want = "performer" if target == "scbert" else "mae"
    if export.family != want:
        raise WeightsError(f"--export {export_dir}: a {export.family} export; --to {target} takes a {want} export")
    obj, warnings = (to_scbert(export), []) if target == "scbert" else to_ssl(export)
    buf = io.BytesIO()
    torch.save(obj, buf)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buf.getvalue())
    return out, warnings
