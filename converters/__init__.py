"""One converter module per Hugging Face ``model_type``.

Each module exposes ``MODEL_TYPE``, ``ARCH`` (the GGUF architecture), ``IGNORE``,
``Hparams``, ``rules(names)`` (its name table), ``check_hparams``,
``generated_tensors`` and ``metadata``.  Installed as ``quantkit.converters``.
"""

from __future__ import annotations

from types import ModuleType

from quantkit.converters import llama, mistral, mixtral
from quantkit.errors import CheckpointError

CONVERTERS: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (mixtral, mistral, llama)}


def for_model_type(model_type: str, where: str = "config.json") -> ModuleType:
    try:
        return CONVERTERS[model_type]
    except KeyError:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(CONVERTERS))}); fix: convert a model of a supported architecture"
        ) from None
