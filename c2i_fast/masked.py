"""Masked-LM scoring, as LASER scored RoBERTa: the prompt + " <mask>", each choice's token read at the mask.

A row is the tokenizer's own ``[cls] prompt <mask> [sep]``; one encoder pass gives the hidden state at the mask,
the model's LM head turns it into (V,) logits there, and a choice's score is the log-probability of its one
token (tokenized with its leading space, as the task writes it)::

    row:   <s> Consider the following claim: … The claim is <mask> </s>
    read:                                                  ^ log-softmax over V → log p(" true"), log p(" false")

Classification only: recall and generation tasks need a causal LM and are refused. Every choice must be ONE
token after its leading space; a choice of several tokens, or two choices with the same token, is refused with
a :class:`~c2i_fast.errors.C2IError` naming the task, the example and the choice (scoring a first token only
would quietly change the task: " non-entailment" would be scored as " non").

:class:`MaskedScorer` offers what the scan (:func:`c2i_fast.scan.scan`: ``loss_batches``, ``batches``,
``metrics``, ``halve_batches``), the search (``evaluate(cache, start_layer=, within=, stop=)``), the shipping
rule (``evaluate(cache, capture=)``, ``examples``) and the base-metrics cache (``capture`` and the fields of
:func:`c2i_fast.cache.describe`) use of :class:`c2i_fast.evaluate.Scorer`, with the same metric keys. The prefix
cache works as for a causal LM: :mod:`c2i_fast.replay` captures and replays the inputs of the encoder layers
(``model.roberta.encoder.layer``), which do not depend on the direction of attention, so a candidate at layer ℓ
runs layers ≥ ℓ only. Not here: a shared prompt prefix (a prefix token attends to the whole row) and the
tail-only last layer (the head reads one column, but every column's keys/values feed it).
"""
from __future__ import annotations


import torch
from torch import nn

from .batching import Batch, cut_batches, pad, prompt_rows
from .errors import C2IError
from .evaluate import Scorer, StopForward, stop_after
from .replay import PrefixCache, capture_layers, detach, replay_layers, replay_within
from .tasks import Example, majority_baseline


class MaskedScorer:
    """Scores one fixed list of classification examples on a masked LM at its ``<mask>`` token (module docstring).

    ``model``: a ``*ForMaskedLM`` (RoBERTa/BERT-style: ``model.base_model`` the encoder, one other child the
    LM head). ``task`` names the task in error messages. ``max_new_tokens`` is kept for the metrics cache's key
    only (nothing is generated)."""

    def __init__(self, model: nn.Module, tokenizer, examples: list[Example], kind: str,
                 batch_tokens: int = 4096, scoring: str = "mean", max_new_tokens: int = 10,
                 batch_overhead: int | None = None, task: str = "task"):
        if not examples:
            raise C2IError("no examples to score")
        if scoring not in ("sum", "mean"):
            raise C2IError(f"--scoring {scoring!r}: choose sum or mean")
        if kind != "classification":
            raise C2IError(f"{task} is a {kind} task: a masked LM is scored at one <mask> token over a task's "
                           f"choices (classification tasks only); {kind} needs a causal LM")
        if tokenizer.mask_token_id is None:
            raise C2IError(f"{task}: the tokenizer has no mask token; a masked LM is scored at its <mask>")
        self.model, self.tokenizer, self.examples, self.kind, self.task = model, tokenizer, examples, kind, task
        self.scoring, self.max_new_tokens = scoring, max_new_tokens
        self.batch_tokens, self.batch_overhead = batch_tokens, batch_overhead
        self.progress = False                      # tqdm bar over batches (set for long evaluations)
        self.epoch = 0                             # bumped when an out-of-memory error halves the batches
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prefix_ids: list[int] = []            # no shared prefix, no tail-only layer (module docstring)
        self.tail_names: list[str] = []
        # RoBERTa-style embeddings number positions from padding_idx + 1; BERT-style from 0
        padding_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
        self.position_offset = 0 if padding_idx is None else padding_idx + 1
        self.head = _lm_head(model)
        self.choice_ids = [self._choice_tokens(ex) for ex in examples]       # per example, (C,) token ids
        same = all(ex.choices == examples[0].choices for ex in examples)
        self.single_token_choices = self.choice_ids[0] if same else None    # (C,) when every example shares them
        self.rows = prompt_rows([self._row_ids(ex) for ex in examples])
        self.batches = self._build_batches()
        self.forward_rows = len(self.rows)

    # -- building ---------------------------------------------------------------------------------------
    def _choice_tokens(self, ex: Example) -> torch.Tensor:
        """(C,) the one token of each choice, tokenized with its leading space; refuses several or none."""
        ids = []
        for c in ex.choices or []:
            toks = self.tokenizer(" " + c.lstrip(), add_special_tokens=False).input_ids
            if len(toks) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(toks)
                raise C2IError(f"{self.task}: example {ex.id!r}: choice {c!r} is {len(toks)} tokens {pieces} "
                               f"after a leading space; a masked LM scores one token at the <mask>, so every "
                               f"choice must be a single token")
            ids.append(toks[0])
        if len(ids) < 2 or len(set(ids)) != len(ids):
            raise C2IError(f"{self.task}: example {ex.id!r}: choices {ex.choices} need ≥ 2 distinct tokens at the "
                           f"<mask>, got {self.tokenizer.convert_ids_to_tokens(ids)}")
        if not 0 <= (ex.label if ex.label is not None else -1) < len(ids):
            raise C2IError(f"{self.task}: example {ex.id!r} has no gold label among its choices")
        return torch.tensor(ids)

    def _row_ids(self, ex: Example) -> list[int]:
        """``[cls] prompt <mask> [sep]`` as token ids; a prompt too long for the model's positions loses its
        first tokens (the special tokens and the mask stay)."""
        ids = self.tokenizer(ex.prompt + " " + self.tokenizer.mask_token, add_special_tokens=True).input_ids
        limit = self._max_tokens()
        if len(ids) > limit:
            special = set(self.tokenizer.all_special_ids)
            lead = next(i for i, t in enumerate(ids) if t not in special)
            ids = ids[:lead] + ids[lead + len(ids) - limit:]
        if self.tokenizer.mask_token_id not in ids:
            raise C2IError(f"{self.task}: example {ex.id!r}: no <mask> token left in its row")
        return ids

    def _max_tokens(self) -> int:
        """Tokens a row may hold: the model's positions (less RoBERTa's offset) and the tokenizer's limit."""
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None) or 512
        return min(n - self.position_offset, int(min(self.tokenizer.model_max_length, 1 << 30)))

    def _build_batches(self) -> list[Batch]:
        """Padding-aware batches (:func:`~c2i_fast.batching.cut_batches`), ``batch_overhead`` tokens a batch:
        by default 32 on a CPU, half of ``batch_tokens`` on a GPU (as :class:`~c2i_fast.evaluate.Scorer`)."""
        overhead = self.batch_overhead
        if overhead is None:
            overhead = self.batch_tokens // 2 if any(p.is_cuda for p in self.model.parameters()) else 32
        return [pad(rows, self.pad_id) for rows in cut_batches(self.rows, self.batch_tokens, overhead)]

    # -- forward ----------------------------------------------------------------------------------------
    def _device(self):
        return next(self.model.parameters()).device

    @staticmethod
    def mask_columns(b: Batch, mask_id: int) -> torch.Tensor:
        """(B,) the column of each row's <mask> in the left-padded batch (the last one, should the prompt hold
        the mask token's text too)."""
        hit = b.input_ids == mask_id                                             # (B, T)
        cols = torch.arange(hit.shape[1]).expand_as(hit).masked_fill(~hit, -1)
        return cols.max(dim=1).values

    def _mask_logits(self, b: Batch) -> torch.Tensor:
        """(B, V) logits at each row's mask: the encoder over the whole rows, the head at the mask column only
        (gathered by index, a contiguous (B, d) copy: the same GEMM with or without grad)."""
        dev = self._device()
        ids = b.input_ids.to(dev)
        hidden = self.model.base_model(input_ids=ids, attention_mask=b.attention_mask.to(dev),
                                       position_ids=(b.position_ids + self.position_offset).to(dev),
                                       use_cache=False).last_hidden_state      # (B, T, d)
        cols = self.mask_columns(b, self.tokenizer.mask_token_id).to(dev)
        logits = self.head(hidden[torch.arange(len(b.rows), device=dev), cols])  # (B, V)
        return logits if logits.dtype == torch.float64 else logits.float()

    def _row_stats(self, b: Batch, logits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B,) log p(gold token) over the vocabulary, and each row's (C,) choice log-probs."""
        logp = torch.log_softmax(logits, dim=-1)                                 # (B, V)
        choice = [logp[i, self.choice_ids[r.example].to(logp.device)] for i, r in enumerate(b.rows)]
        gold = torch.stack([c[self.examples[r.example].label] for c, r in zip(choice, b.rows)])
        return gold, choice

    def run(self, cache: PrefixCache | None = None, start_layer: int = 0, capture: set[int] = frozenset(),
            grad: bool = False, only: set[int] | None = None, within: str | None = None):
        """Yield (batch, (gold (B,), [choice log-probs (C,)] × B)) for each batch (``only`` those indices),
        replaying layers < ``start_layer`` from ``cache`` and capturing the inputs of ``capture``'s layers, as
        :meth:`c2i_fast.evaluate.Scorer.run` does: a cache captured for another batch layout is dropped, one
        without the entries asked for is filled by a pass from layer 0. ``within``: the one edited matrix, whose
        layer replays what runs before it (not with ``grad``)."""
        if cache is None:
            start_layer = 0
        if grad:
            within = None
        if cache is not None:
            cache.sync(self.epoch)
        if cache is not None and start_layer > 0 and any((bi, start_layer) not in cache.store
                                                         for bi in range(len(self.batches))):
            capture = set(capture) | {start_layer}
            start_layer = 0
        from tqdm.auto import tqdm
        for bi, b in enumerate(tqdm(self.batches, desc="evaluate", disable=not self.progress, leave=False)):
            if only is not None and bi not in only:
                continue
            with torch.set_grad_enabled(grad), replay_layers(self.model, cache, bi, start_layer), \
                    capture_layers(self.model, cache, bi, set(capture)), \
                    replay_within(self.model, cache, bi, within):
                logits = self._mask_logits(b)
            yield b, self._row_stats(b, logits)

    def capture(self, cache: PrefixCache, layers: set[int]) -> None:
        """Fill ``cache`` with each batch's input of every layer in ``layers`` (what ``evaluate(cache,
        capture=layers)`` stores) without the metrics: each pass stops once the layers below the highest have run."""
        layers = {l for l in layers if l > 0}
        if not layers:
            return
        cache.sync(self.epoch)
        with torch.no_grad():
            for bi, b in enumerate(self.batches):
                with capture_layers(self.model, cache, bi, layers), stop_after(self.model, max(layers)):
                    try:
                        self._mask_logits(b)
                    except StopForward:
                        pass

    # -- losses and metrics -----------------------------------------------------------------------------
    def loss(self, stats_iter, kind: str = "answer") -> torch.Tensor:
        """Mean over the examples in ``stats_iter`` ((batch, row stats) pairs): ``answer`` = −log p(gold token)
        over the vocabulary; ``choice`` = cross-entropy of the gold label under a softmax over the choices."""
        if kind not in ("answer", "choice"):
            raise C2IError(f"--loss {kind!r}: choose answer or choice")
        terms = []
        for b, (gold, choice) in stats_iter:
            for i, r in enumerate(b.rows):
                terms.append(-gold[i] if kind == "answer" else
                             -torch.log_softmax(choice[i], 0)[self.examples[r.example].label])
        return torch.stack(terms).mean()

    def loss_batches(self, kind: str = "answer", cache: PrefixCache | None = None, start_layer: int = 0,
                     only: set[int] | None = None, capture: set[int] = frozenset(), record: list | None = None):
        """One differentiable loss per batch, scaled so that their sum is the mean over examples (the scan's
        gradient pass); ``record`` collects each batch's detached row stats for :meth:`metrics`."""
        for b, stats in self.run(cache, start_layer, capture, grad=True, only=only):
            if record is not None:
                record.append((b, detach(stats)))
            yield self.loss([(b, stats)], kind) * (len(b.rows) / len(self.examples))

    # after an out-of-memory error: half the tokens per batch, batches rebuilt, caches invalidated (same steps)
    halve_batches = Scorer.halve_batches

    def evaluate(self, cache: PrefixCache | None = None, start_layer: int = 0, capture: set[int] = frozenset(),
                 generate: bool = True, within: str | None = None, stop=None) -> dict:
        """The :meth:`c2i_fast.evaluate.Scorer.evaluate` dict of a classification task. ``stop(correct,
        remaining, outcomes)``, asked after every batch, may end the pass (:meth:`pruned_result`); ``generate`` is
        accepted and unused. Out of memory halves the batches and retries."""
        while True:
            try:
                pairs, outcomes = [], {}
                for b, stats in self.run(cache, start_layer, capture, within=within):
                    pairs.append((b, stats))
                    if stop is not None:
                        preds = self._predictions([(b, stats)])
                        outcomes.update((r.example, preds[i] == self.examples[r.example].label)
                                        for i, r in enumerate(b.rows))
                        done, correct = len(outcomes), sum(outcomes.values())
                        if done < len(self.examples) and stop(correct, len(self.examples) - done, outcomes):
                            return self.pruned_result(done, correct, len(pairs))
                return self.metrics(pairs)
            except torch.OutOfMemoryError as e:
                self.halve_batches(e)

    def standing(self, pairs) -> tuple[int, int, float]:
        """(examples scored, correct among them, their mean answer loss) from pairs covering some batches (as
        :meth:`c2i_fast.evaluate.Scorer.standing`; one row per example here)."""
        pairs = list(pairs)
        if not pairs:
            return 0, 0, 0.0
        examples = [self.examples[r.example] for b, _ in pairs for r in b.rows]
        correct = sum(p == ex.label for p, ex in zip(self._predictions(pairs), examples))
        return len(examples), correct, float(self.loss(pairs, "answer"))

    def pruned_result(self, scored: int, correct: int, batches: int) -> dict:
        """What a pass stopped early records (as :meth:`c2i_fast.evaluate.Scorer.pruned_result`)."""
        return {"pruned": True, "n": len(self.examples), "rows_scored": scored, "correct_so_far": correct,
                "batches_scored": batches, "batches": len(self.batches)}

    @staticmethod
    def _predictions(stats_iter) -> list[int]:
        """The argmax choice of every row, in the order of the pairs."""
        return [int(c.argmax()) for _b, (_gold, choice) in stats_iter for c in choice]

    def metrics(self, stats_iter, generate: bool = True) -> dict:
        """The evaluation dict from (batch, row stats) pairs covering every batch. One token per choice, so the
        ``sum`` and ``mean`` scorings agree (both are reported, as for a causal LM)."""
        pairs = list(stats_iter)
        order = [r.example for b, _ in pairs for r in b.rows]
        by_example = dict(zip(order, self._predictions(pairs)))
        preds = [by_example[i] for i in range(len(self.examples))]
        acc = sum(p == ex.label for p, ex in zip(preds, self.examples)) / len(self.examples)
        return {"n": len(self.examples), "log_loss": float(self.loss(pairs, "answer")),
                "majority": majority_baseline(self.examples), "predictions_sum": preds,
                "predictions_mean": list(preds), "accuracy": acc, "accuracy_sum": acc, "accuracy_mean": acc,
                "choice_loss": float(self.loss(pairs, "choice")), "scoring": self.scoring,
                "correct": [p == ex.label for p, ex in zip(preds, self.examples)]}


def _lm_head(model: nn.Module) -> nn.Module:
    """The LM head: the one child of a ``*ForMaskedLM`` besides its encoder (RoBERTa's ``lm_head``, BERT's
    ``cls``), which maps (…, d) hidden states to (…, V) logits position by position."""
    heads = [m for n, m in model.named_children() if m is not model.base_model]
    if len(heads) != 1:
        names = [n for n, _ in model.named_children()]
        raise C2IError(f"{type(model).__name__}: cannot tell its LM head among its children {names}")
    return heads[0]
