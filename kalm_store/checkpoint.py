"""Checks of a checkpoint folder's files before a model is built from them.

A damaged or hostile checkpoint must fail with one message naming the file and what to do, not a
traceback from deep inside safetensors, transformers or tokenizers, and never by building a model of
absurd size: the safetensors headers are read first (the safetensors library validates them), then
config.json's sizes are checked to be positive and to match the weights' shapes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .model import ModelLoadError

_REDOWNLOAD = "download the checkpoint again (or restore the folder)"
# Sizes of a text config that must be positive ints, and scales that must be positive finite floats
# (None allowed where the architecture allows it: no soft-capping).
_POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "sliding_window")
_POSITIVE_FLOATS = ("rms_norm_eps", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping")


def weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over every ``*.safetensors`` file of ``folder``, from the headers only.

    Raises
    ------
    ModelLoadError
        Naming the file when its header cannot be read (truncated file, header length beyond the file or
        the library's limit, malformed header JSON).
    """
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = list(f.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({_line(e)}, {path.stat().st_size} "
                                 f"bytes): it is truncated or damaged; {_REDOWNLOAD}") from e
    return shapes


def load_config(folder: Path, shapes: dict[str, list[int]]) -> Any:
    """``config.json`` of ``folder`` loaded and checked against the weights' ``shapes``.

    Raises
    ------
    ModelLoadError
        Naming config.json and the value when it does not parse, holds a non-positive size or scale, or
        describes other shapes than the weights hold.
    """
    from transformers import AutoConfig

    path = folder / "config.json"
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers validates in several exception classes; all mean a bad file
        raise ModelLoadError(f"{path} cannot be read as a model config ({type(e).__name__}: {_line(e)}); "
                             f"fix that value or {_REDOWNLOAD}") from e
    parts = {"decoder": getattr(config, "decoder", None),
             "encoder": getattr(getattr(config, "encoder", None), "text_config", None)}
    for part, sub in parts.items():
        if sub is None:
            continue
        for key in _POSITIVE_INTS:
            value = getattr(sub, key, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ModelLoadError(f"{path}: {part} {key} is {value!r}; it must be a positive int. Fix that value "
                                     f"or {_REDOWNLOAD}")
        for key in _POSITIVE_FLOATS:
            value = getattr(sub, key, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ModelLoadError(f"{path}: {part} {key} is {value!r}; it must be a positive finite number"
                                     f"{' or null' if 'softcapping' in key else ''}. Fix that value or {_REDOWNLOAD}")
        eps = getattr(sub, "rms_norm_eps", None)
        if eps is not None and eps >= 1:  # the norm would divide by ~sqrt(eps), not by the states' scale
            raise ModelLoadError(f"{path}: {part} rms_norm_eps is {eps!r}; it must be below 1 (Gemma uses 1e-6). "
                                 f"Fix that value or {_REDOWNLOAD}")
        _check_against_weights(path, part, sub, shapes)
    return config


def _check_against_weights(path: Path, part: str, sub: Any, shapes: dict[str, list[int]]) -> None:
    """Layer count and widths of ``part`` must be those of its weights (when the names show them)."""
    layers = {int(m.group(1)) for name in shapes
              if (m := re.search(rf"(?:^|\.){part}\.(?:text_model\.)?layers\.(\d+)\.", name))}
    if layers and sub.num_hidden_layers != len(layers):
        raise ModelLoadError(f"{path}: {part} num_hidden_layers is {sub.num_hidden_layers}, the weights hold "
                             f"{len(layers)} {part} layers; fix that value or {_REDOWNLOAD}")
    for name, shape in shapes.items():
        if name.endswith("embed_tokens.weight") and len(shape) == 2 and shape[1] != sub.hidden_size:
            raise ModelLoadError(f"{path}: {part} hidden_size is {sub.hidden_size}, the weights' {name} is "
                                 f"{shape[1]} wide; fix that value or {_REDOWNLOAD}")
        if name.endswith("embed_tokens.weight") and len(shape) == 2 and shape[0] != sub.vocab_size:
            raise ModelLoadError(f"{path}: {part} vocab_size is {sub.vocab_size}, the weights' {name} has "
                                 f"{shape[0]} rows; fix that value or {_REDOWNLOAD}")


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer of ``folder``; a file that does not load is named with what to do."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # tokenizers raises plain Exception for bad JSON variants, KeyError for missing keys
        raise ModelLoadError(f"{folder} has no loadable tokenizer (tokenizer.json / tokenizer_config.json: "
                             f"{type(e).__name__}: {_line(e)}); {_REDOWNLOAD}") from e


def _line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["load_config", "load_tokenizer", "weight_shapes"]
