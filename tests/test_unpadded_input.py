"""A model whose preprocessing keeps each scan's own extent (``pad_to_shape: false``, as the real-CT tower's
does): scans of different shapes are indexed, searched, trained on and evaluated, each encoded as it would
be alone, never padded to a common shape."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_datasets import write_tiny_corpus

from medfinder.io import load_volume
from medfinder.io.manifests import read_manifest


@pytest.fixture(scope="module")
def unpadded_model(tmp_path_factory) -> Path:
    """The tiny model (16^3 at 8 mm), randomly initialised, with pad_to_shape off."""
    from medfinder.model import create_model_and_transforms, load_config

    config = load_config("medfinder-tiny").to_dict()
    config["preprocess"]["pad_to_shape"] = False
    path = tmp_path_factory.mktemp("cfg") / "tiny-unpadded.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    model, _ = create_model_and_transforms(path)
    assert not model.preprocess_config.pad_to_shape
    return model.save_pretrained(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def ragged_corpus(tmp_path_factory) -> Path:
    """Eight tiny CTs with reports, cut to 16, 12 or 8 slices of 4 mm: three input shapes at 8 mm."""
    manifest = write_tiny_corpus(tmp_path_factory.mktemp("ragged"), n=8)
    for i, case in enumerate(read_manifest(manifest)):
        image = nib.load(str(case.image))
        slices = (16, 12, 8)[i % 3]
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, :slices], image.affine), str(case.image))
    return manifest


def test_scans_of_different_shapes_are_indexed_each_as_if_alone(unpadded_model, ragged_corpus, tmp_path):
    from medfinder.index import CaseIndex, build_index
    from medfinder.search import Searcher

    from medfinder.model import load_model

    cases = read_manifest(ragged_corpus)
    preprocess = load_model(unpadded_model).make_preprocessor()
    shapes = {tuple(preprocess(load_volume(c.image)).shape) for c in cases}
    assert len(shapes) == 3  # the build really meets several shapes in one batch
    summary = build_index(cases, tmp_path / "index", model=unpadded_model, progress=False)
    assert summary.added == 8 and not summary.failed
    searcher = Searcher.open(tmp_path / "index", unpadded_model)
    stored = CaseIndex.open(tmp_path / "index").vectors("image")
    for case in cases:
        alone = searcher.encode_volume(load_volume(case.image))
        assert np.allclose(stored[case.case_id], alone, atol=1e-5), case.case_id


def test_training_and_evaluation_take_batches_of_scans_of_different_shapes(unpadded_model, ragged_corpus, tmp_path):
    from medfinder.cli import main
    from medfinder.model import load_model
    from medfinder.training.evaluate import embed_cases

    out = tmp_path / "trained"
    assert main(["--manifest", str(ragged_corpus), "--out", str(out), "--config", str(unpadded_model / "config.json"),
                 "--epochs", "1", "--batch-size", "4", "--workers", "0"], command="train") == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(entry["loss"]) for entry in log)
    model = load_model(out)
    assert not model.preprocess_config.pad_to_shape
    cases = read_manifest(ragged_corpus)
    embeds = embed_cases(model, cases, batch_size=4)
    assert [c.case_id for c in embeds.kept] == [c.case_id for c in cases] and not embeds.skipped
    preprocess = model.make_preprocessor()
    for row in (0, 1, 2):  # 16, 12 and 8 slices, in one batch
        alone = model.encode_image(preprocess(load_volume(cases[row].image)).unsqueeze(0))[0]
        assert torch.allclose(embeds.image_queries[row], alone, atol=1e-5)


def test_a_vit_tower_refuses_inputs_of_their_own_extent(tmp_path, capsys):
    """A ViT's patch grid is fixed by its input size: one sentence, on the command line exit 2."""
    from medfinder.cli import main
    from medfinder.model import load_config

    config = load_config("medfinder-vit").to_dict()
    config["preprocess"]["pad_to_shape"] = False
    path = tmp_path / "vit-unpadded.json"
    path.write_text(json.dumps(config))
    manifest = write_tiny_corpus(tmp_path / "corpus", n=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "m"), "--config", str(path)], command="train")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0
    assert "ViT" in err and "pad_to_shape" in err
