"""A Hugging Face repo id as a model source, resolved offline from the local Hugging Face cache.

``Qwen/Qwen3-30B-A3B`` (optionally ``@revision``: a branch, tag or commit hash) names the
snapshot directory huggingface_hub keeps under ``$HF_HUB_CACHE`` (else ``$HF_HOME/hub``,
else ``~/.cache/huggingface/hub``): ``models--Qwen--Qwen3-30B-A3B/snapshots/<commit>/``,
whose files are symbolic links into ``blobs/``, with ``refs/<branch>`` naming the commit.
Resolution goes through huggingface_hub's own offline lookup (``snapshot_download`` with
``local_files_only=True``): nothing is downloaded unless :func:`resolve_source` is called
with ``download=True`` (the CLI's ``--download``).  A local path that exists always wins
over a repo id of the same spelling.

Not for: reading checkpoints (``quantkit.hf.checkpoint`` reads the snapshot directory like any other).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from quantkit.errors import CheckpointError

#: ``namespace/name`` with an optional ``@revision``, as the Hub spells repo ids (huggingface_hub's validate_repo_id)
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[\w./-]{1,255}))?")
#: a snapshot directory of the cache: .../models--<namespace>--<name>/snapshots/<commit>
_SNAPSHOT = re.compile(r"models--(?P<ns>[^/]+?)--(?P<name>[^/]+)")
#: what ``--download`` fetches: configuration, safetensors weights, tokenizer, model card and licence (no pickles, no
#: duplicate "original/" or consolidated weights of other runtimes)
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.md", "LICENSE*", "*.txt")


def hub_cache_dir() -> Path:
    """The cache huggingface_hub uses, read from the environment now (not when huggingface_hub was imported)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expanduser(os.environ[var]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def parse_repo_id(src: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``src`` is spelled like a repo id (``namespace/name[@revision]``), else None."""
    m = _REPO_ID.fullmatch(src)
    if m is None:
        return None
    repo, rev = m.group("repo"), m.group("rev")
    if ".." in repo or "--" in repo or repo.endswith((".git", ".")) or (rev is not None and ".." in rev):
        return None
    return repo, rev


def download_command(repo: str, rev: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {rev}" if rev else "")


def resolve_source(src: str | Path, download: bool = False) -> Path:
    """``src`` as a local path: itself when it exists (or is not spelled like a repo id), else the cached snapshot.

    A repo id not in the cache is a :class:`CheckpointError` with the command that downloads it;
    ``download=True`` fetches the checkpoint's files into the cache first (the only network access).
    """
    path = Path(src)
    if os.path.lexists(path):
        return path
    parsed = parse_repo_id(os.fspath(src))
    if parsed is None:
        return path  # a missing path: the checkpoint reader says so, naming it
    repo, rev = parsed
    cache = hub_cache_dir()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{src}: no such directory; reading it from the Hugging Face cache needs huggingface_hub; "
                              "fix: pip install huggingface_hub, or pass the model directory") from None
    try:
        got = snapshot_download(repo, revision=rev, cache_dir=str(cache), local_files_only=not download,
                                allow_patterns=list(DOWNLOAD_PATTERNS) if download else None)
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{src}: no such directory, and no snapshot of {repo}" + (f" at revision {rev}" if rev else "") + f" in the local Hugging Face cache ({cache}); "
            f"fix: download it with `{download_command(repo, rev)}` (or rerun with --download), or pass the model directory"
        ) from None
    except Exception as e:  # a download that failed (network, authentication, unknown repo) or a broken cache entry
        what = "downloading" if download else "reading the Hugging Face cache for"
        raise CheckpointError(f"{src}: {what} {repo} failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                              f"fix: check the repo id and revision, or download it with `{download_command(repo, rev)}`") from None
    return Path(got)


def repo_of_snapshot(path: str | Path) -> str | None:
    """``namespace/name`` when ``path`` is a snapshot directory of a Hugging Face cache (``models--ns--name/snapshots/<commit>``)."""
    p = Path(os.path.abspath(path))
    if p.parent.name != "snapshots":
        return None
    m = _SNAPSHOT.fullmatch(p.parent.parent.name)
    return f"{m.group('ns')}/{m.group('name')}" if m else None
