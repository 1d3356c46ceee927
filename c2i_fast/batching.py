"""Rows and batches: how a scorer lays token sequences out for the model. Plain token lists in, tensors out;
no model is needed (tests/test_batching.py runs it on hand-written token lists).

Sequences are LEFT-padded so every row ends at the same column: the answer tokens then sit in the last few
positions of every row, and the logits are read at those columns only (the 49k-vocab head on every prompt
position would cost as much as the layers). ``position_ids`` are explicit so left padding does not shift
rotary/learned positions.

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

Shared prompt prefix: when every row starts with the same tokens (:func:`split_shared_prefix`), those tokens
leave the rows; the batches then hold the tokens after the prefix, with position ids from P on and a mask in
which every query sees all P prefix keys (the scorer hands the prefix's keys/values in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

@dataclass
class Row:
    example: int          # index into examples
    choice: int           # choice index, or -1 for the gold target / prompt-only row
    ids: list[int]        # token ids fed to the model: prompt + continuation (each choice's when packed)
    cont: list[int]       # continuation token ids (scored), may be empty; packed: every choice's, in order
    spans: list[tuple[int, int]] | None = None   # packed choices: (start index in ids, scored tokens) per choice
    trimmed: bool = False   # each continuation's / choice's last token is left out of ``ids`` (see trimmed)

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
class Batch:
    rows: list[Row]
    input_ids: torch.Tensor       # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor    # (B, T)
    keep: int                     # columns from the earliest first-read position to the end (Row.first_read)
    allowed: torch.Tensor | None = None   # (B, 1, T, P+T) bool: query may attend key (packed choices or a
                                          # shared prefix of P tokens; None: the 2D mask says it all)
    read: list[int] | None = None         # the columns, of the last ``keep``, whose logits are ever read
    gather: tuple | None = None           # (row, column in ``read``, target token, segment) index tensors
    seg_len: list[int] | None = None      # scored tokens per segment (a row's continuation or one choice)


# -- rows -------------------------------------------------------------------------------------------------
def prompt_rows(prompts: list[list[int]]) -> list[Row]:
    """One prompt-only row per example (classification over one-token choices: the last column is read)."""
    return [Row(i, -1, p, []) for i, p in enumerate(prompts)]


def choice_rows(prompts: list[list[int]], choices: list[list[list[int]]], pack: bool) -> list[Row]:
    """Rows scoring every choice of every example (``choices[i][j]``: choice j's tokens for example i):
    packed, one row ``prompt | c₀ | c₁ | …`` per example; else one row ``prompt | c`` per choice."""
    rows = []
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        if pack:
            ids, spans = list(p), []
            for c in cs:
                spans.append((len(ids), len(c)))
                ids += c
            rows.append(Row(i, -1, ids, ids[len(p):], spans))
            continue
        for j, c in enumerate(cs):
            rows.append(Row(i, j, p + c, c))
    return rows


def continuation_rows(prompts: list[list[int]], conts: list[list[int]]) -> list[Row]:
    """One row ``prompt | gold continuation`` per example (recall, generation)."""
    return [Row(i, -1, p + cont, cont) for i, (p, cont) in enumerate(zip(prompts, conts))]


def trimmed(r: Row) -> Row:
    """The row without its dead tokens. A continuation's (a packed choice's) last token predicts nothing that is
    scored, and under the causal mask no read position sees it (a packed choice's tokens are seen by its own
    later tokens only), so leaving it out changes no read logit and saves a column in every layer."""
    if not r.cont or r.trimmed:
        return r
    if not r.spans:
        return Row(r.example, r.choice, r.ids[:-1], r.cont, None, True)
    prompt_len = r.spans[0][0]
    ids, spans = r.ids[:prompt_len], []
    for start, n in r.spans:
        spans.append((len(ids), n))
        ids += r.ids[start:start + n - 1]
    return Row(r.example, r.choice, ids, r.cont, spans, True)


def shared_prefix_length(rows: list[Row]) -> int:
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


def split_shared_prefix(rows: list[Row], overhead: int) -> list[int]:
    """Take the shared prefix (:func:`shared_prefix_length`, P tokens) out of every row, in place, and return
    its tokens — when that pays: the rows lose P tokens each and the prefix's own pass costs P tokens plus one
    more forward call, ``overhead`` tokens (:func:`cut_batches`'s cost model), so only when P × (rows − 1) >
    ``overhead``. Otherwise the rows are left whole (returns []). FEVER's "Consider the following claim:" is 5
    tokens of a row's ~27: a fifth of every pass on a CPU, not worth a call on a GPU."""
    p = shared_prefix_length(rows)
    if p == 0 or p * (len(rows) - 1) <= overhead:
        return []
    prefix = rows[0].ids[:p]
    for r in rows:
        r.ids = r.ids[p:]
        r.spans = [(start - p, n) for start, n in r.spans] if r.spans else r.spans
    return prefix


# -- batches ----------------------------------------------------------------------------------------------
def cut_batches(rows: list[Row], batch_tokens: int, overhead: int) -> list[list[Row]]:
    """Rows of one example stay in one batch (the choice loss needs all of an example's choices).
    Examples are sorted by length and cut into contiguous batches of at most ``batch_tokens`` (padded)
    tokens that minimise padded tokens + ``overhead`` per batch: on a CPU, where a forward costs about its
    token count, that is little padding in many small batches; on a GPU, where a launch costs as much as
    many tokens, few full batches. An example longer than ``batch_tokens`` gets a batch of its own."""
    units: dict[int, list[Row]] = {}
    for r in rows:
        units.setdefault(r.example, []).append(r)
    order = sorted(units, key=lambda e: (max(len(r.ids) for r in units[e]), e))
    length = [max(len(r.ids) for r in units[e]) for e in order]
    count = [len(units[e]) for e in order]
    # best[j]: least cost of batching the first j examples; cut[j]: where its last batch starts
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        n = 0
        for i in range(j - 1, -1, -1):          # last batch = examples i..j-1, padded to length[j-1]
            n += count[i]
            padded = n * length[j - 1]
            if padded > batch_tokens and i < j - 1:
                break                            # an example alone may exceed batch_tokens
            if best[i] + padded + overhead < best[j]:
                best[j], cut[j] = best[i] + padded + overhead, i
    bounds, j = [], len(order)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [[r for e in order[i:j] for r in units[e]] for i, j in reversed(bounds)]


def pad(rows: list[Row], pad_id: int, prefix_len: int = 0, last_column_only: bool = False) -> Batch:
    """The rows left-padded with ``pad_id`` into one batch, after a shared prefix of ``prefix_len`` tokens
    (0: none), with its attention mask, position ids and read plan (:func:`plan_reads`)."""
    p = prefix_len
    t = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
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
    b = Batch(rows, ids, mask, pos, keep, allowed)
    plan_reads(b, last_column_only)
    return b


def plan_reads(b: Batch, last_column_only: bool = False) -> None:
    """Which of the last ``keep`` columns are read, and every scored token's (row, column, target) as one
    gather. A segment is one row's continuation or one choice of a packed row; the logits after a row's
    (or a choice's) last token predict nothing that is scored, so those columns are never computed (and with
    trimmed rows, the default, that token is not in the batch at all). ``last_column_only``: classification
    over one-token choices, which reads the last column only."""
    k = b.keep
    if last_column_only or not any(r.cont for r in b.rows):
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


def read_columns(b: Batch) -> torch.Tensor:
    """(len(read),) indices, in the batch's T columns, of the columns whose logits are read; on the CPU, so
    they index the head's input wherever it is."""
    t = b.input_ids.shape[1]
    return torch.tensor([t - b.keep + c for c in b.read])
