"""The exact input format of the released KaLM-Reranker-V1 code.

Every string here is part of the model's contract: changing one character changes the scores.
``TEMPLATE_VERSION`` is written into every store so that a table built with other templates is refused.
"""

from __future__ import annotations

TEMPLATE_VERSION = "kalm-reranker-v1.0"

SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a query, retrieve documents that answer the query."

DOCUMENT_TEMPLATE = "<Document>: {document}"
# `<bos>` is literal text here: the released code tokenizes the whole prompt with add_special_tokens=False.
PROMPT_TEMPLATE = (
    "<bos><start_of_turn>user\n{system}\n\n<Instruct>: {instruction}\n<Query>: {query}<end_of_turn>\n"
    "<start_of_turn>model\n\n\n\n"
)

DEFAULT_MAX_LENGTH = 1024  # encoder tokens per passage
DEFAULT_QUERY_MAX_LENGTH = 512  # query tokens, cut before the query is put in the template
YES_TOKEN = "yes"
NO_TOKEN = "no"


def document_text(document: str) -> str:
    """Encoder input for one passage: ``<Document>: {document}``."""
    return DOCUMENT_TEMPLATE.format(document=document)


def prompt_text(query: str, instruction: str | None = None) -> str:
    """Decoder input for one (already truncated) query.

    Parameters
    ----------
    query : str
        The query, already cut to the query token budget.
    instruction : str, optional
        Task instruction; ``None`` uses :data:`DEFAULT_INSTRUCTION`.

    Examples
    --------
    >>> prompt_text("what is json?").startswith("<bos><start_of_turn>user")
    True
    """
    return PROMPT_TEMPLATE.format(
        system=SYSTEM_PROMPT,
        instruction=DEFAULT_INSTRUCTION if instruction is None else instruction,
        query=query,
    )
