"""kalm-store: KaLM-Reranker-V1 ("fast but not late interaction") inside LanceDB.

Passages are encoded once, offline; their pooled encoder matrices are stored in LanceDB beside the
retrieval vector and the text; at query time a decoder pass over the stored matrices reranks the
candidates of a vector, full-text or hybrid search. ``import kalm_store`` is cheap: torch,
transformers and lancedb load only when a name that needs them is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

from ._quiet import quiet_lancedb_log  # noqa: E402

quiet_lancedb_log()  # before lancedb is imported: Lance's scanner deprecation WARN stays off (kalm_store._quiet)

_LAZY = {
    "KaLMModel": "kalm_store.model",
    "EncodedPassages": "kalm_store.model",
    "ModelLoadError": "kalm_store.model",
    "PassageStore": "kalm_store.store",
    "search": "kalm_store.query",
    "evaluate": "kalm_store.evaluate",  # a callable module: kalm_store.evaluate(...) is the function
    "make_test_model": "kalm_store.testing",
    "finetune": "kalm_store.finetune",
    "FinetuneConfig": "kalm_store.finetune",
}

if TYPE_CHECKING:  # pragma: no cover
    from .model import EncodedPassages, KaLMModel, ModelLoadError
    from .evaluate import evaluate
    from .query import search
    from .store import PassageStore
    from .finetune import FinetuneConfig, finetune
    from .testing import make_test_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kalm_store' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
