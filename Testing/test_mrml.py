"""The MRML bridge (``SAMERegistrationLib.mrml``) with real Slicer nodes from pip ``slicer-core``.

Geometry round trips are checked against Slicer's own file writers and readers (which do their own
RAS<->LPS conversion), so a sign error in the bridge cannot cancel out. One registration of the tiny
torso pair (8 mm, about 6 s) through :class:`NodeRegistration` and a worker process is shared by the
output tests.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer  # pip slicer-core (test extra, installed by scripts/setup_env.sh)
import torch

from sample_cases import FAST_MODE, FAST_OPTIONS, LABEL_NAMES, tiny_pair

from SAMERegistrationLib import mrml
from SAMERegistrationLib.export import read_initial_transform, write_affine
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.metrics import dice_per_label
from SAMERegistrationLib.preprocess import body_mask, looks_like_ct
from SAMERegistrationLib.outputs import DISPLACEMENT_FILE, JACOBIAN_FILE, TRANSFORM_FILE, WARPED_LABELS_FILE
from SAMERegistrationLib.spatial.grid import Grid
from SAMERegistrationLib.spatial.warp import resample_image
from SAMERegistrationLib.worker import EXIT_CANCELLED

COLORS = {"bone": (0.95, 0.90, 0.75), "soft tissue": (0.85, 0.35, 0.30)}


# ----------------------------------------------------------------------------------- helpers
def new_scene():
    """A scene with Slicer's default colour tables, as in the application."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    return scene


def add_volume(scene, image: Image, name: str, class_name="vtkMRMLScalarVolumeNode", dtype=np.float32):
    node = scene.AddNewNodeByClass(class_name, name)
    mrml.image_to_volume(image, node, dtype)
    node.CreateDefaultDisplayNodes()
    return node


def node_image(node) -> Image:
    """A float32 library Image of a volume node's voxels (via the bridge's numpy copy)."""
    volume = mrml.volume_array(node)
    return Image(torch.from_numpy(volume.array.astype(np.float32)), volume.grid)


def add_segmentation(scene, labels: Image, reference, name: str):
    """A segmentation node with one named, coloured segment per label value (via Slicer's importer)."""
    labelmap = add_volume(scene, labels, f"{name} labels", "vtkMRMLLabelMapVolumeNode", np.uint8)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
    scene.RemoveNode(labelmap)
    segmentation = node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segment.SetName(LABEL_NAMES[segment.GetLabelValue()])
        segment.SetColor(*COLORS[segment.GetName()])
    node.CreateDefaultDisplayNodes()
    return node


def segment_mask(node, name: str, reference) -> np.ndarray:
    """Boolean [k, j, i] mask of the segment called ``name`` on ``reference``'s grid."""
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
           if segmentation.GetNthSegment(i).GetName() == name]
    assert len(ids) == 1, f"expected one segment {name!r}"
    labels, _ = mrml.segmentation_to_labels(node, reference, ids)
    return labels.numpy() > 0


def node_state(node) -> tuple:
    """What must not change in an input node: voxels/segments, geometry, parent transform."""
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        content = tuple((segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName(),
                         tuple(segmentation.GetNthSegment(i).GetColor())) for i in range(segmentation.GetNumberOfSegments()))
        return content, node.GetParentTransformNode()
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return (slicer.util.arrayFromVolume(node).tobytes(), tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)),
            node.GetParentTransformNode())


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "permuted-flipped": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique": rotation(0, 25.0) @ rotation(2, -40.0) @ np.diag([1.0, -1.0, 1.0]),
}


# ----------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("direction", DIRECTIONS, ids=list(DIRECTIONS))
def test_volume_round_trips_through_a_node_and_slicers_own_writer(direction, tmp_path):
    grid = Grid.create((5, 6, 7), (1.5, 2.0, 3.5), (-12.0, 40.0, 7.5), DIRECTIONS[direction])
    data = torch.arange(grid.num_voxels, dtype=torch.float32).reshape(grid.shape)
    scene = new_scene()
    node = add_volume(scene, Image(data, grid), "volume")

    back = mrml.volume_array(node)
    assert back.array.dtype == np.float32 and np.array_equal(back.array, data.numpy())
    assert back.grid.same_as(grid, tolerance_mm=1e-6)

    # Slicer's writer converts RAS to LPS itself: the file must match the library's own geometry.
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "volume.nrrd"))
    assert storage.WriteData(node)
    written = sitk.ReadImage(str(tmp_path / "volume.nrrd"))
    np.testing.assert_allclose(written.GetOrigin(), grid.origin, atol=1e-5)
    np.testing.assert_allclose(written.GetSpacing(), grid.spacing, atol=1e-6)
    np.testing.assert_allclose(np.reshape(written.GetDirection(), (3, 3)), grid.direction_matrix, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), data.numpy())

    # ... and a file written by the library loads into the same node geometry with Slicer's reader.
    sitk.WriteImage(Image(data, grid).to_sitk(), str(tmp_path / "library.nrrd"))
    loaded = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    reader = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    reader.SetFileName(str(tmp_path / "library.nrrd"))
    assert reader.ReadData(loaded)
    # Slicer's reader may store a left-handed grid with its k axis reversed: same voxels, same values.
    assert mrml.volume_grid(loaded).same_voxels_as(grid, tolerance_mm=1e-4)
    same_place = resample_image(node_image(loaded), grid, interpolation="nearest")
    assert torch.equal(same_place.data, data)


def test_voxel_position_in_ras_is_the_lps_position_with_x_and_y_negated():
    grid = Grid.create((4, 4, 4), (2.0, 3.0, 4.0), (10.0, 20.0, 30.0), DIRECTIONS["oblique"])
    node = add_volume(new_scene(), Image(torch.zeros(grid.shape), grid), "volume")
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    ras = ijk_to_ras.MultiplyPoint((1.0, 2.0, 3.0, 1.0))[:3]
    lps = grid.index_to_world() @ np.array([1.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-9)


def test_known_lps_translation_becomes_a_transform_node_that_maps_ras_points(tmp_path):
    translation = np.eye(4)
    translation[:3, 3] = (10.0, -5.0, 3.0)  # LPS mm: 10 mm to the patient's left, 5 anterior, 3 superior
    scene = new_scene()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    mrml.set_linear_transform(node, translation)
    # fixed RAS (0, 0, 0) -> moving LPS (10, -5, 3) = RAS (-10, 5, 3)
    np.testing.assert_allclose(mrml.map_points_ras(node, np.zeros((1, 3)))[0], (-10.0, 5.0, 3.0), atol=1e-9)
    np.testing.assert_allclose(mrml.map_points_ras(node, [[7.0, 8.0, 9.0]])[0], (-3.0, 13.0, 12.0), atol=1e-9)

    # A general affine: the node maps RAS points like the library maps LPS points.
    affine = np.eye(4)
    affine[:3, :3] = rotation(1, 12.0) @ np.diag([1.1, 0.9, 1.0])
    affine[:3, 3] = (4.0, -7.0, 2.5)
    mrml.set_linear_transform(node, affine)
    points = np.random.default_rng(0).uniform(-100, 100, size=(20, 3))
    expected = (points @ affine[:3, :3].T + affine[:3, 3])
    np.testing.assert_allclose(mrml.map_points_lps(node, points), expected, atol=1e-9)

    # Slicer's ITK writer and the library's reader agree on it (file in LPS, fixed -> moving).
    mrml.write_transform_node(node, tmp_path / "affine.tfm")
    np.testing.assert_allclose(read_initial_transform(tmp_path / "affine.tfm", Grid.create((2, 2, 2), (1, 1, 1))).affine,
                               affine, atol=1e-9)
    # ... and a file written by the library loads into Slicer mapping the same points.
    write_affine(affine, tmp_path / "library.tfm")
    loaded = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "library.tfm"))
    assert storage.ReadData(loaded)
    np.testing.assert_allclose(mrml.map_points_lps(loaded, points), expected, atol=1e-6)


def test_grid_transform_maps_points_like_the_library_field():
    grid = Grid.create((6, 7, 8), (3.0, 2.5, 4.0), (5.0, -20.0, 12.0), DIRECTIONS["oblique"])
    field = torch.stack(torch.meshgrid(*(torch.linspace(-2, 3, n) for n in grid.shape), indexing="ij"))
    field = torch.stack((field[0] * 1.5, -field[1], field[2] * field[0] * 0.3))
    node = new_scene().AddNewNodeByClass("vtkMRMLGridTransformNode")
    mrml.set_grid_transform(node, field, grid)
    points = grid.world_points(dtype=torch.float64).reshape(-1, 3).numpy()
    expected = points + torch.movedim(field, 0, -1).reshape(-1, 3).double().numpy()
    np.testing.assert_allclose(mrml.map_points_lps(node, points), expected, atol=1e-6)


def test_moving_volume_under_a_transform_gives_the_initial_transform(tmp_path):
    data = tiny_pair()
    scene = new_scene()
    fixed, moving = add_volume(scene, data.fixed, "fixed"), add_volume(scene, data.moving, "moving")
    hand = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual alignment")
    shift = np.eye(4)
    shift[:3, 3] = (-40.0, 20.0, -10.0)
    mrml.set_linear_transform(hand, shift)
    moving.SetAndObserveTransformNodeID(hand.GetID())
    prepared = mrml.write_inputs(mrml.RegistrationInputs(fixed, moving), tmp_path)
    assert "under 'manual alignment'" in prepared.notes[0]
    assert read_initial_transform(prepared.files["initial_transform"], data.fixed.grid).affine == pytest.approx(shift)
    moving.SetAndObserveTransformNodeID(None)
    fixed.SetAndObserveTransformNodeID(hand.GetID())
    with pytest.raises(ValueError, match="fixed volume 'fixed' is under the transform 'manual alignment'"):
        mrml.write_inputs(mrml.RegistrationInputs(fixed, moving), tmp_path)


# ----------------------------------------------------------------------------------- one real registration
@dataclass
class Registered:
    scene: object
    inputs: mrml.RegistrationInputs
    run: mrml.NodeRegistration
    outputs: mrml.RegistrationOutputs
    before: dict
    after: dict
    nodes_before: set
    seconds: float
    events: list


def scene_node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.fixture(scope="module")
def registered() -> Registered:
    data = tiny_pair()
    scene = new_scene()
    fixed, moving = add_volume(scene, data.fixed, "fixed CT"), add_volume(scene, data.moving, "moving CT")
    inputs = mrml.RegistrationInputs(fixed, moving, add_segmentation(scene, data.fixed_labels, fixed, "fixed segments"),
                                     add_segmentation(scene, data.moving_labels, moving, "moving segments"))
    nodes = {"fixed": fixed, "moving": moving, "fixed_seg": inputs.fixed_segmentation, "moving_seg": inputs.moving_segmentation}
    before = {k: node_state(n) for k, n in nodes.items()}
    nodes_before = scene_node_ids(scene)
    affine_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "affine part")
    events: list = []
    start = time.perf_counter()
    run = mrml.NodeRegistration(inputs, mrml.RegistrationOutputs(affine=affine_node),
                                {"mode": FAST_MODE, "device": "cpu", "options": FAST_OPTIONS}, keep_files=True).start()
    outputs = run.wait(timeout=300, on_event=events.append)
    seconds = time.perf_counter() - start
    result = Registered(scene, inputs, run, outputs, before, {k: node_state(n) for k, n in nodes.items()},
                        nodes_before | {affine_node.GetID()}, seconds, events)
    yield result
    import shutil

    shutil.rmtree(run.folder, ignore_errors=True)


def test_registration_of_nodes_completes_and_leaves_inputs_untouched(registered):
    assert registered.run.state == "completed", registered.run.error
    assert registered.after == registered.before, "an input node was modified"
    progress = [e["overall_fraction"] for e in registered.events if e["event"] == "progress"]
    assert progress and progress == sorted(progress) and progress[-1] == 1.0
    assert registered.events[-1] == {"event": "finished", "state": "completed", "error": None}
    # the output files are read on a background thread after the worker ended, then put into nodes
    kinds = [(e["event"], e.get("message")) for e in registered.events]
    assert kinds.index(("log", "reading the results")) == len(kinds) - 2
    assert registered.run._reader is not None and not registered.run._reader.is_alive()
    dice = registered.run.summary["dice"]
    assert dice["label_names"] == {"1": "bone", "2": "soft tissue"}  # the segment names
    print(f"\nnode registration {registered.seconds:.1f} s; mean Dice {dice['mean_before_registration']:.3f} -> "
          f"{dice['mean']:.3f}")
    assert dice["mean"] > dice["mean_before_registration"] + 0.3
    # only the outputs were added to the scene (and the Jacobian colour table)
    added = scene_node_ids(registered.scene) - registered.nodes_before
    outputs = registered.outputs
    expected = {n.GetID() for n in (outputs.transform, outputs.warped, outputs.jacobian, outputs.warped_segmentation)}
    owned_displays = {registered.scene.GetNodeByID(i).GetDisplayNodeID() for i in expected}
    leftovers = added - expected - owned_displays - {mrml.jacobian_color_node(registered.scene).GetID()}
    assert not leftovers, {i: registered.scene.GetNodeByID(i).GetName() for i in leftovers}


def test_grid_transform_saved_and_reloaded_equals_the_backends_field(registered, tmp_path):
    node = registered.outputs.transform
    assert node.IsA("vtkMRMLGridTransformNode")
    mrml.write_transform_node(node, tmp_path / "result.h5")
    reloaded = registered.scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = registered.scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "result.h5"))
    assert storage.ReadData(reloaded)
    written = sitk.ReadTransform(str(tmp_path / "result.h5"))
    assert written.GetName() == "DisplacementFieldTransform"  # a standard ITK displacement field

    outdir = registered.run.folder / "outputs"
    fixed = node_image(registered.inputs.fixed)
    points = fixed.grid.world_points(dtype=torch.float64).reshape(-1, 3).numpy()
    # the backend's own result file (affine after field, ITK composite) ...
    backend = sitk.ReadTransform(str(outdir / TRANSFORM_FILE))
    expected = np.array([backend.TransformPoint(tuple(p)) for p in points])
    # ... its displacement.nii.gz (phi(x) - x on the fixed grid) ...
    displacement = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / DISPLACEMENT_FILE))).reshape(-1, 3)
    np.testing.assert_allclose(points + displacement, expected, atol=1e-3)
    # ... and the reloaded grid node map every fixed voxel centre alike.
    reloaded_error = np.abs(mrml.map_points_lps(reloaded, points) - expected).max()
    node_error = np.abs(mrml.map_points_lps(node, points) - expected).max()
    itk_error = np.abs(np.array([written.TransformPoint(tuple(p)) for p in points]) - expected).max()
    print(f"\nmax |difference| to transform.h5 over {len(points)} voxels: node {node_error:.2e} mm, "
          f"reloaded {reloaded_error:.2e} mm, ITK read {itk_error:.2e} mm; "
          f"largest displacement {np.abs(expected - points).max():.1f} mm")
    assert node_error < 1e-3 and reloaded_error < 1e-3 and itk_error < 1e-3
    # between voxel centres too (trilinear interpolation of phi(x) - x on the working grid is exact)
    rng = np.random.default_rng(1)
    inner = points.min(0) + rng.uniform(0.1, 0.9, size=(300, 3)) * (points.max(0) - points.min(0))
    inner_expected = np.array([backend.TransformPoint(tuple(p)) for p in inner])
    assert np.abs(mrml.map_points_lps(node, inner) - inner_expected).max() < 1e-3
    # the file holds the same vectors (Slicer's reader then interpolates them cubically between nodes)
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(reloaded),
                               slicer.util.arrayFromGridTransform(node), atol=1e-5)


def test_affine_node_holds_the_affine_part(registered):
    affine = np.array(registered.run.summary["affine_lps"])
    points = np.random.default_rng(2).uniform(-150, 150, size=(10, 3))
    rounding = 0.5e-6 * (3 * 150 + 1)  # summary.json rounds each matrix entry to 6 decimals
    np.testing.assert_allclose(mrml.map_points_lps(registered.outputs.affine, points),
                               points @ affine[:3, :3].T + affine[:3, 3], atol=rounding)


def test_jacobian_volume_has_the_fixed_geometry_and_a_colour_table_centred_on_one(registered):
    jacobian = registered.outputs.jacobian
    fixed_grid = mrml.volume_grid(registered.inputs.fixed)
    assert mrml.volume_grid(jacobian).same_as(fixed_grid, tolerance_mm=1e-6)
    backend = sitk.GetArrayFromImage(sitk.ReadImage(str(registered.run.folder / "outputs" / JACOBIAN_FILE)))
    values = slicer.util.arrayFromVolume(jacobian)
    # the backend's map inside the fixed body, no value (NaN, drawn transparent) outside it
    fixed = node_image(registered.inputs.fixed)
    body = body_mask(fixed, looks_like_ct(fixed)).numpy().astype(bool)  # as summary.json's region
    assert 0.05 < body.mean() < 0.95
    np.testing.assert_allclose(values[body], backend[body], rtol=0, atol=1e-6)
    assert np.isnan(values[~body]).all()
    display = jacobian.GetDisplayNode()
    assert display.GetApplyThreshold()
    inside = values[body]
    assert 0.5 < float(np.median(inside)) < 1.5 and float(inside.std()) > 0.01
    display = jacobian.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == mrml.JACOBIAN_WINDOW
    color = registered.scene.GetNodeByID(display.GetColorNodeID())
    assert color.GetName() == mrml.JACOBIAN_COLOR_NODE_NAME
    function = color.GetColorTransferFunction()
    white, compressed, expanded = function.GetColor(1.0), function.GetColor(0.3), function.GetColor(1.7)
    assert min(white) > 0.95
    assert compressed[2] > compressed[0] + 0.3 and expanded[0] > expanded[2] + 0.3
    # folded voxels have their own colour, far from that of the smallest positive J
    folded, barely_positive = np.array(function.GetColor(-0.2)), np.array(function.GetColor(0.01))
    assert np.allclose(folded, mrml.JACOBIAN_FOLDED_RGB) and np.allclose(function.GetColor(0.0), folded)
    assert np.abs(folded - barely_positive).max() > 0.5


def test_transform_nodes_reference_their_fixed_and_moving_volumes(registered):
    fixed_role = slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()
    moving_role = slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()
    for node in (registered.outputs.transform, registered.outputs.affine):
        assert node.GetNodeReference(fixed_role) is registered.inputs.fixed, node.GetName()
        assert node.GetNodeReference(moving_role) is registered.inputs.moving, node.GetName()


def test_warped_segmentation_keeps_segments_and_equals_the_backends_labels(registered):
    output, source = registered.outputs.warped_segmentation, registered.inputs.moving_segmentation
    segmentation = output.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName(): tuple(segmentation.GetNthSegment(i).GetColor())
             for i in range(segmentation.GetNumberOfSegments())}
    assert {k: tuple(round(c, 6) for c in v) for k, v in names.items()} == COLORS
    backend = sitk.GetArrayFromImage(sitk.ReadImage(str(registered.run.folder / "outputs" / WARPED_LABELS_FILE)))
    table = {entry.name: entry.value for entry in registered.run._prepared.segment_table}
    fixed = registered.inputs.fixed
    dice = {}
    for name, value in table.items():
        mask = segment_mask(output, name, fixed)
        dice[name] = dice_per_label(torch.from_numpy(mask.astype(np.int64)),
                                    torch.from_numpy((backend == value).astype(np.int64)), [1])[1]
    print(f"\nDice of the warped segments against the backend's warped labels: {dice}")
    assert dice == {"bone": 1.0, "soft tissue": 1.0}
    assert segment_mask(source, "bone", registered.inputs.moving).sum() > 0  # the input still has its segments


def test_rerun_with_the_same_output_nodes_replaces_their_content(registered):
    """Registering the fixed volume to itself into the first run's nodes: same nodes, new content."""
    scene, first = registered.scene, registered.outputs
    ids = {n.GetID() for n in (first.transform, first.warped, first.jacobian)}
    fixed_copy = add_volume(scene, node_image(registered.inputs.fixed), "fixed copy")
    nodes_before = scene_node_ids(scene)
    first_max = np.abs(slicer.util.arrayFromGridTransform(first.transform)).max()
    run = mrml.NodeRegistration(mrml.RegistrationInputs(registered.inputs.fixed, fixed_copy),
                                mrml.RegistrationOutputs(first.transform, None, first.warped, first.jacobian),
                                {"mode": FAST_MODE, "device": "cpu", "options": FAST_OPTIONS}).start()
    second = run.wait(timeout=300)
    assert {n.GetID() for n in (second.transform, second.warped, second.jacobian)} == ids
    assert scene_node_ids(scene) == nodes_before, "nodes were added or removed"
    second_max = np.abs(slicer.util.arrayFromGridTransform(second.transform)).max()
    print(f"\nlargest displacement: {first_max:.1f} mm (first run), {second_max:.2f} mm (fixed to itself)")
    assert first_max > 20.0 and second_max < 2.0
    difference = np.abs(slicer.util.arrayFromVolume(second.warped) - slicer.util.arrayFromVolume(registered.inputs.fixed))
    print(f"|warped - fixed| (HU): median {np.median(difference):.2f}, 99th percentile {np.percentile(difference, 99):.1f}")
    assert np.median(difference) < 5.0 and np.percentile(difference, 99) < 60.0
    assert not run.folder.exists()


def test_masks_are_written_on_their_volumes_grids(tmp_path):
    """A moving mask (segmentation on the moving volume) becomes a 0/1 file on the moving grid, as
    the fixed mask does on the fixed grid; one under another transform than the moving volume is refused."""
    data = tiny_pair()
    scene = new_scene()
    fixed, moving = add_volume(scene, data.fixed, "fixed"), add_volume(scene, data.moving, "moving")
    moving_mask = add_segmentation(scene, data.moving_labels, moving, "moving mask")
    fixed_mask = add_segmentation(scene, data.fixed_labels, fixed, "fixed mask")
    prepared = mrml.write_inputs(mrml.RegistrationInputs(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask),
                                 tmp_path / "inputs")
    for role, labels, volume in (("moving_mask", data.moving_labels, moving), ("fixed_mask", data.fixed_labels, fixed)):
        written = sitk.ReadImage(prepared.files[role])
        assert np.array_equal(sitk.GetArrayFromImage(written), (labels.numpy() > 0).astype(np.uint8)), role
        assert Image.from_sitk(written).grid.same_as(mrml.volume_grid(volume), tolerance_mm=1e-4), role
    moving_mask.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    with pytest.raises(ValueError, match="moving mask"):
        mrml.write_inputs(mrml.RegistrationInputs(fixed, moving, moving_mask=moving_mask), tmp_path / "again")


def test_overlapping_segments_are_each_warped_whole():
    """A segmentation whose segments overlap ("tissue" holds "bone"): both come back whole, each
    equal to its own mask warped through transform.h5 (no segment loses voxels to another)."""
    from SAMERegistrationLib.export import read_transform
    from SAMERegistrationLib.spatial.warp import resample_labels

    data = tiny_pair()
    scene = new_scene()
    fixed, moving = add_volume(scene, data.fixed, "fixed"), add_volume(scene, data.moving, "moving")
    segments = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "overlapping")
    segments.SetReferenceImageGeometryParameterFromVolumeNode(moving)
    masks = {"tissue": data.moving_labels.numpy() > 0, "bone": data.moving_labels.numpy() == 1}
    for name, mask in masks.items():  # one import each: Slicer keeps them in separate layers
        labelmap = add_volume(scene, Image(torch.from_numpy(mask.astype(np.int64)), data.moving.grid), name,
                              "vtkMRMLLabelMapVolumeNode", np.uint8)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segments)
        scene.RemoveNode(labelmap)
        segmentation = segments.GetSegmentation()
        segmentation.GetNthSegment(segmentation.GetNumberOfSegments() - 1).SetName(name)
    layers, table = mrml.segmentation_to_label_layers(segments, moving)
    assert [entry.layer for entry in table] == [0, 1] and len(layers) == 2
    run = mrml.NodeRegistration(mrml.RegistrationInputs(fixed, moving, moving_segmentation=segments),
                                mrml.RegistrationOutputs(), {"mode": FAST_MODE, "device": "cpu", "options": FAST_OPTIONS},
                                keep_files=True).start()
    try:
        result = run.wait(timeout=300)
        transform = read_transform(run.folder / "outputs" / TRANSFORM_FILE, mrml.volume_grid(fixed))
        warped = {name: segment_mask(result.warped_segmentation, name, fixed) for name in masks}
        for name, mask in masks.items():
            expected = resample_labels(Image(torch.from_numpy(mask.astype(np.int64)), data.moving.grid),
                                       mrml.volume_grid(fixed), transform).numpy() > 0
            assert expected.sum() > 20, name
            assert np.array_equal(warped[name], expected), f"{name}: {int((warped[name] != expected).sum())} voxels differ"
        assert (warped["bone"] & warped["tissue"]).sum() == warped["bone"].sum()  # still inside the tissue
    finally:
        import shutil

        shutil.rmtree(run.folder, ignore_errors=True)


def test_cancel_stops_the_worker_and_creates_no_node():
    data = tiny_pair()
    scene = new_scene()
    inputs = mrml.RegistrationInputs(add_volume(scene, data.fixed, "fixed"), add_volume(scene, data.moving, "moving"))
    nodes_before = scene_node_ids(scene)
    run = mrml.NodeRegistration(inputs, mrml.RegistrationOutputs(), {"mode": FAST_MODE, "device": "cpu", "options": FAST_OPTIONS}).start()
    deadline = time.monotonic() + 60
    while not any(e["event"] == "progress" for e in run.poll()):
        assert time.monotonic() < deadline and run.running
        time.sleep(0.05)
    pid = run.worker.process.pid
    run.cancel()
    assert run.state == "cancelled" and run.result is None
    assert run.worker.returncode == EXIT_CANCELLED  # stopped by SIGTERM, cleanly
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
    assert scene_node_ids(scene) == nodes_before
    assert not run.folder.exists()


def test_bad_input_fails_with_the_backends_message_and_creates_no_node():
    data = tiny_pair()
    scene = new_scene()
    constant = Image(torch.full(data.moving.grid.shape, 7.0), data.moving.grid)
    inputs = mrml.RegistrationInputs(add_volume(scene, data.fixed, "fixed"), add_volume(scene, constant, "flat"))
    nodes_before = scene_node_ids(scene)
    run = mrml.NodeRegistration(inputs, mrml.RegistrationOutputs(), {"mode": FAST_MODE, "device": "cpu", "options": FAST_OPTIONS}).start()
    with pytest.raises(RuntimeError, match="is constant"):
        run.wait(timeout=120)
    assert run.state == "failed" and run.error_kind == "input"
    assert scene_node_ids(scene) == nodes_before
    with pytest.raises(ValueError, match="same node"):
        mrml.NodeRegistration(mrml.RegistrationInputs(inputs.fixed, inputs.fixed, None), mrml.RegistrationOutputs()).start()


# ----------------------------------------------------------------------------------- Slicer's own process
SLICER_SIDE_RUN = r"""
import json, sys
import numpy as np, SimpleITK as sitk, slicer
from SAMERegistrationLib import mrml
from SAMERegistrationLib.sitk_geometry import grid_of_sitk

paths, request = json.loads(sys.argv[1]), json.loads(sys.argv[2])
scene = slicer.vtkMRMLScene()
colors = slicer.vtkMRMLColorLogic()
colors.SetMRMLScene(scene)
colors.AddDefaultColorNodes()

def volume(name, class_name="vtkMRMLScalarVolumeNode", dtype=np.float32):
    image = sitk.ReadImage(paths[name])
    node = scene.AddNewNodeByClass(class_name, name)
    mrml.image_to_volume(mrml.VolumeArray(sitk.GetArrayFromImage(image), grid_of_sitk(image)), node, dtype)
    node.CreateDefaultDisplayNodes()
    return node

def segmentation(name, reference):
    labelmap = volume(name, "vtkMRMLLabelMapVolumeNode", np.uint8)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name + " segments")
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
    scene.RemoveNode(labelmap)
    return node

fixed, moving = volume("fixed"), volume("moving")
inputs = mrml.RegistrationInputs(fixed, moving, segmentation("fixed_labels", fixed), segmentation("moving_labels", moving),
                                 fixed_mask=segmentation("fixed_labels", fixed))
run = mrml.NodeRegistration(inputs, mrml.RegistrationOutputs(), request).start()
outputs = run.wait(timeout=300)
mrml.show_results(scene, fixed, outputs.warped, outputs.transform, jacobian=outputs.jacobian)
jacobian = slicer.util.arrayFromVolume(outputs.jacobian)
print(json.dumps({"state": run.state, "torch_imported": "torch" in sys.modules,
                  "library_modules": sorted(m for m in sys.modules if m.startswith("SAMERegistrationLib")),
                  "segments": outputs.warped_segmentation.GetSegmentation().GetNumberOfSegments(),
                  "jacobian_in_body": float(np.isfinite(jacobian).mean()),
                  "largest_displacement_mm": float(np.abs(slicer.util.arrayFromGridTransform(outputs.transform)).max())}))
"""


def test_slicers_own_process_registers_nodes_without_importing_torch(tmp_path):
    """What the module's logic does on Apply (nodes -> input files, worker, output files -> new
    nodes and their display), run in a fresh process as in Slicer: torch is never imported there
    (only the worker loads it, so Slicer holds no CUDA context)."""
    import os
    import subprocess
    import sys

    from sample_cases import write_tiny_pair

    paths = {name: str(path) for name, path in write_tiny_pair(tmp_path).items()}
    request = {"mode": FAST_MODE, "device": "cpu", "options": FAST_OPTIONS}
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mrml.__file__).parents[1]),
                                                                os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run([sys.executable, "-c", SLICER_SIDE_RUN, json.dumps(paths), json.dumps(request)],
                              capture_output=True, text=True, timeout=400, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    print(f"\nSlicer-side run: {report}")
    assert report["state"] == "completed"
    assert report["segments"] == 2 and 0.05 < report["jacobian_in_body"] < 0.95 and report["largest_displacement_mm"] > 20
    assert not report["torch_imported"], f"torch was imported in Slicer's process; library modules: {report['library_modules']}"


# ----------------------------------------------------------------------------------- inputs off the main thread
@pytest.fixture
def held_input_writing(monkeypatch):
    """Holds the background writing of the inputs until the test sets the returned event (or the
    run is cancelled); the real writer then writes the files."""
    gate = threading.Event()
    write = mrml.write_prepared_inputs

    def held(prepared, cancel):
        while not (gate.is_set() or cancel.is_set()):
            time.sleep(0.01)
        return write(prepared, cancel)

    monkeypatch.setattr(mrml, "write_prepared_inputs", held)
    return gate


def test_start_returns_before_the_inputs_are_written_and_the_worker_gets_them_complete(held_input_writing):
    data = tiny_pair()
    scene = new_scene()
    fixed, moving = add_volume(scene, data.fixed, "fixed"), add_volume(scene, data.moving, "moving", dtype=np.int16)
    segments = add_segmentation(scene, data.moving_labels, moving, "moving segments")
    inputs = mrml.RegistrationInputs(fixed, moving, moving_segmentation=segments)
    before = {name: node_state(node) for name, node in (("fixed", fixed), ("moving", moving), ("segments", segments))}
    run = mrml.NodeRegistration(inputs, mrml.RegistrationOutputs(),
                                {"mode": FAST_MODE, "device": "cpu", "options": FAST_OPTIONS}).start()
    try:
        # start() returned with nothing written yet: the files are written off the main thread
        assert run.running and run.writing_inputs and run.worker is None
        assert not list((run.folder / "inputs").glob("*.nrrd"))
        assert run.poll() == [] and run.worker is None
        held_input_writing.set()
        deadline = time.monotonic() + 60
        events = []
        while run.worker is None:
            assert time.monotonic() < deadline
            events += run.poll()
            time.sleep(0.01)
        assert events == [{"event": "log", "message": "inputs written; registration process started"}]
        # when the worker starts, every input file is complete: the nodes' voxels (their own
        # type) and geometry, the segments as labels with their names beside them
        for role, node in (("fixed", fixed), ("moving", moving)):
            written = sitk.ReadImage(run.worker.request[role])
            expected = slicer.util.arrayFromVolume(node)
            assert sitk.GetArrayFromImage(written).dtype == expected.dtype
            assert np.array_equal(sitk.GetArrayFromImage(written), expected), role
            assert Image.from_sitk(written).grid.same_as(mrml.volume_grid(node), tolerance_mm=1e-4), role
        labels = sitk.GetArrayFromImage(sitk.ReadImage(run.worker.request["moving_labels"]))
        table = {entry.name: entry.value for entry in run._prepared.segment_table}
        for name in LABEL_NAMES.values():
            assert np.array_equal(labels == table[name], segment_mask(segments, name, moving)), name
        names = Path(run.worker.request["moving_labels"]).parent / "label_names.json"
        assert {int(k): v for k, v in json.loads(names.read_text()).items()} == {v: k for k, v in table.items()}
        assert not run._prepared.pending  # the copies are released once written
    finally:
        run.cancel()
    assert not run.folder.exists()
    assert {name: node_state(node) for name, node in (("fixed", fixed), ("moving", moving), ("segments", segments))} \
        == before


def test_cancel_while_the_inputs_are_written_starts_no_worker_and_leaves_nothing(held_input_writing):
    data = tiny_pair()
    scene = new_scene()
    inputs = mrml.RegistrationInputs(add_volume(scene, data.fixed, "fixed"), add_volume(scene, data.moving, "moving"))
    nodes_before = scene_node_ids(scene)
    run = mrml.NodeRegistration(inputs, mrml.RegistrationOutputs(), {"mode": FAST_MODE, "device": "cpu"}).start()
    assert run.writing_inputs and run.folder.exists()
    run.cancel()
    assert run.state == "cancelled" and run.error_kind == "cancelled" and run.worker is None and run.result is None
    assert not run._writer.is_alive() and not run.folder.exists()
    assert run.poll() == [] and run.worker is None
    assert scene_node_ids(scene) == nodes_before


def test_writing_the_inputs_stops_before_the_next_file_when_cancelled(tmp_path):
    data = tiny_pair()
    scene = new_scene()
    inputs = mrml.RegistrationInputs(add_volume(scene, data.fixed, "fixed"), add_volume(scene, data.moving, "moving"))
    prepared = mrml.prepare_inputs(inputs, tmp_path)
    assert set(prepared.pending) == {prepared.files["fixed"], prepared.files["moving"]}
    assert not list(tmp_path.iterdir())  # nothing written by the main thread's part

    class CancelAfterFirstFile(threading.Event):
        def is_set(self) -> bool:
            return len(prepared.pending) < 2

    assert mrml.write_prepared_inputs(prepared, CancelAfterFirstFile()) is False
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.nrrd"] and list(prepared.pending) == [prepared.files["moving"]]
    assert mrml.write_prepared_inputs(prepared) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.nrrd", "moving.nrrd"]
