"""Shared fixtures: tiny random Llama models (milliseconds each) and the shared text data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """../shared/data next to the checkout (override with LLMPRUNE_SHARED_DATA)."""
    return Path(os.environ.get("LLMPRUNE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    path = shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    path = shared_data_dir() / "wikitext-2" / "wiki.valid.tokens"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M (loaded once per test module: tests may change it); slow tests only."""
    from llmprune.engine.io.models import load_model

    try:
        return load_model("smollm2-135m")
    except Exception as error:  # the package is installed by `make install`
        pytest.skip(f"smollm2-135m unavailable: {error}")


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 384) trained in well under a second on CPython's docs."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [topics[key] for key in sorted(topics)][:60]
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def make_tiny_config(
    layers: int = 4,
    heads: int = 8,
    kv_heads: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = 384,
    **extra,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=extra.pop("tie_word_embeddings", False),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **extra,
    )


def make_tiny_model(seed: int = 0, **config_kwargs):
    """A random Llama with GQA (default 8 heads : 2 KV heads, 4 layers, hidden 64)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_tiny_config(**config_kwargs))
    # random init leaves tiny weights; scale up so that layers matter and logits differ
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture()
def tiny_model():
    return make_tiny_model()


@pytest.fixture()
def tiny_model_3to1():
    """GQA 3:1 (9 heads, 3 KV heads), like SmolLM2."""
    return make_tiny_model(heads=9, kv_heads=3, hidden=72)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved Hugging Face directory with a tiny model and its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model().save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def pydoc_text_file(tmp_path_factory) -> Path:
    """A local .txt corpus (CPython's docs), long enough for many windows."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(topics[key] for key in sorted(topics)), encoding="utf-8")
    return path
