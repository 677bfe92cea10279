"""Adapters for the established registration tools, each in its documented standard configuration.

Every adapter returns a fixed -> moving :class:`SpatialTransform` in LPS mm (the worker samples it
on the fixed grid). Each tool is pinned to ``context.threads`` threads (the worker also sets the
OpenMP / ITK / MKL environment variables before anything is imported) and starts from the centres of
the two images, as the tools do by default:

* elastix (itk-elastix): the default ``affine`` then the default ``bspline`` parameter maps, with
  AutomaticTransformInitialization on the geometrical centres (without it elastix cannot start on
  scans that do not overlap physically); field from transformix.
* ANTs (antspyx): ``ants.registration(type_of_transform="SyN", random_seed=1)`` (centre-of-mass
  initialisation, affine, then SyN, Mattes MI, default iterations); the forward transforms are
  composed into one displacement field.
* NiftyReg: ``reg_aladin`` (defaults: image-centre initialisation, rigid then affine, 3 levels), then
  ``reg_f3d`` (defaults: cubic B-spline, 5-voxel control points, NMI, bending energy 0.001, 3 levels)
  from that affine; ``reg_transform -def`` gives the deformation (absolute RAS positions).
* greedy (picsl-greedy): ``-a -dof 12 -ia-image-centers -m NCC 2x2x2``, then
  ``-it AFFINE -m NCC 2x2x2 -s 2.0vox 0.5vox``; both composed with ``-rc``.
* ConvexAdam (convexadam): ``convex_adam_pt`` with its defaults (MIND-SSC, coupled convex + Adam,
  inverse-consistent) on float32. It assumes both images on one grid and has no affine stage, so
  the moving image is first resampled onto the fixed grid after the translation that aligns the
  image centres (the same start the other tools make for themselves); the translation is part of
  the returned transform.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from SAMERegistrationLib.image import Image, grid_of_sitk
from SAMERegistrationLib.spatial.grid import LPS_TO_RAS
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.warp import resample_image

from .method import Method, RunContext


def read_displacement_field(path: str | Path) -> SpatialTransform:
    """An ITK displacement field file (LPS mm vectors, fixed point ``x`` -> ``x + u(x)``) on its own grid."""
    image = sitk.ReadImage(str(path), sitk.sitkVectorFloat32)
    field = torch.movedim(torch.from_numpy(sitk.GetArrayFromImage(image)), -1, 0).contiguous()
    return SpatialTransform(np.eye(4), field, grid_of_sitk(image))


def run_elastix(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(context.threads)   # number_of_threads= segfaults
    fixed_image = itk.imread(str(context.fixed_path), itk.F)
    moving_image = itk.imread(str(context.moving_path), itk.F)
    parameters = itk.ParameterObject.New()
    affine = parameters.GetDefaultParameterMap("affine")
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
    bspline = parameters.GetDefaultParameterMap("bspline")
    for parameter_map in (affine, bspline):
        parameter_map["WriteResultImage"] = ["false"]
        parameters.AddParameterMap(parameter_map)
    _, result = itk.elastix_registration_method(fixed_image, moving_image, parameter_object=parameters,
                                                log_to_console=False, output_directory=str(context.workdir))
    field = itk.transformix_deformation_field(moving_image, result, output_directory=str(context.workdir))
    path = context.workdir / "elastix_field.mha"
    itk.imwrite(field, str(path))
    return read_displacement_field(path)


def run_ants(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    import ants

    fixed_image, moving_image = ants.image_read(str(context.fixed_path)), ants.image_read(str(context.moving_path))
    result = ants.registration(fixed_image, moving_image, type_of_transform="SyN", random_seed=1,
                               outprefix=str(context.workdir / "ants_"))
    path = ants.apply_transforms(fixed_image, moving_image, transformlist=result["fwdtransforms"],
                                 compose=str(context.workdir / "ants_composed_"))
    return read_displacement_field(path)


def run_greedy(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    from picsl_greedy import Greedy3D

    greedy = Greedy3D()
    images = f"-threads {context.threads} -d 3 -i {context.fixed_path} {context.moving_path}"
    affine, warp, composed = (context.workdir / name for name in ("greedy_affine.mat", "greedy_warp.nii.gz",
                                                                   "greedy_composed.nii.gz"))
    greedy.execute(f"{images} -a -dof 12 -ia-image-centers -m NCC 2x2x2 -o {affine}")
    greedy.execute(f"{images} -it {affine} -m NCC 2x2x2 -s 2.0vox 0.5vox -o {warp}")
    greedy.execute(f"-threads {context.threads} -d 3 -rf {context.fixed_path} -rc {composed} -r {warp} {affine}")
    return read_displacement_field(composed)


def run_niftyreg(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    from niftyreg import bin_path

    work = context.workdir
    common = ["-ref", str(context.fixed_path), "-flo", str(context.moving_path), "-omp", str(context.threads)]
    _run([bin_path / "reg_aladin", *common, "-aff", work / "aladin.txt", "-res", work / "aladin.nii.gz"], work)
    _run([bin_path / "reg_f3d", *common, "-aff", work / "aladin.txt", "-cpp", work / "f3d_cpp.nii.gz",
          "-res", work / "f3d.nii.gz"], work)
    _run([bin_path / "reg_transform", "-ref", context.fixed_path, "-def", work / "f3d_cpp.nii.gz",
          work / "deformation.nii.gz"], work)
    positions = sitk.ReadImage(str(work / "deformation.nii.gz"), sitk.sitkVectorFloat32)
    if grid_of_sitk(positions).size_ijk != fixed.grid.size_ijk:
        raise RuntimeError(f"reg_transform wrote a {positions.GetSize()} field for a {fixed.grid.size_ijk} image")
    ras = torch.from_numpy(sitk.GetArrayFromImage(positions)).double()
    moving_points = ras @ torch.as_tensor(LPS_TO_RAS).T          # the matrix is its own inverse
    field = torch.movedim(moving_points - fixed.grid.world_points(dtype=torch.float64), -1, 0).float().contiguous()
    return SpatialTransform(np.eye(4), field, fixed.grid)


def run_convexadam(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    from convexAdam.convex_adam_MIND import convex_adam_pt

    start = SpatialTransform.from_affine(_translation(moving.grid.centre_world() - fixed.grid.centre_world()))
    resampled = resample_image(moving, fixed.grid, start, fill=float(moving.data.min()))
    voxels = convex_adam_pt(fixed.data.numpy(), resampled.data.numpy(), dtype=torch.float32,
                            device=torch.device("cpu"))
    # (D, H, W, 3) displacements in voxels along the array axes (k, j, i): to LPS mm.
    index_steps = torch.as_tensor(fixed.grid.index_to_world()[:3, :3])
    ijk = torch.from_numpy(np.ascontiguousarray(voxels[..., ::-1])).double()
    field = torch.einsum("ca,dhwa->cdhw", index_steps, ijk).float().contiguous()
    return SpatialTransform(start.affine, field, fixed.grid)


def _translation(offset_mm: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = offset_mm
    return matrix


def _run(command: list, workdir: Path) -> None:
    """Runs an executable; a non-zero exit raises with its error lines (or its last line)."""
    done = subprocess.run([str(part) for part in command], cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
        errors = [line for line in output if "ERROR" in line] or output[-1:]
        raise RuntimeError(f"{Path(command[0]).name} exited with {done.returncode}: {' | '.join(errors)}")


PEER_METHODS = [
    Method("elastix", "elastix affine + B-spline", "default 'affine' + 'bspline' parameter maps, geometrical-centre "
           "initialisation", run_elastix, ("itk",), ("itk-elastix",)),
    Method("ants", "ANTs SyN", "ants.registration(type_of_transform='SyN', random_seed=1): centre of mass, affine, "
           "SyN (Mattes MI), default iterations", run_ants, ("ants",), ("antspyx",)),
    Method("niftyreg", "NiftyReg aladin + f3d", "reg_aladin then reg_f3d, default options", run_niftyreg,
           ("niftyreg",), ("niftyreg",)),
    Method("greedy", "greedy affine + deformable", "-a -dof 12 -ia-image-centers -m NCC 2x2x2; -m NCC 2x2x2 "
           "-s 2.0vox 0.5vox", run_greedy, ("picsl_greedy",), ("picsl-greedy",)),
    Method("convexadam", "ConvexAdam", "convex_adam_pt defaults (MIND-SSC, float32), after an image-centre "
           "translation", run_convexadam, ("convexAdam",), ("convexadam",)),
]
