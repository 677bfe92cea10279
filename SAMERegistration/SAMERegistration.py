"""SAMERegistration: deformable registration of CT volumes in 3D Slicer.

Five roles, one class each: module metadata, typed parameter node, widget, logic (usable without
the widget), and test. The computation runs in a separate Python process
(:mod:`SAMERegistrationLib.worker`); every node conversion lives in :mod:`SAMERegistrationLib.mrml`.
Heavy imports (the library, numpy, SimpleITK) happen inside functions, so the module appears at
once; torch is never imported in Slicer's process (only the worker and probe processes load it).
"""

import enum
import logging
import os
import pathlib
import shutil
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLGridTransformNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MINIMUM_TORCH_VERSION = "2.2"
"""Oldest PyTorch the backend supports (asked of PyTorchUtils when installing)."""
OTHER_REQUIREMENTS = {"psutil": "psutil>=5.9"}
"""Python packages the backend needs besides torch, SimpleITK and numpy (Slicer's own are used)."""


def _moduleRoot() -> str:
    """The folder holding this file and, beside it, ``SAMERegistrationLib`` (source tree and
    installed extension alike; see CMakeLists.txt)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(candidate, "SAMERegistrationLib")):
            return candidate
    return here


def _resourcePath(relativePath: str) -> str:
    """A file of ``Resources/`` (next to SAMERegistrationLib in both layouts)."""
    return os.path.join(_moduleRoot(), "Resources", relativePath)


def _importLibraryPath() -> None:
    """Makes ``SAMERegistrationLib`` importable (its light parts, such as the probe client, import
    no torch)."""
    root = _moduleRoot()
    if root not in sys.path:
        sys.path.insert(0, root)


def _importLibrary():
    """Imports the backend's MRML bridge (numpy, SimpleITK and VTK: never torch, which only the
    registration process loads)."""
    _importLibraryPath()
    from SAMERegistrationLib import mrml

    return mrml


#
# Module metadata
#
class SAMERegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAME Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["SAMERegistration developers (SAMERegistration project)"]
        iconPath = _resourcePath("Icons/SAMERegistration.png")
        if os.path.isfile(iconPath):  # also from a source tree, where Resources/ is beside this folder
            self.parent.icon = qt.QIcon(iconPath)
        self.parent.helpText = _("""
Deformable registration of 3-D images (CT first): the moving volume (and segmentation) is aligned
to the fixed volume. The computation runs in a background process: Slicer stays responsive, Apply
turns into Cancel, and the progress bar names each stage.
<p><b>Modes</b></p>
<ul>
<li><b>Intensity baseline</b> (available): initial alignment from body masks, affine, then a
diffeomorphic deformable stage on a stationary velocity field, all driven by local normalised
cross-correlation. Works across patients and scanners; limits: intensity only, so large
anatomical differences (organs that are absent or very differently shaped) are only partly
recovered; about a minute on a CPU at the default preset.</li>
<li><b>SAME</b> (three stages, each switchable: SAM-affine; SAM-affine + SAM-coarse; all three
with SAM-VoxelMorph): matches self-supervised anatomical embeddings (SAM) of both images instead of
intensities, so it copes with large initial misalignment and different patients. Uses the SAM
weights shipped with the extension (checked by checksum) or your own weights file; the third stage,
SAM-VoxelMorph, is a network refined on the pair. Limits: trained for CT on few scans; SAM-coarse
may fold a few voxels (the log gives the %).</li>
<li><b>TVF-diffeomorphic</b>: SAM-affine and SAM-coarse (turned into small invertible velocity
steps), then eight time-dependent velocity fields predicted by a network, all refined on the pair;
smooth and invertible by construction, it gives the inverse
transform (moving to fixed) too, e.g. to map segmentations both ways. Limits: trained for CT on
few scans.</li>
</ul>
<p><b>Outputs</b>: the whole transform as a grid transform (fixed to moving, so the moving volume
placed under it lines up with the fixed one; it saves as an ITK displacement field), optionally the
affine part as a linear transform (both reference the fixed and moving volumes), the warped
volume, the Jacobian determinant map inside the fixed body (white = 1, blue = compression, red =
expansion, yellow = folded, J &lt;= 0; the log gives the % of folded voxels; "Jacobian over the fixed
volume" shows it over the anatomy) and the warped segmentation. Inputs are never modified; Apply again with the same outputs replaces them.</p>
<p>Presets set the finest working voxel size: Fast 4 mm, Balanced 3 mm, Quality 2 mm. Device
Auto uses a GPU when PyTorch sees one; a check before the run offers the CPU when the images
will not fit in GPU memory. PyTorch and the GPU are used by the registration process only, never
by Slicer's own process.</p>
<p><b>Masks</b>: the fixed mask limits the comparison to its segments (default: the body); with a
moving mask, moving voxels outside its segments take no part in it.</p>
<p><b>Advanced</b> (collapsed): the similarity and iterations of the learned stages' refinement,
the segment interpolation, CPU threads, and keeping the run's files (then "Show folder" opens
them). <b>Saved settings</b> keep every choice except the nodes under a name, for any scene;
the <b>parameter set</b> selector at the top holds several set-ups in one scene.</p>
<p><b>Sample data</b>: the SampleData module offers the bundled pair of abdomen CTs with their
segmentations (category "SAME Registration").</p>
""")
        slicer.app.connect("startupCompleted()", registerSampleData)
        self.parent.acknowledgementText = _("""
Methods: SAME: Liu F. et al., "SAME: Deformable Image Registration based on Self-supervised
Anatomical Embeddings", MICCAI 2021, and SAME++ (Tian L. et al., 2023); SAM: Yan K. et al.,
"SAM: Self-supervised Learning of Pixel-wise Anatomical Embeddings in Radiological Images", IEEE
TMI 2022; TransMorph-TVF: Chen J. et al., "Unsupervised learning of diffeomorphic image
registration via TransMorph", WBIR 2022 / MedIA 2022; DeepSim: Czolbe S. et al., "DeepSim:
Semantic similarity metrics for learned image registration", MIDL 2021; Li and Fan: "Non-rigid
image registration using fully convolutional networks with deep self-supervision" (Li H., Fan Y.,
arXiv 2017 / ISBI 2018). Sample data: TotalSegmentator (CC BY 4.0).
""")


#
# Sample data
#
SAMPLE_FILES = (
    ("patientC_abdomen_ct.nii.gz", "SAME fixed CT (patient C)", "VolumeFile"),
    ("patientA_abdomen_ct.nii.gz", "SAME moving CT (patient A)", "VolumeFile"),
    ("patientC_abdomen_labels.nii.gz", "SAME fixed segments (patient C)", "SegmentationFile"),
    ("patientA_abdomen_labels.nii.gz", "SAME moving segments (patient A)", "SegmentationFile"),
)
"""The bundled inter-patient pair (Resources/SampleData; TotalSegmentator, CC BY 4.0) as the
SampleData module loads it: file, node name, file type."""


def registerSampleData() -> None:
    """Offers the bundled pair in the SampleData module ("Download Sample Data"), from the files
    shipped with the extension (file:// addresses: nothing is downloaded)."""
    import SampleData

    folder = pathlib.Path(_resourcePath("SampleData"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SAME Registration",
        sampleName="SAMERegistrationAbdomenPair",
        thumbnailFileName=_resourcePath("Icons/SAMERegistration.png"),
        uris=[(folder / name).as_uri() for name, _, _ in SAMPLE_FILES],
        fileNames=[name for name, _, _ in SAMPLE_FILES],
        nodeNames=[node for _, node, _ in SAMPLE_FILES],
        loadFileType=[kind for _, _, kind in SAMPLE_FILES],
    )


#
# Parameter node
#
class RegistrationMode(enum.Enum):
    INTENSITY = "intensity"
    SAME = "same"
    TVF = "tvf"
    TVF_LDDMM = "tvf-lddmm"

    @property
    def isTVF(self) -> bool:
        """True for the modes that also give the inverse transform."""
        return self in (RegistrationMode.TVF, RegistrationMode.TVF_LDDMM)

    def label(self):
        return {"intensity": _("Intensity baseline"), "same": _("SAME (three-stage)"),
                "tvf": _("TVF-diffeomorphic"), "tvf-lddmm": _("TVF-diffeomorphic (LDDMM regulariser)")}[self.value]


class Preset(enum.Enum):
    FAST = 4.0
    BALANCED = 3.0
    QUALITY = 2.0

    def label(self):
        return {4.0: _("Fast (4 mm)"), 3.0: _("Balanced (3 mm)"), 2.0: _("Quality (2 mm)")}[self.value]


class LabelInterpolation(enum.Enum):
    NEAREST = "nearest"
    ONEHOT = "onehot"

    def label(self):
        return {"nearest": _("Nearest neighbour"), "onehot": _("One-hot (smoother)")}[self.value]


class Device(enum.Enum):
    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self):
        return {"auto": _("Auto"), "cuda": _("GPU"), "cpu": _("CPU")}[self.value]


@parameterNodeWrapper
class SAMERegistrationParameterNode:
    """Everything the widget shows, saved with the scene."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    initialTransform: vtkMRMLTransformNode
    fixedMask: vtkMRMLSegmentationNode
    movingMask: vtkMRMLSegmentationNode
    mode: RegistrationMode = RegistrationMode.SAME
    sameAffineStage: bool = True
    sameCoarseStage: bool = True
    sameDeformableStage: bool = True
    customWeights: pathlib.Path = pathlib.Path()
    preset: Preset = Preset.QUALITY
    device: Device = Device.AUTO
    outputTransform: vtkMRMLGridTransformNode
    outputAffine: vtkMRMLLinearTransformNode
    warpedVolume: vtkMRMLScalarVolumeNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    warpedSegmentation: vtkMRMLSegmentationNode
    inverseTransform: vtkMRMLTransformNode
    showOverlay: bool = True
    showGrid: bool = True
    gridSpacing: Annotated[float, WithinRange(2.0, 100.0)] = 15.0
    showJacobian: bool = False
    similarity: str = ""
    refineIterations: Annotated[int, WithinRange(-1, 100000)] = -1
    precisionIterations: Annotated[int, WithinRange(0, 100000)] = 0
    labelInterpolation: LabelInterpolation = LabelInterpolation.NEAREST
    threads: Annotated[int, WithinRange(0, 1024)] = 0
    keepFiles: bool = False


SAVED_SETTINGS = ("mode", "sameAffineStage", "sameCoarseStage", "sameDeformableStage", "customWeights", "preset",
                  "device", "showOverlay", "showGrid", "gridSpacing", "showJacobian", "similarity",
                  "refineIterations", "precisionIterations", "labelInterpolation", "threads", "keepFiles")
"""The parameters a saved settings set holds: every choice except the nodes (which belong to a scene)."""
SETTINGS_KEY = "SAMERegistration/SavedSettings"
"""Application settings key of the saved settings: a JSON object {name: {parameter: value}}."""


def settingsToJson(parameters) -> dict:
    """The :data:`SAVED_SETTINGS` of a parameter node as JSON values (enums by value, paths as text)."""
    values = {}
    for name in SAVED_SETTINGS:
        value = getattr(parameters, name)
        values[name] = value.value if isinstance(value, enum.Enum) else str(value) if isinstance(value, pathlib.Path) else value
    return values


def applySettingsJson(parameters, values: dict) -> None:
    """Sets the parameters named in ``values`` (see :func:`settingsToJson`); unknown names are ignored."""
    for name in SAVED_SETTINGS:
        if name not in values:
            continue
        current, value = getattr(parameters, name), values[name]
        if isinstance(current, enum.Enum):
            value = type(current)(value)
        elif isinstance(current, pathlib.Path):
            value = pathlib.Path(value)
        setattr(parameters, name, value)


def workerRequest(parameters) -> dict:
    """The worker's request fields (see SAMERegistrationLib/worker.py) for the parameter node's
    method and advanced choices (the input files are added by the MRML bridge)."""
    mode = libraryModeName(parameters)
    options = {"spacing": parameters.preset.value}
    if parameters.threads > 0:
        options["threads"] = parameters.threads
    request = {"mode": mode, "device": parameters.device.value, "options": options,
               "label_method": parameters.labelInterpolation.value}
    weights = str(parameters.customWeights)
    if mode != "intensity" and weights not in ("", "."):
        request["sam_weights"] = weights
    if mode == "same":
        request["sam_coarse"] = parameters.sameCoarseStage
    if parameters.similarity.strip():
        request["similarity"] = parameters.similarity.strip()
    if parameters.refineIterations >= 0:
        request["refine_iterations"] = parameters.refineIterations
    if mode == "same" and parameters.precisionIterations > 0:
        request["precision_iterations"] = parameters.precisionIterations
    return request


def libraryModeName(parameters) -> str:
    """The backend's mode name (see SAMERegistrationLib/modes.py) for the chosen mode and SAME stages.

    Raises:
        ValueError: a combination of SAME stages that has no mode.
    """
    if parameters.mode == RegistrationMode.SAME:
        stages = (parameters.sameAffineStage, parameters.sameCoarseStage, parameters.sameDeformableStage)
        names = {(True, False, False): "affine", (True, True, False): "coarse", (True, True, True): "same",
                 (True, False, True): "same"}
        if stages not in names:
            raise ValueError(_("SAME stages: SAM-affine is always needed; add SAM-coarse and/or SAM-VoxelMorph"))
        return names[stages]
    return parameters.mode.value


#
# Widget
#
class SAMERegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resourcePath("UI/SAMERegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMERegistrationLogic()
        self.logic.onEvent = self.onRegistrationEvent
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        # several set-ups per scene: the selector lists this module's parameter nodes
        self.ui.parameterNodeSelector.addAttribute("vtkMRMLScriptedModuleNode", "ModuleName", self.moduleName)
        self.ui.parameterNodeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onParameterNodeSelected)
        self.ui.showFolderButton.connect("clicked(bool)", self.onShowFolder)
        self.ui.saveSettingsButton.connect("clicked(bool)", self.onSaveSettings)
        self.ui.deleteSettingsButton.connect("clicked(bool)", self.onDeleteSettings)
        self.ui.savedSettingsComboBox.connect("activated(int)", self.onSavedSettingsChosen)
        self.updateSavedSettingsList()
        self.initializeParameterNode()
        self.logic.onProbeAnswer = self.updateDeviceInfo
        qt.QTimer.singleShot(0, self.logic.startProbe)  # after the module is shown

    def cleanup(self) -> None:
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        selected = self.ui.parameterNodeSelector.currentNode()
        self.setParameterNode(SAMERegistrationParameterNode(selected) if selected else self.logic.getParameterNode())

    def onParameterNodeSelected(self, node) -> None:
        if node is not None and (self._parameterNode is None or node != self._parameterNode.parameterNode):
            self.setParameterNode(SAMERegistrationParameterNode(node))

    def setParameterNode(self, inputParameterNode: Optional[SAMERegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            wasBlocked = self.ui.parameterNodeSelector.blockSignals(True)
            self.ui.parameterNodeSelector.setCurrentNode(self._parameterNode.parameterNode)
            self.ui.parameterNodeSelector.blockSignals(wasBlocked)
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            self.updateGui()

    def updateDeviceInfo(self) -> None:
        self.ui.deviceInfoLabel.text = self.logic.deviceDescription()
        self.updateGui()

    # ------------------------------------------------------------------ saved settings and folders
    def updateSavedSettingsList(self) -> None:
        self.ui.savedSettingsComboBox.clear()
        names = self.logic.savedSettingsNames()
        self.ui.savedSettingsComboBox.addItems(names or [_("(none saved yet)")])
        self.ui.savedSettingsComboBox.enabled = bool(names)
        self.ui.deleteSettingsButton.enabled = bool(names)

    def onSaveSettings(self) -> None:
        name = qt.QInputDialog.getText(slicer.util.mainWindow(), _("Save settings"), _("Name of these settings:"))
        if name and name.strip() and self._parameterNode:
            self.logic.saveSettings(self._parameterNode, name.strip())
            self.updateSavedSettingsList()
            self.ui.savedSettingsComboBox.currentText = name.strip()

    def onSavedSettingsChosen(self, index: int) -> None:
        name = self.ui.savedSettingsComboBox.itemText(index)
        if self._parameterNode and name in self.logic.savedSettingsNames():
            self.logic.loadSettings(self._parameterNode, name)

    def onDeleteSettings(self) -> None:
        name = self.ui.savedSettingsComboBox.currentText
        if name in self.logic.savedSettingsNames() and slicer.util.confirmOkCancelDisplay(
                _("Forget the saved settings '{name}'?").format(name=name)):
            self.logic.deleteSettings(name)
            self.updateSavedSettingsList()

    def onShowFolder(self) -> None:
        if self.logic.keptFolder is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.logic.keptFolder)))

    def updateGui(self, caller=None, event=None) -> None:
        """Enables what can be used now and says why Apply is not available."""
        parameters = self._parameterNode
        if parameters is None:
            return
        running = self.logic.isRunning
        reason = None
        if not parameters.fixedVolume or not parameters.movingVolume:
            reason = _("Select a fixed and a moving volume.")
        elif parameters.fixedVolume == parameters.movingVolume:
            reason = _("The fixed and the moving volume must be different volumes.")
        else:
            try:
                mode = libraryModeName(parameters)
                # the intensity baseline is always there: no need to import the backend to know it
                available = self.logic.availableModes() if mode != "intensity" else None
                if available is not None and mode not in available:
                    reason = _("Mode '{mode}' is not available in this version: use the intensity baseline.").format(mode=mode)
            except ValueError as error:
                reason = str(error)
        same = parameters.mode == RegistrationMode.SAME
        self.ui.sameStagesGroupBox.enabled = same and not running
        self.ui.weightsPathLineEdit.enabled = same and not running
        self.ui.inverseTransformSelector.enabled = parameters.mode.isTVF and not running
        self.ui.gridSpacingSpinBox.enabled = parameters.showGrid
        self.ui.modeDescriptionLabel.text = {
            RegistrationMode.INTENSITY: _("Initial alignment, affine and diffeomorphic deformable stages on intensities."),
            RegistrationMode.SAME: self.sameDescription() if same else "",
            RegistrationMode.TVF: _("SAM-affine, then time-dependent velocity fields; also gives the inverse transform."),
            RegistrationMode.TVF_LDDMM: _("As TVF-diffeomorphic, with the LDDMM regulariser (smoother, never folds); "
                                          "also gives the inverse transform."),
        }[parameters.mode]
        for widget in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.advancedCollapsibleButton, self.ui.parameterNodeSelector):
            widget.enabled = not running
        self.ui.showFolderButton.enabled = self.logic.keptFolder is not None and self.logic.keptFolder.is_dir()
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the registration (no output is changed).")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.toolTip = reason or _("Run the registration.")
            self.ui.applyButton.enabled = reason is None

    def sameDescription(self) -> str:
        available = self.logic.availableModes()
        stages = {"affine": _("SAM-affine"), "coarse": _("SAM-affine + SAM-coarse"), "same": _("all three stages")}
        if available is None:
            return _("Self-supervised anatomical embeddings (available stages are known once PyTorch is installed).")
        offered = [label for mode, label in stages.items() if mode in available]
        return _("Self-supervised anatomical embeddings. Available: {stages}.").format(
            stages=", ".join(offered) if offered else _("none in this version"))

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()  # reports a "finished" event with state "cancelled"
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            self.logic.startProbe()  # (once: after a first install the GPU is not known yet)
            parameters = self._parameterNode
            warning = self.logic.preflight(parameters)
            if warning:
                if not slicer.util.confirmYesNoDisplay(warning + "\n\n" + _("Run on the CPU instead?")):
                    return
                parameters.device = Device.CPU
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Writing the inputs...")  # on a background thread, then the worker starts
            self.logic.process(parameters, waitForCompletion=False)
            self.updateGui()

    def onRegistrationEvent(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.ui.progressBar.value = int(round(100 * event["overall_fraction"]))
            self.ui.progressBar.format = f"%p%  {event['stage']}"
            self.ui.statusLabel.text = _("Stage {index}/{count}: {stage}  {message}").format(
                index=event["stage_index"] + 1, count=event["stage_count"], stage=event["stage"], message=event["message"])
        elif kind in ("log", "warning", "error", "started", "note"):
            self.appendLog(event.get("message") or f"{kind}: {event}")
        elif kind == "finished":
            self.ui.progressBar.hide()
            if event["state"] == "completed":
                self.ui.statusLabel.text = _("Done.")
                for line in self.logic.resultReport():
                    self.appendLog(line)
            elif event["state"] == "cancelled":
                self.ui.statusLabel.text = _("Cancelled: no output was changed.")
                self.appendLog(self.ui.statusLabel.text)
            else:
                self.ui.statusLabel.text = _("Failed: {error}").format(error=event.get("error"))
                slicer.util.errorDisplay(_("Registration failed: {error}").format(error=event.get("error")))
            self.updateGui()


#
# Logic
#
class SAMERegistrationLogic(ScriptedLoadableModuleLogic):
    """Runs registrations of MRML nodes; usable from scripts:

    >>> logic = SAMERegistrationLogic()
    >>> parameters = logic.getParameterNode()
    >>> parameters.fixedVolume, parameters.movingVolume = fixed, moving
    >>> logic.process(parameters, waitForCompletion=True)   # fills parameters.outputTransform ...
    """

    POLL_INTERVAL_MS = 100

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.onEvent = None
        self.run = None
        self._timer = None
        self._parameters = None
        self._probe = None
        self._probeTimer = None
        self.onProbeAnswer = None
        self.keptFolder = None
        """The folder of the last run when it was kept (Advanced: keep intermediate files)."""

    def getParameterNode(self):
        return SAMERegistrationParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self.run is not None and self.run.running

    # ------------------------------------------------------------------ dependencies and devices
    @staticmethod
    def missingDependencies() -> list:
        import importlib.util

        missing = [] if importlib.util.find_spec("torch") else [f"torch>={MINIMUM_TORCH_VERSION}"]
        missing += [req for module, req in OTHER_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
        return missing

    def ensureDependencies(self, askUser: bool = True) -> bool:
        """Installs PyTorch (through the PyTorch extension's PyTorchUtils, CUDA or CPU build) and the
        other requirements, after asking the user once. Slicer's own SimpleITK and numpy are kept.

        Returns False when the user declined. Raises RuntimeError when PyTorchUtils is missing.
        """
        missing = self.missingDependencies()
        if not missing:
            self._checkTorchVersion()
            return True
        if askUser and not slicer.app.commandOptions().testingEnabled:
            if not slicer.util.confirmOkCancelDisplay(
                    _("SAME Registration needs these Python packages, which will be downloaded and installed now "
                      "(a few minutes; PyTorch picks a GPU build when it finds an NVIDIA driver):\n\n{packages}")
                    .format(packages="\n".join(missing))):
                return False
        if any(item.startswith("torch") for item in missing):
            try:
                import PyTorchUtils
            except ModuleNotFoundError as error:
                raise RuntimeError(_("This module needs the PyTorch extension: install 'PyTorch' from the Extensions "
                                     "Manager, restart Slicer, then try again.")) from error
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                raise RuntimeError(_("PyTorch could not be installed: see the PyTorch Utils module."))
        for module, requirement in OTHER_REQUIREMENTS.items():
            if requirement in missing:
                slicer.util.pip_install(requirement)  # no dependencies of its own: numpy/SimpleITK untouched
        self._checkTorchVersion()
        return True

    @staticmethod
    def _checkTorchVersion() -> None:
        """From the installed package's metadata: importing torch here would load it into Slicer."""
        import importlib.metadata

        version = importlib.metadata.version("torch")
        installed = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
        required = tuple(int(part) for part in MINIMUM_TORCH_VERSION.split("."))
        if installed < required:
            raise RuntimeError(_("PyTorch {installed} is too old: {required} or newer is needed; update it in the "
                                 "PyTorch Utils module.").format(installed=version, required=MINIMUM_TORCH_VERSION))

    # The registration process, not Slicer's own, imports torch and talks to the GPU: what it will
    # find is asked of a probe process (SAMERegistrationLib/probe.py), so Slicer never holds a CUDA
    # context (GPU memory the worker would lack).
    def startProbe(self) -> None:
        """Starts the probe (when PyTorch is installed); ``onProbeAnswer`` is called once it has answered."""
        if self._probe is not None or self.missingDependencies():
            return
        _importLibraryPath()
        from SAMERegistrationLib.probe import Probe

        self._probe = Probe(python=self.pythonExecutable()).start()
        self._probeTimer = qt.QTimer()
        self._probeTimer.setInterval(self.POLL_INTERVAL_MS)
        self._probeTimer.timeout.connect(self._pollProbe)
        self._probeTimer.start()

    def _pollProbe(self) -> None:
        if self._probe.answer() is not None or self._probe.error is not None:
            self._probeTimer.stop()
            if self.onProbeAnswer is not None:
                self.onProbeAnswer()

    def probeAnswer(self) -> Optional[dict]:
        """What the registration process finds (see SAMERegistrationLib/probe.py), None until known."""
        return None if self._probe is None else self._probe.answer()

    def deviceDescription(self) -> str:
        """The GPU the registration process sees (nothing is installed), for the device selector."""
        if self.missingDependencies():
            return _("PyTorch is not installed yet: it is installed at the first Apply.")
        answer = self.probeAnswer()
        if answer is None:
            if self._probe is not None and self._probe.error:
                return _("Could not ask PyTorch for the GPU: {error}").format(error=self._probe.error)
            return _("Checking for a GPU...")
        gpu = answer["gpu"]
        if gpu is None:
            return _("No CUDA GPU found: the CPU is used ({threads} threads).").format(threads=answer["threads"])
        return _("GPU: {name}, {memory:.0f} GiB ({free:.0f} GiB free)").format(
            name=gpu["name"], memory=gpu["total_gib"], free=gpu["free_gib"])

    def availableModes(self):
        """The backend's available mode names, or None while not known (PyTorch missing, probe running)."""
        answer = self.probeAnswer()
        return None if answer is None else tuple(answer["modes"])

    def preflight(self, parameters) -> Optional[str]:
        """A warning when the images will not fit in the GPU's memory (None when fine or no GPU);
        asked of a probe process (a few seconds)."""
        answer = self.probeAnswer()
        if parameters.device == Device.CPU or answer is None or answer["gpu"] is None:
            return None
        _importLibraryPath()
        from SAMERegistrationLib.probe import Probe

        check = {"spacing": parameters.preset.value}
        for role, node in (("fixed", parameters.fixedVolume), ("moving", parameters.movingVolume)):
            matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            dims = node.GetImageData().GetDimensions()
            check[role] = {"shape": [dims[2], dims[1], dims[0]],
                           "ijk_to_ras": [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]}
        result = Probe(python=self.pythonExecutable(), memory_check=check).start().wait(timeout=120)
        if result is None or result["memory_error"] is None:
            return None
        return _("The images will probably not fit in GPU memory: {error}").format(error=result["memory_error"])

    # ------------------------------------------------------------------ saved settings
    @staticmethod
    def _savedSettings() -> dict:
        import json

        text = qt.QSettings().value(SETTINGS_KEY, "")
        try:
            saved = json.loads(text) if text else {}
        except ValueError:
            saved = {}
        return saved if isinstance(saved, dict) else {}

    @staticmethod
    def _storeSavedSettings(saved: dict) -> None:
        import json

        qt.QSettings().setValue(SETTINGS_KEY, json.dumps(saved, sort_keys=True))

    def savedSettingsNames(self) -> list:
        return sorted(self._savedSettings())

    def saveSettings(self, parameters, name: str) -> None:
        """Saves the parameter node's choices (:data:`SAVED_SETTINGS`, no nodes) under ``name`` in
        the application settings, for any scene."""
        saved = self._savedSettings()
        saved[name] = settingsToJson(parameters)
        self._storeSavedSettings(saved)

    def loadSettings(self, parameters, name: str) -> None:
        """Applies the settings saved under ``name`` to the parameter node."""
        applySettingsJson(parameters, self._savedSettings()[name])

    def deleteSettings(self, name: str) -> None:
        saved = self._savedSettings()
        saved.pop(name, None)
        self._storeSavedSettings(saved)

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's own Python (PythonSlicer), which sees the same packages as Slicer."""
        return shutil.which("PythonSlicer") or sys.executable

    # ------------------------------------------------------------------ running
    def process(self, parameters, waitForCompletion: bool = True, timeout: Optional[float] = None):
        """Registers ``parameters.movingVolume`` to ``parameters.fixedVolume``.

        With ``waitForCompletion`` it blocks and returns the filled output nodes (scripts, tests);
        otherwise it returns at once, a QTimer polls the worker and ``onEvent`` receives its events.
        Output nodes created here are stored in ``parameters`` so that the next run replaces them.

        Raises:
            ValueError: unusable inputs (nothing is started).
            RuntimeError: the registration failed (blocking mode).
        """
        if self.isRunning:
            raise RuntimeError(_("A registration is already running."))
        mrml = _importLibrary()
        inputs = mrml.RegistrationInputs(
            fixed=parameters.fixedVolume, moving=parameters.movingVolume,
            fixed_segmentation=parameters.fixedSegmentation, moving_segmentation=parameters.movingSegmentation,
            fixed_mask=parameters.fixedMask, moving_mask=parameters.movingMask,
            initial_transform=parameters.initialTransform)
        outputs = mrml.RegistrationOutputs(
            transform=parameters.outputTransform, affine=parameters.outputAffine, warped=parameters.warpedVolume,
            jacobian=parameters.jacobianVolume, warped_segmentation=parameters.warpedSegmentation,
            inverse=parameters.inverseTransform if parameters.mode.isTVF else None)
        self._parameters = parameters
        self.run = mrml.NodeRegistration(inputs, outputs, workerRequest(parameters), python=self.pythonExecutable(),
                                         work_dir=slicer.app.temporaryPath, keep_files=parameters.keepFiles).start()
        self.keptFolder = pathlib.Path(self.run.folder) if parameters.keepFiles else None
        if self.keptFolder is not None:
            self._emit({"event": "note", "message": _("Files of this run are kept in {folder}").format(folder=self.keptFolder)})
        logging.info(f"SAMERegistration: writing the inputs in {self.run.folder}, then starting the registration process")
        for note in self.run.log:
            self._emit({"event": "note", "message": note})
        if waitForCompletion:
            return self.run.wait(timeout, on_event=self._handle)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)
        self._timer.start()
        return None

    def waitForCompletion(self, timeout: Optional[float] = None):
        """Blocks until a run started with ``waitForCompletion=False`` ends; returns its output nodes."""
        if self._timer is not None:
            self._timer.stop()
        if self.run is None:
            return None
        return self.run.wait(timeout, on_event=self._handle)

    def cancel(self) -> None:
        """Stops the worker process tree (SIGTERM, then SIGKILL): no output node is created or changed."""
        if self._timer is not None:
            self._timer.stop()
        if self.run is not None and self.run.running:
            self.run.cancel()
            self._emit({"event": "finished", "state": "cancelled", "error": "cancelled"})

    def _poll(self) -> None:
        for event in self.run.poll():
            self._handle(event)

    def _handle(self, event: dict) -> None:
        if event.get("event") == "finished":
            if self._timer is not None:
                self._timer.stop()
            if event["state"] == "completed":
                self._storeOutputs()
        self._emit(event)

    def _emit(self, event: dict) -> None:
        if self.onEvent is not None:
            self.onEvent(event)

    def _storeOutputs(self) -> None:
        """Keeps the output nodes in the parameter node and shows the result."""
        mrml = _importLibrary()
        result, parameters = self.run.result, self._parameters
        parameters.outputTransform = result.transform
        parameters.warpedVolume = result.warped
        parameters.jacobianVolume = result.jacobian
        if result.warped_segmentation is not None:
            parameters.warpedSegmentation = result.warped_segmentation
        if result.inverse is not None:
            parameters.inverseTransform = result.inverse
        mrml.show_results(slicer.mrmlScene, parameters.fixedVolume, result.warped, result.transform,
                          overlay=parameters.showOverlay or parameters.showJacobian, grid=parameters.showGrid,
                          grid_spacing_mm=parameters.gridSpacing,
                          jacobian=result.jacobian if parameters.showJacobian else None)
        if (parameters.showOverlay or parameters.showJacobian) and slicer.app.layoutManager() is not None:
            slicer.util.resetSliceViews()

    def resultReport(self) -> list:
        """Lines for the log: time, folding, Dice."""
        summary = self.run.summary if self.run is not None else None
        if not summary:
            return []
        jacobian = summary.get("jacobian", {})
        lines = [_("Registered in {seconds:.1f} s on {device} ({mode}).").format(
            seconds=summary.get("registration_seconds", 0.0), device=summary.get("device"), mode=summary.get("mode"))]
        for stage in summary.get("stages", []):
            lines.append(f"  {stage['name']}: {stage['seconds']:.1f} s")
        if jacobian:
            lines.append(_("Jacobian inside the body: {fold:.3f} % folded voxels (J <= 0), std(J) {std:.3f}, "
                           "range {low:.2f} to {high:.2f}.").format(
                fold=jacobian["percent_nonpositive"], std=jacobian["std_jacobian"],
                low=jacobian.get("min_jacobian", float("nan")), high=jacobian.get("max_jacobian", float("nan"))))
        dice = summary.get("dice")
        if dice:
            lines.append(_("Mean Dice over {count} segments: {before:.3f} before, {after:.3f} after.").format(
                count=dice["labels_compared"], before=dice["mean_before_registration"], after=dice["mean"]))
        return lines


#
# Test
#
class SAMERegistrationTest(ScriptedLoadableModuleTest):
    """Runs a real small registration on the CPU with the logic (blocking path) and checks the
    outputs, with numpy and SimpleITK only: like the module, the test loads no torch into Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_registration_of_a_known_translation()

    def test_registration_of_a_known_translation(self):
        import numpy as np
        import SimpleITK as sitk

        torchBefore = "torch" in sys.modules
        logic = SAMERegistrationLogic()
        if not logic.ensureDependencies(askUser=False):
            self.fail("dependencies missing")
        mrml = _importLibrary()
        from SAMERegistrationLib.body import body_mask_array
        from SAMERegistrationLib.sitk_geometry import grid_of_sitk

        self.delayDisplay("Making a small CT pair with a known translation")
        source = sitk.ReadImage(_resourcePath("SampleData/patientA_torso_ct.nii.gz"), sitk.sitkFloat32)
        grid = grid_of_sitk(source).with_spacing(8.0)
        fixedImage = sitk.Resample(source, grid.size_ijk, sitk.Transform(), sitk.sitkLinear, grid.origin, grid.spacing,
                                   tuple(grid.direction_matrix.ravel()), -1024.0)
        shiftLps = np.array([30.0, -15.0, 10.0])  # moving(y) = fixed(y + shift): phi(x) = x - shift
        movingImage = sitk.Resample(fixedImage, fixedImage, sitk.TranslationTransform(3, tuple(shiftLps)),
                                    sitk.sitkLinear, -1024.0)
        fixed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
        moving = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
        for image, node in ((fixedImage, fixed), (movingImage, moving)):
            mrml.image_to_volume(mrml.VolumeArray(sitk.GetArrayFromImage(image), grid), node)
        movingBefore = slicer.util.arrayFromVolume(moving).copy()

        parameters = logic.getParameterNode()
        parameters.fixedVolume, parameters.movingVolume = fixed, moving
        parameters.device = Device.CPU
        parameters.preset = Preset.FAST
        self.delayDisplay("Registering (CPU)")
        result = logic.process(parameters, waitForCompletion=True, timeout=600)

        self.assertIsNotNone(result.transform)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(moving), movingBefore), "moving volume modified")
        self.assertIsNone(moving.GetParentTransformNode())
        body = body_mask_array(sitk.GetArrayFromImage(fixedImage), grid, True).astype(bool)
        indexToWorld = grid.index_to_world()
        points = np.argwhere(body)[:, ::-1] @ indexToWorld[:3, :3].T + indexToWorld[:3, 3]  # (i, j, k) -> LPS mm
        error = np.linalg.norm(mrml.map_points_lps(result.transform, points) - (points - shiftLps), axis=1)
        before = float(np.linalg.norm(shiftLps))
        self.delayDisplay(f"median error {before:.1f} mm before, {float(np.median(error)):.1f} mm after")
        self.assertLess(float(np.median(error)), 0.25 * before)
        self.assertEqual(slicer.util.arrayFromVolume(result.warped).shape, slicer.util.arrayFromVolume(fixed).shape)
        if not torchBefore:
            self.assertNotIn("torch", sys.modules, "Slicer's own process imported torch")
        self.delayDisplay("Test passed")
