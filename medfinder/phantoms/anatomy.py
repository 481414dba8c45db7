"""The patient: analytic anatomy in the patient frame (mm; x to the right, y anterior, z superior).

Sizes and landmarks are drawn once per patient and every organ is a closed-form function of
them, so findings can be placed (in a lobe, against the chest wall, on an artery) by asking the
anatomy rather than by looking at voxels.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .geometry import Ellipsoid, frame, smooth_path


def ellipse_sd(x: np.ndarray, y: np.ndarray, cx: Any, cy: Any, a: Any, b_ant: Any, b_post: Any) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse whose anterior and posterior halves differ."""
    dy = y - cy
    ib = np.where(dy > 0, np.float32(1.0) / b_ant, np.float32(1.0) / b_post)
    dy = dy * ib
    np.square(dy, out=dy)
    u = (x - cx) * (np.float32(1.0) / a)
    dy += u * u
    np.sqrt(dy, out=dy)
    dy -= np.float32(1.0)
    dy *= np.minimum(np.minimum(a, b_ant), b_post)
    return dy


#: Thickness of the rib layer between the pleura and the chest-wall muscles (mm).
RIB = 8.0

class Anatomy:
    """One patient's body: sizes drawn from the case's random stream, landmarks, implicit organs."""

    sternum: tuple[float, float, float, float]   # set by the bones: manubrium y, body y, top z, bottom z

    def __init__(self, rng: np.random.Generator, sex: str, age: int, contrast: bool, heart_scale: float):
        self.sex, self.age, self.contrast = sex, age, contrast
        male = sex == "M"
        s = rng.uniform(0.98, 1.08) if male else rng.uniform(0.9, 0.99)
        self.s = s
        self.L = rng.uniform(205, 245) * s                      # apex height above the right dome
        self.ac0 = rng.uniform(130, 142) * s                    # cavity half-width at the bases
        self.ba0 = rng.uniform(72, 86) * s                      # cavity centre to anterior wall
        self.bp0 = rng.uniform(80, 92) * s                      # cavity centre to posterior wall
        habitus = rng.beta(2.0, 3.0)                            # 0 lean .. 1 obese
        self.fat = np.array([5, 6, 5]) + habitus * np.array([26, 34, 26])  # ant, lat, post (mm)
        self.muscle = (np.array([13, 5, 14]) if male else np.array([8, 4, 12])) * rng.uniform(0.8, 1.2)
        self.fat_hu = rng.uniform(-112, -88)
        self.muscle_hu = rng.uniform(38, 55)
        self.lung_hu = rng.uniform(-880, -835) + (age - 50) * -0.4
        self.dome_left = -rng.uniform(10, 22)
        self.dia_depth = rng.uniform(48, 62)
        self.carina_z = 0.58 * self.L + rng.uniform(-6, 6)
        self.notch_z = self.L - rng.uniform(20, 32)
        self.pitch = rng.uniform(26.5, 29.5) * s                # vertebral level spacing
        self.blood_hu = rng.uniform(180, 260) if contrast else rng.uniform(36, 48)
        self.myo_hu = rng.uniform(95, 120) if contrast else rng.uniform(40, 50)
        self.liver_hu = rng.uniform(95, 125) if contrast else rng.uniform(50, 66)
        self.marrow_hu = float(np.clip(rng.normal(330 - 2.2 * (age - 30), 35), 150, 420))
        self.cortex_hu = rng.uniform(950, 1250)

        # Heart: long axis base -> apex points left, anterior and down.
        self.heart_scale = heart_scale
        axis = np.array([-0.72, 0.45, -0.52]) + rng.normal(0, 0.05, 3)
        self.heart_rot = frame(axis)
        grow = np.array([1.0, 0.75, 0.35]) * (heart_scale - 1) + 1   # enlarged hearts widen most
        self.heart_r = np.array([67.0, 52.0, 45.0]) * s * grow * rng.uniform(0.95, 1.05, 3)
        ext = np.sqrt(((self.heart_rot * self.heart_r) ** 2).sum(axis=1))
        hz = -12 + ext[2] - 14
        hy = self.ba0 * 0.98 - 5 - ext[1]
        hx = 36 * s - ext[0] - rng.uniform(0, 8)
        self.heart_c = np.array([hx, hy, hz])
        self.heart_ext = ext

        # Airway and vessel landmarks.
        self.y_trachea = self.y_vb(self.carina_z) + 44 * s
        self.trachea_r = (9.5 if male else 8.3) * rng.uniform(0.92, 1.08)
        cz = self.carina_z
        self.hilum = {
            "right": np.array([0.36 * self.ac0, self.y_trachea - 14, cz - 18]),
            "left": np.array([-0.38 * self.ac0, self.y_trachea - 16, cz - 26]),
        }
        self.aorta_r = (13.5 + 0.05 * (age - 40)) * s * rng.uniform(0.92, 1.08)
        self.aorta_path = self._aorta_path()

    # ---- z profiles -----------------------------------------------------------------------
    def profile(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cavity half-width, anterior and posterior half-depth, and centre y at height z."""
        L = self.L
        zs = [-400, -60, 0, 0.35 * L, 0.6 * L, 0.8 * L, 0.92 * L, L, L + 30, L + 400]
        a = np.interp(z, zs, [0.96, 0.99, 1.0, 0.99, 0.95, 0.86, 0.74, 0.6, 0.52, 0.52]) * self.ac0
        ba = np.interp(z, zs, [0.92, 0.97, 1.0, 1.0, 0.95, 0.86, 0.76, 0.66, 0.56, 0.56]) * self.ba0
        bp = np.interp(z, zs, [0.95, 0.98, 1.0, 1.0, 0.97, 0.9, 0.8, 0.72, 0.62, 0.62]) * self.bp0
        cy = np.interp(z, zs, [0, 0, 0, 0, -3, -8, -12, -15, -16, -16]) * self.s
        return (a.astype(np.float32), ba.astype(np.float32), bp.astype(np.float32), cy.astype(np.float32))

    def y_vb(self, z: Any) -> Any:
        """Centre of the vertebral bodies (thoracic kyphosis bows them backwards mid-chest)."""
        u = (np.asarray(z, np.float64) - 0.45 * self.L) / (0.75 * self.L)
        return -self.bp0 + 24 * self.s - 9 * self.s * (1 - np.clip(u, -1, 1) ** 2)

    def body_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, inset: float = 0.0) -> np.ndarray:
        a, ba, bp, cy = self.profile(z)
        top = np.clip((z - 0.78 * self.L) / (0.22 * self.L), 0, 1)
        aw = self.ac0 * 0.99 + RIB + self.muscle[1] + self.fat[1] + 2 + 14 * top - inset
        bw = ba + RIB + self.muscle[0] + self.fat[0] + 2 - inset
        bpw = self.bp0 + RIB + self.muscle[2] + self.fat[2] + 22 * self.s + 2 - inset
        sd = ellipse_sd(x, y, 0.0, cy, aw, bw, bpw + cy)
        flat = -(y + np.float32(0.94 * (self.bp0 + RIB + self.muscle[2] + self.fat[2] + 22 * self.s + 2) - inset))
        return np.maximum(sd, flat)   # the back lies flat on the table

    def muscle_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, ba, bp, cy = self.profile(z)
        top = np.clip((z - 0.72 * self.L) / (0.28 * self.L), 0, 1)
        return ellipse_sd(x, y, 0.0, cy, a + RIB + self.muscle[1] + 26 * top, ba + RIB + self.muscle[0],
                          bp + RIB + self.muscle[2])

    def cavity_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, ba, bp, cy = self.profile(z)
        return ellipse_sd(x, y, 0.0, cy, a, ba, bp)

    def dia_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm surface (two domes; deepest in the posterior recesses)."""
        yd = 0.1 * self.ba0
        by = np.where(y > yd, 1.35 * self.ba0, self.bp0)
        qy = ((y - yd) / by) ** 2
        sx = 0.6 * self.ac0
        zr = -self.dia_depth * (((x - 0.42 * self.ac0) / sx) ** 2 + qy)
        zl = self.dome_left - self.dia_depth * (((x + 0.42 * self.ac0) / sx) ** 2 + qy)
        return np.maximum(zr, zl)

    def apex_top(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ya = -0.2 * self.bp0
        R = 2 * 38.0 * self.s
        tr = self.L - ((x - 0.38 * self.ac0) ** 2 + (y - ya) ** 2) / R
        tl = self.L - 6 - ((x + 0.38 * self.ac0) ** 2 + (y - ya) ** 2) / R
        return np.maximum(tr, tl)

    def envelope_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The mediastinum between the lungs above the heart (and behind it, around the aorta)."""
        L, s = self.L, self.s
        zs = [-400, 0, 0.25 * L, 0.45 * L, 0.58 * L, 0.68 * L, 0.8 * L, L, L + 400]
        w = np.interp(z, zs, [22, 22, 24, 27, 33, 40, 30, 25, 34]).astype(np.float32) * s
        xm = np.interp(z, zs, [-10, -10, -9, -6, -3, -2, 0, 0, 0]).astype(np.float32) * s
        a, ba, bp, cy = self.profile(z)
        ant = cy + ba
        post = np.asarray(self.y_vb(z), np.float32) - 8 * s
        yc = (ant + post) / 2
        b = (ant - post) / 2
        return ellipse_sd(x, y, xm, yc, w, b, b)

    def heart_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, grow: float = 0.0) -> np.ndarray:
        return Ellipsoid(self.heart_c, self.heart_r + grow, self.heart_rot).sd(x, y, z)

    def _aorta_path(self) -> np.ndarray:
        s, cz, hc = self.s, self.carina_z, self.heart_c
        yvb = float(self.y_vb(cz))
        dz = float(self.y_vb(0.0))
        anchors = [
            [hc[0] + 28 * s, hc[1] + 2, hc[2] + 32 * s],        # aortic root
            [20 * s, 14 * s, cz - 8],
            [16 * s, 18 * s, cz + 22],                          # ascending, right of the trachea
            [0.0, 12 * s, cz + 38],                             # arch
            [-18 * s, -4 * s, cz + 34],
            [-24 * s, yvb + 24 * s, cz + 8],                    # descending, left of the spine
            [-22 * s, float(self.y_vb(0.4 * self.L)) + 22 * s, 0.4 * self.L],
            [-12 * s, dz + 24 * s, -30.0],
            [-6 * s, dz + 24 * s, -300.0],
        ]
        return smooth_path(anchors, 40)

    # ---- lungs and lobes ------------------------------------------------------------------
    def lung_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The pleural space the lungs fill (before the heart and great vessels take their share)."""
        sd = np.maximum(self.cavity_sd(x, y, z), self.dia_z(x, y) - z)
        sd = np.maximum(sd, z - self.apex_top(x, y))
        return np.maximum(sd, -self.envelope_sd(x, y, z))

    def lung_side(self, p: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """For points (N, 3): 1 in the right lung, 2 in the left lung, 0 elsewhere, ``margin`` mm deep."""
        x, y, z = (p[:, i].astype(np.float32) for i in range(3))
        inside = self.lung_sd(x, y, z) < -margin
        inside &= self.heart_sd(x, y, z, grow=4.0) > margin
        yv = np.asarray(self.y_vb(z), np.float32)
        inside &= ((x / 30) ** 2 + ((y - yv) / 28) ** 2) > (1 + margin / 28) ** 2
        d_aorta = np.min(np.linalg.norm(p[:, None, :] - self.aorta_path[None, ::2, :], axis=2), axis=1)
        inside &= d_aorta > self.aorta_r + 4 + margin
        return np.where(inside, np.where(x > 0, 1, 2), 0)

    def oblique_z(self, y: Any, side: str, x: Any = 0.0) -> Any:
        """Height of the major fissure; laterally it lies further back, as it curves round the hilum."""
        y = y + 0.4 * (np.abs(x) - 45 * self.s)
        y1, z1 = -self.bp0, self.carina_z + (14 if side == "right" else 24)
        y2, z2 = 0.35 * self.ba0, -18.0
        return z1 + (y - y1) * (z2 - z1) / (y2 - y1)

    def horizontal_z(self) -> float:
        return self.carina_z - 42 * self.s

    def lobe_of(self, p: Sequence[float]) -> str:
        x, y, z = (float(v) for v in p)
        side = "right" if x > 0 else "left"
        if z < self.oblique_z(y, side, x):
            return f"{side} lower lobe"
        if side == "right":
            return "right middle lobe" if z < self.horizontal_z() else "right upper lobe"
        return "left upper lobe"

    def sample_lung(self, rng: np.random.Generator, n: int, margin: float = 0.0,
                    lobe: str | None = None, side: str | None = None,
                    where: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Up to n random points inside the lungs (optionally one lobe or side)."""
        lo = np.array([-self.ac0, -self.bp0, -self.dia_depth * 1.3 + self.dome_left])
        hi = np.array([self.ac0, self.ba0, self.L])
        out: list[np.ndarray] = []
        got = 0
        for _ in range(40):
            cand = rng.uniform(lo, hi, size=(max(4 * n, 256), 3))
            if side is not None:
                cand[:, 0] = np.abs(cand[:, 0]) * (1 if side == "right" else -1)
            ok = self.lung_side(cand, margin) > 0
            if where is not None:
                ok &= where(cand)
            cand = cand[ok]
            if lobe is not None and len(cand):
                cand = cand[[self.lobe_of(c) == lobe for c in cand]]
            out.append(cand)
            got += len(cand)
            if got >= n:
                break
        pts = np.vstack(out) if out else np.zeros((0, 3))
        return pts[:n]


def coronary_paths(A: Anatomy) -> dict[str, np.ndarray]:
    """LAD, circumflex and right coronary artery, 1.6 mm outside the myocardium (epicardial fat)."""
    R, r, c = A.heart_rot, A.heart_r, A.heart_c
    ant = R.T @ np.array([0.0, 1.0, 0.0])
    ant[0] = 0.0
    ant /= np.linalg.norm(ant)
    lat = np.cross([1.0, 0.0, 0.0], ant)
    if (R @ lat)[0] > 0:          # make ``lat`` point to the patient's left (negative x)
        lat = -lat

    def on_surface(u: np.ndarray, theta: np.ndarray) -> np.ndarray:
        v = np.sqrt(np.clip(1 - u ** 2, 0, 1))[:, None] * (np.outer(np.cos(theta), ant) + np.outer(np.sin(theta), lat))
        unit = v.copy()
        unit[:, 0] = u
        local = unit * r
        local *= (1 + 1.6 / np.linalg.norm(local, axis=1))[:, None]
        return c + local @ R.T

    n = 14
    groove = np.full(n, -0.42)
    return {
        "LAD": on_surface(np.linspace(-0.42, 0.9, n), np.full(n, 0.15)),
        "LCx": on_surface(groove, np.linspace(0.35, 2.3, n)),
        "RCA": on_surface(groove, np.linspace(-0.2, -2.5, n)),
    }
