"""Where a finding's own look (calcium, metal, the heart, a blob in the lung) puts it in a scan: bad and
odd scans get an empty map, never an exception (the app keeps serving evidence for the rest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfinder import evidence as ev
from medfinder.appearance import APPEARANCES, appearance_map
from medfinder.io import load_volume
from medfinder.io.volume import Volume

DATA = Path(__file__).parent / "data"


def _volume(hu: np.ndarray, spacing=(2.0, 2.0, 2.5)) -> Volume:
    return Volume(hu=hu.astype(np.int16), spacing=spacing, affine=np.diag([*spacing, 1.0]))


def test_a_finding_without_a_known_look_gets_no_map() -> None:
    volume = _volume(np.full((8, 8, 8), -1000))
    assert appearance_map("Bronchiectasis", volume, ev.Chest.of(volume)) is None
    assert appearance_map("not a finding", volume, ev.Chest.of(volume)) is None


@pytest.mark.parametrize("finding", sorted(APPEARANCES))
def test_a_scan_of_air_gives_an_empty_map(finding: str) -> None:
    volume = _volume(np.full((24, 24, 16), -1000))
    heat = appearance_map(finding, volume, ev.Chest.of(volume))
    assert heat.shape == volume.shape and not heat.any()


@pytest.mark.parametrize("finding", sorted(APPEARANCES))
def test_a_real_abdomen_without_lungs_gives_a_finite_map_and_no_error(finding: str) -> None:
    volume = load_volume(DATA / "abdomen_ct_crop.nii.gz")
    heat = appearance_map(finding, volume, ev.Chest.of(volume), side="right")
    assert heat.shape == volume.shape and np.isfinite(heat).all() and heat.min() >= 0


def test_the_side_a_report_gives_keeps_the_point_on_that_side_when_anything_there_looks_like_it() -> None:
    """Two metal clips, the denser on the patient's left: "right-sided port" points at the right one."""
    hu = np.full((40, 30, 20), -1000)
    hu[4:36, 4:26, :] = 40  # a body of soft tissue
    hu[30, 15, 10] = 2500  # right (RAS+: larger first index)
    hu[8, 15, 10] = 3000  # left, denser
    volume = _volume(hu)
    chest = ev.Chest.of(volume)
    assert np.unravel_index(appearance_map("Medical material", volume, chest).argmax(), hu.shape) == (8, 15, 10)
    assert np.unravel_index(appearance_map("Medical material", volume, chest, side="right").argmax(), hu.shape) == (30, 15, 10)
