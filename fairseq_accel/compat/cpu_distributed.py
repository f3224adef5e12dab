"""fairseq's own multi-process training on CPUs: ``--cpu --distributed-world-size N`` runs N gloo ranks.

fairseq 0.12 assumes one CUDA device per rank, so with ``--cpu`` (or without a CUDA device) and
``--distributed-world-size N > 1``:

- ``infer_init_method`` asserts ``N <= torch.cuda.device_count()``, 0 here (AssertionError "world size
  is 2 but have 0 available devices"); under torchrun it sets ``device_id = RANK %
  torch.cuda.device_count()`` (ZeroDivisionError);
- ``call_main`` would spawn ``min(torch.cuda.device_count(), N)`` processes: none;
- ``--distributed-backend`` defaults to nccl, which reduces CUDA tensors only;
- ``DistributedFairseqModel`` gives torch's DistributedDataParallel ``device_ids=[device_id]``, which
  DDP refuses for a module on the CPU;
- ``all_gather_list``, which the trainer uses to sync the logging outputs of a criterion whose
  ``logging_outputs_can_be_summed()`` is False (``FairseqCriterion``'s default), puts its buffers in
  ``torch.cuda.ByteTensor`` and ``pin_memory``.

:func:`install` wraps those places. On the CPU path ``call_main`` switches nccl to gloo (one log line:
nccl has no CPU tensors, and fairseq cannot tell a given ``--distributed-backend nccl`` from its
default, so refusing it would refuse every plain ``--cpu`` run), then either takes torchrun's
environment (``env://``, its WORLD_SIZE and RANK; this process is one rank) or rendezvouses at
``tcp://localhost:<--distributed-port, or a free port>`` and spawns all N ranks on this machine with
``torch.multiprocessing.spawn``, as fairseq does for GPUs. Under torchrun the launcher's WORLD_SIZE
holds even without ``--distributed-world-size`` (fairseq's CPU default of 1 would otherwise train
independent copies in its processes). Each rank runs fairseq's ``distributed_main``
and ``fairseq_cli.train.main``, which imports ``--user-dir`` again, so the DDP and ``all_gather_list``
wrappers are installed in every rank before its trainer is built. GPU runs (CUDA present and no
``--cpu``) take fairseq's code unchanged, and the two wrappers only change what fairseq cannot do.
Slurm variables are not read on the CPU path.
"""
import functools
import logging
import os
import socket
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from fairseq import utils
from fairseq.dataclass.configs import DistributedTrainingConfig, FairseqConfig
from fairseq.distributed import utils as distributed_utils
from fairseq.models import distributed_fairseq_model
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

#: What torchrun (and torch.distributed.launch) sets for each process it starts.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


class CpuDistributedError(ValueError):
    """A CPU distributed run whose ranks could never meet."""


def launcher_world_size() -> int:
    """WORLD_SIZE of the torchrun-style launcher that started this process (0 without one)."""
    if all(name in os.environ for name in LAUNCHER_VARIABLES):
        return int(os.environ["WORLD_SIZE"])
    return 0


def runs_on_cpu_ranks(cfg: FairseqConfig) -> bool:
    """Whether this fairseq-train run is a multi-rank CPU run that fairseq 0.12 cannot start."""
    if cfg.common.tpu or (torch.cuda.is_available() and not cfg.common.cpu):
        return False
    return cfg.distributed_training.distributed_world_size > 1 or launcher_world_size() > 1


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def use_gloo(dist_cfg: DistributedTrainingConfig) -> None:
    """Replace nccl, fairseq's default backend, by gloo, the CPU backend every torch build has."""
    if dist_cfg.distributed_backend == "nccl":
        logger.info("CPU training: distributed backend gloo instead of nccl (nccl reduces CUDA tensors only)")
        dist_cfg.distributed_backend = "gloo"


def set_rendezvous(dist_cfg: DistributedTrainingConfig) -> None:
    """Fill in the init method (and, under torchrun, this process's rank) where the user gave none."""
    if dist_cfg.distributed_init_method is not None:
        return
    if launcher_world_size() > 1:
        dist_cfg.distributed_init_method = "env://"
        dist_cfg.distributed_world_size = launcher_world_size()
        dist_cfg.distributed_rank = int(os.environ["RANK"])
        dist_cfg.distributed_no_spawn = True  # the launcher started one process per rank
    elif dist_cfg.distributed_no_spawn:
        raise CpuDistributedError(
            f"--distributed-no-spawn with --distributed-world-size {dist_cfg.distributed_world_size} on CPU "
            "starts only this process's rank, and it has nowhere to meet the others: launch the ranks with "
            "torchrun, or give --distributed-init-method and --distributed-rank to each, or leave out "
            "--distributed-no-spawn to have fairseq start all ranks"
        )
    else:
        port = dist_cfg.distributed_port if dist_cfg.distributed_port > 0 else free_port()
        dist_cfg.distributed_init_method = f"tcp://localhost:{port}"


def spawn_ranks(cfg: FairseqConfig, main: Callable[..., Any], kwargs: dict) -> None:
    """Start every rank on this machine, as fairseq's ``call_main`` does with one process per GPU."""
    dist_cfg = cfg.distributed_training
    kwargs["start_rank"] = dist_cfg.distributed_rank
    dist_cfg.distributed_rank = None  # distributed_main assigns start_rank + process index
    torch.multiprocessing.spawn(
        fn=distributed_utils.distributed_main,
        args=(main, cfg, kwargs),
        nprocs=dist_cfg.distributed_world_size,
        join=True,
    )


def start_cpu_ranks(call_main: Callable[..., None]) -> Callable[..., None]:
    """Wrap fairseq's ``call_main`` so that multi-rank CPU runs start with gloo."""

    @functools.wraps(call_main)
    def wrapper(cfg: FairseqConfig, main: Callable[..., Any], **kwargs) -> None:
        if not runs_on_cpu_ranks(cfg):
            return call_main(cfg, main, **kwargs)
        use_gloo(cfg.distributed_training)
        set_rendezvous(cfg.distributed_training)
        if cfg.distributed_training.distributed_no_spawn:
            return call_main(cfg, main, **kwargs)  # runs this process's rank
        return spawn_ranks(cfg, main, kwargs)

    wrapper.starts_cpu_ranks = True
    return wrapper


class CpuAwareDistributedDataParallel(DistributedDataParallel):
    """torch's DistributedDataParallel without device ids for a module on the CPU (DDP accepts none)."""

    def __init__(self, module: torch.nn.Module, device_ids: Optional[list] = None,
                 output_device: Optional[int] = None, *args, **kwargs) -> None:
        if all(parameter.device.type == "cpu" for parameter in module.parameters()):
            device_ids = output_device = None
        super().__init__(module, device_ids, output_device, *args, **kwargs)


def gather_without_cuda(all_gather_list: Callable[..., List[Any]]) -> Callable[..., List[Any]]:
    """Wrap ``all_gather_list`` to gather through the CPU where there is no CUDA device.

    fairseq's buffers (``max_size`` bytes per rank) live on the GPU; ``all_gather_object`` needs none,
    so ``max_size`` bounds nothing there.
    """

    @functools.wraps(all_gather_list)
    def wrapper(data: Any, group=None, max_size: int = 16384) -> List[Any]:
        if torch.cuda.is_available():
            return all_gather_list(data, group=group, max_size=max_size)
        if group is None:
            group = distributed_utils.get_global_group()
        gathered: List[Any] = [None] * distributed_utils.get_world_size(group)
        dist.all_gather_object(gathered, utils.move_to_cpu(data), group=group)
        return gathered

    wrapper.gathers_without_cuda = True
    return wrapper


def install() -> None:
    """Wrap ``call_main`` and ``all_gather_list`` and give fairseq the CPU-aware DDP (once)."""
    if not getattr(distributed_utils.call_main, "starts_cpu_ranks", False):
        distributed_utils.call_main = start_cpu_ranks(distributed_utils.call_main)
    if not getattr(distributed_utils.all_gather_list, "gathers_without_cuda", False):
        distributed_utils.all_gather_list = gather_without_cuda(distributed_utils.all_gather_list)
    distributed_fairseq_model.DistributedDataParallel = CpuAwareDistributedDataParallel
