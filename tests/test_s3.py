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
