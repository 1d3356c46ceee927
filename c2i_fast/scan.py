"""Σ-gradient scan: one forward/backward over the selection sample → G = ∂L/∂W for every target matrix →
an fp32 SVD W = UΣVᵀ → gᵢ = ∂L/∂σᵢ = uᵢᵀ G vᵢ = diag(UᵀGV) → a score per matrix → the top-K.

We never autograd through the SVD (unstable for repeated σ): G comes from ordinary backprop with only the
target weights requiring grad, and the projection onto the singular vectors is one GEMM and a row-wise dot.

Scores (``score=``):

* ``first_order`` (default): the most negative first-order loss change over the ρ grid,
  min_ρ ΔL̂(ρ) with ΔL̂(ρ) = −Σ_{i>k(ρ)} σᵢ gᵢ. It is in loss units, so it compares matrices of different
  shapes, and it is the quantity a truncation actually changes to first order (METHOD.md Part 5: it tracks
  the measured change down to ρ ≈ 0.05). Lower is better.
* ``grad_norm``: −‖g‖₂, the "sensitivity" of the spectrum (no sign information; a simpler ablation).

SVDs (``svd=``): ``full`` (default) decomposes every matrix. ``randomized`` uses that the first-order change of a
truncation to rank k needs the top k triplets only, ΔL̂(ρ) = −Σ_{i≥k} σᵢgᵢ = Σ_{i<k} σᵢgᵢ − ⟨G, W⟩ (the σᵢgᵢ
sum to ⟨G, W⟩), so a matrix whose largest k = rank_for(max ρ) is at most ``RANDOMIZED_MAX_FRACTION`` of its
spectrum gets a batched randomized SVD of rank k (matrices of one shape in one call, c2i_fast.kernels
randomized_svd) and every other one a full SVD. The default ρ grid reaches ρ = 0.9 (k ≈ 0.9p): nothing to
gain there, so ``randomized`` then does what ``full`` does. The scores of the best ``RESCORE`` × top-K by the
randomized estimate, and of any matrix that reaches the top-K after that, are recomputed from a full SVD: the
top-K are ranked and scored, and their candidates built, exactly as with ``full``; a matrix whose estimate is
off by more than the margin between the K-th and the RESCORE·K-th could still be missed (tests/test_scan_rsvd).
``gram`` needs no SVD to score: with W (m, n), m ≤ n, and WWᵀ = UΣ²Uᵀ (a symmetric eigendecomposition of the
smaller Gram matrix, float32 like the SVDs), vᵢ = Wᵀuᵢ/σᵢ, so σᵢgᵢ = σᵢ uᵢᵀGvᵢ = uᵢᵀ(GWᵀ)uᵢ: every σᵢgᵢ
without a division (m > n: WᵀW = VΣ²Vᵀ and σᵢgᵢ = vᵢᵀ(WᵀG)vᵢ). ΔL̂(ρ) is a sum of them, so every score is the full SVD's up to
round-off; the top RESCORE·K are rescored from a full SVD as above (their candidates need its factors).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import distributed
from .decompose import SVD, count_nonfinite, rank_for, truncation_delta
from .errors import C2IError
from .evaluate import Scorer
from .models import MatrixRef, decoder_layers
from .replay import PrefixCache
from .svd import GramEigh, weight_gram_eigh

SCORES = ("first_order", "grad_norm")
SCAN_SVDS = ("full", "randomized", "gram")
# Randomized only where the grid needs at most this share of the triplets. Measured on SmolLM2's 210 matrices
# (CPU, 2 threads, CPU seconds of the SVD phase): ρ_max = 0.4 with a k + 8 wide sketch, 2 iterations: 163 s,
# as the full SVDs (163 s), with ΔL̂ off by up to 0.55; ρ_max = 0.1 with the sketch below: 110 s vs 168 s.
RANDOMIZED_MAX_FRACTION = 0.125
# sketch width 2k (oversample = k, at least 16) and 4 power iterations: weight spectra decay slowly, and a
# narrower sketch mixes the triplets around k (ΔL̂ off by ~10% at ℓ = k + 16, niter 2; tests/test_scan_rsvd)
RSVD_MIN_OVERSAMPLE, RSVD_NITER = 16, 4
RESCORE = 2                        # the best RESCORE·top_k by the randomized estimate get a full SVD


@dataclass
class MatrixScan:
    name: str
    layer: int
    type: str
    shape: tuple[int, int]
    g_sigma: torch.Tensor              # (p,) ∂L/∂σᵢ
    delta: dict[float, float]          # ρ → first-order ΔL̂ of plain truncation
    score: float                       # lower = more promising
    svd: SVD | None = None             # kept for the top-K only
    grad: torch.Tensor | None = None   # G (m, n), kept for the top-K only
    exact: bool = True                 # False: delta/score estimated (``estimate``), rescored if near the top
    estimate: str = "randomized"       # how, when not exact: "randomized" (g_sigma: the top k only) or "gram"

    def summary(self) -> dict:
        d = {"matrix": self.name, "layer": self.layer, "type": self.type, "shape": list(self.shape),
             "score": self.score, "first_order_delta": {str(k): v for k, v in self.delta.items()},
             "grad_sigma_norm": float(self.g_sigma.norm())}
        if not self.exact:
            d["svd"] = self.estimate
        return d


@dataclass
class ScanResult:
    matrices: list[MatrixScan]          # all scanned matrices, best score first
    loss: float                         # selection loss at the base weights
    loss_kind: str
    score_kind: str
    seconds: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)   # matrix → why it was left out (NaN/Inf weight or gradient)
    base: dict | None = None            # the base model's selection metrics, from the gradient pass's forward
    svds: dict = field(default_factory=dict)      # how many full / randomized SVDs, and full ones redone

    def top(self, k: int) -> list[MatrixScan]:
        return self.matrices[:k]


@contextmanager
def _checkpointing(model, on: bool):
    """Hugging Face gradient checkpointing only acts in train mode: switch it on with every dropout at p = 0,
    so the pass computes exactly the eval-mode function while storing fewer activations."""
    if not on:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise C2IError(f"{type(model).__name__} does not support gradient checkpointing")
    drops = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    was_training = model.training
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m, _ in drops:
        m.p = 0.0
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        for m, p in drops:
            m.p = p
        model.gradient_checkpointing_disable()


# Above this many bytes of layer outputs, the gradient pass does not keep every layer's input for the search
# (a separate base-model pass then captures the top-K layers only).
CAPTURE_ALL_BYTES = 4 << 30


def gradients(scorer: Scorer, refs: list[MatrixRef], loss_kind: str = "answer", progress: bool = True,
              checkpointing: bool = False, cache: PrefixCache | None = None,
              record: list | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """G = ∂L/∂W (in W's (out, in) layout, fp32) for each ref, from one pass over the scorer's batches.
    ``checkpointing`` recomputes activations in the backward pass instead of storing them (big models).
    With ``cache``, the forward also stores every layer's input in it, and ``record`` gets each batch's row
    stats (see :meth:`Scorer.loss_batches`)."""
    with _checkpointing(scorer.model, checkpointing):
        return _gradients(scorer, refs, loss_kind, progress, cache, record)


def _gradients(scorer: Scorer, refs: list[MatrixRef], loss_kind: str, progress: bool,
               cache: PrefixCache | None = None, record: list | None = None):
    model = scorer.model
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for r in refs:
        r.param.grad = None
        r.param.requires_grad_(True)
    capture = set(range(1, len(decoder_layers(model)))) if cache is not None else set()
    try:
        while True:      # out of memory on a batch: halve the batches, start the pass again
            total = 0.0
            for r in refs:
                r.param.grad = None
            if record is not None:
                record.clear()
            try:
                if distributed.size() > 1:
                    grads, total = _gradients_sharded(scorer, refs, loss_kind, progress)
                    break
                for loss in tqdm(scorer.loss_batches(loss_kind, cache, capture=capture, record=record),
                                 total=len(scorer.batches), desc="gradient scan", disable=not progress, leave=False):
                    if not torch.isfinite(loss):
                        raise C2IError(f"the {loss_kind} loss is not finite on the selection sample")
                    loss.backward()
                    total += float(loss.detach())
                grads = _take_grads(refs)
                break
            except torch.OutOfMemoryError as e:
                scorer.halve_batches(e)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved.get(n, False))
    return grads, total


def _take_grads(refs: list[MatrixRef]) -> dict[str, torch.Tensor]:
    grads = {}
    for r in refs:
        g = r.param.grad
        if g is None:
            g = torch.zeros_like(r.param)
        g = g.detach().float()
        grads[r.name] = (g.T if r.transposed else g).contiguous()
        r.param.grad = None
    return grads


def _gradients_sharded(scorer: Scorer, refs: list[MatrixRef], loss_kind: str, progress: bool):
    """Each rank backpropagates its share of the batches; per-batch gradients are gathered and summed in
    batch order — the order one process accumulates them in, so G is bit-identical."""
    local = {}
    for bi in distributed.mine(len(scorer.batches)):
        loss = next(iter(scorer.loss_batches(loss_kind, only={bi})))
        if not torch.isfinite(loss):
            raise C2IError(f"the {loss_kind} loss is not finite on the selection sample")
        loss.backward()
        local[bi] = (float(loss.detach()), _take_grads(refs))
    every = distributed.gather(local)
    total, grads = 0.0, None
    for bi in range(len(scorer.batches)):
        loss, g = every[bi]
        total += loss
        grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
    return grads, total


def _keeps_every_layer(scorer: Scorer, cache: PrefixCache | None, checkpointing: bool) -> bool:
    """Can the gradient pass double as the base model's evaluation, keeping every layer's input? Its forward
    already holds those tensors for the backward pass; not with checkpointing (it would add them), sharding
    (each rank sees some batches), generation (scored by greedy decoding) or when they are too big."""
    if cache is None or checkpointing or distributed.size() > 1 or scorer.kind == "generation":
        return False
    p = next(scorer.model.parameters())
    hidden = getattr(getattr(scorer.model, "config", None), "hidden_size", None)
    if not hidden:
        return False
    tokens = sum(b.input_ids.numel() for b in scorer.batches) + len(scorer.prefix_ids)
    return len(decoder_layers(scorer.model)) * tokens * hidden * p.element_size() <= CAPTURE_ALL_BYTES


def scan(scorer: Scorer, refs: list[MatrixRef], rank_fractions: list[float], top_k: int,
         loss_kind: str = "answer", score: str = "first_order", progress: bool = True,
         checkpointing: bool = False, cache: PrefixCache | None = None, svd: str = "gram") -> ScanResult:
    """Gradient pass + SVDs; returns every matrix scored and the top-K with their SVD and G kept.

    With a ``cache`` (and where :func:`_keeps_every_layer` allows), the gradient pass's forward is also the base
    model's selection evaluation: ``ScanResult.base`` holds its metrics and ``cache`` the inputs of the top-K
    matrices' layers, as ``scorer.evaluate(cache, capture=…)`` would leave them, for one forward pass less.
    ``svd``: "full", "randomized" or "gram" (module docstring)."""
    if score not in SCORES:
        raise C2IError(f"--score {score!r}: choose one of {', '.join(SCORES)}")
    if svd not in SCAN_SVDS:
        raise C2IError(f"--scan-svd {svd!r}: choose one of {', '.join(SCAN_SVDS)}")
    if top_k < 1:
        raise C2IError(f"--top-k must be ≥ 1, got {top_k}")
    t0 = time.perf_counter()
    keep_all = _keeps_every_layer(scorer, cache, checkpointing)
    record = [] if keep_all else None
    grads, loss = gradients(scorer, refs, loss_kind, progress, checkpointing, cache if keep_all else None, record)
    base = scorer.metrics(record, generate=False) if keep_all else None
    t1 = time.perf_counter()
    scans, svds, skipped, sketched = [], {}, {}, []
    shard = set(distributed.mine(len(refs)))            # all of them in a single process
    for r in tqdm([r for i, r in enumerate(refs) if i in shard], desc="SVD + Σ-gradients",
                  disable=not progress, leave=False):
        g_mat = grads[r.name]
        bad = count_nonfinite(g_mat)
        if bad:
            # A NaN gradient would poison every score; skip the matrix and say so in the report.
            skipped[r.name] = f"gradient has {bad} non-finite entries"
        elif score == "first_order" and (svd == "gram" or svd == "randomized" and _sketchable(r.shape, rank_fractions)):
            if count_nonfinite(r.weight().detach().float()):
                skipped[r.name] = f"matrix {r.name!r} has NaN/Inf entries; cannot take its SVD"
            else:
                if svd == "gram":
                    scans.append(_gram_scan(r, g_mat, rank_fractions))
                sketched.append(r)          # randomized: decomposed below, with the matrices of its shape
                continue
        else:
            try:   # full_svd already falls back to other drivers and float64; NaN/Inf weights cannot be helped
                svd_r = r.svd()
            except C2IError as e:
                skipped[r.name] = str(e)
        if r.name in skipped:
            tqdm.write(f"warning: skipping {r.name}: {skipped[r.name]}", file=sys.stderr)
            continue
        scans.append(_exact_scan(r, svd_r, g_mat, rank_fractions, score))
        svds[r.name] = svd_r
    if svd == "randomized":
        scans += _randomized_scans(sketched, grads, rank_fractions)
    n_estimated = len(sketched)      # scored by the Gram / randomized estimate
    if distributed.size() > 1:       # every rank gets every matrix's scan; the top-K SVDs are redone locally
        every = distributed.gather({ms.name: ms for ms in scans})
        skipped = {k: v for part in distributed.gather({distributed.rank(): skipped}).values()
                   for k, v in part.items()}
        n_estimated = sum(distributed.gather({distributed.rank(): len(sketched)}).values())
        scans = [every[r.name] for r in refs if r.name in every]
    scans.sort(key=lambda x: (x.score, x.name))
    by_name = {r.name: r for r in refs}
    redone = _rescore(scans, by_name, grads, rank_fractions, score, top_k, svds)
    for ms in scans[:top_k]:
        r = by_name[ms.name]
        ms.svd = svds.get(ms.name) or r.svd()
        ms.grad = grads[ms.name]
    if keep_all:                     # the search replays the top-K layers only: free the others
        layers = {ms.layer for ms in scans[:top_k]}
        cache.store = {k: v for k, v in cache.store.items() if k[1] in layers}
    t2 = time.perf_counter()
    if not scans:
        raise C2IError("no matrix could be scanned: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    counts = {"mode": svd, "full": len(refs) - n_estimated - len(skipped), "full_redone": redone,
              "gram" if svd == "gram" else "randomized": n_estimated}
    return ScanResult(scans, loss, loss_kind, score, {"gradient": t1 - t0, "svd": t2 - t1}, skipped, base, counts)


def _exact_scan(r: MatrixRef, svd: SVD, g_mat: torch.Tensor, rank_fractions, score: str) -> MatrixScan:
    g_sigma = svd.sigma_grad(g_mat)                                   # diag(UᵀGV), (p,)
    m, n = svd.shape
    delta = {rho: truncation_delta(svd, g_sigma, rank_for(rho, m, n)) for rho in rank_fractions}
    s = min(delta.values()) if score == "first_order" else -float(g_sigma.norm())
    return MatrixScan(r.name, r.layer, r.type, (m, n), g_sigma, delta, s)


def _gram_scan(r: MatrixRef, g_mat: torch.Tensor, rank_fractions) -> MatrixScan:
    """The first-order scan from the smaller Gram matrix's eigendecomposition (module docstring); float32
    products (about 2× faster than the SVD on SmolLM2's and Qwen's shapes) summed in float64.
    ``g_sigma`` is σᵢgᵢ / σᵢ (0 where σᵢ = 0): it only feeds the report's norm; the top-K are rescored."""
    w, g = r.weight().detach().float(), g_mat.float()
    m, n = w.shape
    lam, vecs = weight_gram_eigh(r.param, transposed=r.transposed)    # σ² descending, of the smaller side
    sg = GramEigh(lam, vecs, m <= n).sigma_g(w, g)                     # (p,) σᵢgᵢ
    sigma = lam.sqrt()
    g_sigma = torch.where(sigma > 0, sg / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), torch.zeros_like(sg))
    delta = {rho: -float(sg[rank_for(rho, m, n):].sum()) for rho in rank_fractions}
    return MatrixScan(r.name, r.layer, r.type, (m, n), g_sigma.float(), delta, min(delta.values()), exact=False,
                      estimate="gram")


def _sketchable(shape, rank_fractions) -> bool:
    """Does the ρ grid need at most RANDOMIZED_MAX_FRACTION of this matrix's singular triplets?"""
    m, n = shape
    return rank_for(max(rank_fractions), m, n) <= RANDOMIZED_MAX_FRACTION * min(m, n)


def _randomized_scans(refs: list[MatrixRef], grads: dict, rank_fractions) -> list[MatrixScan]:
    """First-order scans from a randomized SVD of rank k = rank_for(max ρ), matrices of one shape in one batched
    call (a fixed seed per shape: the same estimate every run). ΔL̂(ρ) = Σ_{i<k(ρ)} σᵢgᵢ − ⟨G, W⟩."""
    from c2i_fast.kernels import randomized_svd
    groups: dict[tuple, list[MatrixRef]] = {}
    for r in refs:
        groups.setdefault(tuple(r.shape), []).append(r)
    out = []
    for (m, n), rs in groups.items():
        w = torch.stack([r.weight().detach().float() for r in rs])        # (B, m, n)
        k = rank_for(max(rank_fractions), m, n)
        u, s, v = randomized_svd(w, k, max(RSVD_MIN_OVERSAMPLE, k), RSVD_NITER,
                                 torch.Generator(w.device).manual_seed(0))
        for i, r in enumerate(rs):
            g_mat = grads[r.name]
            g_sigma = ((u[i].T @ g_mat) * v[i].T).sum(1)                  # (k,) top-k of diag(UᵀGV)
            inner = float((g_mat.double() * w[i].double()).sum())        # ⟨G, W⟩ = Σ_all σᵢgᵢ
            head = s[i].double() * g_sigma.double()
            delta = {rho: float(head[:rank_for(rho, m, n)].sum()) - inner for rho in rank_fractions}
            out.append(MatrixScan(r.name, r.layer, r.type, (m, n), g_sigma, delta, min(delta.values()),
                                  exact=False))
    return out


def _rescore(scans: list[MatrixScan], by_name: dict, grads: dict, rank_fractions, score: str, top_k: int,
             svds: dict) -> int:
    """Give the best RESCORE·top_k randomized estimates, then any estimate that reaches the top-K, a full SVD and
    their exact scores, re-sorting ``scans`` in place, until the top-K are all exact. Returns the SVDs done."""
    done = 0
    window = RESCORE * top_k
    while True:
        todo = [i for i, ms in enumerate(scans[:window]) if not ms.exact]
        if not todo:
            return done
        for i in todo:
            r = by_name[scans[i].name]
            svd = r.svd()
            scans[i] = _exact_scan(r, svd, grads[r.name], rank_fractions, score)
            svds[r.name] = svd
            done += 1
        scans.sort(key=lambda x: (x.score, x.name))
        window = top_k
