"""Reports: Technique / Findings / Impression, organ by organ, in varied wording.

Reports are written from the findings as painted and visible (``PhantomFinding``), not from the
plan, so a report states what the volume shows. Only the indication reads the plan's conditions.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .records import LOBES, PhantomFinding

#: Ways an absent finding is negated (several phrasings, as radiologists write them).
NEGATIONS: dict[str, tuple[str, ...]] = {
    "Pleural effusion": ("No pleural effusion.", "No pleural effusion or pleural thickening is seen.",
                         "There is no pleural fluid.", "Pleural effusion-thickening is not seen."),
    "Pneumothorax": ("No pneumothorax.", "No pneumothorax is seen.", "There is no pneumothorax."),
    "Lung nodule": ("No pulmonary nodule.", "No suspicious pulmonary nodules are identified.",
                    "There is no nodular lesion in either lung."),
    "Lung mass": ("No lung mass.", "No mass lesion is seen in the lungs.", "There is no pulmonary mass."),
    "Consolidation": ("No consolidation.", "No airspace consolidation.", "There is no focal consolidation."),
    "Lung opacity": ("No ground-glass opacity.", "No infiltrate or ground-glass opacity is seen.",
                     "There are no areas of ground-glass density."),
    "Emphysema": ("No emphysema.", "No emphysematous changes are seen."),
    "Atelectasis": ("No atelectasis.", "No atelectasis or volume loss.", "There is no atelectasis."),
    "Bronchiectasis": ("No bronchiectasis.", "The bronchi are of normal calibre without bronchiectasis."),
    "Interlobular septal thickening": ("No interlobular septal thickening.", "No septal thickening is seen."),
    "Cardiomegaly": ("Heart size is normal.", "The heart is not enlarged.", "No cardiomegaly.",
                     "Cardiac size is within normal limits."),
    "Pericardial effusion": ("No pericardial effusion.", "No pericardial effusion or thickening.",
                             "Pericardial effusion or thickening is not observed."),
    "Lymphadenopathy": ("No enlarged lymph nodes in the mediastinum or hila.", "No mediastinal or hilar lymphadenopathy.",
                        "Mediastinal and hilar lymph nodes are not enlarged by size criteria."),
    "Arterial wall calcification": ("No calcified plaque in the aortic wall.",
                                    "The thoracic aorta is normal in calibre, without wall calcification.",
                                    "No atherosclerotic calcification of the aorta."),
    "Coronary artery wall calcification": ("No coronary artery calcification.", "The coronary arteries show no calcification."),
    "Hiatal hernia": ("No hiatal hernia.", "There is no hiatus hernia."),
    "Medical material": ("No lines, tubes or devices.", "No medical devices are seen."),
}

#: How often an absent finding is negated explicitly (the rest are simply not mentioned).
_NEGATE_P = {"Pleural effusion": 0.85, "Pneumothorax": 0.5, "Lung nodule": 0.6, "Lung mass": 0.3, "Consolidation": 0.5,
             "Lung opacity": 0.35, "Emphysema": 0.35, "Atelectasis": 0.3, "Bronchiectasis": 0.2,
             "Interlobular septal thickening": 0.15, "Cardiomegaly": 0.8, "Pericardial effusion": 0.75,
             "Lymphadenopathy": 0.8, "Arterial wall calcification": 0.4, "Coronary artery wall calcification": 0.35,
             "Hiatal hernia": 0.3, "Medical material": 0.1}

_MEDIASTINUM = ("Cardiomegaly", "Pericardial effusion", "Arterial wall calcification", "Coronary artery wall calcification",
                "Lymphadenopathy", "Hiatal hernia", "Medical material")
_LUNGS = ("Emphysema", "Lung mass", "Lung nodule", "Consolidation", "Lung opacity", "Atelectasis", "Bronchiectasis",
          "Interlobular septal thickening")
_PLEURA = ("Pleural effusion", "Pneumothorax")

_INDICATIONS = {
    "heart failure": ("shortness of breath", "exertional dyspnoea and leg swelling", "orthopnoea"),
    "infection": ("fever and productive cough", "cough and fever for five days", "raised inflammatory markers and cough"),
    "malignancy": ("weight loss and haemoptysis", "unintentional weight loss", "persistent cough and weight loss"),
    "smoker": ("long-term smoker with chronic cough", "smoking history, progressive dyspnoea", "chronic cough"),
    "atherosclerosis": ("atypical chest pain", "hypertension, chest discomfort"),
    None: ("chest pain", "cough", "preoperative assessment", "dyspnoea", "routine evaluation", "palpitations"),
}

_CORONARY_NAMES = {"LAD": "left anterior descending", "LCx": "circumflex", "RCA": "right coronary"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class _Writer:
    """Sentence choices for one report (its own random stream)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def lobe(self, f: PhantomFinding) -> str:
        if not f.lobe:
            return "lung"
        if f.detail.get("lingula"):
            return self.pick(["lingula of the left lung", "lingular segment of the left upper lobe"])
        side, level = f.lobe.split()[:2]
        if f.lobe in LOBES:
            return self.pick([f.lobe, f"{level} lobe of the {side} lung", f"{side} lung {level} lobe"])
        return f.lobe

    def lobes(self, fs: Sequence[PhantomFinding]) -> str:
        seen: list[str] = []
        for f in fs:
            name = "lingula" if f.detail.get("lingula") else (f.lobe or "lung")
            if name not in seen:
                seen.append(name)
        return _join(seen)

    # ---- present findings ------------------------------------------------------------------
    def present(self, name: str, fs: list[PhantomFinding], ctr: float) -> list[str]:
        p, f = self.pick, fs[0]
        if name == "Lung nodule":
            fs = sorted(fs, key=lambda g: -g.size_mm)
            f = fs[0]
            kind = {"solid": "solid", "ground-glass": p(["ground-glass", "non-solid", "pure ground-glass"]),
                    "part-solid": p(["part-solid", "subsolid"])}[f.detail["type"]]
            size = int(f.size_mm)
            if len(fs) == 1:
                return [p([f"A {size} mm {kind} nodule is seen in the {self.lobe(f)}.",
                           f"There is a {kind} pulmonary nodule measuring {size} mm in the {self.lobe(f)}.",
                           f"{_cap(kind)} nodule, {size} mm in diameter, in the {self.lobe(f)}.",
                           f"In the {self.lobe(f)}, a {size} mm {kind} nodular lesion is noted."])]
            others = _join([f"{int(g.size_mm)} mm in the {self.lobe(g)}" for g in fs[1:]])
            return [p([f"{len(fs)} pulmonary nodules are present; the largest is a {size} mm {kind} nodule in the "
                       f"{self.lobe(f)}, others measure {others}.",
                       f"Multiple lung nodules: {size} mm ({kind}) in the {self.lobe(f)}, and {others}."])]
        if name == "Lung mass":
            a, b = int(f.size_mm), int(f.detail.get("short_mm", f.size_mm * 0.8))
            m = f.detail.get("margin", "lobulated")
            return [p([f"A {a} x {b} mm {m} mass is present in the {self.lobe(f)}.",
                       f"There is a mass lesion measuring {a} x {b} mm in the {self.lobe(f)}, with {m} margins.",
                       f"A {m} soft-tissue mass of {a} x {b} mm occupies the {self.lobe(f)}."])]
        if name == "Pleural effusion":
            by = {g.side: g for g in fs}
            if len(by) == 2:
                r, l_ = by["right"], by["left"]
                return [p([f"Bilateral pleural effusions, {r.severity} on the right ({int(r.size_mm)} mm) and "
                           f"{l_.severity} on the left ({int(l_.size_mm)} mm).",
                           f"There are bilateral pleural effusions measuring {int(r.size_mm)} mm on the right and "
                           f"{int(l_.size_mm)} mm on the left in maximal thickness."])]
            return [p([f"{_cap(f.severity or '')} {f.side} pleural effusion with a maximum thickness of {int(f.size_mm)} mm.",
                       f"There is a {f.severity} pleural effusion on the {f.side}, {int(f.size_mm)} mm thick.",
                       f"{_cap(f.severity or '')} {f.side}-sided pleural effusion, measuring {int(f.size_mm)} mm in depth."])]
        if name == "Pneumothorax":
            return [p([f"{_cap(f.severity or '')} {f.side} pneumothorax, measuring {int(f.size_mm)} mm at its greatest depth.",
                       f"There is a {f.side}-sided pneumothorax ({f.severity}, {int(f.size_mm)} mm).",
                       f"Air in the {f.side} pleural space, up to {int(f.size_mm)} mm deep, consistent with a {f.severity} pneumothorax."])]
        if name == "Consolidation":
            if f.severity == "lobar":
                return [p([f"Lobar consolidation of the {self.lobe(f)} with air bronchograms.",
                           f"There is dense consolidation throughout much of the {self.lobe(f)}, with air bronchograms."])]
            return [p([f"{_cap(f.severity or '')} consolidation with air bronchograms in the {self.lobe(f)}.",
                       f"There is an area of consolidation in the {self.lobe(f)} containing air bronchograms.",
                       f"Airspace consolidation involving the {self.lobe(f)}."])]
        if name == "Lung opacity":
            where = self.lobes(fs)
            if f.severity == "diffuse":
                return [p([f"Diffuse ground-glass opacities in both lungs, most pronounced in the {where}.",
                           f"Widespread areas of ground-glass density, most marked in the {where}."])]
            return [p([f"Patchy ground-glass opacities in the {where}.",
                       f"Areas of ground-glass density are seen in the {where}.",
                       f"Ground-glass opacification in the {where}."])]
        if name == "Emphysema":
            kind, zone = f.detail["type"], f.lobe or "upper lobes"
            sents = [p([f"{_cap(f.severity or '')} {kind} emphysema, predominantly in the {zone}.",
                        f"{_cap(kind)} emphysematous changes are present in the {zone} ({f.severity}).",
                        f"There are {f.severity} {kind} emphysematous areas in both lungs, {zone} predominant."])]
            if f.severity == "severe":
                sents.append(p(["Apical bullae are also present.", "Subpleural bullae are seen at the apices."]))
            return sents
        if name == "Atelectasis":
            out = []
            for g in fs:
                t = g.detail.get("type")
                if t == "passive":
                    out.append(p([f"Passive atelectasis of the adjacent {g.side} lower lobe.",
                                  f"Compressive atelectasis in the {g.side} lower lobe adjacent to the effusion."]))
                elif t == "dependent":
                    out.append(p([f"Dependent atelectasis in the posterior basal {g.side} lower lobe.",
                                  f"Mild posterior basal volume loss (atelectasis) in the {g.side} lower lobe."]))
                else:
                    out.append(p([f"{p(['Linear', 'Plate-like'])} atelectasis in the {self.lobe(g)}.",
                                  f"{_cap(g.severity or 'subsegmental')} atelectasis is seen in the {self.lobe(g)}.",
                                  f"Band-like atelectatic changes in the {self.lobe(g)}."]))
            return out
        if name == "Bronchiectasis":
            kind = f.detail["type"]
            return [p([f"{_cap(kind)} bronchiectasis with bronchial wall thickening in the {self.lobe(f)}.",
                       f"Dilated, thick-walled bronchi in the {self.lobe(f)}, consistent with {kind} bronchiectasis.",
                       f"Bronchiectatic changes ({kind}) are seen in the {self.lobe(f)}."])]
        if name == "Interlobular septal thickening":
            return [p([f"{_cap(f.severity or '')} interlobular septal thickening in both lower lobes, predominantly subpleural.",
                       f"Smooth thickening of the interlobular septa at both lung bases ({f.severity}).",
                       "Thickened interlobular septa are seen bilaterally in the lower zones."])]
        if name == "Cardiomegaly":
            return [p([f"The heart is enlarged (cardiothoracic ratio about {ctr:.2f}).", "Cardiomegaly.",
                       f"Enlarged cardiac silhouette with a cardiothoracic ratio of {ctr:.2f}.",
                       f"Cardiac size is increased ({f.severity} cardiomegaly)."])]
        if name == "Pericardial effusion":
            return [p([f"{_cap(f.severity or '')} pericardial effusion measuring {int(f.size_mm)} mm in thickness.",
                       f"There is a pericardial effusion, up to {int(f.size_mm)} mm thick.",
                       f"Fluid in the pericardial sac (pericardial effusion), {int(f.size_mm)} mm."])]
        if name == "Arterial wall calcification":
            return [p([f"{_cap(f.severity or '')} calcified atherosclerotic plaques in the wall of the thoracic aorta.",
                       f"Atherosclerotic calcifications of the aortic arch and descending aorta ({f.severity}).",
                       f"There is {f.severity} calcification of the aortic wall."])]
        if name == "Coronary artery wall calcification":
            vessels = _join([_CORONARY_NAMES[v] for v in f.detail["vessels"]])
            plural = "arteries" if len(f.detail["vessels"]) > 1 else "artery"
            return [p([f"Calcified plaques in the {vessels} coronary {plural}.",
                       f"Coronary artery calcifications ({f.severity}) involving the {vessels} {plural}.",
                       f"{_cap(f.severity or '')} coronary artery wall calcification in the {vessels} {plural}."])]
        if name == "Lymphadenopathy":
            fs = sorted(fs, key=lambda g: -g.detail["short_axis_mm"])
            big = fs[0]
            stations = _join([g.detail["station"] for g in fs])
            n = "s" if len(fs) > 1 else ""
            return [p([f"Enlarged lymph node{n} at the {stations} station{n}, the largest measuring "
                       f"{big.detail['short_axis_mm']} mm in short axis.",
                       f"Lymphadenopathy: {stations} node{n} up to {big.detail['long_axis_mm']} x "
                       f"{big.detail['short_axis_mm']} mm.",
                       f"Pathologically enlarged {stations} lymph node{n} ({big.detail['short_axis_mm']} mm short axis)."])]
        if name == "Hiatal hernia":
            return [p([f"{_cap(f.severity or '')} hiatal hernia.",
                       f"A {f.severity} sliding hiatus hernia is present ({int(f.size_mm)} mm).",
                       f"Part of the stomach has herniated through the oesophageal hiatus (hiatal hernia), "
                       f"measuring {int(f.size_mm)} mm."])]
        if name == "Medical material":
            dev = f.detail["device"]
            if dev == "pacemaker":
                return [p([f"A {f.side} pectoral pacemaker with leads in the right atrium and right ventricle.",
                           f"Cardiac pacemaker generator in the {f.side} chest wall; its leads end in the right atrium "
                           "and right ventricle.",
                           "Pacemaker device with transvenous leads in the right heart."])]
            if dev == "port catheter":
                return [p([f"A {f.side}-sided venous port catheter with its tip at the cavoatrial junction.",
                           f"Port catheter via the {f.side} subclavian vein, tip at the junction of the superior vena "
                           "cava and right atrium."])]
            return [p(["Median sternotomy wires.", "Sternal cerclage wires from a previous sternotomy.",
                       "Post-sternotomy wire sutures in the sternum."])]
        raise KeyError(name)

    def impression(self, name: str, fs: list[PhantomFinding], ctr: float) -> str:
        p, f = self.pick, fs[0]
        if name == "Lung nodule":
            f = max(fs, key=lambda g: g.size_mm)
            many = "Multiple pulmonary nodules" if len(fs) > 1 else "Pulmonary nodule"
            follow = p([" Follow-up CT is recommended.", " Comparison with prior imaging or follow-up is advised.", ""])
            return f"{many}, the largest {int(f.size_mm)} mm in the {self.lobe(f)}.{follow}"
        if name == "Lung mass":
            return p([f"{int(f.size_mm)} mm mass in the {self.lobe(f)}, suspicious for malignancy; tissue diagnosis is advised.",
                      f"Lung mass in the {self.lobe(f)} ({int(f.size_mm)} mm)."])
        if name == "Pleural effusion":
            sides = {g.side for g in fs}
            return "Bilateral pleural effusions." if len(sides) == 2 else f"{_cap(f.severity or '')} {f.side} pleural effusion."
        if name == "Pneumothorax":
            return f"{_cap(f.side or '')} pneumothorax ({f.severity})."
        if name == "Consolidation":
            return p([f"Consolidation in the {self.lobe(f)}, likely infectious; clinical correlation is recommended.",
                      f"{_cap(self.lobe(f))} consolidation, compatible with pneumonia in the appropriate clinical setting."])
        if name == "Lung opacity":
            return p([f"Ground-glass opacities in the {self.lobes(fs)}.", "Ground-glass opacities, likely inflammatory."])
        if name == "Emphysema":
            return f"{_cap(f.severity or '')} {f.detail['type']} emphysema."
        if name == "Atelectasis":
            return p(["Atelectasis.", f"Atelectatic changes in the {self.lobes(fs)}."])
        if name == "Bronchiectasis":
            return f"Bronchiectasis in the {self.lobe(f)}."
        if name == "Interlobular septal thickening":
            return p(["Interlobular septal thickening, which may reflect interstitial oedema.",
                      "Basal interlobular septal thickening."])
        if name == "Cardiomegaly":
            return p(["Cardiomegaly.", "Enlarged heart.", f"Cardiomegaly (CTR {ctr:.2f})."])
        if name == "Pericardial effusion":
            return f"{_cap(f.severity or '')} pericardial effusion."
        if name == "Arterial wall calcification":
            return p(["Aortic atherosclerosis.", "Calcified atheroma of the thoracic aorta."])
        if name == "Coronary artery wall calcification":
            return p(["Coronary artery calcification.", "Coronary atherosclerotic calcification."])
        if name == "Lymphadenopathy":
            return p(["Mediastinal lymphadenopathy.", "Enlarged mediastinal/hilar lymph nodes."]) if any(
                "axillary" not in g.detail["station"] for g in fs) else "Axillary lymphadenopathy."
        if name == "Hiatal hernia":
            return f"{_cap(f.severity or '')} hiatal hernia."
        if name == "Medical material":
            return {"pacemaker": "Pacemaker in place.", "port catheter": "Port catheter in satisfactory position."}.get(
                f.detail["device"], "Median sternotomy.")
        raise KeyError(name)


_IMPRESSION_ORDER = ("Lung mass", "Consolidation", "Pneumothorax", "Pleural effusion", "Cardiomegaly",
                     "Pericardial effusion", "Lung nodule", "Lymphadenopathy", "Lung opacity", "Interlobular septal thickening",
                     "Emphysema", "Bronchiectasis", "Atelectasis", "Hiatal hernia", "Arterial wall calcification",
                     "Coronary artery wall calcification", "Medical material")


def write_report(findings: Sequence[PhantomFinding], *, sex: str, age: int, contrast: bool, slice_mm: float,
                 conditions: Iterable[str], rng: np.random.Generator, ctr: float) -> str:
    """A chest CT report stating every finding (size, side, lobe) and negating a sample of the others."""
    w = _Writer(rng)
    p = w.pick
    by: dict[str, list[PhantomFinding]] = {}
    for f in findings:
        by.setdefault(f.name, []).append(f)
    conds = [c for c in ("heart failure", "infection", "malignancy", "smoker", "atherosclerosis") if c in set(conditions)]
    indication = p(_INDICATIONS[conds[0] if conds and rng.random() < 0.8 else None])
    person = {"M": p(["man", "male"]), "F": p(["woman", "female"])}[sex]
    thick = f"{slice_mm:g}"
    technique = p([
        f"{'Contrast-enhanced' if contrast else 'Non-contrast'} CT of the chest from the thoracic inlet to the upper "
        f"abdomen, reconstructed at {thick} mm.",
        f"Axial {thick} mm sections of the thorax were obtained {'after intravenous contrast' if contrast else 'without intravenous contrast'}.",
        f"Thoracic CT {'with' if contrast else 'without'} IV contrast; {thick} mm axial reconstructions with coronal reformats.",
    ])

    def negate(name: str) -> str | None:
        if name in by or rng.random() >= _NEGATE_P[name]:
            return None
        return p(NEGATIONS[name])

    def group(names: Sequence[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            if name in by:
                out.extend(w.present(name, by[name], ctr))
            else:
                neg = negate(name)
                if neg:
                    out.append(neg)
        return out

    airway = p(["The trachea and both main bronchi are patent.", "The trachea and main bronchi are of normal calibre and patent.",
                "Central airways are patent."])
    media = [airway]
    heart_and_vessels = group(_MEDIASTINUM)
    if "Arterial wall calcification" not in by and not any("aorta" in t for t in heart_and_vessels):
        media.append(p(["The thoracic aorta is of normal calibre.", "Normal calibre of the thoracic aorta and main pulmonary artery."]))
    media += heart_and_vessels
    if "Hiatal hernia" not in by:
        media.append(p(["The oesophagus is unremarkable.", "Thoracic oesophagus of normal calibre without wall thickening."]))
    headings = rng.random() < 0.5
    lung = [p(["Lung parenchyma:", "In the lung window:"])] if not headings and rng.random() < 0.4 else []
    lung_sents = group(_LUNGS)
    if not any(n in by for n in _LUNGS):
        lung_sents.insert(0, p(["Both lungs are clear and well aerated.", "Normal aeration of both lungs.",
                                "The lung parenchyma is unremarkable."]))
    lung += lung_sents
    pleura = group(_PLEURA)
    abdomen = p(["The visualised upper abdominal organs are unremarkable.", "No abnormality in the included upper abdomen.",
                 "The imaged liver, spleen and adrenal glands are normal."])
    bones = p(["Degenerative changes of the thoracic spine.", "Mild spondylotic changes of the thoracic spine; no destructive bone lesion."]) \
        if age >= 55 else p(["No destructive bone lesion.", "The osseous structures are intact."])

    paragraphs = [("Mediastinum and heart", media), ("Lungs", lung), ("Pleura", pleura),
                  ("Upper abdomen", [abdomen]), ("Bones and soft tissues", [bones])]
    findings_text = "\n".join((f"{h}: " if headings else "") + " ".join(sents) for h, sents in paragraphs if sents)
    present = [n for n in _IMPRESSION_ORDER if n in by]
    if present:
        impression = "\n".join(f"{i + 1}. {w.impression(n, by[n], ctr)}" for i, n in enumerate(present))
    else:
        impression = p(["No acute cardiopulmonary abnormality.", "Normal CT of the chest.",
                        "Thoracic CT within normal limits."])
    head = p(["CLINICAL INFORMATION", "Indication", "History"])
    return (f"{head}: {age}-year-old {person}, {indication}.\n"
            f"TECHNIQUE: {technique}\n"
            f"{p(['COMPARISON: None.', 'Comparison: none available.', ''])}\n"
            f"FINDINGS:\n{findings_text}\n"
            f"IMPRESSION:\n{impression}").replace("\n\n", "\n")
