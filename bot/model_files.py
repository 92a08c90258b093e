"""Model folders on disk: what makes one whole, and its checksum (the ground the store,
the registry and the gate stand on).

A version's folder is checked before it is registered (:func:`check_folder`) and again,
with the checksum taken at registration, before it is served (:func:`verify_folder`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from bot.errors import InvalidInput, RapportError

if TYPE_CHECKING:  # the store imports this module; the type is all this one needs
    from bot.store import Store


class ModelRejected(RapportError):
    """A model folder that must not be served (missing files, changed, fails the gate)."""


def folder_checksum(folder: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"model folder {folder} does not exist")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _missing_files(folder: Path) -> list[str]:
    weights_dir = folder
    missing = [
        str(p.relative_to(folder))
        for p in (weights_dir / "config.json", weights_dir / "tokenizer_config.json")
        if not p.exists()
    ]
    if not any(weights_dir.glob("*.safetensors")) and not any(weights_dir.glob("*.bin")):
        missing.append(str((weights_dir / "*.safetensors").relative_to(folder)))
    return missing


def check_folder(folder: Path, version: str) -> None:
    """Refuse a folder that is not a whole model (before it is registered or served)."""
    if not folder.is_dir():
        raise ModelRejected(f"refused {version}: its folder {folder} does not exist")
    missing = _missing_files(folder)
    if missing:
        raise ModelRejected(f"refused {version}: {folder} is missing {', '.join(missing)}")


def verify_folder(store: Store, version: str) -> Path:
    """The version's folder, after checking its files are there and unchanged."""
    row = store.model(version)
    folder = Path(row["path"])
    check_folder(folder, version)
    if row["checksum"] and folder_checksum(folder) != row["checksum"]:
        raise ModelRejected(
            f"refused {version}: the files in {folder} changed since it was registered "
            "(checksum mismatch)"
        )
    return folder
