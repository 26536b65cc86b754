"""A local stand-in for the Hugging Face Hub HTTP API, enough for `HfApi.create_repo` + `HfApi.upload_folder`.

It is a stdlib `ThreadingHTTPServer` on 127.0.0.1 (a free port, a daemon thread) that keeps repos in memory and
records what the client did, so tests can check an upload byte for byte without network:

    with FakeHub() as hub:
        push_folder(folder, "org/model", token=hub.token, endpoint=hub.endpoint)
        assert hub.files("org/model") == {...}

Endpoints (the ones huggingface_hub 2.x calls for those two methods, plus what their fallbacks call):

- `POST /api/repos/create`                              create a repo (409 if it exists, as the Hub does)
- `GET  /api/{type}s/{ns}/{name}[/revision/{rev}]`     repo info (called by `create_repo(exist_ok=True)` after a
                                                          401/403, and by `upload_folder` when nothing changed)
- `POST /api/validate-yaml`                             checks README.md's YAML header before any upload
- `POST /api/{type}s/{ns}/{name}/preupload/{rev}`      answers "regular" for every file
- `POST /api/{type}s/{ns}/{name}/commit/{rev}`         the ndjson commit: header / file / deletedFile /
                                                          deletedFolder lines, file content base64-encoded
- `GET  /api/whoami-v2`                                 the token's user ("fake-user")

Every file is declared "regular" (inlined in the commit): the client accepts that for any size or extension, so
neither the LFS batch API nor Xet storage is needed; a commit that still carries an `lfsFile` line is refused with
422. Requests must carry `Authorization: Bearer <hub.token>` (401 "Invalid credentials" otherwise, like the Hub).
Any endpoint can be made to fail with `hub.fail("create", 401)`; requests to anything else get 404 and are listed in
`hub.unhandled`.

In-process clients: huggingface_hub reads HF_HUB_OFFLINE once, at import, and then refuses every request, explicit
endpoint or not; the `fake_hub` fixture therefore sets `huggingface_hub.constants.HF_HUB_OFFLINE` to False for the
test. Subprocesses: start them with `env=hub.environment()` (HF_ENDPOINT and HF_TOKEN pointing here, the offline
switches removed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest


logger = logging.getLogger(__name__)

FAKE_TOKEN = "hf_fake_token_for_tests"
FAKE_USER = "fake-user"

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO_ROUTE = r"^/api/(?P<kind>models|datasets|spaces)/(?P<repo_id>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(_REPO_ROUTE + r"/preupload/(?P<revision>.+)$"), "preupload"),
    ("POST", re.compile(_REPO_ROUTE + r"/commit/(?P<revision>.+)$"), "commit"),
    ("GET", re.compile(_REPO_ROUTE + r"(?:/revision/(?P<revision>.+))?$"), "repo_info"),
]


@dataclass(frozen=True)
class CreatedRepo:
    """A repo created through `POST /api/repos/create`."""

    repo_id: str
    repo_type: str
    private: bool
    visibility: str | None  # as sent by the client: "public", "private" or None (the namespace's default)


@dataclass(frozen=True)
class Commit:
    """One commit received on `POST .../commit/{revision}`: the files it added or replaced (path -> bytes)."""

    repo_id: str
    repo_type: str
    revision: str
    message: str
    description: str
    files: dict[str, bytes]
    deleted: tuple[str, ...]
    oid: str


@dataclass
class _Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    head: str = ""


class _HubError(Exception):
    """An error answer: status, message, and the X-Error-Code header huggingface_hub uses to pick its exception."""

    def __init__(
        self, status: int, message: str, error_code: str | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra or {}  # more fields of the JSON answer


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid, and what the client compares with
    to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """An in-memory Hub API on http://127.0.0.1:PORT. Use as a context manager (or `start()` / `close()`)."""

    def __init__(
        self, token: str | None = FAKE_TOKEN, user: str = FAKE_USER, orgs: tuple[str, ...] = (), role: str = "write"
    ) -> None:
        """`token`: the only token accepted (`None` accepts any request, authenticated or not). `orgs`: the
        organizations the token's user belongs to, `role`: the token's (`read`, `write`, `fineGrained`), as
        `whoami-v2` reports them."""
        self.token = token
        self.user = user
        self.orgs = orgs
        self.role = role
        self.created_repos: list[CreatedRepo] = []
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unhandled: list[tuple[str, str]] = []  # requests to endpoints this fake does not implement
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._failures: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        """`http://127.0.0.1:PORT`: pass it as `HfApi(endpoint=...)` or as HF_ENDPOINT to a subprocess."""
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        """Serve on a free port of 127.0.0.1 from a daemon thread."""
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True  # kept-alive client connections must not hold up the test process
        # A short poll interval: `close()` waits for the serving loop to notice the shutdown.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (the recorded state stays readable)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ test helpers

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """The current files of a repo (path in repo -> bytes), after all its commits."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r} on the fake hub")
            return dict(repo.files)

    def add_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> None:
        """Make a repo exist already (not recorded in `created_repos`), e.g. to test pushing into an existing one."""
        with self._lock:
            self._repos.setdefault((repo_type, repo_id), _Repo(private=private))

    def fail(self, endpoint: str, status: int, message: str | None = None) -> None:
        """Answer every later request to `endpoint` with HTTP `status`. `endpoint` is one of: create, repo_info,
        validate_yaml, preupload, commit, whoami."""
        if endpoint not in {name for _, _, name in _ROUTES}:
            raise ValueError(f"unknown fake hub endpoint {endpoint!r}")
        with self._lock:
            self._failures[endpoint] = (status, message or HTTPStatus(status).phrase)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess that should talk to this hub: `base` (default os.environ) with HF_ENDPOINT and
        HF_TOKEN set here, offline mode off, and no proxy for 127.0.0.1."""
        environment = dict(os.environ if base is None else base)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
            environment.pop(name, None)
        no_proxy = ",".join(filter(None, [environment.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        environment.update(
            HF_ENDPOINT=self.endpoint, NO_PROXY=no_proxy, no_proxy=no_proxy, HF_HUB_DISABLE_TELEMETRY="1"
        )
        if self.token is not None:
            environment["HF_TOKEN"] = self.token
        return environment

    # ------------------------------------------------------------------ request handling (server threads)

    def _handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, Any]:
        """Route one request; returns (status, JSON-able body). Raises `_HubError` for error answers."""
        with self._lock:
            self.requests.append((method, path))
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match is None or route_method != method:
                continue
            self._check_token(headers)
            with self._lock:
                failure = self._failures.get(name)
            if failure is not None:
                raise _HubError(*failure)
            params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            return getattr(self, f"_on_{name}")(body=body, **params)
        with self._lock:
            self.unhandled.append((method, path))
        raise _HubError(404, f"fake hub: {method} {path} is not implemented")

    def _check_token(self, headers: Mapping[str, str]) -> None:
        if self.token is None:
            return
        if headers.get("authorization", "") != f"Bearer {self.token}":
            # The Hub's answer to a missing or wrong token; huggingface_hub keys on this exact X-Error-Message.
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, kind: str, repo_id: str) -> _Repo:
        repo = self._repos.get((_REPO_TYPES[kind], repo_id))
        if repo is None:
            raise _HubError(404, "Repository not found", error_code="RepoNotFound")
        return repo

    @staticmethod
    def _check_revision(revision: str) -> None:
        if revision != "main":
            raise _HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"

    def _on_whoami(self, body: bytes) -> tuple[int, Any]:
        return 200, {
            "type": "user",
            "name": self.user,
            "fullname": "Fake User",
            "orgs": [{"type": "org", "name": org} for org in self.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": self.role}},
        }

    def _on_create(self, body: bytes) -> tuple[int, Any]:
        payload = json.loads(body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        visibility = payload.get("visibility")
        url = self._repo_url(repo_type, repo_id)
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                # `create_repo(exist_ok=True)` reads the repo URL from this answer.
                raise _HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
            self._repos[(repo_type, repo_id)] = _Repo(private=visibility == "private")
            self.created_repos.append(CreatedRepo(repo_id, repo_type, visibility == "private", visibility))
        return 200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]}

    def _on_repo_info(self, body: bytes, kind: str, repo_id: str, revision: str = "main") -> tuple[int, Any]:
        self._check_revision(revision)
        with self._lock:
            repo = self._repo(kind, repo_id)
            return 200, {
                "id": repo_id,
                "private": repo.private,
                "sha": repo.head or None,
                "siblings": [{"rfilename": path} for path in sorted(repo.files)],
            }

    def _on_validate_yaml(self, body: bytes) -> tuple[int, Any]:
        content = json.loads(body).get("content", "")
        error = _front_matter_error(content)
        if error is not None:
            return 400, {"errors": [{"message": error}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _on_preupload(self, body: bytes, kind: str, repo_id: str, revision: str) -> tuple[int, Any]:
        self._check_revision(revision)
        files = json.loads(body)["files"]
        with self._lock:
            repo = self._repo(kind, repo_id)
            answers = [
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(repo.files[item["path"]]) if item["path"] in repo.files else None,
                }
                for item in files
            ]
        return 200, {"files": answers, "commitOid": None}

    def _on_commit(self, body: bytes, kind: str, repo_id: str, revision: str) -> tuple[int, Any]:
        self._check_revision(revision)
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(422, f"fake hub: unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"] + ("/" if key == "deletedFolder" else ""))
            else:
                # lfsFile (or copies): this fake never asks for LFS, so such a line means the client took a path
                # the tests do not cover.
                raise _HubError(422, f"fake hub: commit line {key!r} is not supported (only regular files are)")
        if not header:
            raise _HubError(400, "fake hub: the commit has no header line")
        repo_type = _REPO_TYPES[kind]
        with self._lock:
            repo = self._repo(kind, repo_id)
            parent = header.get("parentCommit")
            if parent and repo.head and not repo.head.startswith(parent):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            for path in deleted:
                for existing in [p for p in repo.files if p == path or (path.endswith("/") and p.startswith(path))]:
                    del repo.files[existing]
            repo.files.update(added)
            oid = hashlib.sha1(f"{repo.head}:{uuid.uuid4()}".encode()).hexdigest()
            repo.head = oid
            self.commits.append(
                Commit(
                    repo_id=repo_id,
                    repo_type=repo_type,
                    revision=revision,
                    message=header.get("summary", ""),
                    description=header.get("description", ""),
                    files=added,
                    deleted=tuple(deleted),
                    oid=oid,
                )
            )
        commit_url = f"{self._repo_url(repo_type, repo_id)}/commit/{oid}"
        return 200, {"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": None}


def _front_matter_error(content: str) -> str | None:
    """Why the Hub would reject README.md's YAML header, or None (no header is fine)."""
    lines = content.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(index for index, line in enumerate(lines[1:], start=1) if line.strip() == "---")
    except StopIteration:
        return "the YAML header is not closed by '---'"
    try:
        import yaml
    except ImportError:  # the YAML check is a nicety: without pyyaml every header passes
        return None
    try:
        metadata = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as error:
        return f"invalid YAML in the header: {error}"
    if metadata is not None and not isinstance(metadata, dict):
        return "the YAML header must be a mapping"
    return None


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into `FakeHub._handle` calls. `hub` is set on a per-server subclass."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.debug("fake hub: " + format, *args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()  # the empty line after the last chunk
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        body = self._read_body()
        headers = {key.lower(): value for key, value in self.headers.items()}
        extra_headers: dict[str, str] = {}
        try:
            status, answer = self.hub._handle(self.command, urlsplit(self.path).path, headers, body)
        except _HubError as error:
            status, answer = error.status, {"error": error.message, **error.extra}
            extra_headers["X-Error-Message"] = error.message
            if error.error_code:
                extra_headers["X-Error-Code"] = error.error_code
        except Exception as error:  # a bug in the fake: answer 500 rather than hang the client
            logger.exception("fake hub: %s %s failed", self.command, self.path)
            status, answer = 500, {"error": f"fake hub error: {error!r}"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started `FakeHub` (token `FAKE_TOKEN`) that in-process huggingface_hub clients may reach even when the test
    process runs with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants

    # huggingface_hub froze HF_HUB_OFFLINE at import and checks this attribute before every request.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as hub:
        yield hub
