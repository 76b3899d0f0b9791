"""A Hugging Face Hub in memory, behind huggingface_hub's own HTTP client (`set_client_factory` with an
httpx2 `MockTransport`): every call of `HfApi` runs as it would, only the server is this object.

It answers the endpoints a push uses (whoami, repo creation, repo info, branches, YAML validation,
pre-upload, the LFS batch API and its upload URLs, the commit) the way the Hub documents them, with
the Hub's status codes for a bad token (401), a repository of someone else (403 at upload) and a
missing repository (404). It also serves what it holds (repo info, `resolve/` downloads with the
headers `hf_hub_download` reads), so a pushed export can be loaded back by repo id.
`down = True` makes every request fail as an unreachable host does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote

LFS_SUFFIXES = (".safetensors", ".bin", ".png")  # the Hub's default .gitattributes sends these through LFS
TOKEN = "hf_fake_write_token"


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": uuid.uuid4().hex + "00000000"})
    commits: list[dict] = field(default_factory=list)


class FakeHub:
    def __init__(self, user: str = "alice", orgs: tuple[str, ...] = ("alice-lab",)):
        self.user, self.orgs = user, list(orgs)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request
        self.down = False
        self.refuse_upload: set[str] = set()  # repo ids whose pre-upload answers 403 (read-only membership)

    # What tests read
    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "GET" and not c[1].endswith("/api/validate-yaml")]

    # The server
    def handle(self, request):
        import httpx2

        self.calls.append((request.method, request.url.path))
        if self.down:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
        if request.url.host == "lfs.fake":
            return self._lfs_put(request)
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return httpx2.Response(401, json={"error": "Invalid credentials in Authorization header"})
        path = unquote(request.url.path)
        download = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if download and request.method in ("GET", "HEAD"):
            return self._resolve(request, **download.groupdict())
        routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", lambda r: (200, {"errors": [], "warnings": []})),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>.+))?", self._info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/(?P<folder>.+))?", self._tree),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)", self._branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self._preupload),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self._commit),
        ]
        for method, pattern, answer in routes:
            match = re.fullmatch(pattern, path)
            if method == request.method and match:
                status, body = answer(request, **{k: v for k, v in match.groupdict().items() if v is not None})
                return httpx2.Response(status, json=body)
        return httpx2.Response(404, json={"error": f"no route {request.method} {path}"})

    def _repo(self, repo: str, rev: str = "main"):
        """The repo and the branch that `rev` names (a branch or the commit at its head), or the Hub's 404."""
        if repo not in self.repos:
            return None, (404, {"error": "Repository not found"})
        found = self.repos[repo]
        branch = rev if rev in found.branches else next((b for b, oid in found.heads.items() if oid == rev), None)
        if branch is None:
            return None, (404, {"error": f"Invalid rev id: {rev}"})
        return found, branch

    def _whoami(self, request):
        return 200, {"type": "user", "name": self.user, "orgs": [{"name": o, "type": "org"} for o in self.orgs],
                     "auth": {"type": "access_token", "accessToken": {"role": "write"}}}

    def _create(self, request):
        body = json.loads(request.content)
        namespace = body.get("organization") or self.user
        repo_id = f"{namespace}/{body['name']}"
        if namespace not in [self.user, *self.orgs]:
            return 403, {"error": "You don't have the rights to create a model under this namespace"}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"https://huggingface.co/{repo_id}"}
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        self.repos[repo_id] = Repo(owner=namespace, private=private)
        return 200, {"url": f"https://huggingface.co/{repo_id}"}

    def _info(self, request, repo, rev="main"):
        found, branch = self._repo(repo, rev)
        if found is None:
            return branch
        rev = branch
        return 200, {"id": repo, "modelId": repo, "private": found.private, "sha": found.heads[rev],
                     "siblings": [{"rfilename": name} for name in sorted(found.branches[rev])]}

    def _tree(self, request, repo, rev, folder=""):
        """Files only (as the recursive listing that `snapshot_download` asks for has them)."""
        found, branch = self._repo(repo, rev)
        if found is None:
            return branch
        entries = []
        for path, data in sorted(found.branches[branch].items()):
            if not path.startswith(folder):
                continue
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            entry = {"type": "file", "path": path, "size": len(data), "oid": blob}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return 200, entries

    def _resolve(self, request, repo, rev, file):
        import httpx2

        found, branch = self._repo(repo, rev)
        if found is not None:
            rev = branch
        if found is None or file not in found.branches[rev]:
            return httpx2.Response(404, json={"error": "Entry not found"}, headers={"x-error-code": "EntryNotFound"})
        data = found.branches[rev][file]
        headers = {"x-repo-commit": found.heads[rev], "etag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "content-length": str(len(data))}
        return httpx2.Response(200, content=b"" if request.method == "HEAD" else data, headers=headers)

    def _branch(self, request, repo, rev):
        found, branch = self._repo(repo)
        if found is None:
            return branch
        if rev in found.branches:
            return 409, {"error": "Reference already exists"}
        found.branches[rev] = dict(found.branches["main"])
        found.heads[rev] = found.heads["main"]
        return 200, {}

    def _writable(self, repo):
        return repo in self.repos and repo not in self.refuse_upload and self.repos[repo].owner in [self.user,
                                                                                                    *self.orgs]

    def _for_write(self, repo, rev):
        """As `_repo`, or the Hub's 403 for a repository the token may not write."""
        found, branch = self._repo(repo, rev)
        if found is not None and not self._writable(repo):
            return None, (403, {"error": f"You don't have the rights to write to {repo}"})
        return found, branch

    def _preupload(self, request, repo, rev):
        found, answer = self._for_write(repo, rev)
        if found is None:
            return answer
        files = json.loads(request.content)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES)
                                else "regular", "shouldIgnore": False, "oid": None} for f in files]}

    def _lfs_batch(self, request, repo):
        if not self._writable(repo):
            return 403, {"message": "write access denied"}
        objects = json.loads(request.content)["objects"]
        return 200, {"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"],
             "actions": {"upload": {"href": f"https://lfs.fake/{o['oid']}"}}} for o in objects]}

    def _lfs_put(self, request):
        import httpx2

        data = request.read()
        oid = request.url.path.strip("/")
        if hashlib.sha256(data).hexdigest() != oid:
            return httpx2.Response(400, json={"error": "sha256 mismatch"})
        self.lfs[oid] = data
        return httpx2.Response(200)

    def _commit(self, request, repo, rev):
        found, rev = self._for_write(repo, rev)
        if found is None:
            return rev
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
        files = dict(found.branches[rev])
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[value["path"]] = self.lfs[value["oid"]]
        found.branches[rev] = files
        header = next(line["value"] for line in lines if line["key"] == "header")
        oid = uuid.uuid4().hex + "00000000"  # unique, as diffusers caches a repo's code by commit
        found.heads[rev] = oid
        found.commits.append({"branch": rev, "summary": header["summary"], "oid": oid})
        return 200, {"commitUrl": f"https://huggingface.co/{repo}/commit/{oid}", "commitOid": oid}


def install(fake: FakeHub, monkeypatch, tmp_path) -> None:
    """Route huggingface_hub's client to `fake`, online, with a write token in `HF_TOKEN`."""
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the LFS protocol, which this fake speaks
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)  # retries of a down network, at once
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle),
                                             event_hooks={"request": [_http.hf_request_event_hook]},
                                             follow_redirects=True))


def uninstall() -> None:
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    set_client_factory(_http.default_client_factory)
