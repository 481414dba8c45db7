"""Retrieval evaluation: the MedFinder paper's protocol plus CT-CLIP's label overlap.

``python -m medfinder.evaluate --model DIR --manifest CSV [--split test|all] --json``

- text-to-image and image-to-text recall@1/5/10, median and mean rank of the exact pair
  (query i's match is item i); ties count against the model (a constant score ranks last);
- image-to-image label overlap of the top k (mean Jaccard of the finding sets of the query and
  each retrieved case, the query itself excluded; two normal studies agree fully), computed per
  query and averaged once, unlike CT-CLIP's running accumulation; with its chance level;
- keyword precision@10/@20 per finding: the finding's name through ``encode_text`` against
  image embeddings only; hits / min(k, positives).

Scans are embedded as the product uses them: as an index stores them (with the model's
test-time views, ``MedFinder.encode_image``) where reports and finding names search them, and as a
query scan (without) where they search reports and other scans.

Metric functions take similarity matrices so they can be checked on hand-built ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import MedFinderError
from ..io.manifests import ManifestCase, read_manifest, select_split
from ..io.volume import Volume
from .datasets import CaseDataset, batch_from_pipe, collate_for_pipe

RECALL_KS = (1, 5, 10)
KEYWORD_KS = (10, 20)
OVERLAP_KS = (5, 10)


# --------------------------------------------------------------------------- metrics
def match_ranks(similarity: np.ndarray) -> np.ndarray:
    """1-based rank of item i for query i (rows are queries); ties are counted pessimistically."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"Expected a square similarity matrix, got shape {similarity.shape}.")
    matched = np.diag(similarity)[:, None]
    return (similarity >= matched).sum(axis=1)


def retrieval_metrics(similarity: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k, median and mean rank for square ``similarity`` (query i matches item i)."""
    ranks = match_ranks(similarity)
    out: dict[str, float] = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    out["n"] = int(len(ranks))
    return out


def _jaccard(query: np.ndarray, items: np.ndarray) -> np.ndarray:
    inter = (items & query).sum(axis=-1)
    union = (items | query).sum(axis=-1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def label_overlap_at_k(similarity: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    """Mean Jaccard overlap between each query's findings and those of its top-k neighbours.

    ``similarity`` is (N, N) image-to-image; the query itself is excluded. ``chance`` is the
    expected overlap of k cases drawn at random, for scale.
    """
    similarity = np.array(similarity, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n = similarity.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return {"overlap": float("nan"), "chance": float("nan"), "k": k}
    np.fill_diagonal(similarity, -np.inf)
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    per_query = [float(_jaccard(labels[i], labels[top[i]]).mean()) for i in range(n)]
    chance = [float(np.delete(_jaccard(labels[i], labels), i).mean()) for i in range(n)]
    return {"overlap": float(np.mean(per_query)), "chance": float(np.mean(chance)), "k": k}


def precision_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Hits among the k best-scored items / min(k, number of positives); NaN without positives."""
    positives = np.asarray(positives).astype(bool)
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(positives[top].sum() / min(k, n_pos))


def keyword_precision(
    similarity: np.ndarray, labels: np.ndarray, names: Sequence[str], ks: Sequence[int] = KEYWORD_KS
) -> dict[str, Any]:
    """Per finding: precision@k of query row f (finding ``names[f]``) against label column f."""
    per_finding: dict[str, dict[str, float | int]] = {}
    for f, name in enumerate(names):
        positives = np.asarray(labels)[:, f].astype(bool)
        if not positives.any():
            continue
        entry: dict[str, float | int] = {"positives": int(positives.sum())}
        for k in ks:
            entry[f"P@{k}"] = precision_at_k(similarity[f], positives, k)
        per_finding[name] = entry
    mean = {f"P@{k}": float(np.mean([e[f"P@{k}"] for e in per_finding.values()])) if per_finding else float("nan") for k in ks}
    return {"mean": mean, "per_finding": per_finding}


# --------------------------------------------------------------------------- embedding
@dataclass
class CaseEmbeddings:
    """Rows aligned with ``kept``: each scan as an index stores it (with the model's test-time
    augmentation) and as a query scan is encoded (without), and each report."""

    images: torch.Tensor
    image_queries: torch.Tensor
    reports: torch.Tensor
    kept: list[ManifestCase]
    skipped: dict[str, str]


def embed_cases(
    model: Any,
    records: Sequence[ManifestCase],
    loader: Callable[[Path], Volume] | None = None,
    workers: int = 0,
    batch_size: int = 8,
) -> CaseEmbeddings:
    """Image and report embeddings of the cases whose image loads, plus the skipped ones."""
    dataset = CaseDataset(records, model.make_preprocessor(), loader=loader)
    batches = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_for_pipe)
    indexed, queries, kept = [], [], []
    augmented = model.test_time_augmentation.views > 0
    for batch in map(batch_from_pipe, batches):
        if batch is None:
            continue
        queries.append(model.encode_image(batch["image"], batch_size=batch_size))
        indexed.append(model.encode_image(batch["image"], batch_size=batch_size, test_time_augmentation=True)
                       if augmented else queries[-1])
        kept.extend(dataset.records[i] for i in batch["index"].tolist())
    skipped = {r.case_id: "no image" for r in records if r.image is None}
    kept_ids = {r.case_id for r in kept}
    skipped.update({r.case_id: "image could not be used" for r in dataset.records if r.case_id not in kept_ids})
    empty = torch.empty(0, model.embed_dim)
    return CaseEmbeddings(images=torch.cat(indexed) if indexed else empty,
                          image_queries=torch.cat(queries) if queries else empty,
                          reports=model.encode_text([r.report for r in kept]), kept=kept, skipped=skipped)


def evaluate_embeddings(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    labels: np.ndarray,
    finding_names: Sequence[str],
    finding_embeds: torch.Tensor | None,
    image_query_embeds: torch.Tensor | None = None,
) -> dict[str, Any]:
    """All metrics from embeddings (rows aligned: case i's image, report and labels).

    ``image_embeds`` are the scans as the index holds them, searched by reports and finding
    names; ``image_query_embeds`` the same scans encoded as queries (default: the same), which
    search the reports and the other scans.
    """
    img = image_embeds.double().numpy()
    txt = text_embeds.double().numpy()
    query = img if image_query_embeds is None else image_query_embeds.double().numpy()
    result: dict[str, Any] = {
        "text_to_image": retrieval_metrics(txt @ img.T),
        "image_to_text": retrieval_metrics(query @ txt.T),
    }
    if len(finding_names):
        image_to_image = query @ img.T
        result["image_to_image_label_overlap"] = {
            f"@{k}": label_overlap_at_k(image_to_image, labels, k) for k in OVERLAP_KS
        }
        if finding_embeds is not None:
            result["keyword"] = keyword_precision(finding_embeds.double().numpy() @ img.T, labels, finding_names)
    return result


def finding_names_of(records: Sequence[ManifestCase]) -> list[str]:
    """Label names present in the records, in first-seen order."""
    return list(dict.fromkeys(name for r in records for name in r.labels))


def label_matrix(records: Sequence[ManifestCase], names: Sequence[str]) -> np.ndarray:
    """(cases, findings) 0/1 labels; a finding a record does not state counts as absent."""
    return np.array([[r.labels.get(n, 0) for n in names] for r in records], dtype=np.int64).reshape(len(records), len(names))


def evaluate_model(
    model: Any,
    records: Sequence[ManifestCase],
    loader: Callable[[Path], Volume] | None = None,
    workers: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    embeds = embed_cases(model, records, loader, workers, batch_size)
    if len(embeds.kept) < 2:
        raise MedFinderError(
            f"Only {len(embeds.kept)} case(s) with a usable image and report; evaluation needs at least 2.")
    names = finding_names_of(embeds.kept)
    labels = label_matrix(embeds.kept, names)
    finding_embeds = model.encode_text(names) if names else None
    result = evaluate_embeddings(embeds.images, embeds.reports, labels, names, finding_embeds, embeds.image_queries)
    result["test_time_views"] = model.test_time_augmentation.views
    result["cases"] = len(embeds.kept)
    result["skipped"] = embeds.skipped
    return result



def json_safe(value: Any) -> Any:
    """NaN (a metric with nothing to measure) becomes null, so stdout stays valid JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def evaluate_manifest(model: str | Path, manifest: str | Path, split: str = "test", workers: int = 0,
                      batch_size: int = 8, loader: Callable[[Path], Volume] | None = None) -> dict[str, Any]:
    """``evaluate_model`` on one split of a manifest, with the model named in the result."""
    from ..model import load_model

    records = select_split(read_manifest(manifest), split)  # before the model: a bad CSV fails fast
    if not records:
        raise MedFinderError(f"The manifest {manifest} has no cases in the {split} split.")
    trained = load_model(model)
    result = evaluate_model(trained, records, workers=workers, batch_size=batch_size, loader=loader)
    return {"model": trained.config.name, "fingerprint": trained.fingerprint, "manifest": str(manifest),
            "split": split, **result}
