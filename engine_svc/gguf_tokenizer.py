"""The tokenizer files of a HF directory converted from a GGUF (engine_svc/convert_gguf.py).

The GGUF vocabulary and merges become a byte-level BPE `tokenizer.json`; its control and
user-defined tokens are the special tokens of `tokenizer_config.json` and
`special_tokens_map.json`, with the GGUF's chat template and bos / eos / unk / pad ids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engine_svc.gguf_metadata import ConversionError, GgufHyperParams, metadata_field
from engine_svc.model_config import write_json_object

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def build_tokenizer(reader: Any) -> tuple[Any, list[str]]:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocab, and its special token strings.

    llama.cpp's `smollm` pre-type splits every digit on its own, then applies the GPT-2 regex:
    that is `Digits(individual_digits=True)` followed by `ByteLevel(use_regex=True)`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model_kind = metadata_field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ConversionError(f"unsupported GGUF tokenizer model {model_kind!r} (only 'gpt2')")
    tokens: list[str] = list(metadata_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(metadata_field(reader, "tokenizer.ggml.token_type"))
    merge_lines: list[str] = list(metadata_field(reader, "tokenizer.ggml.merges"))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(token_types) != len(tokens):
        raise ConversionError("malformed GGUF: duplicate tokens or token_type length mismatch")
    merges = []
    for line in merge_lines:
        left, sep, right = line.partition(" ")
        if not sep:
            raise ConversionError(f"malformed GGUF: merge {line!r} is not 'a b'")
        merges.append((left, right))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False,
                                                    use_regex=True)
    special = [tok for tok, kind in zip(tokens, token_types)
               if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in special])
    return tokenizer, special


def write_tokenizer_files(reader: Any, out_dir: Path, hp: GgufHyperParams) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the special ids."""
    tokenizer, special = build_tokenizer(reader)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokens: list[str] = list(metadata_field(reader, "tokenizer.ggml.tokens"))
    ids = {
        "bos": int(metadata_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos": int(metadata_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        "unk": int(metadata_field(reader, "tokenizer.ggml.unknown_token_id", 0)),
        "pad": int(metadata_field(reader, "tokenizer.ggml.padding_token_id", 2)),
    }
    names = {f"{role}_token": tokens[index] for role, index in ids.items()}
    added = {
        str(tokens.index(tok)): {"content": tok, "lstrip": False, "normalized": False,
                                 "rstrip": False, "single_word": False, "special": True}
        for tok in special
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp.context_length,
        "added_tokens_decoder": added,
        **names,
    }
    template = metadata_field(reader, "tokenizer.chat_template", "")
    if template:
        tokenizer_config["chat_template"] = template
    write_json_object(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json_object(out_dir / "special_tokens_map.json", names)
    return ids
