"""Stores on S3-compatible object storage: build, info, plan, search and repool with ``--db s3://...``,
against a moto S3 server this module starts on 127.0.0.1 (no network, no credentials).

Skipped only when moto/boto3 are not installed (``pip install "kalm-store[s3]"``).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("moto.server", reason='moto is not installed: pip install "kalm-store[s3]"')
boto3 = pytest.importorskip("boto3", reason='boto3 is not installed: pip install "kalm-store[s3]"')

pytestmark = pytest.mark.slow

BUCKET = "kalm-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free 127.0.0.1 port, with one bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, s3_endpoint):
    """The environment a user would set for an S3-compatible server."""
    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_REGION": "us-east-1",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


def test_storage_options_from_environment_and_flags():
    from kalm_store.storage import parse_storage_option, storage_options

    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    opts = storage_options("s3://b/db", [parse_storage_option("region=us-east-1")], environ=env)
    assert opts == {"endpoint": "http://127.0.0.1:9000", "region": "us-east-1", "aws_access_key_id": "k",
                    "aws_secret_access_key": "s", "allow_http": "true"}
    assert storage_options("./db", environ=env) is None  # local folders ignore the AWS environment
    assert storage_options("gs://b/db", {"service_account": "x"}, environ=env) == {"service_account": "x"}
    with pytest.raises(ValueError, match="unsupported database URI scheme 'ftp'"):
        storage_options("ftp://b/db")
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=r"^storage option must look like KEY=VALUE .*got 'region'$"):
        parse_storage_option("region")  # an argparse type: the CLI turns it into a usage error


def test_cli_build_info_plan_search_repool_on_s3(aws_env, tmp_path, tiny_model_dir, passages, capsys):
    from kalm_store.cli import main
    from kalm_store.storage import storage_options
    from kalm_store.store import PassageStore

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(passages)))
    db = f"s3://{BUCKET}/stores"
    assert main(["build", str(corpus), "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
                 "--ratio", "2", "--no-progress"]) == 0
    assert "wrote 6" in capsys.readouterr().out
    # explicit flags win over the environment; both name the same server here
    assert main(["info", "--db", db, "--table", "docs", "--json",
                 "--storage-option", f"endpoint={aws_env}", "--storage-option", "region=us-east-1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 6 and info["ratios"] == [2]
    assert main(["plan", "--db", db, "--table", "docs", "--sample", "6", "--ratios", "2", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["ratios"][0]  # the store's own model, read from its metadata
    stored = PassageStore.open(db, "docs", storage_options=storage_options(db)).info()["columns"]["kalm_r2"]
    assert planned["stored_bytes_total"] == pytest.approx(stored["stored_bytes"], rel=0.02)
    assert main(["search", "JSON file text", "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
                 "--mode", "fts", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    # the right hits: the FTS candidates read from the bucket, ranked by KaLMModel.score of their stored matrices
    from kalm_store import KaLMModel

    s3_store = PassageStore.open(db, "docs", storage_options=storage_options(db))
    cand = s3_store.table.search("JSON file text", query_type="fts").limit(100).select(["id"]).to_arrow()
    cand_ids = cand.column("id").to_pylist()
    scores = KaLMModel.from_pretrained(tiny_model_dir).score("JSON file text", s3_store.matrices(cand_ids, 2))
    want = sorted(zip(cand_ids, scores.tolist()), key=lambda t: -t[1])[:2]
    assert len(cand_ids) >= 3 and [h["id"] for h in hits] == [i for i, _ in want]
    assert [h["score"] for h in hits] == pytest.approx([s for _, s in want], abs=1e-6)
    assert main(["repool", "--db", db, "--table", "docs", "--from", "2", "--to", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ratios"] == [2, 8]
    store = PassageStore.open(db, "docs", storage_options=storage_options(db))
    counts = dict(zip(*store.table.to_arrow().select(["id", "n_tokens"]).to_pydict().values()))
    assert [m.shape[0] for m in store.matrices(["p0", "p5"], 8)] == [-(-counts[i] // 8) for i in ("p0", "p5")]
    # the objects really are in the bucket
    s3 = boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="stores/docs.lance/")["Contents"]]
    assert any(k.endswith(".lance") and "/data/" in k for k in keys)
    # last, as updates leave replaced rows on disk until compaction (which info counts): the corpus
    # changes, p1 edited and p4 gone; --update --delete-missing mirrors it (merge-insert and delete on S3)
    edited = [{"id": f"p{i}", "text": t + (" (edited)" if i == 1 else "")} for i, t in enumerate(passages) if i != 4]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in edited))
    assert main(["build", str(corpus), "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
                 "--ratio", "2", "--ratio", "8", "--no-progress", "--update", "--delete-missing"]) == 0
    assert "wrote 1 (1 replacing a changed row), deleted 1 row not in the input" in capsys.readouterr().out
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(passages)))
    assert main(["build", str(corpus), "--db", db, "--table", "docs", "--model", str(tiny_model_dir),
                 "--ratio", "2", "--ratio", "8", "--no-progress", "--update"]) == 0  # back to the first corpus
    assert "wrote 2 (1 replacing a changed row)" in capsys.readouterr().out
    store.refresh()
    rows = store.table.to_arrow()
    assert dict(zip(rows.column("id").to_pylist(), rows.column("text").to_pylist())) == \
        {f"p{i}": t for i, t in enumerate(passages)}
    assert [m.shape[0] for m in store.matrices(["p1", "p4"], 8)] == [-(-counts[i] // 8) for i in ("p1", "p4")]


def test_s3_without_endpoint_names_the_problem(monkeypatch, tmp_path, tiny_model_dir, capsys):
    """A bad endpoint fails with a one-line error from the CLI, not a hang or a traceback."""
    from kalm_store.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    code = main(["info", "--db", f"s3://{BUCKET}/nothing", "--table", "docs",
                 "--storage-option", "client_max_retries=0", "--storage-option", "connect_timeout=2s"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err  # one line
    assert f"kalm-store info: error: could not reach s3://{BUCKET}/nothing: Connection refused at " \
           "http://127.0.0.1:9/" in err and "AWS_ENDPOINT_URL" in err


# ---------------------------------------------------------------------- latency proxy and round trips
@pytest.fixture
def proxy(s3_endpoint):
    from kalm_store.latency_proxy import LatencyProxy

    with LatencyProxy(s3_endpoint, timeout=10) as p:
        yield p


def _client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def test_latency_proxy_adds_latency_counts_requests_and_round_trips(proxy):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from kalm_store.latency_proxy import round_trips

    s3 = _client(proxy.url)
    s3.put_object(Bucket=BUCKET, Key="proxy/blob", Body=bytes(range(256)) * 64)
    proxy.latency_ms = 150
    proxy.reset()
    t = time.perf_counter()
    got = s3.get_object(Bucket=BUCKET, Key="proxy/blob", Range="bytes=256-511")["Body"].read()
    one = time.perf_counter() - t
    assert got == bytes(range(256)) and one >= 0.15  # the right bytes, after the added latency
    (req,) = proxy.snapshot()
    assert (req.method, req.path, req.range, req.status) == ("GET", f"/{BUCKET}/proxy/blob", "bytes=256-511", 206)
    assert req.ms >= 150
    # 8 reads issued together wait in parallel: one round trip, about one latency of wall time
    proxy.reset()
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(lambda i: s3.get_object(Bucket=BUCKET, Key="proxy/blob", Range=f"bytes={i}-{i}")
                              ["Body"].read(), range(8)))
    together = time.perf_counter() - t
    assert parts == [bytes([i]) for i in range(8)] and proxy.count("GET") == 8
    assert round_trips(proxy.snapshot()) == 1 and together < 8 * 0.15
    # 3 reads one after another: three round trips
    proxy.latency_ms = 0
    proxy.reset()
    for i in range(3):
        s3.head_object(Bucket=BUCKET, Key="proxy/blob")
    assert proxy.count("HEAD") == 3 and round_trips(proxy.snapshot()) == 3
    assert s3.head_object(Bucket=BUCKET, Key="proxy/blob")["ContentLength"] == 256 * 64  # HEAD keeps its size


def test_fetch_of_100_candidates_takes_a_bounded_number_of_round_trips(proxy, s3_endpoint, tiny_model_dir):
    """100 candidates over 4 fragments: the reranker's take by _rowid and PassageStore.matrices each take at most
    3 sequential round trips through the proxy (their requests go out in parallel). Before, matrices() opened the
    dataset anew on every call and re-read every file's metadata first: 8-10 round trips, shown below too."""
    import numpy as np

    from kalm_store import KaLMModel, PassageStore
    from kalm_store.latency_proxy import round_trips
    from kalm_store.plugins.lancedb import KaLMReranker

    model = KaLMModel.from_pretrained(tiny_model_dir)
    direct = {"endpoint": s3_endpoint, "region": "us-east-1", "aws_access_key_id": "testing",
              "aws_secret_access_key": "testing",
              "allow_http": "true"}
    db = f"s3://{BUCKET}/round-trips"
    words = "json file parse return data string compress time list object value error".split()
    store = PassageStore.create(db, "docs", model, ratios=[4], storage_options=direct)
    for f in range(4):  # four commits: four fragments, four data files
        store.add([{"id": f"p{f}-{i}", "text": f"{words[i % 12]} {words[(i * 5 + f) % 12]} passage {i} of part {f}: "
                    + " ".join(words[(i + j) % 12] for j in range(10 + i % 20))} for i in range(60)])
    store.update_indices(fts=True, id_index=True)  # as a build leaves it: FTS on text, BTREE on id and digest
    opts = direct | {"endpoint": proxy.url}
    s3_store = PassageStore.open(db, "docs", model=model, storage_options=opts)
    ds = s3_store.table.to_lance()
    assert len(ds.get_fragments()) == 4
    every = ds.to_table(columns=["id", "text"], with_row_id=True)
    cand = every.take(np.random.default_rng(0).choice(every.num_rows, 100, replace=False))  # from every fragment
    ids = cand.column("id").to_pylist()
    assert {i.split("-")[0] for i in ids} == {"p0", "p1", "p2", "p3"}
    rr = KaLMReranker(model, table=s3_store.table, ratio=4)
    rr._matrices(cand), s3_store.matrices(ids[:5], 4)  # a first read of each file's metadata, kept after

    def every_tokens(st):
        return st.table.to_lance().to_table(columns=["id", "n_tokens"]).to_pydict()

    def traced(fn):
        proxy.reset()
        out = fn()
        reqs = proxy.snapshot()
        return out, len(reqs), round_trips(reqs)

    by_rowid, n_rowid, rt_rowid = traced(lambda: rr._matrices(cand)[0])
    by_id, n_id, rt_id = traced(lambda: s3_store.matrices(ids, 4))
    assert 1 <= rt_rowid <= 3 and 1 <= rt_id <= 3, (rt_rowid, rt_id)
    assert n_rowid >= 4 and n_id >= 4  # really read through the proxy, from every file
    assert len(by_id) == 100 and all(np.array_equal(a, b) for a, b in zip(by_rowid, by_id))
    counts = dict(zip(*every_tokens(s3_store).values()))
    assert [m.shape for m in by_id] == [(-(-counts[i] // 4), model.dim) for i in ids]
    # the whole query as kalm_store.search runs it (FTS first stage selecting the stored columns, then scoring)
    from kalm_store.query import run_search

    run_search(s3_store.table, rr, "parse the json file", k=5, candidates=100, mode="fts")  # the index, once
    hits, n_search, rt_search = traced(lambda: run_search(s3_store.table, rr, "parse the json file", k=5,
                                                          candidates=100, mode="fts"))
    assert len(hits) == 5 and n_search >= 4 and rt_search <= 3, (n_search, rt_search)
    want = model.score("parse the json file", s3_store.matrices([h["id"] for h in hits], 4))
    assert [h["score"] for h in hits] == pytest.approx(want.tolist(), abs=1e-6)
    # what the dataset kept per version saves: a dataset opened anew reads manifest and file metadata first
    from kalm_store.store import sql_in

    _, _, rt_reopen = traced(lambda: s3_store.table.to_lance().to_table(columns=["id", "kalm_r4"],
                                                                        filter=sql_in("id", ids)))
    assert rt_reopen > 3, rt_reopen
