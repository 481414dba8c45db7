"""The normal body painted into a scene: table, chest wall, abdomen, mediastinum, heart, airways,
lung vessels, fissures and bones.

Every case gets all of it, drawn from the anatomy stream; findings (``findings``) are added on
top and may replace only the tissues they are allowed to.
"""

from __future__ import annotations

import math

import numpy as np

from .anatomy import RIB, Anatomy, coronary_paths, ellipse_sd
from .geometry import BIG, Box, Capsule, Ellipsoid, chain, frame, layers, region, smooth_path
from .grid import NOT_BONE, Grid, allow
from .scene import Scene, Spec
from .trees import Branch, bronchi_from, grow_tree


def build_anatomy(scene: Scene, anat: Anatomy, grid: Grid, rng: np.random.Generator,
                  pericardial_gap: float, heart_spec: Spec | None, effusion_spec: Spec | None,
                  bronchi_out: dict[str, list[Branch]]) -> None:
    """Add the normal body to ``scene``; the heart and pericardium carry their findings' specs
    (cardiomegaly, pericardial effusion) because those findings are the anatomy, resized."""
    s, L, cz, A = anat.s, anat.L, anat.carina_z, anat
    top = L + 400

    # --- the table, in the world frame (patients lie rotated on a straight table) ---------
    back = 0.94 * (A.bp0 + RIB + A.muscle[2] + A.fat[2] + 22 * s + 2)
    table_y = grid.shift[1] - back / max(grid.cos, 0.5) - 3.0

    def table_sd(x: np.ndarray, y: np.ndarray, z: np.ndarray, inset: float = 0.0) -> np.ndarray:
        xw = grid.cos * x - grid.sin * y + grid.shift[0]
        yw = grid.sin * x + grid.cos * y + grid.shift[1]
        ytop = table_y - (xw / 420.0) ** 2 * 30.0
        d = np.maximum(yw - ytop, (ytop - 48.0) - yw) + inset
        d = np.maximum(d, np.abs(xw) - 230.0 + inset)
        return d + np.zeros_like(z)

    t_lo, t_hi = (-400, -back - 80, -BIG), (400, -back + 6, BIG)
    outer, inner = layers(region(table_sd, t_lo, t_hi), 0.0, 2.5)
    scene.add("table", outer, 180.0, "table")
    scene.add("table", inner, -960.0, "table", allow("table"))

    # --- body wall: skin, subcutaneous fat, muscle, then the cavity inside the ribs --------
    skin, fat = layers(region(A.body_sd), 0.0, 2.2)
    scene.add("body", skin, 32.0, "skin", allow("air", "table"))
    scene.add("body", fat, A.fat_hu, "fat", allow("skin"))
    wall = max(A.muscle) + RIB + 30
    scene.add("body", region(A.muscle_sd, (-A.ac0 - wall, -A.bp0 - wall, -BIG), (A.ac0 + wall, A.ba0 + wall, BIG)),
              A.muscle_hu, "muscle", allow("fat"))
    for side in (1, -1):
        def paraspinal(x: np.ndarray, y: np.ndarray, z: np.ndarray, side: int = side) -> np.ndarray:
            yv = np.asarray(A.y_vb(z), np.float32)
            return ((np.sqrt(((x - side * 33 * s) / (27 * s)) ** 2 + ((y - yv + 42 * s) / (26 * s)) ** 2) - 1)
                    * np.float32(26 * s))
        scene.add("body", region(paraspinal, (-80 * s, -A.bp0 - 90 * s, -BIG), (80 * s, -A.bp0 + 20 * s, BIG)),
                  A.muscle_hu + 4, "muscle", allow("fat"))
    cav_lo, cav_hi = (-A.ac0 - 2, -A.bp0 - 2, -BIG), (A.ac0 + 2, A.ba0 + 2, BIG)
    scene.add("body", region(A.cavity_sd, cav_lo, cav_hi), A.fat_hu + 10, "fat", allow("muscle", "fat"))
    if A.sex == "F":
        size = rng.uniform(0.7, 1.3)
        for side in (1, -1):
            zc = A.heart_c[2] + 12 * s
            _, ba, _, cy = A.profile(np.array([zc]))
            yb = float(cy[0] + ba[0]) + RIB + A.muscle[0] + A.fat[0] - 14 * s
            c = (side * 78 * s, yb, zc)
            r = np.array([70, 28 * size, 60]) * s
            scene.add("body", Ellipsoid(c, r + 2), 32.0, "skin", allow("air", "skin"))
            scene.add("body", Ellipsoid(c, r), A.fat_hu, "fat", allow("skin", "air"))
            # Fibroglandular tissue, partly averaged with the fat between its strands.
            scene.add("body", Ellipsoid((c[0], c[1] + 8, c[2]), r * [0.45, 0.42, 0.45]), rng.uniform(-40, 5), "organ",
                      allow("fat"))

    def lung_value(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dep = np.clip((A.ba0 * 0.3 - y) / (A.ba0 + A.bp0), 0, 1)
        return A.lung_hu + 65.0 * dep ** 1.5

    lung_lo = (-A.ac0, -A.bp0 * 1.1, -A.dia_depth * 1.4 + A.dome_left)
    lung_hi = (A.ac0, A.ba0 * 1.1, L + 5)
    scene.add("body", region(A.lung_sd, lung_lo, lung_hi), lung_value, "lung", allow("fat"))

    # --- upper abdomen below the diaphragm ------------------------------------------------
    abd_lo, abd_hi = (-A.ac0 - 5, -A.bp0 - 5, -top), (A.ac0 + 5, A.ba0 + 5, 15.0)
    scene.add("abdomen", region(lambda x, y, z: np.maximum(A.cavity_sd(x, y, z),
                                                           np.abs(z - A.dia_z(x, y) + 2.8) - 2.8),
                                abd_lo, abd_hi), A.muscle_hu, "muscle", allow("fat"))

    def liver_sd(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        xl = -14 * s - 52 * s * np.clip(y / A.ba0, 0, 1)
        sd = np.maximum(A.cavity_sd(x, y, z) + 3, z - (A.dia_z(x, y) - 5.6))
        return np.maximum(sd, xl - x)

    scene.add("abdomen", region(liver_sd, abd_lo, abd_hi), A.liver_hu, "organ", allow("fat"))
    spleen_c = (-0.72 * A.ac0, -0.5 * A.bp0, A.dome_left - 48 * s)
    rot = frame([math.cos(-0.6), math.sin(-0.6), 0.0])
    spleen = Ellipsoid(spleen_c, np.array([48, 22, 44]) * s, rot)
    scene.add("abdomen", region(lambda x, y, z: np.maximum(spleen.sd(x, y, z), z - A.dia_z(x, y) + 6),
                                spleen.lo, spleen.hi), A.liver_hu - 6 if A.contrast else 47.0, "organ",
              allow("fat", "organ"))
    st_c = np.array([-0.42 * A.ac0, 0.12 * A.ba0, A.dome_left - 52 * s])
    st_r = np.array([44, 46, 40]) * s * rng.uniform(0.8, 1.15)
    below = lambda z, x, y: z - A.dia_z(x, y) + 6  # noqa: E731
    st_out, st_in = Ellipsoid(st_c, st_r), Ellipsoid(st_c, st_r - 4)
    level = st_c[1] + st_r[1] * rng.uniform(-0.1, 0.55)
    scene.add("abdomen", region(lambda x, y, z: np.maximum(st_out.sd(x, y, z), below(z, x, y)),
                                st_out.lo, st_out.hi), 42.0, "gut", allow("fat", "organ"))
    scene.add("abdomen", region(lambda x, y, z: np.maximum(st_in.sd(x, y, z), below(z, x, y) + 4),
                                st_in.lo, st_in.hi), rng.uniform(5, 25), "gut", allow("gut"))
    scene.add("abdomen", region(lambda x, y, z: np.maximum(np.maximum(st_in.sd(x, y, z), level - y),
                                                           below(z, x, y) + 4), st_in.lo, st_in.hi),
              -1000.0, "gut_air", allow("gut"))
    colon = smooth_path([[-0.55 * A.ac0, 0.45 * A.ba0, -40 * s - 50], [-0.35 * A.ac0, 0.6 * A.ba0, -100 * s - 40],
                         [0.0, 0.65 * A.ba0, -120 * s - 45]], 8)
    for cap in chain(colon, 17 * s):
        scene.add("abdomen", cap, 40.0, "gut", allow("fat"))
    for cap in chain(colon, 14 * s):
        scene.add("abdomen", cap, -1000.0, "gut_air", allow("gut"))

    # --- mediastinum: oesophagus, aorta, pulmonary arteries, veins ---------------------------
    blood, vessel_ok = A.blood_hu, allow("fat", "lung", "lung_vessel", "organ", "muscle", "gut", "skin")
    yes = lambda z: float(A.y_vb(z)) + 27 * s  # noqa: E731
    eso = smooth_path([[-2 * s, yes(L + 120), L + 120], [-3 * s, yes(cz), cz],
                       [-12 * s, yes(0.3 * L) + 6 * s, 0.3 * L], [-0.28 * A.ac0, 0.1 * A.ba0 - 8, A.dome_left - 22]], 18)
    for cap in chain(eso, 8.5 * s):
        scene.add("mediastinum", cap, 42.0, "gut", allow("fat", "lung", "lung_vessel", "muscle", "organ"))
    if rng.random() < 0.5:
        for cap in chain(eso[:8], 2.2):
            scene.add("mediastinum", cap, -950.0, "gut_air", allow("gut"))

    ap = A.aorta_path
    radii = np.interp(np.arange(len(ap)), [0, 12, 20, len(ap) - 1], [1.12, 1.0, 0.92, 0.85]) * A.aorta_r
    for cap in chain(ap, radii):
        scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    branches = [
        ([[6 * s, 14 * s, cz + 40], [14 * s, 14 * s, cz + 70], [20 * s, 12 * s, L + 130]], 6.5 * s),
        ([[-4 * s, 12 * s, cz + 42], [-10 * s, 12 * s, cz + 75], [-14 * s, 14 * s, L + 130]], 4.5 * s),
        ([[-14 * s, 2 * s, cz + 38], [-26 * s, -4 * s, cz + 70], [-40 * s, -4 * s, L + 20], [-90 * s, -4 * s, L + 40]], 5.5 * s),
    ]
    for anchors, r in branches:
        for cap in chain(smooth_path(anchors, 8), r):
            scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    hc = A.heart_c
    bif = np.array([-14 * s, 2 * s, cz - 8])
    trunk = smooth_path([[hc[0] + 2, hc[1] + 22 * s, hc[2] + 28 * s], [-16 * s, 18 * s, cz - 22], bif], 8)
    for cap in chain(trunk, 14 * s):
        scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    pa = {
        "right": smooth_path([bif, [6 * s, -6 * s, cz - 12], [20 * s, -8 * s, cz - 15], A.hilum["right"]], 8),
        "left": smooth_path([bif, [-26 * s, -4 * s, cz - 2], A.hilum["left"]], 8),
    }
    for side in pa:
        for cap in chain(pa[side], np.linspace(11 * s, 7 * s, len(pa[side]))):
            scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    veins = [
        ([[27 * s, 8 * s, L + 130], [26 * s, 9 * s, cz + 30], [25 * s, 11 * s, hc[2] + 38 * s]], 9.5 * s),
        ([[-55 * s, 20 * s, cz + 72], [-10 * s, 20 * s, cz + 58], [26 * s, 10 * s, cz + 45]], 6.5 * s),
        ([[12 * s, float(A.y_vb(cz - 40)) + 22 * s, cz - 60], [12 * s, float(A.y_vb(cz)) + 22 * s, cz],
          [20 * s, 4 * s, cz + 14]], 4.5 * s),
        ([[hc[0] + A.heart_ext[0] * 0.7, hc[1] - 30 * s, hc[2] - 10 * s], [22 * s, yes(0) + 10 * s, -25], [20 * s, yes(0) + 12 * s, -top]],
         12 * s),
    ]
    for anchors, r in veins:
        for cap in chain(smooth_path(anchors, 10), r):
            scene.add("mediastinum", cap, blood, "blood", vessel_ok)
    thyroid_ok = allow("fat", "muscle", "lung")
    for side in (1, -1):
        scene.add("mediastinum", Ellipsoid((side * 19 * s, float(A.y_vb(L)) + 52 * s, L + 40 * s),
                                           np.array([10, 13, 24]) * s), 150.0 if A.contrast else 95.0,
                  "organ", thyroid_ok)

    # --- heart in its pericardial sac ------------------------------------------------------
    heart_ok = allow("fat", "lung", "lung_vessel", "blood", "organ", "gut", "muscle")
    peri = Ellipsoid(hc, A.heart_r + pericardial_gap + 1.6, A.heart_rot)
    scene.add("heart", peri, 32.0, "myocardium", heart_ok)
    sac = Ellipsoid(hc + (0, -0.25 * pericardial_gap, -0.2 * pericardial_gap) if effusion_spec else hc,
                    A.heart_r + pericardial_gap, A.heart_rot)
    if effusion_spec is not None:
        scene.add("heart", sac, rng.uniform(6, 16), "fluid", allow("myocardium"), spec=effusion_spec)
    else:
        scene.add("heart", sac, A.fat_hu + 10, "fat", allow("myocardium"))
    heart = Ellipsoid(hc, A.heart_r, A.heart_rot)
    heart_clip = region(lambda x, y, z: np.maximum(heart.sd(x, y, z), A.dia_z(x, y) - z - 2), heart.lo, heart.hi)
    scene.add("heart", heart_clip, A.myo_hu, "myocardium", allow("fat", "fluid", "myocardium", "lung", "lung_vessel",
                                                                "blood", "organ", "gut"), spec=heart_spec)
    if A.contrast:  # chambers only show against the myocardium once blood is opacified
        R, r = A.heart_rot, A.heart_r
        ant = np.array([0.0, 1.0, 0.0])
        left = np.array([-1.0, 0.0, 0.0])
        long_ = R[:, 0]
        for centre, radii in [
            (hc + long_ * 0.12 * r[0] + left * 0.18 * r[1] - ant * 0.12 * r[1], (0.55 * r[0], 0.4 * r[1], 0.42 * r[2])),  # LV
            (hc + ant * 0.42 * r[1] - left * 0.1 * r[1], (0.55 * r[0], 0.2 * r[1], 0.5 * r[2])),                       # RV
            (hc - long_ * 0.62 * r[0] - ant * 0.25 * r[1], (0.3 * r[0], 0.45 * r[1], 0.4 * r[2])),                    # LA
            (hc - long_ * 0.45 * r[0] - left * 0.45 * r[1] + ant * 0.1 * r[1], (0.3 * r[0], 0.35 * r[1], 0.42 * r[2])),  # RA
        ]:
            scene.add("heart", Ellipsoid(centre, radii, R), blood, "blood", allow("myocardium"), spec=heart_spec)
    for path in coronary_paths(A).values():
        for cap in chain(path, 1.7):
            scene.add("heart", cap, blood, "blood", allow("fat"))

    # --- airways: trachea and main bronchi, then the bronchial and vascular trees --------------
    ytr = lambda z: float(A.y_vb(z)) + 44 * s  # noqa: E731
    trachea = smooth_path([[0, ytr(L + 130), L + 130], [0, ytr(L), L], [0, ytr(cz + 40), cz + 40],
                           [0, ytr(cz), cz]], 14)
    rt = A.trachea_r
    main = {
        "right": smooth_path([trachea[-1], [12 * s, ytr(cz) - 5, cz - 12], A.hilum["right"] + (4, 8, 2)], 6),
        "left": smooth_path([trachea[-1], [-20 * s, ytr(cz) - 6, cz - 10], [-34 * s, ytr(cz) - 10, cz - 20],
                             A.hilum["left"] + (-4, 8, 3)], 7),
    }
    wall_ok = allow("fat", "lung", "lung_vessel", "gut", "organ", "muscle", "blood", "gut_air")
    pipes = [(trachea, rt)] + [(main[k], rt * (0.78 if k == "right" else 0.7)) for k in main]
    for path, r in pipes:
        for cap in chain(path, r + 1.8):
            scene.add("airways", cap, 45.0, "cartilage", wall_ok)
    for path, r in pipes:
        for cap in chain(path, r):
            scene.add("airways", cap, -1000.0, "airway", allow("cartilage", "fat", "lung"))

    in_lung_ok = allow("lung", "fat", "lung_vessel")
    for side in ("right", "left"):
        pts = A.sample_lung(rng, 2400, margin=2.0, side=side)
        if len(pts) < 50:
            continue
        arteries = grow_tree(A.hilum[side], pts, 5.8 * s, 0.76, 6, twigs=3)
        la = hc + A.heart_rot @ np.array([-0.55 * A.heart_r[0], 0.0, 0.0]) + (
            (24 if side == "right" else -22) * s, -10 * s, -8 * s)
        vpts = A.sample_lung(rng, 2400, margin=2.0, side=side)
        vtree = grow_tree(la, vpts, 6.2 * s, 0.76, 6, twigs=3)
        for br in arteries + vtree:
            scene.add("lung_tree", Capsule(br.a, br.b, br.ra, br.rb), blood, "lung_vessel", in_lung_ok)
        bronchi = bronchi_from(arteries, 7)
        bronchi_out[side] = bronchi
        for br in bronchi:
            if br.depth <= 4:
                wall = max(0.9, 0.18 * br.ra)
                cap = Capsule(br.a, br.b, br.ra + wall, br.rb + wall)
                scene.add("lung_tree", cap, 40.0, "lung_vessel", allow("lung", "fat"))
        for br in bronchi:
            if br.depth <= 4:
                scene.add("lung_tree", Capsule(br.a, br.b, br.ra, br.rb), -1000.0, "airway",
                          allow("lung", "lung_vessel", "fat"))
    # Fissures: the thin pleural planes that separate the lobes.
    cos = {side: 1 / math.sqrt(1 + ((A.oblique_z(1.0, side) - A.oblique_z(0.0, side))) ** 2)
           for side in ("right", "left")}
    for side, sign in (("right", 1.0), ("left", -1.0)):
        def oblique(x: np.ndarray, y: np.ndarray, z: np.ndarray, side: str = side, sign: float = sign) -> np.ndarray:
            d = np.abs(z - A.oblique_z(y, side, x)) * np.float32(cos[side]) - 0.5
            return np.maximum(d, -sign * x)
        fis = region(oblique, lung_lo, lung_hi)
        fis.amp = min(1.0, 1.2 / grid.h)
        scene.add("lung_tree", fis, -80.0, "lung", allow("lung"))
    zh = A.horizontal_z()
    hfis = region(lambda x, y, z: np.maximum(np.maximum(np.abs(z - zh) - 0.5, -x), A.oblique_z(y, "right", x) - z),
                  (0, -A.bp0, zh - 3), (A.ac0, A.ba0, zh + 3))
    hfis.amp = min(1.0, 1.2 / grid.h)
    scene.add("lung_tree", hfis, -80.0, "lung", allow("lung"))

    # --- bones -----------------------------------------------------------------------------
    _build_bones(scene, A, rng)


def _build_bones(scene: Scene, A: Anatomy, rng: np.random.Generator) -> None:
    s, L, cz, pitch = A.s, A.L, A.carina_z, A.pitch
    # Vertebrae C7..L2: body (cortex shell, marrow), disc below, arch, spinous and transverse processes.
    for k in range(0, 15):
        zk = cz + (4.5 - k) * pitch
        yv = float(A.y_vb(zk))
        rx, ry, hz = 20 * s * (1 + 0.025 * k), 15.5 * s * (1 + 0.02 * k), 0.4 * pitch
        lo, hi = (-rx - 2, yv - ry - 2, zk - hz - 2), (rx + 2, yv + ry + 2, zk + hz + 2)

        def body(x: np.ndarray, y: np.ndarray, z: np.ndarray, inset: float = 0.0, zk: float = zk, yv: float = yv,
                 rx: float = rx, ry: float = ry, hz: float = hz) -> np.ndarray:
            e = (np.sqrt((x / rx) ** 2 + ((y - yv) / ry) ** 2) - 1) * np.float32(ry)
            return np.maximum(e, np.abs(z - zk) - hz) + inset

        scene.bone("bones", region(body, lo, hi), region(lambda x, y, z, f=body: f(x, y, z, 2.4), lo, hi), A)
        zd = zk - 0.5 * pitch
        scene.add("bones", region(lambda x, y, z, zd=zd, yv=yv, rx=rx, ry=ry: np.maximum(
            (np.sqrt((x / rx) ** 2 + ((y - yv) / ry) ** 2) - 1) * np.float32(ry), np.abs(z - zd) - 0.1 * pitch),
            (-rx, yv - ry, zd - 4), (rx, yv + ry, zd + 4)), 95.0, "cartilage", NOT_BONE)
        yc = yv - ry - 9 * s
        arch_lo, arch_hi = (-16 * s, yc - 16 * s, zk - 0.45 * pitch), (16 * s, yc + 14 * s, zk + 0.25 * pitch)
        scene.add("bones", region(lambda x, y, z, yc=yc, zk=zk: np.maximum(
            np.abs(np.sqrt(x * x + (y - yc) ** 2) - 12 * s) - 3.5 * s, np.abs(z - zk + 0.1 * pitch) - 0.33 * pitch),
            arch_lo, arch_hi), A.cortex_hu * 0.8, "cortical_bone", NOT_BONE)
        for a, b, r in [((0, yc - 12 * s, zk), (0, yc - 38 * s, zk - 0.6 * pitch), 4.5 * s),
                        ((9 * s, yc + 2, zk + 3), (34 * s, yc - 10 * s, zk + 6), 5.0 * s),
                        ((-9 * s, yc + 2, zk + 3), (-34 * s, yc - 10 * s, zk + 6), 5.0 * s)]:
            scene.bone("bones", Capsule(a, b, r), Capsule(a, b, r - 1.8), A, 0.9)
    canal_lo, canal_hi = (-10 * s, -A.bp0 - 60, -BIG), (10 * s, 0, BIG)
    scene.add("bones", region(lambda x, y, z: np.sqrt(x * x + (y - np.asarray(A.y_vb(z), np.float32)
                                                                 + np.float32(24.5 * s)) ** 2) - 8 * s,
                              canal_lo, canal_hi), 22.0, "csf", allow("cortical_bone", "marrow", "muscle", "fat",
                                                                       "cartilage"))
    # Ribs 1-12 on each side: from the costovertebral joint around the chest wall, sloping down.
    drops = [18, 34, 48, 58, 66, 72, 76, 76, 72, 64, 46, 36]
    ends = [0.82, 0.82, 0.81, 0.8, 0.79, 0.78, 0.76, 0.7, 0.64, 0.58, 0.5, 0.42]
    calcified = A.age > 55 and rng.random() < 0.6
    for k in range(1, 13):
        zpost = cz + (4.5 - k) * pitch + 0.3 * pitch
        yv = float(A.y_vb(zpost))
        for side in (1.0, -1.0):
            a0, ba0, bp0, cy0 = (float(v[0]) for v in A.profile(np.array([zpost])))
            phi0 = math.asin(min(0.95, 46 * s / (a0 + 5)))
            phi = np.linspace(phi0, ends[k - 1] * math.pi, 12)
            zz = zpost - drops[k - 1] * s * ((phi - phi0) / (phi[-1] - phi0)) ** 1.25
            a, ba, bp, cy = A.profile(zz)
            xx = side * (a + 5) * np.sin(phi)
            yy = np.where(phi < math.pi / 2, cy - (bp + 5) * np.cos(phi), cy - (ba + 5) * np.cos(phi))
            pts = np.vstack([[side * 14 * s, yv + 4, zpost + 4], [side * 34 * s, yv - 14 * s, zpost + 3],
                             np.column_stack([xx, yy, zz])])
            r = (4.0 if k in (1, 12) else 4.6) * s
            for cap_o, cap_i in zip(chain(pts, r), chain(pts, r - 1.7)):
                scene.bone("bones", cap_o, cap_i, A)
            if k <= 10:
                end = pts[-1]
                if k <= 7:
                    zs = A.notch_z - 12 * s - (k - 1) * 19 * s
                    target = np.array([side * 17 * s, float(A.profile(np.array([zs]))[1][0]
                                                           + A.profile(np.array([zs]))[3][0]) + 9 * s, zs])
                else:
                    target = end + (-side * 22 * s, 10 * s, 30 * s)
                mid = (end + target) / 2 + (0, 4 * s, 0)
                cart = smooth_path([end, mid, target], 6)
                for cap in chain(cart, 4.2 * s):
                    scene.add("bones", cap, rng.uniform(260, 420) if calcified and rng.random() < 0.3 else 115.0,
                              "cartilage", NOT_BONE)
    # Sternum: manubrium, body, xiphoid, tilted so the lower end sits further forward.
    zs_top = A.notch_z
    _, ba_m, _, cy_m = (float(v[0]) for v in A.profile(np.array([zs_top - 22 * s])))
    y_m = cy_m + ba_m + 8 * s
    body_len = 100 * s
    zb = zs_top - 48 * s - body_len / 2
    _, ba_b, _, cy_b = (float(v[0]) for v in A.profile(np.array([zb])))
    y_b = cy_b + ba_b + 9 * s
    tilt = frame([0.0, 0.0, 1.0])
    for c, half in [((0, y_m, zs_top - 22 * s), (24 * s, 6.5 * s, 22 * s)),
                    ((0, y_b, zb), (14 * s, 6 * s, body_len / 2)),
                    ((0, y_b + 3 * s, zb - body_len / 2 - 14 * s), (9 * s, 3.5 * s, 12 * s))]:
        scene.bone("bones", Box(c, half, 3.0, tilt), Box(c, np.array(half) - 2.0, 2.0, tilt), A)
    A.sternum = (y_m, y_b, zs_top, zb - body_len / 2)
    # Clavicles and scapulae.
    for side in (1.0, -1.0):
        p = smooth_path([[side * 18 * s, y_m + 8 * s, zs_top + 4], [side * 62 * s, y_m - 2 * s, zs_top + 14],
                         [side * (A.ac0 * 0.95 + 16 * s), -0.05 * A.bp0, zs_top + 26]], 8)
        for co, ci in zip(chain(p, 6.2 * s), chain(p, 4.4 * s)):
            scene.bone("bones", co, ci, A)

        def scapula(x: np.ndarray, y: np.ndarray, z: np.ndarray, side: float = side) -> np.ndarray:
            a, ba, bp, cy = A.profile(z)
            off = RIB + A.muscle[2] * 0.55
            e = ellipse_sd(x, y, 0.0, cy, a + off + 6, ba + off, bp + off)
            plate = np.abs(e) - 2.6
            phi = np.arctan2(side * x, -(y - cy))
            u = np.clip((L + 10 - z) / (150 * s), 0, 1)
            lo_phi = 0.52 + 0.18 * u
            hi_phi = 1.3 - 0.5 * u
            ang = np.maximum(lo_phi - phi, phi - hi_phi) * 60.0
            zlim = np.maximum(z - (L + 12), (L - 150 * s) - z)
            return np.maximum(np.maximum(plate, ang), zlim)

        lo = (min(side * 30, side * (A.ac0 + 70)), -A.bp0 - 60, L - 155 * s)
        hi = (max(side * 30, side * (A.ac0 + 70)), 0.3 * A.ba0, L + 15)
        scene.add("bones", region(scapula, lo, hi), A.cortex_hu * 0.75, "cortical_bone",
                  allow("muscle", "fat", "skin"))
