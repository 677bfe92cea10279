"""The plumbing every training script shares: processes, seeds, schedule, log and exact resume.

A :class:`TrainingRun` is created from the script's common options (:func:`add_run_options`). Under
``torchrun --nproc_per_node N`` it joins a process group (gloo on CPU, nccl on CUDA) and wraps the
model in DistributedDataParallel; every process draws its own samples (seed ``seed * 1000 + rank``)
and rank 0 alone logs and writes files. ``checkpoint.pt`` in the output folder holds the model,
optimiser, schedule, step and every rank's sampling-generator state, so ``--resume`` continues the
same sequence of samples exactly. The log is JSON lines (``train_log.jsonl``), one record per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"


def add_run_options(parser: argparse.ArgumentParser, iterations: int, lr: float, checkpoint_every: int = 200) -> None:
    """Adds the options every training script shares."""
    parser.add_argument("-o", "--output", required=True, help="folder for checkpoints, log and final weights")
    parser.add_argument("--iterations", type=int, default=iterations)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: PyTorch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")


class TrainingRun:
    """One training run's processes, random state, schedule, log and checkpoints.

    Usage::

        run = TrainingRun(args)
        trained, optimiser = run.start(model, torch.optim.AdamW(model.parameters(), lr=args.lr))
        for step in run.steps():
            loss, parts = ...(trained, run.generator, run.device)
            run.step(loss, parts)           # backward, optimiser and schedule step, log, checkpoint
        run.finish()
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.output = Path(args.output)
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        self.generator = torch.Generator().manual_seed(args.seed * 1000 + self.rank)
        self.start_step = 0
        self._log = None
        self._started = time.perf_counter()

    @property
    def is_main(self) -> bool:
        """True in the process that logs and writes files (rank 0)."""
        return self.rank == 0

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self._started, 1)

    def start(self, model: nn.Module, optimiser: torch.optim.Optimizer) -> nn.Module:
        """Moves the model to the device, restores a checkpoint under ``--resume`` and returns the
        model to train (DDP-wrapped with several processes). The learning rate follows a cosine
        decay over ``--iterations``."""
        self.model = model.to(self.device)
        self.optimiser = optimiser
        total = self.args.iterations
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        path = self.output / CHECKPOINT_NAME
        if self.args.resume and path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
            self.model.load_state_dict(state["state_dict"])
            self.optimiser.load_state_dict(state["optimiser"])
            self.schedule.load_state_dict(state["schedule"])
            self.generator.set_state(state["generators"][self.rank])
            self.start_step = state["step"]
        if self.is_main:
            self._log = open(self.output / LOG_NAME, "a")
        return DistributedDataParallel(self.model) if self.world > 1 else self.model

    def steps(self) -> range:
        """The step indices still to run (``start_step`` .. ``iterations - 1``)."""
        return range(self.start_step, self.args.iterations)

    def step(self, step: int, loss: torch.Tensor, parts: dict[str, float], extra: dict | None = None) -> int:
        """Back-propagates ``loss``, updates, logs and checkpoints; returns the steps done."""
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        self.schedule.step()
        done = step + 1
        record = {"step": done, "loss": round(loss.item(), 5), **{k: round(v, 5) for k, v in parts.items()},
                  "lr": self.schedule.get_last_lr()[0], "seconds": self.seconds, **(extra or {})}
        self.log(record)
        if done % self.args.checkpoint_every == 0 or done == self.args.iterations:
            self._checkpoint(done)
        return done

    def log(self, record: dict) -> None:
        """Prints and appends a JSON record (rank 0 only)."""
        if self.is_main:
            print(json.dumps(record), flush=True)
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def finish(self) -> None:
        if self._log is not None:
            self._log.close()
        if self.world > 1:
            dist.destroy_process_group()

    def _checkpoint(self, done: int) -> None:
        generators = self._generator_states()
        if self.is_main:
            torch.save({"state_dict": self.model.state_dict(), "optimiser": self.optimiser.state_dict(),
                        "schedule": self.schedule.state_dict(), "step": done, "generators": generators,
                        "args": json.loads(json.dumps(vars(self.args), default=str))},  # plain values only
                       self.output / CHECKPOINT_NAME)

    def _generator_states(self) -> list[torch.Tensor]:
        """Every rank's sampling generator state, so a resumed run draws the same samples."""
        state = self.generator.get_state()
        if self.world == 1:
            return [state]
        states = [torch.empty_like(state) for _ in range(self.world)]
        dist.all_gather(states, state)
        return states
