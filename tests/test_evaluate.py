"""Retrieval metrics on hand-built similarity matrices with known ranks, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medfinder.training.evaluate import (
    evaluate_embeddings,
    keyword_precision,
    label_overlap_at_k,
    match_ranks,
    precision_at_k,
    retrieval_metrics,
)


def _with_match_at(ranks: list[int], n: int) -> np.ndarray:
    """Square matrix where query i's match (column i) sits at the given 1-based rank."""
    sim = np.zeros((n, n))
    for i, rank in enumerate(ranks):
        others = [j for j in range(n) if j != i]
        scores = np.linspace(1.0, 0.1, n)  # distinct, descending
        order = others[: rank - 1] + [i] + others[rank - 1 :]
        sim[i, order] = scores
    return sim


def test_ranks_and_recalls_on_a_known_matrix() -> None:
    ranks = [1, 2, 5, 6, 11, 1, 3, 8, 4, 12, 7, 9]
    sim = _with_match_at(ranks, 12)
    assert match_ranks(sim).tolist() == ranks
    m = retrieval_metrics(sim)
    assert m["R@1"] == pytest.approx(2 / 12)
    assert m["R@5"] == pytest.approx(6 / 12)
    assert m["R@10"] == pytest.approx(10 / 12)
    assert m["median_rank"] == pytest.approx(5.5)
    assert m["mean_rank"] == pytest.approx(np.mean(ranks))
    assert m["n"] == 12


def test_identity_is_perfect_and_transpose_swaps_direction() -> None:
    assert retrieval_metrics(np.eye(7))["R@1"] == 1.0
    sim = _with_match_at([1, 3, 1, 1], 4)
    assert match_ranks(sim).tolist() == [1, 3, 1, 1]
    assert match_ranks(sim.T).tolist() != [1, 3, 1, 1]


def test_ties_count_against_the_model() -> None:
    assert match_ranks(np.ones((5, 5))).tolist() == [5] * 5  # a constant scorer is last, not first
    assert retrieval_metrics(np.ones((5, 5)))["R@1"] == 0.0


def test_non_square_matrix_is_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        match_ranks(np.zeros((2, 3)))


def test_label_overlap_excludes_the_query_and_scores_jaccard() -> None:
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
    sim = np.array([
        [9, 5, 1, 0, 0],   # case 0 ({a,b}) -> case 1 ({a}): Jaccard 1/2
        [5, 9, 1, 0, 0],   # case 1 ({a}) -> case 0 ({a,b}): 1/2
        [0, 1, 9, 5, 0],   # case 2 ({c}) -> case 3 (normal): 0
        [0, 0, 1, 9, 5],   # case 3 (normal) -> case 4 (normal): both normal agree fully
        [0, 0, 1, 5, 9],   # case 4 -> case 3: 1
    ], dtype=float)
    result = label_overlap_at_k(sim, labels, k=1)
    assert result["overlap"] == pytest.approx((0.5 + 0.5 + 0 + 1 + 1) / 5)
    assert 0.0 <= result["chance"] <= 1.0 and result["k"] == 1


def test_label_overlap_averages_per_query_not_cumulatively() -> None:
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    sim = np.array([[4, 3, 1, 0], [3, 4, 1, 0], [0, 1, 4, 3], [0, 1, 3, 4]], dtype=float)
    assert label_overlap_at_k(sim, labels, k=1)["overlap"] == pytest.approx(1.0)
    assert label_overlap_at_k(sim, labels, k=2)["overlap"] == pytest.approx(0.5)


def test_precision_at_k_divides_by_the_reachable_number_of_hits() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert precision_at_k(scores, np.array([1, 0, 1, 0, 0]), k=4) == pytest.approx(1.0)  # 2 of 2
    assert precision_at_k(scores, np.array([0, 0, 1, 1, 1]), k=2) == pytest.approx(0.0)
    assert precision_at_k(scores, np.array([1, 0, 0, 1, 1]), k=2) == pytest.approx(0.5)
    assert np.isnan(precision_at_k(scores, np.zeros(5), k=2))


def test_keyword_precision_per_finding_skips_findings_without_positives() -> None:
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]])
    sim = np.array([[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.8, 0.0], [0.5, 0.5, 0.5, 0.5]])
    result = keyword_precision(sim, labels, ["Pleural effusion", "Cardiomegaly", "Pneumothorax"], ks=(2,))
    assert set(result["per_finding"]) == {"Pleural effusion", "Cardiomegaly"}
    assert result["per_finding"]["Pleural effusion"] == {"positives": 2, "P@2": 1.0}
    assert result["per_finding"]["Cardiomegaly"]["P@2"] == pytest.approx(0.5)
    assert result["mean"]["P@2"] == pytest.approx(0.75)


def test_reports_and_finding_names_search_indexed_scans_while_query_scans_search_the_rest() -> None:
    # Indexed scans (with the model's test-time views) and query scans (without) are different
    # vectors; each metric must use the one the product uses. 12 cases, one finding in the last two:
    # the indexed scans put both first for the finding's name, the query scans only one of them.
    import torch

    n = 12
    indexed = torch.eye(n)
    queries = torch.roll(torch.eye(n), 1, dims=1)  # query scan i points at case i + 1
    reports = torch.eye(n)
    labels = np.zeros((n, 1), dtype=np.int64)
    labels[-2:] = 1
    finding = torch.zeros(1, n)
    finding[0, -2:] = 1.0
    result = evaluate_embeddings(indexed, reports, labels, ["Pleural effusion"], finding, image_query_embeds=queries)
    assert result["text_to_image"]["R@1"] == 1.0  # reports find the indexed scans
    assert result["image_to_text"]["R@1"] == 0.0  # each query scan finds the next case's report first
    assert result["keyword"]["per_finding"]["Pleural effusion"]["P@10"] == 1.0  # the indexed scans rank
    flipped = evaluate_embeddings(queries, reports, labels, ["Pleural effusion"], finding, image_query_embeds=indexed)
    assert flipped["text_to_image"]["R@1"] == 0.0 and flipped["image_to_text"]["R@1"] == 1.0
    assert flipped["keyword"]["per_finding"]["Pleural effusion"]["P@10"] == 0.5
    # image to image: query scans against indexed scans
    g = torch.Generator().manual_seed(0)
    indexed, queries = (torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1) for _ in range(2))
    labels = (torch.rand(n, 3, generator=g) < 0.4).long().numpy()
    names = ["Pleural effusion", "Cardiomegaly", "Emphysema"]
    overlap = evaluate_embeddings(indexed, indexed, labels, names, None, image_query_embeds=queries)
    expected = label_overlap_at_k((queries @ indexed.T).double().numpy(), labels, 5)
    assert overlap["image_to_image_label_overlap"]["@5"] == expected
    assert expected != label_overlap_at_k((indexed @ indexed.T).double().numpy(), labels, 5)


def test_cli_prints_json_metrics_for_a_saved_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_datasets import write_tiny_corpus

    from medfinder.model import create_model_and_transforms

    manifest = write_tiny_corpus(tmp_path / "corpus", n=6)
    model, _ = create_model_and_transforms("medfinder-tiny")
    model.save_pretrained(tmp_path / "model")
    assert main(["--model", str(tmp_path / "model"), "--manifest", str(manifest), "--split", "all", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cases"] == 6 and result["split"] == "all"
    assert result["fingerprint"] == model.fingerprint
    for direction in ("text_to_image", "image_to_text"):
        assert set(result[direction]) >= {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
    assert set(result["keyword"]["per_finding"]) <= {"Pleural effusion", "Cardiomegaly"}
    assert "@10" in result["image_to_image_label_overlap"]


def test_cli_reads_a_manifest_whose_phantoms_were_never_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe's manifest names its phantoms phantom:SEED:INDEX; evaluate (and train, through the
    same dataset loader) paints them again instead of skipping them as missing files."""
    from medfinder.model import create_model_and_transforms
    from medfinder.phantoms import generate_case, phantom_path, write_manifest

    rows = [generate_case(5, i).manifest_row(str(phantom_path(5, i))) for i in range(3)]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    model, _ = create_model_and_transforms("medfinder-tiny")
    model.save_pretrained(tmp_path / "model")
    assert main(["--model", str(tmp_path / "model"), "--manifest", str(manifest), "--split", "all", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cases"] == 3 and result["skipped"] == {}


def test_cli_error_is_one_sentence_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_datasets import write_tiny_corpus

    manifest = write_tiny_corpus(tmp_path / "corpus", n=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "absent"), "--manifest", str(manifest), "--split", "all", "--json"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and "absent" in err and err.count("\n") == 0 and "Traceback" not in err


def test_a_folder_given_as_the_manifest_is_named_as_a_folder_before_any_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # the model folder does not exist: the manifest is read first
        main(["--model", str(tmp_path / "absent"), "--manifest", str(tmp_path), "--json"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: The manifest {tmp_path} is a folder, not a CSV file."


def main(argv: list[str]) -> int:
    """``python -m medfinder evaluate ARGV`` in this process."""
    from medfinder.cli import main as cli_main

    return cli_main(argv, command="evaluate")
