"""The demo weights' training cycle: phantoms painted once, both stages per candidate config."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from medfinder import phantoms
from medfinder.errors import MedFinderError
from medfinder.training import recipe
from medfinder.io.manifests import ManifestCase, split_of
from medfinder.model import MedFinder, load_config
from medfinder.phantoms import PHANTOM_FINDINGS, generate_case, phantom_path
from medfinder.training.datasets import CaseDataset, pack_for_cache, unpack_from_cache


def test_adopted_volumes_are_not_loaded_again(tiny_model_dir: Path) -> None:
    model = MedFinder.from_pretrained(tiny_model_dir)
    preprocessor = model.make_preprocessor()
    loaded: list[Path] = []

    def loader(path: Path):
        loaded.append(path)
        return phantoms.phantom_volume(path)

    records = [ManifestCase(f"c{i}", phantom_path(11, i), "Normal chest.") for i in range(2)]
    packed = pack_for_cache(preprocessor(generate_case(11, 0).volume))
    dataset = CaseDataset(records, preprocessor, loader=loader, cache=True)
    assert dataset.adopt({"c0": packed.numpy(), "elsewhere": packed}) == 1
    dataset.preload()
    assert loaded == [phantom_path(11, 1)]  # only the case that was not handed over
    assert torch.equal(dataset[0]["image"], unpack_from_cache(packed))


@pytest.fixture(scope="module")
def two_tiny_candidates(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Any]:
    """medfinder-tiny and the same architecture on another grid (the tiny weights fit both), with
    the training phantoms among the first ten of seed 3 painted once for both: the tests below hand
    this painting to the recipe."""
    config = load_config("medfinder-tiny").to_dict()
    config["name"] = "tiny-coarse"
    config["preprocess"]["spacing"] = [10.0, 10.0, 10.0]
    variant = tmp_path_factory.mktemp("configs") / "tiny-coarse.json"
    variant.write_text(json.dumps(config))
    candidates = ["medfinder-tiny", str(variant)]
    preprocess = {c: dict(load_config(c).to_dict()["preprocess"]) for c in candidates}
    return candidates, recipe.paint_corpus(3, recipe.training_indices(10, 3), preprocess, workers=2)


def _cycle_args(candidates: list[str], init: Path, out: Path) -> list[str]:
    return ["--n", "10", "--seed", "3", "--init", str(init), "--out", str(out), "--workers", "2",
            "--stage1-epochs", "1", "--stage2-epochs", "2", "--device", "cpu", "--parallel",
            *[arg for c in candidates for arg in ("--candidate", c)]]


def test_two_candidates_train_side_by_side_on_phantoms_painted_once(two_tiny_candidates: tuple[list[str], Any],
                                                                    tiny_model_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    candidates, painted = two_tiny_candidates
    asked: list[tuple[int, list[int]]] = []

    def paint_corpus(seed: int, indices: list[int], *rest: Any) -> Any:
        asked.append((seed, list(indices)))
        return painted

    monkeypatch.setattr(recipe, "paint_corpus", paint_corpus)
    # A volume painted again would reach the preprocessor as None and its case would be skipped.
    monkeypatch.setattr(phantoms, "phantom_volume", lambda path: None)
    out = tmp_path / "cycle"
    assert cycle_main(_cycle_args(candidates, tiny_model_dir, out)) == 0
    assert asked == [(3, [0, 2, 3, 4, 5, 6, 7, 8, 9])]  # the recipe asks for no test-split phantom

    with (out / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # the test split is not painted: of seed 3's first ten, case 1 is a test case
    assert [r["image"] for r in rows] == [f"phantom:3:{i}" for i in (0, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert {split_of(r["case_id"]) for r in rows} == {"train", "val"}
    assert set(PHANTOM_FINDINGS) <= set(rows[0])
    initial = MedFinder.from_pretrained(tiny_model_dir).image.state_dict()
    processes = set()
    for name, spacing in (("medfinder-tiny", (8.0, 8.0, 8.0)), ("tiny-coarse", (10.0, 10.0, 10.0))):
        summary = json.loads((out / name / "recipe.json").read_text())
        assert summary["stage1"]["skipped"] == {} and summary["stage2"]["skipped"] == {}
        processes.add(summary["process"])
        stage1 = MedFinder.from_pretrained(out / name / "stage1")
        stage2 = MedFinder.from_pretrained(out / name / "stage2")
        assert stage2.preprocess_config.spacing == spacing  # each candidate keeps its own grid
        assert any(not torch.equal(initial[k], v) for k, v in stage1.image.state_dict().items())  # stage 1 learnt
        assert all(torch.equal(stage1.image.state_dict()[k], v) for k, v in stage2.image.state_dict().items())
        stage2_settings = summary["stage2"]["settings"]
        assert stage2_settings["lock_image"] and stage2_settings["init"] == str(out / name / "stage1")
    assert len(processes) == 2 and os.getpid() not in processes  # side by side: one process each
    record = json.loads((out / "recipe.json").read_text())
    assert record["candidates"] == ["medfinder-tiny", "tiny-coarse"] and (record["n"], record["painted"]) == (10, 9)


def test_a_candidate_that_fails_in_its_process_is_one_sentence(two_tiny_candidates: tuple[list[str], Any],
                                                               tiny_model_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    candidates, painted = two_tiny_candidates
    monkeypatch.setattr(recipe, "paint_corpus", lambda *a, **k: painted)
    trains = recipe.run_candidate

    def run_candidate(config: str, name: str, *rest: Any) -> Any:
        if name == "tiny-coarse":
            raise MedFinderError("The manifest x has fewer than 2 usable training cases.")
        return trains(config, name, *rest)

    monkeypatch.setattr(recipe, "run_candidate", run_candidate)  # forked children inherit the patch
    out = tmp_path / "cycle"
    with pytest.raises(SystemExit) as exit_info:
        cycle_main(_cycle_args(candidates, tiny_model_dir, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == ("error: Training candidate tiny-coarse failed: "
                       "The manifest x has fewer than 2 usable training cases.")
    assert (out / "medfinder-tiny" / "stage2" / "model.safetensors").is_file()  # the other one finished


@pytest.mark.parametrize("args, sentence", [
    (["--n", "5"], "--n must be at least 10"),
    (["--candidate", "no-such-config"], "Model config 'no-such-config' is neither a bundled config"),
    (["--candidate", "medfinder-demo"], "comes from another architecture than model config 'medfinder-demo'"),
    (["--candidate", "medfinder-tiny", "--candidate", "medfinder-tiny"], "Two candidates would write to the same"),
    (["--candidate", "medfinder-tiny", "--candidate", "elsewhere/medfinder-tiny.json"],
     "Two candidates would write to the same output folder"),
], ids=["too-few", "unknown-config", "weights-do-not-fit", "repeated", "same-folder-name"])
def test_bad_arguments_are_one_sentence_before_any_painting(args: list[str], sentence: str, tiny_model_dir: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe, "paint_corpus", lambda *a, **k: pytest.fail("painted despite a bad argument"))
    base = ["--n", "10", "--seed", "1", "--init", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cycle_main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and sentence in err[0] and err[0].startswith("error: ")


def test_a_corpus_larger_than_memory_is_refused_before_painting(tiny_model_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = dict(load_config("medfinder-tiny").to_dict()["preprocess"])
    assert recipe.painted_bytes(10, {"a": tiny, "b": tiny}) == 10 * 2 * 2 * 16 ** 3  # two windows of 16^3 each
    monkeypatch.setattr(recipe.psutil, "virtual_memory", lambda: SimpleNamespace(available=2**30))
    monkeypatch.setattr(recipe, "paint_corpus", lambda *a, **k: pytest.fail("painted beyond the memory"))
    with pytest.raises(SystemExit) as exit_info:
        cycle_main(["--n", "200000", "--seed", "1", "--init", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    painted = len(recipe.training_indices(200000, 1))  # the test split is not painted
    assert 175000 < painted < 185000
    assert capsys.readouterr().err.strip() == (
        f"error: {painted} phantoms would keep {painted * 2 * 16 ** 3 / 2**30:.1f} GiB of preprocessed volumes in "
        "memory, more than 90 % of the 1.0 GiB available; use a smaller --n or fewer candidates.")


def test_a_folder_that_holds_an_earlier_cycle_is_refused(tiny_model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cycle"
    (out / "medfinder-tiny").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        cycle_main(["--n", "10", "--seed", "1", "--init", str(tiny_model_dir), "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: The output folder {out} is not empty; give each cycle a new folder."


def test_a_missing_init_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cycle_main(["--n", "10", "--seed", "1", "--init", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: The --init model folder {tmp_path / 'absent'} does not exist."


def cycle_main(argv: list[str]) -> int:
    """``python -m medfinder recipe ARGV`` in this process."""
    from medfinder.cli import main as cli_main

    return cli_main(argv, command="recipe")
