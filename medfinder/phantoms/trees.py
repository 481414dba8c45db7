"""Branching trees: pulmonary arteries (with their bronchi) and veins.

A lung without its vessels reads as fake at once, and bronchiectasis and air bronchograms need
airways where they really run: beside the arteries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Branch:
    a: np.ndarray
    b: np.ndarray
    ra: float
    rb: float
    depth: int


def grow_tree(root: np.ndarray, points: np.ndarray, r0: float, decay: float, max_depth: int,
              twigs: int = 2) -> list[Branch]:
    """Recursive bisection of the territory a tree supplies: each branch aims at the centroid of
    its share of the lung and splits it along its longest axis, so branches fan out and taper."""
    out: list[Branch] = []

    def rec(start: np.ndarray, pts: np.ndarray, r: float, depth: int) -> None:
        c = pts.mean(axis=0)
        f = 0.5 if depth else 0.35
        end = start + (c - start) * f
        out.append(Branch(start, end, r, r * decay ** 0.5, depth))
        if depth >= max_depth or len(pts) < 8:
            far = pts[np.argsort(((pts - end) ** 2).sum(1))[::-1][:twigs]]
            for q in far:
                out.append(Branch(end, end + (q - end) * 0.95, r * decay, r * decay * 0.8, depth + 1))
            return
        d = pts - c
        _, vecs = np.linalg.eigh(d.T @ d)
        proj = d @ vecs[:, -1]
        for half in (pts[proj < 0], pts[proj >= 0]):
            if len(half):
                rec(end, half, r * decay, depth + 1)

    rec(np.asarray(root, np.float64), points, r0, 0)
    return out


def bronchi_from(arteries: list[Branch], max_depth: int, gap: float = 1.2) -> list[Branch]:
    """Airways run beside their artery (the bronchovascular bundle), slightly wider."""
    kept = [br for br in arteries if br.depth <= max_depth]
    if not kept:
        return []
    a = np.array([br.a for br in kept])
    b = np.array([br.b for br in kept])
    n = np.cross(b - a, [0.0, 0.0, 1.0])
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), [1.0, 0.0, 0.0])
    ra = np.array([br.ra for br in kept])[:, None]
    rb = np.array([br.rb for br in kept])[:, None]
    oa, ob = a + n * (2.05 * ra + gap), b + n * (2.05 * rb + gap)
    return [Branch(oa[i], ob[i], br.ra * 1.05, br.rb * 1.05, br.depth) for i, br in enumerate(kept)]
