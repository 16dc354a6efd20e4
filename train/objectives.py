"""Pretraining objectives, their masks and augmentations, held-out metrics, and the EMA hook.

Every random draw comes from an explicit generator, so a step's masks and noise depend only on
(seed, rank, step): resume is exact without saving mask RNG state. Dropout uses the global RNG,
which the trainer seeds per step.

``objective_step`` (training) and ``evaluate_batch`` (held-out metrics) take the model or the
DeepSpeed engine, the run config, the inputs of ``data_loader.model_inputs`` (``x``,
``expressed``; ``library_size`` for the contrastive noise) and a generator. ``after_step`` must be
called after every ``engine.step()``: it moves the BYOL target and is a no-op otherwise.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scpretrain.scmodels.performer import MASK_TOKEN

KINDS = ("auto", "masked_bins", "random_mask", "gene_programme", "isolated", "byol", "barlow")
FAMILY_KINDS = {"mae": ("random_mask", "gene_programme", "isolated", "byol", "barlow"), "performer": ("masked_bins",)}
CONTRASTIVE = ("byol", "barlow")
_DEFAULT_MASK_PROB = {"random_mask": 0.5, "masked_bins": 0.15, "byol": 0.2, "barlow": 0.2}


# what the objectives call: a DeepSpeed engine, the bf16 view of one, or a plain module
Model = Callable[..., Any]

def resolve_kind(family: str, kind: str) -> str:
    """``auto`` -> the family's reference objective; a kind the family cannot train is an error."""
    if kind == "auto":
        return "masked_bins" if family == "performer" else "random_mask"
    if kind not in KINDS:
        raise ValueError(f"objective.kind: {kind!r} is not one of {', '.join(KINDS)}")
    if kind not in FAMILY_KINDS.get(family, ()):
        raise ValueError(f"objective.kind: {kind!r} does not apply to model.family={family!r}; "
                         f"use one of {', '.join(FAMILY_KINDS[family])} (or auto)")
    return kind


def mask_prob_for(kind: str, mask_prob: float | None) -> float:
    return _DEFAULT_MASK_PROB.get(kind, 0.0) if mask_prob is None else mask_prob


# ---- gene programmes ---------------------------------------------------------------------------

@dataclass
class Programmes:
    """Gene sets as vocabulary columns: ``genes`` (flat) with ``owner`` (programme of each entry)."""

    names: list[str]
    genes: torch.Tensor  # long [nnz]
    owner: torch.Tensor  # long [nnz]
    n_genes: int

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device: torch.device | str) -> Programmes:
        return Programmes(self.names, self.genes.to(device), self.owner.to(device), self.n_genes)

    def columns(self, chosen: torch.Tensor) -> torch.Tensor:
        """bool [G]: the genes of the programmes where ``chosen`` (bool [P]) is True."""
        out = torch.zeros(self.n_genes, dtype=torch.bool, device=self.genes.device)
        return out.index_fill_(0, self.genes[chosen[self.owner]], True)


def read_gmt(path: str | Path) -> list[tuple[str, list[str]]]:
    """GMT: one gene set a line, ``name<TAB>description<TAB>gene1<TAB>gene2...``."""
    sets = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            raise ValueError(f"{path}: line {lineno} has {len(parts)} tab-separated fields; a GMT line is "
                             "name<TAB>description<TAB>gene1<TAB>gene2...")
        sets.append((parts[0], [g.strip() for g in parts[2:] if g.strip()]))
    if not sets:
        raise ValueError(f"{path}: no gene sets; objective.gmt must name a GMT file")
    return sets


def load_programmes(path: str | Path, vocab: list[tuple[str, str]]) -> Programmes:
    """Map a GMT file's gene names to vocabulary columns (by id or symbol, whichever matches more);
    programmes with no gene in the vocabulary are dropped."""
    from scpretrain.train.gene_embedding import align_names

    sets = read_gmt(path)
    names_flat = sorted({g for _, genes in sets for g in genes})
    col_of_row, _ = align_names(names_flat, vocab)
    col_of_name = {names_flat[r]: c for c, r in enumerate(col_of_row.tolist()) if r >= 0}
    keep, genes, owner = [], [], []
    for name, members in sets:
        cols = sorted({col_of_name[g] for g in members if g in col_of_name})
        if cols:
            owner += [len(keep)] * len(cols)
            genes += cols
            keep.append(name)
    if not keep:
        raise ValueError(f"{path}: no gene of any programme is in the vocabulary; use gene sets named by the "
                         "corpus's gene ids or symbols")
    return Programmes(keep, torch.tensor(genes, dtype=torch.long), torch.tensor(owner, dtype=torch.long), len(vocab))


def programme_mask(progs: Programmes, gen: torch.Generator, rate: float) -> torch.Tensor:
    """bool [G], True = masked: ``int(P * rate)`` programmes (at least one) drawn without
    replacement, every gene of each masked; one mask for the whole batch (the reference's)."""
    k = max(1, int(len(progs) * rate))
    chosen = torch.zeros(len(progs), dtype=torch.bool, device=progs.genes.device)
    chosen[torch.randperm(len(progs), generator=gen, device=gen.device)[:k].to(chosen.device)] = True
    return progs.columns(chosen)


def isolated_keep(progs: Programmes, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """bool [G], True = kept: the genes of one programme drawn uniformly; everything else is masked."""
    i = int(torch.randint(len(progs), (1,), generator=gen, device=gen.device))
    chosen = torch.zeros(len(progs), dtype=torch.bool, device=progs.genes.device)
    chosen[i] = True
    return progs.columns(chosen), i


# ---- masked reconstruction ---------------------------------------------------------------------

def masked_mse(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               reference_divisor: bool = False) -> torch.Tensor:
    """Squared error summed over masked entries, divided by their number (or, as the reference
    code did, by all entries)."""
    mask = mask.expand_as(target)
    sq = (recon.float() - target.float()) ** 2 * mask
    return sq.sum() / (mask.numel() if reference_divisor else mask.sum().clamp_min(1))


def random_mask(x: torch.Tensor, gen: torch.Generator, mask_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, mask): ``mask_prob`` of the entries masked, kept entries rescaled by 1/(1-p)."""
    mask = torch.rand(x.shape, generator=gen, device=x.device) < mask_prob
    return x.masked_fill(mask, 0.0) / (1.0 - mask_prob), mask


def gene_mask(x: torch.Tensor, masked: torch.Tensor, rescale: bool) -> torch.Tensor:
    """The input with the genes where ``masked`` (bool [G]) zeroed in every cell; ``rescale`` multiplies kept
    inputs by 1/(1 - masked share), as random masking does."""
    inp = x.masked_fill(masked, 0.0)
    return inp / (1.0 - masked.float().mean()).clamp_min(1e-3) if rescale else inp


def mae_random_mask(model: Model, x: torch.Tensor, gen: torch.Generator, mask_prob: float,
                    reference_divisor: bool = False) -> tuple[torch.Tensor, dict]:
    """Random masking (p), kept inputs rescaled by 1/(1-p); MSE over masked entries (``reference_divisor``:
    divided by all entries, as the reference code did, not the paper)."""
    return MaskedReconstruction("random_mask", mask_prob, reference_divisor=reference_divisor).loss(model, {"x": x}, gen)


def mae_gene_programme(model: Model, x: torch.Tensor, gen: torch.Generator, progs: Programmes, rate: float,
                       reference_divisor: bool = False) -> tuple[torch.Tensor, dict]:
    return MaskedReconstruction("gene_programme", programmes=progs, programme_rate=rate,
                                reference_divisor=reference_divisor).loss(model, {"x": x}, gen)


def mae_isolated(model: Model, x: torch.Tensor, gen: torch.Generator, progs: Programmes,
                 reference_divisor: bool = False) -> tuple[torch.Tensor, dict]:
    """Keep one programme, reconstruct every other gene (``MaskedReconstruction``, kind isolated)."""
    return MaskedReconstruction("isolated", programmes=progs, reference_divisor=reference_divisor).loss(
        model, {"x": x}, gen)


def _bins_mask(tokens, expressed, gen, mask_prob, keep_prob):
    G = expressed.shape[1]
    chosen = (torch.rand(expressed.shape, generator=gen, device=tokens.device) < mask_prob) & expressed
    keep = torch.rand(expressed.shape, generator=gen, device=tokens.device) < keep_prob
    inp = tokens.clone()
    inp[:, :G] = torch.where(chosen & ~keep, torch.full_like(tokens[:, :G], MASK_TOKEN), tokens[:, :G])
    return inp, chosen


def performer_masked_bins(model: Model, tokens: torch.Tensor, expressed: torch.Tensor, gen: torch.Generator,
                          mask_prob: float, keep_prob: float) -> tuple[torch.Tensor, dict]:
    """Mask ``mask_prob`` of the expressed genes; of those, ``keep_prob`` stay unchanged and the
    rest become [MASK]. Cross-entropy over the masked positions only."""
    G = expressed.shape[1]
    inp, chosen = _bins_mask(tokens, expressed, gen, mask_prob, keep_prob)
    logits = model(inp)[:, :G]
    target = tokens[:, :G][chosen]
    if target.numel() == 0:  # no expressed gene drawn: a zero loss that still touches every weight
        return logits.sum() * 0.0, {"masked_acc": torch.tensor(0.0), "masked_frac": torch.tensor(0.0)}
    pred = logits[chosen]
    loss = F.cross_entropy(pred.float(), target)
    return loss, {"masked_acc": masked_accuracy(pred, target).detach(), "masked_frac": chosen.float().mean().detach()}


# ---- contrastive -------------------------------------------------------------------------------

def nb_noise(x: torch.Tensor, library_size: torch.Tensor | None, theta: float, gen: torch.Generator,
             target_sum: float = 1e4) -> torch.Tensor:
    """Resample a log1p-normalized batch with negative-binomial noise and re-preprocess it.

    Counts are recovered exactly as expm1(x) * library_size / target_sum, then drawn from
    NB(mean = count, var = mean + mean^2 / theta) as a Gamma-Poisson mixture, normalized to
    ``target_sum`` and log1p'd again. Without ``library_size`` the normalized values are taken as
    the counts (depth ``target_sum``), which understates the Poisson noise of shallower cells.
    (The reference added log1p-normalized NB draws that ignore the cell's own counts.)
    """
    scale = (library_size.float() / target_sum)[:, None] if library_size is not None else 1.0
    mu = torch.expm1(x.float()).clamp_min(0) * scale
    if theta > 0:
        g = torch._standard_gamma(torch.full_like(mu, theta), generator=gen)
        mu = g * (mu / theta)
    counts = torch.poisson(mu, generator=gen)
    totals = counts.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.log1p(counts * (target_sum / totals)).to(x.dtype)


def augment(x: torch.Tensor, library_size: torch.Tensor | None, gen: torch.Generator, mask_prob: float,
            theta: float) -> torch.Tensor:
    """One view: NB noise (``theta`` > 0), then random masking of ``mask_prob`` of the entries with
    kept entries rescaled by 1/(1-p)."""
    v = nb_noise(x, library_size, theta, gen) if theta > 0 else x
    if mask_prob > 0:
        m = torch.rand(x.shape, generator=gen, device=x.device) < mask_prob
        v = v.masked_fill(m, 0.0) / (1.0 - mask_prob)
    return v


def byol_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric BYOL: (2 - 2 cos(p1, t2)) + (2 - 2 cos(p2, t1)), mean over cells; targets carry no gradient."""
    def one(p, t):
        return 2 - 2 * F.cosine_similarity(p.float(), t.detach().float(), dim=-1)

    return (one(out["p1"], out["t2"]) + one(out["p2"], out["t1"])).mean()


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lam: float, eps: float = 1e-5) -> torch.Tensor:
    """Barlow twins: cross-correlation C of the batch-standardized projections; sum (1 - C_ii)^2 +
    lam * sum_{i != j} C_ij^2. Per rank (the reference did not all-reduce C either)."""
    def std(z):
        z = z.float()
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)

    c = std(z1).T @ std(z2) / z1.shape[0]
    diag = torch.diagonal(c)
    return ((diag - 1) ** 2).sum() + lam * ((c**2).sum() - (diag**2).sum())


def contrastive_step(model: Model, kind: str, x: torch.Tensor, library_size: torch.Tensor | None,
                     gen: torch.Generator, mask_prob: float, theta: float, lam: float) -> tuple[torch.Tensor, dict]:
    """Two augmented views through a ``ContrastiveMAE`` (or the engine wrapping one)."""
    v1 = augment(x, library_size, gen, mask_prob, theta)
    v2 = augment(x, library_size, gen, mask_prob, theta)
    out = model(v1, v2)
    if kind == "byol":
        loss = byol_loss(out)
    else:
        loss = barlow_loss(out["z1"], out["z2"], lam)
    with torch.no_grad():
        cos = F.cosine_similarity(out["z1"].float(), out["z2"].float(), dim=-1).mean()
    return loss, {"view_cos": cos}


def after_step(model: Model) -> None:
    """Call after every ``engine.step()`` (every micro-batch; it checks the boundary itself).

    Moves the BYOL target toward the online network when the optimizer really stepped (DeepSpeed's
    ``was_step_applied``: false between accumulation boundaries and on skipped steps). Identical on
    every rank (the online weights are). Under ZeRO-3 the online weights are gathered for the
    update. A no-op for every other objective.
    """
    if hasattr(model, "was_step_applied") and not model.was_step_applied():
        return
    module = getattr(model, "module", model)
    if getattr(module, "target", None) is None:
        return
    params = list(module.online().parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            module.update_target()
    else:
        module.update_target()


# ---- held-out metrics (pure functions) ---------------------------------------------------------

def masked_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == target).float().mean()


def pearson_r(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float().flatten(), b.float().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)


def alignment(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Wang & Isola: mean squared distance between the L2-normalized embeddings of two views (lower: better)."""
    f1, f2 = F.normalize(f1.float(), dim=-1), F.normalize(f2.float(), dim=-1)
    return (f1 - f2).pow(2).sum(-1).mean()


def uniformity(f: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola: log mean exp(-t ||fi - fj||^2) over distinct pairs of normalized embeddings (lower: more uniform)."""
    f = F.normalize(f.float(), dim=-1)
    d2 = torch.pdist(f).pow(2)
    return torch.log(torch.exp(-t * d2).mean())


# ---- objectives by name: the training loss and the held-out metrics of each kind together -------------------

class Objective:
    """One pretraining objective: ``loss`` on a training micro-batch and ``metrics`` on a held-out one (eval
    mode, no gradients; the same masking). Inputs come from ``data_loader.model_inputs``."""

    name = ""

    def loss(self, model: Model, inputs: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def metrics(self, model: Model, inputs: dict, gen: torch.Generator) -> dict[str, float]:
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def register(*names: str) -> Callable[[type[Objective]], type[Objective]]:
    def add(cls: type[Objective]) -> type[Objective]:
        for n in names:
            OBJECTIVES[n] = cls
        return cls
    return add


@register("masked_bins")
@dataclass
class MaskedBins(Objective):
    """scBERT: ``mask_prob`` of the expressed genes chosen, ``keep_prob`` of those left unchanged, the rest
    [MASK]; cross-entropy and accuracy over the chosen positions."""

    mask_prob: float
    keep_prob: float
    name: str = "masked_bins"

    def loss(self, model: Model, inputs: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        return performer_masked_bins(model, inputs["x"], inputs["expressed"], gen, self.mask_prob, self.keep_prob)

    def metrics(self, model: Model, inputs: dict, gen: torch.Generator) -> dict[str, float]:
        x, expressed = inputs["x"], inputs["expressed"]
        inp, chosen = _bins_mask(x, expressed, gen, self.mask_prob, self.keep_prob)
        G = expressed.shape[1]
        logits, target = model(inp)[:, :G][chosen], x[:, :G][chosen]
        if target.numel() == 0:
            return {"loss": float("nan"), "masked_acc": float("nan")}
        return {"loss": float(F.cross_entropy(logits.float(), target)), "masked_acc": float(masked_accuracy(logits, target))}


@register("random_mask", "gene_programme", "isolated")
@dataclass
class MaskedReconstruction(Objective):
    """The MAE: mask entries (random_mask), whole gene programmes (gene_programme) or all but one programme
    (isolated) and reconstruct them; MSE over the masked entries (and Pearson r held out)."""

    name: str
    mask_prob: float = 0.5
    programmes: Programmes | None = None
    programme_rate: float = 0.25
    reference_divisor: bool = False

    def mask(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, mask), the mask [B, G] or [G] (True = masked), drawn from ``gen``."""
        if self.name == "random_mask":
            return random_mask(x, gen, self.mask_prob)
        if self.programmes is None:
            raise ValueError(f"objective.gmt: objective.kind={self.name!r} needs a GMT file of gene programmes")
        if self.programmes.genes.device != x.device:  # moved once, not at every step
            self.programmes = self.programmes.to(x.device)
        progs = self.programmes
        if self.name == "gene_programme":
            masked = programme_mask(progs, gen, self.programme_rate)
            return gene_mask(x, masked, True), masked
        # isolated: no rescale, the input is one programme, not a thinned cell (1/(1 - share) would be ~100x)
        masked = ~isolated_keep(progs, gen)[0]
        return gene_mask(x, masked, False), masked

    def loss(self, model: Model, inputs: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        x = inputs["x"]
        inp, mask = self.mask(x, gen)
        return masked_mse(model(inp), x, mask, self.reference_divisor), {"masked_frac": mask.float().mean().detach()}

    def metrics(self, model: Model, inputs: dict, gen: torch.Generator) -> dict[str, float]:
        x = inputs["x"]
        inp, mask = self.mask(x, gen)
        mask = mask.expand_as(x)
        recon = model(inp)
        mse = float(masked_mse(recon, x, mask))
        return {"loss": mse, "masked_mse": mse, "masked_pearson": float(pearson_r(recon[mask], x[mask]))}


@register("byol", "barlow")
@dataclass
class Contrastive(Objective):
    """Two augmented views (NB noise + masking) through a ``ContrastiveMAE``: BYOL or Barlow twins; held out,
    the loss and the alignment / uniformity of the encoder's embeddings (at most 2,048 cells)."""

    name: str
    mask_prob: float = 0.2
    nb_dispersion: float = 10.0
    lambda_barlow: float = 0.0051

    def loss(self, model: Model, inputs: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        if getattr(getattr(model, "module", model), "head_cfg", None) is None:
            raise ValueError(f"objective.kind={self.name!r} needs the contrastive model build_model_for makes "
                             "(train.contrastive.ContrastiveMAE)")
        return contrastive_step(model, self.name, inputs["x"], inputs.get("library_size"), gen, self.mask_prob,
                                self.nb_dispersion, self.lambda_barlow)

    def metrics(self, model: Model, inputs: dict, gen: torch.Generator) -> dict[str, float]:
        x, lib = inputs["x"][:2048], inputs.get("library_size")
        lib = lib[:2048] if lib is not None else None
        v1 = augment(x, lib, gen, self.mask_prob, self.nb_dispersion)
        v2 = augment(x, lib, gen, self.mask_prob, self.nb_dispersion)
        out = model(v1, v2)
        loss = byol_loss(out) if self.name == "byol" else barlow_loss(out["z1"], out["z2"], self.lambda_barlow)
        enc = getattr(model, "module", model).encode
        e1, e2 = enc(v1), enc(v2)
        return {"loss": float(loss), "alignment": float(alignment(e1, e2)), "uniformity": float(uniformity(e1))}


def build_objective(family: str, o: Any, programmes: Programmes | None = None,
                    vocab: list[tuple[str, str]] | None = None) -> Objective:
    """The objective ``o`` (an ``ObjectiveConfig``) names for ``family``; gene programmes from ``programmes`` or
    read once here from ``o.gmt`` against ``vocab`` (the corpus's vocab.tsv)."""
    kind = resolve_kind(family, o.kind)
    p = mask_prob_for(kind, o.mask_prob)
    if kind == "masked_bins":
        return MaskedBins(p, o.keep_prob)
    if kind in CONTRASTIVE:
        return Contrastive(kind, p, o.nb_dispersion, o.lambda_barlow)
    if programmes is None and kind != "random_mask" and o.gmt and vocab is not None:
        programmes = load_programmes(o.gmt, vocab)
    return MaskedReconstruction(kind, p, programmes, o.programme_mask_rate, o.reference_loss_divisor)


def objective_step(model: Model, cfg: Any, inputs: dict, gen: torch.Generator,
                   programmes: Programmes | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of ``cfg.objective.kind`` on one micro-batch, and scalar extras to log (builds the objective
    each call: the training loop builds it once with ``build_objective``)."""
    return build_objective(cfg.model.family, cfg.objective, programmes).loss(model, inputs, gen)


@torch.no_grad()
def held_out_metrics(objective: Objective, model: Model, inputs: dict, gen: torch.Generator) -> dict[str, float]:
    """``objective.metrics`` in eval mode (dropout off; the Performer's redraw counter does not move), the
    previous mode restored. Pass a fixed generator so numbers are comparable across steps."""
    was_training = model.training
    model.eval()
    try:
        return objective.metrics(model, inputs, gen)
    finally:
        model.train(was_training)


def evaluate_batch(model: Model, cfg: Any, inputs: dict, gen: torch.Generator,
                   programmes: Programmes | None = None) -> dict[str, float]:
    """Held-out metrics of the run's objective on one batch. masked_bins: ``loss``, ``masked_acc``. MAE
    masking kinds: ``loss`` (= masked-entry MSE), ``masked_mse``, ``masked_pearson``. byol/barlow: ``loss``,
    ``alignment``, ``uniformity``."""
    return held_out_metrics(build_objective(cfg.model.family, cfg.objective, programmes), model, inputs, gen)


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1))
    return g
