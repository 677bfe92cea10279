"""Evaluation harness: SAMERegistration's modes against established tools on the same pairs.

Entry point: ``benchmarks/evaluate.py``. Modules: :mod:`.pairs` (pair lists, preparation, derived
masks, synthetic pairs), :mod:`.method` (the adapter interface), :mod:`.ours` (our modes),
:mod:`.peers` (elastix, ANTs, NiftyReg, greedy, ConvexAdam), :mod:`.registry` (names -> methods),
:mod:`.worker` (one method in its own process), :mod:`.metrics`, :mod:`.harness` (the loop) and
:mod:`.report` (CSV, markdown, plots).
"""
