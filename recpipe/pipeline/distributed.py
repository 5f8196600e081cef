"""Data-parallel training under torchrun: process group, the `--nproc` launcher.

`torchrun --nproc_per_node N -m recpipe train ...` (or `recpipe train --nproc N`, which launches exactly that)
starts N copies of the train stage. `setup()` joins them into one process group from torchrun's environment
(gloo on CPUs, NCCL on GPUs, each rank on cuda:LOCAL_RANK). Then:
- train.batch_size stays the global batch: every rank walks the same shuffled pass (same seed) and takes its
  contiguous share of each batch (`batches.shard`), so every sample is trained once a pass and a run's settings, and
  its fingerprint, do not depend on N; a run saved under N processes resumes under M.
- the model is wrapped in DistributedDataParallel; each rank back-propagates its loss times its target count,
  and the averaged gradient is rescaled to the mean over the global batch's targets: the same gradient a single
  process computes on the whole batch, whatever the shares hold.
- rank 0 alone validates, logs, saves the resume state and writes the stage; the others follow its decisions
  (early stop, the wall-clock budget) through one small all-reduce per step and a broadcast per validation.
- a rank that dies makes the collectives of the others fail: they stop with one line naming the lost peer,
  and the last resume state rank 0 saved stays intact (it is written atomically), so the same command resumes.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from recpipe.errors import ConfigError, RecpipeError

# collectives wait this long for a peer before failing (a dead peer usually fails them at once: its sockets close)
TIMEOUT_S = float(os.environ.get("RECPIPE_DIST_TIMEOUT_S", "600"))


class PeerLost(RecpipeError):
    """Another rank of the process group stopped: this rank cannot go on."""


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        guarded(self, torch.distributed.barrier)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device_of())
        guarded(self, lambda: torch.distributed.broadcast(t, src=0))
        return int(t.item())

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device_of())
        guarded(self, lambda: torch.distributed.all_reduce(t))
        return t.cpu()

    def device_of(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


_current: Dist | None = None


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def setup(device: torch.device) -> Dist | None:
    """Join torchrun's process group (once per process); None when this is a single process. `device` is the
    resolved train.device: CUDA picks NCCL and this rank's GPU, anything else gloo."""
    global _current
    if _current is not None:
        return _current
    world = world_size()
    if world <= 1:
        return None
    import torch.distributed as td

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                              "give torchrun --nproc_per_node at most the GPU count")
        torch.cuda.set_device(local_rank)
    if not td.is_initialized():
        td.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        atexit.register(_teardown)
    _current = Dist(rank, world, local_rank, backend)
    return _current


def _teardown() -> None:
    import torch.distributed as td

    if td.is_initialized():
        try:
            td.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone; nothing left to release
            pass


def guarded(d: Dist, fn: Callable[[], object]):
    """Run a collective; a lost peer becomes one clear error instead of a gloo / NCCL traceback."""
    try:
        return fn()
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        raise PeerLost(f"process {d.rank} of {d.world}: a peer process stopped during training ({_reason(e)}); "
                       "the last saved state is intact and the same command resumes from it") from None


def _reason(e: BaseException) -> str:
    """The gist of a backend error: gloo's '[file.cc:537] Read error [addr]:port: Connection reset by peer. This
    is typically ...' -> 'Read error [addr]:port: Connection reset by peer'."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0][:160]


def maybe_fault(d: Dist | None, step: int) -> None:
    """Fault injection for the tests: RECPIPE_FAULT_EXIT=RANK:STEP ends that rank abruptly at that step."""
    spec = os.environ.get("RECPIPE_FAULT_EXIT")
    if d is None or not spec:
        return
    rank, at = (int(x) for x in spec.split(":"))
    if d.rank == rank and step == at:
        sys.stderr.flush()
        os._exit(17)


def launch(nproc: int, argv: list[str]) -> None:
    """`recpipe train --nproc N`: what `torchrun --standalone --nproc_per_node N -m recpipe <argv>` does (argv
    without --nproc), on this node. A failed rank becomes one error line (its own message is above it) instead
    of torchrun's traceback. For several nodes, call torchrun with its rendezvous options (README)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, not {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    # torchrun gives every rank OMP_NUM_THREADS=1 unless it is set; the cores are the ranks' to share
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "recpipe", *argv])
    try:
        torchrun(args)
    except ChildFailedError as e:
        failed = ", ".join(f"process {rank} (exit {f.exitcode})" for rank, f in sorted(e.failures.items()))
        raise RecpipeError(f"train --nproc {nproc}: {failed} failed; each process's own message is above") from None


__all__ = ["Dist", "PeerLost", "setup", "launch", "guarded", "maybe_fault", "world_size"]
