"""Tiny v3-gateway helpers so server tests do not depend on the client package."""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import urllib3

_http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=5))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = _http.request("POST", f"{url}{path}", body=json.dumps(body).encode())
    assert response.status == 200, (response.status, response.data)
    result: dict[str, Any] = json.loads(response.data)
    return result


def put(url: str, key: bytes, value: bytes) -> None:
    _post(url, "/v3/kv/put", {"key": _b64(key), "value": _b64(value)})


def get(url: str, key: bytes) -> bytes | None:
    kvs = _post(url, "/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
    return base64.b64decode(kvs[0].get("value", "")) if kvs else None


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        response = _http.request("GET", f"{url}/health", timeout=timeout)
    except urllib3.exceptions.HTTPError:
        return False
    return response.status == 200 and b'"health":"true"' in response.data


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (zombies of non-children count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_pid_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.01)
    return not pid_alive(pid)


def write_script(path: os.PathLike[str] | str, body: str) -> str:
    """Write an executable shell script (a fake etcd) and return its path."""
    path = os.fspath(path)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


class PlainHTTPServer:
    """A web server that is not etcd (an HTML page on every GET/POST), on a free port.

    Usage: ``with PlainHTTPServer() as web: ... web.port``.
    """

    PAGE = b"<!DOCTYPE html><html><head><title>Not etcd</title></head><body>" + b"x" * 3000

    def __init__(self) -> None:
        import http.server
        import threading

        page = self.PAGE

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> PlainHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
