"""The Python client against a real local alliance (see conftest.py)."""

from __future__ import annotations

import json
import os
import time

import httpx
import jsonschema
import numpy as np
import pytest

import alliance
from alliance._blake3 import blake3_hex

#: Software GPUs compile a kernel at its first dispatch, slowly.
SLOW = 900

DOUBLE = """
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(4)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    y[id.x] = 2.0 * x[id.x];
}
"""


def double_job(client, x, tasks, **kw):
    per = x.shape[0] // tasks
    return client.submit(
        kernel=DOUBLE,
        dispatch=[int(np.prod(x.shape[1:]) * per // 4), 1, 1],
        tasks=tasks,
        inputs={0: {"array": x, "split": True}},
        outputs={1: (np.float32, (per,) + x.shape[1:])},
        **kw,
    )


def test_sgemm_256_matches_numpy(net):
    c = net.user("alice")
    m = 256
    rng = np.random.default_rng(7)
    a = rng.standard_normal((m, m), dtype=np.float32)
    b = rng.standard_normal((m, m), dtype=np.float32)
    job = c.submit(
        kernel="library:sgemm",
        dispatch=[m // 64, m // 64, 1],
        inputs={
            0: {"array": np.array([m, m, m], dtype=np.uint32), "kind": "uniform"},
            1: a,
            2: b,
        },
        outputs={3: (np.float32, (m, m))},
        name="sgemm-256",
    )
    job.wait(timeout=SLOW)
    got = job.result(3, task=0)
    assert got.shape == (m, m)
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-3)


def test_an_array_job_comes_back_concatenated_with_its_shape(net):
    c = net.user("alice")
    x = np.arange(4 * 2 * 4, dtype=np.float32).reshape(8, 4)
    job = double_job(c, x, tasks=4, redundancy=2)
    job.wait(progress=True, timeout=SLOW)
    out = job.results()[1]
    assert out.shape == (4, 2, 4)
    np.testing.assert_array_equal(out.reshape(8, 4), 2 * x)
    parts = job.results(concat=False)[1]
    np.testing.assert_array_equal(parts[3], 2 * x[6:])
    # Ranges of a result are served as asked.
    r = c._http.get(f"/v1/jobs/{job.id}/outputs/1", headers={"Range": "bytes=0-5"})
    assert r.status_code == 206 and r.content == b"\x93NUMPY"
    kinds = [e["event"] for e in job.events()]
    assert "task_verified" in kinds and kinds[-1] == "job_done", kinds


def test_another_users_job_is_forbidden(net):
    a, b = net.user("alice"), net.user("bob")
    job = double_job(a, np.ones((4, 4), dtype=np.float32), tasks=1)
    for call in (lambda: b.job(job.id).status(), lambda: b.job(job.id).result(1), lambda: b.job(job.id).cancel()):
        with pytest.raises(alliance.AllianceError) as e:
            call()
        assert e.value.status == 403 and e.value.code == "not_your_job"
    assert job.id not in [j["id"] for j in b.jobs()]
    assert job.id in [j["id"] for j in a.jobs()]
    assert job.id in [j["id"] for j in net.admin.jobs()]
    with pytest.raises(alliance.AllianceError) as e:
        b._post("/v1/users", {"name": "mallory", "admin": True})
    assert e.value.status == 403
    job.wait(timeout=SLOW)


def test_no_token_is_401_in_the_one_error_shape(raw):
    r = raw.get("/v1/jobs")
    assert r.status_code == 401
    e = r.json()["error"]
    assert e["code"] == "no_token" and e["message"] and e["hint"]
    r = raw.get("/v1/jobs", headers={"Authorization": "Bearer alliance_nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_token"


def test_a_bad_dtype_is_400_with_the_fix(net):
    c = net.user("alice")
    before = len(c.jobs())
    with pytest.raises(alliance.AllianceError) as e:
        double_job(c, np.ones((4, 4), dtype=np.float64), tasks=1)
    assert e.value.status == 400 and e.value.code == "bad_job"
    assert "astype" in e.value.hint, e.value
    # An output whose type is not the kernel's is refused too.
    with pytest.raises(alliance.AllianceError) as e:
        c.submit(kernel=DOUBLE, dispatch=[1, 1, 1], inputs={0: np.ones(4, dtype=np.float32)},
                 outputs={1: (np.uint32, (4,))})
    assert e.value.status == 400 and 'type = "f32"' in e.value.hint, e.value
    # Nothing was kept.
    assert len(c.jobs()) == before


def test_an_interrupted_upload_resumes(net):
    c = net.user("carol")
    data = os.urandom(24 << 20)
    h = blake3_hex(data)

    def cut(n):
        yield data[:n]
        raise ConnectionError("the network went away")

    with pytest.raises(Exception):
        c._http.put(f"/v1/blobs/{h}", content=cut(9 << 20),
                    headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"})
    # The node notices the cut a moment later; until then the upload runs.
    for _ in range(50):
        r = c._http.put(f"/v1/blobs/{h}", content=data[5:10],
                        headers={"Content-Range": f"bytes 5-9/{len(data)}"})
        if r.json()["error"]["code"] != "upload_running":
            break
        time.sleep(0.1)
    got = c.upload_progress(h)
    assert not got["complete"] and 0 < got["received"] <= 9 << 20, got
    # A part that does not start where the upload got to is refused.
    assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_offset"
    assert c.upload(data) == h
    assert c.upload_progress(h) == {"hash": h, "received": len(data), "complete": True}
    # Bytes that are not what their name says are refused.
    other = b"not the bytes" * 100
    r = c._http.put(f"/v1/blobs/{blake3_hex(b'x')}", content=other)
    assert r.status_code == 400 and r.json()["error"]["code"] == "hash_mismatch"


def test_the_openapi_document_lists_every_route(net, raw):
    doc = raw.get("/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    for path in ("/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/outputs/{binding}", "/v1/jobs/{id}/events",
                 "/v1/blobs/{hash}", "/v1/users", "/v1/me"):
        assert path in doc["paths"], path


class Schemas:
    """Checks a response against the OpenAPI document: its status must be
    one the route documents, and its JSON body must match that status's
    schema (JSON Schema 2020-12, which OpenAPI 3.1 uses)."""

    def __init__(self, doc):
        self.doc = doc
        self.checked = set()

    def check(self, method: str, route: str, resp: httpx.Response):
        op = self.doc["paths"][route][method.lower()]
        status = str(resp.status_code)
        assert status in op["responses"], f"{method} {route} answered {status}, which it does not document"
        content = op["responses"][status]["content"]
        kind = resp.headers["content-type"].split(";")[0].strip()
        if kind == "application/json":
            assert kind in content, f"{method} {route} {status} sent JSON it does not document"
            schema = dict(content[kind]["schema"], components=self.doc["components"])
            error = jsonschema.exceptions.best_match(
                jsonschema.Draft202012Validator(schema).iter_errors(resp.json()))
            assert error is None, f"{method} {route} {status}: {error.message} at {list(error.absolute_path)}"
        else:
            assert kind in content or "application/octet-stream" in content, (method, route, status, kind)
        self.checked.add((method.upper(), route))
        return resp


def test_every_response_matches_its_schema(net, raw):
    doc = raw.get("/v1/openapi.json").json()
    s = Schemas(doc)
    admin = httpx.Client(base_url=net.url, headers={"Authorization": f"Bearer {net.admin_token}"}, timeout=60)
    c = net.user("schema-user")
    user = c._http

    s.check("GET", "/v1/me", user.get("/v1/me"))
    s.check("GET", "/v1/me", raw.get("/v1/me"))  # 401
    s.check("POST", "/v1/users", admin.post("/v1/users", json={"name": "schema-temp"}))
    s.check("POST", "/v1/users", admin.post("/v1/users", json={"name": "schema-temp"}))  # 409
    s.check("GET", "/v1/users", admin.get("/v1/users"))
    s.check("GET", "/v1/users", user.get("/v1/users"))  # 403
    s.check("DELETE", "/v1/users/{name}", admin.delete("/v1/users/schema-temp"))
    s.check("DELETE", "/v1/users/{name}", admin.delete("/v1/users/nobody"))  # 404

    x = np.arange(8, dtype=np.float32)
    blob = x.tobytes()
    h = blake3_hex(blob)
    s.check("PUT", "/v1/blobs/{hash}", user.put(f"/v1/blobs/{h}", content=blob))
    s.check("PUT", "/v1/blobs/{hash}", user.put(f"/v1/blobs/{h}", content=blob))  # had it
    s.check("PUT", "/v1/blobs/{hash}", user.put(f"/v1/blobs/{blake3_hex(b'y')}", content=b"z"))  # 400
    s.check("GET", "/v1/blobs/{hash}", user.get(f"/v1/blobs/{h}"))
    spare = b"held, then let go" * 8
    before = c.me()["stored_bytes"]
    c.upload(spare)
    assert c.me()["stored_bytes"] == before + len(spare)
    gone = c.release(blake3_hex(spare))
    assert gone == {"hash": blake3_hex(spare), "freed": len(spare)}, gone
    assert c.me()["stored_bytes"] == before
    s.check("DELETE", "/v1/blobs/{hash}", user.delete(f"/v1/blobs/{blake3_hex(spare)}"))  # 404
    c.upload(spare)
    s.check("DELETE", "/v1/blobs/{hash}", user.delete(f"/v1/blobs/{blake3_hex(spare)}"))  # 200

    job = double_job(c, x.reshape(2, 4), tasks=2, name="schema")
    job.wait(timeout=SLOW)
    s.check("GET", "/v1/jobs", user.get("/v1/jobs", params={"limit": 1}))
    s.check("GET", "/v1/jobs/{id}", user.get(f"/v1/jobs/{job.id}"))
    s.check("GET", "/v1/jobs/{id}", user.get("/v1/jobs/0123456789abcdef0123456789abcdef"))  # 404
    s.check("GET", "/v1/jobs/{id}/end", user.get(f"/v1/jobs/{job.id}/end", params={"secs": 1}))
    s.check("GET", "/v1/jobs/{id}/outputs/{binding}", user.get(f"/v1/jobs/{job.id}/outputs/1"))
    s.check("GET", "/v1/jobs/{id}/outputs/{binding}", user.get(f"/v1/jobs/{job.id}/outputs/1",
                                                               headers={"Range": "bytes=0-9"}))
    with user.stream("GET", f"/v1/jobs/{job.id}/events") as r:
        s.check("GET", "/v1/jobs/{id}/events", r)
        schema = dict(doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]
                      ["text/event-stream"]["schema"], components=doc["components"])
        summary = {"$ref": "#/components/schemas/JobSummary", "components": doc["components"]}
        event, seen = None, []
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                last = event in ("job_done", "job_failed", "job_cancelled")
                jsonschema.Draft202012Validator(summary if last else schema).validate(
                    json.loads(line[5:]))
                seen.append(event)
        assert seen and seen[-1] == "job_done", seen
    s.check("POST", "/v1/jobs", user.post("/v1/jobs", json={"job": "kernel = 1"}))  # 400
    other = double_job(c, x.reshape(2, 4), tasks=2, name="schema-cancel")
    s.check("POST", "/v1/jobs/{id}/cancel", user.post(f"/v1/jobs/{other.id}/cancel"))
    s.check("GET", "/v1/jobs/{id}", net.user("schema-other")._http.get(f"/v1/jobs/{job.id}"))  # 403

    for route in ("/v1/status", "/v1/peers", "/v1/gpus", "/v1/credits", "/v1/reputation", "/v1/worker",
                  "/v1/capacity"):
        s.check("GET", route, admin.get(route))
    s.check("POST", "/v1/worker/pause", user.post("/v1/worker/pause"))  # 403
    # A worker: its GPUs, their pause and resume, and no reputation (it submits nothing).
    w = net.node("worker-east")
    worker = httpx.Client(base_url=w.url, headers={"Authorization": f"Bearer {w.admin_token}"}, timeout=60)
    s.check("GET", "/v1/worker", worker.get("/v1/worker"))
    s.check("GET", "/v1/reputation", worker.get("/v1/reputation"))  # 403
    s.check("POST", "/v1/worker/pause", worker.post("/v1/worker/pause", params={"gpu": 0}))
    s.check("POST", "/v1/worker/resume", worker.post("/v1/worker/resume", params={"gpu": 0}))
    s.check("POST", "/v1/worker/resume", worker.post("/v1/worker/resume", params={"gpu": 7}))  # 400
    s.check("POST", "/v1/revocations", admin.post("/v1/revocations", content="not armored"))  # 400
    s.check("GET", "/metrics", raw.get("/metrics"))

    # Every route the document lists was called at least once here.
    listed = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    untried = listed - s.checked
    assert not untried, f"routes this test does not check: {sorted(untried)}"
