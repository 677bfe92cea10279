"""How long Slicer's main thread is blocked by one registration of MRML nodes (not a test; the
numbers go in the README's Slicer module section).

The Slicer module starts a :class:`~SAMERegistrationLib.mrml.NodeRegistration` and polls it from
a QTimer on the main thread; while one of these calls runs, Slicer cannot redraw or react. This
script makes the calls the module makes, in the same order, on real MRML nodes (pip
``slicer-core``): ``start()``, then ``poll()`` every 10 ms until the run ends (with the worker
writing, registering, and the results being read and put into new nodes), and reports the longest
call. The volumes: a synthetic CT (an ellipsoid body of soft tissue with a spine, air around it,
int16 HU) of ``--shape`` voxels of 0.8 x 0.8 x 1 mm as the fixed volume and the same shifted by
(12, -8, 5) voxels as the moving one; the worker runs the intensity baseline on the CPU at 8 mm
with one thread (its own time does not count here).

Usage: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/benchmark_gui_blocking.py [--shape 300 512 512]
       (shape in array order D H W)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import slicer  # pip slicer-core
import vtk

from SAMERegistrationLib import mrml
from SAMERegistrationLib.spatial.grid import Grid

SPACING_MM = (0.8, 0.8, 1.0)
WORKER_REQUEST = {"mode": "intensity", "device": "cpu",
                  "options": {"spacing": 8.0, "threads": 1, "affine_levels": [8.0], "affine_iterations": [60]}}
"""A quick worker run: only the main thread's time is measured."""
POLL_INTERVAL_S = 0.01


def synthetic_ct(shape: tuple[int, int, int]) -> np.ndarray:
    """An int16 CT in HU, ``[k, j, i]``: air, an ellipsoid body (40 HU + noise) and a spine (700 HU)."""
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    centre = [(n - 1) / 2 for n in shape]
    body = ((i - centre[2]) / (0.42 * shape[2])) ** 2 + ((j - centre[1]) / (0.32 * shape[1])) ** 2 \
        + ((k - centre[0]) / (0.6 * shape[0])) ** 2 <= 1.0
    spine = ((i - centre[2]) / (0.05 * shape[2])) ** 2 + ((j - centre[1] - 0.18 * shape[1]) / (0.05 * shape[1])) ** 2 <= 1
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[body] = 40
    ct[body & spine] = 700
    ct += np.random.default_rng(0).integers(-20, 21, size=shape, dtype=np.int16)
    return ct


def add_volume(scene, array: np.ndarray, grid: Grid, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    ijk_to_ras = vtk.vtkMatrix4x4()
    matrix = grid.index_to_world_ras()
    for row in range(4):
        for col in range(4):
            ijk_to_ras.SetElement(row, col, float(matrix[row, col]))
    node.SetIJKToRASMatrix(ijk_to_ras)
    node.CreateDefaultDisplayNodes()
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="D H W voxels")
    args = parser.parse_args()
    shape = tuple(args.shape)
    grid = Grid.create(shape, SPACING_MM)
    scene = slicer.vtkMRMLScene()
    fixed_array = synthetic_ct(shape)
    fixed = add_volume(scene, fixed_array, grid, "fixed")
    moving = add_volume(scene, np.roll(fixed_array, (5, -8, 12), axis=(0, 1, 2)), grid, "moving")
    del fixed_array

    calls: list[tuple[str, float]] = []
    begin = time.perf_counter()
    run = mrml.NodeRegistration(mrml.RegistrationInputs(fixed, moving), mrml.RegistrationOutputs(), WORKER_REQUEST)
    run.start()
    calls.append(("start", time.perf_counter() - begin))
    while run.running:
        time.sleep(POLL_INTERVAL_S)
        worker_before = run.worker
        before = time.perf_counter()
        events = run.poll()
        seconds = time.perf_counter() - before
        if any(event["event"] == "finished" for event in events):
            calls.append(("poll: results into nodes", seconds))
        elif worker_before is None and run.worker is not None:
            calls.append(("poll: worker started", seconds))
        else:
            calls.append(("poll", seconds))
    total = time.perf_counter() - begin
    if run.state != "completed":
        sys.exit(f"benchmark_gui_blocking: the registration ended {run.state}: {run.error}")
    polls = [seconds for name, seconds in calls if name.startswith("poll")]
    longest = max(calls, key=lambda call: call[1])
    print(json.dumps({
        "shape_dhw": shape, "spacing_mm": SPACING_MM, "machine": f"{platform.machine()}, {platform.python_version()}",
        "start_s": round(calls[0][1], 3), "longest_poll_s": round(max(polls), 3),
        "longest_main_thread_block_s": round(longest[1], 3), "longest_call": longest[0],
        "results_into_nodes_s": round(next(seconds for name, seconds in calls if name.endswith("nodes")), 3),
        "main_thread_busy_s": round(sum(seconds for _, seconds in calls), 2), "polls": len(polls),
        "run_s": round(total, 1), "torch_in_this_process": "torch" in sys.modules,
    }, indent=2))


if __name__ == "__main__":
    main()
