"""A repo id as SRC, resolved offline from a Hugging Face cache laid out as huggingface_hub writes it.

The cache is built on disk around the bundled fixture: ``blobs/<hash>`` files, ``snapshots/<commit>/``
symbolic links into them, ``refs/<branch>`` naming the commit.  No test touches the network (sockets
are refused while resolving) and none uses ``--download``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import gguf
import pytest
from typer.testing import CliRunner

from conftest import FIXTURE
from quantkit.cli.main import app
from quantkit.errors import CheckpointError
from quantkit.hf.hub_cache import hub_cache_dir, parse_repo_id, repo_of_snapshot, resolve_source
from quantkit.pipeline.convert import convert

REPO = "test-org/tiny-mixtral"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


def make_cache(hub: Path, repo: str, commit: str, src: Path, refs: tuple[str, ...] = ("main",), drop: tuple[str, ...] = ()) -> Path:
    """``src``'s files as huggingface_hub caches ``repo`` at ``commit``: content-addressed blobs, relative symlinks."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name in drop or not f.is_file():
            continue
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An HF cache holding REPO at COMMIT (refs/main), selected through $HF_HUB_CACHE; sockets refused."""
    cache = tmp_path / "hub"
    make_cache(cache, REPO, COMMIT, FIXTURE)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # offline because quantkit asks for the cache only, not because of the environment
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("network access while resolving a cached repo id")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


def _invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)


def _said(r) -> str:
    return " ".join(r.output.replace("│", " ").split())


@pytest.mark.parametrize("text,want", [
    ("Qwen/Qwen3-30B-A3B", ("Qwen/Qwen3-30B-A3B", None)),
    ("Qwen/Qwen3-30B-A3B@main", ("Qwen/Qwen3-30B-A3B", "main")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("mistralai/Mixtral-8x7B-v0.1@" + COMMIT, ("mistralai/Mixtral-8x7B-v0.1", COMMIT)),
    ("gpt2", None),  # no namespace: a (missing) local directory, never looked up
    ("./org/name", None), ("/abs/org/name", None), ("a/b/c", None), ("org/../name", None), ("org--x/name", None),
    ("org/name.git", None), ("org/", None), ("org/name@", None),
])
def test_repo_id_spelling(text, want):
    assert parse_repo_id(text) == want


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere"


def test_repo_id_resolves_to_the_snapshot(hub):
    snap = resolve_source(REPO)
    assert snap == hub / "models--test-org--tiny-mixtral" / "snapshots" / COMMIT
    assert (snap / "config.json").is_symlink() and (snap / "config.json").resolve().parent.name == "blobs"
    assert repo_of_snapshot(snap) == REPO
    assert resolve_source(f"{REPO}@{COMMIT}") == snap
    assert resolve_source(f"{REPO}@main") == snap


def test_convert_from_a_repo_id_equals_converting_the_directory(hub, tmp_path):
    a = convert(REPO, tmp_path / "repo.gguf", "q8_0")
    b = convert(FIXTURE, tmp_path / "dir.gguf", "q8_0")
    ra, rb = gguf.GGUFReader(tmp_path / "repo.gguf"), gguf.GGUFReader(tmp_path / "dir.gguf")
    assert [(t.name, bytes(t.data)) for t in ra.tensors] == [(t.name, bytes(t.data)) for t in rb.tensors]
    md_a = {k: f.contents() for k, f in ra.fields.items() if not k.startswith("GGUF.")}
    md_b = {k: f.contents() for k, f in rb.fields.items() if not k.startswith("GGUF.")}
    # the name is the repo's (the snapshot directory is named after a commit), and the file says where it came from
    assert md_a.pop("general.source.repo_url") == f"https://huggingface.co/{REPO}"
    assert md_a == md_b and md_a["general.name"] == "tiny-mixtral"
    assert a.n_tensors == b.n_tensors


def test_revision_picks_its_snapshot(hub, tmp_path):
    other_src = tmp_path / "other-src"
    other_src.mkdir()
    for f in FIXTURE.iterdir():
        if f.is_file():
            (other_src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other_src / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6  # another revision of the same repo
    (other_src / "config.json").write_text(json.dumps(cfg))
    snap = make_cache(hub, REPO, OTHER, other_src, refs=("v2",))  # shares every blob but config.json with the first
    assert resolve_source(f"{REPO}@v2") == snap
    assert resolve_source(f"{REPO}@{OTHER}") == snap
    assert resolve_source(REPO).name == COMMIT  # main still names the first
    convert(f"{REPO}@v2", tmp_path / "v2.gguf", "f16")
    assert gguf.GGUFReader(tmp_path / "v2.gguf").fields["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-6)


def test_a_repo_not_in_the_cache_says_how_to_download_it(hub, tmp_path):
    with pytest.raises(CheckpointError) as e:
        resolve_source("test-org/missing")
    msg = str(e.value)
    assert "\n" not in msg and "no snapshot of test-org/missing in the local Hugging Face cache" in msg and str(hub) in msg
    assert "`hf download test-org/missing`" in msg and "--download" in msg
    with pytest.raises(CheckpointError, match=r"at revision v9 .*`hf download test-org/tiny-mixtral --revision v9`"):
        resolve_source(f"{REPO}@v9")
    r = _invoke(["convert", "test-org/missing", "-o", tmp_path / "m.gguf"])
    assert r.exit_code == 1 and "hf download test-org/missing" in _said(r)
    assert not (tmp_path / "m.gguf").exists()
    assert list(hub.iterdir()) == [hub / "models--test-org--tiny-mixtral"]  # nothing was created in the cache


def test_a_local_directory_of_the_same_name_wins(hub, tmp_path):
    local = tmp_path / "test-org" / "tiny-mixtral"
    local.mkdir(parents=True)
    for f in FIXTURE.iterdir():
        if f.is_file():
            (local / f.name).write_bytes(f.read_bytes())
    assert resolve_source(REPO) == Path(REPO)  # relative to the working directory, which holds it
    convert(REPO, tmp_path / "m.gguf", "f16")
    assert "general.source.repo_url" not in gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert "local directory of that name wins" in _said(_invoke(["convert", "--help"]))


def test_cli_convert_and_plan_take_a_repo_id(hub, tmp_path):
    r = _invoke(["plan", REPO, "--type", "Q4_K_M", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["type"] == "Q4_K_M"
    r = _invoke(["convert", f"{REPO}@main", "-o", tmp_path / "m.gguf", "--type", "q8_0", "--json"])
    assert r.exit_code == 0, r.output
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents() == "tiny-mixtral"


def test_an_incomplete_snapshot_is_named(hub, tmp_path):
    """A snapshot without its weights (an interrupted download): the checkpoint reader's one line names the snapshot."""
    make_cache(hub, "test-org/partial", COMMIT, FIXTURE, drop=("model.safetensors",))
    with pytest.raises(CheckpointError) as e:
        convert("test-org/partial", tmp_path / "m.gguf", "f16")
    assert "models--test-org--partial" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()
