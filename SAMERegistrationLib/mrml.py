"""The bridge between Slicer's MRML nodes and the library: volumes, segmentations, transforms.

Everything that touches a node lives here, so it is tested without the Slicer application
(pip ``slicer-core``). ``slicer`` and ``vtk`` are imported inside the functions: importing this
module needs neither. This module runs in Slicer's own process and never imports torch (nor
anything that does): voxels travel as numpy arrays (:class:`VolumeArray`), files are written and
read with SimpleITK, and only the worker process (:mod:`SAMERegistrationLib.worker`) loads torch
and talks to the GPU.

Slicer's main thread must not wait for slow file I/O: :class:`NodeRegistration` copies the nodes'
voxels on the main thread, writes them for the worker on a background thread, and reads the
worker's outputs on another before it puts them into nodes on the main thread.

Conventions (see :mod:`SAMERegistrationLib.spatial.grid`): the library works in LPS mm with arrays
indexed ``[k, j, i]``; Slicer nodes are RAS. Every conversion below goes through
:meth:`Grid.index_to_world_ras`, :meth:`Grid.from_index_to_world_ras` or :data:`LPS_TO_RAS`.
Transforms map *fixed* points to *moving* points, which is Slicer's "FromParent" direction: a
moving volume placed under the result transform node lines up with the fixed volume.

Outputs in MRML (see :class:`NodeRegistration`):

* the whole result as a grid transform node (FromParent displacement ``phi(x) - x`` on the fixed
  image's working grid, RAS): it saves as a standard ITK displacement field;
* the affine part alone as a linear transform node (FromParent);
* the warped moving volume and the Jacobian determinant map on the fixed volume's grid, the
  Jacobian with a blue-white-red colour table centred on 1, folded voxels (J <= 0) in yellow, and
  NaN outside the fixed body (shown transparent over the fixed volume);
* every transform node references its fixed and moving volumes (Slicer's spatial-registration
  node reference roles);
* the warped segmentation: every segment of the moving segmentation with its name, colour and
  terminology, on the fixed volume's geometry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .label_names import LABEL_NAMES_FILE
from .worker import EXTRA_LABEL_LAYERS, warped_layer_file
from .spatial.grid import LPS_TO_RAS, Grid

JACOBIAN_COLOR_NODE_NAME = "SAMERegistration Jacobian"
"""Name of the procedural colour node shared by every Jacobian map of a scene."""
JACOBIAN_FOLDED_RGB = (1.0, 0.85, 0.0)
"""Colour of folded voxels (J <= 0): yellow, far from every colour of positive J."""
JACOBIAN_COLOR_POINTS = (
    (0.0, JACOBIAN_FOLDED_RGB),
    (0.001, (0.02, 0.19, 0.38)),
    (0.5, (0.26, 0.58, 0.76)),
    (1.0, (0.97, 0.97, 0.97)),
    (1.5, (0.84, 0.38, 0.30)),
    (2.0, (0.40, 0.00, 0.05)),
)
"""Diverging colour map of the Jacobian determinant: (J, RGB). J = 1 (volume kept) is white,
compression blue (darkest just above 0), expansion red; J <= 0 (folding) has its own colour."""
JACOBIAN_WINDOW = (2.0, 1.0)
"""(window, level) of the Jacobian display: J in [0, 2] spans the colour map, 1 at its centre."""
JACOBIAN_OPACITY = 0.6
"""Opacity of the Jacobian map shown over the fixed volume."""
LABEL_DTYPE = np.uint16
"""Voxel type of the label maps made from segments (values 1, 2, ... one per segment)."""


# --------------------------------------------------------------------------------------- geometry
def _lps_to_ras_4x4() -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS
    return matrix


def _vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def volume_grid(node) -> Grid:
    """The :class:`Grid` (LPS mm) of a volume node, from its IJKToRAS matrix and image dimensions.

    Raises:
        ValueError: the node holds no image data.
    """
    import vtk

    image = node.GetImageData() if node is not None else None
    if image is None:
        raise ValueError(f"volume_grid(): node {node.GetName() if node else None!r} holds no image data")
    dims = image.GetDimensions()
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    return Grid.from_index_to_world_ras((dims[2], dims[1], dims[0]), _numpy_matrix(ijk_to_ras))


@dataclass(frozen=True)
class VolumeArray:
    """A volume's voxels and grid as Slicer's own process holds them (numpy; no torch).

    Attributes:
        array: voxel values indexed ``[k, j, i]`` (the node's scalar type, :data:`LABEL_DTYPE` for
            labels, float32 for maps).
        grid: where each voxel is (LPS mm).
    """

    array: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.grid.shape:
            raise ValueError(f"VolumeArray: array shape {self.array.shape} does not match grid shape {self.grid.shape}")

    def numpy(self) -> np.ndarray:
        """The voxel array, ``[k, j, i]`` (as :meth:`Image.numpy <SAMERegistrationLib.image.Image.numpy>`)."""
        return self.array

    def write(self, path: str | os.PathLike) -> None:
        """Writes the voxels (their own type) with their geometry, uncompressed (for the worker: fast)."""
        import SimpleITK as sitk

        from .sitk_geometry import with_grid_geometry

        sitk.WriteImage(with_grid_geometry(sitk.GetImageFromArray(self.array), self.grid), str(path),
                        useCompression=False)

    @staticmethod
    def read(path: str | os.PathLike, dtype=np.float32) -> VolumeArray:
        """Reads a scalar 3-D image file as ``dtype`` voxels (None: the file's type) with its geometry."""
        import SimpleITK as sitk

        from .sitk_geometry import grid_of_sitk

        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        return VolumeArray(array if dtype is None else array.astype(dtype, copy=False), grid_of_sitk(image))


def volume_array(node) -> VolumeArray:
    """A copy of a scalar volume node's voxels (its own scalar type) and grid.

    The node's own coordinates are used (a parent transform is not applied).

    Raises:
        ValueError: the node is not a scalar volume.
    """
    import slicer

    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    if array.ndim != 3:
        raise ValueError(f"volume_array(): {node.GetName()!r} is not a scalar volume (array shape {array.shape})")
    return VolumeArray(array, volume_grid(node))


@dataclass(frozen=True)
class VolumeImage:
    """Voxels already in VTK's form, ready to become a volume node's image data.

    Attributes:
        image: a ``vtkImageData`` with origin 0 and spacing 1 (a volume node keeps its geometry in
            its IJKToRAS matrix), not yet used by any node.
        grid: where its voxels are (LPS mm).
    """

    image: object
    grid: Grid


def volume_image(image, dtype=np.float32) -> VolumeImage:
    """A copy of an image (a :class:`VolumeArray` or a library
    :class:`~SAMERegistrationLib.image.Image`) as ``dtype`` voxels in a new ``vtkImageData``.

    Touches no node, so the slow part of filling a large volume node (allocating and copying its
    voxels) can run on a background thread; :func:`set_volume_image` then is fast.
    """
    import vtk
    from vtk.util import numpy_support

    array = image.numpy()
    data = vtk.vtkImageData()
    data.SetDimensions(array.shape[::-1])
    data.AllocateScalars(numpy_support.get_vtk_array_type(np.dtype(dtype)), 1)
    numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(array.shape)[...] = array
    return VolumeImage(data, image.grid)


def set_volume_image(node, image: VolumeImage) -> None:
    """Makes ``image`` a volume node's voxels and geometry (main thread); the node's display and
    storage nodes are kept."""
    node.SetAndObserveImageData(image.image)
    node.SetIJKToRASMatrix(_vtk_matrix(image.grid.index_to_world_ras()))
    node.StorableModified()
    node.Modified()


def image_to_volume(image, node, dtype=np.float32) -> None:
    """Replaces a volume node's voxels and geometry by those of an image (a :class:`VolumeArray`
    or a library :class:`~SAMERegistrationLib.image.Image`) as ``dtype``; the node's display and
    storage nodes are kept."""
    set_volume_image(node, volume_image(image, dtype))


def affine_ras(affine_lps: np.ndarray) -> np.ndarray:
    """A 4x4 LPS affine (points to points) expressed in RAS."""
    flip = _lps_to_ras_4x4()
    return flip @ np.asarray(affine_lps, dtype=float) @ flip


def set_linear_transform(node, affine_lps: np.ndarray) -> None:
    """Sets a linear transform node's FromParent matrix to a fixed -> moving LPS affine."""
    node.SetMatrixTransformFromParent(_vtk_matrix(affine_ras(affine_lps)))


def set_grid_transform(node, displacement, grid: Grid) -> None:
    """Sets a grid transform node's FromParent transform to a displacement field.

    Args:
        node: a ``vtkMRMLGridTransformNode``.
        displacement: ``(3, D, H, W)`` LPS mm vectors on ``grid`` (torch tensor or numpy array):
            fixed point ``x`` maps to ``x + displacement(x)``.
        grid: the field's grid (any direction and spacing).
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    vectors = np.asarray(displacement.detach().cpu().numpy() if hasattr(displacement, "detach") else displacement,
                         dtype=np.float64)
    if vectors.shape != (3, *grid.shape):
        raise ValueError(f"set_grid_transform(): displacement shape {vectors.shape} does not match (3, *{grid.shape})")
    ras = np.einsum("rc,c...->...r", LPS_TO_RAS, vectors)  # (D, H, W, 3), i fastest like VTK
    image = vtk.vtkImageData()
    image.SetDimensions(grid.size_ijk)
    image.SetSpacing(grid.spacing)
    ijk_to_ras = grid.index_to_world_ras()
    image.SetOrigin(tuple(ijk_to_ras[:3, 3]))
    data = numpy_support.numpy_to_vtk(np.ascontiguousarray(ras.reshape(-1, 3)), deep=True, array_type=vtk.VTK_DOUBLE)
    data.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(data)
    direction = np.eye(4)
    direction[:3, :3] = ijk_to_ras[:3, :3] / np.asarray(grid.spacing)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(_vtk_matrix(direction))
    transform.SetInterpolationModeToLinear()
    node.SetAndObserveTransformFromParent(transform)


def map_points_ras(node, points_ras: np.ndarray) -> np.ndarray:
    """Maps RAS points ``(N, 3)`` through a transform node's FromParent transform (fixed -> moving),
    including its parent transforms (world -> node)."""
    import slicer
    import vtk

    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, node, transform)
    return np.array([transform.TransformPoint(*map(float, p)) for p in np.asarray(points_ras)])


def map_points_lps(node, points_lps: np.ndarray) -> np.ndarray:
    """Like :func:`map_points_ras` for LPS points ``(N, 3)`` (result in LPS): a transform node's
    fixed -> moving mapping in the library's frame."""
    return map_points_ras(node, np.asarray(points_lps, dtype=float) @ LPS_TO_RAS.T) @ LPS_TO_RAS.T


def write_transform_node(node, path: str | os.PathLike) -> None:
    """Writes a transform node (its FromParent transform, as ITK expects) to an ITK transform file.

    Raises:
        RuntimeError: the file could not be written.
    """
    scene = node.GetScene()
    with _temporary_nodes(scene):
        storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
        storage.SetFileName(str(path))
        if not storage.WriteData(node):
            raise RuntimeError(f"write_transform_node(): cannot write {node.GetName()!r} to {path}")


# --------------------------------------------------------------------------------------- segmentations
@contextmanager
def _temporary_nodes(scene):
    """Removes every node added to ``scene`` inside the block (temporary labelmaps and the display
    and colour nodes Slicer adds for them), except the scene's subject hierarchy."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and not node.IsA("vtkMRMLSubjectHierarchyNode"):
                scene.RemoveNode(node)


@dataclass(frozen=True)
class SegmentLabel:
    """One segment written into a label map: its label value, its layer (which of the label maps
    holds it, see :func:`segmentation_to_label_layers`) and what to restore afterwards."""

    value: int
    segment_id: str
    name: str
    color: tuple[float, float, float]
    layer: int = 0


def _segment_masks(segmentation_node, reference_volume, segment_ids: list[str] | None):
    """Yields ``(segment_id, segment, mask)`` for each segment (default all, in order): ``mask`` a
    boolean ``[k, j, i]`` array on the reference volume's grid."""
    import slicer
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else [segmentation.GetNthSegmentID(i)
                                                             for i in range(segmentation.GetNumberOfSegments())]
    shape = volume_grid(reference_volume).shape
    scene = segmentation_node.GetScene()
    with _temporary_nodes(scene):
        temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__SAMERegistration_temp__")
        for segment_id in ids:
            segment = segmentation.GetSegment(segment_id)
            if segment is None:
                raise ValueError(f"segmentation_to_labels(): {segmentation_node.GetName()!r} has no segment {segment_id!r}")
            single = vtk.vtkStringArray()
            single.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, single, temporary, reference_volume):
                raise RuntimeError(f"segmentation_to_labels(): segment {segment.GetName()!r} cannot be exported")
            mask = slicer.util.arrayFromVolume(temporary) > 0
            if mask.shape != shape:
                raise RuntimeError(f"segmentation_to_labels(): segment {segment.GetName()!r} exported with shape "
                                   f"{mask.shape}, expected {shape}")
            yield segment_id, segment, mask


def segmentation_to_labels(segmentation_node, reference_volume, segment_ids: list[str] | None = None,
                           values: dict[str, int] | None = None):
    """Segments of a segmentation node as one label map on a reference volume's grid.

    Args:
        segmentation_node: the segmentation (not modified).
        reference_volume: the volume whose grid the labels are written on.
        segment_ids: which segments, in order; default all.
        values: label value per segment name; default 1, 2, ... in order. Segments whose name is not
            in ``values`` get values after the largest given one.

    Returns:
        ``(labels, table)``: a :data:`LABEL_DTYPE` :class:`VolumeArray` on the reference grid and the
        :class:`SegmentLabel` of each segment. Where segments overlap, the later one wins (a
        warning says how many voxels); :func:`segmentation_to_label_layers` keeps every segment whole.
    """
    grid = volume_grid(reference_volume)
    labels = np.zeros(grid.shape, dtype=LABEL_DTYPE)
    table: list[SegmentLabel] = []
    next_value = max(values.values(), default=0) + 1 if values else 1
    overlap = 0
    for segment_id, segment, mask in _segment_masks(segmentation_node, reference_volume, segment_ids):
        name = segment.GetName()
        if values and name in values:
            value = values[name]
        else:
            value, next_value = next_value, next_value + 1
        overlap += int((mask & (labels > 0)).sum())
        labels[mask] = value
        table.append(SegmentLabel(value, segment_id, name, tuple(segment.GetColor())))
    if overlap:
        warnings.warn(f"segmentation {segmentation_node.GetName()!r}: segments overlap in {overlap} voxels; "
                      "each such voxel is kept in the last segment only", stacklevel=2)
    return VolumeArray(labels, grid), table


def segmentation_to_label_layers(segmentation_node, reference_volume):
    """Every segment as label values in as few label maps ("layers") as keep them whole: a segment
    goes into the first layer it does not overlap, so overlapping segments land in different layers.

    Returns:
        ``(layers, table)``: :data:`LABEL_DTYPE` :class:`VolumeArray` objects on the reference grid
        (values 1, 2, ... unique over all layers) and the :class:`SegmentLabel` of each segment, in
        order, with its ``layer``.
    """
    grid = volume_grid(reference_volume)
    layers: list[np.ndarray] = []
    table: list[SegmentLabel] = []
    for value, (segment_id, segment, mask) in enumerate(_segment_masks(segmentation_node, reference_volume, None),
                                                         start=1):
        layer = next((index for index, existing in enumerate(layers) if not (mask & (existing > 0)).any()), None)
        if layer is None:
            layers.append(np.zeros(grid.shape, dtype=LABEL_DTYPE))
            layer = len(layers) - 1
        layers[layer][mask] = value
        table.append(SegmentLabel(value, segment_id, segment.GetName(), tuple(segment.GetColor()), layer))
    if not layers:
        layers.append(np.zeros(grid.shape, dtype=LABEL_DTYPE))
    return [VolumeArray(layer, grid) for layer in layers], table


def labels_to_segmentation(layers: list, table: list[SegmentLabel], segmentation_node, reference_volume,
                           source_node=None) -> None:
    """Replaces the segments of ``segmentation_node`` by one segment per entry of ``table``.

    Args:
        layers: integer :class:`VolumeArray` objects on ``reference_volume``'s grid, one per layer of
            ``table`` (see :func:`segmentation_to_label_layers`): overlapping segments stay whole.
        table: which value of which layer becomes which segment (name and colour).
        segmentation_node: the output node; its previous segments are removed.
        reference_volume: the volume that defines the labels' grid (becomes the segmentation's
            reference geometry).
        source_node: the segmentation ``table`` was made from; when given, each segment's metadata
            (name, colour, terminology tags) is copied from it.
    """
    import slicer

    scene = segmentation_node.GetScene()
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation = segmentation_node.GetSegmentation()
    source = source_node.GetSegmentation() if source_node is not None else None
    with _temporary_nodes(scene):
        colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "__SAMERegistration_temp_colors__")
        colors.SetTypeToUser()
        largest = max([entry.value for entry in table], default=0)
        colors.SetNumberOfColors(largest + 1)
        colors.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for entry in table:  # unique names: segment names may repeat
            colors.SetColor(entry.value, f"__label_{entry.value}", *entry.color, 1.0)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        segmentation.RemoveAllSegments()
        for index, labels in enumerate(layers):  # one import per layer: each becomes its own binary layer
            values = labels.numpy().astype(LABEL_DTYPE, copy=False)
            counts = np.bincount(values.ravel(), minlength=largest + 1)  # one pass, also for many segments
            present = [entry.value for entry in table if entry.layer == index and counts[entry.value] > 0]
            if not present:
                continue
            keep = np.zeros(len(counts), dtype=bool)
            keep[present] = True
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__SAMERegistration_temp__")
            set_volume_image(labelmap, volume_image(VolumeArray(np.where(keep[values], values, 0), labels.grid), LABEL_DTYPE))
            labelmap.CreateDefaultDisplayNodes()
            labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
                raise RuntimeError("labels_to_segmentation(): importing the warped labels failed")
    imported = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
                for i in range(segmentation.GetNumberOfSegments())}
    for entry in table:  # in the input's order; a segment the warp lost stays, empty
        segment_id = imported.get(f"__label_{entry.value}") or segmentation.AddEmptySegment("", entry.name, entry.color)
        segment = segmentation.GetSegment(segment_id)
        if source is not None and source.GetSegment(entry.segment_id) is not None:
            value = segment.GetLabelValue()  # metadata includes the source's label value, not this layer's
            segment.DeepCopyMetadata(source.GetSegment(entry.segment_id))
            segment.SetLabelValue(value)
        else:
            segment.SetName(entry.name)
            segment.SetColor(*entry.color)


# --------------------------------------------------------------------------------------- display
def jacobian_color_node(scene):
    """The scene's procedural colour node for Jacobian maps (created once, see JACOBIAN_COLOR_POINTS)."""
    import slicer

    existing = scene.GetFirstNodeByName(JACOBIAN_COLOR_NODE_NAME)
    if existing is not None and existing.IsA("vtkMRMLProceduralColorNode"):
        return existing
    node = slicer.vtkMRMLProceduralColorNode()
    node.SetName(JACOBIAN_COLOR_NODE_NAME)
    node.SetAttribute("Category", "SAMERegistration")
    function = node.GetColorTransferFunction()
    function.RemoveAllPoints()
    for value, rgb in JACOBIAN_COLOR_POINTS:
        function.AddRGBPoint(value, *rgb)
    function.ClampingOn()
    scene.AddNode(node)
    return node


def show_jacobian(node) -> None:
    """Displays a Jacobian map with the diverging colour table, J = 1 at its centre, folded voxels
    in their own colour; voxels without a value (NaN: outside the body) are transparent, so the
    map shows over the fixed volume in the body only."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobian_color_node(node.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevel(*JACOBIAN_WINDOW)
    display.SetApplyThreshold(True)  # NaN is outside every threshold range: drawn transparent
    display.SetThreshold(-1e30, 1e30)


def jacobian_in_body(jacobian: VolumeArray, fixed: VolumeArray) -> VolumeArray:
    """The Jacobian map (float32, on the fixed grid) with NaN outside the fixed volume's body
    (:func:`~SAMERegistrationLib.body.body_mask_array`, as for summary.json's statistics)."""
    from .body import body_mask_array, looks_like_ct_array

    body = body_mask_array(fixed.array, fixed.grid, looks_like_ct_array(fixed.array)).astype(bool)
    return VolumeArray(np.where(body, jacobian.array.astype(np.float32), np.float32(np.nan)), jacobian.grid)


def set_registration_references(transform, fixed, moving) -> None:
    """Records on a transform node which volumes it registers (Slicer's spatial-registration node
    references, as SlicerElastix and the Transforms module use them)."""
    import slicer

    transform.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixed.GetID())
    transform.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), moving.GetID())


def copy_volume_display(source, target) -> None:
    """Gives ``target`` the window/level and colour table of ``source`` (when it has a display node)."""
    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    source_display, display = source.GetDisplayNode(), target.GetDisplayNode()
    if source_display is None:
        return
    display.SetAndObserveColorNodeID(source_display.GetColorNodeID())
    display.AutoWindowLevelOff()
    display.SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())


def show_results(scene, fixed, warped=None, transform=None, overlay: bool = True, grid: bool = True,
                 grid_spacing_mm: float = 15.0, opacity: float = 0.5, jacobian=None) -> None:
    """What a user sees after a registration: the fixed volume in the background of every slice
    view with the warped volume over it at ``opacity`` (or, with ``jacobian``, the Jacobian map
    over it at :data:`JACOBIAN_OPACITY`, in the body only), and the transform's deformed grid
    (spacing ``grid_spacing_mm``, over the fixed volume) in the slice views. Every part is optional."""
    import slicer

    if overlay:
        foreground, alpha = (jacobian, JACOBIAN_OPACITY) if jacobian is not None else (warped, opacity)
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(fixed.GetID())
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            composite.SetForegroundOpacity(alpha if foreground is not None else 0.0)
    if transform is not None:
        if transform.GetDisplayNode() is None:
            transform.CreateDefaultDisplayNodes()
        display = transform.GetDisplayNode()
        display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
        display.SetGridSpacingMm(grid_spacing_mm)
        display.SetAndObserveRegionNode(fixed)
        display.SetVisibility2D(grid)
        display.SetVisibility3D(False)
        display.SetVisibility(grid)


# --------------------------------------------------------------------------------------- a whole run
@dataclass
class RegistrationInputs:
    """The nodes a registration reads (never modified).

    Attributes:
        fixed, moving: scalar volume nodes.
        fixed_segmentation: optional; segments named like the moving ones are compared (Dice).
        moving_segmentation: optional; warped onto the fixed volume.
        fixed_mask: optional segmentation node; the union of its segments limits the similarity.
        moving_mask: optional segmentation node on the moving volume; moving voxels outside the
            union of its segments take no part in the similarity.
        initial_transform: optional transform node mapping fixed to moving (FromParent), e.g. the
            transform a user put the moving volume under to align it by hand.
    """

    fixed: object
    moving: object
    fixed_segmentation: object = None
    moving_segmentation: object = None
    fixed_mask: object = None
    moving_mask: object = None
    initial_transform: object = None


@dataclass
class RegistrationOutputs:
    """The nodes a registration fills (content replaced); empty ones are created as needed
    (``affine`` only when given).

    Attributes:
        transform: ``vtkMRMLGridTransformNode``: the whole result (FromParent displacement field).
        affine: ``vtkMRMLLinearTransformNode``: the affine part alone.
        warped: scalar volume: the moving volume on the fixed grid.
        jacobian: scalar volume: det(d phi / dx) on the fixed grid.
        warped_segmentation: segmentation: the moving segments on the fixed geometry.
        inverse: ``vtkMRMLGridTransformNode``: the inverse, moving to fixed (FromParent displacement
            field on the moving volume's working grid), for modes that compute it (TVF).
    """

    transform: object = None
    affine: object = None
    warped: object = None
    jacobian: object = None
    warped_segmentation: object = None
    inverse: object = None


@dataclass
class PreparedInputs:
    """The worker's input files: their paths (known at once), the voxels still to be written, and
    what is needed to read the worker's outputs back.

    Attributes:
        files: request field -> path of each input file (``fixed``, ``moving``, ``moving_labels`` ...).
        segment_table: the moving segments' label values (see :func:`segmentation_to_label_layers`).
        extra_label_layers: label files of the moving segments that overlap those of
            ``files["moving_labels"]``.
        notes: what the user should know about the inputs (e.g. an initial transform taken over).
        pending: files not yet written: path -> voxels, in order.
        label_names: the text of the :data:`LABEL_NAMES_FILE` to write beside the moving labels.
    """

    files: dict[str, str]
    segment_table: list[SegmentLabel] = field(default_factory=list)
    extra_label_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pending: dict[str, VolumeArray] = field(default_factory=dict)
    label_names: str | None = None


def _check_not_transformed(node, role: str) -> None:
    if node is not None and node.GetParentTransformNode() is not None:
        raise ValueError(f"{role} {node.GetName()!r} is under the transform {node.GetParentTransformNode().GetName()!r}: "
                         "harden the transform (Data module) or remove it first")


def prepare_inputs(inputs: RegistrationInputs, folder: str | os.PathLike) -> PreparedInputs:
    """Checks the input nodes and copies what the worker needs from them (main thread: reads nodes).

    The voxels of the volumes, of the segments as label maps and of the masks are copied into
    :attr:`PreparedInputs.pending` (written by :func:`write_prepared_inputs`, on any thread); an
    initial transform is written into ``folder`` at once (through Slicer's transform writer). A
    moving volume placed under a (non-nested) transform is registered from that transform when no
    initial transform is given.

    Raises:
        ValueError: inputs that cannot be used as they are (nothing is written then).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if inputs.fixed is None or inputs.moving is None:
        raise ValueError("select both a fixed and a moving volume")
    if inputs.fixed is inputs.moving:
        raise ValueError("the fixed and the moving volume are the same node: select two different volumes")
    prepared = PreparedInputs(files={})
    _check_not_transformed(inputs.fixed, "fixed volume")
    for node, role in ((inputs.fixed_segmentation, "fixed segmentation"), (inputs.fixed_mask, "fixed mask")):
        _check_not_transformed(node, role)
    initial = inputs.initial_transform
    parent = inputs.moving.GetParentTransformNode()
    if parent is not None:
        if initial is not None and initial is not parent:
            raise ValueError(f"moving volume {inputs.moving.GetName()!r} is under the transform {parent.GetName()!r} "
                             f"and the initial transform is {initial.GetName()!r}: use one of them")
        if parent.GetParentTransformNode() is not None:
            raise ValueError(f"moving volume {inputs.moving.GetName()!r} is under nested transforms: harden them first")
        initial = parent
        prepared.notes.append(f"moving volume is under {parent.GetName()!r}: used as the initial transform")
    if initial is not None and initial.GetParentTransformNode() is not None:
        raise ValueError(f"initial transform {initial.GetName()!r} is under another transform: harden it first")
    for node, role in ((inputs.moving_segmentation, "moving segmentation"), (inputs.moving_mask, "moving mask")):
        if node is not None and node.GetParentTransformNode() is not parent:
            raise ValueError(f"{role} {node.GetName()!r} must be under the same transform as the moving volume "
                             "(or both under none)")

    def add(volume: VolumeArray, name: str) -> str:
        path = str(folder / name)
        prepared.pending[path] = volume
        return path

    prepared.files["fixed"] = add(volume_array(inputs.fixed), "fixed.nrrd")
    prepared.files["moving"] = add(volume_array(inputs.moving), "moving.nrrd")
    if inputs.moving_segmentation is not None:
        layers, table = segmentation_to_label_layers(inputs.moving_segmentation, inputs.moving)
        prepared.segment_table = table
        prepared.files["moving_labels"] = add(layers[0], "moving_labels.nrrd")
        # overlapping segments: the worker warps the other layers like the first (worker.py)
        prepared.extra_label_layers = [add(layer, f"moving_labels_layer{index}.nrrd")
                                       for index, layer in enumerate(layers[1:], start=1)]
        # the segment names name the labels of summary.json (read by the backend from beside the labels)
        prepared.label_names = json.dumps({str(entry.value): entry.name for entry in table})
        if inputs.fixed_segmentation is not None:
            fixed_labels, _ = segmentation_to_labels(inputs.fixed_segmentation, inputs.fixed,
                                                     values={entry.name: entry.value for entry in table})
            prepared.files["fixed_labels"] = add(fixed_labels, "fixed_labels.nrrd")
    for node, volume, role in ((inputs.fixed_mask, inputs.fixed, "fixed_mask"),
                               (inputs.moving_mask, inputs.moving, "moving_mask")):
        if node is not None:
            labels, _ = segmentation_to_labels(node, volume)
            prepared.files[role] = add(VolumeArray((labels.array > 0).astype(np.uint8), labels.grid), f"{role}.nrrd")
    if initial is not None:
        path = folder / "initial_transform.h5"
        write_transform_node(initial, path)
        prepared.files["initial_transform"] = str(path)
    return prepared


def write_prepared_inputs(prepared: PreparedInputs, cancel: threading.Event | None = None) -> bool:
    """Writes the files :func:`prepare_inputs` left pending (no node is touched: any thread).

    Each file is complete once this returns True; the pending voxels are released as they are
    written. With ``cancel`` set it stops before the next file and returns False (what was written
    stays: the caller removes the folder).
    """
    while prepared.pending:
        if cancel is not None and cancel.is_set():
            return False
        path = next(iter(prepared.pending))
        prepared.pending[path].write(path)
        del prepared.pending[path]
    if prepared.label_names is not None:
        (Path(prepared.files["moving_labels"]).parent / LABEL_NAMES_FILE).write_text(prepared.label_names)
    return True


def write_inputs(inputs: RegistrationInputs, folder: str | os.PathLike) -> PreparedInputs:
    """:func:`prepare_inputs` and :func:`write_prepared_inputs` in one call (blocking, main thread)."""
    prepared = prepare_inputs(inputs, folder)
    write_prepared_inputs(prepared)
    return prepared


def _new_node(scene, class_name: str, name: str):
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    return node


@dataclass
class OutputData:
    """A finished output folder read into memory (no node touched), ready for :func:`apply_outputs`.

    Attributes:
        field_grid: the fixed working grid of ``whole_field``.
        whole_field: ``(3, D, H, W)`` float64 LPS mm, phi(x) - x of the whole result on ``field_grid``.
        affine: 4x4 LPS affine part, or None.
        inverse_grid, inverse_field: the inverse's displacement on a moving-space grid, or None.
        warped: the warped volume (float32) on the fixed grid.
        jacobian: the Jacobian map (float32) on the fixed grid, NaN outside the fixed body.
        layers: the warped label layers on the fixed grid (see :func:`segmentation_to_label_layers`).
    """

    field_grid: Grid
    whole_field: np.ndarray
    affine: np.ndarray | None
    inverse_grid: Grid | None
    inverse_field: np.ndarray | None
    warped: VolumeImage
    jacobian: VolumeImage
    layers: list[VolumeArray]


def read_outputs(outdir: str | os.PathLike, summary: dict, fixed: VolumeArray, moving_grid: Grid,
                 segment_table: list[SegmentLabel]) -> OutputData:
    """Reads a finished output folder with SimpleITK (no MRML: safe on a background thread).

    Args:
        fixed: the fixed volume's voxels and grid (its grid is the outputs' grid; its voxels give
            the body the Jacobian map is limited to).
        moving_grid: the moving volume's grid (the inverse is sampled on it).

    Raises:
        RuntimeError: an output is not on the fixed volume's grid.
    """
    import SimpleITK as sitk

    from .output_files import (AFFINE_FILE, INVERSE_TRANSFORM_FILE, JACOBIAN_FILE, TRANSFORM_FILE, WARPED_FILE,
                               WARPED_LABELS_FILE)
    from .sitk_geometry import affine_from_sitk, sample_displacement

    outdir = Path(outdir)
    field_grid = fixed.grid.with_spacing(float(summary["working_spacing_mm"]))
    # phi(x) - x of the whole result (affine included) at the working grid's voxel centres: exact,
    # because transform.h5 keeps its field on that grid
    whole_field = sample_displacement(sitk.ReadTransform(str(outdir / TRANSFORM_FILE)), field_grid)
    affine = (affine_from_sitk(sitk.ReadTransform(str(outdir / AFFINE_FILE))) if (outdir / AFFINE_FILE).is_file()
              else None)
    # the inverse (moving -> fixed, an affine then a field) sampled on a moving-space grid as fine
    # as its field
    inverse_grid = inverse_field = None
    if (outdir / INVERSE_TRANSFORM_FILE).is_file():
        inverse_grid = moving_grid.with_spacing(float(summary["inverse"]["field_spacing_mm"]))
        inverse_field = sample_displacement(sitk.ReadTransform(str(outdir / INVERSE_TRANSFORM_FILE)), inverse_grid)
    warped = VolumeArray.read(outdir / WARPED_FILE)
    jacobian = VolumeArray.read(outdir / JACOBIAN_FILE)
    layers = []
    if segment_table and (outdir / WARPED_LABELS_FILE).is_file():
        count = max(entry.layer for entry in segment_table) + 1
        names = [WARPED_LABELS_FILE] + [warped_layer_file(index) for index in range(1, count)]
        layers = [VolumeArray.read(outdir / name, LABEL_DTYPE) for name in names]
    for volume, what in ((warped, "warped volume"), (jacobian, "Jacobian map"),
                         *((layer, "warped labels") for layer in layers)):
        if not volume.grid.same_as(fixed.grid):
            raise RuntimeError(f"load_outputs(): the {what} is not on the fixed volume's grid")
    # exactly the fixed geometry (the files store it in single precision)
    return OutputData(field_grid, whole_field, affine, inverse_grid, inverse_field,
                      volume_image(VolumeArray(warped.array, fixed.grid)),
                      volume_image(jacobian_in_body(VolumeArray(jacobian.array, fixed.grid), fixed)),
                      [VolumeArray(layer.array, fixed.grid) for layer in layers])


def apply_outputs(data: OutputData, inputs: RegistrationInputs, outputs: RegistrationOutputs,
                  segment_table: list[SegmentLabel]) -> RegistrationOutputs:
    """Puts outputs read by :func:`read_outputs` into the output nodes (creating the missing ones)."""
    scene = inputs.fixed.GetScene()
    moving_name = inputs.moving.GetName()
    result = RegistrationOutputs(**vars(outputs))
    if result.transform is None:
        result.transform = _new_node(scene, "vtkMRMLGridTransformNode", f"{moving_name} registration")
    set_grid_transform(result.transform, data.whole_field, data.field_grid)
    set_registration_references(result.transform, inputs.fixed, inputs.moving)
    if result.affine is not None and data.affine is not None:
        set_linear_transform(result.affine, data.affine)
        set_registration_references(result.affine, inputs.fixed, inputs.moving)
    if data.inverse_field is not None:
        if result.inverse is None:
            result.inverse = _new_node(scene, "vtkMRMLGridTransformNode", f"{moving_name} registration inverse")
        set_grid_transform(result.inverse, data.inverse_field, data.inverse_grid)
        set_registration_references(result.inverse, inputs.moving, inputs.fixed)  # resamples fixed onto moving
    if result.warped is None:
        result.warped = _new_node(scene, "vtkMRMLScalarVolumeNode", f"{moving_name} registered")
    copy_volume_display(inputs.moving, result.warped)  # first: no automatic window/level of the new voxels
    set_volume_image(result.warped, data.warped)
    if result.jacobian is None:
        result.jacobian = _new_node(scene, "vtkMRMLScalarVolumeNode", f"{moving_name} Jacobian")
    show_jacobian(result.jacobian)
    set_volume_image(result.jacobian, data.jacobian)
    if data.layers:
        if result.warped_segmentation is None:
            result.warped_segmentation = _new_node(scene, "vtkMRMLSegmentationNode",
                                                   f"{inputs.moving_segmentation.GetName()} registered")
        labels_to_segmentation(data.layers, segment_table, result.warped_segmentation, result.warped,
                               source_node=inputs.moving_segmentation)
    return result


def load_outputs(outdir: str | os.PathLike, summary: dict, inputs: RegistrationInputs,
                 outputs: RegistrationOutputs, segment_table: list[SegmentLabel]) -> RegistrationOutputs:
    """Reads a finished output folder into the output nodes (creating the missing ones), blocking.

    Nothing is created or changed before every file has been read.
    """
    data = read_outputs(outdir, summary, volume_array(inputs.fixed), volume_grid(inputs.moving), segment_table)
    return apply_outputs(data, inputs, outputs, segment_table)


class NodeRegistration:
    """One registration of MRML nodes run by a worker process, without blocking Slicer's main thread.

    ``start()`` checks the inputs and copies their voxels (main thread, fast), then writes them to
    a temporary folder on a background thread and returns at once; ``poll()`` (from a timer)
    starts the worker once the inputs are written, returns new events and, once the worker has
    succeeded, reads the output files on another background thread and then puts them into the
    nodes (so nodes change only when the whole result is there); ``wait()`` blocks until the end;
    ``cancel()`` stops the writing of the inputs or the worker: no node is created or changed. The
    temporary folder is removed at the end either way (unless ``keep_files``). Input nodes are
    only read.

    Args:
        inputs, outputs: the nodes.
        request: extra request fields for the worker (``mode``, ``device``, ``options`` ...).
        python: the worker's Python executable (in Slicer ``PythonSlicer``).
        work_dir: parent folder of the temporary folder.
    """

    def __init__(self, inputs: RegistrationInputs, outputs: RegistrationOutputs, request: dict | None = None,
                 python: str | None = None, work_dir: str | os.PathLike | None = None, keep_files: bool = False) -> None:
        self.inputs, self.outputs = inputs, outputs
        self.request = dict(request or {})
        self.python, self.work_dir, self.keep_files = python, work_dir, keep_files
        self.state = "new"  # new, running (writing the inputs, then the worker), completed, failed, cancelled
        self.summary: dict | None = None
        self.error: str | None = None
        self.error_kind: str | None = None
        self.result: RegistrationOutputs | None = None
        self.log: list[str] = []
        self.folder: Path | None = None
        self.worker = None
        self._prepared: PreparedInputs | None = None
        self._writer: threading.Thread | None = None
        self._write_error: Exception | None = None
        self._stop_writing = threading.Event()
        self._reader: threading.Thread | None = None
        self._read: OutputData | Exception | None = None

    def start(self) -> NodeRegistration:
        """Checks the inputs and starts writing them (see the class); returns without waiting.

        Raises:
            ValueError: unusable inputs (nothing is left behind).
        """
        self.folder = Path(tempfile.mkdtemp(prefix="SAMERegistration-", dir=self.work_dir))
        try:
            self._prepared = prepare_inputs(self.inputs, self.folder / "inputs")
        except BaseException:
            self._cleanup()
            raise
        self.log.extend(self._prepared.notes)
        self._writer = threading.Thread(target=self._write_inputs, daemon=True, name="SAMERegistration-inputs")
        self.state = "running"
        self._writer.start()
        return self

    def _write_inputs(self) -> None:
        try:
            write_prepared_inputs(self._prepared, self._stop_writing)
        except Exception as error:  # noqa: BLE001 - reported as the run's error by poll()
            self._write_error = error

    def _start_worker(self) -> None:
        from .worker import WorkerProcess

        request = {"overview": False, **self.request, **self._prepared.files, "output_dir": str(self.folder / "outputs")}
        if self._prepared.extra_label_layers:
            request[EXTRA_LABEL_LAYERS] = self._prepared.extra_label_layers
        self.worker = WorkerProcess(request, self.folder / "request.json", python=self.python).start()

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def writing_inputs(self) -> bool:
        """True while the inputs are being written (the worker is not started yet)."""
        return self.state == "running" and self.worker is None

    def poll(self) -> list[dict]:
        """New events (see :mod:`SAMERegistrationLib.worker`); starts the worker once the inputs are
        written; when the worker has ended, finishes the run (outputs loaded, or ``error`` set) and
        adds a final ``{"event": "finished"}``."""
        if self.state != "running":
            return []
        if self.worker is None:
            if self._writer.is_alive():
                return []
            if self._write_error is not None:
                self.state = "failed"
                self.error = f"writing the inputs failed: {type(self._write_error).__name__}: {self._write_error}"
                self._cleanup()
                return [{"event": "finished", "state": self.state, "error": self.error}]
            self._start_worker()
            return [{"event": "log", "message": "inputs written; registration process started"}]
        events = self._note(self.worker.poll())
        if self.worker.finished() and self._reader is None:
            events += self._note(self.worker.poll())
            if self.worker.returncode == 0 and self.summary is not None and not self.worker.killed:
                self._start_reading()
                events.append({"event": "log", "message": "reading the results"})
                return events
            self._finish()
            events.append({"event": "finished", "state": self.state, "error": self.error})
        elif self._reader is not None and not self._reader.is_alive():
            self._finish()
            events.append({"event": "finished", "state": self.state, "error": self.error})
        return events
    def _note(self, events: list[dict]) -> list[dict]:
        """Keeps what the run needs from the worker's events (summary, error, log); returns them."""
        for event in events:
            kind = event.get("event")
            if kind == "summary":
                self.summary = event["summary"]
            elif kind == "error":
                self.error, self.error_kind = event.get("message"), event.get("kind")
            elif kind in ("log", "warning"):
                self.log.append(event.get("message", ""))
        return events

    def wait(self, timeout: float | None = None, on_event=None) -> RegistrationOutputs:
        """Blocks until the run ends; returns the filled output nodes.

        Raises:
            RuntimeError: the run failed or was cancelled (message from the worker).
            TimeoutError: ``timeout`` seconds passed (the worker is killed).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == "running":
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self.state == "running":
                if deadline is not None and time.monotonic() > deadline:
                    self.cancel()
                    raise TimeoutError(f"registration did not finish within {timeout:g} s")
                time.sleep(0.05)
        if self.state != "completed":
            raise RuntimeError(self.error or f"registration {self.state}")
        return self.result

    def cancel(self) -> None:
        """Stops the writing of the inputs (after the file being written) or the worker's process
        tree (:meth:`WorkerProcess.cancel`); no output node is created or changed and the temporary
        folder is removed."""
        if self.state != "running":
            return
        if self.worker is None:
            self._stop_writing.set()
            self._writer.join()
        else:
            self.worker.cancel()
            self.worker.wait()
        self.state = "cancelled"
        self.error, self.error_kind = "registration cancelled", "cancelled"
        self._cleanup()

    def _start_reading(self) -> None:
        """Reads the output files on a thread (the GUI stays responsive); poll() applies them.

        The fixed voxels (for the body the Jacobian map is shown in) are those the worker
        registered, read back from its input file on the thread: no copy on the main thread. Once
        everything is in memory the thread also removes the temporary folder (unless ``keep_files``),
        as deleting its large files takes a while too."""
        fixed_grid, moving_grid = volume_grid(self.inputs.fixed), volume_grid(self.inputs.moving)
        fixed_file = self._prepared.files["fixed"]

        def read() -> None:
            try:
                fixed = VolumeArray(VolumeArray.read(fixed_file, dtype=None).array, fixed_grid)
                self._read = read_outputs(self.folder / "outputs", self.summary, fixed, moving_grid,
                                          self._prepared.segment_table)
            except Exception as error:  # noqa: BLE001 - reported as the run's error by _finish
                self._read = error
            finally:
                self._cleanup()

        self._reader = threading.Thread(target=read, daemon=True, name="SAMERegistration-outputs")
        self._reader.start()

    def _finish(self) -> None:
        try:
            if self.worker.killed:
                self.state = "cancelled"
            elif self.worker.returncode == 0 and self.summary is not None:
                if isinstance(self._read, Exception):
                    raise self._read
                self.result = apply_outputs(self._read, self.inputs, self.outputs, self._prepared.segment_table)
                self.state = "completed"
            else:
                self.state = "cancelled" if self.error_kind == "cancelled" else "failed"
                if self.error is None:
                    tail = " | ".join(self.log[-5:])
                    self.error = f"the registration process ended with code {self.worker.returncode}: {tail}"
        except Exception as error:  # noqa: BLE001 - reported as the run's error
            self.state, self.error = "failed", f"loading the results failed: {type(error).__name__}: {error}"
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.folder is not None and not self.keep_files:
            shutil.rmtree(self.folder, ignore_errors=True)
