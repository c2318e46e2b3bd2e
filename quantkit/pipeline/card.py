"""``quantkit card``: the README.md (model card) a Hugging Face repository of GGUF files needs.

From the GGUF itself (a split set by its first part: every part is listed): a YAML header
(``base_model``, ``base_model_relation: quantized``, ``license``, ``tags: [gguf, quantized]``,
``quantized_by: quantkit``), the command that made the file (``quantkit.command``, recorded by
``quantkit convert --model-card``), the files and their sizes, the bits per weight per tensor
group (what ``quantkit inspect`` computes), and, given the report of ``quantkit eval kld --json``,
its quality numbers.  ``base_model`` comes from the file (``general.source.repo_url``, written
when the source came from the Hugging Face cache) or the source checkpoint (a cache snapshot, or
``_name_or_path`` in its config.json); the licence from the file (``general.license``) or the
source's README.md front matter.

Every string taken from a file is untrusted: YAML values are quoted when they are not plain
identifiers, Markdown text is escaped, nothing is emitted as HTML.

Not for: evaluating (``quantkit eval kld``), validating eval reports (the CLI checks them with
``quantkit.evals.gate.load_json`` before they get here).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit import __version__
from quantkit.errors import CheckpointError, OutputError
from quantkit.format import gguf_spec
from quantkit.format.gguf_read import GGUFFile, read_gguf, to_json
from quantkit.format.output import atomic_file, check_target
from quantkit.hf.hub_cache import parse_repo_id, repo_of_snapshot, resolve_source

log = logging.getLogger(__name__)
COMMAND_KEY = "quantkit.command"  # the command line that made the file, written by quantkit convert --model-card
_HF_URL = re.compile(r"https://huggingface\.co/(?P<repo>[^/?#\s]+/[^/?#\s]+)/?")
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")  # a YAML value that needs no quotes (no ': ', '#', leading '-')
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|~])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
MAX_TEXT = 300  # characters of any one string from a file shown in the card
MAX_COMMAND = 8000  # characters of the recorded command


@dataclass(frozen=True)
class Card:
    """What the card says, before it is rendered (the Python API's view; :meth:`render` gives the README)."""

    name: str
    base_model: str | None
    license: str | None
    license_name: str | None
    license_link: str | None
    file_type: str
    arch: str
    size_label: str | None
    command: str | None
    files: list[tuple[str, int]]  # (file name, bytes): every part of a split set
    groups: dict[str, dict[str, float]]
    totals: dict[str, Any]
    imatrix: str | None = None
    kld: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def header(self) -> dict[str, Any]:
        h: dict[str, Any] = {}
        if self.base_model:
            h["base_model"] = self.base_model
            h["base_model_relation"] = "quantized"
        if self.license:
            h["license"] = self.license
            if self.license_name:
                h["license_name"] = self.license_name
            if self.license_link:
                h["license_link"] = self.license_link
        h["tags"] = ["gguf", "quantized"]
        h["quantized_by"] = "quantkit"
        return h

    def render(self) -> str:
        lines = ["---", *(_yaml(k, v) for k, v in self.header().items()), "---", ""]
        title = f"{_md(self.name)} GGUF ({_md(self.file_type)})"
        lines += [f"# {title}", ""]
        src = f"[{_md(self.base_model)}](https://huggingface.co/{self.base_model})" if self.base_model else _md(self.name)
        lines += [f"{src} in llama.cpp's GGUF format, {_md(self.file_type)}, made with quantkit {__version__}"
                  f" (architecture `{_code(self.arch)}`" + (f", {_md(self.size_label)}" if self.size_label else "") + ").", ""]
        lines += ["## Files", "", "| file | size |", "|---|---:|"]
        lines += [f"| {_md(name)} | {_size(n)} |" for name, n in self.files]
        if len(self.files) > 1:
            lines += [f"| **total** ({len(self.files)} parts) | {_size(sum(n for _, n in self.files))} |", "",
                      f"A split set: give llama.cpp the first part (`{_code(self.files[0][0])}`), it loads the others from the same directory."]
        lines += ["", "## How it was made", ""]
        if self.command:
            command = _CONTROL.sub(" ", self.command)[:MAX_COMMAND]  # one line: nothing escapes the code block
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", command)), default=0))
            lines += [fence + "sh", command, fence]
        else:
            lines += [f"Type {_md(self.file_type)} (`general.file_type`); the exact command was not recorded (convert with `--model-card` to record it)."]
        if self.imatrix:
            lines += ["", f"Quantised with an importance matrix (`{_code(self.imatrix)}`)."]
        lines += ["", "## Bits per weight", "", "| tensor group | tensors | parameters | bytes | bits per weight |", "|---|---:|---:|---:|---:|"]
        for group, g in self.groups.items():
            lines.append(f"| {_md(group)} | {g['tensors']} | {g['params']:,} | {g['bytes']:,} | {g['bits_per_weight']:.3f} |")
        t = self.totals
        lines.append(f"| **total** | {t['tensors']} | {t['params']:,} | {t['bytes']:,} | {t['bits_per_weight']:.3f} |")
        if self.kld is not None:
            lines += ["", *_kld_section(self.kld)]
        return "\n".join(lines) + "\n"


def _kld_section(r: dict[str, Any]) -> list[str]:
    """The eval numbers of a ``quantkit eval kld`` report (already validated by the CLI)."""
    s = r.get("setup", {})
    base = Path(str(s.get("base", "base"))).name
    lines = ["## Quality", "",
             f"Measured with `quantkit eval kld` against {_md(base)} on {s.get('n_chunks', '?')} chunks of {s.get('n_ctx', '?')} tokens "
             f"({s.get('n_positions', '?')} scored positions; text SHA-256 `{_code(str(s.get('text_sha256', ''))[:16])}`…).", "",
             "| metric | value |", "|---|---:|"]

    def row(label: str, key: str, fmt: str = ".4f", err: str | None = None) -> None:
        v = r.get(key)
        if isinstance(v, (int, float)):
            e = r.get(err) if err else None
            lines.append(f"| {label} | {v:{fmt}}" + (f" ± {e:{fmt}}" if isinstance(e, (int, float)) else "") + " |")

    row("mean KL divergence", "kld_mean", ".6f", "kld_mean_stderr")
    row("99th percentile KLD", "kld_p99", ".6f")
    row("median KLD", "kld_median", ".6f")
    row("same top token", "same_top", ".4f", "same_top_stderr")
    row("perplexity (base)", "ppl_base", ".4f")
    row("perplexity", "ppl", ".4f")
    row("perplexity ratio", "ppl_ratio", ".5f")
    routing = r.get("routing")
    if isinstance(routing, dict):
        for label, key in (("MoE routing: top-k sets equal", "topk_exact"), ("MoE routing: top-1 expert equal", "top1"), ("MoE routing: router KLD", "router_kld")):
            v = routing.get(key)
            if isinstance(v, (int, float)):
                lines.append(f"| {label} | {v:.4f} |")
    return lines


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**9 else f"{n / 1e6:.2f} MB" if n >= 10**6 else f"{n:,} bytes"


def _clean(value: Any) -> str:
    return _CONTROL.sub(" ", str(value))[:MAX_TEXT]


def _md(value: Any) -> str:
    """Untrusted text as Markdown text: one line, every character Markdown or HTML would interpret escaped."""
    return _MD_SPECIAL.sub(r"\\\1", _clean(value))


def _code(value: Any) -> str:
    """Untrusted text for an inline code span (no backticks, one line)."""
    return _clean(value).replace("`", "'")


def _yaml(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{key}:\n" + "\n".join(f"- {_yaml_scalar(v)}" for v in value)
    return f"{key}: {_yaml_scalar(value)}"


def _yaml_scalar(value: Any) -> str:
    s = _clean(value)
    return s if _PLAIN.fullmatch(s) and s.lower() not in ("true", "false", "null", "yes", "no", "on", "off", "~") else json.dumps(s)


def _text(g: GGUFFile, key: str) -> str | None:
    v = g.metadata.get(key)
    return v.strip() if isinstance(v, str) and v.strip() else None


def _file_type(g: GGUFFile) -> str:
    v = g.metadata.get(gguf_spec.Keys.General.FILE_TYPE)
    try:
        name = gguf_spec.LlamaFileType(int(v)).name  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "unknown type"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _repo_from_url(url: str | None) -> str | None:
    m = _HF_URL.fullmatch(url) if url else None
    return m.group("repo") if m and parse_repo_id(m.group("repo")) else None


def source_info(source: str | Path) -> dict[str, str]:
    """base_model and licence from a source checkpoint: a directory or a repo id in the local Hugging Face cache."""
    path = resolve_source(source)
    if not path.is_dir():
        raise CheckpointError(f"{source}: --source must be the Hugging Face model directory (or cached repo id) the GGUF was made from; fix: check the path")
    info: dict[str, str] = {}
    repo = repo_of_snapshot(path) or (os.fspath(source) if parse_repo_id(os.fspath(source)) and not os.path.lexists(source) else None)
    if repo is None:
        try:
            given = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            given = None
        if isinstance(given, str) and parse_repo_id(given) and not os.path.isabs(given):
            repo = given
    if repo:
        info["base_model"] = repo.split("@")[0]
    info.update(readme_license(path / "README.md"))
    return info


def readme_license(readme: Path) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link``) from a model card's YAML front matter (top-level keys only)."""
    try:
        with open(readme, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return {}
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out: dict[str, str] = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        m = re.fullmatch(r"(license|license_name|license_link):\s*(.*?)\s*", line)
        if m and m.group(2):
            out[m.group(1)] = m.group(2).strip("'\"")
    return out


def make_card(gguf: str | Path, source: str | Path | None = None, kld: dict[str, Any] | None = None, base_model: str | None = None) -> Card:
    """The card of ``gguf`` (a split set by its first part), with what ``source`` and a kld report add."""
    g = read_gguf(gguf)
    K = gguf_spec.Keys.General
    info = source_info(source) if source is not None else {}
    notes: list[str] = []
    if base_model is not None and not parse_repo_id(base_model):
        raise CheckpointError(f"--base-model {base_model[:100]!r}: expected a Hugging Face repo id such as Qwen/Qwen3-30B-A3B; fix: pass the source model's repo id")
    base = base_model or _repo_from_url(_text(g, K.SOURCE_REPO_URL)) or info.get("base_model")
    if base is None:
        notes.append("base_model unknown (not recorded in the file); pass --base-model ORG/NAME or --source DIR")
    lic = _text(g, K.LICENSE) or info.get("license")
    if lic is None:
        notes.append("license unknown (no general.license in the file, no license in the source's README.md); pass --source DIR")
    if kld is not None:
        named = Path(str(kld.get("setup", {}).get("model", ""))).name
        if named and named not in {f.path.name for f in g.files}:
            notes.append(f"the eval report measured {named[:100]!r}, not {g.path.name!r}: check it is the same file")
    j = to_json(g)
    return Card(
        name=_text(g, K.NAME) or g.path.name.removesuffix(".gguf"),
        base_model=base,
        license=lic,
        license_name=_text(g, "general.license.name") or info.get("license_name"),
        license_link=_text(g, "general.license.link") or info.get("license_link"),
        file_type=_file_type(g),
        arch=_text(g, K.ARCHITECTURE) or "unknown",
        size_label=_text(g, K.SIZE_LABEL),
        command=_text(g, COMMAND_KEY),
        files=[(f.path.name, f.file_size) for f in g.files],
        groups=j["groups"],
        totals=j["totals"],
        imatrix=_text(g, "quantize.imatrix.file"),
        kld=kld,
        notes=notes,
    )


def write_card(
    gguf: str | Path, out: str | Path | None = None, force: bool = False, source: str | Path | None = None,
    kld: dict[str, Any] | None = None, base_model: str | None = None, inputs: tuple[Path, ...] = (),
) -> tuple[Path, Card]:
    """Write the card of ``gguf`` to ``out`` (default: README.md beside it), atomically; each note is logged as a warning."""
    gguf = Path(gguf)
    out = Path(out) if out is not None else gguf.parent / "README.md"
    if out.suffix.lower() == ".gguf":
        raise OutputError(f"{out}: a model card is Markdown, not GGUF; fix: write it to README.md")
    check_target(out, force, inputs=(gguf, *inputs))
    card = make_card(gguf, source, kld, base_model)
    check_target(out, force, inputs=tuple(gguf.parent / f for f, _ in card.files))  # not one of the parts either
    for note in card.notes:
        log.warning("%s", note)
    with atomic_file(out, force=force) as tmp:
        tmp.write_text(card.render(), encoding="utf-8")
    return out, card
