"""The client of an Alliance node's HTTP API.

Everything goes through the API the node serves: files a job names are
uploaded by their BLAKE3 hash (an upload cut short resumes where it
stopped), the job is submitted with their names, and results come back as
``.npy`` bodies that become numpy arrays.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import httpx
import numpy as np

from ._blake3 import blake3_hex
from ._toml import dumps as toml_dumps

#: Bytes sent per piece of an upload.
CHUNK = 4 << 20

#: numpy dtypes a kernel can read, by their job-file names.
DTYPES = {
    np.dtype("float32"): "f32",
    np.dtype("uint32"): "u32",
    np.dtype("int32"): "i32",
    np.dtype("uint8"): "u8",
}


class AllianceError(Exception):
    """A request the node refused, with the API's ``code``, ``message`` and
    ``hint`` (what to do about it) and the HTTP ``status``."""

    def __init__(self, status: int, code: str, message: str, hint: str = ""):
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint
        text = f"{message} ({code}, HTTP {status})"
        if hint:
            text += f"\n  fix: {hint}"
        super().__init__(text)


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        e = resp.json()["error"]
        raise AllianceError(resp.status_code, e.get("code", "?"), e.get("message", ""), e.get("hint", ""))
    except (ValueError, KeyError, TypeError):
        raise AllianceError(resp.status_code, "http", resp.text[:500]) from None


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _elem_name(dtype: Any) -> str:
    dt = np.dtype(dtype)
    if dt not in DTYPES:
        # Sent as it is, the node refuses it with the fix; named here it
        # would only hide which array it was.
        return str(dt)
    return DTYPES[dt]


@dataclass
class Job:
    """A submitted job. ``id`` names it on its node."""

    client: "Client"
    id: str
    summary: Dict[str, Any] = field(default_factory=dict)

    def status(self) -> Dict[str, Any]:
        """The job's detail: its summary, outputs and every task."""
        return self.client._get(f"/v1/jobs/{self.id}")

    def wait(self, progress: bool = False, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Waits until the job ends and returns its summary; raises
        :class:`AllianceError` unless it is done. With ``progress`` a tqdm
        bar counts the tasks that ended."""
        bar = None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                patience = 5 if deadline is None else max(0, min(5, int(deadline - time.monotonic())))
                s = self.client._get(f"/v1/jobs/{self.id}/end?secs={patience}")
                p = s["progress"]
                if progress:
                    if bar is None:
                        from tqdm.auto import tqdm

                        bar = tqdm(total=s["tasks"], desc=f"job {self.id[:8]}", unit="task")
                    bar.n = p["verified"] + p["failed"]
                    bar.set_postfix(running=p["running"], queued=p["queued"], failed=p["failed"])
                    bar.refresh()
                if s["state"] != "active":
                    self.summary = s
                    if s["state"] != "done":
                        d = self.status()
                        reasons = "; ".join(
                            f"task {t['index']}: {t['failure']}" for t in d["tasks"] if t.get("failure")
                        )
                        raise AllianceError(200, f"job_{s['state']}", f"job {self.id} {s['state']}: {reasons}")
                    return s
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} still runs after {timeout} s")
        finally:
            if bar is not None:
                bar.close()

    def result(self, binding: int, task: Optional[int] = None) -> np.ndarray:
        """Output ``binding`` as an array: one task's (``task=N``), or every
        task's stacked along a first axis of the tasks."""
        q = "" if task is None else f"?task={task}"
        with self.client._http.stream("GET", f"/v1/jobs/{self.id}/outputs/{binding}{q}") as resp:
            if not resp.is_success:
                resp.read()
                _raise_for(resp)
            data = resp.read()
        return np.load(io.BytesIO(data), allow_pickle=False)

    def results(self, concat: bool = True) -> Dict[int, Any]:
        """Every output by binding: stacked across tasks, or with
        ``concat=False`` a list with each task's array."""
        d = self.status()
        out: Dict[int, Any] = {}
        for o in d["outputs"]:
            b = o["binding"]
            if concat:
                out[b] = self.result(b)
            else:
                out[b] = [self.result(b, t["index"]) for t in d["tasks"]]
        return out

    def events(self) -> Iterator[Dict[str, Any]]:
        """The job's changes as they happen (task offered, accepted,
        checkpointed, verified, failed with its reason; then the job's end,
        whose event carries its summary), from the node's event stream."""
        with self.client._http.stream(
            "GET", f"/v1/jobs/{self.id}/events", timeout=httpx.Timeout(10.0, read=None)
        ) as resp:
            if not resp.is_success:
                resp.read()
                _raise_for(resp)
            kind, data = None, []
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    ev = json.loads("\n".join(data))
                    ev.setdefault("kind", kind)
                    ev["event"] = kind
                    yield ev
                    if kind and kind.startswith("job_"):
                        return
                    kind, data = None, []

    def cancel(self) -> Dict[str, Any]:
        """Stops offering the job's tasks."""
        return self.client._post(f"/v1/jobs/{self.id}/cancel", None)


class Client:
    """A connection to one node's API as one user.

    ``url`` defaults to ``$ALLIANCE_URL``, ``token`` to ``$ALLIANCE_TOKEN``;
    ``verify`` is passed to httpx (a CA bundle path for a node with its own
    certificate)."""

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None, verify: Union[bool, str] = True,
                 timeout: float = 60.0):
        url = url or os.environ.get("ALLIANCE_URL")
        token = token or os.environ.get("ALLIANCE_TOKEN")
        if not url:
            raise ValueError("no node: give Client(url=...) or set ALLIANCE_URL")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, verify=verify, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _get(self, path: str) -> Any:
        resp = self._http.get(path)
        _raise_for(resp)
        return resp.json()

    def _post(self, path: str, body: Any) -> Any:
        resp = self._http.post(path, json=body) if body is not None else self._http.post(path)
        _raise_for(resp)
        return resp.json()

    def me(self) -> Dict[str, Any]:
        """Who the token belongs to, what they hold and may hold."""
        return self._get("/v1/me")

    def jobs(self) -> list:
        """Your jobs (an admin's: all), newest first."""
        out, after = [], ""
        while True:
            page = self._get(f"/v1/jobs?limit=1000{after}")
            out.extend(page["jobs"])
            if not page.get("next"):
                return out
            after = f"&after={page['next']}"

    def job(self, id: str) -> Job:
        """The job ``id``."""
        return Job(self, id)

    # Uploads.

    def upload_progress(self, hash: str) -> Dict[str, Any]:
        """How much of the blob ``hash`` the node holds."""
        return self._get(f"/v1/blobs/{hash}")

    def release(self, hash: str) -> Dict[str, Any]:
        """Stops holding the upload ``hash``, so it no longer counts against
        your stored bytes (``me()["stored_bytes"]``); the answer says how
        many bytes were ``freed``. The bytes stay on the node, where other
        users and jobs may still name them."""
        resp = self._http.delete(f"/v1/blobs/{hash}")
        _raise_for(resp)
        return resp.json()

    def upload(self, data: Union[bytes, str, Path], hash: Optional[str] = None) -> str:
        """Uploads bytes, or the file at a path, as a blob; resumes an
        upload of the same bytes that was cut short. Returns its hash."""
        if isinstance(data, (str, Path)):
            path = Path(data)
            size = path.stat().st_size
            hash = hash or blake3_hex(path)

            def read(start: int) -> Iterator[bytes]:
                with open(path, "rb") as f:
                    f.seek(start)
                    while True:
                        b = f.read(CHUNK)
                        if not b:
                            return
                        yield b
        else:
            blob = bytes(data)
            size = len(blob)
            hash = hash or blake3_hex(blob)

            def read(start: int) -> Iterator[bytes]:
                for i in range(start, size, CHUNK):
                    yield blob[i:i + CHUNK]

        for attempt in range(50):
            got = self.upload_progress(hash)
            if got["complete"]:
                return hash
            start = min(got["received"], size)
            headers = {"Content-Type": "application/octet-stream"}
            if size:
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
                headers["Content-Length"] = str(size - start)
            resp = self._http.put(f"/v1/blobs/{hash}", content=read(start), headers=headers,
                                  timeout=httpx.Timeout(60.0, write=None, read=None))
            # An upload cut short a moment ago still finishes on the node.
            if resp.status_code == 409 and attempt < 49:
                time.sleep(0.1)
                continue
            _raise_for(resp)
            return hash
        return hash

    # Submitting.

    def submit(
        self,
        job: Union[str, Path, None] = None,
        *,
        kernel: Optional[str] = None,
        dispatch: Optional[Sequence[int]] = None,
        inputs: Optional[Mapping[int, Any]] = None,
        outputs: Optional[Mapping[int, Any]] = None,
        tasks: int = 1,
        redundancy: Union[int, str, None] = None,
        compare: Union[str, Mapping[str, float], None] = None,
        entry_point: Optional[str] = None,
        info_binding: Optional[int] = None,
        steps: Optional[int] = None,
        timeout_secs: Optional[int] = None,
        name: Optional[str] = None,
        requirements: Optional[Mapping[str, Any]] = None,
    ) -> Job:
        """Submits a job and returns it.

        Either ``job``, the path of a job file (its kernel and input files
        are uploaded from beside it), or the job as Python values:

        - ``kernel``: WGSL source, or ``"library:NAME"``;
        - ``dispatch``: workgroups along x, y, z;
        - ``inputs``: ``{binding: array}``, or ``{binding: {"array": a,
          "kind": "uniform" | "storage" | "state", "split": True}}``;
          arrays go as ``.npy`` (float32, uint32, int32 or uint8);
        - ``outputs``: ``{binding: (dtype, shape)}`` per task, e.g.
          ``{2: (np.float32, (256, 256))}``;
        - ``tasks``, ``redundancy`` (a number or ``"auto"``), ``compare``
          (``"exact"`` or ``{"abs": ..., "rel": ..., "ulps": ...}``) and the
          other fields of JOBS.md.
        """
        if job is not None:
            return self._submit_file(Path(job))
        if kernel is None or dispatch is None:
            raise ValueError("give a job file, or kernel= and dispatch=")
        doc: Dict[str, Any] = {"name": name or "job", "dispatch": [int(d) for d in dispatch], "tasks": int(tasks)}
        files: Dict[str, str] = {}
        if kernel.startswith("library:"):
            doc["kernel"] = kernel
        else:
            doc["kernel"] = "kernel.wgsl"
            files["kernel.wgsl"] = self.upload(kernel.encode())
        for key, value in (("redundancy", redundancy), ("compare", compare), ("entry_point", entry_point),
                           ("info_binding", info_binding), ("steps", steps), ("timeout_secs", timeout_secs)):
            if value is not None:
                doc[key] = value
        if requirements:
            doc["requirements"] = dict(requirements)
        ins = []
        for binding, spec in (inputs or {}).items():
            if not isinstance(spec, Mapping):
                spec = {"array": spec}
            a = np.asarray(spec["array"])
            fname = f"input{binding}.npy"
            files[fname] = self.upload(_npy_bytes(a))
            entry: Dict[str, Any] = {"binding": int(binding), "file": fname}
            if spec.get("kind"):
                entry["kind"] = spec["kind"]
            if spec.get("split"):
                entry["split"] = True
            if spec.get("kind") == "state":
                entry["type"] = _elem_name(a.dtype)
            ins.append(entry)
        outs = []
        for binding, spec in (outputs or {}).items():
            dtype, shape = spec
            shape = [int(shape)] if np.isscalar(shape) else [int(s) for s in shape]
            outs.append({"binding": int(binding), "type": _elem_name(dtype), "shape": shape})
        if ins:
            doc["inputs"] = ins
        if outs:
            doc["outputs"] = outs
        return self._submit(toml_dumps(doc), f"{doc['name']}.toml", files)

    def _submit_file(self, path: Path) -> Job:
        import tomllib

        text = path.read_text()
        spec = tomllib.loads(text)
        names = []
        if not str(spec.get("kernel", "")).startswith("library:") and "kernel" in spec:
            names.append(spec["kernel"])
        names += [i["file"] for i in spec.get("inputs", []) if "file" in i]
        files = {n: self.upload(path.parent / n) for n in dict.fromkeys(names)}
        return self._submit(text, path.name, files)

    def _submit(self, text: str, name: str, files: Dict[str, str]) -> Job:
        s = self._post("/v1/jobs", {"job": text, "name": name, "files": files})
        return Job(self, s["id"], s)
