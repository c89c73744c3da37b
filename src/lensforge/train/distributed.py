"""Data-parallel training over several processes: ``lensforge train --nproc N`` or torchrun.

``python -m lensforge.train.distributed --config run.yaml`` is what every process runs;
``lensforge train --nproc N`` starts N of them through torchrun's own launcher
(``torchrun --standalone --nproc-per-node N``), and a multi-node ``torchrun`` command
starts the same module. Each process calls the same :func:`lensforge.train.train`,
which reads its rank from :meth:`DistContext.current`. How the work is split, and why:

* **Data.** Every rank holds the whole uint8 table and the same splits, and draws the
  same epoch permutation from (seed, epoch); :meth:`Batches.shard` keeps every
  world_size-th index of it (padded by wrapping, as ``DistributedSampler`` does), in
  batches of batch_size / world_size: one step still sees ``batch_size`` images, so the
  learning rate, schedule and step count match a 1-process run.
* **Augmentation.** Rank 0 draws from the 1-process generator; rank r > 0 from one
  seeded by (seed, epoch, r), so ranks never augment alike and ``--resume`` stays exact.
* **Gradients and health.** DDP averages the gradients in ``backward``, so every rank's
  health monitor sees the same norms; the step's verdict (ok / skip / restore) is then
  all-reduced with ``max``, so a skipped step or a restore happens on every rank or none.
* **Metrics.** Train loss, accuracy and images are summed over ranks at the end of the
  epoch. Validation runs on rank 0 and its two numbers are broadcast: rank 0's weights
  and BatchNorm statistics are the ones checkpointed (the other ranks' statistics differ
  slightly, each from its own shard), so rank 0 measures exactly the model written;
  a sharded evaluation would first have to synchronise those buffers. The time-limit
  decision is broadcast from rank 0 too; early stopping then agrees by construction.
* **Files.** Only rank 0 writes the run folder, checkpoints, metrics, health and report;
  every rank reads the checkpoint on ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lensforge.errors import LensforgeError, UsageError
from lensforge.train.config import TrainConfig, dump_config, resolve_config

ENTRY_MODULE = "lensforge.train.distributed"


class DistributedTrainingError(LensforgeError):
    """A data-parallel job stopped because one of its processes failed (exit code: that process's)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class DistContext:
    """This process's place in a data-parallel job; with one process every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    _trainable: tuple[bool, ...] | None = None  # requires_grad flags the current DDP wrapper was built for

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @classmethod
    def current(cls) -> DistContext:
        """The job this process belongs to (an initialised default process group), else a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device)

    def place(self, device: torch.device) -> torch.device:
        """The training device of this rank: its own GPU on CUDA."""
        return self.device if self.world_size > 1 and device.type == "cuda" else device

    def per_rank_batch(self, global_batch: int) -> int:
        """Images per step on each rank, so a step sees ``global_batch`` images as with 1 process."""
        if global_batch % self.world_size:
            raise UsageError(f"batch size {global_batch} is not divisible by the {self.world_size} processes: "
                             f"the batch is global and each process takes batch_size / processes")
        return global_batch // self.world_size

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def max_int(self, value: int) -> int:
        """The largest of the ranks' values (e.g. a step's verdict: any rank's skip is every rank's)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def broadcast(self, values: Sequence[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (the other ranks pass placeholders of the same length)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, model: nn.Module, current: nn.Module | None) -> nn.Module | None:
        """The DDP wrapper the forward pass runs through (None with one process).

        DDP registers gradient hooks only for parameters that require grad when it is
        built, so the wrapper is rebuilt whenever that set changes (gradual unfreezing);
        otherwise ``current`` is kept.
        """
        if self.world_size == 1:
            return None
        trainable = tuple(p.requires_grad for p in model.parameters())
        if current is not None and trainable == self._trainable:
            return current
        from torch.nn.parallel import DistributedDataParallel

        self._trainable = trainable
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)


# ------------------------------------------------------------------ launching
def usable_processes(device: str) -> tuple[int, str]:
    """How many data-parallel processes this machine can run well, and of what."""
    from lensforge.train.setup import pick_device

    if pick_device(device).type == "cuda":
        return torch.cuda.device_count(), "GPUs"
    try:
        return len(os.sched_getaffinity(0)), "usable CPU cores"
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1, "CPU cores"


def check_launch(nproc: int, batch_size: int | None, device: str) -> None:
    """Refuse, in one line, an ``--nproc`` this machine or this batch size cannot take."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("--nproc: this torch build has no torch.distributed; install a standard torch wheel "
                         "or train with --nproc 1")
    limit, what = usable_processes(device)
    if nproc > limit:
        raise UsageError(f"--nproc {nproc} is more than the {limit} {what} here: use --nproc {max(1, limit)} or fewer")
    if batch_size is not None and batch_size % nproc:  # None: from the data size, a power of two
        raise UsageError(f"--batch-size {batch_size} is not divisible by --nproc {nproc}: the batch is global "
                         f"and each process takes batch_size / nproc")


def launch(cfg: TrainConfig, *, nproc: int, resume: bool = False, quiet: bool = False) -> Path:
    """Train ``cfg`` on ``nproc`` local processes; returns the run folder.

    Equivalent to ``torchrun --standalone --nproc-per-node N -m lensforge.train.distributed
    --config CFG``: the same launcher (torchrun's own ``parse_args`` and ``run``), run in this
    process, so that a failed process becomes one :class:`DistributedTrainingError` line
    instead of torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from lensforge.train.trainer import prepare_run_dir

    run_dir = Path(cfg.out)
    saved = prepare_run_dir(cfg, resume)  # a taken --out or a missing run fails here, before any process starts
    check_launch(nproc, saved.batch_size, saved.device)
    with tempfile.TemporaryDirectory(prefix="lensforge-ddp-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(dump_config(saved), encoding="utf-8")
        argv = ["--standalone", f"--nproc-per-node={nproc}", "-m", ENTRY_MODULE, "--config", str(config_file),
                *(["--resume"] if resume else []), *(["--quiet"] if quiet else [])]
        try:
            with _launcher_environment():
                run(parse_args(argv))
        except ChildFailedError as e:
            raise _failure(e, nproc, run_dir) from None
    return run_dir


@contextlib.contextmanager
def _launcher_environment() -> Iterator[None]:
    """torchrun's environment for the workers, without its banner and failure logs (we say it in one line)."""
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets: one intra-op thread per process
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        elastic.setLevel(level)
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _failure(error: object, nproc: int, run_dir: Path) -> DistributedTrainingError:
    """One line naming the process that caused the stop.

    That is one killed by a signal other than the SIGTERM torchrun stops the rest with, else
    one that exited with an error, else the earliest.
    """
    failures = getattr(error, "failures", None) or {}
    if not failures:
        return DistributedTrainingError(f"data-parallel training stopped: {error}".splitlines()[0])

    def cause_first(item: tuple[int, object]) -> tuple[int, float, int]:
        code = getattr(item[1], "exitcode", 1)
        kind = 0 if code < 0 and -code != signal.SIGTERM else 1 if code > 0 else 2
        return kind, getattr(item[1], "timestamp", 0), item[0]

    rank, failure = min(failures.items(), key=cause_first)
    code = failure.exitcode
    if code < 0:
        how, exit_code = f"was killed by {failure.signal_name()}", 1
    else:
        how, exit_code = f"exited with code {code} (its message is above)", code if code in (1, 2, 4) else 1
    resume = ""
    if (run_dir / "checkpoints" / "latest.json").exists():
        resume = f"; continue from the last checkpoint with: lensforge train --resume --nproc {nproc} --out {run_dir}"
    return DistributedTrainingError(f"data-parallel training stopped: rank {rank} {how} and torchrun "
                                    f"stopped the others{resume}", exit_code)


# ------------------------------------------------------------------ each process
def main(argv: list[str] | None = None) -> int:
    """One data-parallel process: join the job torchrun describes, train, and (rank 0) write the report.

    This is a command-line entry, the same layer as ``lensforge.cli``: that is why it may
    write the report, which the training stage itself never does.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY_MODULE}",
                                     description="One process of a data-parallel lensforge training job "
                                                 "(start it with torchrun).")
    parser.add_argument("--config", required=True, help="the run's config.yaml (every option of lensforge train)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's out folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = resolve_config(args.config)
        _join_job(cfg.device)
        return _train_here(cfg, resume=args.resume, quiet=args.quiet)
    except LensforgeError as e:
        where = f" (rank {rank})" if rank else ""
        print(f"error{where}: {e}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:
        if not _lost_peer(e):
            raise
        # another process died mid-step; torchrun stops this one too and names the one that failed first
        print(f"error (rank {rank}): lost contact with the other processes", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _lost_peer(error: RuntimeError) -> bool:
    """A collective failed because another process went away (gloo reports it as a plain RuntimeError)."""
    network_errors = (torch.distributed.DistBackendError, torch.distributed.DistNetworkError)
    return isinstance(error, network_errors) or "gloo/transport" in str(error)


def _join_job(device: str) -> None:
    """Join the job torchrun's environment describes: NCCL when training on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    from lensforge.train.setup import pick_device

    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return  # a job of one is the normal path
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed: train with one process")
    if pick_device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _train_here(cfg: TrainConfig, *, resume: bool, quiet: bool) -> int:
    from rich.console import Console

    from lensforge.train.trainer import train

    train(cfg, resume=resume, console=Console(stderr=True), show_progress=not quiet)
    # every rank tears the process group down together: a rank that left while rank 0 was still
    # writing the run sometimes aborted in gloo ("terminate called without an active exception")
    DistContext.current().barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
