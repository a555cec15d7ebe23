"""A tiny in-process stand-in for the Hugging Face Hub HTTP API, for push tests without network.

It speaks only what ``huggingface_hub`` 2.4 sends for ``create_repo``, ``create_branch`` and
``create_commit`` over the plain LFS path, plus ``resolve`` so a file can be downloaded back:

========  ===============================================  ==============================
method    path                                             used by
========  ===============================================  ==============================
POST      /api/repos/create                                create_repo (409 + url if it exists)
POST      /api/models/{ns}/{name}/branch/{branch}          create_branch (409 if it exists)
POST      /api/validate-yaml                               create_commit, when README.md is added
POST      /api/models/{ns}/{name}/preupload/{rev}          create_commit: regular or LFS per file
POST      /{ns}/{name}.git/info/lfs/objects/batch          LFS batch: upload + verify actions
PUT       /_lfs/{oid}                                      LFS "basic" upload (the S3 stand-in)
POST      /_lfs/{oid}/verify                               LFS verify
POST      /api/models/{ns}/{name}/commit/{rev}             ndjson commit, ``?create_pr=1`` opens a PR
GET       /api/models/{ns}/{name}[/revision/{rev}]          model_info (snapshot_download's commit)
GET       /api/models/{ns}/{name}/tree/{rev}               list_repo_tree (snapshot_download's file list)
GET/HEAD  /{ns}/{name}/resolve/{rev}/{path}                hf_hub_download
========  ===============================================  ==============================

Anything else answers 404 and is listed in ``FakeHub.unhandled``. Every request is recorded in
``FakeHub.requests`` (so a test can assert that none was made), and ``fail_once`` makes the next
matching request answer an error, to simulate an interrupted upload. Xet is not spoken at all:
``huggingface_hub`` 2.4 picks Xet on the client side whenever ``hf_xet`` is installed, so tests
must set ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` (see ``test_hub_push.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]  # the whole tree after this commit
    lfs_paths: set[str]  # paths of that tree stored as LFS pointers


@dataclass
class Repo:
    repo_id: str
    visibility: str | None
    refs: dict[str, str] = field(default_factory=dict)  # "main", "my-branch", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: dict[int, dict] = field(default_factory=dict)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return self.commits[self.refs[revision]].files


@dataclass
class RecordedRequest:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """Owns the server thread and the in-memory state; use as a context manager."""

    lfs_threshold = 10 * 1024 * 1024  # like the Hub: larger files are LFS even if they look like text

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[str] = []
        self._failures: list[tuple[str, re.Pattern, int]] = []
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # -- test helpers ------------------------------------------------------------------------
    def fail_once(self, method: str, path_regex: str, status: int = 500) -> None:
        """The next request whose method matches and whose path matches ``path_regex`` gets ``status``."""
        self._failures.append((method, re.compile(path_regex), status))

    def request_lines(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    # -- state changes (called by the handler, under the lock) ------------------------------
    def _new_commit(
        self,
        repo: Repo,
        parent: str | None,
        message: str,
        description: str,
        files: dict[str, bytes],
        lfs_paths: set[str],
    ) -> Commit:
        self._commit_counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{self._commit_counter}:{message}".encode()).hexdigest()
        commit = Commit(oid, parent, message, description, files, lfs_paths)
        repo.commits[oid] = commit
        return commit

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return path.endswith(LFS_SUFFIXES) or size >= self.lfs_threshold or b"\x00" in sample


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)"), "create_branch"),
    ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/{REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/_lfs/(?P<oid>[0-9a-f]{64})"), "lfs_put"),
    ("POST", re.compile(r"/_lfs/(?P<oid>[0-9a-f]{64})/verify"), "lfs_verify"),
    ("GET", re.compile(rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)"), "model_info"),
    ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)"), "tree"),
    ("GET", re.compile(rf"/api/models/{REPO}"), "model_info"),
    ("GET", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload=None, *, raw: bytes | None = None, headers: dict | None = None):
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        fake = self.fake
        with fake._lock:
            fake.requests.append(RecordedRequest(method, split.path, self.headers.get("Authorization")))
            for rule in list(fake._failures):
                if rule[0] == method and rule[1].search(split.path):
                    fake._failures.remove(rule)
                    headers = {"X-Error-Message": "injected failure"}
                    return self._send(rule[2], {"error": "injected failure"}, headers=headers)
            for route_method, pattern, name in ROUTES:  # noqa: B007  (name is used after the break)
                match = pattern.fullmatch(split.path)
                if route_method == method and match:
                    break
            else:
                fake.unhandled.append(f"{method} {split.path}")
                return self._send(404, {"error": f"fake hub: no route for {method} {split.path}"})
            args = {k: unquote(v) for k, v in match.groupdict().items()}
            if not split.path.startswith("/_lfs/") and name not in ("resolve", "model_info", "tree"):
                if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
            try:
                query = {k: v[0] for k, v in parse_qs(split.query).items()}
                status, payload, extra = getattr(self, f"_{name}")(body=body, query=query, **args)
            except _HubError as e:
                headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
                return self._send(e.status, {"error": e.message}, headers=headers)
            if isinstance(payload, bytes):
                return self._send(status, raw=payload, headers=extra)
            return self._send(status, payload, headers=extra)

    def _repo(self, repo_id: str) -> Repo:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _ref(self, repo: Repo, rev: str) -> str:
        """A branch / PR ref, or a commit id (downloads pin the commit they resolved first)."""
        if rev in repo.commits:
            return rev
        if rev not in repo.refs:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.refs[rev]

    # -- endpoints -------------------------------------------------------------------------------
    def _create_repo(self, body, query):
        data = json.loads(body)
        repo_id = f"{data.get('organization') or 'fake-user'}/{data['name']}"
        url = f"{self.fake.url}/{repo_id}"
        if data.get("type", "model") != "model":
            raise _HubError(400, "fake hub: only model repos")
        if repo_id in self.fake.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        repo = Repo(repo_id, data.get("visibility"))
        init = self.fake._new_commit(repo, None, "initial commit", "", {".gitattributes": GITATTRIBUTES}, set())
        repo.refs["main"] = init.oid
        self.fake.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": init.oid}, {}

    def _validate_yaml(self, body, query):
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        try:
            if match is None or not isinstance(yaml.safe_load(match.group(1)), dict):
                raise ValueError("no YAML front matter dict")
        except (ValueError, yaml.YAMLError) as e:
            return 400, {"errors": [{"message": str(e)}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _create_branch(self, body, query, repo, branch):
        r = self._repo(repo)
        if branch in r.refs:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body or b"{}") or {}).get("startingPoint", "main")
        r.refs[branch] = self._ref(r, start)
        return 200, {}, {}

    def _preupload(self, body, query, repo, rev):
        r = self._repo(repo)
        self._ref(r, rev)
        files = []
        for f in json.loads(body)["files"]:
            lfs = self.fake._is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": files, "commitOid": r.refs[rev]}, {}

    def _lfs_batch(self, body, query, repo):
        self._repo(repo)
        data = json.loads(body)
        if data.get("operation") != "upload" or "basic" not in data.get("transfers", ["basic"]):
            raise _HubError(400, "fake hub: only basic LFS uploads")
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.fake.lfs:  # already stored objects get no actions: nothing to send
                href = f"{self.fake.url}/_lfs/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _lfs_put(self, body, query, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, "fake hub: content does not match its sha256")
        self.fake.lfs[oid] = body
        return 200, {}, {"ETag": f'"{oid}"'}

    def _lfs_verify(self, body, query, oid):
        data = json.loads(body)
        if oid not in self.fake.lfs or len(self.fake.lfs[oid]) != data.get("size"):
            raise _HubError(404, f"fake hub: LFS object {oid} not found")
        return 200, {}, {}

    def _commit(self, body, query, repo, rev):
        r = self._repo(repo)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        if query.get("create_pr") == "1":
            parent = self._ref(r, rev)
            number = len(r.pull_requests) + 1
            target_ref = f"refs/pr/{number}"
            r.pull_requests[number] = {"target": rev, "title": header.get("summary", "")}
        else:
            parent, target_ref = self._ref(r, rev), rev
        files = dict(r.commits[parent].files)
        lfs_paths = set(r.commits[parent].lfs_paths)
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
            elif key == "lfsFile":
                content = self.fake.lfs.get(value["oid"])
                if content is None or ("size" in value and len(content) != value["size"]):
                    raise _HubError(400, f"fake hub: LFS object for {value['path']} was never uploaded")
                files[value["path"]] = content
                lfs_paths.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
                lfs_paths.discard(value["path"])
            else:
                raise _HubError(400, f"fake hub: unsupported commit operation {key!r}")
        commit = self.fake._new_commit(
            r, parent, header.get("summary", ""), header.get("description", ""), files, lfs_paths
        )
        r.refs[target_ref] = commit.oid
        pr_url = f"{self.fake.url}/{repo}/discussions/{target_ref.split('/')[-1]}" if target_ref != rev else None
        return (
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.fake.url}/{repo}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
            },
            {},
        )

    def _model_info(self, body, query, repo, rev="main"):
        r = self._repo(repo)
        commit = r.commits[self._ref(r, unquote(rev))]
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return 200, {"id": repo, "sha": commit.oid, "private": False, "siblings": siblings}, {}

    def _tree(self, body, query, repo, rev):
        r = self._repo(repo)
        commit = r.commits[self._ref(r, unquote(rev))]
        entries = []
        for path, content in sorted(commit.files.items()):
            entry = {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            if path in commit.lfs_paths:
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        return 200, entries, {}

    def _resolve(self, body, query, repo, rev, path):
        r = self._repo(repo)
        commit = r.commits[self._ref(r, rev)]
        if path not in commit.files:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = commit.files[path]
        etag = hashlib.sha256(content).hexdigest() if path in commit.lfs_paths else hashlib.sha1(content).hexdigest()
        return 200, content, {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid}
