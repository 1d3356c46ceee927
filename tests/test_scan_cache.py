"""The scan cache (c2i_fast.scan_cache): a stored scan comes back bit for bit, a damaged or foreign entry is a
miss, the modes read and write what they say; on the real SmolLM2 a second `c2i adapt` on the same rows skips
the gradient pass and the SVDs and reports what the first did."""
from __future__ import annotations

import json
import math

import pytest
import torch

from c2i_fast.scan import MatrixScan, ScanResult
from c2i_fast.scan_cache import ScanCache
from c2i_fast.svd import SVD


def _scan() -> ScanResult:
    g = torch.Generator().manual_seed(0)
    top = MatrixScan(name="model.layers.3.mlp.down_proj", layer=3, type="mlp_out", shape=(6, 4),
                     g_sigma=torch.randn(4, generator=g), delta={0.9: -0.125, 0.01: 1 / 3}, score=-0.125,
                     svd=SVD(torch.randn(6, 4, generator=g), torch.rand(4, generator=g), torch.randn(4, 4, generator=g)),
                     grad=torch.randn(6, 4, generator=g))
    rest = MatrixScan(name="model.layers.0.self_attn.o_proj", layer=0, type="o", shape=(4, 4),
                      g_sigma=torch.randn(4, generator=g, dtype=torch.float64), delta={0.9: math.inf},
                      score=math.inf, exact=False, estimate="gram")
    return ScanResult(matrices=[top, rest], loss=0.6931471805599453, loss_kind="answer", score_kind="first_order",
                      seconds={"gradient": 3.0, "svd": 1.0}, skipped={"model.layers.1.mlp.up_proj": "NaN gradient"},
                      base={"accuracy": 0.5}, svds={"full": 1, "gram": 1})


KEY = {"rows": {"model": "abc", "threads": 1}, "matrices": ["a", "b"], "rank_fractions": [0.9, 0.01],
       "top_k": 1, "loss": "answer", "score": "first_order", "svd": "gram", "checkpointing": False}


def _same(a: MatrixScan, b: MatrixScan):
    assert (a.name, a.layer, a.type, a.shape, a.delta, a.score, a.exact, a.estimate) == \
           (b.name, b.layer, b.type, b.shape, b.delta, b.score, b.exact, b.estimate)
    assert a.g_sigma.dtype == b.g_sigma.dtype and torch.equal(a.g_sigma, b.g_sigma)
    for part in ("u", "s", "v"):
        assert (a.svd is None) == (b.svd is None)
        if a.svd is not None:
            assert torch.equal(getattr(a.svd, part), getattr(b.svd, part))
    assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))


def test_a_stored_scan_comes_back_bit_for_bit(tmp_path):
    sc = _scan()
    cache = ScanCache("on", root=tmp_path)
    assert cache.get(KEY) is None and cache.hit is False
    cache.put(KEY, sc)
    back = cache.get(KEY)
    assert cache.hit is True
    for a, b in zip(sc.matrices, back.matrices, strict=True):
        _same(a, b)
    assert (back.loss, back.loss_kind, back.score_kind, back.skipped, back.svds) == \
           (sc.loss, sc.loss_kind, sc.score_kind, sc.skipped, sc.svds)
    # what a hit cannot give: the scan forward's base metrics (and the prefix cache); no time was spent
    assert back.base is None and back.seconds == {"gradient": 0.0, "svd": 0.0}
    assert [p.name for p in tmp_path.iterdir()] == [cache.folder(KEY).name]      # no temporary folder left


def test_modes_and_misses(tmp_path):
    sc = _scan()
    ScanCache("off", root=tmp_path).put(KEY, sc)
    assert not any(tmp_path.iterdir())
    write = ScanCache("write", root=tmp_path)
    write.put(KEY, sc)
    assert write.get(KEY) is None                    # "write" stores but never reads
    on = ScanCache("on", root=tmp_path)
    assert on.get(KEY) is not None
    other = {**KEY, "top_k": 2}                      # another key: a miss
    assert on.get(other) is None and on.hit is False
    # an entry whose stored key differs (a hash collision, a hand-copied folder) is a miss, not a wrong scan
    folder = on.folder(KEY)
    meta = json.loads((folder / "scan.json").read_text())
    (folder / "scan.json").write_text(json.dumps({**meta, "key": other}))
    assert on.get(KEY) is None
    (folder / "scan.json").write_text(json.dumps(meta))
    (folder / "tensors.safetensors").write_bytes(b"not safetensors")     # damaged: a miss, no exception
    assert on.get(KEY) is None
    with pytest.raises(ValueError, match="scan cache mode"):
        ScanCache("sometimes")


def test_a_second_adapt_on_the_same_rows_reads_the_scan(tmp_path, monkeypatch, smollm2, data_dir):
    from c2i_fast import scan as scan_module
    from c2i_fast.pipeline import AdaptConfig, adapt
    monkeypatch.setenv("C2I_CACHE", str(tmp_path / "cache"))
    small = dict(model="smollm2", task="fever", samples=12, test_size=12, confirm_size=0, top_k=2, clusters=(1, 2),
                 methods=("block",), rank_fractions=(0.1, 0.01), max_evals=2, threads=1, progress=False,
                 data_dir=str(data_dir), types=("mlp_out",))
    first = adapt(AdaptConfig(out=str(tmp_path / "a"), **small), lm=smollm2)
    calls = []
    real = scan_module.scan
    monkeypatch.setattr("c2i_fast.pipeline.scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = adapt(AdaptConfig(out=str(tmp_path / "b"), **small), lm=smollm2)
    assert first["scan"]["cache"] == "miss" and second["scan"]["cache"] == "hit" and calls == []
    assert second["timings"]["scan_gradient"] == 0.0
    for k in ("plan", "decision", "selection", "test"):
        assert first[k] == second[k], k
    strip = [{k: v for k, v in c.items() if k != "seconds"} for c in first["search"]["candidates"]]
    assert strip == [{k: v for k, v in c.items() if k != "seconds"} for c in second["search"]["candidates"]]
    assert {k: v for k, v in first["scan"].items() if k != "cache"} == \
           {k: v for k, v in second["scan"].items() if k != "cache"}
    # --no-scan-cache: the scan runs again, whatever the cache holds
    third = adapt(AdaptConfig(out=str(tmp_path / "c"), scan_cache="off", **small), lm=smollm2)
    assert third["scan"]["cache"] == "off" and calls == [1] and third["plan"] == first["plan"]
