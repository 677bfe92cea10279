"""The registration overview PNG: readable, never blank, and oriented from physical space only."""

import ast
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.image import Image
from SAMERegistrationLib.outputs import jacobian_summary
from SAMERegistrationLib.overview import render_overview
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.jacobian import jacobian_determinant
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.warp import resample_image

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CT_PATH = REPO / "Resources" / "SampleData" / "patientA_torso_ct.nii.gz"
SHIFT_MM = (12.0, -8.0, 15.0)


# --------------------------------------------------------------------------------- helpers
def translation(shift) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    return matrix


def folding_field(grid, shift=SHIFT_MM) -> torch.Tensor:
    """A translation plus a strong local contraction 30 mm left of the centre (folds its core)."""
    points = grid.world_points()
    offset = points - torch.tensor(grid.centre_world() + np.array([30.0, 0.0, 0.0]), dtype=torch.float32)
    bump = torch.exp(-(offset ** 2).sum(-1) / (2 * 22.0 ** 2))
    field = -3.0 * offset * bump[..., None] + torch.tensor(shift, dtype=torch.float32)
    return torch.movedim(field, -1, 0).contiguous()


def cells(png: np.ndarray, rows=2, columns=4, keep=0.7) -> dict:
    """The central ``keep`` fraction of each cell of a rows x columns split of the picture."""
    height, width = png.shape[:2]
    out = {}
    for r in range(rows):
        for c in range(columns):
            y0, y1 = r * height / rows, (r + 1) * height / rows
            x0, x1 = c * width / columns, (c + 1) * width / columns
            my, mx = (1 - keep) / 2 * (y1 - y0), (1 - keep) / 2 * (x1 - x0)
            out[r, c] = png[int(y0 + my):int(y1 - my), int(x0 + mx):int(x1 - mx), :3]
    return out


def colourfulness(panel: np.ndarray) -> float:
    """Mean |R - G|: zero for grey (fixed and moving agree), large where magenta/green separate."""
    return float(np.abs(panel[..., 0] - panel[..., 1]).mean())


def relayout(image: sitk.Image) -> sitk.Image:
    """Same physical content, different array layout: every axis flipped, then axes permuted."""
    return sitk.PermuteAxes(sitk.Flip(image, [True, True, True]), [2, 0, 1])


def relayout_field(field: torch.Tensor, grid) -> torch.Tensor:
    """A (3, D, H, W) LPS field moved onto the relayout grid (vectors unchanged: they are physical)."""
    components = []
    for component in field:
        moved = relayout(Image(component, grid).to_sitk())
        components.append(torch.from_numpy(sitk.GetArrayFromImage(moved).copy()))
    return torch.stack(components)


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fixed() -> Image:
    ct = Image.from_sitk(sitk.ReadImage(str(CT_PATH)))
    return resample_image(ct, ct.grid.with_spacing(6.0), fill=-1024.0)


@pytest.fixture(scope="module")
def case(fixed):
    """A moving image shifted by SHIFT_MM and a result with a folded region."""
    # moving(x) = fixed(x - shift), so phi(x) = x + shift maps the fixed image onto the moving one.
    moving = resample_image(fixed, fixed.grid, SpatialTransform.from_affine(np.linalg.inv(translation(SHIFT_MM))),
                            fill=-1024.0)
    displacement = folding_field(fixed.grid)
    jacobian = jacobian_determinant(displacement, fixed.grid)
    warped = resample_image(moving, fixed.grid, SpatialTransform(np.eye(4), displacement, fixed.grid), fill=-1024.0)
    return moving, warped, displacement, jacobian


@pytest.fixture(scope="module")
def misregistered_png(case, fixed, tmp_path_factory):
    moving, warped, displacement, jacobian = case
    path = tmp_path_factory.mktemp("overview") / "misregistered.png"
    render_overview(path, fixed, moving, warped, displacement, jacobian, title="misregistered pair, folded result")
    return path


@pytest.fixture(scope="module")
def perfect_png(case, fixed, tmp_path_factory):
    """A perfectly registered pair: warped == fixed, while moving is still shifted."""
    return render_identity(tmp_path_factory.mktemp("overview") / "perfect.png", fixed, moving=case[0])


def render_identity(path, image: Image, moving: Image | None = None) -> np.ndarray:
    """Renders ``image`` against itself (or ``moving``) with a zero field, and loads the PNG."""
    zero = torch.zeros((3, *image.grid.shape))
    render_overview(path, image, moving if moving is not None else image, image, zero,
                    torch.ones(image.grid.shape), title="identity")
    return imread(str(path))


# --------------------------------------------------------------------------------- tests
def test_overview_png_is_readable_and_no_panel_is_blank(misregistered_png, case):
    jacobian = case[3]
    assert (jacobian <= 0).any(), "the test field must fold somewhere"
    assert misregistered_png.exists()
    assert misregistered_png.stat().st_size < 1.5e6
    png = imread(str(misregistered_png))
    height, width = png.shape[:2]
    assert 600 <= height <= 900 and 1300 <= width <= 1700, png.shape
    assert width > 1.6 * height
    for (row, column), panel in cells(png).items():
        assert panel.std() > 0.05, f"panel row {row} column {column} looks blank (std {panel.std():.3f})"
    # The Jacobian panels use a colour map: red or blue pixels are present.
    for row in range(2):
        jac_panel = cells(png)[row, 3]
        assert (np.abs(jac_panel[..., 0] - jac_panel[..., 2]) > 0.3).mean() > 0.002


def test_after_panel_of_perfect_pair_differs_from_before_panel_of_misregistered_pair(
        misregistered_png, perfect_png):
    before = cells(imread(str(misregistered_png)))[0, 0]
    perfect = perfect_png
    after = cells(perfect)[0, 1]
    assert colourfulness(after) < 0.01, "a perfectly registered pair must look grey"
    assert colourfulness(before) > 3 * colourfulness(after) + 0.02
    assert np.abs(before - after).mean() > 0.02
    # The "before" panel of the perfect-pair render still shows the shifted moving image.
    assert colourfulness(cells(perfect)[0, 0]) > 0.02


def test_no_physical_overlap_is_flagged(fixed, perfect_png, tmp_path):
    grid = fixed.grid
    far = Image(fixed.data, Grid.create(grid.shape, grid.spacing, np.array(grid.origin) + 5000.0, grid.direction))
    png = render_identity(tmp_path / "far.png", fixed, moving=far)
    before = cells(png)[0, 0]
    reddish = (before[..., 0] - before[..., 2] > 0.3).mean()
    assert reddish > 0.01, "the 'no physical overlap' notice (red box) is missing"
    overlapping = cells(perfect_png)[0, 0]
    assert (overlapping[..., 0] - overlapping[..., 2] > 0.3).mean() < 0.001


def test_display_orientation_comes_from_physical_space(fixed, case, misregistered_png, tmp_path):
    """Copies with flipped and permuted array axes (same physical content, direction no longer the
    identity, superior axis now array axis W) render the same picture; a physically mirrored copy
    does not."""
    moving, warped, displacement, _ = case
    fixed2, moving2, warped2 = (Image.from_sitk(relayout(image.to_sitk())) for image in (fixed, moving, warped))
    assert fixed2.grid.direction_matrix[2, 0] == -1.0 and fixed2.grid.shape != fixed.grid.shape
    displacement2 = relayout_field(displacement, fixed.grid)
    jacobian2 = jacobian_determinant(displacement2, fixed2.grid)
    render_overview(tmp_path / "relayout.png", fixed2, moving2, warped2, displacement2, jacobian2,
                    title="misregistered pair, folded result")
    plain, other = cells(imread(str(misregistered_png))), cells(imread(str(tmp_path / "relayout.png")))
    for row in range(2):
        for column in range(4):
            difference = np.abs(plain[row, column] - other[row, column]).mean()
            assert difference < 0.01, f"panel row {row} column {column} differs by {difference:.3f}"

    # The same comparison detects a left-right mirror, so the check above is not vacuous.
    fixed3, moving3, warped3 = (Image(torch.flip(image.data, dims=(2,)), image.grid)  # W runs along +x
                                for image in (fixed, moving, warped))
    render_overview(tmp_path / "mirrored.png", fixed3, moving3, warped3, displacement, case[3])
    mirror = cells(imread(str(tmp_path / "mirrored.png")))
    for column in range(2):
        difference = np.abs(plain[0, column] - mirror[0, column]).mean()
        assert difference > 0.03, f"a mirrored copy should look different ({difference:.3f})"


def test_anterior_is_up_and_patient_right_is_on_the_left(fixed, tmp_path):
    """Markers at known LPS positions, present only in the moving image, show up pure green in the
    "before" panels where a radiologist expects them."""
    points = fixed.grid.world_points()
    centre = points[fixed.data > -500].mean(dim=0)
    x, y, z = (points[..., a] - centre[a] for a in range(3))
    left_anterior = ((x - 60).abs() < 7) & ((y + 50).abs() < 7)      # a rod along z: seen axially
    left_superior = ((x - 60).abs() < 7) & ((z - 60).abs() < 7)      # a rod along y: seen coronally
    markers = left_anterior | left_superior
    marked_fixed = Image(torch.where(markers, -1000.0, fixed.data), fixed.grid)
    marked_moving = Image(torch.where(markers, 1500.0, fixed.data), fixed.grid)
    zero = torch.zeros((3, *fixed.grid.shape))
    render_overview(tmp_path / "markers.png", marked_fixed, marked_moving, marked_fixed, zero,
                    torch.ones(fixed.grid.shape))
    png = imread(str(tmp_path / "markers.png"))[..., :3]
    height, width = png.shape[:2]
    for row, expected in ((0, "anterior (top) and patient left (right)"),
                          (1, "superior (top) and patient left (right)")):
        cell = png[row * height // 2:(row + 1) * height // 2, :width // 4]
        image_part = (cell < 0.95).any(axis=-1)
        rows = np.nonzero(image_part.mean(axis=1) > 0.5)[0]
        columns = np.nonzero(image_part.mean(axis=0) > 0.5)[0]
        green = (cell[..., 1] > 0.8) & (cell[..., 0] < 0.2) & (cell[..., 2] < 0.2)
        assert green.sum() > 10, f"row {row}: the marker is not visible"
        gy, gx = np.nonzero(green)
        fraction_down = (gy.mean() - rows[0]) / (rows[-1] - rows[0])
        fraction_right = (gx.mean() - columns[0]) / (columns[-1] - columns[0])
        assert fraction_down < 0.45 and fraction_right > 0.55, (
            f"row {row}: marker at {fraction_right:.2f} across, {fraction_down:.2f} down; expected {expected}")


def test_label_outlines_are_drawn_on_the_after_panel(fixed, tmp_path):
    """With labels, the (otherwise grey) after panel of a perfect pair gets coloured outlines."""
    labels = Image((fixed.data > 200).long() + 2 * ((fixed.data > 20) & (fixed.data < 80)).long(), fixed.grid)
    zero = torch.zeros((3, *fixed.grid.shape))
    render_overview(tmp_path / "labels.png", fixed, fixed, fixed, zero, torch.ones(fixed.grid.shape),
                    fixed_labels=labels, warped_labels=labels)
    after = cells(imread(str(tmp_path / "labels.png")))[0, 1]
    assert colourfulness(after) > 0.005


def test_label_names_name_the_legend_entries(fixed, tmp_path):
    labels = Image((fixed.data > 200).long() + 2 * ((fixed.data > 20) & (fixed.data < 80)).long(), fixed.grid)
    zero = torch.zeros((3, *fixed.grid.shape))
    texts = render_overview(tmp_path / "named.png", fixed, fixed, fixed, zero, torch.ones(fixed.grid.shape),
                            fixed_labels=labels, warped_labels=labels, label_names={1: "bone"})
    assert "bone" in texts and "label 2" in texts  # label 2 has no name
    assert "label 1" not in texts


def test_one_folding_figure_computed_in_the_body(case, fixed, tmp_path):
    """The figure gives % J <= 0 once, over the body as summary.json does (jacobian_summary)."""
    moving, warped, displacement, jacobian = case
    body = Image((fixed.data > -500).long(), fixed.grid)
    # a body that excludes part of the fold, so that the body figure differs from the whole-grid one
    body.data[:, :, : fixed.grid.shape[2] // 2 + 2] = 0
    texts = render_overview(tmp_path / "folds.png", fixed, moving, warped, displacement, jacobian, body=body)
    figures = [text for text in texts if "\u2264 0:" in text]
    assert len(figures) == 1, texts
    in_body = jacobian_summary(jacobian, body)["percent_nonpositive"]
    whole = float((jacobian <= 0).double().mean() * 100)
    assert in_body > 0.01 and abs(in_body - whole) > 0.01
    assert f"J \u2264 0: {in_body:.2f} % in the body" in figures[0]


def test_few_slices_give_two_axial_rows(fixed, tmp_path):
    grid = fixed.grid
    origin = np.array(grid.origin) + grid.direction_matrix[:, 2] * 20 * grid.spacing[2]
    thin = Image(fixed.data[20:30].clone(), Grid.create((10, *grid.shape[1:]), grid.spacing, origin, grid.direction))
    panels = cells(render_identity(tmp_path / "thin.png", thin))
    for key, panel in panels.items():
        assert panel.std() > 0.05, f"panel {key} looks blank"
    for row in range(2):
        # An axial panel fills its cell; a coronal view of a 60 mm slab would be a sliver on white.
        white = (panels[row, 0] > 0.98).all(axis=-1).mean()
        assert white < 0.2, f"row {row} does not look like an axial view ({white:.0%} white)"
    assert np.abs(panels[0, 0] - panels[1, 0]).mean() > 0.01, "the two axial slices should differ"


def test_rejects_inconsistent_shapes(fixed):
    zero = torch.zeros((3, *fixed.grid.shape))
    with pytest.raises(ValueError, match="displacement"):
        render_overview("unused.png", fixed, fixed, fixed, zero[:2], torch.ones(fixed.grid.shape))
    with pytest.raises(ValueError, match="jacobian"):
        render_overview("unused.png", fixed, fixed, fixed, zero, torch.ones(fixed.grid.shape[1:]))


def test_matplotlib_is_imported_only_inside_the_function():
    tree = ast.parse((REPO / "SAMERegistrationLib" / "overview.py").read_text())
    for node in tree.body:  # module-level statements only
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not any(name.startswith("matplotlib") for name in names), ast.dump(node)
