"""The names of the files of an output folder: a stable contract (CLI, Slicer module, scripts).

``transform.h5`` (whole result, fixed -> moving, one ITK transform), ``affine.tfm`` (when an affine
stage ran), ``displacement.nii.gz`` (phi(x) - x on the fixed grid), ``warped.nii.gz``,
``jacobian.nii.gz``, ``warped_labels.nii.gz`` (with moving labels), ``summary.json`` and
``overview.png``; for modes with an inverse (TVF) also ``inverse_transform.h5`` (moving -> fixed)
and ``inverse_jacobian.nii.gz`` (its Jacobian determinant on the moving grid). Written by
:mod:`.outputs`; read without torch by the Slicer module's own process (:mod:`.mrml`).
"""

TRANSFORM_FILE = "transform.h5"
AFFINE_FILE = "affine.tfm"
DISPLACEMENT_FILE = "displacement.nii.gz"
WARPED_FILE = "warped.nii.gz"
JACOBIAN_FILE = "jacobian.nii.gz"
WARPED_LABELS_FILE = "warped_labels.nii.gz"
SUMMARY_FILE = "summary.json"
OVERVIEW_FILE = "overview.png"
INVERSE_TRANSFORM_FILE = "inverse_transform.h5"
INVERSE_JACOBIAN_FILE = "inverse_jacobian.nii.gz"
OUTPUT_FILES = (TRANSFORM_FILE, AFFINE_FILE, DISPLACEMENT_FILE, WARPED_FILE, JACOBIAN_FILE, WARPED_LABELS_FILE,
                SUMMARY_FILE, OVERVIEW_FILE, INVERSE_TRANSFORM_FILE, INVERSE_JACOBIAN_FILE)
"""Every file a run may write; those a run does not write are removed from its folder."""
