"""Host memory: the peak of a block of code (and, on CUDA, the device allocator's peak), and what
is still available to the process."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil
import torch


class PeakMemory:
    """Context manager measuring peak memory in MiB while its block runs.

    Host memory is the process's resident set size, sampled every ``interval_s`` seconds on a
    background thread (so very short spikes can be missed). CUDA memory is the peak of PyTorch's
    allocator on ``device``. After the block: ``host_peak_mib``, ``cuda_peak_mib`` (None on CPU).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self._device = device
        self._interval = interval_s
        self._process = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.host_peak_mib = 0.0
        self.cuda_peak_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        self.host_peak_mib = self._rss_mib()
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.host_peak_mib = max(self.host_peak_mib, self._rss_mib())
        if self._device.type == "cuda":
            self.cuda_peak_mib = torch.cuda.max_memory_allocated(self._device) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.host_peak_mib = max(self.host_peak_mib, self._rss_mib())

    def _rss_mib(self) -> float:
        return self._process.memory_info().rss / 2**20


def available_host_memory() -> int:
    """Bytes this process can still allocate: the system's available memory, lowered by an
    address-space limit (``ulimit -v``, minus what the process has mapped already) and by a cgroup v2
    memory limit (containers, batch systems) where there is one."""
    available = psutil.virtual_memory().available
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            available = min(available, max(0, soft - psutil.Process(os.getpid()).memory_info().vms))
    except ImportError:  # Windows has no address-space limits
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, max(0, int(limit) - int((cgroup / "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    return available
