"""A one-page PNG summary of a registration result, readable at a glance.

:func:`render_overview` draws two rows (an axial and a coronal view through the centre of the body,
or two axial views when the image has few slices) of four panels: the fixed/moving overlay before
registration, the fixed/warped overlay after it, the deformed grid and the Jacobian determinant.

Display orientation comes from physical space only: every panel is the input resampled onto a small
LPS-axis-aligned plane grid whose first index axis points to the screen's right and whose second
points down, so axial views show anterior at the top and the patient's right on the image's left,
and coronal views show superior at the top, whatever the input's direction matrix.

matplotlib is imported inside :func:`render_overview`, so the library imports without it; the figure
is drawn with the Agg canvas directly (no pyplot, no display, no global backend change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image import Image
from .spatial.grid import Grid
from .spatial.jacobian import jacobian_statistics
from .spatial.sampling import sample_at_points
from .spatial.warp import resample_image

WINDOW_HU = (-800.0, 400.0)
"""Intensity window of the overlays, mapped to [0, 1]."""

BODY_THRESHOLD_HU = -500.0
"""Voxels above this belong to the body (for the slice position)."""

FEW_SLICES = 16
"""Below this many slices along the superior axis, both rows are axial (at 1/3 and 2/3 of the body)."""

THIN_SLAB_RATIO = 1.0 / 3.0
"""Both rows are axial too when the superior extent is below this fraction of the in-plane extent
(a coronal view of a thin slab would be a sliver)."""

_MAX_DISPLAY_PIXELS = 320
_MAX_LABELS = 6
_GRID_COLOUR = "#ffe000"
_FOLD_COLOUR = "black"
_LABEL_COLOURS = ("#ff7f0e", "#00bfff", "#ff3030", "#39e639", "#ffd700", "#b266ff", "#ff69b4", "#00e5c0")

# LPS unit vectors and the anatomical letter each points towards.
_AXIS_LETTERS = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}


@dataclass(frozen=True)
class _View:
    """One display plane: a 1-voxel-thick, LPS-axis-aligned grid seen as a screen image.

    ``grid`` index axis i points to the screen's right (``right``), j points down (``down``) and k
    along the plane normal, so ``data[0]`` of an image resampled onto it is displayed as is.
    """

    name: str
    grid: Grid
    right: np.ndarray
    down: np.ndarray
    pixel_mm: float
    position: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape[1], self.grid.shape[2]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """imshow extent in screen millimetres (origin="upper": row 0 at the top)."""
        rows, cols = self.shape
        half = self.pixel_mm / 2.0
        return (-half, (cols - 0.5) * self.pixel_mm, (rows - 0.5) * self.pixel_mm, -half)

    def screen_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = self.shape
        return np.arange(cols) * self.pixel_mm, np.arange(rows) * self.pixel_mm

    def letter(self, vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return _AXIS_LETTERS[(axis, 1 if vector[axis] > 0 else -1)]


def render_overview(path, fixed: Image, moving: Image, warped: Image, displacement: torch.Tensor,
                    jacobian: torch.Tensor, title: str = "", fixed_labels: Image | None = None,
                    warped_labels: Image | None = None, label_names: dict[int, str] | None = None,
                    body: Image | None = None) -> list[str]:
    """Writes a PNG summarising a registration (about 1440 x 720 pixels).

    Args:
        path: the PNG to write (its folder is created if needed).
        fixed: the fixed image (HU).
        moving: the moving image, on its own grid (HU).
        warped: ``moving`` resampled through the result onto ``fixed.grid`` (HU).
        displacement: ``(3, D, H, W)`` LPS mm, ``phi(x) - x`` (fixed -> moving) on ``fixed.grid``.
        jacobian: ``(D, H, W)`` Jacobian determinant of ``phi`` on ``fixed.grid``.
        title: first line of the figure title; a caption with the key numbers follows it.
        fixed_labels, warped_labels: optional label maps (any grid; ``warped_labels`` normally on
            ``fixed.grid``); when both are given a few labels are outlined on the "after" panel,
            fixed solid and warped dashed.
        label_names: label value -> name for the legend (unnamed labels read "label N").
        body: binary image on ``fixed.grid``: the region of the figure's one folding number (% of
            voxels with J <= 0), as in summary.json; None: the whole fixed grid.

    Returns:
        every text drawn on the figure (titles, legend entries, caption), in drawing order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.text import Text

    grid = fixed.grid
    if warped.grid.shape != grid.shape:
        raise ValueError(f"render_overview(): warped shape {warped.grid.shape} must match the fixed grid "
                         f"{grid.shape}")
    if tuple(displacement.shape) != (3, *grid.shape):
        raise ValueError(f"render_overview(): displacement shape {tuple(displacement.shape)} must be "
                         f"(3, *{grid.shape})")
    if tuple(jacobian.shape) != grid.shape:
        raise ValueError(f"render_overview(): jacobian shape {tuple(jacobian.shape)} must be {grid.shape}")
    displacement = displacement.detach().float()
    jacobian = jacobian.detach().float()

    views = _choose_views(fixed)
    overlap = _fields_overlap(grid, moving.grid)
    numbers = _summary_numbers(displacement, jacobian, body)
    low, high = _jacobian_percentiles(jacobian)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(0.5, low), vmax=max(1.5, high))
    draw_labels = fixed_labels is not None and warped_labels is not None

    figure = Figure(figsize=(16, 8), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(views), 4, squeeze=False)

    for row, view in enumerate(views):
        inside = _inside_mask(grid, view)
        fixed_hu = _resample_plane(fixed, view)
        moving_hu = np.where(inside, _resample_plane(moving, view), -1024.0)
        warped_hu = _resample_plane(warped, view)
        points = view.grid.world_points()[0]
        moved = sample_at_points(displacement, grid, points.to(displacement.device)).cpu()
        phi = (points + torch.movedim(moved, 0, -1)).numpy()
        jac_plane = sample_at_points(jacobian, grid, points.to(jacobian.device)).cpu().numpy()
        columns, rows = view.screen_coordinates()
        extent = view.extent

        # 1. before: fixed (magenta) / moving resampled in physical space without the registration (green)
        ax = axes[row, 0]
        ax.imshow(_overlay(fixed_hu, moving_hu), extent=extent, interpolation="nearest")
        if not overlap:
            ax.text(0.5, 0.5, "no physical overlap\nbefore registration", transform=ax.transAxes,
                    ha="center", va="center", color="white", fontsize=11,
                    bbox=dict(facecolor="red", alpha=0.6, edgecolor="none"))
        _orientation_letters(ax, view)
        ax.set_ylabel(f"{view.name}  ({view.position})", fontsize=10)

        # 2. after: fixed / warped, with label outlines
        ax = axes[row, 1]
        ax.imshow(_overlay(fixed_hu, warped_hu), extent=extent, interpolation="nearest")
        if draw_labels:
            handles = _draw_labels(ax, view, fixed_labels, warped_labels, columns, rows, Line2D, label_names or {})
            if handles:
                ax.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.5,
                          handlelength=1.5, borderpad=0.3, labelspacing=0.2)

        # 3. deformed grid: lines of constant moving-space coordinate on the fixed image
        ax = axes[row, 2]
        ax.imshow(fixed_hu, cmap="gray", vmin=WINDOW_HU[0] - 200, vmax=WINDOW_HU[1] + 200,
                  extent=extent, interpolation="nearest")
        spacing_mm = _line_interval(max(columns[-1], rows[-1]) + view.pixel_mm)
        for vector in (view.right, view.down):
            component = np.where(inside, phi[..., int(np.argmax(np.abs(vector)))], np.nan)
            if np.isfinite(component).any():
                first = math.ceil(np.nanmin(component) / spacing_mm)
                last = math.floor(np.nanmax(component) / spacing_mm)
                levels = np.arange(first, last + 1) * spacing_mm
                if len(levels):
                    ax.contour(columns, rows, np.ma.masked_invalid(component), levels=levels,
                               colors=_GRID_COLOUR, linewidths=0.7, linestyles="solid")
        ax.set_title(f"Deformed grid (moving-space lines every {spacing_mm:g} mm)", fontsize=10)

        # 4. Jacobian determinant
        ax = axes[row, 3]
        ax.set_facecolor("0.75")
        jac_masked = np.ma.masked_where(~inside | ~np.isfinite(jac_plane), jac_plane)
        image = ax.imshow(jac_masked, cmap="RdBu_r", norm=norm, extent=extent, interpolation="nearest")
        body = np.where(inside, fixed_hu, -1024.0)
        if (body > BODY_THRESHOLD_HU).any() and (body <= BODY_THRESHOLD_HU).any():
            ax.contour(columns, rows, body, levels=[BODY_THRESHOLD_HU], colors="0.35", linewidths=0.6,
                       linestyles="solid")
        folded = inside & (jac_plane <= 0)
        if folded.any():
            marks = np.zeros((*folded.shape, 4))
            marks[folded, 3] = 1.0
            ax.imshow(marks, extent=extent, interpolation="nearest")
            outline = np.where(inside, np.nan_to_num(jac_plane, nan=1.0), 1.0)
            ax.contour(columns, rows, outline, levels=[0.0], colors=_FOLD_COLOUR, linewidths=1.2,
                       linestyles="solid")
        ax.set_title("Jacobian determinant (black: J \u2264 0, folded)", fontsize=10)
        colourbar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        colourbar.ax.tick_params(labelsize=7)
        colourbar.set_label("J (1 = volume kept, black = folded)", fontsize=8)

    axes[0, 0].set_title("Before: fixed (magenta) / moving (green)", fontsize=10)
    labels_note = "\nlabels: fixed solid, warped dashed" if draw_labels else ""
    axes[0, 1].set_title(f"After: fixed (magenta) / warped (green){labels_note}", fontsize=10)
    for row in range(1, len(views)):
        for column in range(2):
            axes[row, column].set_title(axes[0, column].get_title(), fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])

    caption = (f"fixed {_describe(grid)}  |  moving {_describe(moving.grid)}  |  "
               f"|u| mean {numbers['mean_mm']:.1f} mm, max {numbers['max_mm']:.1f} mm  |  "
               f"J min {numbers['jac_min']:.2f}, max {numbers['jac_max']:.2f}, "
               f"J \u2264 0: {_percent(numbers['folded_percent'])} {numbers['folded_region']}"
               + ("" if overlap else "  |  no physical overlap before registration"))
    figure.suptitle(f"{title}\n{caption}" if title else caption, fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), dpi=90)
    return [text.get_text() for text in figure.findobj(Text) if text.get_text()]


# --------------------------------------------------------------------------------- geometry
def _superior_dim(grid: Grid) -> int:
    """The array dimension (0, 1 or 2 of D, H, W) whose index axis is most along LPS z."""
    index_axis = int(np.argmax(np.abs(grid.direction_matrix[2, :])))
    return 2 - index_axis


def _body_centre_index(fixed: Image) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Centre of mass (array order k, j, i) of body voxels, and the body's extent along the
    superior array dimension (None without body voxels)."""
    body = fixed.data > BODY_THRESHOLD_HU
    total = int(body.sum())
    if total == 0:
        return (np.array(fixed.grid.shape, dtype=float) - 1) / 2.0, None
    per_kj = body.sum(dim=2, dtype=torch.float64).cpu().numpy()
    per_ki = body.sum(dim=1, dtype=torch.float64).cpu().numpy()
    marginals = (per_kj.sum(axis=1), per_kj.sum(axis=0), per_ki.sum(axis=0))
    centre = np.array([(np.arange(len(m)) * m).sum() / total for m in marginals])
    present = np.nonzero(marginals[_superior_dim(fixed.grid)])[0]
    return centre, (float(present[0]), float(present[-1]))


def _index_to_world(grid: Grid, kji: np.ndarray) -> np.ndarray:
    matrix = grid.index_to_world()
    return matrix[:3, :3] @ np.asarray(kji, dtype=float)[::-1] + matrix[:3, 3]


def _plane_view(name: str, fixed_grid: Grid, point: np.ndarray, right, down) -> _View:
    """An LPS-axis-aligned display plane through ``point`` covering ``fixed_grid``'s bounding box."""
    right, down = np.asarray(right, dtype=float), np.asarray(down, dtype=float)
    normal = np.cross(right, down)
    corners = fixed_grid.corners_world()
    u, v = corners @ right, corners @ down
    pixel = max(min(fixed_grid.spacing), (max(np.ptp(u), np.ptp(v)) + min(fixed_grid.spacing)) / _MAX_DISPLAY_PIXELS)
    counts = [int(math.floor(np.ptp(c) / pixel + 1e-6)) + 1 for c in (u, v)]
    start = [(c.min() + c.max()) / 2.0 - (n - 1) * pixel / 2.0 for c, n in zip((u, v), counts)]
    origin = start[0] * right + start[1] * down + float(point @ normal) * normal
    grid = Grid.create((1, counts[1], counts[0]), (pixel, pixel, 1.0), origin,
                       np.column_stack((right, down, normal)))
    axis = int(np.argmax(np.abs(normal)))
    position = f"{'xyz'[axis]} = {point[axis]:+.0f} mm LPS"
    return _View(name, grid, right, down, pixel, position)


def _choose_views(fixed: Image) -> list[_View]:
    """Axial + coronal through the body centre, or two axial views at 1/3 and 2/3 of the body's
    superior extent when the image has few slices or is a thin slab."""
    grid = fixed.grid
    centre, extent = _body_centre_index(fixed)
    superior = _superior_dim(grid)
    # Screen right = +x (patient left) so the patient's right is on the image's left.
    axial_axes = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))      # down = posterior: anterior at the top
    coronal_axes = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))   # down = inferior: superior at the top
    corners = grid.corners_world()
    thin = np.ptp(corners[:, 2]) < THIN_SLAB_RATIO * max(np.ptp(corners[:, 0]), np.ptp(corners[:, 1]))
    if grid.shape[superior] >= FEW_SLICES and not thin:
        point = _index_to_world(grid, centre)
        return [_plane_view("Axial", grid, point, *axial_axes),
                _plane_view("Coronal", grid, point, *coronal_axes)]
    low, high = extent if extent is not None else (0.0, grid.shape[superior] - 1.0)
    points = []
    for fraction in (1.0 / 3.0, 2.0 / 3.0):
        index = centre.copy()
        index[superior] = low + fraction * (high - low)
        points.append(_index_to_world(grid, index))
    # The more superior slice goes on top, whichever way the superior array axis runs.
    points.sort(key=lambda point: -point[2])
    return [_plane_view(name, grid, point, *axial_axes)
            for name, point in zip(("Axial, upper third", "Axial, lower third"), points)]


def _inside_mask(grid: Grid, view: _View) -> np.ndarray:
    """True where a display pixel lies within ``grid``'s field of view."""
    rows, columns = view.shape
    jj, ii = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    index = np.stack((ii, jj, np.zeros_like(ii)), axis=-1).astype(float)
    matrix = view.grid.index_to_world()
    return _inside(grid, index @ matrix[:3, :3].T + matrix[:3, 3])


def _fields_overlap(fixed: Grid, moving: Grid) -> bool:
    """Whether the two fields of view share any physical point, tested on lattices of up to 25^3
    points spanning each field of view (so it can only miss a sliver-thin overlap)."""
    return bool(_inside(moving, _lattice(fixed)).any() or _inside(fixed, _lattice(moving)).any())


def _lattice(grid: Grid, count: int = 25) -> np.ndarray:
    """LPS points ``(N, 3)`` of a regular lattice spanning ``grid``'s field of view, edges included."""
    samples = [np.linspace(-0.5, n - 0.5, min(n + 1, count)) for n in grid.size_ijk]
    index = np.stack(np.meshgrid(*samples, indexing="ij"), axis=-1).reshape(-1, 3)
    matrix = grid.index_to_world()
    return index @ matrix[:3, :3].T + matrix[:3, 3]


def _inside(grid: Grid, points: np.ndarray) -> np.ndarray:
    """True for LPS points ``(..., 3)`` within half a voxel of ``grid``'s outer voxel centres."""
    matrix = grid.world_to_index()
    index = points @ matrix[:3, :3].T + matrix[:3, 3]
    last = np.array(grid.size_ijk, dtype=float) - 1
    tolerance = 1e-6
    return ((index >= -0.5 - tolerance) & (index <= last + 0.5 + tolerance)).all(axis=-1)


def _resample_plane(image: Image, view: _View, interpolation: str = "linear", fill: float = -1024.0) -> np.ndarray:
    return resample_image(image, view.grid, None, interpolation, fill).data[0].cpu().numpy()


# --------------------------------------------------------------------------------- drawing
def _window(hu: np.ndarray) -> np.ndarray:
    low, high = WINDOW_HU
    return np.clip((hu - low) / (high - low), 0.0, 1.0)


def _overlay(fixed_hu: np.ndarray, other_hu: np.ndarray) -> np.ndarray:
    """RGB: fixed in red + blue (magenta), the other image in green; aligned tissue looks grey."""
    f, m = _window(fixed_hu), _window(other_hu)
    return np.stack((f, m, f), axis=-1)


def _orientation_letters(ax, view: _View) -> None:
    style = dict(transform=ax.transAxes, color="white", fontsize=9, fontweight="bold")
    ax.text(0.01, 0.5, view.letter(-view.right), ha="left", va="center", **style)
    ax.text(0.99, 0.5, view.letter(view.right), ha="right", va="center", **style)
    ax.text(0.5, 0.99, view.letter(-view.down), ha="center", va="top", **style)
    ax.text(0.5, 0.01, view.letter(view.down), ha="center", va="bottom", **style)


def _draw_labels(ax, view: _View, fixed_labels: Image, warped_labels: Image, columns, rows, line_class,
                 names: dict[int, str]) -> list:
    """Outlines the largest labels of this slice: fixed solid, warped dashed. Returns legend handles."""
    fixed_plane = np.rint(_resample_plane(fixed_labels, view, "nearest", 0.0)).astype(np.int64)
    warped_plane = np.rint(_resample_plane(warped_labels, view, "nearest", 0.0)).astype(np.int64)
    values, counts = np.unique(fixed_plane[fixed_plane > 0], return_counts=True)
    chosen = values[np.argsort(-counts)][:_MAX_LABELS]
    handles = []
    for value in sorted(chosen.tolist()):
        colour = _LABEL_COLOURS[value % len(_LABEL_COLOURS)]  # a label keeps its colour in both rows
        for plane, style in ((fixed_plane, "solid"), (warped_plane, "dashed")):
            mask = (plane == value).astype(float)
            if 0 < mask.sum() < mask.size:
                ax.contour(columns, rows, mask, levels=[0.5], colors=[colour], linewidths=0.9, linestyles=style)
        handles.append(line_class([], [], color=colour, lw=1.2, label=names.get(value, f"label {value}")))
    return handles


def _line_interval(span_mm: float) -> float:
    """A round spacing (1, 2, 2.5 or 5 x 10^n mm) giving about 20 grid lines across ``span_mm``."""
    candidates = [m * 10.0 ** e for e in range(-1, 4) for m in (1.0, 2.0, 2.5, 5.0)]
    return min(candidates, key=lambda c: abs(math.log(span_mm / c / 20.0)))


def _jacobian_percentiles(jacobian: torch.Tensor, max_values: int = 2_000_000) -> tuple[float, float]:
    """1st and 99th percentiles of the finite determinants (of an even subsample of large maps)."""
    values = jacobian.reshape(-1)
    values = values[::max(1, values.numel() // max_values)].cpu().numpy()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 1.0, 1.0
    return float(np.percentile(values, 1)), float(np.percentile(values, 99))


def _summary_numbers(displacement: torch.Tensor, jacobian: torch.Tensor, body: Image | None) -> dict:
    """|u| mean and max (mm), J min and max over the fixed grid, and % J <= 0 inside ``body`` (the
    whole grid without one) computed as summary.json's (:func:`jacobian_statistics`)."""
    region = None if body is None else body.data.to(jacobian.device) > 0
    squared = displacement[0] * displacement[0]  # (norm(dim=0) is slow on large CPU fields)
    squared.addcmul_(displacement[1], displacement[1]).addcmul_(displacement[2], displacement[2])
    magnitude = squared.sqrt_()
    return {
        "mean_mm": float(magnitude.mean(dtype=torch.float64)),
        "max_mm": float(magnitude.max()),
        "jac_min": float(jacobian.min()),
        "jac_max": float(jacobian.max()),
        "folded_percent": jacobian_statistics(jacobian, region).percent_nonpositive,
        "folded_region": "of the fixed grid" if body is None else "in the body",
    }


def _percent(value: float) -> str:
    """A percentage that never prints a non-zero value as 0."""
    if value == 0 or value >= 0.01:
        return f"{value:.2f} %"
    return "< 0.01 %"


def _describe(grid: Grid) -> str:
    size = "\u00d7".join(map(str, grid.size_ijk))
    spacing = "\u00d7".join(f"{s:.3g}" for s in grid.spacing)
    return f"{size} @ {spacing} mm"
