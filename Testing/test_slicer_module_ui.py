"""The Slicer module's UI and code, checked without Slicer (the module needs Qt, which is not here).

The ``.ui`` file is parsed as XML and the module's source with ``ast``: every widget the code uses
exists, every parameter of the parameter node has exactly one widget of a type Slicer's
parameterNodeWrapper can connect to it, every node selector gets the scene, and heavy imports stay
inside functions.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UI_FILE = REPO / "Resources" / "UI" / "SAMERegistration.ui"
MODULE_FILE = REPO / "SAMERegistration" / "SAMERegistration.py"
NODE_TYPES = {"vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTransformNode",
              "vtkMRMLGridTransformNode", "vtkMRMLLinearTransformNode"}
ENUMS = {"RegistrationMode", "Preset", "Device", "LabelInterpolation"}
ALLOWED_TOP_LEVEL_IMPORTS = {"enum", "logging", "os", "pathlib", "shutil", "sys", "typing", "qt", "slicer", "vtk",
                             "slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule",
                             "slicer.util"}
"""Light imports only at module level: the module must appear at once and show a clear message when
torch is missing, so torch, numpy, SimpleITK and SAMERegistrationLib are imported inside functions."""


@pytest.fixture(scope="module")
def ui() -> ElementTree.Element:
    return ElementTree.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def module() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def widgets(ui) -> dict[str, ElementTree.Element]:
    return {w.get("name"): w for w in ui.iter("widget")}


def string_property(widget, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            node = prop.find("string")
            return None if node is None else (node.text or "")
    return None


def parameters(module) -> dict[str, str]:
    """Parameter name -> annotation source, from the @parameterNodeWrapper class."""
    for node in module.body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: ast.unparse(item.annotation) for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in the module")


def used_ui_names(module) -> set[str]:
    """Every ``self.ui.NAME`` in the module."""
    return {node.attr for node in ast.walk(module)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def test_ui_file_is_valid_qt_designer_xml(ui):
    assert ui.tag == "ui" and ui.find("class").text == "SAMERegistration"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SAMERegistration"
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    used_custom = {w.get("class") for w in ui.iter("widget") if not w.get("class").startswith("Q")}
    assert used_custom <= declared, f"custom widgets without a declaration: {used_custom - declared}"


def test_every_widget_the_module_uses_exists(ui, module):
    missing = used_ui_names(module) - set(widgets(ui))
    assert not missing, f"the module uses widgets the .ui lacks: {sorted(missing)}"
    assert {"applyButton", "progressBar", "statusLabel", "logTextEdit", "deviceInfoLabel"} <= used_ui_names(module)


def connectable(annotation: str, widget_class: str) -> bool:
    """Mirrors Slicer's parameterNodeWrapper GUI connectors (guiConnectors.py)."""
    if annotation in NODE_TYPES:
        return widget_class == "qMRMLNodeComboBox"
    if annotation in ENUMS:
        return widget_class == "QComboBox"
    if annotation == "bool":
        return widget_class in ("QCheckBox", "QPushButton")
    if annotation.startswith("Annotated[float") or annotation == "float":
        return widget_class == "QDoubleSpinBox" or (widget_class == "ctkSliderWidget" and "WithinRange" in annotation)
    if annotation.startswith("Annotated[int") or annotation == "int":
        return widget_class in ("QSpinBox", "QSlider")
    if annotation == "pathlib.Path":
        return widget_class in ("ctkPathLineEdit", "ctkDirectoryButton")
    if annotation == "str":
        return widget_class in ("QLineEdit", "QTextEdit")
    return False


def test_every_parameter_has_one_connectable_widget_and_every_bound_widget_a_parameter(ui, module):
    params = parameters(module)
    bound: dict[str, list] = {}
    for widget in ui.iter("widget"):
        name = string_property(widget, "SlicerParameterName")
        if name is not None:
            bound.setdefault(name, []).append(widget)
    assert set(bound) - set(params) == set(), "widgets bound to unknown parameters"
    assert set(params) - set(bound) == set(), "parameters without a widget"
    for name, annotation in params.items():
        assert len(bound[name]) == 1, f"{name} has {len(bound[name])} widgets"
        widget_class = bound[name][0].get("class")
        assert connectable(annotation, widget_class), f"{name}: {annotation} cannot be connected to a {widget_class}"


def test_every_node_selector_receives_the_scene(ui):
    selectors = {w.get("name") for w in ui.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.find("receiver").text for c in ui.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.find("slot").text == "setMRMLScene(vtkMRMLScene*)" and c.find("sender").text == "SAMERegistration"}
    assert selectors and selectors == connected, f"selectors without the scene: {selectors - connected}"


def test_output_selectors_can_create_nodes_and_inputs_cannot(ui):
    for widget in ui.iter("widget"):
        if widget.get("class") != "qMRMLNodeComboBox":
            continue
        add = [p.find("bool").text for p in widget.findall("property") if p.get("name") == "addEnabled"]
        parameter = string_property(widget, "SlicerParameterName")
        if widget.get("name") == "parameterNodeSelector":  # adds a new set-up (parameter node)
            assert add == ["true"] and parameter is None
            continue
        is_output = parameter in {"outputTransform", "outputAffine", "warpedVolume", "jacobianVolume",
                                  "warpedSegmentation", "inverseTransform"}
        assert add == (["true"] if is_output else ["false"]), parameter


def test_heavy_imports_are_inside_functions(module):
    top_level = set()
    for node in module.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module)
    assert top_level <= ALLOWED_TOP_LEVEL_IMPORTS, f"heavy imports at module level: {top_level - ALLOWED_TOP_LEVEL_IMPORTS}"


def test_module_follows_the_scripted_module_template(module):
    classes = {node.name: node for node in module.body if isinstance(node, ast.ClassDef)}
    bases = {name: {ast.unparse(b) for b in node.bases} for name, node in classes.items()}
    assert "ScriptedLoadableModule" in bases["SAMERegistration"]
    assert "ScriptedLoadableModuleWidget" in bases["SAMERegistrationWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["SAMERegistrationLogic"]
    assert "ScriptedLoadableModuleTest" in bases["SAMERegistrationTest"]
    source = MODULE_FILE.read_text()
    assert 'translate("qSlicerAbstractCoreModule", "Registration")' in source
    for citation in ("SAME", "SAM:", "TransMorph", "DeepSim", "Li and Fan"):
        assert citation in source, citation
    logic_methods = {n.name for n in classes["SAMERegistrationLogic"].body if isinstance(n, ast.FunctionDef)}
    assert {"process", "waitForCompletion", "cancel", "ensureDependencies", "preflight"} <= logic_methods
    test_methods = {n.name for n in classes["SAMERegistrationTest"].body if isinstance(n, ast.FunctionDef)}
    assert "runTest" in test_methods and any(m.startswith("test_") for m in test_methods)


def test_help_text_describes_every_mode_the_ui_offers(module):
    from SAMERegistrationLib.modes import MODE_NAMES

    enum = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "RegistrationMode")
    values = [ast.literal_eval(item.value) for item in enum.body if isinstance(item, ast.Assign)]
    assert set(values) <= set(MODE_NAMES), "the UI offers a mode the backend does not know"
    source = MODULE_FILE.read_text()
    for heading in ("Intensity baseline", "SAME", "TVF-diffeomorphic"):
        assert f"<b>{heading}" in source, heading


def function(module, name: str) -> ast.FunctionDef:
    return next(node for node in ast.walk(module) if isinstance(node, ast.FunctionDef) and node.name == name)


def test_saved_settings_are_parameters_and_hold_no_nodes(module):
    params = parameters(module)
    saved = next(ast.literal_eval(node.value) for node in module.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "SAVED_SETTINGS" for t in node.targets))
    assert set(saved) <= set(params), set(saved) - set(params)
    assert not any(params[name] in NODE_TYPES for name in saved), "a node in the saved settings"
    # every choice that is not a node is saved
    assert set(saved) == {name for name, annotation in params.items() if annotation not in NODE_TYPES}


def test_worker_request_uses_only_fields_the_backend_knows(module):
    """workerRequest() builds the worker's request: its keys are RegistrationRequest fields and its
    options RegistrationOptions fields (the worker refuses unknown ones)."""
    from dataclasses import fields

    from SAMERegistrationLib.pipeline.problem import RegistrationOptions
    from SAMERegistrationLib.registration import RegistrationRequest

    body = function(module, "workerRequest")
    keys = {"request": set(), "options": set()}
    for node in ast.walk(body):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in keys \
                and isinstance(node.slice, ast.Constant):
            keys[node.value.id].add(node.slice.value)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in keys:
            keys[node.targets[0].id] |= {k.value for k in node.value.keys}
    assert keys["request"] >= {"mode", "device", "options", "label_method", "similarity", "refine_iterations",
                               "precision_iterations"}
    assert keys["request"] <= {f.name for f in fields(RegistrationRequest)}
    assert keys["options"] >= {"spacing", "threads"}
    assert keys["options"] <= {f.name for f in fields(RegistrationOptions)}


def test_slicers_own_process_never_imports_torch(module):
    """Widget, logic and the module's self-test ask a probe process about PyTorch and the GPU and
    leave the rest to the worker: no ``import torch`` anywhere in the module (so no CUDA context in
    Slicer). That the library's MRML bridge imports none either is run in test_mrml.py."""
    for node in module.body:
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                assert all(alias.name.split(".")[0] != "torch" for alias in inner.names), getattr(node, "name", node)
            if isinstance(inner, ast.ImportFrom):
                assert (inner.module or "").split(".")[0] != "torch", getattr(node, "name", node)


def test_sample_data_is_registered_from_the_bundled_files(module):
    files = next(ast.literal_eval(node.value) for node in module.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "SAMPLE_FILES" for t in node.targets))
    for name, _, kind in files:
        assert (REPO / "Resources" / "SampleData" / name).is_file(), name
        assert kind in ("VolumeFile", "SegmentationFile")
    source = MODULE_FILE.read_text()
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source
    assert "registerCustomSampleDataSource" in ast.unparse(function(module, "registerSampleData"))


def test_advanced_section_is_collapsed_by_default(ui):
    advanced = widgets(ui)["advancedCollapsibleButton"]
    collapsed = [p.find("bool").text for p in advanced.findall("property") if p.get("name") == "collapsed"]
    assert collapsed == ["true"]
    inside = {w.get("name") for w in advanced.iter("widget")}
    assert {"similarityLineEdit", "refineIterationsSpinBox", "precisionIterationsSpinBox", "labelInterpolationComboBox",
            "threadsSpinBox", "keepFilesCheckBox", "showFolderButton"} <= inside


def test_saved_settings_round_trip_through_json(module):
    """settingsToJson / applySettingsJson, run from the module's source: enums, paths, numbers and
    flags come back as they were saved."""
    import enum
    import json
    import pathlib
    import types

    wanted = {"SAVED_SETTINGS", "settingsToJson", "applySettingsJson", "RegistrationMode", "Preset", "Device",
              "LabelInterpolation"}
    namespace = {"enum": enum, "pathlib": pathlib}
    for node in module.body:
        names = {node.name} if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else \
            {t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)}
        if names & wanted:
            exec(compile(ast.Module([node], []), str(MODULE_FILE), "exec"), namespace)
    mode, preset, device, interpolation = (namespace[n] for n in ("RegistrationMode", "Preset", "Device",
                                                                  "LabelInterpolation"))
    chosen = types.SimpleNamespace(
        mode=mode.TVF, sameAffineStage=True, sameCoarseStage=False, sameDeformableStage=True,
        customWeights=pathlib.Path("/weights/sam.pt"), preset=preset.FAST, device=device.CPU, showOverlay=False,
        showGrid=True, gridSpacing=12.5, showJacobian=True, similarity="lncc+0.1*sam", refineIterations=20,
        precisionIterations=15, labelInterpolation=interpolation.ONEHOT, threads=3, keepFiles=True)
    saved = json.loads(json.dumps(namespace["settingsToJson"](chosen)))
    assert saved["mode"] == "tvf" and saved["customWeights"] == "/weights/sam.pt" and saved["preset"] == 4.0
    fresh = types.SimpleNamespace(
        mode=mode.SAME, sameAffineStage=True, sameCoarseStage=True, sameDeformableStage=True,
        customWeights=pathlib.Path(), preset=preset.QUALITY, device=device.AUTO, showOverlay=True, showGrid=True,
        gridSpacing=15.0, showJacobian=False, similarity="", refineIterations=-1,
        precisionIterations=0, labelInterpolation=interpolation.NEAREST, threads=0, keepFiles=False)
    namespace["applySettingsJson"](fresh, saved)
    assert vars(fresh) == vars(chosen)
