"""Batched scoring of a model on task examples: accuracy, log-loss and the Σ-gradient loss.

Sequences are LEFT-padded so every row ends at the same column: the answer tokens then sit in the last few
positions of every row and ``logits_to_keep`` asks the LM head for those positions only (the 49k-vocab head
on every prompt position would cost as much as the layers). ``position_ids`` are passed explicitly so left
padding does not shift rotary/learned positions.

Row layout (one row = one token sequence fed to the model)::

    kind            rows per example        continuation scored       logits read at
    classification  1 (all choices 1 token) none                      last position, over the choice ids
                    1 (multi-token choices, every choice, packed  the last prompt token and every
                       packed: the default)   after one shared prompt  choice token but its last
                    C (multi-token, unpacked) choice c                the last len(c) positions
    recall          1                       gold answer               the last len(answer) positions
    generation      1 (+ greedy generation) gold answer (log-loss)    the last len(answer) positions

Trimmed rows (the default): a continuation's (every packed choice's) LAST token is not fed at all. Its logits
would predict past the scored text, and under the causal mask no read position sees it, so every read logit is
unchanged and each row is one column (a packed row one per choice) shorter in every layer.

Packed choices: the prompt is run once and every choice follows it in the same row,
``prompt | c₀ | c₁ | …``, with a 4D attention mask in which a choice's tokens see the prompt and their own
earlier tokens only, and position ids that restart at len(prompt) for each choice. Each choice is then scored
exactly as in its own row (same logits up to float round-off), for the cost of one prompt instead of C.

A :class:`PrefixCache` remembers, per batch, the output of the decoder layer just below a given layer ℓ. A
candidate that only changes matrices in layers ≥ ℓ is then scored by running layers ≥ ℓ alone: layers < ℓ
are swapped for stubs that replay the cached output (gpt-fast-style module swap, undone afterwards). Inside
layer ℓ itself, whatever runs before the edited matrix (for an MLP down-projection: the attention block and the
gate / up projections) is replayed the same way from the first candidate at that matrix on (:func:`_within`).

Shared prompt prefix: when every row starts with the same tokens (a task instruction, few-shot examples), those
tokens are run once per pass as a one-row batch and their keys/values are handed to every batch through the
model's own KV cache (``past_key_values``), so each batch runs only the part of its rows after the prefix::

    prefix (1 row, P tokens) ──KV──▶ batch rows [pad … | tokens after the prefix], position ids P, P+1, …

Causality makes this exact: a prefix token sees only prefix tokens, so its keys/values are the same in every
row. The prefix gets its own entries in the PrefixCache (its layer-ℓ−1 output and its keys/values below ℓ), so
a candidate at layer ℓ recomputes the prefix from ℓ up only. Used for decoder-only causal LMs with full
attention in every layer; everything else runs the rows whole.
"""
from __future__ import annotations

import math
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import C2IError
from .tasks import Example, majority_baseline

MAX_PROMPT_TOKENS = 1024
MIN_SHARED_PREFIX = 8        # shorter common prefixes are not worth an extra one-row pass
PREFIX = "prefix"            # PrefixCache key of the shared prefix's own entries


@dataclass
class _Row:
    example: int          # index into examples
    choice: int           # choice index, or -1 for the gold target / prompt-only row
    ids: list[int]        # token ids fed to the model: prompt + continuation (each choice's when packed)
    cont: list[int]       # continuation token ids (scored), may be empty; packed: every choice's, in order
    spans: list[tuple[int, int]] | None = None   # packed choices: (start index in ids, scored tokens) per choice
    trimmed: bool = False   # each continuation's / choice's last token is left out of ``ids`` (see _trim)

    @property
    def first_read(self) -> int:
        """Index in ``ids`` of the first token whose logits are read (the last prompt token)."""
        if self.spans:
            return self.spans[0][0] - 1
        if self.cont:
            return len(self.ids) - len(self.cont) - (0 if self.trimmed else 1)
        return len(self.ids) - 1

    def width(self, n: int) -> int:
        """Columns in ``ids`` of a continuation of n scored tokens."""
        return n - 1 if self.trimmed else n


@dataclass
class _Batch:
    rows: list[_Row]
    input_ids: torch.Tensor       # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor    # (B, T)
    keep: int                     # columns from the earliest first-read position to the end (_Row.first_read)
    allowed: torch.Tensor | None = None   # (B, 1, T, P+T) bool: query may attend key (packed choices or a
                                          # shared prefix of P tokens; None: the 2D mask says it all)
    read: list[int] | None = None         # the columns, of the last ``keep``, whose logits are ever read
    gather: tuple | None = None           # (row, column in ``read``, target token, segment) index tensors
    seg_len: list[int] | None = None      # scored tokens per segment (a row's continuation or one choice)


def _trim(r: _Row) -> _Row:
    """The row without its dead tokens. A continuation's (a packed choice's) last token predicts nothing that is
    scored, and under the causal mask no read position sees it (a packed choice's tokens are seen by its own
    later tokens only), so leaving it out changes no read logit and saves a column in every layer."""
    if not r.cont or r.trimmed:
        return r
    if not r.spans:
        return _Row(r.example, r.choice, r.ids[:-1], r.cont, None, True)
    prompt_len = r.spans[0][0]
    ids, spans = r.ids[:prompt_len], []
    for start, n in r.spans:
        spans.append((len(ids), n))
        ids += r.ids[start:start + n - 1]
    return _Row(r.example, r.choice, ids, r.cont, spans, True)


_LAYERS_PATH: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (model.layers, transformer.h, gpt_neox.layers, encoder.layer).
    Its path is found once per model (walking every module costs milliseconds, and every batch asks)."""
    path = _LAYERS_PATH.get(model)
    if path is None:
        from .models import target_matrices
        name = target_matrices(model)[0].name
        path = _LAYERS_PATH[model] = _layer_root(name).rsplit(".", 1)[0]
    return model.get_submodule(path)


class _Replay(nn.Module):
    """Stands in for a decoder layer below ℓ (returns the cached output of layer ℓ−1 for this batch), or for a
    module of layer ℓ that runs before the edited matrix (returns its cached output, :func:`_within`)."""

    def __init__(self, original: nn.Module, output):
        super().__init__()
        self.output = output
        for k, v in vars(original).items():   # loop code reads attributes like `attention_type`
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)) and k != "training":
                setattr(self, k, v)

    def forward(self, *args, **kwargs):
        return self.output


class PrefixCache:
    """Outputs of the layer below each cached layer ℓ, per batch: {(batch, ℓ): output of layer ℓ−1}; for a
    shared prompt prefix also {("prefix", ℓ): its output of layer ℓ−1, ("prefix_kv", ℓ): its (K, V) of layers
    < ℓ}."""

    def __init__(self):
        self.store: dict[tuple[int, int], object] = {}
        self.epoch = 0          # the Scorer batch layout it was captured for (batches change after an OOM)
        self.within_bytes = 0   # held by _within's entries {(batch, "module path"): output}

    def clear(self):
        self.store.clear()
        self.within_bytes = 0


def _is_decoder_causal_lm(model: nn.Module) -> bool:
    """A decoder-only ``*ForCausalLM`` (its head reads each column's last hidden state alone)."""
    cfg = getattr(model, "config", None)
    return cfg is not None and type(model).__name__.endswith("ForCausalLM") and not cfg.is_encoder_decoder


def supports_shared_prefix(model: nn.Module) -> bool:
    """Decoder-only causal LM, full attention in every layer (a sliding window would need its own mask)."""
    if not _is_decoder_causal_lm(model):
        return False
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
        return False
    return all(t == "full_attention" for t in (getattr(text, "layer_types", None) or ["full_attention"]))


def shared_prefix_length(rows: list[_Row]) -> int:
    """Tokens every row starts with, stopping before any row's first read position (the logits read for a
    row's continuation come from its last prompt token on, which must stay in the batch)."""
    first = rows[0].ids
    n = min(r.first_read for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r.ids[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    return obj


@contextmanager
def _capture(model, cache: PrefixCache | None, batch_index: int, layers: set[int]):
    handles = []
    if cache is not None and layers:
        blocks = decoder_layers(model)
        for l in layers:
            if 0 < l < len(blocks):
                def hook(_m, _inp, out, l=l):
                    cache.store[(batch_index, l)] = _detach(out)
                handles.append(blocks[l - 1].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _replay(model, cache: PrefixCache | None, batch_index: int, start_layer: int):
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


WITHIN_BYTES = 2 << 30      # _within keeps at most this much of module outputs


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _layer_root(matrix: str) -> str:
    """The decoder layer's path in a matrix's path (as :func:`decoder_layers` finds the layers)."""
    return re.match(r"^(.*?\.\d+)\.", matrix).group(1)


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
def _within(model: nn.Module, cache: PrefixCache | None, batch_index, matrix: str | None):
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
        root = _layer_root(matrix)
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
            out = _detach(seen[p])
            if cache.within_bytes + _nbytes(out) <= WITHIN_BYTES:
                cache.store[(batch_index, p)] = out
                cache.within_bytes += _nbytes(out)


POSITIONWISE = ("q", "o", "mlp_in", "mlp_up", "mlp_out")    # a column's output feeds that column only


def last_layer_positionwise(model: nn.Module) -> list[str]:
    """Names of the last decoder layer's matrices whose output at a column is used at that column only (query,
    attention output, MLP) — in a causal LM, whose head reads a column's last hidden state alone, those are
    needed at the columns whose logits are read, nothing else. Keys/values (and fused QKV) feed every later
    column, so they stay whole. Empty for anything that is not a decoder-only ``*ForCausalLM``."""
    from .models import target_matrices
    if not _is_decoder_causal_lm(model):
        return []
    try:
        refs = target_matrices(model)
        last = len(decoder_layers(model)) - 1
    except (C2IError, AttributeError):
        return []
    return [r.name for r in refs if r.layer == last and r.type in POSITIONWISE]


@contextmanager
def _tail_only(model: nn.Module, names: list[str], read: torch.Tensor):
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


class Scorer:
    """Scores one fixed list of examples; rows and batches are built once and reused for every candidate."""

    def __init__(self, model: nn.Module, tokenizer, examples: list[Example], kind: str,
                 batch_tokens: int = 4096, scoring: str = "mean", max_new_tokens: int = 10,
                 pack_choices: bool = True, share_prefix: bool = True, batch_overhead: int | None = None,
                 tail_only: bool = True, trim: bool = True):
        if not examples:
            raise C2IError("no examples to score")
        if scoring not in ("sum", "mean"):
            raise C2IError(f"--scoring {scoring!r}: choose sum or mean")
        self.model, self.tokenizer, self.examples, self.kind = model, tokenizer, examples, kind
        self.scoring, self.max_new_tokens = scoring, max_new_tokens
        self.pack_choices = pack_choices
        self.batch_tokens = batch_tokens
        self.batch_overhead = batch_overhead      # tokens one more batch costs (None: by device, _build_batches)
        self.progress = False                      # tqdm bar over batches (set for long evaluations)
        self.epoch = 0                             # bumped when an out-of-memory error halves the batches
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        self.single_token_choices: torch.Tensor | None = None
        self.rows = self._build_rows()
        if trim:                                   # no column for a continuation's last token (_trim)
            self.rows = [_trim(r) for r in self.rows]
        self.prefix_ids: list[int] = []           # shared prompt prefix, run once per pass (module docstring)
        if share_prefix and supports_shared_prefix(model):
            p = shared_prefix_length(self.rows)
            if p >= MIN_SHARED_PREFIX:
                self.prefix_ids = self.rows[0].ids[:p]
                for r in self.rows:
                    r.ids = r.ids[p:]
                    r.spans = [(start - p, n) for start, n in r.spans] if r.spans else r.spans
        self.batches = self._build_batches()
        self.forward_rows = len(self.rows)
        # the last layer's position-wise matrices, run at the read columns only (_tail_only)
        self.tail_names = last_layer_positionwise(model) if tail_only else []

    # -- building ---------------------------------------------------------------------------------------
    def _tok(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def _build_rows(self) -> list[_Row]:
        rows = []
        prompts = [self._tok(ex.prompt, True)[-MAX_PROMPT_TOKENS:] for ex in self.examples]
        if self.kind == "classification":
            choice_ids = {c: self._tok(c, False) for ex in self.examples for c in ex.choices}
            for c, ids in choice_ids.items():
                if not ids:
                    raise C2IError(f"choice {c!r} tokenizes to zero tokens")
            choices0 = self.examples[0].choices
            same = all(ex.choices == choices0 for ex in self.examples)
            if same and all(len(choice_ids[c]) == 1 for c in choices0) and \
                    len({choice_ids[c][0] for c in choices0}) == len(choices0):
                self.single_token_choices = torch.tensor([choice_ids[c][0] for c in choices0])
                return [_Row(i, -1, p, []) for i, p in enumerate(prompts)]
            for i, (ex, p) in enumerate(zip(self.examples, prompts)):
                if self.pack_choices:
                    ids, spans = list(p), []
                    for c in ex.choices:
                        spans.append((len(ids), len(choice_ids[c])))
                        ids += choice_ids[c]
                    rows.append(_Row(i, -1, ids, ids[len(p):], spans))
                    continue
                for j, c in enumerate(ex.choices):
                    rows.append(_Row(i, j, p + choice_ids[c], choice_ids[c]))
            return rows
        for i, (ex, p) in enumerate(zip(self.examples, prompts)):
            cont = self._tok(ex.target, False)
            if not cont:
                raise C2IError(f"example {ex.id!r}: answer {ex.target!r} tokenizes to zero tokens")
            rows.append(_Row(i, -1, p + cont, cont))
        return rows

    def _build_batches(self) -> list[_Batch]:
        """Rows of one example stay in one batch (the choice loss needs all of an example's choices).
        Examples are sorted by length and cut into contiguous batches of at most ``batch_tokens`` (padded)
        tokens that minimise padded tokens + a per-batch overhead: on a CPU, where a forward costs about its
        token count, that is little padding in many small batches; on a GPU, where a launch costs as much as
        many tokens, few full batches."""
        units: dict[int, list[_Row]] = {}
        for r in self.rows:
            units.setdefault(r.example, []).append(r)
        order = sorted(units, key=lambda e: (max(len(r.ids) for r in units[e]), e))
        length = [max(len(r.ids) for r in units[e]) for e in order]
        count = [len(units[e]) for e in order]
        overhead = self.batch_overhead
        if overhead is None:
            overhead = self.batch_tokens // 2 if any(p.is_cuda for p in self.model.parameters()) else 32
        # best[j]: least cost of batching the first j examples; cut[j]: where its last batch starts
        best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
        for j in range(1, len(order) + 1):
            n = 0
            for i in range(j - 1, -1, -1):          # last batch = examples i..j-1, padded to length[j-1]
                n += count[i]
                padded = n * length[j - 1]
                if padded > self.batch_tokens and i < j - 1:
                    break                            # an example alone may exceed batch_tokens
                if best[i] + padded + overhead < best[j]:
                    best[j], cut[j] = best[i] + padded + overhead, i
        bounds, j = [], len(order)
        while j > 0:
            bounds.append((cut[j], j))
            j = cut[j]
        return [self._pad([r for e in order[i:j] for r in units[e]]) for i, j in reversed(bounds)]

    def _pad(self, rows: list[_Row]) -> _Batch:
        p = len(self.prefix_ids)        # rows are the tokens after a shared prefix of p (0: none)
        t = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, t - len(r.ids):] = torch.tensor(r.ids)
            mask[i, t - len(r.ids):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0) + p
        keep = max(len(r.ids) - r.first_read for r in rows)
        allowed = None
        if p or any(r.spans for r in rows):
            # segment id per column: -1 padding, 0 prompt, j+1 choice j; a query sees earlier keys of the
            # prompt or of its own segment; padding queries see themselves only (no all-masked row → no NaN)
            seg = torch.full((len(rows), t), -1, dtype=torch.long)
            for i, r in enumerate(rows):
                off = t - len(r.ids)
                seg[i, off:] = 0
                if not r.spans:
                    continue
                prompt_len = r.spans[0][0]
                for j, (start, n) in enumerate(r.spans):
                    w = r.width(n)
                    seg[i, off + start:off + start + w] = j + 1
                    pos[i, off + start:off + start + w] = torch.arange(p + prompt_len, p + prompt_len + w)
            q, k = seg[:, :, None], seg[:, None, :]
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            allowed = causal & (k >= 0) & ((k == 0) | (k == q))
            allowed |= torch.eye(t, dtype=torch.bool) & (q < 0)
            if p:                        # every query sees the whole shared prefix
                allowed = torch.cat([torch.ones(len(rows), t, p, dtype=torch.bool), allowed], dim=2)
            allowed = allowed[:, None]
        b = _Batch(rows, ids, mask, pos, keep, allowed)
        self._plan_reads(b)
        return b

    def _plan_reads(self, b: _Batch) -> None:
        """Which of the last ``keep`` columns are read, and every scored token's (row, column, target) as one
        gather. A segment is one row's continuation or one choice of a packed row; the logits after a row's
        (or a choice's) last token predict nothing that is scored, so those columns are never computed (and with
        trimmed rows, the default, that token is not in the batch at all)."""
        k = b.keep
        if self.single_token_choices is not None or not any(r.cont for r in b.rows):
            b.read = [k - 1]                 # classification over one-token choices / a prompt-only batch
            return
        segments = []                        # (batch row, kept column read, target tokens)
        for i, r in enumerate(b.rows):
            off = k - len(r.ids)             # row index x sits in kept column off + x
            if r.spans:
                prompt_len, o = r.spans[0][0], 0
                for start, n in r.spans:
                    # token start+t is predicted at index start+t−1; the first at the last prompt token
                    cols = [off + prompt_len - 1] + [off + start + t - 1 for t in range(1, n)]
                    segments.append((i, cols, r.cont[o:o + n]))
                    o += n
            else:
                f = off + r.first_read
                segments.append((i, list(range(f, f + len(r.cont))), r.cont))
        b.read = sorted({c for _, cols, _ in segments for c in cols})
        where = {c: j for j, c in enumerate(b.read)}
        b.seg_len = [len(cols) for _, cols, _ in segments]
        b.gather = tuple(torch.tensor(x) for x in (
            [i for i, cols, _ in segments for _ in cols], [where[c] for _, cols, _ in segments for c in cols],
            [t for _, _, toks in segments for t in toks], [j for j, n in enumerate(b.seg_len) for _ in range(n)]))

    # -- forward ----------------------------------------------------------------------------------------
    def _device(self):
        return next(self.model.parameters()).device

    def _float_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Additive float mask from a bool one (works for eager and SDPA attention)."""
        dtype = next(self.model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        return torch.zeros(allowed.shape, dtype=dtype, device=self._device()).masked_fill_(
            ~allowed.to(self._device()), torch.finfo(dtype).min)

    def _logits(self, b: _Batch, prefix_kv: list | None = None) -> torch.Tensor:
        dev = self._device()
        mask = b.attention_mask.to(dev) if b.allowed is None else self._float_mask(b.allowed)
        extra = {}
        if prefix_kv is not None:        # the shared prefix's keys/values, the same for every row
            from transformers import DynamicCache
            n = b.input_ids.shape[0]
            extra["past_key_values"] = DynamicCache(
                [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_kv], config=self.model.config)
        # as indices: the head then gets a contiguous (B, len(read), d) copy, which the same GEMM multiplies with or
        # without grad (a [-k:] slice is a strided view that autograd multiplies with a batched GEMM, so the
        # scan's logits would differ from an evaluation's in the last bits)
        read = self.read_columns(b)
        with _tail_only(self.model, self.tail_names, read):
            out = self.model(input_ids=b.input_ids.to(dev), attention_mask=mask, position_ids=b.position_ids.to(dev),
                             logits_to_keep=read, use_cache=False, **extra)
        logits = out.logits                                          # (B, len(read), V)
        return logits if logits.dtype == torch.float64 else logits.float()

    @staticmethod
    def read_columns(b: _Batch) -> torch.Tensor:
        """(len(read),) indices, in the batch's T columns, of the columns whose logits are read; on the CPU, so
        they index the head's input wherever it is."""
        t = b.input_ids.shape[1]
        return torch.tensor([t - b.keep + c for c in b.read])

    def _row_stats(self, b: _Batch, logits: torch.Tensor):
        """Per row: summed log-prob of the continuation, its length, all-greedy flag, choice log-probs."""
        logp = torch.log_softmax(logits, dim=-1)
        if self.single_token_choices is not None:
            choice_lp = logp[:, -1, self.single_token_choices.to(logp.device)]    # (B, C)
            return None, None, None, choice_lp
        # every scored token of the batch in one gather (one backward node, not one per row and choice)
        dev = logp.device
        seg_len = b.seg_len
        at_row, at_col, tgt, seg = (x.to(dev) for x in b.gather)
        seg_sum = torch.zeros(len(seg_len), dtype=logp.dtype, device=dev).index_add(0, seg, logp[at_row, at_col, tgt])
        packed = any(r.spans for r in b.rows)
        if not packed:                           # one segment per row: all-greedy flags too
            miss = (logits[at_row, at_col].argmax(-1) != tgt).float()
            misses = torch.zeros(len(seg_len), device=dev).index_add(0, seg, miss)
            return seg_sum, seg_len, [bool(m == 0) for m in misses], None
        sums, lens, greedy, j = [], [], [], 0
        for r in b.rows:
            c = len(r.spans) if r.spans else 1
            sums.append(seg_sum[j:j + c] if r.spans else seg_sum[j])
            lens.append(torch.tensor([float(n) for n in seg_len[j:j + c]], device=dev) if r.spans else seg_len[j])
            greedy.append(False)
            j += c
        return sums, lens, greedy, None

    def _prefix_kv(self, cache: PrefixCache | None, start_layer: int, capture: set[int]) -> list:
        """(K, V) of every layer, each (1, kv_heads, P, head_dim), for the shared prefix under the model's
        current weights: layers < ``start_layer`` from the cache, the rest computed (a one-row pass)."""
        from transformers import DynamicCache
        dev, p = self._device(), len(self.prefix_ids)
        kv = DynamicCache(config=self.model.config)
        causal = torch.ones(p, p, dtype=torch.bool).tril()[None, None]
        with _replay(self.model, cache, PREFIX, start_layer), _capture(self.model, cache, PREFIX, set(capture)):
            self.model(input_ids=torch.tensor([self.prefix_ids], device=dev), attention_mask=self._float_mask(causal),
                       position_ids=torch.arange(p, device=dev)[None], past_key_values=kv, logits_to_keep=1,
                       use_cache=True)
        layers = [(layer.keys, layer.values) for layer in kv.layers]
        if start_layer > 0:
            layers[:start_layer] = cache.store[("prefix_kv", start_layer)]
        if cache is not None:
            for l in capture:            # keys/values below l do not change for a candidate at l
                cache.store[("prefix_kv", l)] = [(_detach(k), _detach(v)) for k, v in layers[:l]]
        return layers

    def run(self, cache: PrefixCache | None = None, start_layer: int = 0, capture: set[int] = frozenset(),
            grad: bool = False, only: set[int] | None = None, within: str | None = None):
        """Yield (batch, row stats) for each batch; reuse/capture the prefix cache as asked.

        A cache captured for another batch layout (before an out-of-memory split) is dropped; a batch whose
        cache entry is missing runs from layer 0 and captures it; without a cache every pass runs from layer 0.
        ``within``: the one edited matrix, whose layer replays what runs before it (:func:`_within`)."""
        if cache is None:
            start_layer = 0
        if within is not None and (grad or any(_layer_root(n) == _layer_root(within) for n in self.tail_names)):
            within = None        # the last layer's tail-only hooks gather columns of the modules it would replay
        if cache is not None and cache.epoch != self.epoch:
            cache.clear()
            cache.epoch = self.epoch
        keys = list(range(len(self.batches))) + ([PREFIX] if self.prefix_ids else [])
        if cache is not None and start_layer > 0 and (
                any((k, start_layer) not in cache.store for k in keys)
                or (self.prefix_ids and ("prefix_kv", start_layer) not in cache.store)):
            capture = set(capture) | {start_layer}
            start_layer = 0
        from tqdm.auto import tqdm
        kv = None
        for bi, b in enumerate(tqdm(self.batches, desc="evaluate", disable=not self.progress, leave=False)):
            if only is not None and bi not in only:
                continue
            with torch.set_grad_enabled(grad):
                if self.prefix_ids and (kv is None or grad):     # with grad: each batch's graph is freed
                    kv = self._prefix_kv(cache, start_layer, capture)
                with _replay(self.model, cache, bi, start_layer), _capture(self.model, cache, bi, set(capture)), \
                        _within(self.model, cache, bi, within):
                    logits = self._logits(b, kv)
            yield b, self._row_stats(b, logits)

    # -- metrics ----------------------------------------------------------------------------------------
    def _per_example(self, stats_iter) -> dict[int, dict]:
        """Per example index: (C,) summed choice scores and lengths, or the gold log-prob, length, greedy flag."""
        per: dict[int, dict] = {}
        for b, (sums, lens, greedy, choice_lp) in stats_iter:
            for i, r in enumerate(b.rows):
                d = per.setdefault(r.example, {})
                if choice_lp is not None:
                    d["sum"] = choice_lp[i]
                    d["len"] = torch.ones_like(choice_lp[i])
                elif r.spans:
                    d["sum"], d["len"] = sums[i], lens[i]
                elif self.kind == "classification":
                    d.setdefault("s", {})[r.choice] = (sums[i], lens[i])
                else:
                    d["gold"], d["glen"], d["greedy"] = sums[i], lens[i], greedy[i]
        for d in per.values():
            if "s" in d:
                s = d.pop("s")
                d["sum"] = torch.stack([s[j][0] for j in sorted(s)])
                d["len"] = torch.tensor([float(s[j][1]) for j in sorted(s)], device=d["sum"].device)
        return per

    def loss_batches(self, kind: str = "answer", cache: PrefixCache | None = None, start_layer: int = 0,
                     only: set[int] | None = None, capture: set[int] = frozenset(), record: list | None = None):
        """Yield one differentiable loss per batch (``only`` those batch indices), scaled so that their sum is
        the mean loss over examples (call .backward() on each: one batch's graph is alive at a time).
        ``capture`` fills the prefix cache as :meth:`run` does; ``record`` collects each batch's detached row
        stats, from which :meth:`metrics` gives what :meth:`evaluate` would (the scan's pass is then also the
        base model's evaluation)."""
        for b, stats in self.run(cache, start_layer, capture, grad=True, only=only):
            if record is not None:
                record.append((b, _detach(stats)))
            per = self._per_example([(b, stats)])
            yield self.loss(per, kind) * (len(per) / len(self.examples))

    def loss(self, per: dict[int, dict], kind: str = "answer") -> torch.Tensor:
        """Mean over the examples in ``per``: ``answer`` = −log p(gold tokens)/len (full vocabulary);
        ``choice`` = cross-entropy of the gold label under a softmax over the choices' (sum or mean) scores."""
        if kind not in ("answer", "choice"):
            raise C2IError(f"--loss {kind!r}: choose answer or choice")
        if kind == "choice" and self.kind != "classification":
            raise C2IError("--loss choice needs a classification task")
        terms = []
        for e, d in per.items():
            ex = self.examples[e]
            if self.kind == "classification":
                if kind == "choice":
                    sc = d["sum"] / d["len"] if self.scoring == "mean" else d["sum"]
                    terms.append(-torch.log_softmax(sc, 0)[ex.label])
                else:
                    terms.append(-d["sum"][ex.label] / d["len"][ex.label])
            else:
                terms.append(-d["gold"] / d["glen"])
        return torch.stack(terms).mean()

    def halve_batches(self, error: BaseException) -> None:
        """After an out-of-memory error: half the tokens per batch, rebuilt batches, caches invalidated."""
        if all(len(b.rows) <= 1 or len({r.example for r in b.rows}) <= 1 for b in self.batches):
            raise C2IError(f"out of memory with a single example per batch: {error}") from error
        self.batch_tokens = max(1, self.batch_tokens // 2)
        self.batches = self._build_batches()
        self.epoch += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        import sys
        print(f"c2i: out of memory; retrying with --batch-tokens {self.batch_tokens}", file=sys.stderr)

    def evaluate(self, cache: PrefixCache | None = None, start_layer: int = 0,
                 capture: set[int] = frozenset(), generate: bool = True, within: str | None = None) -> dict:
        """Accuracy (primary scoring + both variants), log-loss, choice-loss, majority baseline.
        Out of memory on a batch halves the batches and retries."""
        while True:
            try:
                return self._evaluate(cache, start_layer, capture, generate, within)
            except torch.OutOfMemoryError as e:
                self.halve_batches(e)

    def _evaluate(self, cache, start_layer, capture, generate, within=None) -> dict:
        return self.metrics(self.run(cache, start_layer, capture, within=within), generate)

    def metrics(self, stats_iter, generate: bool = True) -> dict:
        """The evaluation dict from (batch, row stats) pairs covering every batch (:meth:`run`'s output)."""
        per_d = self._per_example(stats_iter)
        per = [per_d[i] for i in range(len(self.examples))]
        res = {"n": len(self.examples), "log_loss": float(self.loss(per_d, "answer")),
               "majority": majority_baseline(self.examples)}
        if self.kind == "classification":
            acc = {}
            for mode in ("sum", "mean"):
                preds = [int((d["sum"] / d["len"] if mode == "mean" else d["sum"]).argmax()) for d in per]
                acc[mode] = sum(p == ex.label for p, ex in zip(preds, self.examples)) / len(per)
                res[f"predictions_{mode}"] = preds
            res.update(accuracy=acc[self.scoring], accuracy_sum=acc["sum"], accuracy_mean=acc["mean"],
                       choice_loss=float(self.loss(per_d, "choice")), scoring=self.scoring)
        elif self.kind == "recall":
            res["accuracy"] = sum(d["greedy"] for d in per) / len(per)
        else:
            res["greedy_prefix_accuracy"] = sum(d["greedy"] for d in per) / len(per)
            if generate:
                gen = self.generate()
                res["accuracy"] = sum(gen["correct"]) / len(per)
                res["generations"] = gen["texts"]
            else:
                res["accuracy"] = res["greedy_prefix_accuracy"]
        res["correct"] = self._correct_flags(per, res)
        return res

    def _correct_flags(self, per, res) -> list[bool]:
        if self.kind == "classification":
            return [p == ex.label for p, ex in zip(res[f"predictions_{self.scoring}"], self.examples)]
        if self.kind == "generation" and "generations" in res:
            return [answer_in_continuation(ex.answers, t) for ex, t in zip(self.examples, res["generations"])]
        return [bool(d["greedy"]) for d in per]

    # -- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch_size: int = 32) -> dict:
        """Greedy generation from the prompt; only the new tokens are decoded and matched."""
        dev = self._device()
        prompts = [self._tok(ex.prompt, True)[-MAX_PROMPT_TOKENS:] for ex in self.examples]
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        texts: list[str] = [""] * len(prompts)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = self._pad([_Row(i, -1, prompts[i], []) for i in idx])
            out = self.model.generate(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev),
                                      max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.pad_id)
            new = out[:, b.input_ids.shape[1]:]
            for j, i in enumerate(idx):
                texts[i] = self.tokenizer.decode(new[j], skip_special_tokens=True)
        correct = [answer_in_continuation(ex.answers, t) for ex, t in zip(self.examples, texts)]
        return {"texts": texts, "correct": correct}


def answer_in_continuation(answers: list[str], continuation: str) -> bool:
    """LASER's substring rule (lower-cased, stripped), applied to the generated continuation only."""
    text = continuation.lower().strip()
    return any(a.lower().strip() in text for a in answers if a.strip())


def better(a: dict, b: dict) -> bool:
    """Is result a strictly better than b: higher accuracy, ties broken by lower log-loss."""
    if a["accuracy"] != b["accuracy"]:
        return a["accuracy"] > b["accuracy"]
    return a["log_loss"] < b["log_loss"] and not math.isclose(a["log_loss"], b["log_loss"], rel_tol=1e-9)
