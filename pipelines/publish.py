"""Publish an export on the Hugging Face Hub: at the end of training (`export.push_to_hub: true`) or later.

    python -m pipelines.publish runs/demo/ddpm --repo-id your-name/fashion-mnist-ddpm
    python -m pipelines.publish runs/x --best --repo-id your-name/x          # best/, to the branch "best"
    python -m pipelines.publish runs/x/snapshots/epoch_010 --repo-id your-name/x --revision epoch-10 --private

The token is the usual one (`hf auth login`, or `HF_TOKEN`). The export's folder is uploaded as it is
(weights, configs, the pipeline code, model card, sample grid), with the card's loading code naming
the repository. A push that fails says why and leaves the local export as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .config import check_repo_id  # noqa: F401 (also imported from here)
from .families import pipeline_class_name
from .model_card import write_model_card
from .rundir import export_folder


class PublishError(RuntimeError):
    """Why a push cannot be done; the local export is untouched."""


def resolve_export(path: str | Path, best: bool = False) -> Path:
    """The export folder meant by `path`: an export itself, or a run directory (its `pipeline/` or `best/`)."""
    path = Path(path)
    if best:
        if not (path / "best" / "model_index.json").is_file():
            raise PublishError(f"{path} has no best/ export (it is written by evaluation during training)")
        return path / "best"
    found = export_folder(path)
    if found is not None:
        return found
    raise PublishError(f"{path} is neither an export (no model_index.json) nor a run directory with pipeline/")


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the installed huggingface_hub raises when the Hub cannot be reached (its HTTP client varies by version)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        errors.append(getattr(mod, "TransportError", None) or mod.exceptions.RequestException)
    return tuple(errors)


def _why(err: BaseException, repo_id: str) -> str:
    """One line for a failure of the Hub or of the way to it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(err, LocalTokenNotFoundError):
        return "no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write access"
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing may be sent to the Hub; unset it where the network is reachable"
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        detail = getattr(err, "server_message", None) or str(err).splitlines()[0]
        if status == 401:
            return f"the Hub refused the token (401: {detail}); log in again with `hf auth login`"
        if status == 403:
            return (f"the Hub refused to write to {repo_id} (403: {detail}); the token needs write access to it "
                    "(a fine-grained token must list the repository or its organisation)")
        return f"the Hub answered {status}: {detail}"
    if isinstance(err, _network_errors()):
        return f"cannot reach the Hub at {constants.ENDPOINT} ({type(err).__name__}: {err})"
    return f"{type(err).__name__}: {err}"


class Hub:
    """The checks and calls of one push, through `huggingface_hub.HfApi` (the token from the usual login)."""

    def __init__(self, token: Optional[str] = None):
        from huggingface_hub import HfApi, constants, get_token

        if constants.HF_HUB_OFFLINE:
            raise PublishError("HF_HUB_OFFLINE is set, so nothing may be sent to the Hub; unset it where the "
                               "network is reachable, or publish later with python -m pipelines.publish")
        self.token = token or get_token()
        if not self.token:
            raise PublishError("no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write "
                               "access (pushing needs one; nothing was uploaded)")
        self.api = HfApi(token=self.token)

    def full_repo_id(self, repo_id: str) -> str:
        """`namespace/name`, checked to be writable by the token's user: theirs or one of their organisations'.

        Checked before anything is created, because `create_repo(exist_ok=True)` on another user's
        repository succeeds silently and only the upload is refused.
        """
        me = self.api.whoami()
        mine = [me["name"], *(org["name"] for org in me.get("orgs", []))]
        if "/" not in repo_id:
            return f"{me['name']}/{repo_id}"
        namespace = repo_id.split("/")[0]
        if namespace not in mine:
            raise PublishError(f"{repo_id} belongs to {namespace!r}, and this token is {me['name']!r}'s (namespaces "
                               f"it can write to: {', '.join(mine)}); choose a repo id such as "
                               f"{me['name']}/{repo_id.split('/')[1]}")
        return repo_id

    def push(self, export: Path, repo_id: str, *, private: Optional[bool], revision: Optional[str],
             message: Optional[str]) -> str:
        """Create the repository (and branch) if needed and upload the folder as one commit; returns its URL."""
        self.api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private:
            info = self.api.model_info(repo_id)
            if not info.private:
                raise PublishError(f"{repo_id} already exists and is public, but private=true was asked: nothing "
                                   "was uploaded. Make the repository private on the Hub first, or push with "
                                   "private=false")
        if revision and revision != "main":
            self.api.create_branch(repo_id, branch=revision, exist_ok=True)
        files = [p for p in export.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                          p.relative_to(export).parts)]
        # huggingface_hub draws its own bars on a terminal; elsewhere these two lines are the progress.
        print(f"uploading {len(files)} files ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB) to {repo_id}",
              flush=True)
        start = time.monotonic()
        commit = self.api.upload_folder(repo_id=repo_id, folder_path=str(export), revision=revision,
                                        commit_message=message or default_message(export),
                                        ignore_patterns=[".*", "**/.*"])  # no temporary files
        print(f"uploaded in {time.monotonic() - start:.0f} s", flush=True)
        return commit.commit_url


def default_message(export: Path) -> str:
    info = export / "training.json"
    trained = json.loads(info.read_text()) if info.is_file() else {}
    kind = pipeline_class_name(json.loads((export / "model_index.json").read_text()))
    return f"{kind}" + (f" after {trained['steps']} training steps" if "steps" in trained else "")


def publish(export: str | Path, repo_id: str, *, private: Optional[bool] = None, revision: Optional[str] = None,
            message: Optional[str] = None, token: Optional[str] = None) -> str:
    """Push one export folder to `repo_id` (created if missing) on `revision`; returns the commit URL.

    Raises `PublishError` with the reason and the command that retries. What is uploaded is a staging copy
    with the card that names `repo_id`: the export itself is never changed during the push, so a push killed
    midway (SIGTERM, Ctrl-C) leaves it as it was. Only after a successful upload is its card replaced by the
    pushed one.
    """
    import shlex
    import tempfile

    export = Path(export)
    # The retry repeats the visibility: without --private it would create the repository public.
    retry = (f"the export stays in {export}; push it later with: python -m pipelines.publish "
             f"{shlex.quote(str(export))} --repo-id {repo_id}" + (f" --revision {revision}" if revision else "")
             + ("" if private is None else " --private" if private else " --public"))
    try:
        check_repo_id(repo_id)
    except ValueError as err:
        raise PublishError(str(err)) from None
    try:
        hub = Hub(token)
        repo_id = hub.full_repo_id(repo_id)
        try:  # beside the export, so that hard links work; elsewhere where its folder is read-only
            staging_root = tempfile.TemporaryDirectory(prefix=f".{export.name}.push-", dir=export.parent)
        except OSError:
            staging_root = tempfile.TemporaryDirectory(prefix="publish-")
        with staging_root as tmp:
            staging = stage(export, Path(tmp) / export.name)
            write_model_card(staging, final=export, repo_id=repo_id, revision=revision)
            url = hub.push(staging, repo_id, private=private, revision=revision, message=message)
            pushed_card = (staging / "README.md").read_bytes()
    except Exception as err:
        if isinstance(err, PublishError):
            raise PublishError(f"{err}; {retry}") from None
        # The Hub's answers and the network's failures, by kind.
        raise PublishError(f"pushing to {repo_id} failed: {_why(err, repo_id)}; {retry}") from None
    try:  # the local card as pushed (it loads from the repository), replaced at once
        replace_bytes(export / "README.md", pushed_card)
    except OSError as err:  # pushed all the same: a read-only export keeps its card
        print(f"warning: pushed, but the local model card {export / 'README.md'} was not updated ({err})",
              file=sys.stderr)
    return url


def stage(export: Path, staging: Path) -> Path:
    """`export` as the folder `staging`: hard links (no bytes copied) where the filesystem allows them, else
    copies; without dot files (temporary files). Its README.md is unlinked, so that a card written there is a
    new file and never the export's own."""
    import shutil

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(src, dst)

    shutil.copytree(export, staging, copy_function=link_or_copy, ignore=shutil.ignore_patterns(".*"))
    (staging / "README.md").unlink(missing_ok=True)
    return staging


def replace_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_can_push(export_cfg) -> None:
    """Before training: what can be known without uploading (a token, not offline, the namespace), so a
    long run does not end in a push that was bound to fail. The Hub unreachable now is only a warning."""
    if not export_cfg.push_to_hub:
        return
    try:
        hub = Hub()
        hub.full_repo_id(export_cfg.hub_model_id)
    except PublishError as err:
        raise PublishError(f"export.push_to_hub: {err}") from None
    except Exception as err:
        print(f"warning: export.push_to_hub: {_why(err, export_cfg.hub_model_id)}; training goes on, and the push "
              "is tried at the end", file=sys.stderr)


def push_run(run_dir: Path, export_cfg) -> list[str]:
    """The end of a training with `export.push_to_hub`: the final export, then `best/` if asked."""
    urls = [publish(run_dir / "pipeline", export_cfg.hub_model_id, private=export_cfg.private,
                    revision=export_cfg.hub_revision)]
    print(f"pushed pipeline/ to the Hub: {urls[-1]}")
    if export_cfg.push_best:
        if not (run_dir / "best" / "model_index.json").is_file():
            raise PublishError(f"export.push_best: {run_dir}/best does not exist (no evaluation has finished)")
        urls.append(publish(run_dir / "best", export_cfg.hub_model_id, private=export_cfg.private,
                            revision=export_cfg.best_revision))
        print(f"pushed best/ to the Hub: {urls[-1]}")
    return urls


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="an export folder, or a run directory (its pipeline/)")
    p.add_argument("--repo-id", required=True, help="'your-name/name', 'org/name', or 'name' (under your user)")
    p.add_argument("--best", action="store_true", help="push the run's best/ (to the branch 'best' by default)")
    p.add_argument("--revision", help="the branch, created when missing (default: main; 'best' with --best)")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="create the repository private (an existing public one is refused)")
    visibility.add_argument("--public", dest="private", action="store_false")
    p.add_argument("--message", help="the commit message (default: the pipeline and its training steps)")
    args = p.parse_args(argv)
    try:
        export = resolve_export(args.export, args.best)
        revision = args.revision or ("best" if args.best else None)
        url = publish(export, args.repo_id, private=args.private, revision=revision, message=args.message)
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {export} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
