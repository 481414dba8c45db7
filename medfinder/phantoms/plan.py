"""Which findings a patient has: latent conditions give realistic co-occurrence.

Drawn from its own stream and without painting, so ``case_plan`` can look through thousands of
cases for the ones an example or a test needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Plan:
    """The finding labels a patient is to show, and the conditions that explain them."""

    findings: set[str]
    conditions: set[str]


def draw_plan(rng: np.random.Generator, age: int, sex: str) -> Plan:
    """Normal studies are common (about 30%) and become rarer with age; disease comes in patterns
    (atherosclerosis, smoking, heart failure, infection, malignancy) plus incidental findings."""
    found: set[str] = set()
    cond: set[str] = set()
    p_normal = float(np.clip(0.56 - 0.0075 * (age - 30), 0.1, 0.56))
    if rng.random() < p_normal:
        return Plan(found, cond)

    def maybe(name: str, p: float) -> None:
        if rng.random() < p:
            found.add(name)

    if rng.random() < 0.85 / (1 + math.exp(-(age - 63) / 7)):
        cond.add("atherosclerosis")
        maybe("Arterial wall calcification", 0.9)
        maybe("Coronary artery wall calcification", 0.72)
    if rng.random() < 0.16 + 0.16 * (age > 55) + 0.06 * (sex == "M"):
        cond.add("smoker")
        maybe("Emphysema", 0.75)
        maybe("Lung nodule", 0.3)
        maybe("Bronchiectasis", 0.12)
    if rng.random() < 0.04 + 0.006 * max(0, age - 50):
        cond.add("heart failure")
        maybe("Cardiomegaly", 0.85)
        maybe("Pleural effusion", 0.6)
        maybe("Interlobular septal thickening", 0.45)
        maybe("Pericardial effusion", 0.3)
        maybe("Lung opacity", 0.35)
        maybe("Medical material", 0.3)
    if rng.random() < 0.13:
        cond.add("infection")
        maybe("Consolidation", 0.72)
        maybe("Lung opacity", 0.6)
        maybe("Pleural effusion", 0.3)
        maybe("Atelectasis", 0.3)
        maybe("Lymphadenopathy", 0.3)
    if rng.random() < 0.04 + 0.003 * max(0, age - 45):
        cond.add("malignancy")
        maybe("Lung mass", 0.6)
        maybe("Lung nodule", 0.55)
        maybe("Lymphadenopathy", 0.6)
        maybe("Pleural effusion", 0.25)
        maybe("Medical material", 0.35)
    for name, p in [("Lung nodule", 0.2), ("Atelectasis", 0.14), ("Hiatal hernia", 0.04 + 0.004 * max(0, age - 45)),
                    ("Pericardial effusion", 0.04), ("Lymphadenopathy", 0.07), ("Bronchiectasis", 0.06),
                    ("Interlobular septal thickening", 0.035), ("Lung opacity", 0.08), ("Pneumothorax", 0.05),
                    ("Medical material", 0.06), ("Cardiomegaly", 0.02 + 0.002 * max(0, age - 50)),
                    ("Lung mass", 0.015), ("Pleural effusion", 0.04)]:
        maybe(name, p)
    if "Pleural effusion" in found:
        maybe("Atelectasis", 0.5)
    if not found:
        names = ["Lung nodule", "Atelectasis", "Arterial wall calcification", "Hiatal hernia", "Lung opacity",
                 "Emphysema", "Lymphadenopathy", "Bronchiectasis", "Pneumothorax", "Consolidation"]
        w = np.array([5, 4, 3, 2, 2, 2, 1.5, 1, 1, 1.5])
        found.add(names[rng.choice(len(names), p=w / w.sum())])
    return Plan(found, cond)
