"""The tokenizer of a model, written into a GGUF file the way llama.cpp's own converter writes it.

Vocabulary (ids in order, gaps as `[PAD{i}]`), token types (added special
tokens are CONTROL, other added tokens USER_DEFINED), merges, special ids and
the chat template (gguf.SpecialVocab, as convert_hf_to_gguf.py does), and the
pre-tokenizer name that tells llama.cpp how to split text before BPE.

The pre-tokenizer is recognised as the converter does (a hash of the ids of
a fixed test string, for the models llmprune is used with), else from the
structure of tokenizer.json; an unknown one is refused, because llama.cpp would
silently tokenise differently. Whether BOS/EOS are added is read from what the
tokenizer does, not from flags that may be absent.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from typing import Any

from llmprune.engine.core.errors import UserInputError

# the converter's test string (convert_hf_to_gguf.py, get_vocab_base_pre)
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3"
    " 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～"
    " ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure?"
    " 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# hash -> llama.cpp pre-tokenizer, for the families llmprune prunes (from the converter's table)
_KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
}
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"
    " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# gguf.TokenType values
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _looks_special(token: str) -> bool:
    """The converter's rule for added tokens that are control tokens without being flagged special."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for ids 0..vocab_size-1 (the model's embedding rows)."""
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoders = getattr(tokenizer, "added_tokens_decoder", {})
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(_UNUSED)
            continue
        if token in added:
            entry = decoders.get(index)
            special = bool(entry is not None and entry.special) or _looks_special(token)
            types.append(_CONTROL if special else _USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(token)
    return tokens, types


def _structure_name(tokenizer_json: dict) -> str | None:
    """The pre-tokenizer named by its tokenizer.json structure (ids-independent)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    return None


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer; UserInputError when unknown."""
    ids = tokenizer.encode(_CHECK_TEXT)
    known = _KNOWN_HASHES.get(sha256(str(ids).encode()).hexdigest())
    if known:
        return known
    backend = getattr(tokenizer, "backend_tokenizer", None)
    name = _structure_name(json.loads(backend.to_str())) if backend is not None else None
    if name is None:
        raise UserInputError(
            "the model's tokenizer splits text in a way llmprune cannot name for llama.cpp",
            "export with llama.cpp's convert_hf_to_gguf.py from a directory saved by llmprune",
        )
    return name


def _added_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, observed on a short text."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return add_bos, add_eos


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> dict:
    """Add the tokenizer's keys to a gguf.GGUFWriter; returns what was written (for the report)."""
    import gguf

    if tokenizer is None:
        raise UserInputError(
            "the model has no tokenizer, and llama.cpp needs one in the GGUF file",
            "save the tokenizer next to the model",
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str())["model"].get("type") != "BPE":
        raise UserInputError(
            "GGUF export supports byte-level BPE tokenizers (Llama-3, SmolLM, Qwen, GPT-2 style); this one is not",
            "export with llama.cpp's convert_hf_to_gguf.py from a directory saved by llmprune",
        )
    tokens, types = vocabulary(tokenizer, vocab_size)
    pre = pre_tokenizer_name(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="llmprune-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    add_bos, add_eos = _added_special(tokenizer)
    special.add_special_token = {"bos": add_bos, "eos": add_eos}
    special.add_to_gguf(writer, quiet=True)
    return {
        "pre": pre,
        "tokens": len(tokens),
        "merges": len(special.merges),
        "add_bos": add_bos,
        "chat_template": special.chat_template is not None,
    }
