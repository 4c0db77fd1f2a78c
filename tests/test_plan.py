"""kalm-store plan: sizes predicted from token counts + an encoded sample, fidelity metrics, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kalm_store.fidelity import (Query, kendall_tau, load_qrels, load_queries, measure_fidelity, ndcg_at_k,
                                 roc_auc, top_k_overlap)
from kalm_store.plan import (LengthStats, SizeModel, make_plan, parse_size, ratio_costs, recommend,
                             sample_positions, token_counts)

WORDS = ("the quick brown fox jumps over lazy dog python file read values list return error passage "
         "vector databases store embeddings text reranker scores candidate query json data format").split()


def make_corpus(n: int, seed: int = 0, max_words: int = 90) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [{"id": f"p{i}", "text": " ".join(rng.choice(WORDS, int(rng.integers(1, max_words))))} for i in range(n)]


# ---------------------------------------------------------------------------------------------- units
def test_parse_size() -> None:
    assert parse_size("50GB") == 50 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5TB") == 1_500_000_000_000
    assert parse_size("123") == 123
    assert parse_size("2 kib") == 2048
    for bad in ("", "GB", "5 parsecs", "-3GB", "0"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_metrics_against_hand_computed_values() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(x, x) == pytest.approx(1.0)
    assert kendall_tau(x, -x) == pytest.approx(-1.0)
    assert kendall_tau(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(1 / 3)
    # tau-b with a tie in y: concordant 2, discordant 0 of 3 pairs, tie in one -> 2/sqrt(3*2)
    assert kendall_tau(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0])) == pytest.approx(2 / np.sqrt(6))
    assert top_k_overlap(x, x, k=2) == 1.0 and top_k_overlap(x, -x, k=2) == 0.0
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert roc_auc(np.array([0.9, 0.1, 0.5, 0.5]), np.array([1, 0, 1, 0])) == pytest.approx(0.875)
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    # relevant doc at rank 2 of 3: (1/log2(3)) / 1
    assert ndcg_at_k(np.array([3.0, 2.0, 1.0]), np.array([0.0, 1.0, 0.0])) == pytest.approx(1 / np.log2(3))
    assert np.isnan(ndcg_at_k(np.array([1.0]), np.array([0.0])))


def test_query_and_qrels_files(tmp_path) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "a", "text": "first"}\n\n{"query": "second"}\n')
    assert load_queries(q) == [Query("a", "first"), Query("1", "second")]
    tsv = tmp_path / "qrels.tsv"
    tsv.write_text("query-id\tcorpus-id\tscore\na\tp1\t2\na\tp2\t0\n")
    assert load_qrels(tsv) == {"a": {"p1": 2.0, "p2": 0.0}}
    trec = tmp_path / "qrels.txt"
    trec.write_text("a 0 p1 1\n")
    assert load_qrels(trec) == {"a": {"p1": 1.0}}
    jl = tmp_path / "qrels.jsonl"
    jl.write_text('{"query_id": "a", "passage_id": "p3", "relevance": 1}\n')
    assert load_qrels(jl) == {"a": {"p3": 1.0}}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_queries(bad)


def test_size_model_keeps_the_sample_total_exact() -> None:
    rows = np.array([1, 2, 5, 9, 30])
    nbytes = np.array([150, 260, 600, 1000, 3100])
    sm = SizeModel.fit(4, rows, nbytes)
    assert sm.per_value >= 0
    assert sm.predict(rows).sum() == pytest.approx(nbytes.sum())
    flat = SizeModel.fit(4, np.array([3, 3]), np.array([100, 110]))  # no spread: a ratio, no intercept
    assert flat.per_value == 0 and flat.per_row == pytest.approx(35.0)


def test_recommend_picks_the_finest_ratio_that_fits() -> None:
    counts = np.array([100, 200, 300])
    plans = [ratio_costs(counts, r, 64, SizeModel.raw(r, 64)) for r in (1, 2, 4, 8, 16, 32)]
    total = {p.ratio: p.stored_bytes_total for p in plans}
    r, why = recommend(plans, total[4] + 1)
    assert r == 4 and "finest" in why
    r, why = recommend(plans, total[32] - 1)
    assert r is None and "no ratio fits" in why
    assert recommend(plans, None)[0] == 4
    scaled = [ratio_costs(counts, r, 64, SizeModel.raw(r, 64), passages=3000) for r in (1, 4, 32)]
    assert recommend(scaled, total[1] * 2)[0] is None  # the budget applies to --passages N, not the corpus
    assert recommend(scaled, scaled[-1].stored_bytes_for_passages)[0] == 32


def test_sample_positions() -> None:
    s = sample_positions(100, 10, seed=1, must=[99, 3])
    assert len(s) == 10 and {3, 99} <= set(s) and s == sorted(set(s))
    assert sample_positions(5, 50) == [0, 1, 2, 3, 4]
    assert sample_positions(5, 0) == []


# ---------------------------------------------------------------------------------------------- against a build
@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    """A store built with PassageStore (r = 1, 4, 32) from 150 passages of 1..~120 tokens."""
    from kalm_store import PassageStore

    corpus = make_corpus(150)
    db = tmp_path_factory.mktemp("db")
    store = PassageStore.create(str(db), "docs", model, ratios=[1, 4, 32])
    store.add(corpus, batch_size=32)
    store.db_uri = str(db)  # for the --db test
    return corpus, store


def test_predicted_stored_bytes_within_2_percent_of_a_build(model, built) -> None:
    corpus, store = built
    texts = [r["text"] for r in corpus]
    counts = token_counts(model, texts)
    index = sample_positions(len(texts), 40, seed=3)  # a partial sample: most sizes are extrapolated
    plan = make_plan(model, counts, sample_texts=[texts[i] for i in index], sample_index=index, ratios=[1, 4, 32])
    info = store.info()
    assert info["tokens"] == int(counts.sum())
    for r in (1, 4, 32):
        col = info["columns"][f"kalm_r{r}"]
        predicted = plan.ratio(r)
        assert predicted.stored_bytes_total == pytest.approx(col["stored_bytes"], rel=0.02), r
        assert predicted.value_bytes_total == pytest.approx(col["value_bytes"], rel=0.02), r
        assert predicted.raw_bytes_total == col["raw_float16_bytes"]
    # a full sample encoded in the build's batches measures every stored value: the value bytes are then
    # exact (other batches pad differently, which can move float16 roundings and a zstd byte or two)
    full = make_plan(model, counts, sample_texts=texts, sample_index=range(len(texts)), ratios=[4], batch_size=32)
    assert full.ratio(4).value_bytes_total == info["columns"]["kalm_r4"]["value_bytes"]


def test_without_a_sample_the_plan_says_raw(model, built) -> None:
    corpus, store = built
    counts = token_counts(model, [r["text"] for r in corpus])
    plan = make_plan(model, counts, ratios=[4], budget="1GB", passages=10)
    assert "raw float16" in plan.compression_source
    p = plan.ratio(4)
    assert p.compression == 1.0 and p.stored_bytes_total >= store.info()["columns"]["kalm_r4"]["stored_bytes"]
    assert p.stored_bytes_for_passages == pytest.approx(p.stored_bytes_per_passage * 10, abs=1)
    assert plan.recommended == 4 and p.fits_budget  # the only ratio costed


def _tau_by_hand(x, y) -> float:
    """Kendall tau-b from the definition: (concordant - discordant) / sqrt((n0 - ties_x)(n0 - ties_y))."""
    c = d = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            a, b = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            tx += a == 0
            ty += b == 0
            c += a * b > 0
            d += a * b < 0
    n0 = len(x) * (len(x) - 1) / 2
    return (c - d) / np.sqrt((n0 - tx) * (n0 - ty))


def _ndcg10_by_hand(scores, rel) -> float:
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:10]
    dcg = sum(rel[i] / np.log2(k + 2) for k, i in enumerate(ranked))
    idcg = sum(g / np.log2(k + 2) for k, g in enumerate(sorted(rel, reverse=True)[:10]))
    return dcg / idcg


def _auc_by_hand(scores, labels) -> float:
    """P(a positive outscores a negative), ties one half, over every (positive, negative) pair."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_fidelity_is_measured_against_r1(model, built) -> None:
    corpus, _ = built
    texts = [r["text"] for r in corpus[:12]]
    ids = [r["id"] for r in corpus[:12]]
    enc = model.encode_ratios(texts, ratios=[1, 4, 32])
    queries = [Query("a", "python file"), Query("b", "vector text")]
    qrels = {"a": {"p0": 1.0, "p3": 2.0}, "b": {"p5": 1.0}}
    rep = measure_fidelity(model, queries, enc.matrices, passage_ids=ids, qrels=qrels)
    assert rep.queries == 2 and rep.candidates == 12 and rep.judged_queries == 2
    # every figure recomputed independently: scores from KaLMModel.score, metrics by hand (pair loops)
    scores = {r: np.stack([model.score(q.text, enc.matrices[r]) for q in queries]) for r in (1, 4, 32)}
    relevance = np.array([[qrels.get(q.id, {}).get(pid, 0.0) for pid in ids] for q in queries])
    assert np.abs(scores[32] - scores[1]).mean() > 1e-3  # r matters here: the orders below really differ
    assert _tau_by_hand(scores[32][0], scores[1][0]) < 0.99 or _tau_by_hand(scores[32][1], scores[1][1]) < 0.99
    got = rep.by_ratio()
    for r in (1, 4, 32):
        s, ref = scores[r], scores[1]
        want_tau = np.mean([_tau_by_hand(s[i], ref[i]) for i in range(2)])
        want_overlap = np.mean([len(set(np.argsort(-s[i])[:10]) & set(np.argsort(-ref[i])[:10])) / 10
                                for i in range(2)])
        want_ndcg = np.mean([_ndcg10_by_hand(s[i], relevance[i]) for i in range(2)])
        want_auc = _auc_by_hand(s.ravel(), relevance.ravel() > 0)
        f = got[r]
        assert f.mean_abs_delta == pytest.approx(np.abs(s - ref).mean(), abs=1e-7), r
        assert f.kendall_tau == pytest.approx(want_tau, abs=1e-9), r
        assert f.top10_overlap == pytest.approx(want_overlap), r
        assert f.ndcg_at_10 == pytest.approx(want_ndcg, abs=1e-9), r
        assert f.roc_auc == pytest.approx(want_auc, abs=1e-9), r
    assert got[1].mean_abs_delta == 0 and got[1].kendall_tau == pytest.approx(1.0)
    assert got[32].mean_abs_delta > 1e-3 and got[32].kendall_tau < 1.0
    with pytest.raises(ValueError, match="r=1"):
        measure_fidelity(model, queries, {4: enc.matrices[4]})


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_plan_json(tmp_path, tiny_model_dir, capsys) -> None:
    from kalm_store.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in make_corpus(30, seed=5)))
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q", "text": "json data"}\n')
    rc = main(["plan", str(corpus), "--model", str(tiny_model_dir), "--sample", "8", "--ratios", "1,4",
               "--budget", "500MiB", "--passages", "1000", "--queries", str(queries), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["ratio"] for r in out["ratios"]] == [1, 4]
    assert all(r["stored_bytes_total"] > 0 and r["fidelity"] is not None for r in out["ratios"])
    assert out["recommended"] == 1 and out["budget_bytes"] == 500 * 2**20 and out["lengths"]["passages"] == 30


def test_cli_plan_plot_writes_a_png(tmp_path, tiny_model_dir, capsys) -> None:
    pytest.importorskip("matplotlib")
    from kalm_store.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in make_corpus(20, seed=6)))
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q", "text": "json data"}\n')
    png = tmp_path / "plan.png"
    assert main(["plan", str(corpus), "--model", str(tiny_model_dir), "--sample", "6", "--queries", str(queries),
                 "--plot", str(png)]) == 0
    assert str(png) in capsys.readouterr().out
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width >= 400 and height >= 300  # a real figure, not an empty canvas


@pytest.mark.parametrize("argv, message", [
    (["plan"], "either INPUT"),
    (["plan", "x.jsonl"], "--model is required"),
    (["plan", "x.jsonl", "--model", "m", "--budget", "lots"], "cannot read size"),
    (["plan", "x.jsonl", "--model", "m", "--plot", "p.pdf"], "PNG"),
    (["plan", "x.jsonl", "--model", "m", "--ratios", "3"], "--ratios"),
    (["plan", "--db", "d", "--table", "t", "--sample", "-1"], "--sample"),
])
def test_cli_plan_refuses_bad_flags_before_loading(argv, message, capsys) -> None:
    from kalm_store.cli import main

    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_length_stats() -> None:
    s = LengthStats.of(np.array([1, 2, 3, 1024]), 1024)
    assert (s.passages, s.tokens, s.max, s.truncated) == (4, 1030, 1024, 1)
    with pytest.raises(ValueError, match="empty"):
        LengthStats.of(np.array([], np.int64), 1024)


def test_cli_plan_of_an_existing_store(built, capsys) -> None:
    """--db/--table: counts from n_tokens, the model from the table metadata, sample texts from the table."""
    from kalm_store.cli import main

    _, store = built
    assert main(["plan", "--db", store.db_uri, "--table", "docs", "--sample", "20", "--ratios", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    col = store.info()["columns"]["kalm_r4"]
    assert out["ratios"][0]["stored_bytes_total"] == pytest.approx(col["stored_bytes"], rel=0.02)


def test_recommend_without_the_default_ratio_does_not_call_another_the_default() -> None:
    counts = np.array([100, 200, 300])
    plans = {r: ratio_costs(counts, r, 64, SizeModel.raw(r, 64)) for r in (1, 2, 8, 16, 32)}
    r, why = recommend([plans[2], plans[8]], None)
    assert r == 2 and why.startswith("r=2 is the nearest of the costed ratios [2, 8] to the paper's default r=4, "
                                      "which is not among them")
    assert "r=2 is the paper's default" not in why
    r, why = recommend([plans[1], plans[8], plans[32]], None)
    assert r == 8 and "nearest" in why and "r=4" in why
    assert recommend([plans[16], plans[32]], None)[0] == 16


@pytest.mark.parametrize("flags", [["--ratios", "1", "--ratios", "4"], ["--ratio", "1", "--ratio", "4"],
                                   ["--ratios", "1,4"], ["--ratio", "1,4"], ["--ratios", "4,1", "--ratio", "4"]])
def test_cli_plan_takes_repeated_and_comma_ratios(flags) -> None:
    """`--ratios 4 --ratios 8` used to keep only the last; build's repeated --ratio form was refused."""
    from kalm_store.cli import build_parser
    from kalm_store.cli.plan import parse_options

    args = build_parser().parse_args(["plan", "c.jsonl", "--model", "m", "--sample", "0"] + flags)
    assert parse_options(args).ratios == [1, 4]
    default = build_parser().parse_args(["plan", "c.jsonl", "--model", "m"])
    assert parse_options(default).ratios == [1, 2, 4, 8, 16, 32]


def test_plot_legend_does_not_cover_the_points(model, tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from kalm_store.plan import make_plan, plot_plan

    plan = make_plan(model, np.array([30, 60, 90, 200]), ratios=[1, 2, 4, 8, 16, 32])
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    plot_plan(plan, tmp_path / "p.png")
    fig = figs[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y1 <= axes_box.y0  # wholly below the plotting area: no point can sit under it
    plt.close(fig)
