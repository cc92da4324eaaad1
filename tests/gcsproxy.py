"""An HTTP proxy in front of the GCS emulator: GCS's generation preconditions, injected faults, held requests.

Why it exists: gcp-storage-emulator never reads `ifGenerationMatch` (an upload with `ifGenerationMatch=0` overwrites
an existing object; a stale generation is accepted), so on the bare emulator a compare-and-swap cannot lose. The
proxy applies the precondition the way GCS documents it (412 Precondition Failed when the object's live generation,
0 for none, differs), atomically: it checks and forwards every object write under one lock. Everything else passes
through unchanged, so the code under test talks to a real server through the real google-cloud-storage client.

Faults, matched on the HTTP method and the object name (`bucket/name`):
    proxy.fail("POST", r"/LATEST$", 403)      answer 403 instead of forwarding
    held = proxy.hold("POST", r"/version.json$")   park the request until held.release(); held.reached is an Event
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass
class Held:
    method: str
    pattern: re.Pattern
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    once: bool = True

    def release(self) -> None:
        self.released.set()


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int
    hits: int = 0


class GcsProxy:
    """A threaded proxy on 127.0.0.1 in front of `upstream` ("http://127.0.0.1:PORT"); `host` is its own URL."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.faults: list[Fault] = []
        self.holds: list[Held] = []
        self.precondition_failures = 0
        self._write_lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> GcsProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        for held in self.holds:
            held.release()
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method: str, pattern: str, status: int) -> Fault:
        fault = Fault(method, re.compile(pattern), status)
        self.faults.append(fault)
        return fault

    def hold(self, method: str, pattern: str) -> Held:
        held = Held(method, re.compile(pattern))
        self.holds.append(held)
        return held

    # --- the request path --------------------------------------------------------------------------------------

    def _serve(self, req: BaseHTTPRequestHandler) -> None:
        body = _read_body(req)
        url = urllib.parse.urlsplit(req.path)
        query = urllib.parse.parse_qs(url.query)
        name = _object_name(url.path, query, body)
        for held in list(self.holds):
            if held.method == req.command and name and held.pattern.search(name) and not held.reached.is_set():
                held.reached.set()
                held.released.wait(timeout=120)
        for fault in self.faults:
            if fault.method == req.command and name and fault.pattern.search(name):
                fault.hits += 1
                return _reply(req, fault.status, _error(fault.status, f"injected {fault.status} for {name}"))
        if req.command not in _WRITES and "ifGenerationMatch" not in query:
            return self._forward(req, body)
        with self._write_lock:  # check-then-write is atomic, as on GCS
            wanted = (query.get("ifGenerationMatch") or [None])[0]
            if wanted is not None and name:
                live = self._generation(name)
                if str(live) != wanted:
                    self.precondition_failures += 1
                    return _reply(req, 412, _error(412, "Precondition Failed", "conditionNotMet"))
            self._forward(req, body)

    def _generation(self, name: str) -> int:
        bucket, _, obj = name.partition("/")
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(obj, safe='')}")
            resp = conn.getresponse()
            data = resp.read()
            return int(json.loads(data)["generation"]) if resp.status == 200 else 0
        finally:
            conn.close()

    def _forward(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP and k.lower() != "content-length"}
        if body or req.command in _WRITES:
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.request(req.command, req.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP and k.lower() != "content-length"]
        finally:
            conn.close()
        _reply(req, resp.status, data, out)


def _read_body(req: BaseHTTPRequestHandler) -> bytes:
    if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(req.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                req.rfile.readline()
                return b"".join(chunks)
            chunks.append(req.rfile.read(size))
            req.rfile.readline()
    length = int(req.headers.get("Content-Length") or 0)
    return req.rfile.read(length) if length else b""


def _object_name(path: str, query: dict[str, list[str]], body: bytes) -> str | None:
    """`bucket/object` a JSON-API request is about (uploads name it in the query or the multipart metadata)."""
    m = re.match(r"^(?:/download)?/storage/v1/b/([^/]+)/o/(.+)$", path)
    if m:
        return f"{m.group(1)}/{urllib.parse.unquote(m.group(2))}"
    m = re.match(r"^/upload/storage/v1/b/([^/]+)/o/?$", path)
    if m:
        if "name" in query:
            return f"{m.group(1)}/{query['name'][0]}"
        meta = re.search(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', body[:8192])
        if meta:
            name = json.loads(b'"' + meta.group(1) + b'"')
            return f"{m.group(1)}/{name}"
    return None


def _error(status: int, message: str, reason: str = "forbidden") -> bytes:
    return json.dumps({"error": {"code": status, "message": message,
                                 "errors": [{"domain": "global", "reason": reason, "message": message}]}}).encode()


def _reply(req: BaseHTTPRequestHandler, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
    req.send_response(status)
    for key, value in headers or [("Content-Type", "application/json")]:
        req.send_header(key, value)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    if req.command != "HEAD":
        req.wfile.write(body)
