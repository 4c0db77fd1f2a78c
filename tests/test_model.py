"""KaLMModel against independent references built in this file.

Every reference here is written from KALM_REFERENCE.md, not from kalm_store: the prompt template is a
literal string below, the document prefix is literal, pooling is a plain python loop, and scores come
from the model's own ``T5Gemma2ForConditionalGeneration.forward`` with its full-vocabulary logits.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from kalm_store import KaLMModel, ModelLoadError
from kalm_store.codec import CorruptMatrixError, decode_matrix, encode_matrix, to_float16
from kalm_store.pooling import RATIOS, check_ratio, group_sizes, mep_pool, pooled_rows, repool
from kalm_store.testing import TinyShape, make_test_model

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model's matmuls are far too small to share between threads; on a busy 2-core machine
    OpenMP's spinning threads made each call ~100x slower. Restored after this module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- literal reference format
SYSTEM = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a query, retrieve documents that answer the query."
QUERY = "what is a data format?"
LONG_QUERY = "what is a reranker and how does it score candidates against a query?"  # 26 tiny-tokenizer tokens


def literal_prompt(query: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    return (
        f"<bos><start_of_turn>user\n{SYSTEM}\n\n<Instruct>: {instruction}\n<Query>: {query}<end_of_turn>\n"
        "<start_of_turn>model\n\n\n\n"
    )


def ref_prompt_ids(tok, query: str, instruction: str = DEFAULT_INSTRUCTION, query_max_length: int = 512) -> list[int]:
    q_ids = tok(query, add_special_tokens=False)["input_ids"][:query_max_length]
    return tok(literal_prompt(tok.decode(q_ids), instruction), add_special_tokens=False)["input_ids"]


def ref_doc_ids(tok, doc: str, max_length: int = 1024) -> list[int]:
    return tok("<Document>: " + doc, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


def yes_no_ids(tok) -> tuple[int, int]:
    yes, no = tok("yes", add_special_tokens=False)["input_ids"], tok("no", add_special_tokens=False)["input_ids"]
    assert len(yes) == 1 and len(no) == 1
    return yes[0], no[0]


def p_yes_from_logits(tok, logits: torch.Tensor, vocab: int) -> float:
    assert logits.shape == (1, logits.shape[1], vocab)  # the full-vocabulary head
    yes, no = yes_no_ids(tok)
    return float(torch.softmax(logits[0, -1, [yes, no]].double(), dim=0)[0])


@torch.inference_mode()
def joint_p_yes(model: KaLMModel, doc_ids: list[int], prompt_ids: list[int]) -> float:
    """The model's own joint forward: encoder over the document, decoder over the prompt."""
    out = model.hf_model(
        input_ids=torch.tensor([doc_ids]),
        attention_mask=torch.ones(1, len(doc_ids), dtype=torch.long),
        decoder_input_ids=torch.tensor([prompt_ids]),
    )
    return p_yes_from_logits(model.tokenizer, out.logits, model.hf_model.config.decoder.vocab_size)


@torch.inference_mode()
def pooled_p_yes(model: KaLMModel, pooled: torch.Tensor, prompt_ids: list[int]) -> float:
    """The model's own forward with ``pooled`` (m, d) in place of the encoder output."""
    out = model.hf_model(
        encoder_outputs=BaseModelOutput(last_hidden_state=pooled[None].to(torch.float32)),
        attention_mask=torch.ones(1, pooled.shape[0], dtype=torch.long),
        decoder_input_ids=torch.tensor([prompt_ids]),
    )
    return p_yes_from_logits(model.tokenizer, out.logits, model.hf_model.config.decoder.vocab_size)


@torch.inference_mode()
def encoder_states(model: KaLMModel, doc_ids: list[int]) -> torch.Tensor:
    enc = model.hf_model.get_encoder()
    out = enc(input_ids=torch.tensor([doc_ids]), attention_mask=torch.ones(1, len(doc_ids), dtype=torch.long))
    return out.last_hidden_state[0].to(torch.float32)  # (n, d)


def loop_pool(states: torch.Tensor, r: int) -> torch.Tensor:
    """MEP written as the formula: row j = mean of tokens j*r .. min((j+1)*r, n) - 1."""
    n = states.shape[0]
    rows = []
    j = 0
    while j * r < n:
        group = states[j * r : min((j + 1) * r, n)]
        acc = torch.zeros(states.shape[1], dtype=torch.float64)
        for row in group:
            acc += row.double()
        rows.append(acc / len(group))
        j += 1
    return torch.stack(rows).to(torch.float32)  # (ceil(n/r), d)


def fp16_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float16 storage rounding (relative 2^-11, plus a small absolute floor)."""
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- prompt format
def test_prompt_ids_follow_the_literal_template(model):
    tok = model.tokenizer
    assert model.prompt_ids(QUERY) == ref_prompt_ids(tok, QUERY)
    assert model.prompt_ids(QUERY, "Find animals.") == ref_prompt_ids(tok, QUERY, "Find animals.")
    assert model.prompt_ids(QUERY, "") == ref_prompt_ids(tok, QUERY, "")  # empty is an instruction, not None
    assert (model.yes_id, model.no_id) == yes_no_ids(tok)
    # the <bos> is literal text that the tokenizer maps to the special token, at position 0
    assert model.prompt_ids(QUERY)[0] == tok.convert_tokens_to_ids("<bos>")


def test_tokenize_passages_follow_the_literal_document_format(model, passages):
    assert model.tokenize_passages(passages) == [ref_doc_ids(model.tokenizer, p) for p in passages]
    lengths = [len(ids) for ids in model.tokenize_passages(passages)]
    assert max(lengths) > 100 and any(16 < n < 100 for n in lengths)  # the fixture covers the sliding window


# --------------------------------------------------------------------------- r = 1: equal to the joint model
@pytest.mark.parametrize(("storage", "tol"), [("float16", 1e-4), ("float32", 1e-5)])
def test_ratio_1_equals_joint_forward(model, passages, storage, tol):
    tok = model.tokenizer
    mats = model.encode(passages, ratio=1, storage_dtype=storage)
    assert all(m.dtype == np.dtype(storage) for m in mats)
    scores = model.score(QUERY, mats)
    assert scores.dtype == np.float32 and scores.shape == (len(passages),)
    prompt = ref_prompt_ids(tok, QUERY)
    expected = np.array([joint_p_yes(model, ref_doc_ids(tok, p), prompt) for p in passages])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=tol)
    assert np.ptp(expected) > 1e-3  # the passages really get different scores


# --------------------------------------------------------------------------- r > 1: equal to decoder over loop pooling
@pytest.mark.parametrize("r", [2, 4, 8, 16, 32])
def test_pooled_ratio_equals_decoder_over_loop_pooling(model, passages, r):
    tok = model.tokenizer
    mats = model.encode(passages, ratio=r)
    scores = model.score(QUERY, mats)
    prompt = ref_prompt_ids(tok, QUERY)
    for p, mat, score in zip(passages, mats, scores):
        ids = ref_doc_ids(tok, p)
        pooled = loop_pool(encoder_states(model, ids), r)
        assert mat.shape == (math.ceil(len(ids) / r), model.dim) == tuple(pooled.shape)
        assert mat.dtype == np.float16
        fp16_close(mat, pooled.numpy())
        assert abs(float(score) - pooled_p_yes(model, pooled, prompt)) < 1e-4


def test_encode_ratios_matches_encode_per_ratio(model, passages):
    """One batched encoder pass for every ratio equals each passage encoded alone by the model's own encoder
    and pooled by the formula (loop_pool), at every ratio, and equals encode() per ratio."""
    enc = model.encode_ratios(passages, ratios=(1, 4, 32), storage_dtype="float32", batch_size=4)
    assert enc.token_counts == [len(ref_doc_ids(model.tokenizer, p)) for p in passages]
    for i, p in enumerate(passages):
        states = encoder_states(model, ref_doc_ids(model.tokenizer, p))  # (n, d), this passage alone
        for r in (1, 4, 32):
            want = loop_pool(states, r).numpy()
            assert enc.matrices[r][i].shape == want.shape, (i, r)
            np.testing.assert_allclose(enc.matrices[r][i], want, rtol=0, atol=2e-5)
    for r in (1, 4, 32):
        for a, b in zip(enc.matrices[r], model.encode(passages, ratio=r, storage_dtype="float32")):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------- batching and padding never change results
def test_scores_do_not_depend_on_batching_or_neighbours(model, passages):
    mats = model.encode(passages, ratio=2)
    s1 = model.score(QUERY, mats, batch_size=1)
    for bs in (3, 64):
        np.testing.assert_allclose(model.score(QUERY, mats, batch_size=bs), s1, rtol=0, atol=1e-5)
    longest = max(mats, key=len)
    for i, m in enumerate(mats):
        alone = model.score(QUERY, [m])[0]
        padded = model.score(QUERY, [longest, m, longest], batch_size=3)[1]  # padded to the longest
        assert abs(alone - s1[i]) < 1e-5 and abs(padded - s1[i]) < 1e-5


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_encode_does_not_depend_on_batching(model, passages, storage):
    one = model.encode(passages, ratio=1, batch_size=1, storage_dtype=storage)  # no padding at all
    for bs in (3, 64):  # padded together with the 124-token passage
        other = model.encode(passages, ratio=1, batch_size=bs, storage_dtype=storage)
        for a, b in zip(one, other):
            assert a.shape == b.shape
            if storage == "float32":
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
            else:
                fp16_close(a, b)


# --------------------------------------------------------------------------- truncation
def test_passage_truncation_to_max_length(tiny_model_dir, passages):
    model32 = KaLMModel.from_pretrained(tiny_model_dir, max_length=32)
    tok = model32.tokenizer
    long_doc = passages[-1]
    full = ref_doc_ids(tok, long_doc)
    cut = ref_doc_ids(tok, long_doc, max_length=32)
    assert len(full) > 100 and cut == full[:32]
    for r in (1, 2, 4, 8, 32):
        (mat,) = model32.encode([long_doc], ratio=r)
        assert mat.shape == (math.ceil(32 / r), model32.dim)
    prompt = ref_prompt_ids(tok, QUERY)
    (mat1,) = model32.encode([long_doc], ratio=1, storage_dtype="float32")
    assert abs(model32.score(QUERY, [mat1])[0] - joint_p_yes(model32, cut, prompt)) < 1e-5
    (mat4,) = model32.encode([long_doc], ratio=4)
    pooled = loop_pool(encoder_states(model32, cut), 4)
    fp16_close(mat4, pooled.numpy())
    assert abs(model32.score(QUERY, [mat4])[0] - pooled_p_yes(model32, pooled, prompt)) < 1e-4


def test_query_truncation(tiny_model_dir):
    model8 = KaLMModel.from_pretrained(tiny_model_dir, query_max_length=8)
    tok = model8.tokenizer
    q_ids = tok(LONG_QUERY, add_special_tokens=False)["input_ids"]
    assert len(q_ids) > 8
    expected = tok(literal_prompt(tok.decode(q_ids[:8])), add_special_tokens=False)["input_ids"]
    assert model8.prompt_ids(LONG_QUERY) == expected
    assert model8.prompt_ids(LONG_QUERY) != ref_prompt_ids(tok, LONG_QUERY)  # the cut did something
    short = "a query"
    assert len(tok(short, add_special_tokens=False)["input_ids"]) <= 8
    assert model8.prompt_ids(short) == ref_prompt_ids(tok, short)


# --------------------------------------------------------------------------- per-call options
def test_instruction_per_call_does_not_change_the_instance(model, passages):
    tok = model.tokenizer
    mats = model.encode(passages, ratio=1, storage_dtype="float32")
    base = model.score(QUERY, mats)
    instruction = "Find passages that mention animals."
    with_instr = model.score(QUERY, mats, instruction)
    assert np.abs(with_instr - base).max() > 1e-4
    doc = ref_doc_ids(tok, passages[0])
    assert abs(with_instr[0] - joint_p_yes(model, doc, ref_prompt_ids(tok, QUERY, instruction))) < 1e-5
    again = model.score(QUERY, mats)
    np.testing.assert_array_equal(again, base)
    assert model.instruction == DEFAULT_INSTRUCTION


def test_default_instruction_at_load_equals_per_call(tiny_model_dir, model, passages):
    instruction = "Find passages that mention animals."
    other = KaLMModel.from_pretrained(tiny_model_dir, instruction=instruction)
    mats = model.encode(passages, ratio=4)
    np.testing.assert_allclose(other.score(QUERY, mats), model.score(QUERY, mats, instruction), rtol=0, atol=1e-6)


def test_return_margin_is_the_logit_of_the_score(model, passages):
    mats = model.encode(passages, ratio=4)
    margins = model.score(QUERY, mats, return_margin=True)
    scores = model.score(QUERY, mats)
    assert margins.dtype == np.float32
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-margins.astype(np.float64))), scores, rtol=0, atol=1e-6)
    # and the margin is the model's own: logit(yes) - logit(no) of the transformers forward over the matrix
    yes, no = yes_no_ids(model.tokenizer)
    prompt = ref_prompt_ids(model.tokenizer, QUERY)
    for mat, margin in zip(mats, margins):
        with torch.inference_mode():
            out = model.hf_model(encoder_outputs=BaseModelOutput(last_hidden_state=torch.from_numpy(
                mat.astype(np.float32))[None]), attention_mask=torch.ones(1, mat.shape[0], dtype=torch.long),
                decoder_input_ids=torch.tensor([prompt]))
        want = float(out.logits[0, -1, yes] - out.logits[0, -1, no])
        assert abs(float(margin) - want) < 1e-4, (margin, want)
    assert np.ptp(margins) > 0.01  # distinct passages, distinct margins


@torch.inference_mode()
def _manual_margin(model: KaLMModel, mat: np.ndarray, prompt: list[int], cap: float | None) -> tuple[float, float]:
    """(softcapped margin, raw margin) from the decoder's last hidden state and the full lm_head."""
    states = torch.from_numpy(mat.astype(np.float32))[None]  # (1, m, d)
    hidden = model.hf_model.get_decoder()(
        input_ids=torch.tensor([prompt]), encoder_hidden_states=states,
        encoder_attention_mask=torch.ones(1, states.shape[1], dtype=torch.long),
    ).last_hidden_state[0, -1]  # (d,)
    logits = model.hf_model.lm_head(hidden).double()  # (vocab,) raw
    z_yes, z_no = float(logits[model.yes_id]), float(logits[model.no_id])
    raw = z_yes - z_no
    if cap is None:
        return raw, raw
    return cap * math.tanh(z_yes / cap) - cap * math.tanh(z_no / cap), raw


def test_final_logit_softcapping_is_applied(tiny_model_dir, model, passages):
    assert model.hf_model.config.decoder.final_logit_softcapping == 30.0
    mats = model.encode(passages, ratio=1, storage_dtype="float32")
    prompt = model.prompt_ids(QUERY)
    margins = model.score(QUERY, mats, return_margin=True)
    for mat, margin in zip(mats, margins):
        capped, _ = _manual_margin(model, mat, prompt, 30.0)
        assert abs(margin - capped) < 1e-5
    # A small cap makes the difference between capped and raw large enough to see.
    fresh = KaLMModel.from_pretrained(tiny_model_dir)
    fresh.hf_model.config.decoder.final_logit_softcapping = 0.5
    small_cap = KaLMModel(fresh.hf_model, fresh.tokenizer, name_or_path="tiny-cap-0.5")
    margins = small_cap.score(QUERY, mats, return_margin=True)
    for p, mat, margin in zip(passages, mats, margins):
        capped, raw = _manual_margin(small_cap, mat, prompt, 0.5)
        assert abs(margin - capped) < 1e-5
        assert abs(capped - raw) > 1e-3  # would fail if the cap were skipped
        assert abs(margin) <= 1.0  # |cap*tanh(a) - cap*tanh(b)| < 2*cap
    # and the joint forward (which reads the same config) agrees on P(yes)
    tok = small_cap.tokenizer
    p0 = small_cap.score(QUERY, [mats[1]])[0]
    assert abs(p0 - joint_p_yes(small_cap, ref_doc_ids(tok, passages[1]), ref_prompt_ids(tok, QUERY))) < 1e-5


# --------------------------------------------------------------------------- rank
def test_rank(model, passages):
    scores = model.score(QUERY, model.encode(passages, ratio=4))
    ranked = model.rank(QUERY, passages)
    assert sorted(r["corpus_id"] for r in ranked) == list(range(len(passages)))
    got = [r["score"] for r in ranked]
    assert got == sorted(got, reverse=True)
    for r in ranked:
        assert abs(r["score"] - scores[r["corpus_id"]]) < 1e-6
        assert "text" not in r
    assert ranked[0]["corpus_id"] == int(np.argmax(scores))
    top2 = model.rank(QUERY, passages, top_k=2, return_documents=True)
    assert [r["corpus_id"] for r in top2] == [r["corpus_id"] for r in ranked[:2]]
    assert all(r["text"] == passages[r["corpus_id"]] for r in top2)
    assert len(model.rank(QUERY, passages, top_k=100)) == len(passages)
    r8 = model.rank(QUERY, passages, ratio=8)
    s8 = model.score(QUERY, model.encode(passages, ratio=8))
    assert [r["corpus_id"] for r in r8] == list(np.argsort(-s8, kind="stable"))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda m, mats: m.encode(["ok", 3]), TypeError, ["passages[1]", "int"]),
        (lambda m, mats: m.encode("a bare string"), TypeError, ["list of strings", "str"]),
        (lambda m, mats: m.encode([]), ValueError, ["passages", "empty"]),
        (lambda m, mats: m.rank("q", "a bare string"), TypeError, ["list of strings"]),
        (lambda m, mats: m.score("q", []), ValueError, ["matrices", "empty"]),
        (lambda m, mats: m.score("q", mats[0]), TypeError, ["list of 2-D arrays"]),
        (lambda m, mats: m.score(3, mats), TypeError, ["query", "int"]),
        (lambda m, mats: m.score("q", mats, instruction=5), TypeError, ["instruction"]),
        (lambda m, mats: m.encode(["ok"], ratio=3), ValueError, ["ratio", "[1, 2, 4, 8, 16, 32]", "3"]),
        (lambda m, mats: m.encode(["ok"], ratio=0), ValueError, ["ratio", "[1, 2, 4, 8, 16, 32]", "0"]),
        (lambda m, mats: m.encode(["ok"], ratio=True), ValueError, ["ratio", "True"]),
        (lambda m, mats: m.encode(["ok"], storage_dtype="int8"), ValueError, ["storage_dtype", "int8"]),
        (lambda m, mats: m.encode(["ok"], batch_size=0), ValueError, ["batch_size", "0"]),
        (lambda m, mats: m.score("q", [np.zeros((3, m.dim + 1), np.float16)]), ValueError,
         ["matrices[0]", "(3, 65)", "d=64"]),
        (lambda m, mats: m.score("q", [np.zeros(m.dim, np.float16)]), ValueError, ["matrices[0]", "(64,)"]),
        (lambda m, mats: m.score("q", [np.zeros((0, m.dim), np.float16)]), ValueError, ["matrices[0]", "(0, 64)"]),
        (lambda m, mats: m.score("q", [mats[0], np.full((2, m.dim), np.nan, np.float32)]), ValueError,
         ["matrices[1]", "non-finite"]),
        (lambda m, mats: m.score("q", [np.full((2, m.dim), np.inf, np.float16)]), ValueError,
         ["matrices[0]", "non-finite"]),
        (lambda m, mats: m.score("q", ["not an array"]), TypeError, ["matrices[0]", "str"]),
        (lambda m, mats: m.rank("q", ["a", "b"], top_k=0), ValueError, ["top_k", "0"]),
        (lambda m, mats: m.rank("q", ["a", "b"], top_k=True), ValueError, ["top_k", "True"]),
        (lambda m, mats: m.score("q", [np.array([[None] * m.dim], dtype=object)]), TypeError,
         ["matrices[0]", "dtype object"]),
        (lambda m, mats: m.score("q", [torch.zeros((2, m.dim), dtype=torch.long)]), TypeError,
         ["matrices[0]", "torch.int64"]),
    ],
)
def test_bad_input_errors_name_the_problem(model, call, exc, words):
    mats = model.encode(["a passage"], ratio=4)
    with pytest.raises(exc) as info:
        call(model, mats)
    assert type(info.value) is exc
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_float16_compute_is_refused_before_touching_disk(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="float16"):
        KaLMModel.from_pretrained(tiny_model_dir, dtype="float16")
    with pytest.raises(ValueError, match="float16"):  # not a ModelLoadError: validated first
        KaLMModel.from_pretrained(tmp_path / "missing", dtype=torch.float16)
    with pytest.raises(ValueError, match="'int8'"):
        KaLMModel.from_pretrained(tiny_model_dir, dtype="int8")


def test_tokenizer_where_yes_is_not_one_token_is_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "split-yes"
    shutil.copytree(tiny_model_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    merges = spec["model"]["merges"]
    kept = [m for m in merges if "".join(m if isinstance(m, list) else m.split(" ")) != "yes"]
    assert len(kept) == len(merges) - 1  # exactly the merge that makes "yes" one token
    spec["model"]["merges"] = kept
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError) as info:
        KaLMModel.from_pretrained(folder)
    assert "'yes'" in str(info.value) and "one token" in str(info.value)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"device": "cuda"}, ["device='cuda'", "no CUDA device"]),
    ({"device": "gpu0"}, ["device must be", "'gpu0'"]),
    ({"max_length": True}, ["max_length", "True"]),
    ({"query_max_length": 0}, ["query_max_length", "0"]),
])
def test_bad_load_arguments_are_refused_before_touching_disk(tmp_path, kwargs, words):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError) as info:  # a folder that does not exist: validation comes first
        KaLMModel.from_pretrained(tmp_path / "missing", **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_folder_lacking_config_or_tokenizer_is_a_model_load_error(tmp_path, tiny_model_dir):
    no_config = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        KaLMModel.from_pretrained(no_config)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        KaLMModel.from_pretrained(no_tokenizer)


def test_hub_id_and_revision_resolve_through_the_hub_cache(tmp_path, tiny_model_dir, monkeypatch, passages):
    """The real hub path, offline: a Hugging Face cache laid out as `hf download` leaves it, two revisions."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--KaLM-Embedding--KaLM-Reranker-V1-Nano"
    main_sha, v2_sha = "a" * 40, "b" * 40
    for ref, sha in (("main", main_sha), ("v2", v2_sha)):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    v2 = repo / "snapshots" / v2_sha / "config.json"  # v2 differs in a behaviour-defining file
    config = json.loads(v2.read_text())
    config["final_logit_softcapping"] = config["decoder"]["final_logit_softcapping"] = 0.5
    v2.write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_id = "KaLM-Embedding/KaLM-Reranker-V1-Nano"

    main = KaLMModel.from_pretrained(hub_id, local_files_only=True)
    assert main.revision == main_sha and main.folder == repo / "snapshots" / main_sha
    assert main.name_or_path == hub_id
    local = KaLMModel.from_pretrained(tiny_model_dir)
    assert main.fingerprint == local.fingerprint
    mats = local.encode(passages, ratio=4)
    np.testing.assert_array_equal(main.score(QUERY, mats), local.score(QUERY, mats))

    tagged = KaLMModel.from_pretrained(hub_id, revision="v2", local_files_only=True)
    assert tagged.revision == v2_sha and tagged.softcap == 0.5 and tagged.fingerprint != main.fingerprint
    assert KaLMModel.from_pretrained(hub_id, revision=v2_sha, local_files_only=True).revision == v2_sha
    with pytest.raises(ModelLoadError, match="revision nope"):
        KaLMModel.from_pretrained(hub_id, revision="nope", local_files_only=True)
    with pytest.raises(ValueError, match="applies to hub ids"):  # a folder has no revisions to pick from
        KaLMModel.from_pretrained(tiny_model_dir, revision="v2")


def test_vision_tower_is_dropped_and_the_full_head_never_runs(tiny_model_dir, passages, monkeypatch):
    loaded = KaLMModel.from_pretrained(tiny_model_dir)
    encoder = loaded.hf_model.get_encoder()
    assert encoder.vision_tower is None and encoder.multi_modal_projector is None
    assert not any("vision" in name for name, _ in loaded.hf_model.named_parameters())
    head = loaded.hf_model.get_output_embeddings()

    def no_full_head(*args, **kwargs):
        raise AssertionError("the full-vocabulary head ran")

    mats = loaded.encode(passages, ratio=4)
    expected = loaded.score(QUERY, mats)
    monkeypatch.setattr(head, "forward", no_full_head)
    np.testing.assert_array_equal(loaded.score(QUERY, mats), expected)
    slow = KaLMModel.from_pretrained(tiny_model_dir, fast_decoder=False)  # the transformers decoder path too
    monkeypatch.setattr(slow.hf_model.get_output_embeddings(), "forward", no_full_head)
    np.testing.assert_allclose(slow.score(QUERY, mats), expected, atol=1e-5)


def test_missing_folder_is_a_model_load_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        KaLMModel.from_pretrained(missing)
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="safetensors"):
        KaLMModel.from_pretrained(empty)


@pytest.mark.parametrize("name", ["tiny2", "./tiny2", "models/a/tiny2", "~/no-such-kalm-folder"])
def test_a_folder_that_does_not_exist_is_said_so_without_the_hub(tmp_path, monkeypatch, name):
    """`tiny2` (a folder meant, no ./) was sent to the hub, which answered about a download."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(ModelLoadError, match=f"model folder '{name}' does not exist") as info:
        KaLMModel.from_pretrained(name)
    assert "hub id such as KaLM-Embedding/KaLM-Reranker-V1-Nano" in str(info.value)
    assert "download" not in str(info.value)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ModelLoadError, match="'afile' is a file, not a folder"):
        KaLMModel.from_pretrained("afile")


def test_unreachable_hub_id_is_a_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        KaLMModel.from_pretrained("KaLM-Embedding/does-not-exist", local_files_only=True)
    message = str(info.value)
    assert "KaLM-Embedding/does-not-exist" in message
    assert "local folder" in message


# --------------------------------------------------------------------------- make-test-model CLI and other shapes
def test_make_test_model_cli_writes_a_loadable_checkpoint(tmp_path, passages, capsys):
    from kalm_store.cli import main

    folder = tmp_path / "cli-model"
    assert main(["make-test-model", str(folder)]) == 0
    assert str(folder) in capsys.readouterr().out
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    loaded = KaLMModel.from_pretrained(folder)
    assert loaded.dim == 64
    (mat,) = loaded.encode(passages[2:3], ratio=1, storage_dtype="float32")
    tok = loaded.tokenizer
    expected = joint_p_yes(loaded, ref_doc_ids(tok, passages[2]), ref_prompt_ids(tok, QUERY))
    assert abs(loaded.score(QUERY, [mat])[0] - expected) < 1e-5
    assert main(["make-test-model", str(tmp_path / "bad"), "--hidden-size", "6"]) == 1
    assert "--hidden-size" in capsys.readouterr().err


def test_other_t5gemma2_shape_loads_and_matches_joint(tmp_path, passages):
    shape = TinyShape(hidden_size=32, num_layers=2, num_heads=2, head_dim=16, seed=3)
    other = KaLMModel.from_pretrained(make_test_model(tmp_path / "other", shape))
    assert other.dim == 32
    tok = other.tokenizer
    prompt = ref_prompt_ids(tok, QUERY)
    scores = other.score(QUERY, other.encode(passages, ratio=1))
    expected = [joint_p_yes(other, ref_doc_ids(tok, p), prompt) for p in passages]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    mats4 = other.encode(passages[-1:], ratio=4)
    pooled = loop_pool(encoder_states(other, ref_doc_ids(tok, passages[-1])), 4)
    assert abs(other.score(QUERY, mats4)[0] - pooled_p_yes(other, pooled, prompt)) < 1e-4


# --------------------------------------------------------------------------- fingerprint
def test_fingerprint_follows_the_files(tmp_path, tiny_model_dir, model):
    from safetensors.torch import load_file, save_file

    fp = model.fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert KaLMModel.from_pretrained(tiny_model_dir).fingerprint == fp
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert KaLMModel.from_pretrained(copy).fingerprint == fp  # the folder's location does not matter
    weights = load_file(copy / "model.safetensors")
    name = next(k for k in sorted(weights) if "decoder" in k and k.endswith("q_proj.weight"))
    weights[name][0, 0] += 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert KaLMModel.from_pretrained(copy).fingerprint != fp


# --------------------------------------------------------------------------- pooling unit tests
def _random_batch(lengths: list[int], d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    states = torch.randn(len(lengths), n, d, generator=g)  # (B, n, d)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)  # (B, n)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
        states[i, k:] = 1e4  # padding holds garbage: it must never enter a mean
        if k + 2 <= n:
            states[i, k] = float("nan")  # not even non-finite garbage (NaN * 0 is NaN)
            states[i, k + 1] = float("inf")
    return states, mask


@pytest.mark.parametrize("r", RATIOS)
def test_mep_pool_equals_the_loop(r):
    lengths = [37, 13, 1, 32]
    states, mask = _random_batch(lengths)
    pooled, counts = mep_pool(states, mask, r)
    assert pooled.shape == (4, math.ceil(37 / r), 5) and pooled.dtype == torch.float32
    for i, k in enumerate(lengths):
        rows = pooled_rows(k, r)
        torch.testing.assert_close(pooled[i, :rows], loop_pool(states[i, :k], r), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(counts[i, :rows].numpy(), group_sizes(k, r))
        assert (counts[i, rows:] == 0).all()


def test_group_sizes_and_rows():
    np.testing.assert_array_equal(group_sizes(10, 4), [4, 4, 2])
    np.testing.assert_array_equal(group_sizes(8, 4), [4, 4])
    np.testing.assert_array_equal(group_sizes(1, 32), [1])
    np.testing.assert_array_equal(group_sizes(124, 32), [32, 32, 32, 28])
    for n in range(1, 70):
        for r in RATIOS:
            sizes = group_sizes(n, r)
            assert len(sizes) == pooled_rows(n, r) == math.ceil(n / r)
            assert sizes.sum() == n and (sizes[:-1] == r).all() and 1 <= sizes[-1] <= r


@pytest.mark.parametrize(("src", "dst"), [(4, 8), (2, 32), (1, 4), (8, 32), (4, 4)])
@pytest.mark.parametrize("n", [1, 5, 37, 124])
def test_repool_equals_pooling_at_the_coarser_ratio(src, dst, n):
    states, mask = _random_batch([n], d=16, seed=n)
    fine = to_float16(mep_pool(states, mask, src)[0][0].numpy())
    direct = to_float16(mep_pool(states, mask, dst)[0][0].numpy())
    derived = repool(fine, n, src, dst)
    assert derived.shape == direct.shape == (math.ceil(n / dst), 16)
    assert derived.dtype == np.float16
    fp16_close(derived, direct)


def test_repool_refuses_finer_ratios_and_wrong_shapes():
    m = np.zeros((3, 4), np.float16)  # 10 tokens at r=4
    with pytest.raises(ValueError, match="from r=4 to r=2.*finer"):
        repool(m, 10, 4, 2)
    with pytest.raises(ValueError, match="to_ratio must be one of"):
        repool(m, 10, 4, 12)
    with pytest.raises(ValueError, match=r"expected \(2, d\)"):
        repool(m, 8, 4, 8)
    assert check_ratio(np.int64(8)) == 8


# --------------------------------------------------------------------------- codec unit tests
def _matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    m = rng.standard_normal((7, 33)).astype(np.float16)
    m[0, :4] = [65504, -65504, -0.0, np.float16(6e-8)]  # extremes, negative zero, a subnormal
    return m


def test_codec_roundtrip_is_bitwise():
    m = _matrix()
    out = decode_matrix(encode_matrix(m), 7, 33)
    assert out.dtype == np.float16 and out.shape == (7, 33)
    assert out.tobytes() == m.tobytes()


def test_codec_refuses_truncated_and_wrong_shape_blobs():
    blob = encode_matrix(_matrix())
    for cut in (1, 4, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CorruptMatrixError, match="row 9"):
            decode_matrix(blob[:cut], 7, 33, what="row 9")
    with pytest.raises(CorruptMatrixError, match="declares 462 bytes.*needs 528"):
        decode_matrix(blob, 8, 33)
    with pytest.raises(CorruptMatrixError, match="declares"):
        decode_matrix(blob, 7, 32)
    with pytest.raises(CorruptMatrixError, match="null"):
        decode_matrix(None, 7, 33)
    with pytest.raises(CorruptMatrixError, match="not a zstd frame"):
        decode_matrix(b"\x00" * 64, 7, 33)


def test_codec_never_returns_wrong_data_after_a_bit_flip():
    m = _matrix()
    blob = encode_matrix(m)
    detected = 0
    for pos in range(len(blob)):
        for bit in (0, 5):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            try:
                out = decode_matrix(bytes(bad), 7, 33)
            except CorruptMatrixError:
                detected += 1
            else:  # a flip in a header field that doesn't change the content may decode correctly
                assert out.tobytes() == m.tobytes(), (pos, bit)
    assert detected > len(blob)  # nearly every flip is caught


def test_codec_refuses_non_finite_and_non_float16():
    m = _matrix()
    m[3, 3] = np.nan
    with pytest.raises(CorruptMatrixError, match="non-finite"):
        decode_matrix(encode_matrix(m), 7, 33)
    with pytest.raises(TypeError, match="float16"):
        encode_matrix(m.astype(np.float32))


@pytest.mark.filterwarnings("error")  # the refusal is our ValueError, not a numpy overflow warning
def test_to_float16_refuses_values_beyond_its_range():
    for bad in (70000.0, -1e5, 1e6, np.inf, np.nan):
        with pytest.raises(ValueError, match="65504") as info:
            to_float16(np.array([[1.0, bad]], np.float32), what="passage 3")
        assert "passage 3" in str(info.value)
    ok = to_float16(np.array([[65504.0, -65504.0, 1.5]], np.float32))
    assert ok.dtype == np.float16 and ok.tolist() == [[65504.0, -65504.0, 1.5]]
