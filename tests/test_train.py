"""Training: augmentation keeps laterality, report sampling, and a tiny two-step run with resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import file_size_limit
from test_datasets import write_tiny_corpus

from medfinder.cli import main as cli_main
from medfinder.io.manifests import ManifestCase, read_manifest, split_of
from medfinder.model import MedFinder
from medfinder.text.sentences import split_sentences
from medfinder.training.datasets import CaseDataset
from medfinder.training.evaluate import finding_names_of
from medfinder.training.train import (
    CHECKPOINT_DIR,
    LOG_FILE,
    STATE_FILE,
    TrainSettings,
    _masked_bce,
    label_pos_weight,
    sample_report,
    train,
    validation_label_auc,
    validation_recall,
)
from medfinder.transforms.augment import augment_volumes


@pytest.mark.parametrize("rotate, scale", [(6.0, 0.05), (0.0, 0.0)], ids=["affine", "shift"])
def test_augmentation_never_mirrors_left_and_right(rotate: float, scale: float) -> None:
    images = torch.zeros(6, 2, 32, 32, 24)
    images[:, :, 24:28, 14:18, 10:14] = 1.0  # a bright spot on the patient's right (high x in RAS)
    settings = TrainSettings(manifest="", out="", rotate_degrees=rotate, scale_range=scale)
    out = augment_volumes(images, settings, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    right = out[:, :, 21:31, 11:21, 7:17].mean(dim=(1, 2, 3, 4))
    mirrored = out[:, :, 1:11, 11:21, 7:17].mean(dim=(1, 2, 3, 4))
    assert bool((right - mirrored > 0.03).all())  # the spot covers 6 % of the right box
    assert not torch.allclose(out[0], out[1])  # each volume gets its own transform


def test_sample_report_returns_a_contiguous_window_of_sentences() -> None:
    report = "Findings: one. Two. Three. Four. Five. Six."
    sentences = split_sentences(report)
    rng = random.Random(0)
    windows = [sample_report(report, rng, full_probability=0.0, min_fraction=0.5) for _ in range(50)]
    for window in windows:
        parts = split_sentences(window)
        assert len(parts) >= 3
        start = sentences.index(parts[0])
        assert sentences[start : start + len(parts)] == parts
    assert len(set(windows)) > 3
    assert sample_report(report, rng, full_probability=1.0, min_fraction=0.5) == report


def _saved_weights_checksum(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["weights_sha256"]


def test_two_step_training_writes_a_checkpoint_and_resumes(tmp_path: Path) -> None:
    missing = next(f"missing-{i}" for i in range(100) if split_of(f"missing-{i}") == "train")
    manifest = write_tiny_corpus(tmp_path / "corpus", n=14, extra_rows=[
        [missing, "images/absent.nii.gz", "Right pleural effusion.", 1, 0, "F", 60],
    ])
    out = tmp_path / "model"
    settings = TrainSettings(manifest=str(manifest), out=str(out), config="medfinder-tiny", epochs=3,
                             batch_size=4, max_steps=1, finding_weight=1.0)
    first = train(settings)
    assert first["steps"] == 1
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / CHECKPOINT_DIR / STATE_FILE).is_file()
    assert "absent.nii.gz" not in first["skipped"] and missing in first["skipped"]
    state = torch.load(out / CHECKPOINT_DIR / STATE_FILE, weights_only=True)
    assert state["state"]["step"] == 1
    after_one_step = _saved_weights_checksum(out / CHECKPOINT_DIR)

    settings.max_steps = 2
    second = train(settings, resume=True)
    assert second["steps"] == 2
    state = torch.load(out / CHECKPOINT_DIR / STATE_FILE, weights_only=True)
    assert state["state"]["step"] == 2 and state["state"]["epoch"] == 2
    assert state["scheduler"]["last_epoch"] == 2  # the learning-rate schedule continued, not restarted
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert _saved_weights_checksum(out / CHECKPOINT_DIR) != after_one_step
    assert MedFinder.from_pretrained(out).fingerprint == second["fingerprint"]
    assert json.loads((out / "training.json").read_text())["steps"] == 2


def test_cli_reports_a_missing_manifest_in_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "m"), "--config", "medfinder-tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1] == f"error: The manifest {tmp_path / 'absent.csv'} does not exist."


def test_a_full_disk_at_a_checkpoint_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=6)
    out = tmp_path / "m"
    args = ["--manifest", str(manifest), "--out", str(out), "--config", "medfinder-tiny", "--epochs", "1",
            "--batch-size", "4", "--workers", "0"]
    main(args)  # a run that fits, to learn how large the weights and the optimizer state are
    weights_bytes = (out / CHECKPOINT_DIR / "model.safetensors").stat().st_size
    state_bytes = (out / CHECKPOINT_DIR / STATE_FILE).stat().st_size
    assert state_bytes > weights_bytes + 65536  # AdamW keeps two moments per trainable weight
    capsys.readouterr()
    # The weights fit, the optimizer state does not: torch.save's short write must not be a traceback.
    with file_size_limit(weights_bytes + 65536), pytest.raises(SystemExit) as exit_info:
        main([*args[:3], str(tmp_path / "m2"), *args[4:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) >= 1
    assert err[-1].startswith(f"error: The training checkpoint could not be written to {tmp_path / 'm2' / CHECKPOINT_DIR}")
    assert "disk full" in err[-1] and not list((tmp_path / "m2" / CHECKPOINT_DIR).glob("*.tmp"))

    # Resuming the first run into a full disk keeps its last checkpoint whole: weights and state of one step.
    before = _saved_weights_checksum(out / CHECKPOINT_DIR), torch.load(out / CHECKPOINT_DIR / STATE_FILE, weights_only=True)
    with file_size_limit(weights_bytes + 65536), pytest.raises(SystemExit):
        main([*args[:7], "2", *args[8:], "--resume"])
    assert _saved_weights_checksum(out / CHECKPOINT_DIR) == before[0]
    state = torch.load(out / CHECKPOINT_DIR / STATE_FILE, weights_only=True)
    assert state["state"] == before[1]["state"]
    assert MedFinder.from_pretrained(out / CHECKPOINT_DIR).fingerprint


def test_resume_refuses_weights_that_do_not_belong_to_the_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=6)
    out = tmp_path / "m"
    args = ["--manifest", str(manifest), "--out", str(out), "--config", "medfinder-tiny", "--epochs", "1",
            "--batch-size", "4", "--workers", "0"]
    main(args)
    # What a run killed between replacing the weights and replacing the state leaves behind.
    config = MedFinder.from_pretrained(out / CHECKPOINT_DIR).config
    torch.manual_seed(123)
    MedFinder(config).save_pretrained(out / CHECKPOINT_DIR)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:7], "2", *args[8:], "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "do not belong to the training state" in err[-1]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "m"), "--config", "medfinder-tiny", "--resume"])
    assert exit_info.value.code == 2 and "Cannot resume" in capsys.readouterr().err


def test_locked_image_stage_trains_projections_only(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=14)
    stage1 = tmp_path / "stage1"
    first = train(TrainSettings(manifest=str(manifest), out=str(stage1), config="medfinder-tiny", epochs=1,
                                batch_size=4, max_steps=2, label_head_weight=1.0, contrastive_weight=0.0,
                                label_balance=0.5))
    assert first["steps"] == 2 and first["best_val_metric"] == "label_AUC"
    assert first["settings"]["label_balance"] == 0.5  # the run's record says how its findings were weighed
    head = torch.load(stage1 / CHECKPOINT_DIR / STATE_FILE, weights_only=True)["label_head"]
    assert head is not None and head["weight"].shape[0] >= 1  # one row per label column

    # The stage is judged per finding, so the log says which findings the tower cannot see yet.
    model = MedFinder.from_pretrained(stage1)
    records = read_manifest(manifest)
    names = finding_names_of(records)
    dataset = CaseDataset(records, model.make_preprocessor(), names)
    linear = torch.nn.Linear(model.image.dim, len(names))
    linear.load_state_dict(head)
    validation = validation_label_auc(model, linear, dataset, batch_size=4)
    by_finding = validation["label_AUC_by_finding"]  # findings with positives and negatives only
    assert "Pleural effusion" in by_finding and set(by_finding) <= set(names)
    assert validation["label_AUC"] == pytest.approx(sum(by_finding.values()) / len(by_finding), abs=1e-3)

    stage2 = tmp_path / "stage2"
    second = train(TrainSettings(manifest=str(manifest), out=str(stage2), init=str(stage1), epochs=3,
                                 batch_size=4, finding_weight=1.0, lock_image=True, feature_views=2))
    assert second["steps"] >= 3
    before, after = MedFinder.from_pretrained(stage1), MedFinder.from_pretrained(stage2 / CHECKPOINT_DIR)
    image_before, image_after = before.image.state_dict(), after.image.state_dict()
    assert all(torch.equal(image_before[k], image_after[k]) for k in image_before)  # BatchNorm statistics too
    projection_before = before.image_projection.state_dict()
    projection_after = after.image_projection.state_dict()
    assert any(not torch.equal(projection_before[k], projection_after[k]) for k in projection_before)


def test_validation_reports_single_finding_precision_against_images_only(tmp_path: Path) -> None:
    # The demo has two targets; a stage-2 log that showed only R@10 would hide a run that buys
    # report matching with keyword precision.
    import numpy as np

    from medfinder.model import create_model_and_transforms
    from medfinder.training.evaluate import embed_cases, keyword_precision

    records = read_manifest(write_tiny_corpus(tmp_path / "corpus", n=8))
    names = finding_names_of(records)
    model, preprocessor = create_model_and_transforms("medfinder-tiny")
    model.eval()
    with_labels = validation_recall(model, CaseDataset(records, preprocessor, names), batch_size=4)
    embeds = embed_cases(model, records)
    images, kept = embeds.images, embeds.kept
    labels = np.array([[r.labels.get(n, 0) for n in names] for r in kept])
    expected = keyword_precision(model.encode_text(names).double().numpy() @ images.double().numpy().T,
                                 labels, names, ks=(10,))["mean"]["P@10"]
    assert with_labels["keyword_P@10"] == pytest.approx(expected)
    assert "R@10" in with_labels
    without = validation_recall(model, CaseDataset(records, preprocessor), batch_size=4)
    assert "keyword_P@10" not in without and without["R@10"] == with_labels["R@10"]


def test_locked_image_stage_fixes_the_centres_after_warmup(tmp_path: Path) -> None:
    # A centre that kept following the batches drifted away from the weights as the learning
    # rate decayed; after the warm-up (here: the first step) it must not move.
    import json

    from medfinder.model import load_config

    manifest = write_tiny_corpus(tmp_path / "corpus", n=14)
    config = tmp_path / "tiny-centred.json"
    config.write_text(json.dumps({**load_config("medfinder-tiny").to_dict(), "centering": True}))
    stage1 = tmp_path / "stage1"
    train(TrainSettings(manifest=str(manifest), out=str(stage1), config=str(config), epochs=1,
                        batch_size=4, max_steps=2, label_head_weight=1.0, contrastive_weight=0.0))
    centres = {}
    for name, steps in (("one", 1), ("many", None)):
        train(TrainSettings(manifest=str(manifest), out=str(tmp_path / name), init=str(stage1), epochs=3,
                            batch_size=4, warmup_fraction=0.0, max_steps=steps, lock_image=True, feature_views=2))
        model = MedFinder.from_pretrained(tmp_path / name / CHECKPOINT_DIR)
        centres[name] = (model.image_centering.center.clone(), model.text_centering.center.clone())
    assert torch.equal(centres["one"][0], centres["many"][0]) and torch.equal(centres["one"][1], centres["many"][1])
    stage1_centre = MedFinder.from_pretrained(stage1).image_centering.center
    assert not torch.equal(stage1_centre, centres["many"][0])  # it did follow the batches while warming up


def test_label_balance_weighs_the_positives_of_rare_findings() -> None:
    # 2 of 10 cases show a hernia; 3 of the 9 that state effusion show it; nobody has a mass.
    records = [ManifestCase(case_id=str(i), image=None, report="",
                          labels={"Hiatal hernia": int(i < 2), "Lung mass": 0, **({"Pleural effusion": int(i < 4)} if i else {})})
               for i in range(10)]
    names = ["Hiatal hernia", "Pleural effusion", "Lung mass"]
    assert label_pos_weight(records, names, 1.0).tolist() == pytest.approx([4.0, 2.0, 1.0])  # 8/2, 6/3 of the 9 stating it
    assert label_pos_weight(records, names, 0.5).tolist() == pytest.approx([2.0, 2 ** 0.5, 1.0])
    assert label_pos_weight(records, names, 0.0).tolist() == [1.0, 1.0, 1.0]

    # In the label head's loss a positive then counts that many times; a negative and an unstated label do not change.
    logits, mask = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0]])
    weighted = _masked_bce(logits, labels, mask, label_pos_weight(records, names, 1.0))
    plain = _masked_bce(logits, labels, mask)
    assert float(weighted) == pytest.approx(float(plain) * (4 + 4) / 5)  # 5 known labels, 1 positive weighing 4


def test_label_balance_out_of_range_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "m"), "--label-balance", "2"])
    assert exit_info.value.code == 2 and "--label-balance must be between 0 and 1, not 2.0" in capsys.readouterr().err


def test_lock_image_without_init_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "m"), "--lock-image"])
    assert exit_info.value.code == 2 and "--init" in capsys.readouterr().err


def test_several_manifests_are_joined_and_a_repeated_case_id_is_named(tmp_path: Path) -> None:
    from medfinder.errors import MedFinderError
    from medfinder.training.train import read_manifests

    a = write_tiny_corpus(tmp_path / "a", n=3)
    b = tmp_path / "b.csv"
    b.write_text("case_id,image,report\nother-1,,Normal chest.\n", encoding="utf-8")
    assert [r.case_id for r in read_manifests([str(a), str(b)])][-1] == "other-1"
    assert len(read_manifests([str(a), str(b)])) == 4
    with pytest.raises(MedFinderError, match="in both"):
        read_manifests([str(a), str(a)])


def test_roc_auc_on_known_rankings() -> None:
    import numpy as np

    from medfinder.training.train import roc_auc

    labels = np.array([1, 1, 0, 0, 0])
    assert roc_auc(np.array([0.9, 0.8, 0.3, 0.2, 0.1]), labels) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert roc_auc(np.array([0.9, 0.2, 0.3, 0.1, 0.0]), labels) == 5 / 6  # 0.9 beats all three negatives, 0.2 beats two
    assert roc_auc(np.array([0.1, 0.2]), np.array([0, 0])) is None


def test_a_cpu_trains_in_fp32_even_with_amp_requested(tmp_path: Path) -> None:
    # bf16 autocast on this CPU class gave NaN weights now and then; amp must not change CPU training.
    manifest = write_tiny_corpus(tmp_path / "corpus", n=10)
    saved = {}
    for amp in (True, False):
        out = tmp_path / f"amp-{amp}"
        train(TrainSettings(manifest=str(manifest), out=str(out), config="medfinder-tiny", epochs=1,
                            batch_size=4, max_steps=2, amp=amp, device="cpu"))
        model = MedFinder.from_pretrained(out)
        assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
        saved[amp] = model.image.state_dict()
    assert all(torch.equal(saved[True][k], saved[False][k]) for k in saved[False])


def test_init_weights_in_a_new_preprocessing_config(tmp_path: Path) -> None:
    """--init with --config: the tower keeps its weights and learns under the config's new window."""
    from medfinder.errors import ModelError
    from medfinder.model import load_config

    manifest = write_tiny_corpus(tmp_path / "corpus", n=10)
    stage1 = tmp_path / "stage1"
    train(TrainSettings(manifest=str(manifest), out=str(stage1), config="medfinder-tiny", epochs=1,
                        batch_size=4, max_steps=1, label_head_weight=1.0, contrastive_weight=0.0))
    tiny = load_config("medfinder-tiny").to_dict()
    windows = [[-1000.0, 200.0]] * len(tiny["preprocess"]["windows"])
    rewindowed = {**tiny, "preprocess": {**tiny["preprocess"], "windows": windows, "peak_windows": [0]}}
    config = tmp_path / "rewindowed.json"
    config.write_text(json.dumps(rewindowed))
    out = tmp_path / "continued"
    train(TrainSettings(manifest=str(manifest), out=str(out), config=str(config), init=str(stage1), epochs=1,
                        batch_size=4, max_steps=1, lr=1e-9, label_head_weight=1.0, contrastive_weight=0.0))
    continued, start = MedFinder.from_pretrained(out / CHECKPOINT_DIR), MedFinder.from_pretrained(stage1)
    assert continued.preprocess_config.peak_windows == (0,)
    assert continued.preprocess_config.windows[0] == (-1000.0, 200.0)
    fresh = MedFinder(load_config(str(config)).to_dict()).image.state_dict()
    weights = [k for k, v in start.image.state_dict().items() if v.is_floating_point() and "running" not in k]
    moved = sum(float((continued.image.state_dict()[k] - start.image.state_dict()[k]).abs().sum()) for k in weights)
    apart = sum(float((fresh[k] - start.image.state_dict()[k]).abs().sum()) for k in weights)
    assert moved < 1e-3 * apart  # started from stage 1's weights, not from a fresh draw

    wider = {**tiny, "image": {**tiny["image"], "widths": [w * 2 for w in tiny["image"]["widths"]]}}
    config.write_text(json.dumps(wider))
    with pytest.raises(ModelError, match="another architecture"):
        train(TrainSettings(manifest=str(manifest), out=str(tmp_path / "wider"), config=str(config),
                            init=str(stage1), epochs=1, batch_size=4, max_steps=1))


def test_an_output_folder_that_cannot_be_made_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=2)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "afile" / "m"), "--config", "medfinder-tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1] == f"error: {tmp_path / 'afile' / 'm'}: not a directory."


def test_a_bad_argument_is_one_sentence_not_a_usage_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "m"), "--epochs", "many"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and "--epochs" in err and "usage:" not in err


def main(argv: list[str]) -> int:
    """``python -m medfinder train ARGV`` in this process."""
    return cli_main(argv, command="train")
