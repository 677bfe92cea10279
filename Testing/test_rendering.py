"""Pictures of what a user sees after Apply, rendered offscreen by real Slicer slice views.

``trame-slicer`` provides Slicer's slice views (MRML displayable managers, VTK offscreen rendering
through EGL or OSMesa) without the Slicer application. The result of a real registration
(:class:`NodeRegistration` and a worker process) is shown with :func:`mrml.show_results`, exactly as
the module does after Apply, and rendered: fixed/moving overlay before and after, the deformed grid,
the Jacobian map and the warped segmentation. The tests check the pictures are not blank and
differ where they should (after registration the overlay is closer to the fixed image alone).

``python Testing/test_rendering.py`` renders the same pictures for the bundled inter-patient pair
(patient C abdomen fixed, patient A moving, mode SAME at its defaults) into ``Resources/Screenshots/`` (README and
catalogue screenshots).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sample_cases import FAST_OPTIONS, LABEL_NAMES, REPO, tiny_pair  # noqa: E402

from SAMERegistrationLib import mrml  # noqa: E402
from SAMERegistrationLib.image import Image  # noqa: E402

SIZE = (480, 400)
TEST_REQUEST = {"mode": "same", "device": "cpu", "options": {**FAST_OPTIONS, "spacing": 8.0}, "refine_iterations": 5}
"""The pictures show the default mode, SAME (its SAM-VoxelMorph stage works on a 2 mm grid whatever
the spacing; 5 refinement iterations instead of 50 keep the test to seconds)."""
SEGMENT_COLORS = {"bone": (0.95, 0.90, 0.75), "soft tissue": (0.85, 0.35, 0.30)}


@dataclass
class Pictures:
    """RGB arrays (H, W, 3) uint8 of each rendered view."""

    fixed: np.ndarray
    before: np.ndarray
    after: np.ndarray
    grid: np.ndarray
    jacobian: np.ndarray
    segmentation: np.ndarray
    summary: dict
    seconds: float


class Renderer:
    """One offscreen axial slice view of a trame-slicer application."""

    def __init__(self) -> None:
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

        self.app = SlicerApp()
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.view = self.app.view_manager.create_view(ViewLayoutDefinition.axial_view())
        self.scene = self.app.scene
        self.fitted = False

    def layers(self, background, foreground=None, opacity: float = 0.5) -> None:
        composite = self.view._logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(opacity if foreground is not None else 0.0)

    def render(self, path: Path | None = None) -> np.ndarray:
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        window = self.view.render_window()
        window.SetSize(*SIZE)
        if not self.fitted:  # the first picture sets the field of view of all of them
            self.view.fit_view_to_content()
            self.fitted = True
        self.view.render()
        grabber = vtk.vtkWindowToImageFilter()
        grabber.SetInput(window)
        grabber.ReadFrontBufferOff()
        grabber.Update()
        if path is not None:
            writer = vtk.vtkPNGWriter()
            writer.SetFileName(str(path))
            writer.SetInputConnection(grabber.GetOutputPort())
            writer.Write()
        image = grabber.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
        return np.ascontiguousarray(pixels)


def add_volume(scene, image: Image, name: str, window_level=(400.0, 40.0)):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    mrml.image_to_volume(image, node)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(*window_level)
    return node


def add_segmentation(scene, labels: Image, names: dict[int, str], colors: dict[str, tuple], name: str):
    import slicer

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    mrml.image_to_volume(labels, labelmap, np.uint16)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
    scene.RemoveNode(labelmap)
    segmentation = node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segment.SetName(names[segment.GetLabelValue()])
        if segment.GetName() in colors:
            segment.SetColor(*colors[segment.GetName()])
    node.CreateDefaultDisplayNodes()
    return node


def render_registration(fixed: Image, moving: Image, fixed_labels: Image | None, moving_labels: Image,
                        names: dict[int, str], colors: dict[str, tuple], request: dict,
                        folder: Path | None = None, grid_spacing_mm: float = 16.0, timeout_s: float = 600.0) -> Pictures:
    """Registers with the real node logic, shows the result like the module, renders the pictures."""
    import time

    renderer = Renderer()
    scene = renderer.scene
    fixed_node, moving_node = add_volume(scene, fixed, "fixed"), add_volume(scene, moving, "moving")
    moving_segments = add_segmentation(scene, moving_labels, names, colors, "moving segments")
    moving_segments.GetDisplayNode().SetVisibility(False)  # the picture shows the warped segments only
    fixed_segments = None
    if fixed_labels is not None:
        fixed_segments = add_segmentation(scene, fixed_labels, names, colors, "fixed segments")
        fixed_segments.GetDisplayNode().SetVisibility(False)
    start = time.perf_counter()
    run = mrml.NodeRegistration(mrml.RegistrationInputs(fixed_node, moving_node, fixed_segments, moving_segments),
                                mrml.RegistrationOutputs(), request).start()
    result = run.wait(timeout=timeout_s)
    seconds = time.perf_counter() - start
    result.warped_segmentation.GetDisplayNode().SetVisibility(False)

    def shot(name: str) -> np.ndarray:
        return renderer.render(None if folder is None else folder / f"{name}.png")

    mrml.show_results(scene, fixed_node, result.warped, result.transform, overlay=True, grid=False)
    after = shot("overlay_after")
    renderer.layers(fixed_node)
    fixed_only = shot("fixed")
    renderer.layers(fixed_node, moving_node)
    before = shot("overlay_before")
    mrml.show_results(scene, fixed_node, None, result.transform, overlay=True, grid=True,
                      grid_spacing_mm=grid_spacing_mm)
    grid = shot("deformed_grid")
    result.transform.GetDisplayNode().SetVisibility(False)
    mrml.show_results(scene, fixed_node, overlay=True, grid=False, jacobian=result.jacobian)
    jacobian = shot("jacobian")
    renderer.layers(fixed_node)
    result.warped_segmentation.GetDisplayNode().SetVisibility(True)
    segmentation = shot("warped_segmentation")
    return Pictures(fixed_only, before, after, grid, jacobian, segmentation, run.summary, seconds)


# ----------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Pictures:
    data = tiny_pair()
    folder = tmp_path_factory.mktemp("pictures")
    return render_registration(data.fixed, data.moving, data.fixed_labels, data.moving_labels, LABEL_NAMES,
                               SEGMENT_COLORS, TEST_REQUEST, folder)


def lit_fraction(picture: np.ndarray) -> float:
    return float((picture.max(axis=-1) > 20).mean())


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_every_picture_shows_an_image(pictures):
    for name in ("fixed", "before", "after", "grid", "jacobian", "segmentation"):
        picture = getattr(pictures, name)
        assert picture.shape == (SIZE[1], SIZE[0], 3), name
        assert lit_fraction(picture) > 0.3, f"{name} is mostly black"
        assert float(picture.std()) > 15.0, f"{name} has no contrast"


def test_registered_overlay_is_closer_to_the_fixed_image_than_before(pictures):
    """The overlay is fixed/2 + moving/2: the closer the moving layer to the fixed one, the closer the
    overlay to the fixed image alone."""
    before, after = difference(pictures.before, pictures.fixed), difference(pictures.after, pictures.fixed)
    fixed = pictures.fixed.astype(float).ravel()
    correlation = {name: float(np.corrcoef(getattr(pictures, name).astype(float).ravel(), fixed)[0, 1])
                   for name in ("before", "after")}
    print(f"\nmean |overlay - fixed alone| per pixel: {before:.1f} before, {after:.1f} after registration; "
          f"correlation with the fixed picture {correlation['before']:.3f} -> {correlation['after']:.3f} "
          f"({pictures.seconds:.1f} s)")
    assert after < 0.65 * before
    assert correlation["after"] > 0.95 > correlation["before"]


def red_pixels(picture: np.ndarray) -> np.ndarray:
    rgb = picture.astype(int)
    return (rgb[..., 0] > rgb[..., 1] + 60) & (rgb[..., 0] > rgb[..., 2] + 60)


def test_deformed_grid_is_drawn_over_the_fixed_image(pictures):
    grid_lines = red_pixels(pictures.grid) & ~red_pixels(pictures.fixed)
    print(f"\ngrid line pixels: {grid_lines.mean() * 100:.1f} %")
    assert grid_lines.mean() > 0.02
    unchanged = np.all(pictures.grid == pictures.fixed, axis=-1)
    assert unchanged.mean() > 0.5  # the grid is drawn over the image, which stays visible


def test_jacobian_picture_shows_compression_and_expansion_over_the_fixed_body_only(pictures):
    """The map is drawn over the fixed volume inside the body; outside it the fixed volume shows as is."""
    rgb = pictures.jacobian.astype(int)
    coloured = np.abs(rgb - pictures.fixed.astype(int)).max(axis=-1) > 3
    # (the tiny slab's body mask is its dense tissue; J stays near 1, light over grey at 60 % opacity)
    blue = (rgb[..., 2] > rgb[..., 0] + 8) & coloured
    red = (rgb[..., 0] > rgb[..., 2] + 8) & coloured
    print(f"\nJacobian picture: {blue.sum()} blue (J < 1), {red.sum()} red (J > 1) pixels; "
          f"{coloured.mean() * 100:.0f} % of the view coloured")
    assert blue.sum() > 100 and red.sum() > 100
    assert 0.1 < coloured.mean() < 0.9  # over the body, not over the whole view
    jacobian = pictures.summary["jacobian"]
    assert jacobian["min_jacobian"] < 0.9 and jacobian["max_jacobian"] > 1.1


def test_warped_segmentation_is_drawn_in_its_segment_colours(pictures):
    changed = np.any(pictures.segmentation != pictures.fixed, axis=-1)
    assert changed.mean() > 0.05
    counts = {}
    for name, color in SEGMENT_COLORS.items():
        target = np.array(color) * 255
        counts[name] = int((np.abs(pictures.segmentation.astype(float) - target).max(axis=-1) < 12).sum())
    print(f"\noutline pixels in the segment colours: {counts}")
    assert min(counts.values()) > 50


# ----------------------------------------------------------------------------------- screenshots
def make_screenshots(folder: Path = REPO / "Resources" / "Screenshots") -> None:
    """The bundled inter-patient pair in the default mode (SAME, default options): README and
    catalogue screenshots."""
    from SAMERegistrationLib.io import read_image

    samples = REPO / "Resources" / "SampleData"
    names = {int(k): v for k, v in json.loads((samples / "label_names.json").read_text()).items()}
    fixed = read_image(samples / "patientC_abdomen_ct.nii.gz")
    moving = read_image(samples / "patientA_abdomen_ct.nii.gz")

    def labels(name: str) -> Image:
        return Image.from_sitk(sitk.ReadImage(str(samples / name)), dtype=torch.int64)

    folder.mkdir(parents=True, exist_ok=True)
    pictures = render_registration(fixed, moving, labels("patientC_abdomen_labels.nii.gz"),
                                   labels("patientA_abdomen_labels.nii.gz"), names, {},
                                   {"mode": "same", "device": "cpu", "options": {"threads": 1}}, folder,
                                   grid_spacing_mm=12.0, timeout_s=3600.0)
    # the two patients' scans are ~900 mm apart: the overlay before registration shows no moving image
    for name in ("fixed.png", "overlay_before.png"):
        (folder / name).unlink(missing_ok=True)
    print(f"registered in {pictures.seconds:.1f} s; Dice {pictures.summary['dice']['mean_before_registration']:.3f}"
          f" -> {pictures.summary['dice']['mean']:.3f}; pictures in {folder}")


if __name__ == "__main__":
    make_screenshots()
