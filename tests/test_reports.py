"""The report engine: finding mentions with negation / uncertainty / history / side,
lexicon expansion, query operators, the keyword index and highlights.

Every report snippet here is written for the test; none is copied from a dataset.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from medfinder.errors import CaseIndexError, MedFinderError, ReportError
from medfinder.index.keywords import KeywordIndex
from medfinder.text.highlight import highlight, highlight_findings
from medfinder.text.lexicon import Lexicon
from medfinder.text.queries import parse_query
from medfinder.text.reports import MAX_REPORT_CHARS, decode_report_bytes, parse_report

SHARED_REPORTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "reports" / "ctrate_reports_train.csv"
CT_RATE_LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]


def statuses(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in parse_report(text).findings:
        out.setdefault(f.name, set()).add(f.status)
    return out


def only(text: str, name: str):
    found = [f for f in parse_report(text).findings if f.name == name]
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------------------- status
@pytest.mark.parametrize("text", [
    "No pleural effusion.",
    "Pleural effusion-thickening was not detected in either hemithorax.",
    "There is no evidence of pleural effusion.",
    "Pleural effusion is absent.",
    "Examination of the pleural spaces: pleural effusion was not observed.",
    # structured reports answer after a colon or a dash
    "Pleural effusion: none.",
    "Pleural effusion: absent.",
    "Pleural effusion: no.",
    "Pleural effusion: negative.",
    "Pleural effusion - none.",
    "Effusions: none",
    "FINDINGS:\nPleural effusion: not seen\nEmphysema: moderate",
])
def test_negated_mentions(text):
    assert statuses(text)["Pleural effusion"] == {"negated"}


@pytest.mark.parametrize("text,negated,affirmed", [
    ("FINDINGS:\nPneumothorax: none\nEmphysema: no change since the prior study\nPleural effusion: small, right",
     "Pneumothorax", ("Emphysema", "Pleural effusion")),
    ("Pleural effusion: small, pneumothorax: none.", "Pneumothorax", ("Pleural effusion",)),
    ("Emphysema - moderate, pneumothorax - none.", "Pneumothorax", ("Emphysema",)),
    ("Cardiomegaly, pericardial effusion: none.", "Pericardial effusion", ("Cardiomegaly",)),
    ("Bilateral pleural effusion - negative for pneumothorax.", "Pneumothorax", ("Pleural effusion",)),
])
def test_a_structured_answer_negates_only_the_finding_it_follows(text, negated, affirmed):
    s = statuses(text)
    assert s[negated] == {"negated"}
    for name in affirmed:
        assert s[name] == {"affirmed"}, name
    assert statuses("Lung nodule: 4 mm - negative for malignancy features.")["Lung nodule"] == {"affirmed"}


def test_negation_does_not_reach_a_new_clause():
    s = statuses("No mediastinal mass was detected, and there is a 6 mm nodule in the right lower lobe.")
    assert s["Lung nodule"] == {"affirmed"}
    assert "affirmed" not in s.get("Mass", set())


def test_negation_scope_is_bounded_in_long_sentences():
    text = ("No pleural effusion was found on either side of the chest on this examination today "
            "while a small consolidation is present in the left lower lobe.")
    assert statuses(text)["Consolidation"] == {"affirmed"}


@pytest.mark.parametrize("text,name", [
    ("A small pneumothorax cannot be excluded.", "Pneumothorax"),
    ("Possible consolidation in the left lower lobe.", "Consolidation"),
    ("Findings suspicious for lymphadenopathy in the hilum.", "Lymphadenopathy"),
    ("Evaluate for pulmonary embolism.", "Pulmonary embolism"),
    # "not excluded" keeps it possible: never a negation
    ("Pleural effusion is not excluded.", "Pleural effusion"),
    ("Pneumothorax not excluded.", "Pneumothorax"),
    ("Pneumothorax is not ruled out.", "Pneumothorax"),
    ("Pulmonary embolism was not excluded.", "Pulmonary embolism"),
    ("Pleural effusions were not excluded.", "Pleural effusion"),
    ("Pneumothorax was not ruled out.", "Pneumothorax"),
])
def test_uncertain_mentions_are_neither_affirmed_nor_negated(text, name):
    assert statuses(text)[name] == {"uncertain"}


def test_a_doubted_label_in_brackets_does_not_doubt_the_finding():
    s = statuses("A 5 mm nodule in the right upper lobe (granuloma?).")
    assert "affirmed" in s["Lung nodule"]


@pytest.mark.parametrize("text", [
    "The left pleural effusion seen previously has resolved.",
    "History of pleural effusion.",
    "CLINICAL INFORMATION: pleural effusion on a prior radiograph.\nFINDINGS: The lungs are clear.",
])
def test_historical_mentions(text):
    assert statuses(text)["Pleural effusion"] == {"historical"}


def test_present_lists_affirmed_findings_only():
    report = parse_report("Small right pleural effusion. No pneumothorax. Possible consolidation. "
                          "Ground-glass opacity in the left upper lobe.")
    assert report.present() == {"Pleural effusion", "Ground glass opacity"}
    assert "Lung opacity" in report.present(include_broader=True)
    assert "Pneumothorax" in report.absent()


# ---------------------------------------------------------------------------- laterality
@pytest.mark.parametrize("text,name,side", [
    ("Small right pleural effusion.", "Pleural effusion", "right"),
    ("Subsegmental atelectasis in both lungs.", "Atelectasis", "bilateral"),
    ("Consolidation in the left lower lobe.", "Consolidation", "left"),
    ("Bilateral pleural effusions.", "Pleural effusion", "bilateral"),
    ("Pleural effusion.", "Pleural effusion", None),
])
def test_laterality(text, name, side):
    assert only(text, name).laterality == side


def test_laterality_stays_with_its_own_finding():
    report = parse_report("Right pleural effusion and left basal atelectasis.")
    sides = {f.name: f.laterality for f in report.findings}
    assert sides == {"Pleural effusion": "right", "Atelectasis": "left"}


def test_unpaired_organs_have_no_side():
    assert only("Cardiomegaly with a right-sided aortic arch.", "Cardiomegaly").laterality is None


# ---------------------------------------------------------------------------- structure
def test_sections_sentences_and_spans():
    text = ("CLINICAL INFORMATION: cough.\nTECHNIQUE: Non-contrast chest CT.\n"
            "FINDINGS:\nNo pericardial effusion\nMild emphysema in both upper lobes.\n"
            "IMPRESSION: Emphysema.")
    report = parse_report(text)
    assert [name for name, _, _ in report.sections] == ["clinical information", "technique", "findings", "impression"]
    for name, start, end in report.sections:
        assert text[start:end].lower().startswith(name.split()[0])
    # A line break ends a sentence: the negation must not reach the emphysema line.
    emphysema = [f for f in report.findings if f.name == "Emphysema"]
    assert {f.status for f in emphysema} == {"affirmed"}
    assert {f.section for f in emphysema} == {"findings", "impression"}
    for f in report.findings:
        assert text[f.start:f.end] == f.text
    assert all(text[s:e].strip() for s, e in report.sentences)


def test_report_without_headings_is_one_section():
    report = parse_report("Hiatal hernia. Cardiomegaly.")
    assert report.sections == [("report", 0, len(report.text))]
    assert report.present() == {"Hiatal hernia", "Cardiomegaly"}


def test_empty_report():
    report = parse_report("")
    assert report.findings == [] and report.sections == [] and report.present() == set()


# ---------------------------------------------------------------------------- lexicon
def test_lexicon_has_the_label_spellings_and_more():
    names = Lexicon.default().canonical_names
    for label in CT_RATE_LABELS + ["Pneumothorax", "Lung mass", "Ground glass opacity", "Fracture",
                                   "Aneurysm", "Pulmonary embolism"]:
        assert label in names
    assert Lexicon.default() is Lexicon.default()


@pytest.mark.parametrize("query,finding", [
    ("fluid on the lung", "Pleural effusion"),
    ("enlarged heart", "Cardiomegaly"),
    ("swollen lymph nodes", "Lymphadenopathy"),
    ("fluid around the heart", "Pericardial effusion"),
    ("collapsed lung", "Pneumothorax"),
    ("collapsed lung", "Atelectasis"),
    ("shortness of breath", "Pleural effusion"),
    ("GGO", "Ground glass opacity"),
    ("PE", "Pulmonary embolism"),
    ("pericardial PE", "Pericardial effusion"),
    ("LAD", "Lymphadenopathy"),
    ("calcified LAD", "Coronary artery wall calcification"),
])
def test_lay_words_and_abbreviations_expand(query, finding):
    assert finding in parse_query(query).include_findings


def test_lay_words_are_not_read_as_findings_in_reports():
    # "growth" is a lay word for a mass, but in a report it means something else.
    assert parse_report("Interval growth of the thyroid was noted.").findings == []


@pytest.mark.parametrize("text,expected,not_expected", [
    ("Calcific atheroma plaques in the aorta and coronary arteries.",
     {"Arterial wall calcification", "Coronary artery wall calcification"}, set()),
    ("Calcified plaques in the coronary arteries.",
     {"Coronary artery wall calcification"}, {"Arterial wall calcification"}),
    ("Subcutaneous emphysema in the chest wall.", {"Subcutaneous emphysema"}, {"Emphysema"}),
    ("A hypodense nodule in the left thyroid lobe.", {"Thyroid nodule"}, {"Lung nodule"}),
    ("Pericardial thickening-effusion is present.", {"Pericardial effusion"}, {"Pleural effusion"}),
    ("Enlarged mediastinal lymph nodes.", {"Lymphadenopathy"}, set()),
    ("Millimetric lymph nodes in the mediastinum.", set(), {"Lymphadenopathy"}),
    ("Heart size increased.", {"Cardiomegaly"}, set()),
    ("Omental implants are seen.", {"Metastasis"}, {"Medical material"}),
])
def test_words_named_by_their_context(text, expected, not_expected):
    present = parse_report(text).present()
    assert expected <= present
    assert not (not_expected & present)


def test_lexicon_refuses_unquoted_no(tmp_path):
    bad = tmp_path / "lexicon.yaml"
    bad.write_text("findings:\n  - name: Effusion\n    terms: [effusion]\nnegation:\n  add:\n    preceding: [no]\n")
    with pytest.raises(ReportError, match="lexicon.yaml"):
        Lexicon.from_yaml(bad)


def test_lexicon_refuses_unknown_broader_finding(tmp_path):
    bad = tmp_path / "lexicon.yaml"
    bad.write_text("findings:\n  - name: Ground glass\n    broader: [Opacity]\n")
    with pytest.raises(ReportError, match="Opacity"):
        Lexicon.from_yaml(bad)


# ---------------------------------------------------------------------------- queries
def test_query_operators():
    q = parse_query("right pleural effusion and atelectasis without pneumothorax")
    assert q.include_findings == ["Pleural effusion", "Atelectasis"]
    assert q.exclude_findings == ["Pneumothorax"]
    assert q.parts[0].laterality == "right" and q.parts[1].laterality is None
    assert parse_query("no pericardial effusion").exclude_findings == ["Pericardial effusion"]
    assert parse_query("emphysema, not bulla").exclude_findings == ["Bulla"]
    assert parse_query("emphysema -bulla").exclude_findings == ["Bulla"]
    either = parse_query("GGO or consolidation")
    assert len(either.parts) == 1 and set(either.parts[0].findings) == {"Ground glass opacity", "Consolidation"}
    both = parse_query("effusion without atelectasis or pneumothorax")
    assert set(both.exclude_findings) == {"Atelectasis", "Pneumothorax"}
    free = parse_query("nodule in the left upper lobe")
    assert free.include_findings == ["Lung nodule"] and free.laterality == "left"
    assert free.free_words == ["upper", "lobe"]


# ---------------------------------------------------------------------------- index
@pytest.fixture(scope="module")
def index() -> KeywordIndex:
    idx = KeywordIndex()
    idx.add_many([
        ("normal", "No pleural effusion. No pneumothorax. Lungs are clear."),
        ("right", "Small right pleural effusion. Mild cardiomegaly."),
        ("left", "Large left pleural effusion with basal atelectasis."),
        ("maybe", "Pleural effusion cannot be excluded."),
        ("ptx", "Right pneumothorax with adjacent atelectasis. No pleural effusion."),
        ("cyst", "A simple cyst in the right kidney. No pleural effusion."),
        ("gone", "The right pleural effusion has resolved."),
    ])
    return idx


def ids(results):
    return [case for case, _ in results]


def test_negated_and_historical_mentions_never_match(index):
    found = ids(index.search("pleural effusion", k=10))
    assert set(found) == {"right", "left", "maybe"}
    assert found[-1] == "maybe"  # uncertain counts less than affirmed


def test_laterality_boosts(index):
    assert ids(index.search("right pleural effusion", k=3))[0] == "right"
    assert ids(index.search("left pleural effusion", k=3))[0] == "left"


def test_and_without_and_exclusion_only(index):
    assert ids(index.search("atelectasis and pleural effusion"))[0] == "left"
    assert ids(index.search("atelectasis without pleural effusion")) == ["ptx"]
    no_effusion = ids(index.search("no pleural effusion", k=10))
    assert {"right", "left"}.isdisjoint(no_effusion)
    assert set(no_effusion[:3]) == {"normal", "ptx", "cyst"}  # explicit denials first


def test_lay_query_and_free_words(index):
    assert ids(index.search("fluid on the lung", k=2))[0] in {"right", "left"}
    assert ids(index.search("kidney cyst")) == ["cyst"]
    assert index.search("") == [] and index.search("hiatal hernia") == []


def test_scores_are_best_first(index):
    scores = [s for _, s in index.search("pleural effusion or atelectasis", k=10)]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4


def test_remove_replace_and_roundtrip():
    idx = KeywordIndex()
    idx.add("a", "Right pleural effusion.")
    idx.add("b", "Emphysema.")
    idx.add("b", "Pleural effusion in both hemithoraces.")  # replaces the first report of b
    assert len(idx) == 2 and ids(idx.search("emphysema")) == []
    idx.remove("a")
    assert ids(idx.search("pleural effusion")) == ["b"] and "a" not in idx
    with pytest.raises(CaseIndexError):
        idx.remove("a")
    copy = KeywordIndex.from_dict(json.loads(json.dumps(idx.to_dict())))
    assert copy.search("bilateral pleural effusion") == idx.search("bilateral pleural effusion")
    assert len(copy) == 1


def test_from_dict_refuses_other_lexicon_and_damage():
    data = KeywordIndex().to_dict()
    with pytest.raises(CaseIndexError, match="lexicon"):
        KeywordIndex.from_dict({**data, "lexicon": "0000"})
    with pytest.raises(CaseIndexError):
        KeywordIndex.from_dict({**data, "cases": ["x"]})
    with pytest.raises(CaseIndexError):
        KeywordIndex.from_dict({"format": "something else"})


# ---------------------------------------------------------------------------- highlights
def test_highlight_marks_matches_negations_and_uncertainty():
    text = "No pleural effusion on the left. Small right pleural effusion. Pneumothorax cannot be excluded."
    segments = highlight("pleural effusion or pneumothorax", text)
    assert "".join(s for s, _ in segments) == text
    labelled = [(s, label) for s, label in segments if label]
    assert labelled == [("pleural effusion", "negated"), ("pleural effusion", "match"), ("Pneumothorax", "uncertain")]


def test_highlight_includes_narrower_findings_and_free_words():
    segments = highlight("lung opacity kidney", "Ground-glass opacity in the left lower lobe. Kidney normal.")
    assert ("Ground-glass opacity", "match") in segments and ("Kidney", "match") in segments


def test_highlight_all_findings_for_image_queries():
    segments = highlight_findings("Emphysema. No pleural effusion.")
    assert [(s, label) for s, label in segments if label] == [("Emphysema", "present"), ("pleural effusion", "negated")]
    assert highlight(None, "Emphysema. No pleural effusion.") == segments


def test_markup_in_a_report_stays_plain_text():
    text = "<b>Right pleural effusion</b><script>alert('x')</script> &amp; no pneumothorax"
    report = parse_report(text)
    assert report.text == text
    assert only(text, "Pleural effusion").text == "pleural effusion"
    segments = highlight("pleural effusion", report)
    assert "".join(s for s, _ in segments) == text
    assert any("<script>alert('x')</script>" in s and label is None for s, label in segments)


# ---------------------------------------------------------------------------- bad input
def test_oversized_report_is_refused_quickly():
    huge = "Pleural effusion. " * (10_000_000 // 18)
    start = time.perf_counter()
    with pytest.raises(ReportError, match="limit") as err:
        parse_report(huge)
    assert time.perf_counter() - start < 0.5
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    parse_report("x" * MAX_REPORT_CHARS)  # the limit itself is allowed


def test_bytes_and_non_text_are_refused():
    with pytest.raises(ReportError, match="decode_report_bytes"):
        parse_report(b"No effusion.")
    with pytest.raises(MedFinderError):
        parse_report(None)


@pytest.mark.parametrize("data,expected", [
    ("Pleural effusion – small".encode("utf-8"), "Pleural effusion – small"),
    ("Pleural effusion – small".encode("cp1252"), "Pleural effusion – small"),
    ("Efusión pleural".encode("latin-1"), "Efusión pleural"),
    (b"\xef\xbb\xbfNo effusion.", "No effusion."),
    ("No effusion.".encode("utf-16"), "No effusion."),
    (b"Effusion \x81 noted", "Effusion \x81 noted"),  # undefined in cp1252: Latin-1 keeps it
])
def test_decode_report_bytes(data, expected):
    assert decode_report_bytes(data) == expected


def test_decode_refuses_binary():
    with pytest.raises(ReportError, match="binary"):
        decode_report_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")


# ---------------------------------------------------------------------------- real reports
def test_label_queries_on_real_reports():
    if not SHARED_REPORTS.is_file():
        pytest.skip(f"{SHARED_REPORTS} is not available")
    with SHARED_REPORTS.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    index = KeywordIndex()
    index.add_many((str(i), row["report_text"]) for i, row in enumerate(rows))
    precisions = []
    for label in CT_RATE_LABELS:
        positives = {str(i) for i, row in enumerate(rows) if row[label] == "1"}
        top = ids(index.search(label, k=20))
        precisions.append(sum(case in positives for case in top) / min(20, len(positives)))
    assert sum(precisions) / len(precisions) >= 0.9
