"""Painting the planned findings and devices into a scene, each with the facts its report states.

A finding is placed by asking the anatomy (a lobe, the dependent pleura, an airway) and is
recorded as a ``Spec``: its size, side and lobe for the report, and the tissues that still show
it once everything is painted (its visible mask).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from .anatomy import RIB, Anatomy, coronary_paths
from .geometry import Box, Capsule, Ellipsoid, chain, frame, region, smooth_path
from .grid import IN_LUNG, Grid, allow
from .plan import Plan
from .records import LOBES, TISSUE_CODES
from .scene import Scene, Spec
from .trees import Branch

_T = TISSUE_CODES


def _choose(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    w = np.ones(len(options)) if weights is None else np.asarray(weights, float)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _random_rot(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q


def _lobe_weights(lobes: Sequence[str], upper: float = 1.0, lower: float = 1.0) -> list[float]:
    return [(upper if "upper" in lb else lower if "lower" in lb else 0.6) for lb in lobes]


def _pleural_band(A: Anatomy, side: str, depth: float, span: float, posterior: bool,
                  z_bottom: float | None = None) -> Callable[..., np.ndarray]:
    """Signed distance of a crescent along the posterior (dependent) or anterior chest wall."""
    sign = 1.0 if side == "right" else -1.0
    z_bot = -1.25 * A.dia_depth + (0 if side == "right" else A.dome_left) if z_bottom is None else z_bottom
    z_top = z_bot + span

    def fn(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, ba, bp, cy = A.profile(z)
        q = np.sqrt(np.clip(1 - (x / a) ** 2, 0, 1))
        lateral = 1 - 0.4 * np.clip(np.abs(x) / a, 0, 1) ** 2
        if posterior:
            dist = y - (cy - bp * q)
            d = depth * np.clip((z_top - z) / span, 0, 1) ** 0.55 * lateral
        else:
            dist = (cy + ba * q) - y
            d = depth * (0.6 + 0.4 * np.clip((z - z_bot) / span, 0, 1)) * lateral
        sd = np.maximum(dist - d, A.lung_sd(x, y, z))
        sd = np.maximum(sd, -sign * x)
        return sd if posterior else np.minimum(sd, np.maximum(np.maximum(A.apex_top(x, y) - z - 0.5 * depth,
                                                                         A.lung_sd(x, y, z)), -sign * x))

    return fn


def build_findings(scene: Scene, A: Anatomy, plan: Plan, rng: np.random.Generator, grid: Grid,
                   bronchi: dict[str, list[Branch]]) -> None:
    """Add the planned findings (all but cardiomegaly and pericardial effusion, which resize the
    anatomy) to ``scene``, each with a spec that records where it is and what a report says."""
    s, L = A.s, A.L
    lung_lo = (-A.ac0, -A.bp0 * 1.1, -A.dia_depth * 1.4 + A.dome_left)
    lung_hi = (A.ac0, A.ba0 * 1.1, L + 5)
    lesion_hu = 70.0 if A.contrast else rng.uniform(28, 42)
    F = plan.findings

    def place(margin: float, lobe: str | None = None, where: Callable[[np.ndarray], np.ndarray] | None = None,
              side: str | None = None) -> tuple[np.ndarray, str] | None:
        for m in (margin, margin * 0.6, 2.0):
            pts = A.sample_lung(rng, 1, m, lobe=lobe, side=side, where=where)
            if len(pts):
                return pts[0], A.lobe_of(pts[0])
        return None

    # ---- pleural effusion (and the passive atelectasis it causes) ----------------------------
    eff_sides: dict[str, tuple[float, float]] = {}
    if "Pleural effusion" in F:
        p_bi = 0.7 if "heart failure" in plan.conditions else 0.3
        sides = ["right", "left"] if rng.random() < p_bi else [_choose(rng, ["right", "left"], [0.62, 0.38])]
        for side in sides:
            sev = _choose(rng, ["small", "moderate", "large"], [0.5, 0.35, 0.15])
            depth = {"small": rng.uniform(14, 24), "moderate": rng.uniform(28, 44), "large": rng.uniform(52, 75)}[sev] * s
            span = {"small": 120.0, "moderate": 175.0, "large": 235.0}[sev] * s
            eff_sides[side] = (depth, span)
            fn = _pleural_band(A, side, depth, span, posterior=True)
            sign = 1 if side == "right" else -1
            z_bot = -1.25 * A.dia_depth
            spec = scene.spec(Spec("Pleural effusion", np.array([sign * 0.55 * A.ac0, -A.bp0 + depth / 2, z_bot + 0.3 * span]),
                                   round(depth), side, None, sev, {"thickness_mm": round(depth)}, (_T["fluid"],)))
            scene.add("pleura", region(fn, lung_lo, lung_hi), rng.uniform(6, 18), "fluid",
                      allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation", "lesion"), spec)

    # ---- atelectasis --------------------------------------------------------------------------
    if "Atelectasis" in F:
        n = 1 + int(rng.random() < 0.3)
        for i in range(n):
            side = _choose(rng, ["right", "left"], [0.55, 0.45])
            if eff_sides and i == 0:
                side = _choose(rng, list(eff_sides))
            sign = 1 if side == "right" else -1
            if side in eff_sides:
                depth, span = eff_sides[side]
                band = _pleural_band(A, side, depth + 11 * s, span * 0.9, posterior=True)
                spec = scene.spec(Spec("Atelectasis", np.array([sign * 0.5 * A.ac0, -A.bp0 + depth + 6, -A.dia_depth * 0.6]),
                                       round(depth * 0.6 + 20), side, f"{side} lower lobe", "passive",
                                       {"type": "passive", "adjacent": "pleural effusion"}, (_T["lesion"],)))
                scene.add("lung_findings", region(band, lung_lo, lung_hi), rng.uniform(15, 35), "lesion",
                          allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation"), spec)
                continue
            kind = _choose(rng, ["plate", "dependent"], [0.6, 0.4])
            if kind == "dependent":
                depth = rng.uniform(9, 16) * s
                band = _pleural_band(A, side, depth, 95 * s, posterior=True)
                spec = scene.spec(Spec("Atelectasis", np.array([sign * 0.5 * A.ac0, -A.bp0 + depth / 2, -A.dia_depth * 0.7]),
                                       round(depth), side, f"{side} lower lobe", "mild", {"type": "dependent"},
                                       (_T["lesion"],)))
                scene.add("lung_findings", region(band, lung_lo, lung_hi), rng.uniform(12, 32), "lesion",
                          allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation"), spec)
                continue
            lobes = [f"{side} lower lobe", "right middle lobe" if side == "right" else "left upper lobe"]
            lobe = _choose(rng, lobes, [0.7, 0.3])
            where = (lambda p: p[:, 2] < A.horizontal_z() - 10) if lobe == "left upper lobe" else None
            got = place(10 * s, lobe, where)
            if got is None:
                continue
            c, lobe = got
            length = rng.uniform(45, 75) * s
            thick = rng.uniform(5.5, 8.0)
            axis = np.array([sign * 0.8, rng.uniform(-0.4, 0.4), rng.uniform(-0.35, 0.35)])
            rot = frame(axis)
            plate = Ellipsoid(c, (length / 2, length * rng.uniform(0.22, 0.32), thick / 2), rot)
            sev = "subsegmental" if length < 60 else "segmental"
            spec = scene.spec(Spec("Atelectasis", c, round(length), side, lobe, sev, {"type": "plate"}, (_T["lesion"],)))
            scene.add("lung_findings", plate, rng.uniform(5, 30), "lesion", IN_LUNG, spec)

    # ---- nodules and masses -------------------------------------------------------------------
    if "Lung nodule" in F:
        count = int(_choose(rng, [1, 2, 3], [0.65, 0.22, 0.13]))
        for _ in range(count):
            d = float(np.clip(rng.lognormal(math.log(10), 0.4), 6, 26))
            kind = _choose(rng, ["solid", "ground-glass", "part-solid"], [0.72, 0.16, 0.12])
            lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=1.5))
            got = place(d / 2 + 3, lobe)
            if got is None:
                continue
            c, lobe = got
            rot = _random_rot(rng)
            r = d / 2
            spec = scene.spec(Spec("Lung nodule", c, round(d), "right" if c[0] > 0 else "left", lobe, None,
                                   {"type": kind}, (_T["lesion"], _T["ground_glass"])))
            parts = [Ellipsoid(c, (r, r * rng.uniform(0.8, 1.0), r * rng.uniform(0.8, 1.0)), rot)]
            if d > 9 and rng.random() < 0.6:
                parts.append(Ellipsoid(c + rot[:, 1] * r * 0.45, (r * 0.6,) * 3))
            for part in parts:
                if kind == "solid":
                    scene.add("lung_findings", part, lesion_hu, "lesion", IN_LUNG, spec)
                else:
                    scene.add("lung_findings", part, rng.uniform(-600, -480), "ground_glass", allow("lung"), spec, "raise")
            if kind == "part-solid":
                scene.add("lung_findings", Ellipsoid(c, (r * 0.45,) * 3), lesion_hu, "lesion",
                          allow("lung", "ground_glass", "lung_vessel"), spec)
    if "Lung mass" in F:
        d = rng.uniform(32, 62) * s
        lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=1.6))
        got = place(d * 0.35, lobe)
        if got is not None:
            c, lobe = got
            r = d / 2
            spec = scene.spec(Spec("Lung mass", c, round(d), "right" if c[0] > 0 else "left", lobe, None,
                                   {"margin": _choose(rng, ["lobulated", "spiculated"]),
                                    "short_mm": round(d * rng.uniform(0.7, 0.9))}, (_T["lesion"],)))
            parts = [Ellipsoid(c, (r * 0.85, r * 0.72, r * 0.78), _random_rot(rng))]
            for _ in range(int(rng.integers(4, 7))):
                off = rng.normal(size=3)
                parts.append(Ellipsoid(c + off / np.linalg.norm(off) * r * rng.uniform(0.45, 0.65),
                                       r * rng.uniform(0.3, 0.5, 3), _random_rot(rng)))
            for part in parts:
                scene.add("lung_findings", part, lesion_hu, "lesion", IN_LUNG, spec)
            for _ in range(int(rng.integers(8, 15))):
                v = rng.normal(size=3)
                v /= np.linalg.norm(v)
                a = c + v * r * 0.8
                scene.add("lung_findings", Capsule(a, a + v * rng.uniform(8, 20), 1.6, 0.6), lesion_hu, "lesion",
                          IN_LUNG, spec)
            if d > 45:
                scene.add("lung_findings", Ellipsoid(c, (r * 0.4,) * 3), rng.uniform(5, 18), "lesion",
                          allow("lesion"), spec)

    # ---- airspace disease: consolidation and ground glass -----------------------------------
    if "Consolidation" in F:
        lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=0.7, lower=1.6))
        side = lobe.split()[0]
        lobar = rng.random() < 0.25
        got = place(12, lobe, where=lambda p: A.lung_sd(*(p[:, i].astype(np.float32) for i in range(3))) > -40)
        if got is not None:
            c, lobe = got
            rad = np.array([rng.uniform(24, 38), rng.uniform(20, 32), rng.uniform(22, 38)]) * s * (1.6 if lobar else 1.0)
            blobs = [Ellipsoid(c, rad, _random_rot(rng))]
            for _ in range(int(rng.integers(3, 6))):
                blobs.append(Ellipsoid(c + rng.normal(0, 0.45, 3) * rad, rad * rng.uniform(0.35, 0.7, 3), _random_rot(rng)))
            sign = 1.0 if side == "right" else -1.0

            def in_lobe(x: np.ndarray, y: np.ndarray, z: np.ndarray, lobe: str = lobe) -> np.ndarray:
                zo = A.oblique_z(y, side, x)
                d = (z - zo) * 0.7 if "lower" in lobe else (zo - z) * 0.7
                if lobe == "right upper lobe":
                    d = np.maximum(d, A.horizontal_z() - z)
                elif lobe == "right middle lobe":
                    d = np.maximum(d, z - A.horizontal_z())
                return np.maximum(d, -sign * x)

            spec = scene.spec(Spec("Consolidation", c, round(2 * rad.max()), side, lobe,
                                   "lobar" if lobar else _choose(rng, ["segmental", "patchy"]), {},
                                   (_T["lesion"], _T["airway"])))
            for b in blobs:
                shape = region(lambda x, y, z, b=b: np.maximum(np.maximum(b.sd(x, y, z), in_lobe(x, y, z)),
                                                               A.lung_sd(x, y, z)), b.lo, b.hi)
                scene.add("lung_findings", shape, lesion_hu + rng.uniform(-5, 10), "lesion", IN_LUNG, spec)
            # Air bronchograms: the airways inside stay aerated against the opaque lung.
            for br in bronchi.get(side, []):
                mid = [np.float32(v) for v in (br.a + br.b) / 2]
                if 1 <= br.depth <= 7 and min(float(b.sd(*mid)) for b in blobs) < 0:
                    scene.add("lung_findings", Capsule(br.a, br.b, max(br.ra, 1.4), max(br.rb, 1.2)), -930.0,
                              "airway", allow("lesion"), spec)
    if "Lung opacity" in F:
        diffuse = "heart failure" in plan.conditions or rng.random() < 0.3
        n = int(rng.integers(3, 7)) if diffuse else int(rng.integers(1, 4))
        hu = rng.uniform(-610, -480)
        for _ in range(n):
            lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=0.9, lower=1.3))
            got = place(8, lobe, where=lambda p: A.lung_sd(*(p[:, i].astype(np.float32) for i in range(3))) > -45)
            if got is None:
                continue
            c, lobe = got
            rad = rng.uniform(14, 32, 3) * s
            spec = scene.spec(Spec("Lung opacity", c, round(2 * rad.max()), "right" if c[0] > 0 else "left", lobe,
                                   "diffuse" if diffuse else "patchy", {"type": "ground-glass"},
                                   (_T["ground_glass"],)))
            for k in range(int(rng.integers(2, 4))):
                cc = c + (rng.normal(0, 0.35, 3) * rad if k else 0)
                scene.add("lung_findings", Ellipsoid(cc, rad * rng.uniform(0.6, 1.0, 3), _random_rot(rng)), hu,
                          "ground_glass", allow("lung"), spec, "raise")

    # ---- emphysema ------------------------------------------------------------------------------
    if "Emphysema" in F:
        kind = _choose(rng, ["centrilobular", "paraseptal", "panlobular"], [0.65, 0.2, 0.15])
        sev = _choose(rng, ["mild", "moderate", "severe"], [0.45, 0.35, 0.2])
        count = {"mild": 50, "moderate": 120, "severe": 230}[sev]
        rmax = {"mild": 6.0, "moderate": 8.0, "severe": 10.0}[sev]
        if kind == "paraseptal":
            where = lambda p: A.lung_sd(*(p[:, i].astype(np.float32) for i in range(3))) > -9  # noqa: E731
            zone = "upper lobes, subpleural"
        elif kind == "panlobular":
            where = lambda p: p[:, 2] < 0.45 * L  # noqa: E731
            zone = "lower lobes"
        else:
            where = lambda p: p[:, 2] > 0.42 * L  # noqa: E731
            zone = "upper lobes"
        if kind == "paraseptal":
            upper = where
            where = lambda p: upper(p) & (p[:, 2] > 0.35 * L)  # noqa: E731
        pts = A.sample_lung(rng, count, margin=1.0, where=where)
        if len(pts):
            spec = scene.spec(Spec("Emphysema", pts.mean(axis=0), round(2 * rmax), "bilateral", zone, sev,
                                   {"type": kind}, (_T["low_attenuation"],)))
            for p in pts:
                r = rng.uniform(3.0, rmax) * (1.3 if kind != "centrilobular" else 1.0)
                scene.add("lung_findings", Ellipsoid(p, (r, r * rng.uniform(0.7, 1), r * rng.uniform(0.7, 1)),
                                                     _random_rot(rng)),
                          rng.uniform(-990, -960), "low_attenuation", allow("lung", "lung_vessel"), spec)
            if sev == "severe":
                for _ in range(int(rng.integers(1, 3))):
                    got = place(2, where=lambda p: (A.lung_sd(*(p[:, i].astype(np.float32) for i in range(3))) > -14)
                                & (p[:, 2] > 0.6 * L))
                    if got is not None:
                        scene.add("lung_findings", Ellipsoid(got[0], (rng.uniform(12, 22) * s,) * 3), -995.0,
                                  "low_attenuation", allow("lung", "lung_vessel"), spec)

    # ---- bronchiectasis -----------------------------------------------------------------------
    if "Bronchiectasis" in F:
        lobe = _choose(rng, LOBES, _lobe_weights(LOBES, upper=0.4, lower=1.6))
        side = lobe.split()[0]
        chosen = [br for br in bronchi.get(side, []) if 1 <= br.depth <= 6 and A.lobe_of((br.a + br.b) / 2) == lobe]
        if len(chosen) < 4:
            chosen = [br for br in bronchi.get(side, []) if 2 <= br.depth <= 6 and A.lobe_of((br.a + br.b) / 2).endswith("lower lobe")]
            lobe = f"{side} lower lobe"
        if chosen:
            kind = _choose(rng, ["cylindrical", "varicose", "cystic"], [0.65, 0.25, 0.1])
            mids = np.array([(br.a + br.b) / 2 for br in chosen])
            lumen = [max(2.3 * br.ra, 3.4) for br in chosen]
            spec = scene.spec(Spec("Bronchiectasis", mids.mean(axis=0), round(2 * max(lumen)), side, lobe,
                                   _choose(rng, ["mild", "moderate"]), {"type": kind},
                                   (_T["lesion"], _T["airway"])))
            for br, lr in zip(chosen, lumen):
                wall = max(1.6, 0.35 * lr)
                k = 3 if kind == "varicose" else 1
                for j in range(k):
                    a = br.a + (br.b - br.a) * j / k
                    b = br.a + (br.b - br.a) * (j + 1) / k
                    rr = lr * (1.25 if (kind == "varicose" and j % 2) else 1.0)
                    scene.add("lung_findings", Capsule(a, b, rr + wall), 45.0, "lesion", IN_LUNG, spec)
                    scene.add("lung_findings", Capsule(a, b, rr), -960.0, "airway",
                              allow("lesion", "lung", "lung_vessel", "airway"), spec)
                if kind == "cystic":
                    scene.add("lung_findings", Ellipsoid(br.b, (lr * 1.8,) * 3), 45.0, "lesion", IN_LUNG, spec)
                    scene.add("lung_findings", Ellipsoid(br.b, (lr * 1.8 - wall,) * 3), -960.0, "airway",
                              allow("lesion"), spec)

    # ---- interlobular septal thickening ----------------------------------------------------
    if "Interlobular septal thickening" in F:
        from scipy.spatial import cKDTree

        sev = _choose(rng, ["mild", "moderate", "marked"], [0.4, 0.4, 0.2])
        gap, width = {"mild": (17.0, 1.3), "moderate": (15.0, 1.6), "marked": (13.0, 2.0)}[sev]
        zcap = rng.uniform(0.45, 0.6) * L
        lo = np.array([-A.ac0, -A.bp0, -1.4 * A.dia_depth + A.dome_left])
        hi = np.array([A.ac0, A.ba0, zcap])
        n = int(np.prod(hi - lo) / gap ** 3)
        seeds = rng.uniform(lo, hi, size=(n, 3))
        tree = cKDTree(seeds)

        def septa(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            region = np.maximum(A.lung_sd(x, y, z), -A.lung_sd(x, y, z) - 14.0)
            region = np.maximum(region, z - zcap)
            out = np.array(region, np.float32, copy=True)
            idx = np.nonzero(region < 1.0)
            if len(idx[0]):
                pts = np.column_stack([np.broadcast_to(x, region.shape)[idx], np.broadcast_to(y, region.shape)[idx],
                                       np.broadcast_to(z, region.shape)[idx]])
                dist, nn = tree.query(pts, k=2)
                s1, s2 = seeds[nn[:, 0]], seeds[nn[:, 1]]
                edge = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * np.linalg.norm(s2 - s1, axis=1) + 1e-6)
                out[idx] = np.maximum(region[idx], edge - width / 2)
            return out

        spec = scene.spec(Spec("Interlobular septal thickening", np.array([0.0, -0.3 * A.bp0, 0.15 * L]),
                               round(zcap + A.dia_depth), "bilateral", "lower lobes", sev, {},
                               (_T["lesion"],)))
        shape = region(septa, lo, hi)
        scene.add("lung_findings", shape, -150.0, "lesion", allow("lung", "ground_glass"), spec)

    # ---- pneumothorax ---------------------------------------------------------------------------
    if "Pneumothorax" in F:
        side = _choose(rng, ["right", "left"], [0.55, 0.45])
        sev = _choose(rng, ["small", "moderate", "large"], [0.55, 0.3, 0.15])
        depth = {"small": rng.uniform(10, 18), "moderate": rng.uniform(22, 34), "large": rng.uniform(40, 58)}[sev]
        fn = _pleural_band(A, side, depth, 0.9 * L, posterior=False)
        sign = 1 if side == "right" else -1
        spec = scene.spec(Spec("Pneumothorax", np.array([sign * 0.45 * A.ac0, A.ba0 - depth / 2, 0.5 * L]),
                               round(depth), side, None, sev, {"thickness_mm": round(depth)}, (_T["pleural_air"],)))
        scene.add("pleura", region(fn, lung_lo, lung_hi), -1000.0, "pleural_air",
                  allow("lung", "lung_vessel", "airway", "ground_glass", "low_attenuation", "lesion"), spec)
        line = region(lambda x, y, z: np.abs(fn(x, y, z) - 1.0) - 0.6, lung_lo, lung_hi)
        line.amp = min(1.0, 1.5 / grid.h)
        scene.add("pleura", line, -100.0, "lung", allow("lung", "lung_vessel"))

    # ---- mediastinum: nodes, hernia ---------------------------------------------------------
    if "Lymphadenopathy" in F:
        cz, yt = A.carina_z, float(A.y_vb(A.carina_z)) + 44 * s
        stations = {
            "right lower paratracheal": (17 * s, yt + 4 * s, cz + 16),
            "subcarinal": (-3 * s, yt - 10 * s, cz - 24),
            "right hilar": tuple(A.hilum["right"] + (8, 8, -6)),
            "left hilar": tuple(A.hilum["left"] + (-6, 8, -2)),
            "aortopulmonary window": (-18 * s, 2 * s, cz + 14),
            "prevascular": (-6 * s, 36 * s, cz + 26),
            "left axillary": (-(A.ac0 + 30 * s), 0.0, 0.62 * L),
        }
        names = list(stations)
        k = int(rng.integers(1, 5))
        picked = rng.choice(len(names), size=k, replace=False, p=np.array([3, 3, 2, 2, 1.5, 1, 0.6]) / 13.1)
        for i in picked:
            st = names[int(i)]
            short = rng.uniform(12, 24) * (1.0 if "axillary" not in st else 0.9)
            rad = np.array([short * rng.uniform(1.15, 1.5), short, short * rng.uniform(1.0, 1.3)]) / 2
            c = np.asarray(stations[st], float)
            spec = scene.spec(Spec("Lymphadenopathy", c, round(2 * rad.max()), None, None, None,
                                   {"station": st, "short_axis_mm": round(short), "long_axis_mm": round(2 * rad.max())},
                                   (_T["lesion"],)))
            scene.add("nodes", Ellipsoid(c, rad, _random_rot(rng)), lesion_hu + 5, "lesion",
                      allow("fat", "lung", "lung_vessel", "muscle"), spec)
    else:
        cz, yt = A.carina_z, float(A.y_vb(A.carina_z)) + 44 * s
        for c in [(15 * s, yt + 4 * s, cz + 16), (-3 * s, yt - 10 * s, cz - 24)][: int(rng.integers(0, 3))]:
            scene.add("nodes", Ellipsoid(c, rng.uniform(2.5, 4.0, 3)), lesion_hu, "lesion", allow("fat"))

    if "Hiatal hernia" in F:
        sev = _choose(rng, ["small", "moderate", "large"], [0.5, 0.35, 0.15])
        d = {"small": rng.uniform(28, 38), "moderate": rng.uniform(40, 54), "large": rng.uniform(56, 72)}[sev] * s
        r = d / 2
        c = np.array([-14 * s, float(A.y_vb(0.0)) + 20 * s + r * 0.8, A.dome_left + r * 0.5])
        spec = scene.spec(Spec("Hiatal hernia", c, round(d), None, None, sev, {}, (_T["gut"], _T["gut_air"])))
        ok = allow("fat", "lung", "lung_vessel", "gut", "muscle", "lesion", "ground_glass", "fluid", "organ", "gut_air")
        outer = Ellipsoid(c, (r * 1.1, r, r * 0.9))
        inner = Ellipsoid(c, (r * 1.1 - 4, r - 4, r * 0.9 - 4))
        scene.add("heart", outer, 42.0, "gut", ok, spec)
        scene.add("heart", inner, rng.uniform(10, 30), "gut", allow("gut"), spec)
        level = c[1] + r * rng.uniform(-0.3, 0.2)
        scene.add("heart", region(lambda x, y, z: np.maximum(inner.sd(x, y, z), level - y), inner.lo, inner.hi),
                  -1000.0, "gut_air", allow("gut"), spec)
        neck = Capsule(c - (0, 0, r * 0.6), (-0.28 * A.ac0, 0.1 * A.ba0 - 8, A.dome_left - 22), r * 0.55)
        scene.add("heart", neck, 42.0, "gut", ok, spec)

    # ---- calcification ---------------------------------------------------------------------------
    if "Arterial wall calcification" in F:
        sev = _choose(rng, ["mild", "moderate", "severe"], [0.45, 0.35, 0.2])
        count = {"mild": int(rng.integers(4, 8)), "moderate": int(rng.integers(10, 18)), "severe": int(rng.integers(22, 36))}[sev]
        ap = A.aorta_path
        spec = scene.spec(Spec("Arterial wall calcification", ap[len(ap) // 3], 0.0, None, None, sev,
                               {"vessels": ["aortic arch", "descending aorta"]}, (_T["calcium"],)))
        sizes = []
        for _ in range(count):
            i = int(rng.integers(6, 34))
            t = ap[i + 1] - ap[i]
            t /= np.linalg.norm(t)
            fr = frame(t)
            ang = rng.uniform(0, 2 * math.pi)
            rr = A.aorta_r * np.interp(i, [0, 12, 20, len(ap) - 1], [1.12, 1.0, 0.92, 0.85])
            p = ap[i] + (fr[:, 1] * math.cos(ang) + fr[:, 2] * math.sin(ang)) * (rr - 0.6)
            size = rng.uniform(3.5, 8.0)
            sizes.append(size)
            scene.add("calcium", Ellipsoid(p, (size / 2, 1.9, 1.9), fr), rng.uniform(600, 1150), "calcium",
                      allow("blood", "fat", "lung", "lung_vessel", "lesion", "myocardium"), spec)
        spec.size_mm = round(max(sizes))
    if "Coronary artery wall calcification" in F:
        paths = coronary_paths(A)
        sev = _choose(rng, ["mild", "moderate", "severe"], [0.45, 0.35, 0.2])
        vessels = list(rng.choice(["LAD", "LCx", "RCA"], size=int(_choose(rng, [1, 2, 3], [0.4, 0.35, 0.25])),
                                  replace=False, p=[0.5, 0.2, 0.3]))
        per = {"mild": (1, 3), "moderate": (3, 5), "severe": (5, 8)}[sev]
        spec = scene.spec(Spec("Coronary artery wall calcification", paths[vessels[0]][3], 0.0, None, None, sev,
                               {"vessels": sorted(vessels)}, (_T["calcium"],)))
        sizes = []
        for v in vessels:
            for _ in range(int(rng.integers(per[0], per[1] + 1))):
                p = paths[v][int(rng.integers(0, 9))]
                size = rng.uniform(3.2, 5.6)
                sizes.append(size)
                scene.add("calcium", Ellipsoid(p, (size / 2,) * 3), rng.uniform(600, 1150), "calcium",
                          allow("blood", "fat", "myocardium", "fluid", "lung"), spec)
        spec.size_mm = round(max(sizes))

    # ---- devices ----------------------------------------------------------------------------------
    if "Medical material" in F:
        if "heart failure" in plan.conditions:
            kind = "pacemaker"
        elif "malignancy" in plan.conditions:
            kind = "port"
        else:
            kind = _choose(rng, ["pacemaker", "port", "sternotomy"], [0.35, 0.35, 0.3])
        _build_device(scene, A, rng, kind)


def _build_device(scene: Scene, A: Anatomy, rng: np.random.Generator, kind: str) -> None:
    s, hc = A.s, A.heart_c
    metal = rng.uniform(2600, 3071)
    keep = (_T["metal"],)
    if kind == "sternotomy":
        y_m, y_b, z_top, z_bot = A.sternum
        zs = np.linspace(z_top - 20 * s, z_bot + 12 * s, int(rng.integers(5, 8)))
        spec = scene.spec(Spec("Medical material", np.array([0.0, y_b, zs.mean()]), round(z_top - z_bot), None, None,
                               None, {"device": "sternotomy wires"}, keep))
        for z in zs:
            yc = y_m if z > z_top - 45 * s else y_b
            th = np.linspace(0, 2 * math.pi, 13)
            loop = np.column_stack([np.cos(th) * 18 * s, yc + np.sin(th) * 9 * s, np.full_like(th, z)])
            for cap in chain(loop, 0.9):
                scene.add("metal", cap, metal, "metal", None, spec)
            scene.add("metal", Ellipsoid((0, yc + 9 * s, z), (2.5, 2.5, 2.0)), metal, "metal", None, spec)
        return
    side = _choose(rng, ["left", "right"], [0.8, 0.2] if kind == "pacemaker" else [0.25, 0.75])
    sign = 1 if side == "right" else -1
    zg = A.notch_z - rng.uniform(25, 45) * s
    _, ba, _, cy = (float(v[0]) for v in A.profile(np.array([zg])))
    yg = cy + ba + RIB + A.muscle[0] + max(A.fat[0] * 0.55, 6)
    gen_c = np.array([sign * 0.55 * A.ac0, yg, zg])
    subclavian = [sign * 40 * s, 18 * s, A.notch_z - 4]
    svc = [[26 * s, 10 * s, A.carina_z + 40], [25 * s, 11 * s, hc[2] + 45 * s]]
    if kind == "pacemaker":
        spec = scene.spec(Spec("Medical material", gen_c, 50.0, side, None, None,
                               {"device": "pacemaker", "leads": ["right atrium", "right ventricle"]}, keep))
        scene.add("metal", Box(gen_c, (24 * s, 21 * s, 4.2), 3.5, frame([1.0, 0.0, 0.25])), metal, "metal", None, spec)
        ra = hc + A.heart_rot @ np.array([-0.35 * A.heart_r[0], -0.2 * A.heart_r[1], 0.55 * A.heart_r[2]])
        rv = hc + A.heart_rot @ np.array([0.55 * A.heart_r[0], 0.35 * A.heart_r[1], 0.0])
        for tip in (ra, rv):
            path = smooth_path([gen_c + (sign * -18 * s, -3, 6), subclavian, svc[0], svc[1], tip], 22)
            for cap in chain(path, 1.1):
                scene.add("metal", cap, metal * 0.9, "metal", None, spec)
        return
    spec = scene.spec(Spec("Medical material", gen_c, 28.0, side, None, None,
                           {"device": "port catheter", "tip": "cavoatrial junction"}, keep))
    scene.add("metal", Ellipsoid(gen_c, (13 * s, 13 * s, 7)), rng.uniform(1400, 2400), "metal", None, spec)
    path = smooth_path([gen_c, subclavian, svc[0], svc[1]], 18)
    for cap in chain(path, 1.4):
        scene.add("metal", cap, rng.uniform(700, 1000), "metal", None, spec)
