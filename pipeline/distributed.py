"""Data-parallel training under ``torchrun``: one small context that every training loop uses.

Launch::

    torchrun --nproc_per_node 2 -m stages.cli train_classifier --config configs/default.yaml

``init_distributed(device_name)`` reads torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, joins the
process group (gloo on CPU; NCCL on CUDA, each process on ``cuda:LOCAL_RANK``) and returns a
:class:`DistContext`. Without torchrun (or with ``--nproc_per_node 1``) it returns a single-process context
whose every method is a no-op, so a loop written against it runs exactly as a plain loop would.

The API (what a training loop calls)::

    ctx = init_distributed(cfg.device)     # ctx.rank, ctx.world_size, ctx.is_main, ctx.device
    try:
        if ctx.is_main: stage.begin(...)   # only rank 0 writes: checkpoints, logs, resume files, markers
        ctx.barrier()                      # the others wait until it has
        ctx.local_batch_size(cfg.batch_size, "<section>.batch_size")   # fail early if N does not divide it
        net.to(ctx.device); opt = ...; load the resume state into net/opt (every rank reads the same file)
        model = ctx.wrap(LossNet(net))     # DDP (BatchNorm -> SyncBatchNorm) when world_size > 1, else net;
                                           # its forward must compute the loss: DDP syncs what forward ran
        for epoch in ...:
            loader = ctx.loader(train_set, cfg.batch_size, shuffle=True, seed=seed, epoch=epoch,
                                drop_last=True, key="<section>.batch_size", num_workers=...)
            for x, y in tqdm(loader, disable=not ctx.is_main):
                loss = model(x.to(ctx.device), y.to(ctx.device))          # the local mean loss
                means, scale = ctx.reduce_losses({"loss": loss}, len(x))  # the global batch's mean (floats)
                opt.zero_grad(); (loss * scale).backward(); opt.step()
            local = predict(net, Subset(val_set, ctx.shard(len(val_set))))    # validation with the unwrapped
            scores = ctx.gather_rows(local, len(val_set))                     # net, sharded, back in order
            # (or: confusion = ctx.all_reduce_sum(local_confusion)); a shard may be empty when N > len(val_set)
            if ctx.is_main: save the checkpoint / resume file
    finally:
        ctx.close()

Why N processes give the single-process result (up to float error):
- ``batch_size`` is the *global* batch: each of the N ranks gets ``batch_size / N`` of it (an error if N
  does not divide it). Every rank draws the same seeded permutation of the data set for the epoch
  (:class:`GlobalBatchSampler`, a function of ``seed`` and ``epoch`` only); global batch ``b`` is the
  same set of samples for any N, rank ``r`` taking its items ``r, r+N, r+2N...``.
- DDP averages the ranks' gradients, which is the gradient of the global batch's mean loss when the
  ranks hold equally many samples; ``reduce_losses`` returns the factor that makes it so when they do not
  (a short last batch), 1.0 otherwise.
- BatchNorm layers are synchronised (:meth:`DistContext.wrap`): their batch statistics are those of
  the global batch, as in one process. On CUDA this is ``SyncBatchNorm``; PyTorch's only runs on GPUs,
  so on CPU (gloo) the layers compute the same global statistics with differentiable all-reduces.
- Random augmentation must not depend on which rank draws a sample: seed it per sample index and
  epoch (:func:`sample_seed`); ``loader`` calls the data set's ``set_epoch(epoch)`` if it has one.
- Dropout or other random layers draw from each process's own generator and would break the equality.

Stages that do not train: ``torchrun_rank() > 0`` tells them to return at once; ``check_torchrun_command``
refuses any command but one training stage under torchrun (for the CLI, before it runs anything).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

# Before any process group exists: torch.distributed.nn.functional binds ``group=group.WORLD`` as the default
# argument of its functions when it is imported, and DDP's first construction imports it (through
# torch._dynamo). Imported after init_process_group, it would hold the world group for good: destroy_process_group
# would leave its gloo threads running, and the group would be torn down during interpreter shutdown, where gloo
# can abort the process ("terminate called without an active exception") after its work is done.
import torch.distributed.nn  # noqa: F401
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.device import resolve_device
from pipeline.errors import ConfigError
from pipeline.stage_names import TRAINING_STAGES
from pipeline.workers import worker_context

log = logging.getLogger(__name__)


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) when not launched by it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def torchrun_rank() -> int:
    """This process's rank under torchrun, 0 without it: a stage that runs on rank 0 only returns when > 0."""
    return torchrun_env()[0]


def check_torchrun_command(stages: list[str]) -> None:
    """Under torchrun with more than one process, a command must name one training stage: the other stages
    would run once per process, racing each other over the run folder. A ``ConfigError`` otherwise (for the
    CLI to call before it runs anything)."""
    world = torchrun_env()[1]
    if world > 1 and (len(stages) != 1 or stages[0] not in TRAINING_STAGES):
        raise ConfigError(f"torchrun runs one training stage ({' or '.join(TRAINING_STAGES)}) on its "
                          f"{world} processes, not {' '.join(stages) if len(stages) == 1 else 'all'}; run "
                          "the other stages without torchrun")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch``: the same whichever rank or worker draws it."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def epoch_permutation(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)``: the one a ``DataLoader(shuffle=True)`` draws after
    ``torch.manual_seed(seed)`` (so the single-process order of the samples is what it was before),
    but from a generator of its own rather than the global one."""
    g = torch.Generator().manual_seed(seed)
    sub = int(torch.empty((), dtype=torch.int64).random_(generator=g).item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(sub)).tolist()


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch: the global batches cut from one permutation (seeded, the
    same on every rank) or from ``range(n)``, rank ``r`` of ``N`` taking items ``r::N`` of each."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, *, shuffle: bool,
                 seed: int = 0, drop_last: bool = False, key: str = "batch_size"):
        if batch_size < 1:
            raise ConfigError(f"config key '{key}': expected at least 1, got {batch_size}")
        if batch_size % world_size:
            raise ConfigError(f"config key '{key}': {batch_size} is not divisible by the {world_size} processes "
                              f"of torchrun (each takes an equal share of a batch); use a multiple of {world_size}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        last = n % batch_size
        if world_size > 1 and not drop_last and 0 < last < world_size:
            raise ConfigError(f"config key '{key}': the last batch of {last} of {n} samples cannot be split over "
                              f"{world_size} processes; change the batch size or the number of processes")

    def global_batches(self) -> list[list[int]]:
        order = epoch_permutation(self.n, self.seed) if self.shuffle else list(range(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)


# ----------------------------------------------------------------------------- BatchNorm on the global batch


class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks, differentiable: the gradient of a sum that every rank uses is the sum of the
    ranks' gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


class _GlobalBatchNorm:
    """Mixed into a BatchNorm layer's class (``bn.__class__`` is swapped, so parameters, buffers, state-dict
    keys and ``isinstance`` stay those of the original layer): in training, under a process group of more
    than one process, normalise with the statistics of the global batch (two differentiable all-reduces:
    the mean, then the biased variance) and update the running statistics with them, as BatchNorm does on
    one process holding the whole batch. Otherwise, the layer's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half precision: sums in float32
        count = torch.tensor([x.numel() / x.shape[1]], dtype=xf.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        var = _AllReduceSum.apply((xf - mean.view(shape)).pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        y = y.to(x.dtype)
        if hasattr(self, "act") and hasattr(self, "drop"):  # timm's BatchNormAct2d: bn, then drop, then act
            y = self.act(self.drop(y))
        return y


_GLOBAL_BN_CLASSES: dict[type, type] = {}


def sync_batchnorm_cpu(model: nn.Module) -> nn.Module:
    """Swap every BatchNorm layer of ``model`` (in place) to normalise over the global batch (see above)."""
    for m in model.modules():
        cls = type(m)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not issubclass(cls, _GlobalBatchNorm):
            if cls not in _GLOBAL_BN_CLASSES:
                _GLOBAL_BN_CLASSES[cls] = type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {})
            m.__class__ = _GLOBAL_BN_CLASSES[cls]
    return model


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch: ``SyncBatchNorm`` on CUDA (timm's converter, which also knows its
    BatchNorm+activation layers), the gloo-capable swap above elsewhere."""
    if device.type != "cuda":
        return sync_batchnorm_cpu(model)
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


# ----------------------------------------------------------------------------- the context


@dataclass
class DistContext:
    """Where this process stands in a torchrun job (world_size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    _owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def local_batch_size(self, batch_size: int, key: str = "batch_size") -> int:
        """This rank's share of a global batch; a ``ConfigError`` naming ``key`` if N does not divide it."""
        GlobalBatchSampler(0, batch_size, self.rank, self.world_size, shuffle=False, key=key)
        return batch_size // self.world_size

    def sampler(self, n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0,
                drop_last: bool = False, key: str = "batch_size") -> GlobalBatchSampler:
        """The batch sampler of epoch ``epoch``: this rank's share of each global batch of ``batch_size``."""
        return GlobalBatchSampler(n, batch_size, self.rank, self.world_size, shuffle=shuffle,
                                  seed=seed * 1000 + epoch, drop_last=drop_last, key=key)

    def loader(self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0,
               drop_last: bool = False, key: str = "batch_size", **kwargs) -> DataLoader:
        """A ``DataLoader`` over this rank's share of each global batch of ``batch_size`` (``kwargs`` go
        to the ``DataLoader``: ``num_workers``...). Calls ``dataset.set_epoch(epoch)`` if it has one."""
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler = self.sampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                               drop_last=drop_last, key=key)
        if kwargs.get("num_workers", 0) > 0:  # loader workers must not inherit native thread pools
            kwargs.setdefault("multiprocessing_context", worker_context())
        return DataLoader(dataset, batch_sampler=sampler, **kwargs)

    def wrap(self, model: nn.Module, **ddp_kwargs) -> nn.Module:
        """``model`` on ``self.device``; with more than one process, its BatchNorm layers synchronised and
        the whole wrapped in ``DistributedDataParallel`` (``static_graph=True`` unless ``ddp_kwargs`` say
        otherwise: every step uses the same parameters). Call the returned module's forward to train (DDP
        syncs the gradients of what its forward computed); keep ``model`` to save or evaluate."""
        model.to(self.device)
        if not self.distributed:
            return model
        model = sync_batchnorm(model, self.device)
        ids = [self.local_rank] if self.device.type == "cuda" else None
        # static_graph: the same parameters take part in every step, and the ones that never do (timm's
        # unused ImageNet classifier inside a backbone) are no error
        ddp_kwargs.setdefault("static_graph", True)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The module inside a DDP wrapper (the model itself if it is not wrapped)."""
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.backend == "nccl" else t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks (a new tensor on ``t``'s device; ``t`` itself on one process)."""
        if not self.distributed:
            return t
        out = self._comm(t.detach().clone())
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks."""
        return self.all_reduce_sum(t) / self.world_size if self.distributed else t

    def reduce_losses(self, losses: Mapping[str, torch.Tensor], n_local: int) -> tuple[dict[str, float], float]:
        """``losses`` are this rank's means over its ``n_local`` samples. Returns the global batch's mean of
        each (floats; one all-reduce, which every rank must call, so a non-finite loss on any rank shows on
        all of them) and the factor to multiply this rank's loss by before ``backward`` so that DDP's
        gradient average is the gradient of the global mean: ``n_local * N / n_global`` (1.0 when the
        ranks hold equally many samples, and always on one process)."""
        if not self.distributed:
            return {k: v.item() for k, v in losses.items()}, 1.0
        values = [v.detach().float().reshape(()) * n_local for v in losses.values()]
        stats = torch.stack([*values, torch.tensor(float(n_local), device=values[0].device)])
        stats = self.all_reduce_sum(stats).cpu()
        n_global = stats[-1].item()
        means = {k: (stats[i] / n_global).item() for i, k in enumerate(losses)}
        return means, n_local * self.world_size / n_global

    def shard(self, n: int) -> list[int]:
        """This rank's items of ``range(n)`` for sharded evaluation: ``rank, rank + N, ...``."""
        return list(range(self.rank, n, self.world_size))

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The rows of every rank's ``shard(n)`` results, put back in the order of ``range(n)`` (every rank
        gets the whole ``[n, ...]`` tensor)."""
        if not self.distributed:
            return local
        size = math.ceil(n / self.world_size)
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[:len(local)] = local
        parts = [self._comm(torch.empty_like(padded)) for _ in range(self.world_size)]
        dist.all_gather(parts, self._comm(padded))
        out = local.new_empty((n, *local.shape[1:]))
        for r, part in enumerate(parts):
            out[r::self.world_size] = part[:len(range(r, n, self.world_size))].to(local.device)
        return out

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written what the others read)."""
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        """Leave the process group, if this context joined it, once every rank is here (a rank that left
        while another still worked, e.g. rank 0 saving the checkpoint, could abort in gloo's teardown). The group
        is destroyed here, its threads ended, while the interpreter is whole (see the import of
        torch.distributed.nn above)."""
        if self._owns_group and dist.is_initialized():
            try:
                self.barrier()
            except Exception:  # noqa: BLE001 - a rank died: leave anyway, the first error is the one to see
                log.debug("barrier before leaving the process group failed", exc_info=True)
            dist.destroy_process_group()
            self._owns_group = False


def init_distributed(device_name: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """The context of this process: torchrun's rank and world size, the process group joined (gloo on CPU,
    NCCL on CUDA with ``cuda:LOCAL_RANK``), log messages below warnings silenced for good on ranks other
    than 0 (only rank 0 logs).
    Without torchrun, or with one process, a single-process context on ``resolve_device(device_name)``."""
    device = resolve_device(device_name)
    rank, world, local = torchrun_env()
    if dist.is_available() and dist.is_initialized():  # joined by the caller: use its group
        rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return DistContext(device=device)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device': torchrun process {rank} has LOCAL_RANK {local}, but this "
                              f"machine has {torch.cuda.device_count()} CUDA devices; use --nproc_per_node <= that")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        owns = True
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return DistContext(rank, world, local, device, backend, owns)


@contextmanager
def distributed(device_name: str = "auto") -> Iterator[DistContext]:
    """``init_distributed`` for the length of a ``with`` block, closed however the block ends (a stage's run)."""
    ctx = init_distributed(device_name)
    try:
        yield ctx
    finally:
        ctx.close()
