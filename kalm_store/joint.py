"""The model's own joint forward: encoder over the passage text, decoder over the prompt, no pooling.

This is the unpooled reference that stored matrices are measured against (``kalm-store eval
--joint-sample``): every passage is re-encoded, in the compute dtype, and the transformers model
runs end to end (``T5Gemma2ForConditionalGeneration.forward`` with ``input_ids`` and
``decoder_input_ids``), its own LM head and final-logit softcapping included, as
``tests/test_model.py::joint_p_yes`` and the released ``KaLMRerankerWrapper`` (mteb, ``chunk_size=None``)
do. None of kalm_store's scoring code is on this path, so it checks that code too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .model import KaLMModel


def joint_scores(model: KaLMModel, query: str, passages: Sequence[str], instruction: str | None = None, *,
                 batch_size: int = 8) -> np.ndarray:
    """``P(yes)`` of each passage for ``query`` through the model's joint forward (re-encoding).

    Parameters
    ----------
    model : KaLMModel
        The model; its tokenizer, templates, ``max_length`` and device are used.
    query : str
        The query.
    passages : list of str
        Passage texts (what the store encoded).
    instruction : str, optional
        Task instruction; ``None`` uses the model's default.
    batch_size : int, default 8
        Passages per forward pass (right-padded encoder input; the prompt is the same for all).

    Returns
    -------
    numpy.ndarray
        float32, one score per passage, in input order.

    Examples
    --------
    >>> joint_scores(model, "what is lance?", ["Lance is a columnar format."])  # doctest: +SKIP
    array([0.91], dtype=float32)
    """
    import torch

    from .model import _check_batch_size

    _check_batch_size(batch_size)
    prompt = model.prompt_ids(query, instruction)
    ids = model.tokenize_passages(passages)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: little padding
    pad_id = model.tokenizer.pad_token_id or 0
    out = np.empty(len(ids), np.float32)
    prompt_t = torch.tensor([prompt], dtype=torch.long, device=model.device)  # (1, L)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            batch = order[s:s + batch_size]
            n_max = len(ids[batch[0]])
            input_ids = torch.full((len(batch), n_max), pad_id, dtype=torch.long)  # (B, n)
            mask = torch.zeros((len(batch), n_max), dtype=torch.long)  # (B, n)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            logits = model.hf_model(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                decoder_input_ids=prompt_t.expand(len(batch), -1),  # (B, L): one prompt, no padding
                logits_to_keep=1,  # every row's last prompt position is the same one
                use_cache=False,
            ).logits[:, -1]  # (B, vocab), softcapped by the model
            yes_no = logits[:, [model.yes_id, model.no_id]].to(torch.float32)  # (B, 2)
            if not torch.isfinite(yes_no).all():
                raise ValueError(f"the joint forward gave non-finite yes/no logits for query {query[:60]!r}; "
                                 f"compute in float32 or bfloat16 (model dtype is {model.dtype})")
            out[batch] = torch.softmax(yes_no, dim=-1)[:, 0].cpu().numpy()
    return out


__all__ = ["joint_scores"]
