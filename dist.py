"""
Data-parallel plumbing for torchrun, kept out of the training loops: process-group
setup, gradient all-reduce, agreed stops and per-rank random states. Without torchrun
every helper is a no-op (one process, rank 0), so the loops read as the method.
"""

import os

import torch

from common import TrainingError, pick_device


def rng_state():
    """torch's CPU (and CUDA) generator states, for exact resumption."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states():
    """Every process's rng_state(), a list indexed by rank: under torchrun the ranks' streams
    differ (dropout on micro-batches of other shapes), so a checkpoint keeps each one.
    A collective: every rank calls it."""
    if not distributed():
        return [rng_state()]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states, rank, world_size):
    """This process's state from rng_states(). A checkpoint written by another number of
    processes (or an older one holding a single state) gives every rank the first state:
    the run goes on, but not bit for bit."""
    states = states if isinstance(states, list) else [states]
    if len(states) != world_size and is_main(rank):
        print(f"note: the checkpoint holds {len(states)} processes' random states, this run has {world_size}; "
              "continuing with the first one's")
    set_rng_state(states[rank] if len(states) == world_size else states[0])


# -----------------------------------------------------------------------------
# data-parallel training (torchrun); without torchrun every helper is a no-op


def setup_distributed(device_name):
    """Returns (rank, world_size, local_rank, device). Under torchrun (RANK, WORLD_SIZE
    and LOCAL_RANK set) it joins the process group: nccl on CUDA, gloo on CPU; each
    process takes GPU LOCAL_RANK. Otherwise (0, 1, 0, pick_device(device_name))."""
    if "RANK" not in os.environ:
        return 0, 1, 0, pick_device(device_name)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, local_rank, device


def is_main(rank):
    """Rank 0 alone prints, logs and writes files."""
    return rank == 0


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier():
    if distributed():
        torch.distributed.barrier()


def cleanup_distributed():
    if distributed():
        torch.distributed.destroy_process_group()


def sum_over_ranks(tensor):
    """The sum of `tensor` over all processes (itself when there is one)."""
    if not distributed():
        return tensor
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor)
    return tensor


def mean_over_ranks(tensor):
    """The mean of `tensor` over all processes (itself when there is one)."""
    if not distributed():
        return tensor
    return sum_over_ranks(tensor) / torch.distributed.get_world_size()


def start_replicas(parameters, seed, rank):
    """Every process takes rank 0's initial weights (as DDP does at wrap time), then seeds
    torch with seed + rank, so that dropout and sampling noise differ across ranks
    (nanoGPT's seed offset). Without torchrun it does nothing."""
    if not distributed():
        return
    for p in parameters:
        torch.distributed.broadcast(p.data, src=0)
    torch.manual_seed(seed + rank)


def any_rank(flag, device):
    """True on every process if `flag` is true on any one: all ranks stop at the same step."""
    return bool(mean_over_ranks(torch.tensor(float(flag), device=device)) > 0)


def average_gradients(parameters):
    """Replaces each trainable parameter's gradient by its mean over processes, in one
    all-reduce. Each rank's loss is a mean over an equal slice of the global batch, so
    this is the single-process gradient of the global batch. A missing grad counts as 0."""
    if not distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = mean_over_ranks(torch.cat([p.grad.flatten() for p in params]))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def check_replicas_agree(parameters):
    """Raises TrainingError unless every process holds rank 0's weights: a cheap end-of-run invariant."""
    if not distributed():
        return
    flat = torch.cat([p.detach().flatten() for p in parameters])
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    if not any_rank(not torch.equal(flat, reference), flat.device):
        return
    raise TrainingError("data-parallel replicas diverged: some rank's weights differ from rank 0's")
