"""A tiny random-weight T5Gemma2 checkpoint and tokenizer, built offline.

The real KaLM checkpoints can't be downloaded everywhere (CI has no model hub), yet every code path
must run for real. ``make_test_model`` writes a folder that loads through exactly the same
``KaLMModel.from_pretrained`` as a hub checkpoint: safetensors weights, ``config.json``, and a
``tokenizer.json`` with Gemma's special tokens and single-token ``yes``/``no``. Its scores are
meaningless; its arithmetic is the real model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast, T5Gemma2Config, T5Gemma2ForConditionalGeneration

# Gemma's special tokens, in the order of their ids in the tiny vocabulary.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

_CORPUS = """\
yes no yes no Yes No
Judge whether the Document meets the requirements based on the Query and the Instruct provided.
Note that the answer can only be "yes" or "no".
<Document>: <Instruct>: <Query>: user model
Given a query, retrieve documents that answer the query.
The quick brown fox jumps over the lazy dog. A passage of text is encoded once and stored.
Python is a programming language. JSON is a data format. Parse the file and return a list of values.
Vector databases store embeddings next to text; a reranker scores each candidate against the query.
Return the number of items in a container. Open the file and read its lines. Raise an error if empty.
"""


@dataclass
class TinyShape:
    """Shape of the test model (defaults: small, but every T5Gemma2 feature is exercised)."""

    hidden_size: int = 64  # stored token width d
    num_layers: int = 3  # per stack; layer 2 (0-based) is full attention, the others sliding
    num_heads: int = 4
    num_kv_heads: int = 1  # grouped-query attention as in Gemma 3
    head_dim: int = 32
    intermediate_size: int = 128
    vocab_size: int = 1024
    sliding_window: int = 16  # small, so that sliding layers really mask long passages
    sliding_window_pattern: int = 3
    final_logit_softcapping: float | None = 30.0  # exercised so the scorer must apply it
    seed: int = 0


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a fixed text with Gemma's special tokens; ``yes`` and ``no`` single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="right",
    )
    return fast


def build_config(shape: TinyShape, vocab_size: int) -> T5Gemma2Config:
    """A T5Gemma2 config of the given shape (tiny vision tower: T5Gemma2 always builds one)."""
    from transformers import T5Gemma2Config

    text = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        query_pre_attn_scalar=shape.head_dim,
        sliding_window=shape.sliding_window,
        sliding_window_pattern=shape.sliding_window_pattern,
        final_logit_softcapping=shape.final_logit_softcapping,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        initializer_range=0.1,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    encoder = dict(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                   boi_token_index=vocab_size + 1, eoi_token_index=vocab_size + 2)
    return T5Gemma2Config(encoder=encoder, decoder=dict(text), image_token_index=vocab_size + 3,
                          dropout_rate=0.0, attention_dropout=0.0)


def build_model(shape: TinyShape, vocab_size: int) -> T5Gemma2ForConditionalGeneration:
    """Random T5Gemma2ForConditionalGeneration; norm weights randomized so no norm is the identity."""
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    torch.manual_seed(shape.seed)
    model = T5Gemma2ForConditionalGeneration(build_config(shape, vocab_size))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # The default init sets every RMSNorm weight to 0 (scale 1): a mistake such as a skipped
            # or doubled norm would then go unseen. Random scales make every norm count.
            if "norm" in name:
                param.normal_(mean=0.0, std=0.5)
    return model.eval()


def make_test_model(path: str | Path, shape: TinyShape | None = None) -> Path:
    """Write a tiny random KaLM-compatible checkpoint (safetensors) and tokenizer to ``path``.

    Parameters
    ----------
    path : str or Path
        Output folder (created; existing files of the same names are overwritten).
    shape : TinyShape, optional
        Model shape; ``None`` uses the defaults of :class:`TinyShape`.

    Returns
    -------
    Path
        The folder, loadable with ``KaLMModel.from_pretrained(path)``.

    Examples
    --------
    >>> from kalm_store.testing import make_test_model
    >>> folder = make_test_model("/tmp/kalm-tiny")  # doctest: +SKIP
    """
    shape = shape or TinyShape()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_size)
    vocab = max(shape.vocab_size, len(tokenizer))
    model = build_model(shape, vocab)
    from ._quiet import no_weight_bars

    with no_weight_bars():  # no "Writing model shards" bar for a 1 MB file
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
