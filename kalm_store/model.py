"""KaLMModel: load a KaLM-Reranker-V1 checkpoint, encode+pool passages, score stored matrices.

The data path, top to bottom:
    passage text -> ``<Document>: ...`` ids -> encoder states H (n x d) -> MEP pool -> float16 matrix
    query -> prompt ids (once per query) -> decoder over (prompt x stored matrices) -> [yes, no] -> P(yes)
"""

from __future__ import annotations

import hashlib
import warnings

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import prompts
from .codec import to_float16
from .pooling import DEFAULT_RATIO, check_ratio, mep_pool, pooled_rows

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Files whose bytes define the model's behaviour: what the fingerprint hashes.
_FINGERPRINT_FILES = ("*.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "tokenizer.model")


class ModelLoadError(OSError):
    """The checkpoint could not be found, downloaded or read."""


@dataclass(frozen=True)
class EncodedPassages:
    """What :meth:`KaLMModel.encode_ratios` returns."""

    token_counts: list[int]  # encoder tokens per passage after truncation
    matrices: dict[int, list[np.ndarray]] = field(default_factory=dict)  # ratio -> (ceil(n/r), d) per passage


def _check_passages(passages: object, name: str = "passages") -> list[str]:
    if isinstance(passages, (str, bytes)) or not isinstance(passages, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(passages).__name__}")
    if len(passages) == 0:
        raise ValueError(f"{name} is empty: give at least one passage")
    for i, p in enumerate(passages):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(p).__name__}")
    return list(passages)


def _check_query(query: object) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    return query


def _resolve_device_dtype(device: str | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    import torch

    try:
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ._hints import option

        raise ValueError(f"{option(f'device={device!r}', f'--device {device}')} but this torch ({torch.__version__}) "
                         f"sees no CUDA device; use {option('device=' + repr('cpu') + ' or None', '--device cpu, or no --device')}"
                         " (picks CUDA when there is one)")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
        dt = names[dtype]
    if dt == torch.float16:
        raise ValueError(
            "float16 compute is refused: T5Gemma2 activations overflow float16 and the yes/no logits become "
            "non-finite. Use dtype='bfloat16' (CUDA default) or 'float32' (CPU default); stored matrices "
            "are float16 and are upcast before the decoder."
        )
    if dt not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dt}")
    return dev, dt


def _resolve_folder(name_or_path: str, revision: str | None, local_files_only: bool) -> tuple[Path, str | None]:
    """A local folder as is; a hub id downloaded (or found in the cache) with its commit hash."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:  # a folder has one set of files: recording a revision would be a lie
            raise ValueError(f"revision={revision!r} applies to hub ids; {name_or_path!r} is a local folder "
                             "(drop revision, or pass the hub id)")
        return path, None
    if path.exists():
        raise ModelLoadError(f"model path {name_or_path!r} is a file, not a folder with a KaLM checkpoint")
    if name_or_path.startswith((".", "/", "~")) or "/" not in name_or_path or name_or_path.count("/") > 1:
        # hub ids are owner/name: anything else that is not a folder here is a folder that does not exist
        raise ModelLoadError(f"model folder {name_or_path!r} does not exist ({path.resolve()}); give the folder of a "
                             "KaLM checkpoint, or a hub id such as KaLM-Embedding/KaLM-Reranker-V1-Nano")
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(
            name_or_path,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"],
            local_files_only=local_files_only,
        )
    except Exception as e:  # hub errors come in many classes; the user needs one message
        raise ModelLoadError(
            f"could not load model {name_or_path!r} (revision {revision or 'main'}) from the Hugging Face hub: "
            f"{type(e).__name__}: {e}. The hub may be unreachable from this machine: download the checkpoint "
            f"where it is reachable (e.g. `hf download {name_or_path} --local-dir ./{name_or_path.split('/')[-1]}`) "
            f"and pass that local folder instead of the hub id (no folder {name_or_path!r} exists here either)."
        ) from None
    folder = Path(snapshot)
    return folder, folder.name  # snapshot folders are named by their commit hash


class KaLMModel:
    """A KaLM-Reranker-V1 checkpoint split into its offline (encoder) and online (decoder) halves.

    Build it with :meth:`from_pretrained`. ``encode`` turns passages into pooled float16 matrices,
    ``score`` scores one query against stored matrices with the decoder alone, ``rank`` does both.

    Examples
    --------
    >>> from kalm_store import KaLMModel
    >>> model = KaLMModel.from_pretrained("KaLM-Embedding/KaLM-Reranker-V1-Nano")  # doctest: +SKIP
    >>> mats = model.encode(["first passage", "second passage"], ratio=4)  # doctest: +SKIP
    >>> model.score("what is the first?", mats)  # doctest: +SKIP
    array([0.93, 0.12], dtype=float32)
    """

    def __init__(
        self,
        hf_model: Any,
        tokenizer: Any,
        *,
        name_or_path: str,
        revision: str | None = None,
        folder: Path | None = None,
        max_length: int = prompts.DEFAULT_MAX_LENGTH,
        query_max_length: int = prompts.DEFAULT_QUERY_MAX_LENGTH,
        instruction: str | None = None,
        fast_decoder: bool = True,
    ) -> None:
        import torch

        from . import decoder

        _check_lengths(max_length, query_max_length)
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.revision = revision
        self.folder = folder
        self.max_length = max_length
        self.query_max_length = query_max_length
        self.instruction = prompts.DEFAULT_INSTRUCTION if instruction is None else instruction
        self.yes_id = self._single_token_id(prompts.YES_TOKEN)
        self.no_id = self._single_token_id(prompts.NO_TOKEN)
        param = next(hf_model.parameters())
        self.device: torch.device = param.device
        self.dtype: torch.dtype = param.dtype
        self.dim: int = int(hf_model.config.decoder.hidden_size)
        self.softcap: float | None = hf_model.config.decoder.final_logit_softcapping
        # Only two rows of the tied output embedding are ever needed: (2, d), fp32 for the last matmul.
        head = hf_model.get_output_embeddings().weight
        self._yes_no = head[[self.yes_id, self.no_id]].detach().to(torch.float32)  # (2, d)
        self._fingerprint: str | None = None
        self._encoder_fingerprint: str | None = None
        # The scoring-only decoder (kalm_store/decoder.py) when the config allows it; same arithmetic.
        self._decoder = decoder.from_hf(hf_model, self._yes_no) if fast_decoder and decoder.supports(hf_model) else None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int = prompts.DEFAULT_MAX_LENGTH,
        query_max_length: int = prompts.DEFAULT_QUERY_MAX_LENGTH,
        instruction: str | None = None,
        local_files_only: bool = False,
        fast_decoder: bool = True,
    ) -> KaLMModel:
        """Load a checkpoint from a Hugging Face hub id or a local folder.

        Parameters
        ----------
        name_or_path : str or Path
            Hub id (``"KaLM-Embedding/KaLM-Reranker-V1-Nano"``) or a folder with ``config.json``,
            safetensors weights and the tokenizer.
        revision : str, optional
            Hub branch, tag or commit; default ``None`` (the hub's ``main``).
        device : str, optional
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default ``None`` picks CUDA when available.
        dtype : str or torch.dtype, optional
            Compute dtype; default ``None`` is bfloat16 on CUDA and float32 on CPU. float16 is refused.
        max_length : int, default 1024
            Encoder tokens kept per passage (``<Document>: `` prefix included).
        query_max_length : int, default 512
            Query tokens kept before the query is put in the prompt.
        instruction : str, optional
            Default task instruction; ``None`` uses the released default.
        local_files_only : bool, default False
            Never contact the hub; use the local cache only.
        fast_decoder : bool, default True
            Score with kalm_store's scoring-only decoder (same arithmetic, less work); False uses the
            transformers decoder.

        Returns
        -------
        KaLMModel
        """
        from transformers import AutoModelForSeq2SeqLM

        from .checkpoint import load_config, load_tokenizer, weight_shapes

        dev, dt = _resolve_device_dtype(device, dtype)  # validate before touching disk
        _check_lengths(max_length, query_max_length)
        name = str(name_or_path)
        folder, resolved_revision = _resolve_folder(name, revision, local_files_only)
        if resolved_revision is None:  # a local folder: tables record where it is, not how it was typed
            name = str(folder.resolve())
        if not list(folder.glob("*.safetensors")):
            raise ModelLoadError(f"{folder} holds no *.safetensors weights; KaLM loads safetensors only")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} holds no config.json; a KaLM checkpoint folder needs config.json, "
                                 "*.safetensors and the tokenizer files")
        # headers and sizes first: a damaged file or an absurd config is named before any model is built
        config = load_config(folder, weight_shapes(folder))
        if config.model_type != "t5gemma2":
            raise ModelLoadError(f"{name!r} is a {config.model_type!r} model; KaLM-Reranker-V1 is 't5gemma2'")
        tokenizer = load_tokenizer(folder)
        try:
            from ._quiet import no_weight_bars

            with no_weight_bars():  # no "Loading weights" bar for every load; transformers' warnings still show
                hf_model = AutoModelForSeq2SeqLM.from_pretrained(
                    folder, config=config, dtype=dt, use_safetensors=True, attn_implementation="sdpa"
                )
        except Exception as e:  # weights that do not fit the config arrive in several classes
            raise ModelLoadError(f"{folder}: the weights cannot be loaded with its config.json ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:300]}); download the checkpoint again (or restore "
                                 "the folder)") from e
        # The SigLIP vision tower is never used for text reranking: free its memory.
        encoder = hf_model.get_encoder()
        encoder.vision_tower = None
        encoder.multi_modal_projector = None
        hf_model.to(dev).eval()
        return cls(hf_model, tokenizer, name_or_path=name, revision=resolved_revision, folder=folder,
                   max_length=max_length, query_max_length=query_max_length, instruction=instruction,
                   fast_decoder=fast_decoder)

    def _single_token_id(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits {word!r} into {len(ids)} tokens {ids}; KaLM needs it to be one token")
        return int(ids[0])

    @property
    def fingerprint(self) -> str:
        """sha256 over the weights, config and tokenizer files (independent of device and dtype)."""
        if self._fingerprint is None:
            if self.folder is None:
                raise ValueError("this model was not loaded from files; it has no fingerprint")
            digest = hashlib.sha256()
            files = sorted({p for pat in _FINGERPRINT_FILES for p in self.folder.glob(pat)})
            for path in files:
                digest.update(path.name.encode() + b"\0")
                file_digest = hashlib.sha256()  # chunked: hashlib.file_digest needs Python 3.11
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        file_digest.update(block)
                digest.update(file_digest.digest())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def encoder_fingerprint(self) -> str:
        """sha256 of what stored matrices depend on: encoder weights, tokenizer, template, max_length.

        Equal for checkpoints that differ only in their decoder (see :mod:`kalm_store.identity`).
        """
        if self._encoder_fingerprint is None:
            if self.folder is None:
                raise ValueError("this model was not loaded from files; it has no encoder fingerprint")
            from .identity import encoder_fingerprint

            self._encoder_fingerprint = encoder_fingerprint(self.folder, self.max_length)
        return self._encoder_fingerprint

    # ------------------------------------------------------------------ passages -> pooled matrices
    def tokenize_passages(self, passages: Sequence[str]) -> list[list[int]]:
        """Encoder ids of each passage: ``<Document>: {p}``, no special tokens, cut to ``max_length``.

        Long passages are tokenized from a prefix long enough for ``max_length`` tokens (same ids as
        tokenizing all of it, see :mod:`kalm_store.truncation`): a 10 MB passage costs what a short one does.
        """
        from .truncation import token_ids

        passages = _check_passages(passages)
        texts = [prompts.document_text(p) for p in passages]
        return token_ids(self.tokenizer, texts, self.max_length)

    def encode_ratios(
        self,
        passages: Sequence[str],
        ratios: Sequence[int] = (DEFAULT_RATIO,),
        *,
        batch_size: int = 16,
        storage_dtype: Literal["float16", "float32"] = "float16",
        show_progress: bool = False,
    ) -> EncodedPassages:
        """Run the encoder once per passage and pool its states at every ratio in ``ratios``.

        Passages are encoded in batches sorted by length (little padding); results come back in
        input order without padding rows. float16 output is checked for non-finite values.
        """
        import torch

        ratios = [check_ratio(r) for r in ratios]
        if not ratios:
            raise ValueError("ratios is empty: give at least one of 1, 2, 4, 8, 16, 32")
        if storage_dtype not in ("float16", "float32"):
            raise ValueError(f"storage_dtype must be 'float16' or 'float32', got {storage_dtype!r}")
        _check_batch_size(batch_size)
        ids = self.tokenize_passages(passages)
        counts = [len(x) for x in ids]
        order = sorted(range(len(ids)), key=lambda i: -counts[i])
        out: dict[int, list[np.ndarray | None]] = {r: [None] * len(ids) for r in ratios}
        encoder = self.hf_model.get_encoder()
        pad_id = self.tokenizer.pad_token_id or 0
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        with torch.inference_mode():
            for batch in batches:
                n_max = counts[batch[0]]
                input_ids = torch.full((len(batch), n_max), pad_id, dtype=torch.long)  # (B, n)
                mask = torch.zeros((len(batch), n_max), dtype=torch.long)  # (B, n)
                for row, i in enumerate(batch):
                    input_ids[row, : counts[i]] = torch.tensor(ids[i])
                    mask[row, : counts[i]] = 1
                input_ids, mask = input_ids.to(self.device), mask.to(self.device)
                states = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, n, d)
                for r in ratios:
                    pooled_t, _ = mep_pool(states, mask, r)  # (B, ceil(n/r), d) float32
                    pooled = pooled_t.cpu().numpy()
                    for row, i in enumerate(batch):
                        mat = pooled[row, : pooled_rows(counts[i], r)]  # (ceil(n_i/r), d)
                        if storage_dtype == "float16":
                            out[r][i] = to_float16(mat, what=f"passage {i} at r={r}")
                        else:
                            out[r][i] = np.ascontiguousarray(mat)
        return EncodedPassages(token_counts=counts, matrices={r: list(m) for r, m in out.items()})  # type: ignore[arg-type]

    def encode(
        self,
        passages: Sequence[str],
        ratio: int = DEFAULT_RATIO,
        *,
        batch_size: int = 16,
        storage_dtype: Literal["float16", "float32"] = "float16",
        show_progress: bool = False,
    ) -> list[np.ndarray]:
        """Pooled encoder matrices of ``passages``, ``(ceil(n/ratio), d)`` each, in input order.

        Parameters
        ----------
        passages : list of str
            Passage texts (not empty).
        ratio : int, default 4
            MEP ratio, one of 1, 2, 4, 8, 16, 32.
        batch_size : int, default 16
            Passages per encoder pass.
        storage_dtype : {"float16", "float32"}, default "float16"
            float16 is what stores hold; float32 keeps the pooled states unrounded.
        show_progress : bool, default False
            Show a tqdm progress bar.

        Returns
        -------
        list of numpy.ndarray
        """
        enc = self.encode_ratios(passages, [ratio], batch_size=batch_size, storage_dtype=storage_dtype,
                                 show_progress=show_progress)
        return enc.matrices[check_ratio(ratio)]

    # ------------------------------------------------------------------ query x stored matrices -> scores
    def prompt_ids(self, query: str, instruction: str | None = None) -> list[int]:
        """Decoder ids for one query: query cut to ``query_max_length`` tokens, then the released template."""
        query = _check_query(query)
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str or None, got {type(instruction).__name__}")
        from .truncation import token_ids

        q_ids = token_ids(self.tokenizer, [query], self.query_max_length)[0]  # bounded work for a huge query
        query = self.tokenizer.decode(q_ids)
        text = prompts.prompt_text(query, self.instruction if instruction is None else instruction)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _check_matrices(self, matrices: object) -> list[Any]:
        import torch

        if isinstance(matrices, (np.ndarray, torch.Tensor)) or not isinstance(matrices, Sequence):
            raise TypeError(f"matrices must be a list of 2-D arrays, got {type(matrices).__name__}")
        if len(matrices) == 0:
            raise ValueError("matrices is empty: give at least one stored matrix")
        for i, m in enumerate(matrices):
            if not isinstance(m, (np.ndarray, torch.Tensor)):
                raise TypeError(f"matrices[{i}] must be a numpy array or torch tensor, got {type(m).__name__}")
            kind = m.dtype.kind if isinstance(m, np.ndarray) else ("f" if m.is_floating_point() else "i")
            if kind != "f":
                raise TypeError(f"matrices[{i}] has dtype {m.dtype}; stored matrices are float16 (or float32)")
            if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] != self.dim:
                raise ValueError(f"matrices[{i}] has shape {tuple(m.shape)}; expected (rows >= 1, d={self.dim}) "
                                 "for this model")
            _check_float16_range(m, f"matrices[{i}]")
        return list(matrices)

    def score(
        self,
        query: str,
        matrices: Sequence[np.ndarray],
        instruction: str | None = None,
        *,
        batch_size: int = 32,
        return_margin: bool = False,
    ) -> np.ndarray:
        """Score one query against stored pooled matrices with the decoder alone.

        Parameters
        ----------
        query : str
            The query.
        matrices : list of numpy.ndarray
            ``(rows, d)`` pooled matrices (float16 as stored, or float32), any ratio.
        instruction : str, optional
            Task instruction for this call only; ``None`` uses the model's default.
        batch_size : int, default 32
            Candidates per decoder pass (fewer for long matrices: a pass holds at most 8192 padded stored
            rows, which bounds memory); scores do not depend on it.
        return_margin : bool, default False
            Return the raw ``z_yes - z_no`` logit margin instead of ``P(yes)``.

        Returns
        -------
        numpy.ndarray
            float32, one score per matrix, in input order.
        """
        return self.score_many([query], [matrices], [instruction], batch_size=batch_size,
                               return_margin=return_margin)[0]

    def score_many(
        self,
        queries: Sequence[str],
        matrices: Sequence[Sequence[np.ndarray]],
        instructions: Sequence[str | None] | None = None,
        *,
        batch_size: int = 32,
        max_rows: int | None = None,
        return_margin: bool = False,
        on_pass: Callable[[int, int, int], None] | None = None,
    ) -> list[np.ndarray]:
        """Score several queries, each against its own stored matrices, packing them into shared passes.

        The candidates of all queries are sorted by length and cut into decoder passes of at most
        ``batch_size`` candidates and ``max_rows`` padded stored rows; a pass may hold the candidates of
        several queries (their prompts right-padded, each candidate reading its own prompt's last
        position). Every query's scores equal what :meth:`score` gives it alone (float tolerance).
        :meth:`score` is this method with one query; the HTTP server's batcher calls it with the
        queries waiting in its queue.

        Parameters
        ----------
        queries : list of str
            The queries.
        matrices : list of list of numpy.ndarray
            ``matrices[i]`` are the ``(rows, d)`` pooled matrices scored against ``queries[i]`` (not empty).
        instructions : list of (str or None), optional
            Per-query instruction; default ``None`` uses the model's default for every query.
        batch_size : int, default 32
            Candidates per decoder pass (scores do not depend on it).
        max_rows : int, optional
            Padded stored rows per decoder pass (candidates x the pass's longest matrix); default
            ``None`` is 8192, which bounds memory. One candidate per pass at least.
        return_margin : bool, default False
            Return raw ``z_yes - z_no`` margins instead of ``P(yes)``.
        on_pass : callable, optional
            Called after each decoder pass with (candidates, queries, padded stored rows) of the pass.

        Returns
        -------
        list of numpy.ndarray
            float32 scores per query, each in the order of its matrices.
        """
        import torch

        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"queries must be a list of strings, got {type(queries).__name__}")
        if isinstance(matrices, (str, np.ndarray)) or not isinstance(matrices, Sequence) or len(matrices) != len(queries):
            raise ValueError(f"matrices must be a list with one list of matrices per query ({len(queries)})")
        if instructions is None:
            instructions = [None] * len(queries)
        elif len(instructions) != len(queries):
            raise ValueError(f"instructions has {len(instructions)} entries for {len(queries)} queries")
        _check_batch_size(batch_size)
        if max_rows is None:
            max_rows = _ROWS_PER_BATCH
        elif isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        prompts = [self.prompt_ids(q, ins) for q, ins in zip(queries, instructions)]
        per_query = [self._check_matrices(m) for m in matrices]
        # flat candidate list: (query, matrix) pairs, longest first across queries (little padding)
        owner = [q for q, mats in enumerate(per_query) for _ in mats]
        flat = [m for mats in per_query for m in mats]
        order = sorted(range(len(flat)), key=lambda i: -flat[i].shape[0])
        margins = np.empty(len(flat), dtype=np.float32)
        with torch.inference_mode():
            prompt_ts = [torch.tensor(p, dtype=torch.long, device=self.device) for p in prompts]  # (L_q,) each
            prepared = None
            if self._decoder is not None:  # the prompts' own work, once per call for every pass
                from . import decoder

                prepared = (decoder.prepare(self._decoder, prompt_ts[0], self.dtype) if len(prompts) == 1 else
                            decoder.prepare_many(self._decoder, prompt_ts, self.dtype,
                                                 pad_id=self.tokenizer.pad_token_id or 0))
            for batch in _batches(order, [flat[i].shape[0] for i in order], batch_size, max_rows):
                mats = [flat[i] for i in batch]
                if prepared is None:  # transformers reference path: one query per forward
                    for q in sorted({owner[i] for i in batch}):
                        part = [i for i in batch if owner[i] == q]
                        margins[part] = self._margins(prompt_ts[q][None], [flat[i] for i in part]).cpu().numpy()
                elif len(prompts) == 1:
                    margins[batch] = self._margins(prompt_ts[0][None], mats, prepared).cpu().numpy()
                else:
                    owners = torch.tensor([owner[i] for i in batch], dtype=torch.long, device=self.device)  # (B,)
                    margins[batch] = self._margins(None, mats, prepared, owners).cpu().numpy()
                if on_pass is not None:
                    on_pass(len(batch), len({owner[i] for i in batch}), len(batch) * flat[batch[0]].shape[0])
        if not return_margin:
            margins = (1.0 / (1.0 + np.exp(-margins.astype(np.float64)))).astype(np.float32)
        out, start = [], 0
        for mats in per_query:
            out.append(margins[start:start + len(mats)])
            start += len(mats)
        return out

    def _margins(self, prompt: torch.Tensor | None, mats: list[Any], prepared: Any = None,
                 owner: torch.Tensor | None = None) -> torch.Tensor:
        """``z_yes - z_no`` at the last prompt position for one padded batch of matrices.

        ``prepared`` is :func:`kalm_store.decoder.prepare` of ``prompt`` (computed here when None), or
        :func:`kalm_store.decoder.prepare_many` of several prompts with ``owner`` (B,) naming each
        candidate's prompt.
        """
        states, mask = self._pad(mats)
        if self._decoder is not None:
            from . import decoder

            return decoder.margins(self._decoder, prompt[0] if prepared is None else prepared, states, mask.bool(),
                                   owner=owner)
        return self._margins_transformers(prompt, states, mask)

    def _pad(self, mats: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad matrices into ``(B, m, d)`` states (compute dtype, model device) and a ``(B, m)`` mask.

        On CUDA the stored (float16) rows are gathered into one pinned host buffer in their stored
        dtype, copied in one transfer, and upcast on the device; on the CPU they are upcast straight
        into the padded batch.
        """
        import torch

        b, m_max = len(mats), max(m.shape[0] for m in mats)
        with warnings.catch_warnings():
            # Decoded Arrow buffers are read-only; these tensors are only read (copied into the batch).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            rows = [torch.from_numpy(np.asarray(m)) if isinstance(m, np.ndarray) else m for m in mats]
        mask = torch.zeros((b, m_max), dtype=torch.long)  # (B, m)
        for row, m in enumerate(rows):
            mask[row, : m.shape[0]] = 1
        if self.device.type == "cpu":
            states = torch.zeros((b, m_max, self.dim), dtype=self.dtype)  # (B, m, d)
            for row, m in enumerate(rows):
                states[row, : m.shape[0]].copy_(m)  # stored float16 straight into the compute dtype, one pass
            return states, mask
        stored = rows[0].dtype if all(m.dtype == rows[0].dtype and m.device.type == "cpu" for m in rows) else None
        if stored is None:  # tensors already on the device, or mixed dtypes: upcast each on the device
            states = torch.zeros((b, m_max, self.dim), dtype=self.dtype, device=self.device)  # (B, m, d)
            for row, m in enumerate(rows):
                states[row, : m.shape[0]] = m.to(self.device, self.dtype)
            return states, mask.to(self.device)
        host = torch.zeros((b, m_max, self.dim), dtype=stored, pin_memory=True)  # (B, m, d) stored dtype
        for row, m in enumerate(rows):
            host[row, : m.shape[0]] = m
        states = host.to(self.device, non_blocking=True).to(self.dtype)  # one transfer, upcast on the device
        return states, mask.to(self.device, non_blocking=True)

    def _margins_transformers(self, prompt: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                              last: torch.Tensor | None = None) -> torch.Tensor:
        """The same margins through the transformers decoder (reference path; used for unsupported configs).

        ``prompt`` is ``(1, L)`` (one prompt for every candidate) or ``(B, L)`` right-padded prompts with
        ``last`` ``(B,)`` the index of each one's last token: the decoder is causal and its positions are
        ``arange(L)``, so padding after a prompt changes nothing at or before its last token. This is
        also the fine-tuner's training forward (:mod:`kalm_store.finetune`), so both score alike.
        """
        import torch

        b = states.shape[0]
        decoder = self.hf_model.get_decoder()
        hidden = decoder(
            input_ids=prompt.expand(b, -1),  # (B, L): one prompt shared by every candidate, or one each
            encoder_hidden_states=states,
            encoder_attention_mask=mask,
            use_cache=False,
        ).last_hidden_state  # (B, L, d), final norm applied
        at = hidden[:, -1] if last is None else hidden[torch.arange(b, device=hidden.device), last]  # (B, d)
        with torch.autocast(at.device.type, enabled=False):  # the 2-row head stays float32 under a trainer's autocast
            logits = at.to(torch.float32) @ self._yes_no.T  # (B, 2): [z_yes, z_no]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[:, 0] - logits[:, 1]  # (B,)

    def rank(
        self,
        query: str,
        passages: Sequence[str],
        top_k: int | None = None,
        *,
        ratio: int = DEFAULT_RATIO,
        instruction: str | None = None,
        batch_size: int = 32,
        return_documents: bool = False,
    ) -> list[dict[str, Any]]:
        """Encode ``passages``, score them against ``query`` and return them best first.

        Returns
        -------
        list of dict
            ``{"corpus_id": index in passages, "score": P(yes)}`` (plus ``"text"`` when
            ``return_documents``), sorted by descending score, at most ``top_k`` entries.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        passages = _check_passages(passages)
        mats = self.encode(passages, ratio=ratio, batch_size=batch_size)
        scores = self.score(query, mats, instruction, batch_size=batch_size)
        order = np.argsort(-scores, kind="stable")[:top_k]
        results = []
        for i in order:
            item: dict[str, Any] = {"corpus_id": int(i), "score": float(scores[i])}
            if return_documents:
                item["text"] = passages[i]
            results.append(item)
        return results

    def __repr__(self) -> str:
        return (f"KaLMModel({self.name_or_path!r}, d={self.dim}, device={self.device}, dtype={self.dtype}, "
                f"max_length={self.max_length})")


# Stored rows (candidates x padded rows) per decoder pass. The stored rows' keys/values for every layer
# are 18 * 2 * 256 floats per row for Nano (36 KiB in float32), so this bounds a pass at ~300 MiB of them;
# short matrices still go ``batch_size`` at a time (n = 512, r = 4: 128 rows, 32 candidates = 4096 rows).
_ROWS_PER_BATCH = 8192


def _batches(order: list[int], rows: list[int], batch_size: int, max_rows: int) -> list[list[int]]:
    """Split ``order`` (longest first, ``rows`` each) into batches of at most ``batch_size`` candidates and
    at most ``max_rows`` padded rows (candidates x rows of the batch's first); one candidate at least."""
    batches: list[list[int]] = []
    width = 0  # padded rows of the open batch: its first (longest) matrix
    for i, r in zip(order, rows):
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * width <= max_rows:
            batches[-1].append(i)
        else:
            batches.append([i])
            width = r
    return batches


_FLOAT16_MAX = 65504.0


def _check_float16_range(m: Any, what: str) -> None:
    """Refuse a matrix the decoder cannot score: non-finite values, or values float16 cannot hold.

    Stored matrices are float16, so every stored value is finite and within +-65504; a float32 or
    float64 matrix given directly must be too: 3e38 is finite in float32 but overflows the decoder's
    arithmetic (NaN scores), and float64 1e300 becomes inf in float32 before the decoder even sees it.
    """
    import torch

    wide = m.dtype not in (np.float16, torch.float16)  # a finite float16 value is within range by definition
    if isinstance(m, np.ndarray):
        finite = bool(np.isfinite(m).all())
        peak = float(np.abs(m).max()) if finite and wide else 0.0
    else:
        finite = bool(torch.isfinite(m).all())
        peak = float(m.detach().abs().max()) if finite and wide else 0.0
    if not finite:
        raise ValueError(f"{what} holds non-finite values (NaN or inf)")
    if peak > _FLOAT16_MAX:
        raise ValueError(f"{what} holds values beyond float16 range (max |x| = {peak:.3g}; stored matrices are "
                         f"float16, |x| <= {_FLOAT16_MAX:g}): the decoder would score it as NaN")


def _check_lengths(max_length: object, query_max_length: object) -> None:
    for name, value in (("max_length", max_length), ("query_max_length", query_max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


__all__ = ["KaLMModel", "EncodedPassages", "ModelLoadError"]
