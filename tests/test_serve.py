"""`kalm-store serve` against real servers on 127.0.0.1 with real clients (httpx, cohere, LangChain).

Most tests share one `kalm-store serve` process; the load tests (429, disconnects, packing) run a
uvicorn server in a thread of this process so that they can hold the scoring worker at a gate.
Every server binds 127.0.0.1 on a free port, is waited for with a deadline, and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

QUERY = "how do I parse a json file in python?"
DEADLINE_S = 120  # any wait on a server gives up after this
BF16_TOL = 0.03  # max |P_bf16 - P_fp32|: tests/test_dtypes.py's BF16_TOL (measured there)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server at {url} did not become healthy in {DEADLINE_S}s")


def start_server(db: Path, model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kalm_store", "serve", "--db", str(db), "--table", "docs", "--model",
           str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


@pytest.fixture(scope="module")
def built(tmp_path_factory, model, passages):
    """A store of the conftest passages at r = 2 and 4, with its indices (text_digest's included)."""
    from kalm_store import PassageStore

    db = tmp_path_factory.mktemp("serve") / "db"
    store = PassageStore.create(str(db), "docs", model, ratios=[2, 4])
    store.add([{"id": f"p{i}", "text": t} for i, t in enumerate(passages)])
    assert "text_digest_idx" in store.update_indices()
    return db, store


@pytest.fixture(scope="module")
def server(built, tiny_model_dir):
    db, _ = built
    proc, url = start_server(db, tiny_model_dir)
    yield url
    assert stop(proc) == 0


def stored_scores(model, store, ids, ratio=2, margin=False):
    return model.score(QUERY, store.matrices(ids, ratio), return_margin=margin)


# ---------------------------------------------------------------------- clients
def test_cohere_sdk_v2_scores_stored_encoded_and_cached_alike(server, built, model, passages, tiny_model_dir):
    cohere = pytest.importorskip("cohere")
    _, store = built
    client = cohere.ClientV2(api_key="unused", base_url=server, timeout=60)
    unseen = "A passage the table does not hold: json.load reads a file object."
    docs = passages[:4] + [unseen]
    first = client.rerank(model=Path(tiny_model_dir).name, query=QUERY, documents=docs)
    got = {r.index: r.relevance_score for r in first.results}
    assert [r.relevance_score for r in first.results] == sorted(got.values(), reverse=True)
    expect = stored_scores(model, store, ["p0", "p1", "p2", "p3"])
    np.testing.assert_allclose([got[i] for i in range(4)], expect, atol=1e-5, rtol=0)
    online = model.score(QUERY, model.encode([unseen], ratio=2))[0]
    assert abs(got[4] - online) < 1e-5
    assert first.meta.documents == {"stored": 4, "encoded": 1, "cached": 0}  # an extension field of meta
    again = client.rerank(model=Path(tiny_model_dir).name, query=QUERY, documents=[unseen, passages[5]])
    assert again.meta.documents == {"stored": 1, "encoded": 0, "cached": 1}
    scores = {r.index: r.relevance_score for r in again.results}
    assert scores[0] == pytest.approx(got[4], abs=1e-6)  # from the cache: the matrix encoded online before
    stored5 = stored_scores(model, store, ["p5"])[0]
    assert scores[1] == pytest.approx(float(stored5), abs=1e-5)
    # the same text scores alike from the store or from the encoder (one float16 rounding step at most)
    online5 = model.score(QUERY, model.encode([passages[5]], ratio=2))[0]
    assert abs(stored5 - online5) < 1e-3
    top = client.rerank(model=Path(tiny_model_dir).name, query=QUERY, documents=docs, top_n=2)
    assert [r.index for r in top.results] == [r.index for r in first.results][:2]


def test_v1_objects_ids_and_return_documents(server, built, model, passages):
    _, store = built
    body = {"query": QUERY, "documents": [{"text": "JSON is a data format.", "title": "t"}, {"id": "p2"}],
            "return_documents": True}
    r = httpx.post(f"{server}/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    by_index = {x["index"]: x for x in out["results"]}
    assert by_index[0]["document"] == {"text": "JSON is a data format.", "title": "t"}
    assert by_index[1]["document"] == {"id": "p2", "text": passages[2]}  # an id document returns its stored text
    np.testing.assert_allclose([by_index[0]["relevance_score"], by_index[1]["relevance_score"]],
                               stored_scores(model, store, ["p1", "p2"]), atol=1e-5, rtol=0)
    assert out["meta"]["documents"]["stored"] == 2 and out["meta"]["api_version"]["version"] == "1"


def test_tei_rerank_raw_scores_and_text(server, built, model, passages):
    _, store = built
    r = httpx.post(f"{server}/rerank", json={"query": QUERY, "texts": passages[:3], "raw_scores": True,
                                              "return_text": True}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [x["score"] for x in out] == sorted((x["score"] for x in out), reverse=True)
    margins = stored_scores(model, store, ["p0", "p1", "p2"], margin=True)
    for x in out:
        assert x["text"] == passages[x["index"]]
        assert x["score"] == pytest.approx(float(margins[x["index"]]), abs=1e-5)
    plain = httpx.post(f"{server}/rerank", json={"query": QUERY, "texts": passages[:3]}, timeout=60).json()
    assert all("text" not in x and 0 < x["score"] < 1 for x in plain)


def test_langchain_cohere_rerank_through_base_url(server, built, model, passages, tiny_model_dir):
    lc = pytest.importorskip("langchain_cohere")
    from langchain_core.documents import Document

    _, store = built
    rr = lc.CohereRerank(base_url=server, model=Path(tiny_model_dir).name, cohere_api_key="unused", top_n=2)
    docs = [Document(page_content=t) for t in passages[:4]]
    kept = rr.compress_documents(docs, QUERY)
    expect = stored_scores(model, store, ["p0", "p1", "p2", "p3"])
    best = np.argsort(-expect)[:2]
    assert [d.page_content for d in kept] == [passages[i] for i in best]
    assert [d.metadata["relevance_score"] for d in kept] == pytest.approx(expect[best].tolist(), abs=1e-5)


def test_search_matches_library_search(server, built, model, tiny_model_dir):
    from kalm_store import search

    db, _ = built
    r = httpx.post(f"{server}/search", json={"query": "json python file", "mode": "fts", "k": 3}, timeout=60)
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    lib = search(str(db), "docs", "json python file", model=model, mode="fts", k=3)
    assert [h["id"] for h in hits] == [h["id"] for h in lib]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in lib], abs=1e-5)


def test_info_health_and_metrics(server, built):
    info = httpx.get(f"{server}/info", timeout=30).json()
    assert info["ratio"] == 2 and info["rows"] == 6 and info["fingerprint"] == built[1].metadata["fingerprint"]
    assert info["table"] == "docs" and isinstance(info["table_version"], int)
    assert info["dtype"] == "float32" and info["device"] == "cpu"  # the CPU default without --dtype
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    assert "kalm_decoder_passes_total" in metrics and 'kalm_documents_total{source="stored"}' in metrics


def test_dtype_bfloat16_is_honoured(built, model, passages, tiny_model_dir):
    """`kalm-store serve --dtype bfloat16`: /info says so, and the scores are bf16's (not float32's, within
    the bf16 tolerance tests/test_dtypes.py measured)."""
    db, store = built
    proc, url = start_server(db, tiny_model_dir, "--dtype", "bfloat16")
    try:
        assert httpx.get(f"{url}/info", timeout=30).json()["dtype"] == "bfloat16"
        r = httpx.post(f"{url}/v2/rerank", json={"query": QUERY, "documents": passages}, timeout=DEADLINE_S)
        assert r.status_code == 200, r.text
    finally:
        assert stop(proc) == 0
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    got = np.array([got[i] for i in range(len(passages))])
    ref = stored_scores(model, store, [f"p{i}" for i in range(len(passages))])  # float32 decoder
    diff = float(np.abs(got - ref).max())
    assert 1e-4 < diff <= BF16_TOL, diff  # really bf16 (float32 would agree to ~1e-7), and close


def test_create_app_refuses_a_loaded_model_of_another_dtype(built, model):
    from kalm_store.serve import create_app

    with pytest.raises(ValueError, match="computes in float32"):
        create_app(str(built[0]), "docs", model, dtype="bfloat16")


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("body, status, words", [
    ({"documents": ["a"]}, 422, ["query", "Field required"]),
    ({"query": "q", "documents": [3]}, 422, ["documents.0"]),
    ({"query": "q", "documents": [{"foo": 1}]}, 422, ["documents.0", "exactly one of 'text' or 'id'"]),
    ({"query": "q", "documents": ["a"], "top_n": 0}, 422, ["top_n"]),
    ({"query": "q", "documents": ["a"], "topn": 2}, 422, ["topn", "Extra inputs"]),
    ({"query": "q", "documents": ["a"], "model": "another-model"}, 422, ["model", "another-model"]),
    ({"query": "q", "documents": ["a"] * 1001}, 413, ["1001 documents", "1000"]),
    ({"query": "q", "documents": [{"id": "p1"}, {"id": "no-such-id"}]}, 404, ["no-such-id"]),
    ({"query": "q", "documents": []}, 200, ['"results":[]']),
])
def test_bad_requests_are_answered_by_name(server, body, status, words):
    r = httpx.post(f"{server}/v2/rerank", json=body, timeout=60)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.text
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_malformed_json_and_tei_empty(server):
    r = httpx.post(f"{server}/v2/rerank", content=b'{"query": "q", "documents": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["message"]
    assert httpx.post(f"{server}/rerank", json={"query": "q", "texts": []}, timeout=30).json() == []


def test_model_mismatch_is_refused_at_start(built, tmp_path):
    from kalm_store.testing import TinyShape, make_test_model

    other = make_test_model(tmp_path / "other", TinyShape(seed=1))
    proc = subprocess.run([sys.executable, "-m", "kalm_store", "serve", "--db", str(built[0]), "--table", "docs",
                           "--model", str(other), "--port", str(free_port()), "--device", "cpu"],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 1
    assert "fingerprint" in proc.stderr and "table 'docs'" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_finishes_in_flight_requests_and_exits_0(built, tiny_model_dir):
    db, _ = built
    proc, url = start_server(db, tiny_model_dir)
    try:
        texts = [f"unseen passage number {i} about parsing json files in python" * 2 for i in range(80)]

        def post(i: int) -> int:
            return httpx.post(f"{url}/rerank", json={"query": f"{QUERY} {i}", "texts": texts}, timeout=DEADLINE_S
                              ).status_code

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, i) for i in range(4)]
            end = time.monotonic() + DEADLINE_S
            # until all four are in flight (the scrape itself counts one): a request still connecting when
            # SIGTERM lands is refused, which is right for the server and not what this test is about
            while time.monotonic() < end:
                m = httpx.get(f"{url}/metrics", timeout=30).text
                line = next(x for x in m.splitlines() if x.startswith("kalm_requests_in_flight"))
                if float(line.split()[-1]) > 4:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            codes = [f.result(timeout=DEADLINE_S) for f in futures]
        assert codes == [200] * 4
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        stop(proc)


# ---------------------------------------------------------------------- load: an in-process server with a gate
class Gate:
    """Stands in for the model in the batcher: holds each score_many call until opened; records queries."""

    def __init__(self, model) -> None:
        self.model = model
        self.open = threading.Event()
        self.entered = threading.Event()
        self.queries: list[list[str]] = []
        self.passes: list[tuple[int, int]] = []  # (padded rows, candidates) of each decoder pass

    def score_many(self, queries, *args, **kwargs):
        self.queries.append(list(queries))
        self.entered.set()
        assert self.open.wait(DEADLINE_S)
        on_pass = kwargs.get("on_pass")

        def record(candidates, n_queries, rows):
            self.passes.append((rows, candidates))
            if on_pass is not None:
                on_pass(candidates, n_queries, rows)

        return self.model.score_many(queries, *args, **(kwargs | {"on_pass": record}))


@pytest.fixture
def gated(built, model):
    """A uvicorn server in a thread of this process whose scoring worker waits at a Gate."""
    import uvicorn

    from kalm_store.serve import create_app

    def run(**options):
        app = create_app(str(built[0]), "docs", model, **options)
        service = app.state.service
        gate = Gate(model)
        service.batcher.model = gate
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread, gate))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return url, service, gate

    servers: list = []
    yield run
    for server, thread, gate in servers:
        gate.open.set()
        server.should_exit = True
        thread.join(DEADLINE_S)
        assert not thread.is_alive()


def wait_until(cond, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_full_queue_answers_429_with_retry_after(gated, passages):
    url, service, gate = gated(max_pending=1)
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(httpx.post, f"{url}/v2/rerank", json={"query": "a", "documents": passages}, timeout=DEADLINE_S)
        assert gate.entered.wait(DEADLINE_S)  # the worker holds a
        b = pool.submit(httpx.post, f"{url}/v2/rerank", json={"query": "b", "documents": passages}, timeout=DEADLINE_S)
        wait_until(lambda: service.batcher.pending == 1, "b queued")
        c = httpx.post(f"{url}/v2/rerank", json={"query": "c", "documents": passages}, timeout=DEADLINE_S)
        assert c.status_code == 429 and int(c.headers["Retry-After"]) >= 1 and "1 requests" in c.json()["message"]
        gate.open.set()
        assert a.result().status_code == 200 and b.result().status_code == 200
    assert "kalm_rejected_requests_total 1.0" in httpx.get(f"{url}/metrics").text


def test_client_that_disconnects_leaves_no_queued_work(gated, passages):
    url, service, gate = gated()
    with ThreadPoolExecutor(1) as pool:
        a = pool.submit(httpx.post, f"{url}/v2/rerank", json={"query": "a", "documents": passages}, timeout=DEADLINE_S)
        assert gate.entered.wait(DEADLINE_S)
        with pytest.raises(httpx.ReadTimeout):  # b waits in the queue; its client gives up and disconnects
            httpx.post(f"{url}/v2/rerank", json={"query": "b-gone", "documents": passages}, timeout=1.0)
        wait_until(lambda: service.batcher.pending == 0 and service.batcher.stats.cancelled == 1, "b removed")
        gate.open.set()
        assert a.result().status_code == 200
    time.sleep(0.2)  # give the worker a chance to (wrongly) take more work
    assert [q for step in gate.queries for q in step] == ["a"]  # b was never scored


def test_waiting_requests_share_decoder_passes_and_keep_their_scores(gated, built, model, passages):
    _, store = built
    url, service, gate = gated()
    queries = [f"{QUERY} variant {i}" + " extra words" * i for i in range(5)]
    with ThreadPoolExecutor(len(queries) + 1) as pool:
        first = pool.submit(httpx.post, f"{url}/v2/rerank", json={"query": "warm", "documents": passages[:1]},
                            timeout=DEADLINE_S)
        assert gate.entered.wait(DEADLINE_S)
        futures = [pool.submit(httpx.post, f"{url}/v2/rerank", json={"query": q, "documents": passages},
                               timeout=DEADLINE_S) for q in queries]
        wait_until(lambda: service.batcher.pending == len(queries), "all queued")
        gate.open.set()
        results = [f.result().json() for f in futures]
        assert first.result().status_code == 200
    assert sorted(gate.queries[1]) == sorted(queries)  # one worker step took every waiting request
    mats = store.matrices([f"p{i}" for i in range(len(passages))], 2)
    for q, res in zip(queries, results):
        got = {x["index"]: x["relevance_score"] for x in res["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(passages))], model.score(q, mats), atol=1e-5, rtol=0)
    info = httpx.get(f"{url}/info").json()
    assert info["batch_size"] is None and info["max_batch_rows"] == 1024  # the CPU default: rows bound a pass
    # the step's 5 x 6 candidates went through passes bounded by the row budget only: a pass held the
    # candidates of several requests, more than any one request has
    widest = max(rows for rows, _ in gate.passes)
    assert max(c for _, c in gate.passes) > len(passages) and widest <= 1024
    assert info["batcher"]["mean_queries_per_pass"] > 1
    assert info["batcher"]["mean_candidates_per_pass"] > len(passages)
    assert 0 < info["batcher"]["score_cpu_seconds"] <= info["batcher"]["score_seconds"] + 0.05  # CPU <= wall


def test_api_key_is_required_when_set(gated, passages):
    url, _, gate = gated(api_key="s3cret")
    gate.open.set()
    body = {"query": "q", "documents": passages[:2]}
    assert httpx.post(f"{url}/v2/rerank", json=body).status_code == 401
    assert httpx.post(f"{url}/v2/rerank", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.post(f"{url}/v2/rerank", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{url}/info").status_code == 401


def test_cli_help_and_argument_checks():
    from kalm_store.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert main(["serve", "--db", "x", "--table", "t", "--model", "m", "--max-pending", "0"]) == 1
    assert main(["serve", "--db", "x", "--table", "t", "--model", "m", "--replicas", "2"]) == 1


def test_unexpected_error_is_500_without_details(gated, passages):
    url, service, gate = gated()

    class Broken:
        def score_many(self, *args, **kwargs):
            raise RuntimeError("secret internal detail")

    service.batcher.model = Broken()
    r = httpx.post(f"{url}/v2/rerank", json={"query": "q", "documents": passages[:2]}, timeout=DEADLINE_S)
    assert r.status_code == 500 and "request id" in r.json()["message"]
    assert "secret internal detail" not in r.text and "Traceback" not in r.text


@pytest.mark.slow
def test_ray_serve_two_replicas_answer_the_same_scores(built, model, passages, tiny_model_dir):
    """`kalm-store serve --engine ray --replicas 2` on a local Ray: both replicas answer, with the app's scores."""
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install "ray[serve]"')
    db, store = built
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kalm_store", "serve", "--db", str(db), "--table", "docs",
                             "--model", str(tiny_model_dir), "--device", "cpu", "--port", str(port), "--engine", "ray",
                             "--replicas", "2", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        pids: set[int] = set()
        while len(pids) < 2 and time.monotonic() < end:  # Ray's proxy spreads requests over the replicas
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                r = httpx.get(f"{url}/info", timeout=10)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert len(pids) == 2, f"saw replicas {pids}"
        r = httpx.post(f"{url}/v2/rerank", json={"query": QUERY, "documents": passages[:3]}, timeout=120)
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        np.testing.assert_allclose([got[i] for i in range(3)], stored_scores(model, store, ["p0", "p1", "p2"]),
                                   atol=1e-5, rtol=0)
    finally:
        code = stop(proc)
    assert proc.poll() is not None  # nothing left running
    assert code == 0, f"Ray engine exited {code} after SIGTERM"
