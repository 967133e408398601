"""Synthetic peripheral-blood-smear images in four classes: the embedded default dataset.

Why it exists: the project must train, test and demo without downloading the real ALL
dataset. The images therefore have to behave like the real ones in the ways that matter
to the pipeline:

* The class lives in the white cell's *shape and texture* (nucleus size, N/C ratio,
  chromatin, nucleoli, contour), not in the mean colour, so a model cannot win by reading
  stain colour. Every image is finally auto-exposed to a colour drawn from its patient's
  style, which leaves the per-image mean RGB almost free of class information.
* Each "patient" has one class and a shared style (stain hue and strength, background
  tint, blur, red-cell density, magnification), so random splits leak patients and
  group-aware splits matter, as they do with real hospitals.
* Everything is drawn in normalised coordinates, so one scene renders at any size, and each
  image's randomness derives from ``(seed, index)``, so any subset is reproducible and
  generation can be parallel.

Drawing works in optical density (Beer-Lambert): three stains (nuclear azure, cytoplasmic
basophilia, eosin) are painted as concentration maps and turned into light at the end,
which gives realistic colour mixing and makes stain variation multiplicative.

Difficulty and hospital sites. :func:`generate` with its defaults (``difficulty=0``) gives
the original, well-separated classes, byte for byte: every strategy reaches ~0.99 there, so
it suits smoke tests and the demo, not comparisons. :func:`generate_sites` (``fedray data
synth --sites K``) makes data on which methods can differ:

* Sites. Each hospital ``site_a``, ``site_b``, ... has its own patients (never shared), its
  own class mix (Dirichlet, ``class_concentration`` times the class weights) and its own
  stain protocol and scanner (:class:`SiteStyle`: stain strengths, colour cast, contrast,
  gamma, blur, vignetting and illumination slope, sensor noise, JPEG quality). The scanner
  acts after auto-exposure, so the mean colour tells the *site* apart, not the class.
  :func:`write_sites` writes ``site_x/Class/patient/*.png`` per site (read by
  :func:`fedray.data.catalog.scan`, the patient folder giving the group) and a pooled
  manifest with a ``site`` column for ``partition.scheme: by-group``.
* Overlapping blasts. Early, Pre and Pro are immunophenotypes, not shapes: at difficulty
  ``d`` each blast patient's morphology is its subtype's blended toward one other subtype by
  a share drawn in ``[0, 0.5 d]`` (:func:`patient_look`), so patients near the top are
  ambiguous. Benign borrows at most ``0.15 d`` and stays distinct.
* Label noise (``label_noise``): exactly that share of each site's images gets a random
  other label; ``label`` and the class folder hold the recorded label, ``true_label`` and
  ``patient`` the truth (the catalog sees a relabelled image as its own group).
* ``difficulty`` runs from 0 (no overlap, every site scans alike) to 2; 1 is the default of
  :func:`generate_sites` and is calibrated by ``benchmarks/synth_calibration.py`` (3 sites,
  1500 images at 64 px, 30% of each site's patients held out, seed 0; figures in
  ``benchmarks/results/synth_calibration.json``): a centralized smallcnn (15 epochs) scores
  0.83 balanced accuracy on held-out patients (0.64 to 0.91 by site), logistic regression
  on mean RGB 0.14 for the class but 0.86 for the site (chance 0.25 and 0.33), and a
  smallcnn trained on one site alone 0.71 on its own site against 0.50 on the others.
  The test set is 24 patients, so read these to about +-0.05.
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from fedray.data.labels import CLASSES

# Class balance of the real Kaggle ALL dataset (Benign, Early, Pre, Pro out of 3256).
DEFAULT_CLASS_WEIGHTS: tuple[float, ...] = (504.0, 985.0, 963.0, 804.0)

# Optical-density vectors (absorbance in R, G, B) of the three stains, before per-patient
# perturbation: nuclear azure (purple), cytoplasmic basophilia (sky blue), eosin (pink).
_BASE_STAINS = np.array(
    [
        [0.60, 0.78, 0.28],
        [0.80, 0.42, 0.12],
        [0.07, 0.80, 0.40],
    ],
    dtype=np.float32,
)

# Mean RGB (0..1) the camera's auto-exposure aims for, before per-patient variation.
_BASE_TARGET = np.array([0.80, 0.66, 0.72], dtype=np.float32)

# Share of the per-image gain that auto-exposure applies; 1.0 would pin the mean exactly.
_EXPOSURE_STRENGTH = 0.9

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("group", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
        ("cell_box", pa.list_(pa.int32())),
    ]
)


@dataclass(frozen=True)
class PatientStyle:
    """Acquisition style shared by every image of one patient.

    Why: in real data, images of one patient come from one slide, stain batch and
    microscope, so they share colour and optics. Sharing the style across a patient's
    images makes patient-grouped splits meaningfully harder than random ones.
    """

    stains: tuple[tuple[float, float, float], ...]  # 3 stain OD vectors (R, G, B)
    strengths: tuple[float, float, float]  # multiplier per stain (saturation)
    light: tuple[float, float, float]  # illuminant colour, 0..1
    target: tuple[float, float, float]  # mean RGB auto-exposure aims for, 0..1
    background_eosin: float  # plasma/background pink
    blur: float  # Gaussian sigma as a fraction of image size
    rbc_density: float  # expected number of red cells per image
    zoom: float  # magnification: multiplies every cell's size
    noise: float  # sensor noise standard deviation (0..1 scale)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> PatientStyle:
        """Draw one patient's style; the spread is what hides class colour differences."""
        stains = _BASE_STAINS * rng.lognormal(0.0, 0.08, size=(3, 3)).astype(np.float32)
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
        strengths = rng.uniform(0.85, 1.18, size=3)
        light = 1.0 - rng.uniform(0.0, 0.08, size=3)
        # Brightness varies more than hue: real stains differ in depth more than in colour.
        target = np.clip(
            _BASE_TARGET * rng.lognormal(0.0, 0.05) * rng.lognormal(0.0, 0.025, size=3), 0.45, 0.92
        )
        return cls(
            stains=tuple(tuple(float(v) for v in row) for row in stains),
            strengths=_floats(strengths),
            light=_floats(light),
            target=_floats(target),
            background_eosin=float(rng.uniform(0.04, 0.16)),
            blur=float(rng.uniform(0.0, 0.008)),
            rbc_density=float(rng.uniform(6.0, 20.0)),
            zoom=float(rng.uniform(0.95, 1.05)),
            noise=float(rng.uniform(0.005, 0.025)),
        )


def _floats(values: np.ndarray) -> tuple[float, float, float]:
    """Plain-float tuple, so styles are hashable, comparable and picklable."""
    a, b, c = (float(v) for v in values)
    return (a, b, c)


@dataclass(frozen=True)
class _ClassLook:
    """Ranges of the white-cell morphology of one class (radii in image-size units).

    Each pair is a (low, high) uniform range drawn per cell.
    """

    cell_radius: tuple[float, float]
    nc_ratio: tuple[float, float]  # nucleus radius / cell radius
    nucleus_density: tuple[float, float]  # nuclear stain concentration
    chromatin_grain: tuple[float, float]  # clump size as a fraction of nucleus radius
    chromatin_contrast: tuple[float, float]  # 0 = smooth, 1 = strongly clumped
    nucleoli: tuple[int, int]  # inclusive count range
    nucleolus_pallor: float  # 1 = invisible, 0 = unstained hole
    nucleolus_size: tuple[float, float]  # radius as a fraction of nucleus radius
    notch_depth: tuple[float, float]  # fraction of radius removed by the indentation
    notch_width: tuple[float, float]  # angular half-width (radians)
    lobulation: float  # amplitude of contour harmonics
    cytoplasm_density: tuple[float, float]  # basophilic stain concentration
    vacuoles: tuple[int, int]  # inclusive count of pale cytoplasmic vacuoles


# Why these numbers: Benign is a small mature lymphocyte whose dense dark nucleus holds about
# as much stain as a blast's larger but paler one, so the dark-pixel budget (and mean colour)
# stays similar across classes while size, N/C ratio, texture and contour differ.
_LOOKS: dict[str, _ClassLook] = {
    "Benign": _ClassLook(
        cell_radius=(0.095, 0.115),
        nc_ratio=(0.80, 0.87),
        nucleus_density=(1.45, 1.70),
        chromatin_grain=(0.35, 0.5),
        chromatin_contrast=(0.05, 0.12),
        nucleoli=(0, 0),
        nucleolus_pallor=1.0,
        nucleolus_size=(0.12, 0.15),
        notch_depth=(0.0, 0.04),
        notch_width=(0.4, 0.8),
        lobulation=0.02,
        cytoplasm_density=(0.40, 0.55),
        vacuoles=(0, 0),
    ),
    "Early": _ClassLook(
        cell_radius=(0.165, 0.190),
        nc_ratio=(0.86, 0.92),
        nucleus_density=(0.60, 0.75),
        chromatin_grain=(0.10, 0.14),
        chromatin_contrast=(0.10, 0.20),
        nucleoli=(2, 4),
        nucleolus_pallor=0.25,
        nucleolus_size=(0.15, 0.20),
        notch_depth=(0.0, 0.05),
        notch_width=(0.4, 0.8),
        lobulation=0.03,
        cytoplasm_density=(0.35, 0.50),
        vacuoles=(0, 0),
    ),
    "Pre": _ClassLook(
        cell_radius=(0.140, 0.160),
        nc_ratio=(0.78, 0.85),
        nucleus_density=(0.85, 1.00),
        chromatin_grain=(0.20, 0.28),
        chromatin_contrast=(0.40, 0.55),
        nucleoli=(0, 1),
        nucleolus_pallor=0.65,
        nucleolus_size=(0.12, 0.16),
        notch_depth=(0.25, 0.38),
        notch_width=(0.45, 0.65),
        lobulation=0.04,
        cytoplasm_density=(0.35, 0.50),
        vacuoles=(0, 1),
    ),
    "Pro": _ClassLook(
        cell_radius=(0.190, 0.220),
        nc_ratio=(0.55, 0.63),
        nucleus_density=(0.85, 1.00),
        chromatin_grain=(0.30, 0.42),
        chromatin_contrast=(0.50, 0.65),
        nucleoli=(0, 1),
        nucleolus_pallor=0.6,
        nucleolus_size=(0.12, 0.16),
        notch_depth=(0.45, 0.62),
        notch_width=(0.18, 0.28),
        lobulation=0.10,
        cytoplasm_density=(0.35, 0.50),
        vacuoles=(2, 5),
    ),
}


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Crop:
    """A pixel window and the normalised coordinates of its pixel centres.

    Why: drawing each cell only inside its bounding window keeps the cost proportional to
    the cell's area instead of the whole image, which matters at 224+ px.
    """

    ys: slice
    xs: slice
    dy: np.ndarray  # (h, 1) normalised y offset from the shape centre
    dx: np.ndarray  # (1, w) normalised x offset from the shape centre

    @property
    def empty(self) -> bool:
        return self.dy.size == 0 or self.dx.size == 0


def _crop(cx: float, cy: float, radius: float, size: int) -> _Crop:
    """Window around (cx, cy) covering ``radius`` plus a pixel of anti-aliasing margin."""
    pad = radius + 2.0 / size
    x0, x1 = (
        max(0, math.floor((cx - pad) * size)),
        min(size, math.ceil((cx + pad) * size)),
    )
    y0, y1 = (
        max(0, math.floor((cy - pad) * size)),
        min(size, math.ceil((cy + pad) * size)),
    )
    xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / size - cx)[None, :]
    ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / size - cy)[:, None]
    return _Crop(slice(y0, y1), slice(x0, x1), ys, xs)


@dataclass(frozen=True)
class _Contour:
    """Star-shaped outline r(theta): a circle with harmonics and an optional notch.

    Why: round vs indented vs cleft nuclei are the main class cue, and a polar radius
    function draws all of them with one vectorised expression.
    """

    radius: float
    harmonics: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase)
    notch_depth: float = 0.0
    notch_angle: float = 0.0
    notch_width: float = 0.5
    aspect: float = 1.0  # minor/major axis ratio
    angle: float = 0.0  # orientation of the major axis

    @property
    def max_radius(self) -> float:
        """Upper bound of r(theta), for crop windows and boxes."""
        return self.radius * (1.0 + sum(abs(a) for _, a, _ in self.harmonics))

    def alpha(self, crop: _Crop, size: int) -> np.ndarray:
        """Anti-aliased coverage (0..1) of the shape over the crop."""
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        u = crop.dx * ca + crop.dy * sa
        v = (-crop.dx * sa + crop.dy * ca) / self.aspect
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        scale = np.ones_like(rho)
        for k, amp, phase in self.harmonics:
            scale += amp * np.cos(k * theta + phase)
        if self.notch_depth > 0.0:
            d = (theta - self.notch_angle + math.pi) % (2.0 * math.pi) - math.pi
            scale *= 1.0 - self.notch_depth * np.exp(-0.5 * (d / self.notch_width) ** 2)
        # About one pixel of soft edge (measured in the shape's own stretched frame).
        return np.clip((self.radius * scale - rho) * size + 0.5, 0.0, 1.0)


def _circle_alpha(crop: _Crop, radius: float, size: int) -> np.ndarray:
    """Coverage of a plain disc, the cheap path for nucleoli and vacuoles."""
    rho = np.sqrt(crop.dx * crop.dx + crop.dy * crop.dy)
    return np.clip((radius - rho) * size + 0.5, 0.0, 1.0)


def _value_noise(rng: np.random.Generator, crop: _Crop, grain: float, extent: float) -> np.ndarray:
    """Smooth random field in [0, 1] with features about ``grain`` wide (normalised units).

    Why: chromatin texture (fine vs clumped) is a class cue; a lattice of random values
    interpolated with smoothstep weights gives resolution-independent texture, and a random
    rotation of the lattice hides its axis-aligned blockiness. The lattice covers the
    nominal window (``extent`` around the centre), never the pixel-clipped crop, so the
    random draws, and hence the scene, are the same at every image size.
    """
    reach = extent * math.sqrt(2.0) + grain
    n = math.ceil(2.0 * reach / grain) + 2
    lattice = rng.random((n, n), dtype=np.float32)
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    if crop.empty:
        return np.zeros((crop.dy.size, crop.dx.size), dtype=np.float32)
    ca, sa = math.cos(angle), math.sin(angle)
    gx = ((crop.dx * ca - crop.dy * sa) + reach) / grain
    gy = ((crop.dx * sa + crop.dy * ca) + reach) / grain
    ix = np.clip(np.floor(gx).astype(np.int64), 0, n - 2)
    iy = np.clip(np.floor(gy).astype(np.int64), 0, n - 2)
    fx, fy = np.clip(gx - ix, 0, 1), np.clip(gy - iy, 0, 1)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    top = lattice[iy, ix] * (1 - fx) + lattice[iy, ix + 1] * fx
    bottom = lattice[iy + 1, ix] * (1 - fx) + lattice[iy + 1, ix + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _chromatin(rng: np.random.Generator, crop: _Crop, grain: float, extent: float) -> np.ndarray:
    """Two octaves of noise: clumps of size ``grain`` with finer granules on top."""
    coarse = _value_noise(rng, crop, grain, extent)
    fine = _value_noise(rng, crop, grain * 0.4, extent)
    return 0.75 * coarse + 0.25 * fine


def _random_contour(
    rng: np.random.Generator,
    radius: float,
    lobulation: float,
    notch_depth: float = 0.0,
    notch_width: float = 0.5,
    aspect: tuple[float, float] = (0.9, 1.0),
) -> _Contour:
    """A contour with random harmonics (k = 2..4), orientation and optional notch."""
    harmonics = tuple(
        (k, float(rng.uniform(0.3, 1.0) * lobulation / (k - 1)), float(rng.uniform(0, 2 * math.pi)))
        for k in (2, 3, 4)
    )
    return _Contour(
        radius=radius,
        harmonics=harmonics,
        notch_depth=notch_depth,
        notch_angle=float(rng.uniform(0, 2 * math.pi)),
        notch_width=notch_width,
        aspect=float(rng.uniform(*aspect)),
        angle=float(rng.uniform(0, 2 * math.pi)),
    )


# --------------------------------------------------------------------------- painting


def _paint(conc: np.ndarray, crop: _Crop, alpha: np.ndarray, values: np.ndarray) -> None:
    """Alpha-blend stain concentrations into ``conc`` (3, H, W) inside the crop.

    ``values`` is either a (3,) vector or a (3, h, w) map; later layers cover earlier ones,
    as a cell lying on top of another hides it.
    """
    region = conc[:, crop.ys, crop.xs]
    vals = values.reshape(3, 1, 1) if values.ndim == 1 else values
    region += alpha[None] * (vals - region)


def _draw_background(
    conc: np.ndarray, rng: np.random.Generator, style: PatientStyle, size: int
) -> None:
    """Pale plasma: a little eosin with a smooth, faint unevenness."""
    full = _crop(0.5, 0.5, 0.5, size)
    field = _value_noise(rng, full, 0.35, 0.5)
    conc[2] = style.background_eosin * (0.75 + 0.5 * field)


def _draw_red_cell(
    conc: np.ndarray, rng: np.random.Generator, style: PatientStyle, size: int
) -> None:
    """A biconcave red cell: eosin disc, thinner (paler) in the centre, slightly dark rim."""
    cx, cy = rng.uniform(-0.06, 1.06, size=2)
    radius = style.zoom * rng.uniform(0.062, 0.082)
    contour = _random_contour(rng, radius, 0.03, aspect=(0.82, 1.0))
    pallor = rng.uniform(0.45, 0.7)
    strength = rng.uniform(0.55, 0.8)
    crop = _crop(cx, cy, contour.max_radius, size)
    if crop.empty:
        return
    alpha = contour.alpha(crop, size)
    rel = np.sqrt(crop.dx**2 + crop.dy**2) / radius
    thickness = (
        1.0 - pallor * np.exp(-((rel / 0.45) ** 2)) + 0.15 * np.exp(-(((rel - 0.9) / 0.12) ** 2))
    )
    eosin = np.broadcast_to(strength * thickness, alpha.shape)
    values = np.stack([np.zeros_like(eosin), np.zeros_like(eosin), eosin])
    _paint(conc, crop, alpha, values)


def _draw_white_cell(
    conc: np.ndarray,
    rng: np.random.Generator,
    style: PatientStyle,
    size: int,
    look: _ClassLook,
    cx: float,
    cy: float,
) -> float:
    """Paint one lymphoid cell of the given class look; return its outline's max radius.

    Why the order: cytoplasm first, nucleus on top (eccentric, as in real lymphoblasts),
    then chromatin texture and nucleoli, which carry most of the class signal.
    """
    u = rng.uniform
    cell_r = style.zoom * u(*look.cell_radius)
    nuc_r = cell_r * u(*look.nc_ratio)
    cell = _random_contour(rng, cell_r, 0.04, aspect=(0.9, 1.0))
    cell_crop = _crop(cx, cy, cell.max_radius, size)
    cyto = float(u(*look.cytoplasm_density))
    cyto_map = np.array([0.02, cyto, 0.04], dtype=np.float32)
    _paint(conc, cell_crop, cell.alpha(cell_crop, size), cyto_map)
    _draw_vacuoles(conc, rng, size, look, cx, cy, cell_r)

    # The nucleus sits off-centre by part of the cytoplasm rim.
    slack = max(cell_r - nuc_r, 0.0) * u(0.2, 0.8)
    phi = u(0, 2 * math.pi)
    nx, ny = cx + slack * math.cos(phi), cy + slack * math.sin(phi)
    nucleus = _random_contour(
        rng, nuc_r, look.lobulation, u(*look.notch_depth), u(*look.notch_width), aspect=(0.88, 1.0)
    )
    crop = _crop(nx, ny, nucleus.max_radius, size)
    density = float(u(*look.nucleus_density))
    grain = nuc_r * float(u(*look.chromatin_grain))
    contrast = float(u(*look.chromatin_contrast))
    texture = _chromatin(rng, crop, grain, nucleus.max_radius)
    clumps = np.clip(0.5 + (texture - 0.5) * (1.0 + 2.5 * contrast), 0.0, 1.0)
    nuclear = density * (1.0 - contrast + 2.0 * contrast * clumps)
    nuclear = _add_nucleoli(rng, nuclear, crop, size, look, nuc_r)
    values = np.stack([nuclear, np.full_like(nuclear, 0.1 * cyto), np.full_like(nuclear, 0.02)])
    _paint(conc, crop, nucleus.alpha(crop, size), values)
    return cell.max_radius


def _add_nucleoli(
    rng: np.random.Generator,
    nuclear: np.ndarray,
    crop: _Crop,
    size: int,
    look: _ClassLook,
    nuc_r: float,
) -> np.ndarray:
    """Pale round nucleoli with a thin dark rim, placed inside the inner nucleus."""
    count = int(rng.integers(look.nucleoli[0], look.nucleoli[1] + 1))
    for _ in range(count):
        rad = nuc_r * rng.uniform(*look.nucleolus_size)
        dist = nuc_r * rng.uniform(0.0, 0.5)
        phi = rng.uniform(0, 2 * math.pi)
        local = _Crop(
            crop.ys, crop.xs, crop.dy - dist * math.sin(phi), crop.dx - dist * math.cos(phi)
        )
        inner = _circle_alpha(local, rad, size)
        rim = _circle_alpha(local, rad * 1.35, size) - inner
        nuclear = nuclear * (1.0 - inner * (1.0 - look.nucleolus_pallor)) * (1.0 + 0.35 * rim)
    return nuclear


def _draw_vacuoles(
    conc: np.ndarray,
    rng: np.random.Generator,
    size: int,
    look: _ClassLook,
    cx: float,
    cy: float,
    cell_r: float,
) -> None:
    """Small unstained vacuoles in the cytoplasm (the nucleus, drawn later, may cover some)."""
    count = int(rng.integers(look.vacuoles[0], look.vacuoles[1] + 1))
    for _ in range(count):
        rad = cell_r * rng.uniform(0.06, 0.1)
        dist = cell_r * rng.uniform(0.6, 0.85)
        phi = rng.uniform(0, 2 * math.pi)
        vx, vy = cx + dist * math.cos(phi), cy + dist * math.sin(phi)
        crop = _crop(vx, vy, rad, size)
        if crop.empty:
            continue
        region = conc[:, crop.ys, crop.xs]
        region *= 1.0 - 0.7 * _circle_alpha(crop, rad, size)[None]


def _extra_cell_position(
    rng: np.random.Generator, cx: float, cy: float, min_dist: float
) -> tuple[float, float]:
    """A spot for another white cell that does not sit on the main one (may leave the frame)."""
    for _ in range(8):
        x, y = rng.uniform(0.0, 1.0, size=2)
        if math.hypot(x - cx, y - cy) >= min_dist:
            return float(x), float(y)
    angle = rng.uniform(0, 2 * math.pi)
    return float(cx + min_dist * math.cos(angle)), float(cy + min_dist * math.sin(angle))


# --------------------------------------------------------------------------- optics


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """Uneven lighting: a linear gradient plus vignetting, (H, W) around 1."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    gx, gy = rng.normal(0.0, 0.04, size=2)
    vignette = rng.uniform(0.0, 0.12)
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    return 1.0 + gx * c[None, :] + gy * c[:, None] - vignette * r2


def _jitter(rng: np.random.Generator, values: tuple[float, ...], sigma: float) -> np.ndarray:
    """Per-image multiplicative wobble around a patient-level value (float32 array)."""
    base = np.asarray(values, dtype=np.float32)
    return base * rng.lognormal(0.0, sigma, size=base.shape).astype(np.float32)


def _develop(
    conc: np.ndarray, rng: np.random.Generator, style: PatientStyle, size: int
) -> np.ndarray:
    """Turn stain concentrations into a uint8 RGB photo: absorb, blur, noise, auto-expose."""
    stains = np.asarray(style.stains, dtype=np.float32)
    strengths = _jitter(rng, style.strengths, 0.06)
    od = np.tensordot(conc, stains * strengths[:, None], axes=([0], [0]))  # (H, W, 3)
    light = _jitter(rng, style.light, 0.02)
    rgb = np.exp(-od) * light * _illumination(rng, size)[..., None]
    sigma = style.blur * size * rng.uniform(0.7, 1.3)
    if sigma > 0.3:
        img = Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8))
        rgb = np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32) / 255.0
    target = _jitter(rng, style.target, 0.02)
    gain = (target / np.maximum(rgb.reshape(-1, 3).mean(axis=0), 1e-3)) ** _EXPOSURE_STRENGTH
    rgb = rgb * gain + np.float32(style.noise) * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- public API


def render_smear(
    label: int,
    size: int,
    rng: np.random.Generator,
    style: PatientStyle,
    look: _ClassLook | None = None,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Render one smear of class ``CLASSES[label]``: uint8 (size, size, 3) and the main cell box.

    The box is (x0, y0, x1, y1) in pixels, x1/y1 exclusive, around the main white cell's
    outline; explanations are later checked against it. ``look`` overrides the class's
    morphology (see :func:`patient_look`); by default it is the class's own.
    """
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    if look is None:
        look = _LOOKS[CLASSES[label]]
    conc = np.zeros((3, size, size), dtype=np.float32)
    _draw_background(conc, rng, style, size)
    for _ in range(int(rng.poisson(style.rbc_density))):
        _draw_red_cell(conc, rng, style, size)
    cx, cy = (float(v) for v in rng.uniform(0.38, 0.62, size=2))
    extra = int(rng.choice(3, p=(0.6, 0.3, 0.1)))
    for _ in range(extra):  # drawn first so the main cell lies on top
        ex, ey = _extra_cell_position(rng, cx, cy, 0.42)
        _draw_white_cell(conc, rng, style, size, look, ex, ey)
    radius = _draw_white_cell(conc, rng, style, size, look, cx, cy)
    box = _pixel_box(cx, cy, radius, size)
    return _develop(conc, rng, style, size), box


def _pixel_box(cx: float, cy: float, radius: float, size: int) -> tuple[int, int, int, int]:
    """Bounding box of a disc, in pixels, clipped to the image."""

    def clip(v: float) -> int:
        return int(min(max(v, 0), size))

    return (
        clip(math.floor((cx - radius) * size)),
        clip(math.floor((cy - radius) * size)),
        clip(math.ceil((cx + radius) * size)),
        clip(math.ceil((cy + radius) * size)),
    )


def patient_style(seed: int, label: int, patient: int) -> PatientStyle:
    """The style of one patient, a pure function of (seed, class, patient number)."""
    return PatientStyle.sample(np.random.default_rng([seed, 0, label, patient]))


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of every other image, so any subset
    can be regenerated and the work split across processes."""
    return np.random.default_rng([seed, 1, index])


def class_counts(n: int, class_weights: tuple[float, ...] | None = None) -> list[int]:
    """Split ``n`` images over the classes by weight (largest remainder, sums to ``n``)."""
    weights = np.asarray(
        class_weights if class_weights is not None else DEFAULT_CLASS_WEIGHTS, dtype=float
    )
    if weights.shape != (len(CLASSES),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"class_weights needs {len(CLASSES)} non-negative values with a positive sum"
        )
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def plan(
    n: int, seed: int, patients_per_class: int, class_weights: tuple[float, ...] | None = None
) -> list[tuple[int, int]]:
    """(label, patient) for every image index, in a shuffled but seed-fixed order.

    Patients get unequal numbers of images (Dirichlet shares), as real patients do.
    """
    if n < 0 or patients_per_class < 1:
        raise ValueError("n must be >= 0 and patients_per_class >= 1")
    items: list[tuple[int, int]] = []
    for label, count in enumerate(class_counts(n, class_weights)):
        rng = np.random.default_rng([seed, 2, label])
        shares = rng.dirichlet(np.full(patients_per_class, 4.0))
        patients = rng.choice(patients_per_class, size=count, p=shares)
        items.extend((label, int(p)) for p in patients)
    order = np.random.default_rng([seed, 3]).permutation(len(items))
    return [items[i] for i in order]


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes with low compression: generation speed matters more than size here."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_row(args: tuple[int, int, int, int, int, float]) -> dict:
    """Render and encode image ``index``; a top-level function so process pools can run it."""
    index, label, patient, size, seed, difficulty = args
    look = None
    if difficulty > 0.0:
        look = patient_look(label, difficulty, np.random.default_rng([seed, 4, label, patient]),
                            np.random.default_rng([seed, 5, index]))
    image, box = render_smear(
        label, size, image_rng(seed, index), patient_style(seed, label, patient), look
    )
    data = encode_png(image)
    name = CLASSES[label]
    return {
        "path": f"{name}/synth_{index:06d}.png",
        "label": name,
        "group": f"patient_{name}_{patient:03d}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": size,
        "height": size,
        "image": data,
        "cell_box": list(box),
    }


def generate(
    n: int = 2000,
    size: int = 64,
    seed: int = 0,
    patients_per_class: int = 20,
    class_weights: tuple[float, ...] | None = None,
    *,
    difficulty: float = 0.0,
    workers: int = 1,
) -> pa.Table:
    """Generate ``n`` synthetic smears as a table (see ``SCHEMA``), deterministic in its args.

    ``difficulty`` > 0 makes Early, Pre and Pro overlap in morphology (see the module
    docstring); 0, the default, gives the original well-separated classes, byte for byte.
    Site effects and label noise live in :func:`generate_sites`.

    ``workers`` > 1 renders in a process pool; the result is identical either way, since
    every image depends only on (seed, index, its class and its patient). The pool uses
    "forkserver" so it is safe to call from a process that already runs threads (Ray).
    """
    difficulty = _check_difficulty(difficulty)
    jobs = [
        (i, label, patient, size, seed, difficulty)
        for i, (label, patient) in enumerate(plan(n, seed, patients_per_class, class_weights))
    ]
    return pa.Table.from_pylist(_run(_render_row, jobs, workers), schema=SCHEMA)


def _run(func, jobs: list, workers: int) -> list[dict]:  # noqa: ANN001 - a picklable row maker
    """``[func(job) for job in jobs]``, in a process pool when ``workers`` > 1."""
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("forkserver")
        ) as pool:
            return list(pool.map(func, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return [func(job) for job in jobs]


def write_folder(table: pa.Table, out_dir: Path) -> Path:
    """Write each image to ``out_dir/<path>`` (class-per-folder) plus ``manifest.parquet``.

    The manifest is the table without the image bytes, so folder readers and the
    parquet path see the same rows; returns the manifest path.
    """
    out_dir = Path(out_dir)
    paths = table.column("path").to_pylist()
    images = table.column("image").to_pylist()
    for rel, data in zip(paths, images):
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    manifest = out_dir / "manifest.parquet"
    pq.write_table(table.drop_columns(["image"]), manifest)
    return manifest


# --------------------------------------------------------------------------- difficulty

# At difficulty 1, the largest share of another subtype's morphology one patient's cells take
# (drawn uniformly up to it): Early, Pre and Pro are immunophenotypes, not shapes, so their
# looks overlap; a patient near one half is as like the other subtype as its own, and at
# difficulty above 1 some look more like it. 0.5 puts a centralized smallcnn at 64 px in
# 0.80-0.90 balanced accuracy (benchmarks/synth_calibration.py).
_BLAST_OVERLAP = 0.5
# Benign cells borrow much less from a blast look: mature lymphocytes stay recognisable.
_BENIGN_OVERLAP = 0.15
# Per-image wobble of that share around the patient's own (standard deviation).
_IMAGE_OVERLAP_JITTER = 0.08


def _check_difficulty(difficulty: float) -> float:
    difficulty = float(difficulty)
    if not 0.0 <= difficulty <= 2.0:
        raise ValueError(
            f"difficulty must be in [0, 2] (0 = easy, 1 = default hard), got {difficulty}"
        )
    return difficulty


def _blend_looks(a: _ClassLook, b: _ClassLook, weight: float) -> _ClassLook:
    """The look ``(1 - weight) * a + weight * b``, field by field (counts rounded)."""
    values = {}
    for f in fields(_ClassLook):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, tuple):
            mixed = tuple((1.0 - weight) * u + weight * v for u, v in zip(x, y))
            if isinstance(x[0], int):
                mixed = tuple(int(round(v)) for v in mixed)
            values[f.name] = mixed
        else:
            values[f.name] = (1.0 - weight) * x + weight * y
    return _ClassLook(**values)


def patient_look(
    label: int,
    difficulty: float,
    patient_rng: np.random.Generator,
    image_rng: np.random.Generator | None = None,
) -> _ClassLook:
    """The morphology one patient's cells are drawn from at ``difficulty`` (0 = the class's own).

    A blast patient's look is its subtype's, blended toward one other blast subtype by a
    share drawn uniformly in ``[0, 0.5 * difficulty]`` (from ``patient_rng``, so a patient
    keeps its look), wobbled per image (``image_rng``). Benign borrows at most
    ``0.15 * difficulty`` from a random blast look.
    """
    name = CLASSES[label]
    if difficulty <= 0.0:
        return _LOOKS[name]
    blasts = [i for i, c in enumerate(CLASSES) if c != "Benign"]
    other = int(patient_rng.choice([i for i in blasts if i != label]))
    reach = (_BENIGN_OVERLAP if name == "Benign" else _BLAST_OVERLAP) * difficulty
    weight = float(patient_rng.uniform(0.0, reach))
    if image_rng is not None:
        weight += float(image_rng.normal(0.0, _IMAGE_OVERLAP_JITTER * difficulty))
    return _blend_looks(_LOOKS[name], _LOOKS[CLASSES[other]], min(max(weight, 0.0), 1.0))


# --------------------------------------------------------------------------- sites

SITE_SCHEMA = pa.schema(
    [
        *SCHEMA,
        ("site", pa.string()),
        ("patient", pa.string()),
        ("true_label", pa.string()),
    ]
)

# Default Dirichlet concentration of a site's class mix (alpha = concentration * class weights):
# small values give sites dominated by one or two classes.
DEFAULT_CLASS_CONCENTRATION = 10.0


def site_name(site: int) -> str:
    """``site_a``, ``site_b``, ...: the folder and ``site`` column value of site number ``site``."""
    if not 0 <= site < 26:
        raise ValueError(f"sites are numbered 0..25 (site_a..site_z), got {site}")
    return "site_" + chr(ord("a") + site)


@dataclass(frozen=True)
class SiteStyle:
    """Stain protocol and scanner of one hospital, applied to every image it produces.

    Why: real hospitals differ in stain batches, white balance, optics and file
    compression, and a model trained at one site pays for that at another. The protocol
    part changes how the stains absorb (before the camera's auto-exposure); the scanner
    part acts on the finished photo, so it shifts the mean colour by site, not by class.
    """

    name: str
    stain_gain: tuple[float, float, float]  # multiplies each stain's strength
    cast: tuple[float, float, float]  # per-channel gain after exposure (white balance)
    contrast: float  # > 1 stretches, < 1 flattens around the image mean
    gamma: float  # tone curve exponent
    blur: float  # extra Gaussian sigma as a fraction of image size
    vignette: float  # extra darkening towards the corners
    gradient: tuple[float, float]  # illumination slope along x and y
    noise: float  # extra sensor noise standard deviation (0..1 scale)
    jpeg_quality: int | None  # lossy JPEG round trip at this quality; None = none

    @classmethod
    def sample(cls, name: str, rng: np.random.Generator, strength: float) -> SiteStyle:
        """Draw one site; ``strength`` 0 is a neutral scanner, 1 the default spread."""
        s = float(strength)
        return cls(
            name=name,
            stain_gain=_floats(rng.lognormal(0.0, 0.12 * s, size=3)),
            cast=_floats(rng.lognormal(0.0, 0.07 * s, size=3)),
            contrast=float(rng.lognormal(0.0, 0.15 * s)),
            gamma=float(rng.lognormal(0.0, 0.12 * s)),
            blur=float(rng.uniform(0.0, 0.012 * s)),
            vignette=float(rng.uniform(0.0, 0.3 * s)),
            gradient=(float(rng.normal(0.0, 0.1 * s)), float(rng.normal(0.0, 0.1 * s))),
            noise=float(rng.uniform(0.0, 0.02 * s)),
            jpeg_quality=None if s <= 0.0 else int(round(95.0 - rng.uniform(0, 65) * min(s, 1.0))),
        )

    def protocol(self, style: PatientStyle) -> PatientStyle:
        """The patient's style as stained with this site's protocol."""
        return replace(style, strengths=_floats(np.asarray(style.strengths) * self.stain_gain))

    def scan(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The photo as this site's scanner delivers it: light, blur, tone, cast, noise, JPEG."""
        size = image.shape[0]
        rgb = image.astype(np.float32) / 255.0
        c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        r2 = c[None, :] ** 2 + c[:, None] ** 2
        light = 1.0 + self.gradient[0] * c[None, :] + self.gradient[1] * c[:, None]
        rgb = rgb * (light - self.vignette * r2)[..., None]
        sigma = self.blur * size
        if sigma > 0.3:
            img = Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8))
            rgb = np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32) / 255.0
        mean = rgb.reshape(-1, 3).mean(axis=0)
        rgb = np.clip(mean + self.contrast * (rgb - mean), 0.0, 1.0) ** np.float32(self.gamma)
        rgb = rgb * _jitter(rng, self.cast, 0.01)
        rgb = rgb + np.float32(self.noise) * rng.standard_normal(rgb.shape, dtype=np.float32)
        out = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if self.jpeg_quality is not None:
            buf = io.BytesIO()
            Image.fromarray(out).save(buf, format="JPEG", quality=self.jpeg_quality)
            out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return out


def site_style(seed: int, site: int, difficulty: float = 1.0) -> SiteStyle:
    """The stain protocol and scanner of site number ``site``; their spread scales with
    ``difficulty`` (0 = every site scans alike)."""
    return SiteStyle.sample(site_name(site), np.random.default_rng([seed, 20, site]), difficulty)


def site_class_mix(
    seed: int,
    site: int,
    class_weights: tuple[float, ...] | None = None,
    concentration: float = DEFAULT_CLASS_CONCENTRATION,
) -> np.ndarray:
    """Class shares of one site: Dirichlet(``concentration`` * normalised class weights)."""
    base = np.asarray(class_weights if class_weights is not None else DEFAULT_CLASS_WEIGHTS, float)
    class_counts(1, tuple(base))  # validates the weights
    if not concentration > 0:
        raise ValueError(f"class concentration must be > 0, got {concentration}")
    base = base / base.sum()
    if math.isinf(concentration):
        return base
    alpha = np.maximum(concentration * base, 1e-3)
    mix = np.random.default_rng([seed, 21, site]).dirichlet(alpha)
    return np.where(base > 0, mix, 0.0) / np.where(base > 0, mix, 0.0).sum()


def _site_rows(
    seed: int,
    site: int,
    n: int,
    patients_per_class: int,
    mix: np.ndarray,
    label_noise: float,
) -> list[tuple[int, int, int]]:
    """(label, patient, recorded label) of every image of one site, in seed-fixed order.

    Exactly ``round(label_noise * n)`` images get a uniformly drawn *other* label.
    """
    items: list[tuple[int, int]] = []
    for label, count in enumerate(class_counts(n, tuple(float(m) for m in mix))):
        rng = np.random.default_rng([seed, 22, site, label])
        shares = rng.dirichlet(np.full(patients_per_class, 4.0))
        items.extend((label, int(p)) for p in rng.choice(patients_per_class, size=count, p=shares))
    rng = np.random.default_rng([seed, 23, site])
    items = [items[i] for i in rng.permutation(len(items))]
    recorded = [label for label, _ in items]
    for i in rng.choice(len(items), size=int(round(label_noise * len(items))), replace=False):
        recorded[i] = (items[i][0] + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
    return [(label, patient, rec) for (label, patient), rec in zip(items, recorded)]


def _render_site_row(args: tuple) -> dict:
    """Render, scan and encode image ``index`` of one site (top-level, for process pools)."""
    index, label, patient, recorded, patient_id, size, seed, site, difficulty, scanner = args
    style = scanner.protocol(
        PatientStyle.sample(np.random.default_rng([seed, 24, site, label, patient]))
    )
    look = patient_look(
        label,
        difficulty,
        np.random.default_rng([seed, 25, site, label, patient]),
        np.random.default_rng([seed, 26, site, index]),
    )
    image, box = render_smear(
        label, size, np.random.default_rng([seed, 27, site, index]), style, look
    )
    data = encode_png(scanner.scan(image, np.random.default_rng([seed, 28, site, index])))
    name = CLASSES[recorded]
    return {
        "path": f"{scanner.name}/{name}/{patient_id}/synth_{index:06d}.png",
        "label": name,
        "group": f"{name}/{patient_id}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": size,
        "height": size,
        "image": data,
        "cell_box": list(box),
        "site": scanner.name,
        "patient": patient_id,
        "true_label": CLASSES[label],
    }


def generate_sites(
    n: int = 1500,
    size: int = 64,
    seed: int = 0,
    sites: int = 3,
    patients_per_class: int = 8,
    class_weights: tuple[float, ...] | None = None,
    *,
    difficulty: float = 1.0,
    label_noise: float = 0.0,
    class_concentration: float = DEFAULT_CLASS_CONCENTRATION,
    workers: int = 1,
) -> pa.Table:
    """``n`` smears from ``sites`` hospitals as one table (see ``SITE_SCHEMA``).

    Sites get ``n // sites`` images each (the first ones one more when it does not divide),
    their own patients (``patients_per_class`` per class, never shared), their own class mix
    (:func:`site_class_mix`) and their own stain protocol and scanner (:func:`site_style`).
    ``path`` is ``site/Class/patient/synth_i.png`` and ``group`` is ``Class/patient``, as
    :func:`fedray.data.catalog.scan` reads a site folder; ``label`` is the recorded label,
    ``true_label`` the class the cell was drawn from (they differ on the ``label_noise``
    share of images). Deterministic in its arguments, serial or parallel.
    """
    difficulty = _check_difficulty(difficulty)
    if not 1 <= sites <= 26:
        raise ValueError(f"sites must be in 1..26, got {sites}")
    if n < sites or patients_per_class < 1:
        raise ValueError("n must be >= sites and patients_per_class >= 1")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be a fraction in [0, 1], got {label_noise}")
    jobs = []
    for site in range(sites):
        scanner = site_style(seed, site, difficulty)
        mix = site_class_mix(seed, site, class_weights, class_concentration)
        numbers = np.random.default_rng([seed, 29, site]).permutation(
            len(CLASSES) * patients_per_class
        )
        n_site = n // sites + (1 if site < n % sites else 0)
        for index, (label, patient, recorded) in enumerate(
            _site_rows(seed, site, n_site, patients_per_class, mix, label_noise)
        ):
            number = numbers[label * patients_per_class + patient]
            patient_id = f"{scanner.name}_patient_{number:03d}"
            jobs.append(
                (index, label, patient, recorded, patient_id, size, seed, site, difficulty, scanner)
            )
    return pa.Table.from_pylist(_run(_render_site_row, jobs, workers), schema=SITE_SCHEMA)


def write_sites(table: pa.Table, out_dir: Path) -> list[Path]:
    """Write a :func:`generate_sites` table as one folder per site, ``out_dir/site_x/``.

    Each site folder holds ``Class/patient/*.png`` and its own ``manifest.parquet`` (paths
    relative to the site folder), so ``fedray data prepare --source out_dir/site_a`` or
    ``data.source: folder`` reads one hospital. ``out_dir/manifest.parquet`` lists all sites
    (paths relative to ``out_dir``, with the ``site`` column), for ``data.source: prepared``
    with ``partition.scheme: by-group``. Returns the site manifests, then the pooled one.
    """
    out_dir = Path(out_dir)
    manifests = []
    sites = table.column("site").to_pylist()
    for name in sorted(set(sites)):
        part = table.filter(pa.array([s == name for s in sites]))
        rel = [p.split("/", 1)[1] for p in part.column("path").to_pylist()]
        part = part.set_column(part.schema.get_field_index("path"), "path", pa.array(rel))
        manifests.append(write_folder(part, out_dir / name))
    pooled = out_dir / "manifest.parquet"
    pq.write_table(table.drop_columns(["image"]), pooled)
    return [*manifests, pooled]
