"""kalm-store finetune: the decoder learns a rule from stored matrices, the encoder stays bitwise the same,
the adapted model scores the original table without re-encoding, runs resume, bad input names its line.

The synthetic task: passages hold one of two marker words; a (query, passage) pair is relevant when
the query names the passage's marker. Evaluation passages are never trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytrec_eval")

from kalm_store.pairs import PairsError  # noqa: E402
from kalm_store.store import PassageStore, StoreMismatchError  # noqa: E402

MARKERS = ["fox", "dog"]
FILL = "the a of and is to once stored list values number items lines error empty".split()
ARGS = dict(ratios=[4, 8], lr=3e-3, batch_size=16, seed=0, show_progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is shared: with 2 threads each op waits on a descheduled sibling (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _passage(rng: random.Random, marker: str) -> str:
    return " ".join([marker] * 4 + rng.sample(FILL, 2))  # the marker fills a whole r=4 group


def _pairs(rng: random.Random, ids: list[str], markers: dict[str, str], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        pid, mk = rng.choice(ids), rng.choice(MARKERS)
        out.append({"query": f"{mk} {rng.choice(FILL)}", "id": pid, "label": int(markers[pid] == mk)})
    return out


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def task(model, tmp_path_factory):
    """A store (r=4 only: r=8 is re-pooled) of 48 passages, 240 training pairs on passages 0-31 (plus a few
    passages brought as text), 100 evaluation pairs on passages 32-47."""
    from lancedb.index import FTS

    root = tmp_path_factory.mktemp("adapt")
    rng = random.Random(0)
    markers = {f"p{i}": MARKERS[i % 2] for i in range(48)}
    records = [{"id": pid, "text": _passage(rng, mk)} for pid, mk in markers.items()]
    store = PassageStore.create(str(root / "db"), "docs", model, ratios=[4])
    store.add(records)
    store.table.create_index("text", config=FTS())
    train = _pairs(rng, [f"p{i}" for i in range(32)], markers, 232)
    train += [{"query": f"{mk} the", "text": _passage(rng, other), "label": int(mk == other)}
              for mk in MARKERS for other in MARKERS for _ in range(2)]
    eval_ = _pairs(rng, [f"p{i}" for i in range(32, 48)], markers, 100)
    return {"root": root, "db": str(root / "db"), "store": store, "records": records,
            "train": _write(root / "train.jsonl", train), "eval": _write(root / "eval.jsonl", eval_)}


@pytest.fixture(scope="module")
def adapted(task, tiny_model_dir):
    """Fine-tuned in two calls: the CLI stops after 8 steps, the Python API resumes to the end."""
    import kalm_store
    from kalm_store.cli import main

    out = task["root"] / "adapted"
    argv = ["finetune", "--db", task["db"], "--table", "docs", "--model", str(tiny_model_dir), "--train",
            str(task["train"]), "--eval", str(task["eval"]), "--out", str(out), "--ratios", "4,8", "--epochs", "2",
            "--lr", "3e-3", "--batch-size", "16", "--stop-after", "8", "--no-progress"]
    assert main(argv) == 0
    assert not (out / "config.json").exists() and (out / ".finetune").is_dir()
    result = kalm_store.finetune(task["db"], "docs", tiny_model_dir, task["train"], out, eval=task["eval"],
                                 epochs=2, resume=True, **ARGS)
    return result


def test_held_out_roc_auc_rises_at_every_ratio(adapted):
    assert adapted.finished and adapted.step == adapted.total_steps == 2 * 15
    for r in ("4", "8"):
        before, after = adapted.before[r], adapted.after[r]
        assert before["roc_auc"] < 0.7, before  # random decoder: about chance
        assert after["roc_auc"] > 0.95 and after["roc_auc"] > before["roc_auc"] + 0.25, (before, after)
        assert after["loss"] < before["loss"] and after["ndcg@10"] >= before["ndcg@10"]
        assert after["labelled_pairs"] == 100 and after["ndcg_groups"] > 0


def test_resumed_run_continues_and_writes_a_report(adapted):
    out = adapted.out
    assert [h["step"] for h in adapted.history] == list(range(1, 31))  # 1-8 by the CLI, 9-30 resumed
    assert set(adapted.history[0]["loss"]) == {"4", "8"}
    assert not (out / ".finetune").exists()  # checkpoints of the run are removed once it is finished
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["source_ratios"] == {"4": 4, "8": 4} and report["steps"] == 30
    assert report["before"] == adapted.before and report["after"] == adapted.after
    assert "| 8 |" in (out / "finetune_report.md").read_text()


def test_encoder_and_shared_embedding_bitwise_unchanged(adapted, model, tiny_model_dir):
    from kalm_store import KaLMModel

    new = KaLMModel.from_pretrained(adapted.out)
    old_params = dict(model.hf_model.named_parameters())
    new_params = dict(new.hf_model.named_parameters())
    enc = [n for n, _ in model.hf_model.get_encoder().named_parameters()]
    assert enc and all(torch.equal(old_params["model.encoder." + n], new_params["model.encoder." + n]) for n in enc)
    assert torch.equal(model.hf_model.get_input_embeddings().weight, new.hf_model.get_input_embeddings().weight)
    assert torch.equal(model.hf_model.get_output_embeddings().weight, new.hf_model.get_output_embeddings().weight)
    changed = [n for n in new_params if "decoder" in n and not torch.equal(old_params[n], new_params[n])]
    assert len(changed) > 10  # the decoder did train
    assert new.encoder_fingerprint == model.encoder_fingerprint and new.fingerprint != model.fingerprint
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (adapted.out / name).read_bytes() == (Path(tiny_model_dir) / name).read_bytes()


def test_training_forward_is_the_score_of_the_saved_model(adapted, task):
    """The probabilities the trainer optimises are what KaLMModel.score (fast decoder, and the
    transformers path) gives for the saved checkpoint, also for a batch mixing queries of unequal length."""
    from kalm_store import KaLMModel
    from kalm_store.finetune import training_margins

    fast = KaLMModel.from_pretrained(adapted.out)
    slow = KaLMModel.from_pretrained(adapted.out, fast_decoder=False)
    store = task["store"]
    ids = ["p1", "p2", "p40", "p41", "p7"]
    queries = ["fox the", "dog", "fox and a much longer query about stored lines", "dog of", "fox"]
    mats = store.matrices(ids, 4)
    with torch.no_grad():
        got = torch.sigmoid(training_margins(slow, [slow.prompt_ids(q) for q in queries], mats)).numpy()
    want = np.array([fast.score(q, [m])[0] for q, m in zip(queries, mats)])
    want_slow = np.array([slow.score(q, [m])[0] for q, m in zip(queries, mats)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, want_slow, rtol=1e-5, atol=1e-6)
    assert got.max() - got.min() > 0.5  # the scores are not all alike: the comparison means something


def test_adapted_model_reranks_the_original_table_without_re_encoding(adapted, task, monkeypatch):
    from kalm_store import KaLMModel
    from kalm_store.plugins.lancedb import KaLMReranker

    new = KaLMModel.from_pretrained(adapted.out)

    def no_encoder(*a, **k):
        raise AssertionError("the adapted model re-encoded a passage")

    monkeypatch.setattr(new, "encode_ratios", no_encoder)
    monkeypatch.setattr(new.hf_model.get_encoder(), "forward", no_encoder)
    store = task["store"]
    rr = KaLMReranker(new, table=store.table, ratio=4)
    out = store.table.search("fox", query_type="fts").limit(40).rerank(rr).to_arrow()
    ids = out.column("id").to_pylist()
    assert len(ids) > 5
    np.testing.assert_allclose(out.column("_relevance_score").to_numpy(),
                               new.score("fox", store.matrices(ids, 4)), rtol=1e-5, atol=1e-6)
    top = [i for i in ids[:5]]
    assert all(int(i[1:]) % 2 == 0 for i in top)  # fox passages (even ids) first: the learnt rule, from the store


def test_another_encoder_is_refused_by_name(task, tmp_path):
    from kalm_store import KaLMModel
    from kalm_store.testing import TinyShape, make_test_model

    other = KaLMModel.from_pretrained(make_test_model(tmp_path / "other", TinyShape(seed=1)))
    with pytest.raises(StoreMismatchError, match="encoder_fingerprint: table has .*fingerprint: table has"):
        PassageStore.open(task["db"], "docs", model=other)


def test_tables_without_encoder_fingerprint_keep_the_whole_model_check(adapted, model, tmp_path, passages):
    """A table written before the split (no encoder_fingerprint): its builder opens it, the adapted
    model is refused naming the fingerprint, as before."""
    import lancedb

    from kalm_store import KaLMModel, schema
    from kalm_store.store import model_metadata

    meta = {k: v for k, v in model_metadata(model).items() if k != "encoder_fingerprint"}
    meta |= {"schema_version": 2, "kalm_store_version": "0.2.0", "ratios": [4], "vector_dim": None, "embedder": None}
    lancedb.connect(str(tmp_path / "db")).create_table("old", schema=schema.arrow_schema([4], None, meta))
    old = PassageStore.open(str(tmp_path / "db"), "old", model=model)
    assert old.add([{"id": "a", "text": passages[1]}]) == 1
    with pytest.raises(StoreMismatchError, match="fingerprint: table has"):
        PassageStore.open(str(tmp_path / "db"), "old", model=KaLMModel.from_pretrained(adapted.out))


def test_new_tables_record_the_encoder_fingerprint(task, model):
    assert task["store"].metadata["encoder_fingerprint"] == model.encoder_fingerprint


def test_encoder_fingerprint_ignores_decoder_and_dtype_but_not_max_length(model, tiny_model_dir):
    from kalm_store import KaLMModel

    assert KaLMModel.from_pretrained(tiny_model_dir, dtype="bfloat16").encoder_fingerprint == model.encoder_fingerprint
    assert KaLMModel.from_pretrained(tiny_model_dir, max_length=64).encoder_fingerprint != model.encoder_fingerprint


# ------------------------------------------------------------------------------------------- resume
def test_resume_is_bitwise_the_uninterrupted_run(task, tiny_model_dir, tmp_path):
    """Stopped after 2 of 4 steps and resumed, the run saves exactly the weights of a run never stopped."""
    import kalm_store
    from safetensors.torch import load_file

    small = _write(tmp_path / "small.jsonl", [json.loads(x) for x in task["train"].read_text().splitlines()[:64]])
    kw = dict(eval=task["eval"], **(ARGS | {"ratios": [4]}))
    whole = kalm_store.finetune(task["db"], "docs", tiny_model_dir, small, tmp_path / "whole", **kw)
    part = kalm_store.finetune(task["db"], "docs", tiny_model_dir, small, tmp_path / "part", stop_after=2, **kw)
    assert (part.finished, part.step, part.total_steps) == (False, 2, 4)
    with pytest.raises(ValueError, match="unfinished fine-tuning run .*step 2.*--resume"):
        kalm_store.finetune(task["db"], "docs", tiny_model_dir, small, tmp_path / "part", **kw)
    with pytest.raises(ValueError, match=r"other \['config'\]"):
        kalm_store.finetune(task["db"], "docs", tiny_model_dir, small, tmp_path / "part", resume=True,
                            **(kw | {"lr": 1e-3}))
    rest = kalm_store.finetune(task["db"], "docs", tiny_model_dir, small, tmp_path / "part", resume=True, **kw)
    assert rest.finished and [h["step"] for h in rest.history] == [1, 2, 3, 4]
    a, b = load_file(str(whole.out / "model.safetensors")), load_file(str(rest.out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["total"] for h in rest.history] == [h["total"] for h in whole.history]
    with pytest.raises(ValueError, match="not empty .*finished fine-tuned model"):
        kalm_store.finetune(task["db"], "docs", tiny_model_dir, small, tmp_path / "part", **kw)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("line, match", [
    ({"query": "fox", "id": "p1", "label": 2}, "line 2: 'label' must be 0 or 1, got 2"),
    ({"query": "fox", "id": "p1", "label": 0.5}, "line 2: 'label' must be 0 or 1"),
    ({"query": "fox", "id": "p1", "score": 1.5}, r"line 2: 'score' must be a number in \[0, 1\]"),
    ({"query": "fox", "id": "p1", "score": -0.1}, r"line 2: 'score' must be a number in \[0, 1\]"),
    ({"query": "fox", "id": "nope", "label": 1}, "line 2: id 'nope' is not in table 'docs'"),
    ({"query": "fox", "id": "p1"}, "line 2: give 'label'"),
    ({"query": "fox", "id": "p1", "text": "x", "label": 1}, "line 2: give exactly one of 'id'"),
    ({"query": "fox", "id": "p1", "lable": 1}, r"line 2: unknown key\(s\) \['lable'\]"),
    ("{not json", "line 2: not valid JSON"),
])
def test_bad_lines_stop_the_run_naming_the_line(task, tiny_model_dir, tmp_path, capsys, line, match):
    import re

    from kalm_store.cli import main

    bad = _write(tmp_path / "bad.jsonl", [{"query": "dog", "id": "p2", "label": 1}, line])
    argv = ["finetune", "--db", task["db"], "--table", "docs", "--model", str(tiny_model_dir), "--train", str(bad),
            "--eval", str(task["eval"]), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 1
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kalm-store finetune: error:")]
    assert len(errors) == 1 and re.search(match, errors[0]) and str(bad) in errors[0], errors
    assert task["store"].table.count_rows() == 48  # nothing stored changed


def test_empty_file_is_refused(task, tiny_model_dir, tmp_path):
    import kalm_store

    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(PairsError, match="holds no pairs"):
        kalm_store.finetune(task["db"], "docs", tiny_model_dir, empty, tmp_path / "out", **ARGS)


def test_ratio_finer_than_stored_is_refused(task, tiny_model_dir, tmp_path):
    import kalm_store

    with pytest.raises(ValueError, match=r"stores ratios \[4\]; r=2 cannot be derived"):
        kalm_store.finetune(task["db"], "docs", tiny_model_dir, task["train"], tmp_path / "out",
                            **(ARGS | {"ratios": [2]}))
    assert not (tmp_path / "out").exists()  # refused before anything was written: a rerun is not "unfinished"


# ------------------------------------------------------------------------------------------- losses
def test_losses_are_the_papers():
    from kalm_store.losses import distill_kl, pair_loss, yes_no_ce

    z = torch.tensor([[2.0, -1.0], [0.3, 0.9], [-4.0, 5.0]])  # [z_yes, z_no]
    margin = z[:, 0] - z[:, 1]
    label = torch.tensor([1.0, 0.0, 1.0])
    log_p = torch.log_softmax(z, dim=-1)  # Eq. 6: two-way softmax cross-entropy
    want = -(label * log_p[:, 0] + (1 - label) * log_p[:, 1])
    torch.testing.assert_close(yes_no_ce(margin, label), want)
    t = torch.tensor([0.9, 0.2, 0.0])
    p = torch.softmax(z, dim=-1)
    kl = t * torch.log(t / p[:, 0]) + (1 - t) * torch.log((1 - t) / p[:, 1])
    kl[2] = torch.log(1 / p[2, 1])  # 0 log 0 = 0
    torch.testing.assert_close(distill_kl(margin, t), kl)
    assert float(distill_kl(margin, torch.sigmoid(margin)).abs().max()) < 1e-6
    has = torch.tensor([True, False, True])
    got = pair_loss(margin, label, has, t, ~has, distill_weight=0.5)
    torch.testing.assert_close(got, (want[0] + want[2] + 0.5 * kl[1]) / 3)
