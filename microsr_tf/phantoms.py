"""Synthetic temporal-bone phantoms: one continuous anatomy per subject, rendered as micro-CT and as CBCT.

No public inner-ear data can be shipped, so every test, benchmark and the demo train and predict on these.
Each subject is a set of analytic shapes (signed distance functions in millimetres, world frame): a
textured petrous bone block with a dense otic capsule, a cochlea-like tapering spiral canal with an osseous
spiral lamina and a modiolus, a vestibule, three roughly orthogonal semicircular canals, the internal
auditory canal, an air-filled middle ear with ossicles and the external canal, and mastoid air cells.

The same anatomy is rendered twice, never by resampling one array into the other:

* HR ("micro-CT"): sampled at the fine voxel centres with one-voxel antialiased edges, a slight focal-spot
  blur, faint ring artefacts and low noise; unsigned 16-bit grey values (no scaling).
* LR ("cone-beam CT"): 8x coarser *in-plane only* (the slice spacing equals the HR one, so the paired test
  subject lines up slice for slice with its HR twin after in-plane super-resolution). It is rendered on a
  supersampled grid, blurred by an isotropic CBCT point spread function wider than a voxel, averaged into
  voxels, then given filtered-back-projection noise, beam-hardening streaks, cupping and an HU-like
  calibration with per-subject gain/offset; stored as int16 Hounsfield-like units.

Both grids share one field of view and world frame (voxel-centred affines, sform/qform code 1), so the HR
grid is exactly the LR grid resampled 8x in-plane, half-voxel aligned.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from nibabel.nifti1 import Nifti1Header
from scipy import ndimage
from skimage.transform import iradon, radon

from .errors import ConfigError, InputError
from .files import atomic_write_text
from .volumes import make_output_dir, write_volume

# Linear attenuation relative to water: what every material is rendered as before calibration.
AIR = 0.0
SOFT = 1.0  # soft tissue, perilymph, CSF
MODIOLUS = 1.4  # spongy bone around the cochlear nerve
PORE = 1.2  # marrow / vascular spaces inside bone
BONE = 1.85  # petrous bone (textured around this value)
OSSICLE = 2.05
CAPSULE = 2.3  # the very dense otic capsule around the labyrinth

HR_DTYPE = np.uint16
LR_DTYPE = np.int16


@dataclass(frozen=True)
class PhantomSpec:
    """Grids and imaging parameters of one phantom size (spacings in mm, shapes in voxels, x-y-z order)."""

    name: str
    hr_shape: tuple[int, int, int]
    hr_spacing: tuple[float, float, float]
    lr_shape: tuple[int, int, int]
    lr_spacing: tuple[float, float, float]
    anatomy_scale: float = 0.6  # size of the anatomy relative to an adult temporal bone
    supersample: int = 4  # LR sub-samples per voxel side, in-plane
    lr_psf_fwhm: float = 1.6  # CBCT point spread function, FWHM in LR in-plane voxels (isotropic in mm)
    lr_noise_hu: float = 45.0  # CBCT noise standard deviation
    lr_views: int = 90  # projections used to simulate streaks and noise texture
    hr_noise: float = 0.012  # micro-CT noise standard deviation, attenuation units

    @property
    def fov(self) -> tuple[float, float, float]:
        """Field of view in mm (identical for both grids)."""
        return tuple(n * d for n, d in zip(self.hr_shape, self.hr_spacing))

    @property
    def factor(self) -> tuple[float, float]:
        """In-plane LR/HR spacing ratio."""
        return (self.lr_spacing[0] / self.hr_spacing[0], self.lr_spacing[1] / self.hr_spacing[1])

    def validate(self) -> "PhantomSpec":
        for label, shape, spacing in (("hr", self.hr_shape, self.hr_spacing), ("lr", self.lr_shape, self.lr_spacing)):
            if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
                raise ConfigError(f"phantom size {self.name!r}: {label} shape/spacing must be 3 positive values")
        lr_fov = [n * d for n, d in zip(self.lr_shape, self.lr_spacing)]
        if not np.allclose(lr_fov, self.fov, rtol=1e-6, atol=1e-6):
            raise ConfigError(f"phantom size {self.name!r}: LR field of view {lr_fov} differs from HR {list(self.fov)}")
        if self.lr_shape[2] != self.hr_shape[2]:
            raise ConfigError(f"phantom size {self.name!r}: LR and HR must have the same number of slices")
        if self.supersample < 1 or self.lr_views < 8:
            raise ConfigError(f"phantom size {self.name!r}: supersample must be >= 1 and lr_views >= 8")
        return self

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


SIZES: dict[str, PhantomSpec] = {
    # Trains on two CPU cores: 192 px at 0.06 mm (11.5 mm field of view), LR 24 px at 0.48 mm, 48 slices.
    "small": PhantomSpec("small", (192, 192, 48), (0.06, 0.06, 0.06), (24, 24, 48), (0.48, 0.48, 0.06)),
    # The paper's voxel sizes (micro-CT 0.018 mm, CBCT 0.15 mm: factor 8.33) on a cropped 10.8 mm field.
    "paper": PhantomSpec("paper", (600, 600, 48), (0.018, 0.018, 0.018), (72, 72, 48), (0.15, 0.15, 0.018),
                         lr_noise_hu=70.0, hr_noise=0.015),
}


def get_spec(size: str | PhantomSpec) -> PhantomSpec:
    """Resolve a size name (``small``, ``paper``) or pass a custom spec through, validated."""
    if isinstance(size, PhantomSpec):
        return size.validate()
    if size not in SIZES:
        raise ConfigError(f"unknown phantom size {size!r} (known: {', '.join(SIZES)})")
    return SIZES[size].validate()


def affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel-to-world (mm) affine of a grid centred on the world origin, voxel centres at half spacings."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = [-(n * d) / 2 + d / 2 for n, d in zip(shape, spacing)]
    return aff


# --------------------------------------------------------------------------------------------------
# Shapes: signed distance (mm, negative inside) on broadcastable world-coordinate arrays.


def _local(X, Y, Z, centre, axes):
    """Coordinates of world points in a frame whose rows ``axes`` are unit vectors, origin ``centre``."""
    dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
    return [a[0] * dx + a[1] * dy + a[2] * dz for a in axes]


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid (vestibule, middle ear, ossicle heads, air cells); approximate distance near the surface."""

    centre: np.ndarray
    axes: np.ndarray  # 3x3, rows are the principal directions
    semi: np.ndarray  # semi-axes, mm

    def bbox(self):
        r = float(self.semi.max())
        return self.centre - r, self.centre + r

    def sdf(self, X, Y, Z):
        l = _local(X, Y, Z, self.centre, self.axes)
        k0 = np.sqrt(sum((c / s) ** 2 for c, s in zip(l, self.semi)))
        k1 = np.sqrt(sum((c / s**2) ** 2 for c, s in zip(l, self.semi)))
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


@dataclass(frozen=True)
class Capsule:
    """A round-ended tube from ``a`` to ``b`` (canals, ossicle processes, the basal hook)."""

    a: np.ndarray
    b: np.ndarray
    radius: float

    def bbox(self):
        return np.minimum(self.a, self.b) - self.radius, np.maximum(self.a, self.b) + self.radius

    def sdf(self, X, Y, Z):
        ba = self.b - self.a
        px, py, pz = X - self.a[0], Y - self.a[1], Z - self.a[2]
        h = np.clip((px * ba[0] + py * ba[1] + pz * ba[2]) / max(float(ba @ ba), 1e-12), 0.0, 1.0)
        return np.sqrt((px - h * ba[0]) ** 2 + (py - h * ba[1]) ** 2 + (pz - h * ba[2]) ** 2) - self.radius


@dataclass(frozen=True)
class Torus:
    """A semicircular canal: a full ring whose arc through the vestibule merges with it."""

    centre: np.ndarray
    normal: np.ndarray
    major: float
    minor: float

    def bbox(self):
        r = self.major + self.minor
        return self.centre - r, self.centre + r

    def sdf(self, X, Y, Z):
        qx, qy, qz = X - self.centre[0], Y - self.centre[1], Z - self.centre[2]
        h = qx * self.normal[0] + qy * self.normal[1] + qz * self.normal[2]
        rho = np.sqrt(np.maximum(qx**2 + qy**2 + qz**2 - h**2, 0.0))
        return np.sqrt((rho - self.major) ** 2 + h**2) - self.minor


@dataclass(frozen=True)
class Cone:
    """A truncated cone along ``axis`` from ``base`` (the modiolus)."""

    base: np.ndarray
    axis: np.ndarray
    height: float
    r_base: float
    r_top: float

    def bbox(self):
        mid = self.base + self.axis * self.height / 2
        r = self.height / 2 + self.r_base
        return mid - r, mid + r

    def sdf(self, X, Y, Z):
        qx, qy, qz = X - self.base[0], Y - self.base[1], Z - self.base[2]
        a = qx * self.axis[0] + qy * self.axis[1] + qz * self.axis[2]
        rr = np.sqrt(np.maximum(qx**2 + qy**2 + qz**2 - a**2, 0.0))
        rad = self.r_base + (self.r_top - self.r_base) * np.clip(a / self.height, 0.0, 1.0)
        return np.maximum(np.maximum(rr - rad, -a), a - self.height)


@dataclass(frozen=True)
class Cochlea:
    """A tapering spiral canal around the modiolar axis.

    Centreline at angle t (0 at the basal end, t_max = 2 pi turns at the apex): radius ``r0 exp(-decay t)``,
    height ``rise t / t_max`` along ``axis``; the canal's meridional cross-section is an ellipse with
    semi-axes (radial, axial) shrinking linearly by ``taper`` towards the apex.
    """

    base: np.ndarray  # modiolar axis at the level of the basal turn
    axis: np.ndarray  # towards the apex
    e1: np.ndarray  # direction of the basal end
    e2: np.ndarray  # direction the spiral winds into (sets the handedness)
    turns: float
    r0: float
    decay: float
    rise: float
    radial: float
    axial: float
    taper: float

    @property
    def t_max(self) -> float:
        return 2 * math.pi * self.turns

    def centreline(self, t: float) -> np.ndarray:
        r = self.r0 * math.exp(-self.decay * t)
        return (self.base + self.axis * self.rise * t / self.t_max
                + r * (math.cos(t) * self.e1 + math.sin(t) * self.e2))

    def bbox(self):
        r = self.r0 + self.radial + self.rise + self.axial
        return self.base - r, self.base + r

    def _turn_coords(self, X, Y, Z):
        """Per turn n: (t, radial offset, axial offset, radial semi-axis, axial semi-axis) of each point."""
        l = _local(X, Y, Z, self.base, np.stack([self.e1, self.e2, self.axis]))
        r = np.sqrt(l[0] ** 2 + l[1] ** 2)
        phi = np.mod(np.arctan2(l[1], l[0]), 2 * math.pi)
        for n in range(int(math.ceil(self.turns)) + 1):
            t = phi + 2 * math.pi * n
            frac = np.minimum(t / self.t_max, 1.0)
            shrink = 1.0 - self.taper * frac
            yield (t, r - self.r0 * np.exp(-self.decay * t), l[2] - self.rise * frac,
                   self.radial * shrink, self.axial * shrink)

    def sdf(self, X, Y, Z):
        d = None
        for t, dr, dz, ar, az in self._turn_coords(X, Y, Z):
            dn = (np.sqrt((dr / ar) ** 2 + (dz / az) ** 2) - 1.0) * np.minimum(ar, az)
            dn = np.where(t <= self.t_max, dn, np.inf)
            d = dn if d is None else np.minimum(d, dn)
        end_r = self.axial * (1.0 - self.taper)
        apex = Capsule(self.centreline(self.t_max), self.centreline(self.t_max), end_r).sdf(X, Y, Z)
        return np.minimum(d, apex)


@dataclass(frozen=True)
class SpiralLamina:
    """The osseous spiral lamina: a thin bony shelf from the modiolus half-way across the canal."""

    cochlea: Cochlea
    half_thickness: float
    width: float  # fraction of the canal's radial width covered, from its inner wall

    def bbox(self):
        return self.cochlea.bbox()

    def sdf(self, X, Y, Z):
        d = None
        for t, dr, dz, ar, az in self.cochlea._turn_coords(X, Y, Z):
            dn = np.maximum(np.abs(dz) - self.half_thickness, dr - (2 * self.width - 1.0) * ar)
            dn = np.maximum(dn, np.sqrt((dr / ar) ** 2 + (dz / az) ** 2) - 1.0)
            dn = np.where(t <= self.cochlea.t_max, dn, np.inf)
            d = dn if d is None else np.minimum(d, dn)
        return d


@dataclass(frozen=True)
class Block:
    """The petrous bone: a rounded box cut by the posterior fossa plane, with a gently bumpy surface."""

    centre: np.ndarray
    axes: np.ndarray
    semi: np.ndarray
    plane_point: np.ndarray
    plane_normal: np.ndarray  # points out of the bone
    bump_k: np.ndarray  # (n, 3) wave vectors, rad/mm
    bump_phase: np.ndarray
    bump_amp: np.ndarray

    def bbox(self):
        return None  # everywhere

    def sdf(self, X, Y, Z):
        l = _local(X, Y, Z, self.centre, self.axes)
        box = (sum(np.abs(c / s) ** 4 for c, s in zip(l, self.semi)) ** 0.25 - 1.0) * float(self.semi.min())
        p = self.plane_point
        n = self.plane_normal
        plane = (X - p[0]) * n[0] + (Y - p[1]) * n[1] + (Z - p[2]) * n[2]
        d = np.maximum(box, plane)
        for k, ph, amp in zip(self.bump_k, self.bump_phase, self.bump_amp):
            d = d + amp * np.sin(k[0] * X + k[1] * Y + k[2] * Z + ph)
        return d


# --------------------------------------------------------------------------------------------------
# Anatomy


def _rotation(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _jitter_dir(rng: np.random.Generator, v, max_deg: float) -> np.ndarray:
    """``v`` turned by up to ``max_deg`` degrees about a random axis."""
    return _rotation(rng.normal(size=3), math.radians(rng.uniform(-max_deg, max_deg))) @ _unit(v)


def generate_subject(rng: np.random.Generator, size: str | PhantomSpec = "small") -> dict:
    """Draw one subject's continuous anatomy (world-frame shapes in mm) and its scanner calibrations.

    Anatomy is laid out in a local frame (x lateral, y anterior, z superior, adult millimetres), scaled by
    ``spec.anatomy_scale`` with +-8 % jitter, mirrored for left ears, rotated (+-25 deg in-plane, +-8 deg
    tilt) and shifted a little, so every subject differs in size, orientation, cochlear turns (2.25-2.75),
    canal calibres, ossicles and air-cell placement.
    """
    spec = get_spec(size)
    u = rng.uniform
    s = spec.anatomy_scale * u(0.92, 1.08)
    side = "left" if rng.random() < 0.5 else "right"
    mirror = np.diag([-1.0 if side == "left" else 1.0, 1.0, 1.0])
    rot = _rotation([0, 0, 1], math.radians(u(-25, 25))) @ _rotation(
        [math.cos(a := u(0, 2 * math.pi)), math.sin(a), 0], math.radians(u(-8, 8)))
    lin = rot @ mirror * s
    shift = np.array([u(-0.4, 0.4), u(-0.4, 0.4), u(-0.15, 0.15)]) - lin @ np.array([1.0, -0.4, 0.0])

    def pt(p):  # local adult-mm point -> world mm
        return shift + lin @ np.asarray(p, float)

    def vec(v):  # local direction -> world unit vector (mirroring flips handedness naturally)
        return _unit(lin @ np.asarray(v, float))

    def frame(jitter_deg):
        r = _rotation(rng.normal(size=3), math.radians(u(-jitter_deg, jitter_deg)))
        return np.stack([vec(r[:, i]) for i in range(3)])

    def j(lo=0.9, hi=1.1):
        return u(lo, hi)

    # Labyrinth ---------------------------------------------------------------------------------
    vest_c = np.zeros(3)
    vestibule = Ellipsoid(pt(vest_c), frame(10), np.array([1.2, 2.0, 1.5]) * j() * s)

    c_base = np.array([-1.4, 3.5, -1.2]) + rng.normal(0, 0.2, 3)
    c_axis = _rotation([-0.8, 0.5, 0], math.radians(u(15, 35))) @ np.array([0, 0, 1.0])
    e1 = vest_c - c_base
    e1 = _unit(e1 - (e1 @ c_axis) * c_axis)
    e2 = np.cross(c_axis, e1)
    turns = u(2.25, 2.75)
    ratio = u(0.28, 0.35)
    cochlea = Cochlea(base=pt(c_base), axis=vec(c_axis), e1=vec(e1), e2=vec(e2), turns=turns,
                      r0=3.0 * j() * s, decay=math.log(1 / ratio) / (2 * math.pi * turns),
                      rise=2.8 * j() * s, radial=0.75 * j() * s, axial=0.6 * j() * s, taper=u(0.45, 0.55))
    hook = Capsule(cochlea.centreline(0.0), pt(vest_c + 0.35 * (c_base - vest_c)), 0.5 * j() * s)
    lamina = SpiralLamina(cochlea, half_thickness=0.05 * s, width=u(0.45, 0.6))
    modiolus = Cone(pt(c_base - 0.6 * c_axis), vec(c_axis), 2.6 * s, 0.95 * j() * s, 0.25 * s)
    fundus = c_base - 0.6 * c_axis + np.array([-0.6, -0.5, 0.0])
    iac = Capsule(pt(fundus), pt(fundus + np.array([-9.0, -2.5, u(-0.5, 0.5)])), 1.5 * j() * s)

    lat_n = _jitter_dir(rng, [0, 0, 1], 12)
    post_n = _jitter_dir(rng, [1, 1, 0], 8)
    sup_n = _jitter_dir(rng, [1, -1, 0], 8)
    canals = []
    for normal, towards, radius in ((lat_n, [0.5, -1, 0.15], 2.4), (post_n, [0.55, -0.6, 0.45], 3.1),
                                    (sup_n, [0.15, 0.15, 1], 3.2)):
        d = np.asarray(towards, float)
        d = _unit(d - (d @ normal) * normal)
        r = radius * j(0.92, 1.08)
        canals.append(Torus(pt(vest_c + 0.85 * r * d), vec(normal), r * s, 0.42 * j() * s))

    labyrinth = [vestibule, cochlea, hook, *canals]

    # Middle ear, ossicles, external canal ---------------------------------------------------------
    me = np.array([4.1, 0.8, 0.2]) + rng.normal(0, 0.15, 3)
    antrum = np.array([4.0, -3.0, 0.8]) + rng.normal(0, 0.3, 3)
    middle_ear = [Ellipsoid(pt(me), frame(10), np.array([1.9, 3.6, 3.2]) * j() * s),
                  Capsule(pt(me + [1.0, 0.5, -0.5]), pt(me + [9.0, 1.8, -1.2]), 2.1 * j() * s),
                  Capsule(pt(me + [0.0, -1.5, 0.6]), pt(antrum), 0.9 * j() * s),
                  Ellipsoid(pt(antrum), frame(30), np.array([1.6, 1.4, 1.4]) * j() * s)]

    def oss(p):
        return me + np.asarray(p, float) + rng.normal(0, 0.08, 3)

    lp_tip = oss([-0.4, -0.1, -1.0])
    ossicles = [
        Ellipsoid(pt(oss([0.5, 1.1, 1.2])), frame(20), np.array([0.55, 0.6, 0.9]) * j(0.85, 1.15) * s),  # malleus
        Capsule(pt(oss([0.7, 1.3, 0.6])), pt(oss([1.2, 1.6, -1.6])), 0.2 * j() * s),  # manubrium
        Ellipsoid(pt(oss([0.2, -0.3, 1.1])), frame(20), np.array([0.55, 0.7, 0.7]) * j(0.85, 1.15) * s),  # incus
        Capsule(pt(oss([0.2, -0.3, 0.6])), pt(lp_tip), 0.18 * j() * s),  # long process
        Capsule(pt(lp_tip), pt(oss([-1.25, 0.2, -0.8])), 0.09 * s),  # stapes crura
        Capsule(pt(lp_tip), pt(oss([-1.25, -0.4, -0.9])), 0.09 * s),
        Ellipsoid(pt(oss([-1.3, -0.1, -0.85])), frame(10), np.array([0.08, 0.45, 0.25]) * s),  # footplate
    ]

    # Bone block -----------------------------------------------------------------------------------
    block = Block(centre=pt([1.0, -0.5, 0.0]), axes=frame(10), semi=np.array([12.0, 14.0, 12.0]) * j() * s,
                  plane_point=pt([-3.0 + u(-0.3, 0.3), -3.5, 0.0]),
                  plane_normal=vec(_jitter_dir(rng, [-0.6, -0.8, 0], 10)),
                  bump_k=rng.normal(0, 1.2, (3, 3)) / s, bump_phase=u(0, 2 * math.pi, 3), bump_amp=u(0.05, 0.25, 3) * s)

    # Mastoid air cells: a posterolateral cluster plus a few scattered cells, kept off the labyrinth.
    def clear_of_labyrinth(c, r):
        p = [np.array(v) for v in pt(c)]
        return min(float(sh.sdf(*p)) for sh in labyrinth) > (r + 0.5) * s

    air_cells = []
    cluster = antrum + np.array([0.5, -1.2, 0.0]) + rng.normal(0, 0.4, 3)
    for centre, radius in [(cluster + rng.normal(0, [1.8, 1.8, 1.8]), u(0.4, 1.2))
                           for _ in range(int(rng.integers(30, 60)))] + \
                          [(np.array([u(1.5, 5), u(-5, 4), u(-2, 2)]), u(0.2, 0.4))
                           for _ in range(int(rng.integers(3, 9)))]:
        if clear_of_labyrinth(centre, radius) and float(block.sdf(*[np.array(v) for v in pt(centre)])) < 0:
            air_cells.append(Ellipsoid(pt(centre), frame(90), radius * np.array([1.0, u(0.7, 1), u(0.6, 1)]) * s))

    return {
        "size": spec.name,
        "side": side,
        "scale": s,
        "cochlea_turns": turns,
        "rotation": rot,
        "shift": shift,
        "block": block,
        "labyrinth": labyrinth,
        "cochlea": cochlea,
        "lamina": lamina,
        "modiolus": modiolus,
        "iac": iac,
        "middle_ear": middle_ear,
        "ossicles": ossicles,
        "air_cells": air_cells,
        "capsule_thickness": 0.45 * s,
        "texture_seed": int(rng.integers(2**31)),
        "noise_seed": int(rng.integers(2**31)),
        # micro-CT: grey = offset + gain * attenuation; CBCT: HU = gain * 1000 (mu - 1) + offset - cupping
        "hr_calibration": {"offset": 1500.0 * u(0.95, 1.05), "gain": 12000.0 * u(0.97, 1.03)},
        "lr_calibration": {"gain": u(0.85, 1.1), "offset": u(-80, 80), "cupping": u(0, 60)},
    }


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Grid:
    """Axis-aligned sample positions (world mm) and the antialiasing width ``h``."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    h: float

    def block(self, bbox):
        """Index slices and broadcastable coordinates of the samples inside a world bounding box."""
        if bbox is None:
            sl = (slice(None),) * 3
        else:
            lo, hi = bbox
            sl = tuple(slice(int(np.searchsorted(c, l - self.h)), int(np.searchsorted(c, u + self.h, "right")))
                       for c, l, u in zip((self.x, self.y, self.z), lo, hi))
        x, y, z = self.x[sl[0]], self.y[sl[1]], self.z[sl[2]]
        return sl, (x[:, None, None], y[None, :, None], z[None, None, :])


def _union_sdf(shapes, grid: _Grid, pad: float):
    """Union signed distance of ``shapes`` over their joint bounding box (each evaluated in its own box)."""
    boxes = [sh.bbox() for sh in shapes]
    if any(b is None for b in boxes):
        sl, coords = grid.block(None)
        return sl, np.min([sh.sdf(*coords) for sh in shapes], axis=0).astype(np.float32)
    lo = np.min([b[0] for b in boxes], axis=0) - pad
    hi = np.max([b[1] for b in boxes], axis=0) + pad
    sl, _ = grid.block((lo, hi))
    starts = [s.start for s in sl]
    shape = [s.stop - s.start for s in sl]
    d = np.full(shape, np.inf, np.float32)
    if min(shape) <= 0:
        return sl, d
    for sh, (blo, bhi) in zip(shapes, boxes):
        sub, coords = grid.block((blo - pad, bhi + pad))
        if min(s.stop - s.start for s in sub) <= 0:
            continue
        local = tuple(slice(s.start - o, s.stop - o) for s, o in zip(sub, starts))
        np.minimum(d[local], sh.sdf(*coords).astype(np.float32), out=d[local])
    return sl, d


def _paint(mu: np.ndarray, grid: _Grid, shapes, value, offset: float = 0.0) -> None:
    """Blend ``value`` into ``mu`` inside the union of ``shapes`` (grown by ``offset``), antialiased over h."""
    sl, d = _union_sdf(shapes, grid, pad=max(offset, 0.0) + grid.h)
    if d.size == 0:
        return
    a = np.clip(0.5 - (d - offset) / grid.h, 0.0, 1.0)
    target = mu[sl]
    val = value[sl] if isinstance(value, np.ndarray) else value
    target += a * (val - target)


def _catmull_rom(coords: np.ndarray, origin: float, cell: float, n: int) -> np.ndarray:
    """Dense (len(coords), n) interpolation matrix of a Catmull-Rom spline on a regular lattice."""
    t = (coords - origin) / cell
    i0 = np.floor(t).astype(int)
    f = t - i0
    weights = [(-f**3 + 2 * f**2 - f) / 2, (3 * f**3 - 5 * f**2 + 2) / 2,
               (-3 * f**3 + 4 * f**2 + f) / 2, (f**3 - f**2) / 2]
    m = np.zeros((len(coords), n))
    rows = np.arange(len(coords))
    for k, w in enumerate(weights):
        np.add.at(m, (rows, np.clip(i0 + k - 1, 0, n - 1)), w)
    return m


class _Field:
    """A smooth random field: filtered white noise on a lattice, interpolated to any axis-aligned grid.

    Defined once per subject in world space (the field of view plus ``margin`` mm, enough for the LR
    point-spread padding), so every resolution samples the same continuous texture.
    """

    def __init__(self, seed: int, fov, cell: float, sigma_cells: float, margin: float = 1.2):
        self.origin = np.array([-f / 2 - margin for f in fov])
        self.cell = cell
        n = [int(math.ceil((f + 2 * margin) / cell)) + 1 for f in fov]
        noise = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
        lattice = ndimage.gaussian_filter(noise, sigma_cells, mode="wrap", truncate=3.0)
        self.lattice = lattice / lattice.std()

    def sample(self, x, y, z) -> np.ndarray:
        mx, my, mz = (_catmull_rom(c, o, self.cell, n).astype(np.float32)
                      for c, o, n in zip((x, y, z), self.origin, self.lattice.shape))
        out = np.tensordot(self.lattice, mz, axes=([2], [1]))  # (Lx, Ly, nz)
        out = np.tensordot(my, out, axes=([1], [1]))  # (ny, Lx, nz)
        return np.tensordot(mx, out, axes=([1], [1]))  # (nx, ny, nz)


@functools.lru_cache(maxsize=4)
def _fields(seed: int, fov: tuple[float, float, float]) -> tuple[_Field, _Field]:
    """The subject's bone textures (slow density variation, pores), shared by its HR and LR renders."""
    return _Field(seed, fov, 0.5, 1.5), _Field(seed + 1, fov, 0.05, 1.2)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _density(subject: dict, spec: PhantomSpec, grid: _Grid) -> np.ndarray:
    """Attenuation (water = 1) of the subject's anatomy sampled on ``grid``, partial volume antialiased."""
    # Bone: slow density variation plus marrow/vascular pores about 0.1-0.25 mm across.
    slow_field, pore_field = _fields(subject["texture_seed"], spec.fov)
    slow = slow_field.sample(grid.x, grid.y, grid.z)
    pores = pore_field.sample(grid.x, grid.y, grid.z)
    pore_width = 0.2 + 6.0 * grid.h  # field units; the field changes by about 1 per 0.06 mm
    bone = BONE + 0.08 * slow + (PORE - BONE) * _smoothstep((pores - 1.6) / pore_width + 0.5)
    mu = np.full((len(grid.x), len(grid.y), len(grid.z)), SOFT, np.float32)
    _paint(mu, grid, [subject["block"]], bone.astype(np.float32))
    _paint(mu, grid, subject["labyrinth"], CAPSULE, offset=subject["capsule_thickness"])
    _paint(mu, grid, subject["middle_ear"], AIR)
    if subject["air_cells"]:
        _paint(mu, grid, subject["air_cells"], AIR)
    _paint(mu, grid, subject["ossicles"], OSSICLE)
    _paint(mu, grid, [subject["modiolus"]], MODIOLUS)
    _paint(mu, grid, [subject["iac"]], SOFT)
    _paint(mu, grid, subject["labyrinth"], SOFT)
    _paint(mu, grid, [subject["lamina"]], CAPSULE)
    return mu


def _centres(n: int, d: float) -> np.ndarray:
    return (np.arange(n) + 0.5) * d - n * d / 2


def render_hr(subject: dict, spec: str | PhantomSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """Micro-CT-like volume (float32 grey values, integral, fits uint16) on the HR grid of ``spec``.

    Sharp one-voxel edges, a 0.5-voxel focal-spot blur, faint rings around the rotation axis and low
    white noise. Noise comes from ``rng``, by default from the subject's own noise seed.
    """
    spec = get_spec(spec)
    rng = rng if rng is not None else np.random.default_rng([subject["noise_seed"], 2])
    (nx, ny, nz), (dx, dy, dz) = spec.hr_shape, spec.hr_spacing
    grid = _Grid(_centres(nx, dx), _centres(ny, dy), _centres(nz, dz), h=max(dx, dy, dz))
    mu = ndimage.gaussian_filter(_density(subject, spec, grid), 0.5)
    # Ring artefacts: concentric, constant along the rotation axis (z), about 1 % of water.
    r = np.hypot(grid.x[:, None] - rng.normal(0, 0.5), grid.y[None, :] - rng.normal(0, 0.5))
    rings = sum(rng.uniform(-0.012, 0.012) * np.exp(-(((r - rng.uniform(0, spec.fov[0] / 2)) / (1.2 * dx)) ** 2))
                for _ in range(8))
    mu += rings[:, :, None].astype(np.float32)
    mu += (spec.hr_noise * rng.standard_normal(mu.shape)).astype(np.float32)
    cal = subject["hr_calibration"]
    grey = np.rint(cal["offset"] + cal["gain"] * mu)
    info = np.iinfo(HR_DTYPE)
    return np.clip(grey, info.min, info.max).astype(np.float32)


def _fbp_artefacts(mu: np.ndarray, spacing: float, views: int, rng: np.random.Generator, beta: float):
    """Per-slice streaks (beam hardening) and noise texture by filtered back-projection of sinogram errors.

    Returns (streaks, noise) in attenuation units; noise has unit standard deviation over the volume.
    """
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    n = mu.shape[0]
    streaks = np.empty(mu.shape, np.float32)
    noise = np.empty(mu.shape, np.float32)
    for k in range(mu.shape[2]):
        dense = np.clip(mu[:, :, k] - SOFT, 0.0, None)
        path = radon(dense, theta, circle=False) * spacing  # line integrals, mm
        streaks[:, :, k] = iradon(-beta * path**2 / spacing, theta, output_size=n, circle=False, filter_name="hann")
        noise[:, :, k] = iradon(rng.standard_normal(path.shape), theta, output_size=n, circle=False,
                                filter_name="hann")
    noise /= max(float(noise.std()), 1e-12)
    return streaks, noise


def render_lr(subject: dict, spec: str | PhantomSpec, rng: np.random.Generator) -> np.ndarray:
    """Cone-beam-CT-like volume in HU (float32, integral, fits int16) on the LR grid of ``spec``.

    The anatomy is sampled ``supersample`` times finer in-plane, blurred by an isotropic Gaussian PSF of
    ``lr_psf_fwhm`` LR voxels, averaged into voxels, then given streaks, FBP noise, cupping and the
    subject's HU calibration.
    """
    spec = get_spec(spec)
    (nx, ny, nz), (dx, dy, dz) = spec.lr_shape, spec.lr_spacing
    ss = spec.supersample
    sigma = spec.lr_psf_fwhm * dx / (2 * math.sqrt(2 * math.log(2)))  # mm, isotropic
    pad = int(math.ceil(3 * sigma / dz))
    z = (np.arange(-pad, nz + pad) + 0.5) * dz - nz * dz / 2
    grid = _Grid(_centres(nx * ss, dx / ss), _centres(ny * ss, dy / ss), z, h=max(dx / ss, dy / ss, dz))
    mu = ndimage.gaussian_filter(_density(subject, spec, grid), (sigma * ss / dx, sigma * ss / dy, sigma / dz),
                                 mode="nearest")
    mu = mu.reshape(nx, ss, ny, ss, -1).mean(axis=(1, 3))[:, :, pad:pad + nz]
    streaks, noise = _fbp_artefacts(mu, dx, spec.lr_views, rng, beta=0.012)
    cal = subject["lr_calibration"]
    r2 = (_centres(nx, dx)[:, None] ** 2 + _centres(ny, dy)[None, :] ** 2) / (spec.fov[0] / 2) ** 2
    cupping = cal["cupping"] * (1.0 - np.clip(r2, 0, 1))[:, :, None]
    hu = cal["gain"] * 1000.0 * (mu + streaks - 1.0) + cal["offset"] - cupping
    hu += spec.lr_noise_hu * rng.uniform(0.8, 1.2) * noise
    info = np.iinfo(LR_DTYPE)
    return np.clip(np.rint(hu), info.min, info.max).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Writing a data set

ROLE_DIRS = {"train_lr": "lr", "train_hr": "hr", "test_lr": "test/lr", "test_hr": "test/hr"}
MANIFEST = "manifest.json"


def _header() -> Nifti1Header:
    """Template carrying scanner-anatomical qform/sform codes and millimetre units."""
    hdr = Nifti1Header()
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_xyzt_units("mm", "sec")
    return hdr


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(out, "already exists and is not empty (use --overwrite to replace its phantoms)")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_phantoms(out_dir: str | os.PathLike, subjects: int, seed: int, size: str | PhantomSpec = "small",
                   overwrite: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Write an unpaired training set and a paired test subject; return (and save) the manifest.

    Subjects ``0..N-1`` are rendered only as LR (``OUT_DIR/lr``), subjects ``N..2N-1`` only as HR
    (``OUT_DIR/hr``), and subject ``2N`` at both resolutions (``OUT_DIR/test/{lr,hr}``). Everything
    depends only on ``seed``, ``subjects`` and ``size``. Each file is written atomically; with
    ``overwrite``, phantom files of an earlier run that are not part of this one are removed.
    """
    spec = get_spec(size)
    if subjects < 1:
        raise ConfigError(f"subjects must be >= 1, got {subjects}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    make_output_dir(out)
    for sub in ROLE_DIRS.values():
        (out / sub).mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    plan = [(i, ("train_lr",)) for i in range(subjects)] + [(subjects + i, ("train_hr",)) for i in range(subjects)]
    plan.append((2 * subjects, ("test_lr", "test_hr")))
    header = _header()
    files = []
    for index, roles in plan:
        subject_id = f"sub-{index:03d}"
        subject = generate_subject(np.random.default_rng([seed, index]), spec)
        for role in roles:
            is_lr = role.endswith("_lr")
            modality = "cbct" if is_lr else "microct"
            rel = f"{ROLE_DIRS[role]}/{subject_id}_{modality}.nii.gz"
            say(f"[{len(files) + 1}/{2 * subjects + 2}] {rel}")
            if is_lr:
                data = render_lr(subject, spec, np.random.default_rng([seed, index, 1]))
                shape, spacing, dtype = spec.lr_shape, spec.lr_spacing, LR_DTYPE
            else:
                data = render_hr(subject, spec, np.random.default_rng([seed, index, 2]))
                shape, spacing, dtype = spec.hr_shape, spec.hr_spacing, HR_DTYPE
            write_volume(out / rel, data.astype(dtype), affine(shape, spacing), header=header, dtype=dtype)
            files.append({"path": rel, "role": role, "subject": subject_id, "modality": modality,
                          "shape": list(shape), "spacing": list(spacing), "dtype": np.dtype(dtype).name,
                          "units": "HU" if is_lr else "grey value", "side": subject["side"],
                          "cochlea_turns": round(subject["cochlea_turns"], 3)})
    keep = {out / f["path"] for f in files}
    for sub in ROLE_DIRS.values():
        for stale in (out / sub).glob("*.nii*"):
            if stale not in keep:
                stale.unlink()
    manifest = {"seed": seed, "size": spec.name, "subjects": subjects, "spec": spec.to_dict(),
                "lr_in_plane_only": True, "files": files}
    _write_json(out / MANIFEST, manifest)
    say(f"wrote {len(files)} volumes and {MANIFEST} to {out}")
    return manifest
