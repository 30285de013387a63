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
  subject lines up slice for slice with its HR twin after in-plane super-resolution). A named scanner
  profile (:data:`PROFILES`) sets the forward model's ranges, drawn per subject: the anatomy is sampled on
  a supersampled grid, blurred by the profile's point spread function (a Gaussian core, optionally with a
  wide scatter/glare halo, and its own width along the slices), averaged into voxels, then given
  beam-hardening streaks and noise by filtered back-projection of sinogram errors, cupping, ring
  artefacts and an HU-like calibration (gain/offset); stored as int16 Hounsfield-like units. Some
  profiles are kept out of training sets (``held_out``): a scanner the model never saw.

Both grids share one field of view and world frame (voxel-centred affines, sform/qform code 1), so the HR
grid is exactly the LR grid resampled 8x in-plane, half-voxel aligned.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable

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


Range = tuple[float, float]  # (low, high), drawn uniformly per subject; low == high fixes the value

FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")  # skimage's iradon filters


@dataclass(frozen=True)
class ScannerProfile:
    """A cone-beam CT scanner model: the ranges its forward model draws from, once per subject and scan.

    Widths are in LR in-plane voxels, so one profile means the same relative blur at every phantom size.
    The rendered LR volume is ``HU = gain * 1000 * (mu + streaks - 1) + offset - cupping + rings + noise``
    with ``mu`` the attenuation (water = 1) after the point spread function and voxel averaging.
    """

    name: str
    description: str
    held_out: bool = False  # kept out of training sets by default: a scanner the model never saw
    psf_fwhm: Range = (1.45, 1.75)  # Gaussian core of the in-plane PSF, FWHM in LR voxels
    slice_fwhm: Range = (1.45, 1.75)  # PSF along the slice axis (slice thickness), FWHM in LR in-plane voxels
    halo_fraction: Range = (0.0, 0.0)  # share of the signal spread into a wide in-plane halo (scatter, glare)
    halo_fwhm: Range = (0.0, 0.0)  # FWHM of that halo, LR voxels
    noise_hu: Range = (36.0, 54.0)  # noise standard deviation in a uniform region, HU
    noise_filter: str = "hann"  # FBP reconstruction filter that shapes the noise texture (FBP_FILTERS)
    views: int = 90  # projections over 180 degrees: angular spacing of streaks and noise texture
    beam_hardening: Range = (0.009, 0.015)  # beta: a path of p mm of bone excess loses beta * p**2 / voxel
    cupping_hu: Range = (0.0, 60.0)  # the centre reads this much lower than the field-of-view edge
    gain: Range = (0.85, 1.10)  # HU per 1000 x (attenuation - water)
    offset_hu: Range = (-80.0, 80.0)  # water reads this many HU
    ring_hu: Range = (0.0, 0.0)  # peak amplitude of each detector ring artefact, HU

    RANGES: ClassVar[tuple[str, ...]] = ("psf_fwhm", "slice_fwhm", "halo_fraction", "halo_fwhm", "noise_hu",
                                         "beam_hardening", "cupping_hu", "gain", "offset_hu", "ring_hu")

    @property
    def psf_shape(self) -> str:
        """``gaussian``, or ``gaussian+halo`` when part of the signal goes into a wide halo."""
        return "gaussian+halo" if self.halo_fraction[1] > 0 else "gaussian"

    def validate(self) -> "ScannerProfile":
        def bad(problem: str) -> ConfigError:
            return ConfigError(f"scanner profile {self.name!r}: {problem}")

        for key in self.RANGES:
            lo, hi = getattr(self, key)
            if not lo <= hi:
                raise bad(f"{key} range {lo}..{hi} is empty")
        if self.psf_fwhm[0] <= 0 or self.slice_fwhm[0] <= 0:
            raise bad("psf_fwhm and slice_fwhm must be > 0")
        if not (0 <= self.halo_fraction[0] and self.halo_fraction[1] < 1):
            raise bad("halo_fraction must lie in [0, 1)")
        if self.halo_fraction[1] > 0 and self.halo_fwhm[0] <= self.psf_fwhm[1]:
            raise bad("halo_fwhm must be wider than the PSF core")
        if min(self.noise_hu[0], self.beam_hardening[0], self.cupping_hu[0], self.ring_hu[0]) < 0 or self.gain[0] <= 0:
            raise bad("noise, beam hardening, cupping and rings must be >= 0 and gain > 0")
        if self.noise_filter not in FBP_FILTERS:
            raise bad(f"noise_filter must be one of {', '.join(FBP_FILTERS)}")
        if self.views < 8:
            raise bad("views must be >= 8")
        return self

    def draw(self, rng: np.random.Generator) -> dict:
        """One scan's parameters: every range drawn uniformly (rounded to 6 decimals), plus the fixed ones."""
        params: dict = {"profile": self.name, "psf_shape": self.psf_shape, "noise_filter": self.noise_filter,
                        "views": self.views}
        for key in self.RANGES:
            lo, hi = getattr(self, key)
            params[key] = round(float(rng.uniform(lo, hi)), 6)
        return params

    def to_dict(self) -> dict:
        """JSON-ready fields (ranges as lists) and the PSF shape."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        out["psf_shape"] = self.psf_shape
        return out


PROFILES: dict[str, ScannerProfile] = {p.name: p.validate() for p in (
    ScannerProfile(
        "cbct-standard", "flat-panel CBCT, standard dose: Gaussian PSF about 1.6 voxels, smooth (Hann) noise"),
    ScannerProfile(
        "cbct-lowdose", "sharp low-dose protocol: narrow PSF, strong fine-grained (Shepp-Logan) noise, "
        "few views", psf_fwhm=(1.1, 1.4), slice_fwhm=(1.4, 1.8), noise_hu=(70.0, 110.0),
        noise_filter="shepp-logan", views=60, beam_hardening=(0.010, 0.020), cupping_hu=(20.0, 80.0),
        gain=(0.92, 1.08), offset_hu=(-60.0, 60.0)),
    ScannerProfile(
        "cbct-smooth", "soft reconstruction kernel: wide PSF, thick slices, low blotchy (Hamming) noise",
        psf_fwhm=(1.8, 2.3), slice_fwhm=(2.0, 3.0), noise_hu=(18.0, 32.0), noise_filter="hamming", views=120,
        beam_hardening=(0.005, 0.012), cupping_hu=(0.0, 40.0), gain=(0.85, 1.05), offset_hu=(-100.0, 40.0)),
    ScannerProfile(
        "cbct-scatter", "held out: another vendor's scanner with detector glare (a wide PSF halo), thin "
        "slices, grainy unwindowed (ramp) noise, strong beam hardening and cupping, ring artefacts and an "
        "HU calibration outside the training range", held_out=True,
        psf_fwhm=(1.3, 1.7), slice_fwhm=(1.0, 1.3), halo_fraction=(0.12, 0.2), halo_fwhm=(6.0, 10.0),
        noise_hu=(45.0, 65.0), noise_filter="ramp", views=72, beam_hardening=(0.025, 0.035),
        cupping_hu=(100.0, 180.0), gain=(1.15, 1.3), offset_hu=(100.0, 200.0), ring_hu=(15.0, 30.0)),
)}
TRAIN_PROFILES = tuple(name for name, p in PROFILES.items() if not p.held_out)
HELD_OUT_PROFILES = tuple(name for name, p in PROFILES.items() if p.held_out)


def get_profile(name: str | ScannerProfile) -> ScannerProfile:
    """Resolve a profile name, or pass a custom profile through, validated."""
    if isinstance(name, ScannerProfile):
        return name.validate()
    if name not in PROFILES:
        raise ConfigError(f"unknown scanner profile {name!r} (known: {', '.join(PROFILES)})")
    return PROFILES[name]


def parse_profiles(text: str | Iterable[str | ScannerProfile], option: str = "profiles") -> tuple[ScannerProfile, ...]:
    """Profiles from ``train`` (the training profiles), ``held-out``, ``all``, ``none`` or comma-separated names."""
    if isinstance(text, str):
        keywords = {"train": TRAIN_PROFILES, "held-out": HELD_OUT_PROFILES, "all": tuple(PROFILES), "none": ()}
        names = keywords.get(text.strip(), [n.strip() for n in text.split(",")])
        if any(not n for n in names):
            raise ConfigError(f"{option}: empty profile name in {text!r}")
        items = list(names)
    else:
        items = list(text)
    out: list[ScannerProfile] = []
    for item in items:
        try:
            profile = get_profile(item)
        except ConfigError as exc:
            raise ConfigError(f"{option}: {exc}") from None
        if profile.name in (p.name for p in out):
            raise ConfigError(f"{option}: profile {profile.name!r} given twice")
        out.append(profile)
    return tuple(out)


@dataclass(frozen=True)
class PhantomSpec:
    """Grids and imaging parameters of one phantom size (spacings in mm, shapes in voxels, x-y-z order)."""

    name: str
    hr_shape: tuple[int, int, int]
    hr_spacing: tuple[float, float, float]
    lr_shape: tuple[int, int, int]
    lr_spacing: tuple[float, float, float]
    anatomy_scale: float = 0.6  # size of the anatomy relative to an adult temporal bone
    slab_shift: float = 0.15  # the anatomy moves up or down by up to this many mm: which slab the slices cut
    supersample: int = 4  # LR sub-samples per voxel side, in-plane
    lr_profiles: tuple[str, ...] = ("cbct-standard",)  # scanner profiles of the training LR set, in turn
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
        if self.supersample < 1 or self.anatomy_scale <= 0 or self.slab_shift < 0:
            raise ConfigError(f"phantom size {self.name!r}: supersample must be >= 1, anatomy_scale > 0 and "
                              "slab_shift >= 0")
        parse_profiles(self.lr_profiles, f"phantom size {self.name!r} lr_profiles")
        if not self.lr_profiles:
            raise ConfigError(f"phantom size {self.name!r}: lr_profiles is empty")
        return self

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


SIZES: dict[str, PhantomSpec] = {
    # Trains on two CPU cores: 192 px at 0.06 mm (11.5 mm field of view), LR 24 px at 0.48 mm, 48 slices.
    # The anatomy is shrunk to 0.6 of an adult's to fit: at LR the cochlea spans only 8-11 voxels.
    "small": PhantomSpec("small", (192, 192, 48), (0.06, 0.06, 0.06), (24, 24, 48), (0.48, 0.48, 0.06)),
    # Adult anatomy at the same voxel sizes on a 23 mm field of view (LR 48 px): the LR scan shows the
    # cochlea (14-18 voxels) and vestibule, the ossicle heads and, faintly, the canals. Training LR
    # subjects take the training scanner profiles in turn; the slab of 64 slices (3.8 mm) sits at another
    # level in each subject (+-1 mm), so the set shows cochlea, vestibule, canals and ossicles.
    "adult": PhantomSpec("adult", (384, 384, 64), (0.06, 0.06, 0.06), (48, 48, 64), (0.48, 0.48, 0.06),
                         anatomy_scale=1.0, slab_shift=1.0, lr_profiles=TRAIN_PROFILES),
    # The paper's voxel sizes (micro-CT 0.018 mm, CBCT 0.15 mm: factor 8.33) on a cropped 10.8 mm field.
    "paper": PhantomSpec("paper", (600, 600, 48), (0.018, 0.018, 0.018), (72, 72, 48), (0.15, 0.15, 0.018),
                         hr_noise=0.015),
}


def get_spec(size: str | PhantomSpec) -> PhantomSpec:
    """Resolve a size name (``small``, ``adult``, ``paper``) or pass a custom spec through, validated."""
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
    """Draw one subject's continuous anatomy (world-frame shapes in mm) and its micro-CT calibration.

    Anatomy is laid out in a local frame (x lateral, y anterior, z superior, adult millimetres), scaled by
    ``spec.anatomy_scale`` with +-8 % jitter, mirrored for left ears, rotated (+-25 deg in-plane, +-8 deg
    tilt), shifted a little in-plane and by up to ``spec.slab_shift`` mm along z (which level the slab of
    slices cuts), so every subject differs in size, orientation, cochlear turns (2.25-2.75), canal
    calibres, ossicles and air-cell placement. Its cone-beam scans draw their own parameters from a
    :class:`ScannerProfile`.
    """
    spec = get_spec(size)
    u = rng.uniform
    s = spec.anatomy_scale * u(0.92, 1.08)
    side = "left" if rng.random() < 0.5 else "right"
    mirror = np.diag([-1.0 if side == "left" else 1.0, 1.0, 1.0])
    rot = _rotation([0, 0, 1], math.radians(u(-25, 25))) @ _rotation(
        [math.cos(a := u(0, 2 * math.pi)), math.sin(a), 0], math.radians(u(-8, 8)))
    lin = rot @ mirror * s
    offset = [u(-0.4, 0.4), u(-0.4, 0.4), u(-spec.slab_shift, spec.slab_shift)]  # the slab's level last
    shift = np.array(offset) - lin @ np.array([1.0, -0.4, 0.0])

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
        # micro-CT: grey = offset + gain * attenuation (a CBCT scan's calibration comes with its profile)
        "hr_calibration": {"offset": 1500.0 * u(0.95, 1.05), "gain": 12000.0 * u(0.97, 1.03)},
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


FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))


def _fbp_artefacts(dense: np.ndarray, spacing: float, views: int, rng: np.random.Generator, beta: float,
                   noise_filter: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice beam-hardening streaks and noise texture by filtered back-projection of sinogram errors.

    ``dense`` is the attenuation above water (bone excess) per LR voxel. A ray through ``p`` mm of it
    loses ``beta * p**2 / spacing``, back-projected with the Hann filter (dark streaks between dense
    parts, cupping inside them); white sinogram noise back-projected with ``noise_filter`` gives the
    noise texture. Returns (streaks, noise) in attenuation units; noise has unit standard deviation over
    the volume.
    """
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    nx, ny, nz = dense.shape
    n = max(nx, ny)  # iradon works on square slices: pad, then crop back
    x0, y0 = (n - nx) // 2, (n - ny) // 2
    streaks = np.empty(dense.shape, np.float32)
    noise = np.empty(dense.shape, np.float32)
    square = np.zeros((n, n))
    for k in range(nz):
        square[x0:x0 + nx, y0:y0 + ny] = dense[:, :, k]
        path = radon(square, theta, circle=False) * spacing  # line integrals, mm
        if beta > 0:
            bh = iradon(-beta * path**2 / spacing, theta, output_size=n, circle=False, filter_name="hann")
            streaks[:, :, k] = bh[x0:x0 + nx, y0:y0 + ny]
        else:
            streaks[:, :, k] = 0.0
        fbp = iradon(rng.standard_normal(path.shape), theta, output_size=n, circle=False, filter_name=noise_filter)
        noise[:, :, k] = fbp[x0:x0 + nx, y0:y0 + ny]
    noise /= max(float(noise.std()), 1e-12)
    return streaks, noise


def lr_render_grid(spec: str | PhantomSpec, scanner: dict) -> tuple[_Grid, int]:
    """The supersampled grid on which :func:`cbct_forward` expects the attenuation, and its z padding.

    ``supersample`` samples per LR voxel side in-plane; along the slices the LR spacing, padded on both
    ends by three standard deviations of the scan's slice PSF so the blur sees anatomy beyond the slab.
    """
    spec = get_spec(spec)
    (nx, ny, nz), (dx, dy, dz) = spec.lr_shape, spec.lr_spacing
    ss = spec.supersample
    sigma_z = scanner["slice_fwhm"] * dx / FWHM_PER_SIGMA  # mm
    pad = int(math.ceil(3 * sigma_z / dz))
    z = (np.arange(-pad, nz + pad) + 0.5) * dz - nz * dz / 2
    return _Grid(_centres(nx * ss, dx / ss), _centres(ny * ss, dy / ss), z, h=max(dx / ss, dy / ss, dz)), pad


def cbct_forward(mu: np.ndarray, spec: str | PhantomSpec, scanner: dict, rng: np.random.Generator) -> np.ndarray:
    """Cone-beam CT of an attenuation volume sampled on :func:`lr_render_grid`: HU on the LR grid.

    The point spread function is a Gaussian core of ``psf_fwhm`` LR voxels in-plane and ``slice_fwhm``
    along the slices, of which a share ``halo_fraction`` is spread in-plane over a Gaussian halo of
    ``halo_fwhm`` voxels (scatter, detector glare); the blurred attenuation is averaged into LR voxels,
    then beam-hardening streaks, cupping (a radial bowl: the centre ``cupping_hu`` below the edge of the
    field of view), concentric detector rings of ``ring_hu`` peak amplitude, the calibration
    ``gain * 1000 * (mu - 1) + offset_hu`` and FBP noise of ``noise_hu`` standard deviation are applied.
    Returns float32 integral values that fit int16.
    """
    spec = get_spec(spec)
    (nx, ny, nz), (dx, dy, dz) = spec.lr_shape, spec.lr_spacing
    ss = spec.supersample
    grid, pad = lr_render_grid(spec, scanner)
    if mu.shape != (len(grid.x), len(grid.y), len(grid.z)):
        raise ValueError(f"attenuation of shape {mu.shape} is not on the LR render grid "
                         f"{(len(grid.x), len(grid.y), len(grid.z))}")
    sigma_z = scanner["slice_fwhm"] * dx / FWHM_PER_SIGMA / dz  # in slices
    core = scanner["psf_fwhm"] * ss / FWHM_PER_SIGMA  # in supersampled pixels
    blurred = ndimage.gaussian_filter(mu, (core, core, sigma_z), mode="nearest")
    if scanner["halo_fraction"] > 0:
        wide = scanner["halo_fwhm"] * ss / FWHM_PER_SIGMA
        halo = ndimage.gaussian_filter(mu, (wide, wide, sigma_z), mode="nearest")
        blurred = (1 - scanner["halo_fraction"]) * blurred + scanner["halo_fraction"] * halo
    att = blurred.reshape(nx, ss, ny, ss, -1).mean(axis=(1, 3))[:, :, pad:pad + nz]
    streaks, noise = _fbp_artefacts(np.clip(att - SOFT, 0.0, None), dx, scanner["views"], rng,
                                    scanner["beam_hardening"], scanner["noise_filter"])
    xc, yc = _centres(nx, dx)[:, None], _centres(ny, dy)[None, :]
    r2 = (xc**2 + yc**2) / (spec.fov[0] / 2) ** 2
    cupping = scanner["cupping_hu"] * (1.0 - np.clip(r2, 0, 1))
    hu = scanner["gain"] * 1000.0 * (att + streaks - 1.0) + scanner["offset_hu"] - cupping[:, :, None]
    if scanner["ring_hu"] > 0:  # detector gain errors: rings around the rotation axis, constant along it
        r = np.sqrt(xc**2 + yc**2) / dx  # LR voxels
        radii = (np.arange(int(r.max() // 3)) + rng.uniform(0.25, 0.75)) * 3.0
        rings = np.zeros_like(r)
        for rc in radii:
            rings += rng.choice([-1.0, 1.0]) * np.exp(-0.5 * ((r - rc) / 0.5) ** 2)
        hu += scanner["ring_hu"] * rings[:, :, None]
    hu += scanner["noise_hu"] * noise
    info = np.iinfo(LR_DTYPE)
    return np.clip(np.rint(hu), info.min, info.max).astype(np.float32)


def render_lr(subject: dict, spec: str | PhantomSpec, rng: np.random.Generator,
              scanner: dict | None = None) -> np.ndarray:
    """Cone-beam-CT-like volume in HU (float32, integral, fits int16) on the LR grid of ``spec``.

    ``scanner`` is one scan's parameters (:meth:`ScannerProfile.draw`); by default they are drawn from
    the size's first training profile with ``rng``, which then also draws the noise.
    """
    spec = get_spec(spec)
    if scanner is None:
        scanner = get_profile(spec.lr_profiles[0]).draw(rng)
    grid, _ = lr_render_grid(spec, scanner)
    return cbct_forward(_density(subject, spec, grid), spec, scanner, rng)


# --------------------------------------------------------------------------------------------------
# Writing a data set

ROLE_DIRS = {"train_lr": "lr", "train_hr": "hr", "test_lr": "test/lr", "test_hr": "test/hr"}
PROFILE_ROLE = "test_lr_profile"  # the test subject scanned by one named profile, in test/lr-<profile>/
MANIFEST = "manifest.json"


def profile_dir(profile: str) -> str:
    """Folder (relative to the data set) of the test subject scanned by ``profile``."""
    return f"test/lr-{profile}"


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


def _stream(name: str) -> int:
    """A stable integer per profile name, so each scan's random stream does not depend on the registry."""
    return zlib.crc32(name.encode())


def scan_rngs(seed: int, index: int, profile: str) -> tuple[np.random.Generator, np.random.Generator]:
    """(parameter draw, noise) generators of subject ``index`` scanned by ``profile``."""
    return (np.random.default_rng([seed, index, 3, _stream(profile)]),
            np.random.default_rng([seed, index, 1, _stream(profile)]))


def write_phantoms(out_dir: str | os.PathLike, subjects: int, seed: int, size: str | PhantomSpec = "small",
                   overwrite: bool = False, progress: Callable[[str], None] | None = None,
                   lr_profiles: str | Iterable[str | ScannerProfile] | None = None,
                   test_profiles: str | Iterable[str | ScannerProfile] | None = None) -> dict:
    """Write an unpaired training set and a paired test subject; return (and save) the manifest.

    Subjects ``0..N-1`` are rendered only as LR (``OUT_DIR/lr``), subjects ``N..2N-1`` only as HR
    (``OUT_DIR/hr``), and subject ``2N`` at both resolutions (``OUT_DIR/test/{lr,hr}``). LR subject ``k``
    is scanned by ``lr_profiles[k % len(lr_profiles)]`` (default: the size's training profiles), with
    parameters drawn from that profile's ranges; ``test/lr`` holds the test subject's own LR scan by
    the same rule. The test subject is also scanned by each of ``test_profiles`` (``all``, ``held-out``,
    names; none by default) into ``test/lr-<profile>/`` under the same file name, each aligned
    voxel for voxel with ``test/hr`` after 8x in-plane super-resolution. Everything depends only on
    ``seed``, ``subjects``, ``size`` and the profiles; a scan by one profile is the same wherever it is
    written. Each file is written atomically; with ``overwrite``, phantom files of an earlier run that
    are not part of this one are removed.
    """
    spec = get_spec(size)
    if subjects < 1:
        raise ConfigError(f"subjects must be >= 1, got {subjects}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    train = parse_profiles(spec.lr_profiles if lr_profiles is None else lr_profiles, "--lr-profiles")
    if not train:
        raise ConfigError("--lr-profiles: at least one profile is needed for the training LR set")
    tests = parse_profiles("none" if test_profiles is None else test_profiles, "--test-profiles")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    make_output_dir(out)
    for sub in [*ROLE_DIRS.values(), *(profile_dir(p.name) for p in tests)]:
        (out / sub).mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    test_index = 2 * subjects
    plan = [(i, ("train_lr",)) for i in range(subjects)] + [(subjects + i, ("train_hr",)) for i in range(subjects)]
    plan.append((test_index, ("test_lr", "test_hr", *(PROFILE_ROLE,) * len(tests))))
    train_names = [p.name for p in train]
    header = _header()
    files = []
    total = sum(len(roles) for _, roles in plan)
    for index, roles in plan:
        subject_id = f"sub-{index:03d}"
        subject = generate_subject(np.random.default_rng([seed, index]), spec)
        scans: dict[str, tuple[dict, np.ndarray]] = {}  # one render per profile and subject
        extra = iter(tests)
        for role in roles:
            is_lr = role != "train_hr" and role != "test_hr"
            modality = "cbct" if is_lr else "microct"
            if is_lr:
                profile = train[index % len(train)] if role != PROFILE_ROLE else next(extra)
                folder = profile_dir(profile.name) if role == PROFILE_ROLE else ROLE_DIRS[role]
            else:
                folder = ROLE_DIRS[role]
            rel = f"{folder}/{subject_id}_{modality}.nii.gz"
            say(f"[{len(files) + 1}/{total}] {rel}")
            entry = {"path": rel, "role": role, "subject": subject_id, "modality": modality}
            if is_lr:
                if profile.name not in scans:
                    draw_rng, noise_rng = scan_rngs(seed, index, profile.name)
                    scanner = profile.draw(draw_rng)
                    scans[profile.name] = scanner, render_lr(subject, spec, noise_rng, scanner)
                scanner, data = scans[profile.name]
                shape, spacing, dtype = spec.lr_shape, spec.lr_spacing, LR_DTYPE
                entry.update(profile=profile.name, held_out=profile.held_out,
                             in_training=profile.name in train_names, scanner=scanner)
            else:
                data = render_hr(subject, spec, np.random.default_rng([seed, index, 2]))
                shape, spacing, dtype = spec.hr_shape, spec.hr_spacing, HR_DTYPE
                entry.update(profile="micro-ct", scanner={
                    "noise": spec.hr_noise, **{k: round(v, 6) for k, v in subject["hr_calibration"].items()}})
            write_volume(out / rel, data.astype(dtype), affine(shape, spacing), header=header, dtype=dtype)
            entry.update({"shape": list(shape), "spacing": list(spacing), "dtype": np.dtype(dtype).name,
                          "units": "HU" if is_lr else "grey value", "side": subject["side"],
                          "cochlea_turns": round(subject["cochlea_turns"], 3)})
            files.append(entry)
    keep = {out / f["path"] for f in files}
    for sub in [*ROLE_DIRS.values(), *(p.relative_to(out).as_posix() for p in out.glob("test/lr-*"))]:
        for stale in (out / sub).glob("*.nii*"):
            if stale not in keep:
                stale.unlink()
    for folder in out.glob("test/lr-*"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    manifest = {"seed": seed, "size": spec.name, "subjects": subjects, "spec": spec.to_dict(),
                "lr_in_plane_only": True, "lr_profiles": train_names, "test_profiles": [p.name for p in tests],
                "profiles": {p.name: p.to_dict() for p in dict.fromkeys([*train, *tests])}, "files": files}
    _write_json(out / MANIFEST, manifest)
    say(f"wrote {len(files)} volumes and {MANIFEST} to {out}")
    return manifest
