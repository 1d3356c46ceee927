"""Batched scoring of a model on task examples: accuracy, log-loss and the Σ-gradient loss.

A :class:`Scorer` tokenizes its examples once, lays them out in rows and batches (:mod:`c2i_fast.batching`:
left-padded rows, packed choices, trimmed last tokens, read columns) and runs the model over them, as often as
the search asks, each run with what :mod:`c2i_fast.replay` spares: layers below a candidate's replayed from a
:class:`~c2i_fast.replay.PrefixCache`, the modules before the edited matrix in its own layer replayed, and the
last layer's position-wise matrices run at the read columns only. ``logits_to_keep`` asks the LM head for the
read columns only.

Shared prompt prefix: when every row starts with the same tokens (a task instruction, few-shot examples), those
tokens are run once per pass as a one-row batch and their keys/values are handed to every batch through the
model's own KV cache (``cache``; ``past_key_values`` before transformers 5.25), so each batch runs only the part of
its rows after the prefix::

    prefix (1 row, P tokens) ──KV──▶ batch rows [pad … | tokens after the prefix], position ids P, P+1, …

Causality makes this exact: a prefix token sees only prefix tokens, so its keys/values are the same in every
row. The prefix gets its own entries in the PrefixCache (its layer-ℓ−1 output and its keys/values below ℓ), so
a candidate at layer ℓ recomputes the prefix from ℓ up only. Used for decoder-only causal LMs with full
attention in every layer (:func:`~c2i_fast.models.supports_shared_prefix`); everything else runs the rows whole.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from .batching import (Batch, Row, choice_rows, continuation_rows, cut_batches, pad, prompt_rows, read_columns,
                       split_shared_prefix, trimmed)
from .errors import C2IError
from .models import decoder_layers, kv_cache_kwarg, last_layer_positionwise, layer_root, supports_shared_prefix
from .replay import (PREFIX, PrefixCache, capture_layers, detach, has_prefill, replay_layers, replay_prefill,
                     replay_within, tail_only)
from .tasks import Example, majority_baseline

MAX_PROMPT_TOKENS = 1024
SUBSET_BATCHES = 12          # Scorer.stopping_order searches every subset of up to this many batches (4096)


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
        if trim:                                   # no column for a continuation's last token (batching.trimmed)
            self.rows = [trimmed(r) for r in self.rows]
        self.prefix_ids: list[int] = []           # shared prompt prefix, run once per pass (module docstring)
        if share_prefix and supports_shared_prefix(model):
            self.prefix_ids = split_shared_prefix(self.rows, self._batch_overhead())
        self.batches = self._build_batches()
        self.forward_rows = len(self.rows)
        # the last layer's position-wise matrices, run at the read columns only (replay.tail_only)
        self.tail_names = last_layer_positionwise(model) if tail_only else []

    # -- building ---------------------------------------------------------------------------------------
    def _tok(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def _build_rows(self) -> list[Row]:
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
                return prompt_rows(prompts)
            return choice_rows(prompts, [[choice_ids[c] for c in ex.choices] for ex in self.examples],
                               self.pack_choices)
        conts = []
        for ex in self.examples:
            cont = self._tok(ex.target, False)
            if not cont:
                raise C2IError(f"example {ex.id!r}: answer {ex.target!r} tokenizes to zero tokens")
            conts.append(cont)
        return continuation_rows(prompts, conts)

    def _batch_overhead(self) -> int:
        """What one more forward call costs, in tokens: ``batch_overhead``, by default 32 on a CPU (a forward
        costs about its token count) and half of ``batch_tokens`` on a GPU (a launch costs as much as many)."""
        if self.batch_overhead is not None:
            return self.batch_overhead
        return self.batch_tokens // 2 if any(p.is_cuda for p in self.model.parameters()) else 32

    def _build_batches(self) -> list[Batch]:
        """Padding-aware batches (:func:`~c2i_fast.batching.cut_batches`), each costing
        :meth:`_batch_overhead` tokens more than its padded tokens."""
        return [self._pad(rows) for rows in cut_batches(self.rows, self.batch_tokens, self._batch_overhead())]

    def _pad(self, rows: list[Row]) -> Batch:
        return pad(rows, self.pad_id, len(self.prefix_ids), self.single_token_choices is not None)

    # -- forward ----------------------------------------------------------------------------------------
    def _device(self):
        return next(self.model.parameters()).device

    def _float_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Additive float mask from a bool one (works for eager and SDPA attention)."""
        dtype = next(self.model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        return torch.zeros(allowed.shape, dtype=dtype, device=self._device()).masked_fill_(
            ~allowed.to(self._device()), torch.finfo(dtype).min)

    def _logits(self, b: Batch, prefix_kv: list | None = None) -> torch.Tensor:
        dev = self._device()
        mask = b.attention_mask.to(dev) if b.allowed is None else self._float_mask(b.allowed)
        extra = {}
        if prefix_kv is not None:        # the shared prefix's keys/values, the same for every row
            from transformers import DynamicCache
            n = b.input_ids.shape[0]
            extra[kv_cache_kwarg(self.model)] = DynamicCache(
                [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_kv], config=self.model.config)
        # as indices: the head then gets a contiguous (B, len(read), d) copy, which the same GEMM multiplies with or
        # without grad (a [-k:] slice is a strided view that autograd multiplies with a batched GEMM, so the
        # scan's logits would differ from an evaluation's in the last bits)
        read = self.read_columns(b)
        with tail_only(self.model, self.tail_names, read):
            out = self.model(input_ids=b.input_ids.to(dev), attention_mask=mask, position_ids=b.position_ids.to(dev),
                             logits_to_keep=read, use_cache=False, **extra)
        logits = out.logits                                          # (B, len(read), V)
        return logits if logits.dtype == torch.float64 else logits.float()

    @staticmethod
    def read_columns(b: Batch) -> torch.Tensor:
        """(len(read),) indices of the columns whose logits are read (:func:`~c2i_fast.batching.read_columns`)."""
        return read_columns(b)

    def _row_stats(self, b: Batch, logits: torch.Tensor):
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

    def _prefix_kv(self, cache: PrefixCache | None, start_layer: int, capture: set[int],
                   stop_below: int | None = None) -> list:
        """(K, V) of every layer, each (1, kv_heads, P, head_dim), for the shared prefix under the model's
        current weights: layers < ``start_layer`` from the cache, the rest computed (a one-row pass).
        ``stop_below``: run layers < ``stop_below`` only (:meth:`capture`; only those layers' K, V are valid)."""
        from transformers import DynamicCache
        dev, p = self._device(), len(self.prefix_ids)
        kv = DynamicCache(config=self.model.config)
        causal = torch.ones(p, p, dtype=torch.bool).tril()[None, None]
        with replay_layers(self.model, cache, PREFIX, start_layer), \
                capture_layers(self.model, cache, PREFIX, set(capture)), stop_after(self.model, stop_below):
            try:
                self.model(input_ids=torch.tensor([self.prefix_ids], device=dev),
                           attention_mask=self._float_mask(causal), position_ids=torch.arange(p, device=dev)[None],
                           logits_to_keep=1, use_cache=True, **{kv_cache_kwarg(self.model): kv})
            except StopForward:
                pass
        layers = [(layer.keys, layer.values) for layer in kv.layers]
        if start_layer > 0:
            layers[:start_layer] = cache.store[("prefix_kv", start_layer)]
        if cache is not None:
            for l in capture:            # keys/values below l do not change for a candidate at l
                cache.store[("prefix_kv", l)] = [(detach(k), detach(v)) for k, v in layers[:l]]
        return layers

    def run(self, cache: PrefixCache | None = None, start_layer: int = 0, capture: set[int] = frozenset(),
            grad: bool = False, only: set[int] | None = None, within: str | None = None,
            order: list[int] | None = None):
        """Yield (batch, row stats) for each batch (in ``order``, batch indices, when given); reuse/capture the
        prefix cache as asked.

        A cache captured for another batch layout (before an out-of-memory split) is dropped; a batch whose
        cache entry is missing runs from layer 0 and captures it; without a cache every pass runs from layer 0.
        ``within``: the one edited matrix, whose layer replays what runs before it
        (:func:`~c2i_fast.replay.replay_within`)."""
        if cache is None:
            start_layer = 0
        if within is not None and (grad or any(layer_root(n) == layer_root(within) for n in self.tail_names)):
            within = None        # the last layer's tail-only hooks gather columns of the modules it would replay
        if cache is not None:
            cache.sync(self.epoch)
        keys = list(range(len(self.batches))) + ([PREFIX] if self.prefix_ids else [])
        if cache is not None and start_layer > 0 and (
                any((k, start_layer) not in cache.store for k in keys)
                or (self.prefix_ids and ("prefix_kv", start_layer) not in cache.store)):
            capture = set(capture) | {start_layer}
            start_layer = 0
        from tqdm.auto import tqdm
        kv = None
        for bi in tqdm(range(len(self.batches)) if order is None else order, desc="evaluate",
                       disable=not self.progress, leave=False):
            if only is not None and bi not in only:
                continue
            b = self.batches[bi]
            with torch.set_grad_enabled(grad):
                if self.prefix_ids and (kv is None or grad):     # with grad: each batch's graph is freed
                    kv = self._prefix_kv(cache, start_layer, capture)
                with replay_layers(self.model, cache, bi, start_layer), \
                        capture_layers(self.model, cache, bi, set(capture)), \
                        replay_within(self.model, cache, bi, within):
                    logits = self._logits(b, kv)
            yield b, self._row_stats(b, logits)

    def capture(self, cache: PrefixCache, layers: set[int]) -> None:
        """Fill ``cache`` with what ``evaluate(cache, capture=layers)`` stores (each batch's input of every layer
        in ``layers``, and the shared prefix's entries) without the metrics: each batch runs up to the highest of
        those layers only (a forward hook ends the pass, :func:`stop_after`). The same tensors, computed by the
        same operations, as the full pass stores. For a base pass whose metrics are known
        (:mod:`c2i_fast.cache`). Out of memory halves the batches and retries."""
        while True:
            try:
                return self._capture(cache, set(layers))
            except torch.OutOfMemoryError as e:
                self.halve_batches(e)

    def _capture(self, cache: PrefixCache, layers: set[int]) -> None:
        layers = {l for l in layers if l > 0}
        if not layers:
            return
        cache.sync(self.epoch)
        if self.kind == "generation" and supports_shared_prefix(self.model):
            self._capture_generation(cache, layers)
        top = max(layers)
        kv = None
        with torch.no_grad():
            for bi, b in enumerate(self.batches):
                if self.prefix_ids and kv is None:      # K, V of the layers that run (the others were not)
                    kv = self._prefix_kv(cache, 0, layers, stop_below=top)[:top]
                with capture_layers(self.model, cache, bi, layers), stop_after(self.model, top):
                    try:
                        self._logits(b, kv)
                    except StopForward:
                        pass

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
                record.append((b, detach(stats)))
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
                 capture: set[int] = frozenset(), generate: bool = True, within: str | None = None,
                 stop=None) -> dict:
        """Accuracy (primary scoring + both variants), log-loss, choice-loss, majority baseline.
        Out of memory on a batch halves the batches and retries.

        ``stop(correct, remaining, outcomes) -> bool`` (early stopping, :func:`c2i_fast.search.search`'s pruning)
        is asked after every batch, with the examples answered correctly so far among those whose rows are all
        scored, the examples still to come, and ``outcomes`` (example index → correct) of the scored ones (the
        pass's own dict, growing batch by batch: copy it to keep it); True ends the pass and returns
        :meth:`pruned_result` instead of the metrics.
        ``stop.likely_wrong`` and ``stop.bar`` (a :class:`~c2i_fast.search.Stop`), when set, order the batches
        (:meth:`stopping_order`). A pass that is not stopped returns exactly what it would without ``stop`` (the
        same batches, put back in their own order before :meth:`metrics`, so the same sums in the same order).
        Ignored for generation tasks (accuracy comes from generate())."""
        while True:
            try:
                return self._evaluate(cache, start_layer, capture, generate, within, stop)
            except torch.OutOfMemoryError as e:
                self.halve_batches(e)

    def _evaluate(self, cache, start_layer, capture, generate, within=None, stop=None) -> dict:
        if stop is None or not self.can_stop_early():
            return self.metrics(self.run(cache, start_layer, capture, within=within), generate,
                                cache, start_layer, capture)
        pairs, outcomes = [], {}
        order = self.stopping_order(getattr(stop, "likely_wrong", None), getattr(stop, "bar", None))
        for b, stats in self.run(cache, start_layer, capture, within=within, order=order):
            pairs.append((b, stats))
            outcomes.update((e, self.example_correct(d, self.examples[e]))
                            for e, d in self.complete_examples(pairs).items() if e not in outcomes)
            correct = sum(outcomes.values())
            if len(outcomes) < len(self.examples) and stop(correct, len(self.examples) - len(outcomes), outcomes):
                return self.pruned_result(len(outcomes), correct, len(pairs))
        at = {id(b): i for i, b in enumerate(self.batches)}
        return self.metrics(sorted(pairs, key=lambda p: at[id(p[0])]), generate, cache, start_layer, capture)

    # -- early stopping ---------------------------------------------------------------------------------
    def can_stop_early(self) -> bool:
        """Is an example's correctness known batch by batch? Not for generation (scored by greedy decoding)."""
        return self.kind in ("classification", "recall")

    def stopping_order(self, likely_wrong: list[bool] | None, bar: int | None = None) -> list[int]:
        """Batch indices for a pass that stops once its correct answers plus the examples still to come fall below
        ``bar``, i.e. once its wrong answers exceed n − bar. It can stop after a batch only, so it saves the rows
        after the first batches where that happens. Planned for a candidate that errs where the base errs
        (``likely_wrong``, per example) and once more: the fewest rows whose likely wrong answers reach
        min(n − bar, the base's wrong answers − 1) + 1 run first (densest in them first), the rest after in their
        own order. An exact search over the subsets of up to SUBSET_BATCHES batches, by density beyond. None,
        or no such rows: the batches' own order."""
        own = list(range(len(self.batches)))
        if likely_wrong is None or bar is None:
            return own
        wrong = [sum(bool(likely_wrong[r.example]) for r in b.rows) for b in self.batches]
        size = [len(b.rows) for b in self.batches]
        need = min(len(self.examples) - bar, sum(wrong) - 1) + 1       # wrong answers that stop the pass
        if need <= 0 or need > sum(wrong):
            return own
        density = sorted(own, key=lambda i: -wrong[i] / max(1, size[i]))
        if len(own) <= SUBSET_BATCHES:
            best = min((m for m in range(1, 1 << len(own)) if sum(wrong[i] for i in own if m >> i & 1) >= need),
                       key=lambda m: (sum(size[i] for i in own if m >> i & 1), m))
            first = [i for i in density if best >> i & 1]
        else:
            first, got = [], 0
            for i in density:
                if got >= need:
                    break
                first.append(i)
                got += wrong[i]
        return first + [i for i in own if i not in first]

    def rows_per_example(self) -> list[int]:
        """(n_examples,) how many rows each example spreads over (1, or one per choice when not packed)."""
        out = [0] * len(self.examples)
        for r in self.rows:
            out[r.example] += 1
        return out

    def example_correct(self, d: dict, ex: Example) -> bool:
        """One example's correctness from its :meth:`_per_example` entry, as :meth:`metrics` decides it."""
        if self.kind == "classification":
            sc = d["sum"] / d["len"] if self.scoring == "mean" else d["sum"]
            return int(sc.argmax()) == ex.label
        return bool(d["greedy"])

    def complete_examples(self, pairs) -> dict[int, dict]:
        """The :meth:`_per_example` entries of the examples whose rows all lie in ``pairs`` ((batch, row stats)
        pairs covering some batches): an example spread over rows in batches not yet run is not complete."""
        left = self.rows_per_example()
        for b, _ in pairs:
            for r in b.rows:
                left[r.example] -= 1
        return {e: d for e, d in self._per_example(pairs).items() if left[e] == 0}

    def standing(self, pairs) -> tuple[int, int, float]:
        """(examples complete, correct among them, their mean answer loss) from (batch, row stats) pairs that
        cover some batches (:meth:`run` with ``only``): how a candidate stands on the rows scored so far
        (successive halving, :func:`c2i_fast.search.search`). An example spread over rows in batches not yet
        run is not complete."""
        done = self.complete_examples(pairs)
        if not done:
            return 0, 0, 0.0
        correct = sum(self.example_correct(d, self.examples[e]) for e, d in done.items())
        return len(done), correct, float(self.loss(done, "answer"))

    def pruned_result(self, scored: int, correct: int, batches: int) -> dict:
        """What a pass stopped early records: no metrics, only how far it got (examples whose rows were all
        scored, how many of them were correct, batches run)."""
        return {"pruned": True, "n": len(self.examples), "rows_scored": scored, "correct_so_far": correct,
                "batches_scored": batches, "batches": len(self.batches)}

    def metrics(self, stats_iter, generate: bool = True, cache: PrefixCache | None = None, start_layer: int = 0,
                capture: set[int] = frozenset()) -> dict:
        """The evaluation dict from (batch, row stats) pairs covering every batch (:meth:`run`'s output);
        ``cache``, ``start_layer`` and ``capture`` go to :meth:`generate` (generation tasks)."""
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
                gen = self.generate(cache=cache, start_layer=start_layer, capture=capture)
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
    def generation_batches(self, batch_size: int = 32) -> list[tuple[list[int], Batch]]:
        """Greedy generation's batches: (example indices, left-padded prompts), prompts sorted by length."""
        prompts = [self._tok(ex.prompt, True)[-MAX_PROMPT_TOKENS:] for ex in self.examples]
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        return [(idx, self._pad([Row(i, -1, prompts[i], []) for i in idx]))
                for idx in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]

    @torch.no_grad()
    def generate(self, batch_size: int = 32, cache: PrefixCache | None = None, start_layer: int = 0,
                 capture: set[int] = frozenset()) -> dict:
        """Greedy generation from the prompt; only the new tokens are decoded and matched.

        With a ``cache``, each batch's prefill replays layers < ``start_layer`` and captures the layers in
        ``capture`` (:func:`~c2i_fast.replay.replay_prefill`; keys ``("gen", batch)``), as :meth:`run` does for
        the scored pass: a batch whose entries are missing runs from layer 0 and captures them."""
        dev = self._device()
        batches = self.generation_batches(batch_size)
        replay = cache is not None and supports_shared_prefix(self.model)   # a plain KV cache, every layer full
        if not replay:
            start_layer, capture = 0, set()
        else:
            cache.sync(self.epoch)
        texts: list[str] = [""] * len(self.examples)
        for g, (idx, b) in enumerate(batches):
            start, keep = start_layer, set(capture)
            if start > 0 and not has_prefill(cache, ("gen", g), start):
                start, keep = 0, keep | {start}
            with replay_prefill(self.model, cache if replay else None, ("gen", g), start, keep):
                out = self.model.generate(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev),
                                          max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.pad_id)
            new = out[:, b.input_ids.shape[1]:]
            for j, i in enumerate(idx):
                texts[i] = self.tokenizer.decode(new[j], skip_special_tokens=True)
        correct = [answer_in_continuation(ex.answers, t) for ex, t in zip(self.examples, texts)]
        return {"texts": texts, "correct": correct}

    @torch.no_grad()
    def _capture_generation(self, cache: PrefixCache, layers: set[int], batch_size: int = 32) -> None:
        """What :meth:`generate` captures for ``layers``, from prefills that stop below the highest of them (a
        one-token ``generate()``: the same prefill call as a longer one makes)."""
        dev, top = self._device(), max(layers)
        for g, (_, b) in enumerate(self.generation_batches(batch_size)):
            if all(has_prefill(cache, ("gen", g), l) for l in layers):
                continue
            with replay_prefill(self.model, cache, ("gen", g), 0, layers), stop_after(self.model, top):
                try:
                    self.model.generate(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev),
                                        max_new_tokens=1, do_sample=False, pad_token_id=self.pad_id)
                except StopForward:
                    pass


class StopForward(Exception):
    """Raised by :func:`stop_after`'s hook to end a forward pass early."""


@contextmanager
def stop_after(model: nn.Module, below: int | None):
    """End the model's forward once decoder layers < ``below`` have run (a hook on layer ``below`` − 1 raises
    :class:`StopForward`; hooks registered before it, like :func:`~c2i_fast.replay.capture_layers`', run
    first). ``below`` None or ≤ 0: no stop."""
    if below is None or below <= 0:
        yield
        return

    def hook(_m, _inp, _out):
        raise StopForward
    handle = decoder_layers(model)[below - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def answer_in_continuation(answers: list[str], continuation: str) -> bool:
    """LASER's substring rule (lower-cased, stripped), applied to the generated continuation only."""
    text = continuation.lower().strip()
    return any(a.lower().strip() in text for a in answers if a.strip())


def better(a: dict, b: dict) -> bool:
    """Is result a strictly better than b: higher accuracy, ties broken by lower log-loss."""
    if a["accuracy"] != b["accuracy"]:
        return a["accuracy"] > b["accuracy"]
    return a["log_loss"] < b["log_loss"] and not math.isclose(a["log_loss"], b["log_loss"], rel_tol=1e-9)
