"""The demo weights' training cycle: phantoms painted once, both stages per candidate config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medfinder.recipe as recipe
from medfinder.datasets import CaseDataset, CaseRecord, pack_for_cache, unpack_from_cache
from medfinder.errors import MedFinderError
from medfinder.model import MedFinder
from medfinder.phantoms import PHANTOM_FINDINGS, generate_case


def test_a_phantom_path_paints_the_same_case_again() -> None:
    path = recipe.phantom_path(7, 3)
    assert str(path) == "phantom:7:3"
    expected = generate_case(7, 3).volume.hu
    np.testing.assert_array_equal(recipe.phantom_volume(path).hu, expected)
    # as read_manifest gives it back, behind the manifest's folder
    np.testing.assert_array_equal(recipe.phantom_volume(Path("/corpus") / str(path)).hu, expected)
    with pytest.raises(MedFinderError, match="not a phantom path"):
        recipe.phantom_volume(Path("scan:7:3"))
    with pytest.raises(MedFinderError, match="not a phantom path"):
        recipe.phantom_volume(Path("phantom:7"))


def test_adopted_volumes_are_not_loaded_again(tiny_model_dir: Path) -> None:
    model = MedFinder.from_pretrained(tiny_model_dir)
    preprocessor = model.make_preprocessor()
    loaded: list[Path] = []

    def loader(path: Path):
        loaded.append(path)
        return recipe.phantom_volume(path)

    records = [CaseRecord(f"c{i}", recipe.phantom_path(11, i), "Normal chest.") for i in range(2)]
    packed = pack_for_cache(preprocessor(generate_case(11, 0).volume))
    dataset = CaseDataset(records, preprocessor, loader=loader, cache=True)
    assert dataset.adopt({"c0": packed.numpy(), "elsewhere": packed}) == 1
    dataset.preload()
    assert loaded == [recipe.phantom_path(11, 1)]  # only the case that was not handed over
    assert torch.equal(dataset[0]["image"], unpack_from_cache(packed))


def _tiny_variant(path: Path) -> Path:
    """medfinder-tiny's architecture on another grid: the tiny weights fit it."""
    config = json.loads((Path(recipe.__file__).parent / "configs" / "medfinder-tiny.json").read_text())
    config["name"] = "tiny-coarse"
    config["preprocess"]["spacing"] = [10.0, 10.0, 10.0]
    path.write_text(json.dumps(config))
    return path


def test_two_candidates_train_side_by_side_on_phantoms_painted_once(tiny_model_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A volume painted again would reach the preprocessor as None and its case would be skipped.
    monkeypatch.setattr(recipe, "phantom_volume", lambda path: None)
    variant = _tiny_variant(tmp_path / "tiny-coarse.json")
    out = tmp_path / "cycle"
    assert recipe.main(["--n", "10", "--seed", "3", "--init", str(tiny_model_dir), "--out", str(out),
                        "--candidate", "medfinder-tiny", "--candidate", str(variant), "--workers", "2",
                        "--stage1-epochs", "1", "--stage2-epochs", "2", "--device", "cpu", "--parallel"]) == 0

    with (out / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [f"phantom:3:{i}" for i in range(10)]
    assert set(PHANTOM_FINDINGS) <= set(rows[0])
    initial = MedFinder.from_pretrained(tiny_model_dir).image.state_dict()
    for name, spacing in (("medfinder-tiny", (8.0, 8.0, 8.0)), ("tiny-coarse", (10.0, 10.0, 10.0))):
        summary = json.loads((out / name / "recipe.json").read_text())
        assert summary["stage1"]["skipped"] == {} and summary["stage2"]["skipped"] == {}
        stage1 = MedFinder.from_pretrained(out / name / "stage1")
        stage2 = MedFinder.from_pretrained(out / name / "stage2")
        assert stage2.preprocess_config.spacing == spacing  # each candidate keeps its own grid
        assert any(not torch.equal(initial[k], v) for k, v in stage1.image.state_dict().items())  # stage 1 learnt
        assert all(torch.equal(stage1.image.state_dict()[k], v) for k, v in stage2.image.state_dict().items())
        stage2_settings = summary["stage2"]["settings"]
        assert stage2_settings["lock_image"] and stage2_settings["init"] == str(out / name / "stage1")
    assert json.loads((out / "recipe.json").read_text())["candidates"] == ["medfinder-tiny", "tiny-coarse"]


@pytest.mark.parametrize("args, sentence", [
    (["--n", "5"], "--n must be at least 10"),
    (["--candidate", "no-such-config"], "Model config 'no-such-config' is neither a bundled config"),
    (["--candidate", "medfinder-demo"], "comes from another architecture than model config 'medfinder-demo'"),
    (["--candidate", "medfinder-tiny", "--candidate", "medfinder-tiny"], "Each --candidate may be named only once"),
    (["--candidate", "medfinder-tiny", "--candidate", "elsewhere/medfinder-tiny.json"],
     "Each --candidate may be named only once"),
], ids=["too-few", "unknown-config", "weights-do-not-fit", "repeated", "same-folder-name"])
def test_bad_arguments_are_one_sentence_before_any_painting(args: list[str], sentence: str, tiny_model_dir: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe, "paint_corpus", lambda *a, **k: pytest.fail("painted despite a bad argument"))
    base = ["--n", "10", "--seed", "1", "--init", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and sentence in err[0] and err[0].startswith("error: ")


def test_a_folder_that_holds_an_earlier_cycle_is_refused(tiny_model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cycle"
    (out / "medfinder-tiny").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--n", "10", "--seed", "1", "--init", str(tiny_model_dir), "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: The output folder {out} is not empty; give each cycle a new folder."


def test_a_missing_init_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--n", "10", "--seed", "1", "--init", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: The --init model folder {tmp_path / 'absent'} does not exist."

