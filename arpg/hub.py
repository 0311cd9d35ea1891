"""The published weights by name, through the Hugging Face cache.

`MODELS` and `TOKENIZERS` name the files the ARPG authors and LlamaGen publish. `resolve` turns a
published name into a local file with `huggingface_hub.hf_hub_download`, so its cache (`HF_HOME`,
`HF_HUB_CACHE`), offline mode (`HF_HUB_OFFLINE=1`) and a `revision` are honoured, and checks the file:
its size and SHA-256 where they are recorded here for the pinned revision. Until they are (no entry
pins one yet: the recorded figures must come from the published files themselves), the loaders'
strict name/shape check is the check. `load_checkpoint` and `load_vq` call `resolve` for a name that is
not an existing file, so a local path always wins. huggingface_hub is needed only to fetch by name.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

from .checkpoint import CheckpointError

__all__ = ["MODELS", "RECOMMENDED", "TOKENIZERS", "HubError", "Published", "lookup", "resolve", "resolve_name"]


@dataclass(frozen=True)
class Published:
    """A published file: where it lives and what it fits (a name in arpg.config.CONFIGS or arpg.vq.VQ_CONFIGS)."""

    repo_id: str
    filename: str
    config: str
    revision: Optional[str] = None  # a pinned commit; None: the repository's main branch
    size: Optional[int] = None  # bytes at that revision, once recorded
    sha256: Optional[str] = None


MODELS: dict[str, Published] = {
    "ARPG-L": Published("hp-l33/ARPG", "arpg_300m.pt", "ARPG-L"),
    "ARPG-XL": Published("hp-l33/ARPG", "arpg_700m.pt", "ARPG-XL"),
    "ARPG-XXL": Published("hp-l33/ARPG", "arpg_1b.pt", "ARPG-XXL"),
}
TOKENIZERS: dict[str, Published] = {
    "VQ-16": Published("FoundationVision/LlamaGen", "vq_ds16_c2i.pt", "VQ-16"),
}
# The original's model zoo: 64 steps, the arccos schedule of its reproduction script, CFG per size
# (the paper's ARPG-L figure, 4.5, is with the cosine schedule).
RECOMMENDED: dict[str, dict] = {
    "ARPG-L": dict(num_steps=64, cfg_scale=5.0, sample_schedule="arccos"),
    "ARPG-XL": dict(num_steps=64, cfg_scale=6.0, sample_schedule="arccos"),
    "ARPG-XXL": dict(num_steps=64, cfg_scale=7.5, sample_schedule="arccos"),
}


class HubError(CheckpointError):
    """A published file that cannot be had (not cached and not reachable) or fails its check; one line."""


def lookup(name: str, table: dict[str, Published]) -> Optional[tuple[str, Published]]:
    """(canonical name, entry) for a published name in `table`, any letter case; None otherwise."""
    folded = {key.lower(): key for key in table}
    key = folded.get(str(name).lower())
    return None if key is None else (key, table[key])


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str, entry: Published, name: str) -> None:
    """Size, then SHA-256, against the recorded figures (those not recorded are not checked)."""
    again = "fetch it again (hf_hub_download(..., force_download=True)) or delete it from the cache"
    size = os.path.getsize(path)
    if entry.size is not None and size != entry.size:
        raise HubError(f"{name}: {path} has {size} bytes, the published file {entry.size}: "
                       f"the download is incomplete or damaged; {again}")
    if entry.sha256 is not None and _sha256(path) != entry.sha256.lower():
        raise HubError(f"{name}: {path} does not have the published SHA-256 ({entry.sha256}): "
                       f"the file is damaged or another revision; {again}")


def resolve(name: str, entry: Published, revision: Optional[str] = None) -> str:
    """The local path of a published file, fetched into (or found in) the Hugging Face cache, checked."""
    try:
        from huggingface_hub import constants, errors, hf_hub_download
    except ImportError:
        raise HubError(f"{name}: fetching published weights by name needs huggingface_hub "
                       "(pip install huggingface_hub); or pass the path of a local file") from None
    rev = revision or entry.revision or "main"
    where = f"{entry.filename} of {entry.repo_id} (revision {rev})"
    try:
        path = hf_hub_download(entry.repo_id, entry.filename, revision=rev)
    except errors.LocalEntryNotFoundError:
        why = ("offline mode is on (HF_HUB_OFFLINE)" if constants.is_offline_mode()
               else "the Hugging Face Hub could not be reached")
        raise HubError(f"{name}: {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                       "fetch it once where the Hub is reachable, or pass the path of a local file") from None
    except (errors.HfHubHTTPError, errors.EntryNotFoundError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HubError(f"{name}: could not fetch {where}: {first}") from None
    verify(path, entry, name)
    return path


def resolve_name(path: str, table: dict[str, Published], kind: str,
                 revision: Optional[str] = None) -> tuple[str, Optional[Published]]:
    """(local path, entry) for an existing file (entry None) or a published name of `table`; kind
    ("model", "tokenizer") names the table in the error for neither."""
    if os.path.exists(path):
        return path, None
    found = lookup(path, table)
    if found is None:
        raise FileNotFoundError(f"{path}: no such file, and not a published {kind} name (published: {', '.join(table)})")
    name, entry = found
    return resolve(name, entry, revision), entry
