"""Replay: run only the layers a candidate changes, by swapping the others for stubs that return cached outputs.

A :class:`PrefixCache` remembers, per batch, the output of the decoder layer just below a given layer ℓ
(:func:`capture_layers` fills it). A candidate that only changes matrices in layers ≥ ℓ is then scored by
running layers ≥ ℓ alone: layers < ℓ are swapped for stubs that replay the cached output
(:func:`replay_layers`, a gpt-fast-style module swap, undone afterwards). Inside layer ℓ itself, whatever runs
before the edited matrix (for an MLP down-projection: the attention block and the gate / up projections) is
replayed the same way from the first candidate at that matrix on (:func:`replay_within`).

A shared prompt prefix (the scorer's one-row pass, key :data:`PREFIX`) has its own entries: its layer-ℓ−1
output and its keys/values below ℓ, so a candidate at layer ℓ recomputes the prefix from ℓ up only.

:func:`tail_only` is the one hook here that replays nothing: it runs the last layer's position-wise matrices at
the columns whose logits are read, and no others.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .models import decoder_layers, layer_root

PREFIX = "prefix"            # PrefixCache key of the shared prefix's own entries
WITHIN_BYTES = 2 << 30       # replay_within keeps at most this much of module outputs


class PrefixCache:
    """Outputs of the layer below each cached layer ℓ, per batch: {(batch, ℓ): output of layer ℓ−1}; for a
    shared prompt prefix also {("prefix", ℓ): its output of layer ℓ−1, ("prefix_kv", ℓ): its (K, V) of layers
    < ℓ}."""

    def __init__(self):
        self.store: dict[tuple[int, int], object] = {}
        self.epoch = 0          # the Scorer batch layout it was captured for (batches change after an OOM)
        self.within_bytes = 0   # held by replay_within's entries {(batch, "module path"): output}

    def clear(self):
        self.store.clear()
        self.within_bytes = 0

    def sync(self, epoch: int) -> None:
        """Forget entries captured for another batch layout (a scorer's ``epoch`` moves after an OOM halving)."""
        if self.epoch != epoch:
            self.clear()
            self.epoch = epoch


class _Replay(nn.Module):
    """Stands in for a decoder layer below ℓ (returns the cached output of layer ℓ−1 for this batch), or for a
    module of layer ℓ that runs before the edited matrix (returns its cached output, :func:`replay_within`)."""

    def __init__(self, original: nn.Module, output):
        super().__init__()
        self.output = output
        for k, v in vars(original).items():   # loop code reads attributes like `attention_type`
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)) and k != "training":
                setattr(self, k, v)

    def forward(self, *args, **kwargs):
        return self.output


def detach(obj):
    """``obj`` with every tensor in it (nested tuples / lists) detached."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(detach(o) for o in obj)
    return obj


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


@contextmanager
def capture_layers(model, cache: PrefixCache | None, batch_index, layers: set[int]):
    """Store, for each ℓ in ``layers``, the output of decoder layer ℓ−1 under (batch_index, ℓ)."""
    handles = []
    if cache is not None and layers:
        blocks = decoder_layers(model)
        for l in layers:
            if 0 < l < len(blocks):
                def hook(_m, _inp, out, l=l):
                    cache.store[(batch_index, l)] = detach(out)
                handles.append(blocks[l - 1].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_layers(model, cache: PrefixCache | None, batch_index, start_layer: int):
    """Swap decoder layers < ``start_layer`` for stubs returning the cached output of layer start_layer−1."""
    if cache is None or start_layer <= 0:
        yield
        return
    out = cache.store.get((batch_index, start_layer))
    if out is None:
        raise RuntimeError(f"prefix cache has no entry for batch {batch_index}, layer {start_layer}")
    blocks = decoder_layers(model)
    saved = [blocks[i] for i in range(start_layer)]
    try:
        for i in range(start_layer):
            blocks[i] = _Replay(saved[i], out)
        yield
    finally:
        for i in range(start_layer):
            blocks[i] = saved[i]


def _runs_before(events: list[tuple[str, str]], matrix: str, inside: set[str]) -> list[str]:
    """Paths of the biggest modules of one layer's forward that finish before ``matrix`` starts, each called
    once and holding a weight matrix (``events``: ("pre" | "post", path) in call order, paths in ``inside``)."""
    start = events.index(("pre", matrix))
    calls: dict[str, int] = {}
    for kind, path in events:
        calls[path] = calls.get(path, 0) + (kind == "pre")
    done = [path for kind, path in events[:start] if kind == "post" and calls[path] == 1
            and not matrix.startswith(path + ".") and path in inside]
    return [p for p in done if not any(p.startswith(q + ".") for q in done)]


@contextmanager
def replay_within(model: nn.Module, cache: PrefixCache | None, batch_index, matrix: str | None):
    """Within the edited matrix's own layer ℓ, replay what runs before it. Layer ℓ's input is the base model's,
    so every module that finishes before ``matrix`` starts (for an MLP's down-projection: the whole attention
    block and the gate / up projections) computes what it computed for the base model: its output, captured
    on a candidate's first pass, is replayed on the next candidate's (one edit, not the last layer, whose
    tail-only hooks gather columns). Exact: the same tensors, not recomputed ones."""
    if cache is None or matrix is None or batch_index == PREFIX:
        yield
        return
    plan = cache.store.get(("within", matrix))
    handles, seen, events = [], {}, []

    def keep(path):
        def hook(_m, _args, out):
            events.append(("post", path))
            seen[path] = out
        return hook

    def start(path):
        def hook(_m, _args):
            events.append(("pre", path))
        return hook
    inside = set(plan or ())
    if plan is None:                  # learn the call order on this pass, capture what may be replayed
        root = layer_root(matrix)
        for n, m in model.get_submodule(root).named_modules():
            if not n:
                continue
            path = f"{root}.{n}"
            handles.append(m.register_forward_pre_hook(start(path)))
            if path != matrix:        # the candidate itself: its start is all we need
                handles.append(m.register_forward_hook(keep(path)))
                if any(p.dim() >= 2 for p in m.parameters()):
                    inside.add(path)
    stubs = []
    if plan is not None and all((batch_index, p) in cache.store for p in plan):
        for p in plan:
            parent, name = p.rsplit(".", 1)
            owner = model.get_submodule(parent)
            original = getattr(owner, name)
            setattr(owner, name, _Replay(original, cache.store[(batch_index, p)]))
            stubs.append((owner, name, original))
    elif plan is not None:
        for p in plan:
            handles.append(model.get_submodule(p).register_forward_hook(keep(p)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for owner, name, original in stubs:
            setattr(owner, name, original)
    if plan is None and ("pre", matrix) in events:
        plan = _runs_before(events, matrix, inside)
        cache.store[("within", matrix)] = plan
    for p in plan or []:
        if not stubs and p in seen and (batch_index, p) not in cache.store:
            out = detach(seen[p])
            if cache.within_bytes + _nbytes(out) <= WITHIN_BYTES:
                cache.store[(batch_index, p)] = out
                cache.within_bytes += _nbytes(out)


def _kv_cache(kwargs: dict):
    """The KV cache a decoder layer is handed (``cache`` from transformers 5.25 on, ``past_key_values`` before)."""
    c = kwargs.get("cache")
    return c if c is not None else kwargs.get("past_key_values")


class _PrefillReplay(_Replay):
    """Stands in for decoder layer i < ℓ during one ``generate()`` call. On the prefill (the call's first forward)
    it writes the base model's keys/values of layer i for the prompt into the KV cache and returns the cached
    output of layer ℓ−1; on every decode step after it, the real layer runs (the new token's keys/values append
    to those, as they would to the ones it computed itself)."""

    def __init__(self, original: nn.Module, output, kv, index: int, calls: dict):
        super().__init__(original, output)
        object.__setattr__(self, "_layer", original)     # not a submodule: its parameters stay the model's own
        self.kv, self.index, self.calls = kv, index, calls

    def forward(self, *args, **kwargs):
        if self.calls["n"] > 1:
            return self._layer(*args, **kwargs)
        _kv_cache(kwargs).update(self.kv[0], self.kv[1], self.index)
        return self.output


def has_prefill(cache: PrefixCache | None, key, layer: int) -> bool:
    """Does ``cache`` hold what :func:`replay_prefill` needs to start generation batch ``key`` at ``layer``: the
    prompt's output of layer ``layer``−1 and its keys/values of every layer below?"""
    return cache is not None and (key, layer) in cache.store and all(
        ((key, "kv"), i) in cache.store for i in range(layer))


@contextmanager
def replay_prefill(model: nn.Module, cache: PrefixCache | None, key, start_layer: int, capture: set[int]):
    """Within one ``model.generate()`` call for batch ``key``: replay the prefill of layers < ``start_layer`` (the
    prompt's layer inputs and keys/values below a candidate are the base model's) and capture, on the prefill,
    the output of layer ℓ−1 for each ℓ in ``capture`` and the keys/values of every layer below the highest.
    The decode steps run every layer: their tokens depend on the candidate. Exact: layer ``start_layer`` gets the
    same tensor, and the cache the same keys/values, as a prefill of every layer computes (``has_prefill``
    says whether the entries are there; the caller falls back to ``start_layer`` 0 and captures when not)."""
    if cache is None or (start_layer <= 0 and not capture):
        yield
        return
    blocks = decoder_layers(model)
    calls = {"n": 0}
    handles = [model.register_forward_pre_hook(lambda _m, _a: calls.__setitem__("n", calls["n"] + 1))]

    def keep_out(l):
        def hook(_m, _a, out):
            if calls["n"] == 1:
                cache.store[(key, l)] = detach(out)
        return hook

    def keep_kv(i):
        def hook(_m, _a, kwargs, _out):
            if calls["n"] == 1:
                layer = _kv_cache(kwargs).layers[i]
                cache.store[((key, "kv"), i)] = (detach(layer.keys), detach(layer.values))
        return hook
    top = max((l for l in capture if 0 < l < len(blocks)), default=0)
    for l in capture:
        if start_layer < l < len(blocks):            # below start_layer the stubs return layer ℓ−1's output only
            handles.append(blocks[l - 1].register_forward_hook(keep_out(l)))
    for i in range(start_layer, top):
        handles.append(blocks[i].register_forward_hook(keep_kv(i), with_kwargs=True))
    saved = [blocks[i] for i in range(max(0, start_layer))]
    try:
        if start_layer > 0:
            out = cache.store[(key, start_layer)]
            for i in range(start_layer):
                blocks[i] = _PrefillReplay(saved[i], out, cache.store[((key, "kv"), i)], i, calls)
        yield
    finally:
        for h in handles:
            h.remove()
        for i, layer in enumerate(saved):
            blocks[i] = layer


@contextmanager
def tail_only(model: nn.Module, names: list[str], read: torch.Tensor):
    """Run ``names`` (the last layer's position-wise matrices) at the ``read`` columns only: gather those columns
    of the input, scatter the output back into zeros. The other columns of the last layer's output are then
    wrong, but nothing reads them (the head sees the ``read`` columns only). Exact, and it spares most of
    the last layer when a few answer tokens are scored after a long prompt. Off under gradient
    checkpointing, whose recomputation would run the modules without the hooks."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:                       # transformers < 5.x name
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if not names or checkpointing:
        yield
        return
    handles = []

    def gather(m, args):
        x = args[0]
        m._c2i_tail = None
        if x.dim() != 3 or x.shape[1] == len(read):
            return None
        idx = read.to(x.device)          # the last layer may sit on another device (accelerate device maps)
        m._c2i_tail = (x.shape[1], idx)
        return (x.index_select(1, idx),) + tuple(args[1:])

    def scatter(m, _args, out):
        tail, m._c2i_tail = m._c2i_tail, None
        if tail is None:
            return None
        t, idx = tail
        return out.new_zeros(out.shape[0], t, out.shape[2]).index_copy(1, idx, out)

    try:
        for n in names:
            mod = model.get_submodule(n)
            # dense layers only: a factored candidate swapped in here runs at every column (hooking the custom
            # low-rank op this way crashed the CPU process in tests, intermittently; not understood yet)
            if not (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"):
                continue
            handles += [mod.register_forward_pre_hook(gather), mod.register_forward_hook(scatter)]
        yield
    finally:
        for h in handles:
            h.remove()
