"""The encoder's identity: what a stored matrix depends on, apart from the whole model's fingerprint.

A stored matrix is ``pool(Enc(tokenize("<Document>: " + text)[:max_length]))``: it depends on the
encoder's weights (token embedding included), the tokenizer, the document template and
``max_length``, and on nothing in the decoder. A table records this fingerprint beside the whole
model's, so a model whose decoder was fine-tuned (``kalm-store finetune``) scores the table as it is.

The weights are hashed as stored in the checkpoint's safetensors files (name, dtype, shape and raw
bytes of each encoder tensor), so the fingerprint does not depend on the device or compute dtype the
model is loaded in. The vision tower is left out: text reranking never runs it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from . import prompts

# Checkpoint key prefixes of the text encoder (transformers < 5.24 files, and the renamed ones).
_ENCODER_PREFIX = "model.encoder."
_UNUSED = ("vision_tower.", "multi_modal_projector.")  # parts of the encoder a text reranker never runs
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _encoder_key(key: str) -> str | None:
    """The normalised name of an encoder tensor (``text_model.`` dropped), or None for other tensors."""
    if not key.startswith(_ENCODER_PREFIX):
        return None
    rest = key[len(_ENCODER_PREFIX):]
    if rest.startswith("text_model."):  # transformers >= 5.24 names the same tensor encoder.text_model.*
        rest = rest[len("text_model."):]
    if rest.startswith(_UNUSED):
        return None
    return rest


def _header(path: Path) -> tuple[int, dict]:
    """The safetensors header of ``path``: (offset of the data section, {key: {dtype, shape, data_offsets}})."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 << 20:
            raise ValueError(f"{path} declares a {size}-byte safetensors header; refusing to read it")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def encoder_fingerprint(folder: str | Path, max_length: int) -> str:
    """sha256 over the encoder tensors, the tokenizer files, the template version and ``max_length``.

    Parameters
    ----------
    folder : str or Path
        Checkpoint folder (``*.safetensors`` and tokenizer files).
    max_length : int
        Encoder truncation length the matrices were (or will be) computed with.

    Returns
    -------
    str
        Hex digest. Equal for two checkpoints that differ only in decoder weights.
    """
    folder = Path(folder)
    tensors: dict[str, tuple[Path, int, dict]] = {}
    shared: dict[str, tuple[Path, int, dict]] = {}  # token embeddings under any name (tied: stored once)
    for path in sorted(folder.glob("*.safetensors")):
        start, header = _header(path)
        for key, info in header.items():
            name = _encoder_key(key)
            if name is not None:
                tensors[name] = (path, start, info)
            elif key.endswith("embed_tokens.weight"):
                shared[key] = (path, start, info)
    if "embed_tokens.weight" not in tensors and len(shared) == 1:
        # a checkpoint that stores the tied embedding under the decoder's name: the encoder reads it too
        tensors["embed_tokens.weight"] = next(iter(shared.values()))
    if not tensors:
        raise ValueError(f"{folder} holds no encoder tensors ({_ENCODER_PREFIX}*) in its safetensors files")
    digest = hashlib.sha256(b"kalm-store/encoder-fingerprint/v1\0")
    for name in sorted(tensors):
        path, start, info = tensors[name]
        begin, end = info["data_offsets"]
        digest.update(f"{name}\0{info['dtype']}\0{info['shape']}\0".encode())
        with open(path, "rb") as f:
            f.seek(start + begin)
            left = end - begin
            while left:
                block = f.read(min(left, 1 << 20))
                if not block:
                    raise ValueError(f"{path} ends inside tensor {name!r}: the file is truncated")
                digest.update(block)
                left -= len(block)
    for fname in _TOKENIZER_FILES:
        path = folder / fname
        if path.is_file():
            digest.update(fname.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    digest.update(f"template={prompts.TEMPLATE_VERSION}\0max_length={max_length}".encode())
    return digest.hexdigest()


__all__ = ["encoder_fingerprint"]
