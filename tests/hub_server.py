"""A Hugging Face Hub stand-in on 127.0.0.1 that speaks the download protocol huggingface_hub uses.

`HEAD /{repo}/resolve/{revision}/{path}` answers like the real hub does for an LFS file: a 302 to a
content URL with `X-Repo-Commit`, `X-Linked-Etag` (the sha256, quoted) and `X-Linked-Size`; the
content URL (`/cdn/<sha256>`, on a second port: another origin, like the hub's CDN, so clients
neither follow the HEAD redirect nor send the token there) serves the bytes with `Range` support
(206). With `redirect=False` the resolve URL serves the bytes itself (`ETag`, `Content-Length`).
Point huggingface_hub at it with `HF_ENDPOINT=hub.url`.

Faults, set as attributes between requests:
  cut_at, cut_times  close the connection once the body reaches byte `cut_at`, for the next N GETs
  corrupt_at         flip the byte at this offset in every body served
  extra_bytes        append these bytes to every body (the headers keep the true size)
  delay              seconds to sleep between 64 KiB chunks (a slow server)
  wait_for_heads     hold every body until this many HEADs have arrived (makes fetches overlap)
  gated[repo]        (token, status): a request without that bearer token gets `status` (401/403)
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool
    status: int = 0


class HubServer:
    def __init__(self, redirect: bool = True):
        self.redirect = redirect
        self.files: dict[tuple[str, str], bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.commits: dict[str, str] = {}
        self.gated: dict[str, tuple[str, int]] = {}
        self.requests: list[Request] = []
        self.cut_at: int | None = None
        self.cut_times = 0
        self.corrupt_at: int | None = None
        self.extra_bytes = b""
        self.delay = 0.0
        self.wait_for_heads = 0
        self._lock = threading.Lock()
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(self)) for _ in range(2)]
        for server in self._servers:
            server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def add(self, repo: str, path: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.files[(repo, path)] = data
        self.blobs[sha] = data
        self.commits.setdefault(repo, hashlib.sha1(repo.encode()).hexdigest())
        return sha

    def gets(self) -> list[Request]:
        """Requests that carried file bytes."""
        return [r for r in self.requests if r.method == "GET" and r.status in (200, 206)]

    def __enter__(self) -> HubServer:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            auth = self.headers.get("Authorization", "")
            record = Request(self.command, self.path, self.headers.get("Range"), bool(auth))
            with hub._lock:
                hub.requests.append(record)
            path = unquote(urlsplit(self.path).path)
            if path.startswith("/cdn/"):
                data = hub.blobs.get(path[len("/cdn/"):])
                if data is None:
                    return self._error(record, 404, "EntryNotFound")
                return self._bytes(record, data, body)
            match = RESOLVE.match(path)
            if not match:
                return self._error(record, 404, "RepoNotFound")
            repo, revision = match["repo"], match["revision"]
            if repo not in hub.commits:
                return self._error(record, 401, "RepoNotFound")
            if repo in hub.gated:
                token, status = hub.gated[repo]
                if auth != f"Bearer {token}":
                    return self._error(record, 401 if not auth else status, "GatedRepo",
                                       f"Access to model {repo} is restricted.")
            commit = hub.commits[repo]
            if revision not in ("main", commit):
                return self._error(record, 404, "RevisionNotFound", commit=commit)
            data = hub.files.get((repo, match["path"]))
            if data is None:
                return self._error(record, 404, "EntryNotFound", commit=commit)
            sha = hashlib.sha256(data).hexdigest()
            meta = {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                    "ETag": f'"{sha}"'}
            if hub.redirect:
                record.status = 302
                self.send_response(302)
                for key, value in meta.items():
                    self.send_header(key, value)
                self.send_header("Location", f"{hub.cdn_url}/cdn/{sha}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._bytes(record, data, body, meta)

        def _error(self, record: Request, status: int, code: str, message: str = "", commit: str | None = None) -> None:
            record.status = status
            payload = f'{{"error": "{message or code}"}}'.encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            if message:
                self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _bytes(self, record: Request, data: bytes, body: bool, meta: dict | None = None) -> None:
            sha = hashlib.sha256(data).hexdigest()
            if hub.corrupt_at is not None and hub.corrupt_at < len(data):
                data = data[:hub.corrupt_at] + bytes([data[hub.corrupt_at] ^ 0xFF]) + data[hub.corrupt_at + 1:]
            data += hub.extra_bytes
            start, end = 0, len(data)
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if wanted:
                start = int(wanted[1])
                end = min(int(wanted[2]) + 1, len(data)) if wanted[2] else len(data)
                if start >= len(data):
                    record.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            record.status = 206 if wanted else 200
            self.send_response(record.status)
            for key, value in (meta or {"ETag": f'"{sha}"'}).items():
                self.send_header(key, value)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            deadline = time.monotonic() + 10
            while sum(r.method == "HEAD" for r in hub.requests) < hub.wait_for_heads and time.monotonic() < deadline:
                time.sleep(0.01)
            cut = None
            with hub._lock:
                if hub.cut_times > 0 and hub.cut_at is not None and start < hub.cut_at < end:
                    hub.cut_times -= 1
                    cut = hub.cut_at
            try:
                position = start
                while position < (cut if cut is not None else end):
                    stop = min(position + CHUNK, cut if cut is not None else end)
                    self.wfile.write(data[position:stop])
                    self.wfile.flush()
                    position = stop
                    if hub.delay:
                        time.sleep(hub.delay)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            if cut is not None:
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler
