"""Run configurations of ``c2i adapt``, ``c2i laser`` and ``c2i eval`` (keyword-only dataclasses).

``RunConfig`` holds what the three share; each command's own fields follow. Every field is what the CLI flag of
the same name (``_`` → ``-``) sets; ``report.json`` records the whole configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .confirm import RULES  # noqa: F401  (the values AdaptConfig.rule takes)
from .models import LASER_TYPES, MATRIX_TYPES
from .search import DEFAULT_CLUSTERS, DEFAULT_METHODS, DEFAULT_RANK_FRACTIONS


# ---------------------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RunConfig:
    """What adapt, laser and eval share: model and task, the held-out split, how rows are scored, logging.
    Keyword-only, so each command's own required fields (``out``) can follow these defaults."""
    model: str
    task: str
    test_size: int = 500
    seed: int = 0
    scoring: str = "mean"
    data_dir: str | None = None
    metric: str | None = None
    batch_tokens: int = 4096
    share_prefix: bool = True           # run a prompt prefix common to every row once per pass (exact)
    metrics_cache: bool = True          # read/write the base model's metrics (c2i_fast.cache; exact)
    progress: bool = True
    threads: int | None = None
    log_json: str | None = None         # path for JSON-lines events, "-" for stderr

    def shares_prefix(self) -> bool:
        """Whether scorers run the common prompt prefix once (the faithful modes run every row whole)."""
        return self.share_prefix

    def to_json(self) -> dict:
        """Every field, tuples as lists (the report's ``config``)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(kw_only=True)
class AdaptConfig(RunConfig):
    out: str
    samples: int = 100
    top_k: int = 5
    rank_fractions: tuple = DEFAULT_RANK_FRACTIONS
    clusters: tuple = DEFAULT_CLUSTERS
    methods: tuple = DEFAULT_METHODS
    types: tuple = MATRIX_TYPES
    max_evals: int = 48
    compose: int = 0
    loss: str = "auto"                  # the scan's loss: "auto" = choice on classification tasks, else answer
    score: str = "first_order"
    resume: bool = False
    draws: int = 1
    dense_candidates: bool = False      # paper-faithful: dense rebuild + full forward per candidate (bench)
    dtype: str = "float32"              # model weights; SVDs and accumulation are fp32 whatever this is
    device: str | None = None           # default: cuda when available
    device_map: str | None = None       # accelerate device map (e.g. "auto") for models bigger than one device
    gradient_checkpointing: bool = False
    gate_p: float | None = None         # keep the base model unless the selection gain's max-T p ≤ this
    # Which plan ships (c2i_fast.confirm): "confirm" = re-scored with the base on confirmation rows, shipped only
    # if its gain there is significant; "paper" = C2I's rule, the best on selection if it beats the base.
    rule: str = "confirm"
    confirm_size: int = 200             # confirmation rows: training portion, disjoint from selection and test
    confirm_top: int = 3                # best selection candidates re-scored on them
    alpha: float = 0.05                 # the confirmed gain's one-sided p × confirm_top must be ≤ alpha
    compare_rules: bool = False         # bench: report every rule's plan on the held-out split
    only_draw: int | None = None        # bench: run draw ``only_draw`` of ``draws`` alone (one unit per draw)
    # Stop scoring a candidate once it cannot be among the best the rule reads (c2i_fast.search.prune_keep):
    # "exact" (the same plans and top candidates as "off"), "race" / "halve" (fewer passes, not always the same
    # plan) or "off" (every candidate scored on every row).
    prune: str = "exact"
    # The scan from the scan cache (c2i_fast.scan_cache; exact): "on" reads and writes, "write" computes and
    # stores (a bench's first run, whose timings must include its scan), "off" neither.
    scan_cache: str = "on"
    # bench: keep at least this many of the best exact under pruning (default: those the rule reads). The results
    # table's C2I cell keeps confirm_top, so its every-candidate ranking also serves the confirm rule
    # (bench/bench_exhaustive.py).
    keep_best: int = 0
    # The scan's SVDs: "full" (every matrix), "randomized" (the top singular triplets the ρ grid needs, where
    # it needs fewer than c2i_fast.scan.RANDOMIZED_MAX_FRACTION of them; the top-K get a full SVD again) or "gram"
    # (every score from the smaller Gram matrix's eigendecomposition, the full SVD's up to round-off; the top
    # few get a full SVD; the default: every ranking measured so far was the full SVDs').
    scan_svd: str = "gram"
    # The base's and the candidates' selection passes: "model" (the model's dtype) or "bfloat16" (bf16 matmuls
    # under autocast, the LM head at full precision: c2i_fast.precision); scan, confirmation and held-out
    # passes run at the model's dtype.
    search_dtype: str = "model"

    def shares_prefix(self) -> bool:
        return self.share_prefix and not self.dense_candidates


@dataclass(kw_only=True)
class LaserConfig(RunConfig):
    out: str
    val_size: int = 100
    rank_fractions: tuple = DEFAULT_RANK_FRACTIONS
    types: tuple = LASER_TYPES
    layers: tuple | None = None         # default: every layer
    faithful: bool = False              # dense rebuild + full forward per candidate, as LASER's code does
    resume: bool = False
    # "exact": stop a candidate's pass once it cannot be the best (c2i_fast.search.Pruner; the same pick as
    # "off"; the max-T test then runs over the fully scored candidates only). "off": LASER's sweep, every row.
    prune: str = "off"
    draw: int = 0                       # select on draw ``draw`` of ``draws`` (adapt's --draws split: the
    draws: int = 1                      # same selection and held-out rows as that adapt draw)

    def shares_prefix(self) -> bool:
        return self.share_prefix and not self.faithful


@dataclass(kw_only=True)
class EvalConfig(RunConfig):
    plan: str | None = None             # an adapted directory (plan.json + adapted.safetensors)
    samples: int = 100
    out: str | None = None
