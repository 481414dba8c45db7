"""How a phantom is named: its case id, and the stand-in path ``phantom:SEED:INDEX``.

A phantom is fully determined by (seed, index), so a manifest may name one instead of storing
its image; these names sit below the generator so both ``case`` and ``corpus`` can use them.
"""

from __future__ import annotations

from pathlib import Path

#: The image column of a manifest whose phantoms were not written to disk (``medfinder.recipe``):
#: ``phantom:SEED:INDEX``, painted again when it is loaded (``phantom_volume``).
PHANTOM_SCHEME = "phantom"


def phantom_case_id(seed: int, index: int) -> str:
    """Case ``index`` of corpus ``seed``'s id; it also decides the case's split (``split_of``)."""
    return f"phantom-{seed}-{index:05d}"


def phantom_path(seed: int, index: int) -> Path:
    """The stand-in image path of phantom ``index`` of corpus ``seed`` (see ``phantom_volume``)."""
    return Path(f"{PHANTOM_SCHEME}:{seed}:{index}")


def phantom_address(path: str | Path) -> tuple[int, int] | None:
    """(seed, index) of a phantom path, or None if ``path`` is not one."""
    # read_manifest puts the manifest's folder in front, so only the last part counts
    parts = Path(path).name.split(":")
    if len(parts) != 3 or parts[0] != PHANTOM_SCHEME:
        return None
    try:
        seed, index = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    return (seed, index) if seed >= 0 and index >= 0 else None


def is_phantom_path(path: str | Path) -> bool:
    """Whether ``path`` names a phantom (``phantom:SEED:INDEX``, possibly behind a folder)."""
    return phantom_address(path) is not None
