"""A Hugging Face Hub in memory, behind huggingface_hub's own HTTP client (`set_client_factory` with an
httpx2 `MockTransport`): every call of `HfApi` runs as it would, only the server is this object.

It answers the endpoints a push uses (whoami, repo creation, repo info, branches, YAML validation,
pre-upload, the LFS batch API and its upload URLs, the commit) the way the Hub documents them, with
the Hub's status codes for a bad token (401), a repository of someone else (403 at upload) and a
missing repository (404). It also serves what it holds (repo info, `resolve/` downloads with the
headers `hf_hub_download` reads), so a pushed export can be loaded back by repo id.
`down = True` makes every request fail as an unreachable host does.

Dataset repositories (`add_dataset`, `tag_dataset`) are served as the Hub serves them to `datasets.load_dataset`
and `HfFileSystem`: repo info by branch, tag or commit (`/api/datasets/ID[/revision/REV]`, with `siblings` and
the README's YAML as `cardData`), the tree (`recursive`, `expand`; folders included), `paths-info`, and
`resolve/` downloads: a plain file answers 200 with its git blob id as ETag, an LFS one (parquet, images,
archives, as the Hub's default `.gitattributes` has them) a 302 to a CDN host with `X-Linked-Etag` (sha256)
and `X-Linked-Size`; every answer carries `X-Repo-Commit`. Public datasets need no token; a private one, or a
missing one, is the Hub's `RepoNotFound`: 401 without a token, 404 with a token that may not read it. The
dataset viewer (`datasets-server`) has nothing for any dataset, so `datasets` falls back to the repo files.
`install_datasets` also points every cache of `huggingface_hub` and `datasets` into the test's tmp_path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qs, unquote

LFS_SUFFIXES = (".safetensors", ".bin", ".png")  # the Hub's default .gitattributes sends these through LFS
TOKEN = "hf_fake_write_token"
CDN_HOST = "cdn-lfs.fake"  # where the Hub redirects LFS downloads (a signed URL: no Authorization header)
# The Hub's default .gitattributes of a new dataset repo (abridged): what it sends through LFS.
DATASET_GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in (
    ".7z", ".arrow", ".bin", ".bz2", ".gz", ".npy", ".npz", ".parquet", ".pickle", ".pkl", ".pt", ".safetensors",
    ".tar", ".tgz", ".xz", ".zip", ".zst", ".mp3", ".wav", ".flac", ".ogg", ".bmp", ".gif", ".png", ".tiff",
    ".jpg", ".jpeg", ".webp", ".mp4", ".webm")).encode()
DATASET_LFS_SUFFIXES = tuple(line.split()[0][1:] for line in DATASET_GITATTRIBUTES.decode().splitlines())
NOT_FOUND = {"x-error-code": "RepoNotFound", "x-error-message": "Repository not found"}


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": uuid.uuid4().hex + "00000000"})
    commits: list[dict] = field(default_factory=list)


@dataclass
class DatasetRepo:
    """A dataset repo as git has it: snapshots by commit id, each commit's parent, branches and tags."""

    owner: str
    private: bool
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> {path: bytes}
    log: dict[str, dict] = field(default_factory=dict)  # commit id -> {"parent", "title", "date"}
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit id
    tags: dict[str, str] = field(default_factory=dict)  # name -> commit id

    def resolve(self, rev: str):
        """The commit id that a branch, a tag or a (full) commit id names, or None."""
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.snapshots else None

    def last_commit(self, oid: str, path: str) -> str:
        """The newest commit, from `oid` back, after which `path` (a file, or a folder's files) is as at `oid`."""
        def state(commit):
            files = self.snapshots[commit]
            return {p: d for p, d in files.items() if p == path or p.startswith(path + "/")}

        here = state(oid)
        while self.log[oid]["parent"] is not None and state(self.log[oid]["parent"]) == here:
            oid = self.log[oid]["parent"]
        return oid


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


def _card_data(readme: bytes):
    """The YAML block at the top of a README, as the Hub returns it in `cardData`."""
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.decode("utf-8", "replace"), re.DOTALL)
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


def _true(value) -> bool:
    return str(value).lower() in ("1", "true")


class FakeHub:
    def __init__(self, user: str = "alice", orgs: tuple[str, ...] = ("alice-lab",)):
        self.user, self.orgs = user, list(orgs)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request
        self.down = False
        self.refuse_upload: set[str] = set()  # repo ids whose pre-upload answers 403 (read-only membership)
        self.datasets: dict[str, DatasetRepo] = {}  # dataset repos (a namespace apart from models, as on the Hub)
        self.cdn: dict[str, bytes] = {}  # the LFS objects of dataset repos by sha256, as the CDN serves them
        self.urls: list[tuple[str, str]] = []  # (method, full URL with its query) of every request
        self._lock = threading.Lock()  # `datasets` downloads from a thread pool

    # What tests set up
    def add_dataset(self, repo_id: str, files: dict[str, bytes], branch: str = "main", private=None,
                    title: str = "Upload dataset") -> str:
        """Commit `files` as the whole content of `branch` (made if new; the repo too, owned by its namespace,
        with the Hub's `.gitattributes`); `private` None keeps the repo's visibility. Returns the commit id."""
        repo = self.datasets.get(repo_id)
        if repo is None:
            repo = self.datasets[repo_id] = DatasetRepo(owner=repo_id.split("/")[0], private=bool(private))
        elif private is not None:
            repo.private = private
        snapshot = {".gitattributes": DATASET_GITATTRIBUTES, **{k: bytes(v) for k, v in files.items()}}
        self.cdn.update({hashlib.sha256(d).hexdigest(): d for p, d in snapshot.items()
                         if p.endswith(DATASET_LFS_SUFFIXES)})
        parent = repo.branches.get(branch, repo.branches.get("main"))
        oid = uuid.uuid4().hex + "00000000"
        repo.snapshots[oid] = snapshot
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        repo.log[oid] = {"parent": parent, "title": title, "date": date}
        repo.branches[branch] = oid
        return oid

    def tag_dataset(self, repo_id: str, tag: str, revision: str = "main") -> str:
        """Tag the commit that `revision` names; returns its id."""
        repo = self.datasets[repo_id]
        oid = repo.resolve(revision)
        if oid is None:
            raise KeyError(f"{repo_id} has no revision {revision}")
        repo.tags[tag] = oid
        return oid

    def dataset_calls(self) -> list[tuple[str, str]]:
        """(method, URL) of the requests about dataset repos: API, downloads, CDN, dataset viewer, in order."""
        return [(method, url) for method, url in self.urls
                if "/api/datasets/" in url or "/datasets/" in url or CDN_HOST in url or "datasets-server." in url]

    # What tests read
    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "GET" and not c[1].endswith("/api/validate-yaml")]

    # The server
    def handle(self, request):
        import httpx2

        with self._lock:
            self.calls.append((request.method, request.url.path))
            self.urls.append((request.method, str(request.url)))
        if self.down:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
        if request.url.host == "lfs.fake":
            return self._lfs_put(request)
        if request.url.host == CDN_HOST:
            return self._cdn(request)
        if request.url.host.startswith("datasets-server."):
            return httpx2.Response(404, json={"error": "Not found."})  # the viewer: nothing for these datasets
        if request.url.host == "s3.amazonaws.com":
            return httpx2.Response(404)  # datasets' download-count ping for a (long gone) script
        raw = request.url.raw_path.decode().split("?")[0]
        if raw.startswith(("/api/datasets/", "/datasets/")):
            return self._dataset_request(request, raw)
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

    # Dataset repositories
    def _dataset_request(self, request, raw):
        import httpx2

        def answer(status, body=None, headers=None):
            return httpx2.Response(status, json=body, headers=headers or {})

        segment = r"[^/]+"
        routes = [
            (("GET", "HEAD"), rf"/datasets/(?P<repo>{segment}/{segment})/resolve/(?P<rev>{segment})/(?P<file>.+)",
             self._dataset_resolve),
            (("GET",), rf"/api/datasets/(?P<repo>{segment}/{segment})(/revision/(?P<rev>{segment}))?",
             self._dataset_info),
            (("GET",), rf"/api/datasets/(?P<repo>{segment}/{segment})/tree/(?P<rev>{segment})(/(?P<folder>.+))?",
             self._dataset_tree),
            (("POST",), rf"/api/datasets/(?P<repo>{segment}/{segment})/paths-info/(?P<rev>{segment})",
             self._dataset_paths_info),
        ]
        for methods, pattern, handler in routes:
            match = re.fullmatch(pattern, raw)
            if match and request.method in methods:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                repo_id = args.pop("repo")
                repo, error = self._dataset_access(request, repo_id)
                if repo is None:
                    return error
                rev = args.pop("rev", "main")
                oid = repo.resolve(rev)
                if oid is None:
                    return answer(404, {"error": f"Invalid rev id: {rev}"}, {"x-error-code": "RevisionNotFound"})
                return handler(request, repo, repo_id, oid, **args)
        return answer(404, {"error": f"no route {request.method} {raw}"})

    def _dataset_access(self, request, repo_id):
        """(repo, None) if the request's token may read `repo_id`, else (None, the Hub's answer): a bad token
        401; a missing repo and a private one of others the same RepoNotFound, 401 anonymous, 404 with a token."""
        import httpx2

        auth = request.headers.get("authorization")
        if auth is not None and auth != f"Bearer {TOKEN}":
            message = "Invalid credentials in Authorization header"
            return None, httpx2.Response(401, json={"error": message}, headers={"x-error-message": message})
        repo = self.datasets.get(repo_id)
        if repo is None or (repo.private and (auth is None or repo.owner not in [self.user, *self.orgs])):
            return None, httpx2.Response(401 if auth is None else 404, json={"error": "Repository not found"},
                                         headers=NOT_FOUND)
        return repo, None

    @staticmethod
    def _file_entry(repo, oid, path, data, expand):
        entry = {"type": "file", "oid": _blob_id(_lfs_pointer(data) if path.endswith(DATASET_LFS_SUFFIXES) else data),
                 "size": len(data), "path": path}
        if path.endswith(DATASET_LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                            "pointerSize": len(_lfs_pointer(data))}
        if expand:
            last = repo.last_commit(oid, path)
            entry["lastCommit"] = {"id": last, "title": repo.log[last]["title"], "date": repo.log[last]["date"]}
            entry["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False},
                                           "pickleImportScan": None, "jFrogScan": None}
        return entry

    @staticmethod
    def _folder_entry(repo, oid, path, expand):
        files = sorted((p, d) for p, d in repo.snapshots[oid].items() if p.startswith(path + "/"))
        entry = {"type": "directory", "oid": hashlib.sha1(repr(files).encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            last = repo.last_commit(oid, path)
            entry["lastCommit"] = {"id": last, "title": repo.log[last]["title"], "date": repo.log[last]["date"]}
        return entry

    @staticmethod
    def _folders(files) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def _dataset_info(self, request, repo, repo_id, oid):
        import httpx2

        files = repo.snapshots[oid]
        blobs = _true(request.url.params.get("blobs"))
        siblings = []
        for path, data in sorted(files.items()):
            sibling = {"rfilename": path}
            if blobs:
                entry = self._file_entry(repo, oid, path, data, False)
                sibling.update(size=entry["size"], blobId=entry["oid"], **({"lfs": {
                    "sha256": entry["lfs"]["oid"], "size": entry["lfs"]["size"],
                    "pointerSize": entry["lfs"]["pointerSize"]}} if "lfs" in entry else {}))
            siblings.append(sibling)
        date = repo.log[oid]["date"]
        body = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo.owner,
                "sha": oid, "lastModified": date, "createdAt": date, "private": repo.private, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(len(d) for d in files.values())}
        card = _card_data(files["README.md"]) if "README.md" in files else None
        if card is not None:
            body["cardData"] = card
        return httpx2.Response(200, json=body)

    def _dataset_tree(self, request, repo, repo_id, oid, folder=""):
        """The Hub's tree: the folder's children (folders and files), or with `recursive` all below it; a file's
        path lists the file itself; a path that is not there is EntryNotFound."""
        import httpx2

        folder = folder.strip("/")
        files = repo.snapshots[oid]
        expand = _true(request.url.params.get("expand"))
        recursive = _true(request.url.params.get("recursive"))
        if folder in files:
            return httpx2.Response(200, json=[self._file_entry(repo, oid, folder, files[folder], expand)])
        prefix = folder + "/" if folder else ""
        if folder and not any(p.startswith(prefix) for p in files):
            return httpx2.Response(404, json={"error": f"{folder} does not exist on \"{oid}\""},
                                   headers={"x-error-code": "EntryNotFound"})
        below = {p: d for p, d in files.items() if p.startswith(prefix)}
        depth = lambda p: p[len(prefix):].count("/")  # noqa: E731
        folders = sorted(f for f in self._folders(below) if f.startswith(prefix) and (recursive or depth(f) == 0))
        entries = [self._folder_entry(repo, oid, f, expand) for f in folders]
        entries += [self._file_entry(repo, oid, p, d, expand) for p, d in sorted(below.items())
                    if recursive or depth(p) == 0]
        return httpx2.Response(200, json=entries)

    def _dataset_paths_info(self, request, repo, repo_id, oid):
        """POST form `paths` (repeated) and `expand`: the entries of those that exist, in order."""
        import httpx2

        form = parse_qs(request.content.decode())
        expand = _true(form.get("expand", ["false"])[0])
        files = repo.snapshots[oid]
        folders = self._folders(files)
        entries = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                entries.append(self._file_entry(repo, oid, path, files[path], expand))
            elif path in folders:
                entries.append(self._folder_entry(repo, oid, path, expand))
        return httpx2.Response(200, json=entries)

    def _dataset_resolve(self, request, repo, repo_id, oid, file):
        """A plain file: 200 with ETag its git blob id; an LFS file: 302 to the CDN with the headers the Hub
        sends (X-Linked-Etag the sha256, X-Linked-Size); X-Repo-Commit on every answer, 404s included."""
        import httpx2

        files = repo.snapshots[oid]
        if file not in files:
            return httpx2.Response(404, json={"error": "Entry not found"},
                                   headers={"x-error-code": "EntryNotFound", "x-repo-commit": oid})
        data = files[file]
        if not file.endswith(DATASET_LFS_SUFFIXES):
            return httpx2.Response(200, content=b"" if request.method == "HEAD" else data, headers={
                "x-repo-commit": oid, "etag": f'"{_blob_id(data)}"', "content-length": str(len(data))})
        sha256 = hashlib.sha256(data).hexdigest()
        return httpx2.Response(302, headers={
            "location": f"https://{CDN_HOST}/datasets/{repo_id}/{sha256}?X-Amz-Signature=fake",
            "x-repo-commit": oid, "etag": f'"{_blob_id(_lfs_pointer(data))}"', "x-linked-etag": f'"{sha256}"',
            "x-linked-size": str(len(data)), "content-length": "0"})

    def _cdn(self, request):
        """A signed LFS URL: the bytes; as S3 does, it refuses a request that also carries an Authorization."""
        import httpx2

        if "authorization" in request.headers:
            return httpx2.Response(400, text="Only one auth mechanism allowed")
        sha256 = request.url.path.rsplit("/", 1)[-1]
        if request.method not in ("GET", "HEAD") or sha256 not in self.cdn:
            return httpx2.Response(404 if sha256 not in self.cdn else 405)
        data = self.cdn[sha256]
        return httpx2.Response(200, content=b"" if request.method == "HEAD" else data,
                               headers={"etag": f'"{sha256}"', "content-length": str(len(data))})


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


def install_datasets(fake: FakeHub, monkeypatch, tmp_path) -> None:
    """`install`, and what `datasets.load_dataset` and the pipeline need besides: online for `datasets` too
    (its config read the environment at import time) and for the `HF_HUB_OFFLINE` the pipeline reads, and every
    cache (the hub's, datasets', its downloads and modules) under `tmp_path`, with no `HfFileSystem` instance
    (nor its listings) kept from another test. Call `uninstall_datasets` after."""
    import datasets.config
    from huggingface_hub import HfFileSystem, constants

    install(fake, monkeypatch, tmp_path)
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(home / "assets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted")
    HfFileSystem.clear_instance_cache()


def uninstall_datasets() -> None:
    from huggingface_hub import HfFileSystem

    HfFileSystem.clear_instance_cache()
    uninstall()
