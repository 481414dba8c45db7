"""Keyword retrieval on real reports: precision@k per labelled finding, as JSON.

Each report of the CSV is a case and each label column its ground truth.  For every label
the label name is searched (and, separately, each paraphrased query of
benchmarks/paraphrase_queries.yaml); precision@k = relevant cases in the top k divided by
min(k, number of positives).  A substring baseline ranks the cases that contain the query
text by how often they contain it.  The two halves of the CSV are also scored on their
own (the lexicon was tuned reading the first half only; the second half is held out).

    python benchmarks/keyword_retrieval.py --reports ../shared/data/reports/ctrate_reports_train.csv

Also measured: parse and index speed, search latency, and the same at --scale cases
(the real reports repeated under new ids) with the size of the saved postings.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from medfinder.index.keywords import KeywordIndex  # noqa: E402
from medfinder.text.reports import parse_reports  # noqa: E402

HERE = Path(__file__).resolve().parent


def precision_at_k(ranked: list[str], positives: set[str], k: int) -> float:
    if not positives:
        return float("nan")
    return sum(1 for case in ranked[:k] if case in positives) / min(k, len(positives))


def substring_ranking(texts: dict[str, str], phrase: str) -> list[str]:
    phrase = phrase.lower()
    counts = [(case, text.lower().count(phrase)) for case, text in texts.items()]
    return [case for case, c in sorted(counts, key=lambda x: -x[1]) if c > 0]


def score_queries(index: KeywordIndex, texts: dict[str, str], labels: dict[str, set[str]],
                  queries: list[tuple[str, str]], k: int) -> dict:
    ours, base, rows = {}, {}, []
    for query, label in queries:
        positives = labels[label]
        p_ours = precision_at_k([c for c, _ in index.search(query, k)], positives, k)
        p_base = precision_at_k(substring_ranking(texts, query), positives, k)
        rows.append({"query": query, "label": label, "p_at_k": round(p_ours, 3), "substring_p_at_k": round(p_base, 3)})
        ours.setdefault(label, []).append(p_ours)
        base.setdefault(label, []).append(p_base)

    def summary(per: dict[str, list[float]]) -> dict:
        per_label = {lab: round(statistics.mean(v), 3) for lab, v in per.items()}
        return {"per_label": per_label, "mean": round(statistics.mean(per_label.values()), 4)}

    return {"ours": summary(ours), "substring": summary(base), "queries": rows}


def label_agreement(reports: dict, labels: dict[str, set[str]]) -> dict:
    """F1 of Report.present(include_broader=True) against each label column."""
    out = {}
    for label, positives in labels.items():
        predicted = {c for c, r in reports.items() if label in r.present(include_broader=True)}
        tp = len(predicted & positives)
        p = tp / len(predicted) if predicted else 0.0
        r = tp / len(positives) if positives else 0.0
        f1 = round(2 * p * r / (p + r), 3) if tp else 0.0
        out[label] = {"precision": round(p, 3), "recall": round(r, 3), "f1": f1}
    out["mean_f1"] = round(statistics.mean(v["f1"] for v in out.values()), 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", required=True, help="CSV with report_text and one 0/1 column per label")
    ap.add_argument("--paraphrases", default=str(HERE / "paraphrase_queries.yaml"))
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--scale", type=int, default=100_000, help="cases for the scaling test (0 to skip)")
    args = ap.parse_args()

    path = Path(args.reports)
    if not path.is_file():
        print(f"The reports CSV {path} does not exist.", file=sys.stderr)
        return 2
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "report_text" not in rows[0]:
        print(f"The reports CSV {path} has no report_text column.", file=sys.stderr)
        return 2
    label_names = [c for c in rows[0] if c not in ("AccessionNo", "report_text", "case_id", "VolumeName")]
    ids = [f"case{i:05d}" for i in range(len(rows))]
    texts = dict(zip(ids, (r["report_text"] for r in rows)))
    paraphrases = [(q["query"], q["label"]) for q in yaml.safe_load(Path(args.paraphrases).read_text())["queries"]]

    t0 = time.perf_counter()
    parsed = dict(zip(ids, parse_reports(texts.values())))
    parse_s = time.perf_counter() - t0

    def evaluate(case_ids: list[str]) -> dict:
        index = KeywordIndex()
        for case in case_ids:
            index.add(case, parsed[case])
        sub_texts = {c: texts[c] for c in case_ids}
        labels = {lab: {c for c, r in zip(ids, rows) if c in sub_texts and r[lab] == "1"} for lab in label_names}
        return {
            "cases": len(case_ids),
            "label_queries": score_queries(index, sub_texts, labels, [(lab, lab) for lab in label_names], args.k),
            "paraphrase_queries": score_queries(index, sub_texts, labels, paraphrases, args.k),
        }

    t0 = time.perf_counter()
    full_index = KeywordIndex()
    for case in ids:
        full_index.add(case, parsed[case])
    build_s = time.perf_counter() - t0
    queries = label_names + [q for q, _ in paraphrases]
    latencies = []
    for q in queries * 3:
        t0 = time.perf_counter()
        full_index.search(q, args.k)
        latencies.append((time.perf_counter() - t0) * 1000)

    everything = evaluate(ids)
    half = len(ids) // 2
    first, second = evaluate(ids[:half]), evaluate(ids[half:])
    labels_all = {lab: {c for c, r in zip(ids, rows) if r[lab] == "1"} for lab in label_names}
    result = {
        "reports": str(path),
        "k": args.k,
        "cases": len(ids),
        "label_queries": {
            "per_label": everything["label_queries"]["ours"]["per_label"],
            "mean": everything["label_queries"]["ours"]["mean"],
            "substring_baseline": everything["label_queries"]["substring"],
        },
        "paraphrase_queries": {
            "per_label": everything["paraphrase_queries"]["ours"]["per_label"],
            "mean": everything["paraphrase_queries"]["ours"]["mean"],
            "substring_baseline": everything["paraphrase_queries"]["substring"],
            "per_query": everything["paraphrase_queries"]["queries"],
        },
        "halves": {
            name: {
                "cases": part["cases"],
                "label_mean": part["label_queries"]["ours"]["mean"],
                "label_substring_mean": part["label_queries"]["substring"]["mean"],
                "paraphrase_mean": part["paraphrase_queries"]["ours"]["mean"],
                "paraphrase_substring_mean": part["paraphrase_queries"]["substring"]["mean"],
            }
            for name, part in (("first_half_dev", first), ("second_half_held_out", second))
        },
        "label_agreement_present_vs_labels": label_agreement(parsed, labels_all),
        "timing": {
            "parse_s": round(parse_s, 3),
            "reports_per_s": round(len(ids) / parse_s, 1),
            "index_add_parsed_s": round(build_s, 3),
            "search_ms_p50": round(statistics.median(latencies), 3),
            "search_ms_p95": round(sorted(latencies)[int(0.95 * len(latencies))], 3),
        },
    }
    if args.scale > 0:
        result["scale"] = scale_test(list(parsed.values()), queries, args.scale, args.k)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def scale_test(reports: list, queries: list[str], n: int, k: int) -> dict:
    index = KeywordIndex()
    t0 = time.perf_counter()
    for i in range(n):
        index.add(f"s{i:07d}", reports[i % len(reports)])
    add_s = time.perf_counter() - t0
    latencies = []
    for q in queries * 2:
        t0 = time.perf_counter()
        index.search(q, k)
        latencies.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    blob = json.dumps(index.to_dict())
    dump_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    KeywordIndex.from_dict(json.loads(blob))
    load_s = time.perf_counter() - t0
    return {
        "cases": n,
        "add_parsed_s": round(add_s, 2),
        "search_ms_p50": round(statistics.median(latencies), 3),
        "search_ms_p95": round(sorted(latencies)[int(0.95 * len(latencies))], 3),
        "to_dict_json_mb": round(len(blob) / 1e6, 1),
        "to_dict_and_dumps_s": round(dump_s, 2),
        "loads_and_from_dict_s": round(load_s, 2),
    }


if __name__ == "__main__":
    sys.exit(main())
