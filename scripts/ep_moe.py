#!/usr/bin/env python
"""An expert-parallel MoE layer whose combine reads FC2's output where FC2 wrote it (issue #25).

scripts/moe_layer.py's MoE block with its experts spread over N processes (one a GPU), each rank
holding experts [r L, (r + 1) L) (L = experts / N) in a GroupedMLP of its own and a replica of the
router. A step on rank r, for its T tokens:

    route      moe_layer.MoE.route: each token's top-k experts and their renormalized probs
    plan       every rank's rows per expert, all-gathered (N, E); from that table alone each rank
               works out where each of its (token, choice) rows goes, and its experts' row layout
               (plan_routes: the index arithmetic both backends share)
    dispatch   x and probs rows, sorted by expert, to the ranks owning the experts (all_to_all_single)
    experts    GroupedMLP over the local experts, rows expert-major (sources in rank order within an
               expert, as the single-process layer orders them); FC2 writes straight into the rank's
               out buffer (out=), FC1's dgrad into its grad_input buffer (grad_input=)
    combine    each token's k expert outputs read from the out buffers of the ranks that hold them,
               then summed (the probs were applied before FC2, as in moe_layer)

Backward mirrors it: the combine's backward sends each row's gradient to its expert rank as the
dispatch sends x (all_to_all_single), and the dispatch's backward reads the x rows' gradients from
the grad_input buffers as the combine reads the output; the probs' gradients come home by
all_to_all_single. Buffers and their peers' copies:

    --backend nccl   torch symmetric memory (torch.distributed._symmetric_memory): the combine's
                     gather kernels read a peer's buffer in place over NVLink, after a stream-ordered
                     barrier; no copy of the expert output is made, as long as FC2's backend writes
                     out= in place (cute and cublas do; the torch backend copies, which --profile shows)
    --backend gloo   plain CPU tensors; a peer's buffer is fetched whole with all_gather, then read
                     by the same gather code with the same indices, so CI tests the GPU's arithmetic
                     (the all-to-alls are all_to_all_single on both: gloo has it, uneven splits too)

The run checks the layer against the single-process one (all experts in one GroupedMLP, the same
weights) on the same global batch, forward and backward, on every rank; --profile also records a
torch.profiler trace a rank and reports any device-to-device copy launched while the experts or
the combine ran. The rows a rank can receive are bounded by N * T * min(k, L): the buffers have
that many rows (no token dropping here). One host sync a step: the split sizes of the all-to-alls.

    python scripts/ep_moe.py                                            # 2 CPU processes, gloo
    python scripts/ep_moe.py --backend nccl --profile /tmp/ep_moe       # 2 GPUs, symmetric memory
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, record_function

import grouped

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # moe_layer.py sits next to this file
import moe_layer  # noqa: E402

BACKENDS = ("gloo", "nccl")
COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # a mismatched collective fails the run instead of hanging it
PROFILED_RANGES = ("ep_moe.experts", "ep_moe.combine")  # a copy of the expert output would be launched in these
BF16_NORMWISE, FP32_NORMWISE = 4e-3, 1e-5  # docs/design.md's test tolerances


# ---- the index arithmetic (pure functions of the routing; both backends run exactly this) ----

def exclusive_cumsum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return t.cumsum(dim) - t


@dataclass(frozen=True)
class RoutePlan:
    """Where one rank's (token, choice) rows go and where its experts' rows live, for one step.

    Send positions order this rank's T * k rows by expert (stable, so by (token, choice) within an
    expert); experts being numbered by rank, that groups them by destination rank too. A rank's
    buffers hold its received rows expert-major, and within an expert by source rank: the order the
    single-process layer gives them."""

    top_k: int
    send_order: torch.Tensor      # (T k,) the (token, choice) row t * k + j at each send position
    send_token: torch.Tensor      # (T k,) its token: send_order // k
    send_position: torch.Tensor   # (T k,) the inverse: the send position of each (token, choice) row
    peer_rows: torch.Tensor       # (T k,) the row of the destination rank's buffers holding each sent row
    buffer_source: torch.Tensor   # (R,) for each row of this rank's buffers, the received row it holds
    send_counts: list[int]        # rows sent to each rank
    recv_counts: list[int]        # rows received from each rank
    local_split_sizes: list[int]  # rows of each local expert in this rank's buffers

    @property
    def rows(self) -> int:
        """R: the rows this rank's experts process."""
        return sum(self.recv_counts)


def plan_routes(chosen: torch.Tensor, counts: torch.Tensor, rank: int) -> RoutePlan:
    """The RoutePlan of ``rank`` from its chosen experts (T, k) and ``counts`` (N, E), every rank's
    rows per expert (counts[s, e]: rows rank s sends to expert e). Reads ``counts`` on the host once,
    the rest stays on its device."""
    world_size, num_experts = counts.shape
    if num_experts % world_size:
        raise ValueError(f"counts has {num_experts} experts for {world_size} ranks: expected a multiple")
    per_rank, top_k = num_experts // world_size, chosen.shape[1]
    host_counts = counts.tolist()  # the sync: all_to_all_single takes its split sizes on the host
    if sum(host_counts[rank]) != chosen.numel():
        raise ValueError(f"counts[{rank}] sums to {sum(host_counts[rank])}, rank {rank} chose {chosen.numel()} rows")
    mine = counts[rank]
    flat = chosen.reshape(-1)
    send_order = torch.argsort(flat, stable=True)
    sent_expert = flat[send_order]
    # row_start[e, s]: the first row, in the buffers of expert e's rank, of the rows source s sends
    # to e. Each rank's buffers: its experts in order, within an expert the sources in rank order.
    expert_major = counts.T.reshape(world_size, per_rank * world_size)
    row_start = exclusive_cumsum(expert_major, dim=1).reshape(num_experts, world_size)
    first_sent = exclusive_cumsum(mine)  # send position of this rank's first row to each expert
    positions = torch.arange(flat.numel(), device=flat.device)
    peer_rows = row_start[sent_expert, rank] + positions - first_sent[sent_expert]

    # Received rows arrive source-major ((source, expert) blocks, all_to_all's order); the buffers
    # hold the same blocks expert-major. Map each buffer row to its received row, block by block.
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    received = counts[:, local]  # (N sources, L local experts)
    received_start = exclusive_cumsum(received.reshape(-1)).reshape(world_size, per_rank)
    recv_counts = [sum(row[local]) for row in host_counts]
    block_rows = received.T.reshape(-1)  # blocks in buffer order: (expert, source)
    shift = (received_start.T - row_start[local]).reshape(-1)
    buffer_source = torch.arange(sum(recv_counts), device=flat.device) + torch.repeat_interleave(
        shift, block_rows, output_size=sum(recv_counts))
    return RoutePlan(
        top_k=top_k, send_order=send_order, send_token=send_order // top_k,
        send_position=torch.argsort(send_order), peer_rows=peer_rows, buffer_source=buffer_source,
        send_counts=[sum(host_counts[rank][d * per_rank:(d + 1) * per_rank]) for d in range(world_size)],
        recv_counts=recv_counts,
        local_split_sizes=[sum(row[e] for row in host_counts) for e in range(local.start, local.stop)],
    )


def blocks(sizes: list[int]):
    """(rank, start, end) of consecutive blocks of the given sizes."""
    start = 0
    for rank, size in enumerate(sizes):
        yield rank, start, start + size
        start += size


def pull_from_experts(peer_buffers: list[torch.Tensor], plan: RoutePlan) -> torch.Tensor:
    """This rank's rows by send position (T k, H), each read from the buffer of the rank that
    holds it: one gather kernel a peer, straight from that peer's memory on the GPU."""
    pulled = peer_buffers[0].new_empty(plan.peer_rows.shape[0], peer_buffers[0].shape[1])
    for rank, start, end in blocks(plan.send_counts):
        torch.index_select(peer_buffers[rank], 0, plan.peer_rows[start:end], out=pulled[start:end])
    return pulled


def sum_over_choices(rows_by_send_position: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(T k, H) by send position -> (T, H): each token's k rows summed (moe_layer's un-permutation)."""
    tokens = plan.send_position.shape[0] // plan.top_k
    return rows_by_send_position[plan.send_position].view(tokens, plan.top_k, -1).sum(dim=1)


def send_to_experts(rows_by_send_position: torch.Tensor, plan: RoutePlan, group) -> torch.Tensor:
    """all_to_all_single of rows by send position; returns what this rank received, in buffer order."""
    received = rows_by_send_position.new_empty((plan.rows, *rows_by_send_position.shape[1:]))
    dist.all_to_all_single(received, rows_by_send_position.contiguous(), plan.recv_counts, plan.send_counts,
                           group=group)
    return received[plan.buffer_source]


def return_to_sources(rows_in_buffer_order: torch.Tensor, plan: RoutePlan, group) -> torch.Tensor:
    """send_to_experts backwards: rows in buffer order go back to the ranks that sent them; returns
    this rank's rows by send position."""
    as_received = torch.empty_like(rows_in_buffer_order)
    as_received[plan.buffer_source] = rows_in_buffer_order
    home = rows_in_buffer_order.new_empty((plan.send_order.shape[0], *rows_in_buffer_order.shape[1:]))
    dist.all_to_all_single(home, as_received, plan.send_counts, plan.recv_counts, group=group)
    return home


# ---- the buffers FC2 and FC1's dgrad write into, and how a rank reads its peers' ----

class SymmetricBuffer:
    """(rows, cols) in torch symmetric memory: every rank's buffer is mapped on every GPU, so a
    kernel reads a peer's rows in place (NVLink). The barriers are stream-ordered device kernels."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device, group):
        self.local = symm_mem.empty(rows, cols, dtype=dtype, device=device)
        self._handle = symm_mem.rendezvous(self.local, group)
        # get_remote_tensor, not get_buffer: the allocator may place several buffers in one
        # symmetric segment, and get_buffer counts from the segment's start, not this tensor's.
        self._peers = [self._handle.get_remote_tensor(peer, (rows, cols), dtype)
                       for peer in range(self._handle.world_size)]

    def peers(self) -> list[torch.Tensor]:
        """Every rank's buffer, once every rank's earlier writes to its own are visible."""
        self._handle.barrier(channel=0)
        return self._peers

    def done(self) -> None:
        """No rank writes its buffer again until every rank has finished reading the peers'."""
        self._handle.barrier(channel=1)


class GatheredBuffer:
    """The same contract with a plain tensor (gloo, CPU): the peers' buffers are fetched whole."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device, group):
        self.local = torch.empty(rows, cols, dtype=dtype, device=device)
        self._group = group

    def peers(self) -> list[torch.Tensor]:
        gathered = [torch.empty_like(self.local) for _ in range(dist.get_world_size(self._group))]
        dist.all_gather(gathered, self.local, group=self._group)
        return gathered

    def done(self) -> None:
        """Nothing to wait for: the peers read copies."""


BUFFERS = {"nccl": SymmetricBuffer, "gloo": GatheredBuffer}


def _check_in_buffer(t: torch.Tensor, buffer, what: str) -> None:
    if t.numel() and t.data_ptr() != buffer.local.data_ptr():
        raise RuntimeError(f"{what} must be the rows written in place at the start of its buffer "
                           f"(address {buffer.local.data_ptr():#x}), got a tensor at {t.data_ptr():#x}")


class _Dispatch(torch.autograd.Function):
    """x (T, H) and probs (T, k) of this rank's tokens -> its experts' rows (R, H) and their probs
    (R,), in buffer order. Backward: x's gradient is read from the grad_input buffers, where FC1's
    dgrad wrote it on each expert rank; the probs' gradient comes back by all-to-all."""

    @staticmethod
    def forward(ctx, x, probs, plan: RoutePlan, group, grad_input_buffer):
        ctx.plan, ctx.group, ctx.grad_input_buffer = plan, group, grad_input_buffer
        rows = send_to_experts(x[plan.send_token], plan, group)
        return rows, send_to_experts(probs.reshape(-1)[plan.send_order], plan, group)

    @staticmethod
    def backward(ctx, grad_rows, grad_row_probs):
        plan, buffer = ctx.plan, ctx.grad_input_buffer
        _check_in_buffer(grad_rows, buffer, "the dispatched rows' gradient (FC1's grad_input)")
        grad_x = sum_over_choices(pull_from_experts(buffer.peers(), plan), plan)
        buffer.done()
        grad_probs = return_to_sources(grad_row_probs, plan, ctx.group)[plan.send_position]
        return grad_x, grad_probs.view(-1, plan.top_k), None, None, None


class _Combine(torch.autograd.Function):
    """The experts' output rows, which FC2 wrote at the start of this rank's out buffer (R, H) ->
    each of this rank's tokens' sum over its k choices (T, H), read from the ranks holding them.
    Backward: each row's gradient is its token's, sent to its expert rank as the dispatch sends x."""

    @staticmethod
    def forward(ctx, expert_out, plan: RoutePlan, group, out_buffer):
        _check_in_buffer(expert_out, out_buffer, "the experts' output (FC2's out)")
        ctx.plan, ctx.group = plan, group
        combined = sum_over_choices(pull_from_experts(out_buffer.peers(), plan), plan)
        out_buffer.done()
        return combined

    @staticmethod
    def backward(ctx, grad_combined):
        return send_to_experts(grad_combined[ctx.plan.send_token], ctx.plan, ctx.group), None, None, None


def gather_counts(chosen: torch.Tensor, num_experts: int, group) -> torch.Tensor:
    """(N, E): every rank's rows per expert this step."""
    mine = torch.bincount(chosen.reshape(-1), minlength=num_experts)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    return torch.stack(counts)


class ExpertParallelMoE(moe_layer.MoE):
    """moe_layer.MoE with its experts spread over the ranks of ``group`` (gloo or NCCL): this rank
    holds experts [rank L, (rank + 1) L) and a replica of the router, and takes up to cfg.tokens
    tokens a step. Every rank must run every forward and backward (the communication is collective)."""

    def __init__(self, cfg: moe_layer.Config, group, *, device=None):
        world_size, backend = dist.get_world_size(group), dist.get_backend(group)
        if cfg.num_experts % world_size:
            raise ValueError(f"num_experts ({cfg.num_experts}) must be a multiple of the ranks ({world_size})")
        if backend not in BUFFERS:
            raise ValueError(f"the process group's backend must be one of {tuple(BUFFERS)}, got {backend!r}")
        per_rank = cfg.num_experts // world_size
        super().__init__(cfg, grouped.GroupedMLP(per_rank, cfg.hidden, cfg.ffn_hidden, device=device), device=device)
        self.group, self.rank = group, dist.get_rank(group)
        self.experts_per_rank, self.max_tokens = per_rank, cfg.tokens
        device = torch.device(device) if device is not None else torch.device("cpu")
        capacity = world_size * cfg.tokens * min(cfg.top_k, per_rank)  # every token on this rank's experts
        self.out_buffer = BUFFERS[backend](capacity, cfg.hidden, torch.bfloat16, device, group)
        self.grad_input_buffer = BUFFERS[backend](capacity, cfg.hidden, torch.bfloat16, device, group)

    @torch.no_grad()
    def copy_from(self, moe: moe_layer.MoE) -> None:
        """Take this rank's share of a single-process layer's weights: the router, and its experts."""
        mine = slice(self.rank * self.experts_per_rank, (self.rank + 1) * self.experts_per_rank)
        self.router.weight.copy_(moe.router.weight)
        self.experts.fc1.weight.copy_(moe.experts.fc1.weight[mine])
        self.experts.fc2.weight.copy_(moe.experts.fc2.weight[mine])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_tokens:
            raise ValueError(f"x has {x.shape[0]} tokens; the layer's buffers hold {self.max_tokens} a rank")
        probs, chosen = self.route(x)
        plan = plan_routes(chosen, gather_counts(chosen, self.num_experts, self.group), self.rank)
        rows, row_probs = _Dispatch.apply(x, probs, plan, self.group, self.grad_input_buffer)
        # detach(): FC2 marks out= as written in place, which would give a view of the buffer itself
        # autograd history, and the buffer would then require grad (refused as out= next step).
        out = self.out_buffer.local.detach()[:plan.rows]
        grad_input = self.grad_input_buffer.local.detach()[:plan.rows]
        with record_function(PROFILED_RANGES[0]):
            expert_out = self.experts(rows, plan.local_split_sizes, row_probs, out=out, grad_input=grad_input)
        with record_function(PROFILED_RANGES[1]):
            return _Combine.apply(expert_out, plan, self.group, self.out_buffer)


# ---- the check against the single-process layer, one process a rank ----

@dataclass(frozen=True)
class Case:
    """One layer to check. route_to_first_rank: top-1 routing onto rank 0's experts only (the
    router's rows are w, -w, 0, ...), so the other ranks receive no rows at all."""

    cfg: moe_layer.Config
    route_to_first_rank: bool = False


@dataclass(frozen=True)
class Comparison:
    """A tensor of the expert-parallel layer against the single-process layer's."""

    normwise: float            # ||got - want|| / ||want||
    worst_ulps: float | None   # bf16: the largest |got - want| in bf16 ulps of its row's largest |want|
    identical: bool

    @property
    def ok(self) -> bool:
        """Within docs/design.md's test tolerances (bf16, or fp32 where worst_ulps is None)."""
        if self.worst_ulps is None:
            return self.normwise <= FP32_NORMWISE
        return self.normwise <= BF16_NORMWISE and self.worst_ulps <= 1


def compare(got: torch.Tensor, want: torch.Tensor) -> Comparison:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise ValueError(f"comparing {got.dtype} {tuple(got.shape)} with {want.dtype} {tuple(want.shape)}")
    got64, want64 = got.detach().cpu().double(), want.detach().cpu().double()
    diff = (got64 - want64).abs()
    normwise = (diff.norm() / want64.norm().clamp_min(1e-300)).item()
    worst_ulps = None
    if want.dtype == torch.bfloat16:
        row_max = want64.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
        worst_ulps = (diff / torch.pow(2.0, torch.floor(torch.log2(row_max)) - 7)).max().item()
    return Comparison(normwise, worst_ulps, bool(torch.equal(got.detach().cpu(), want.detach().cpu())))


def _keep_routing(layer: moe_layer.MoE) -> dict:
    """Keep what layer.route returns in each forward (probs retaining their gradient)."""
    kept, route = {}, layer.route

    def route_and_keep(x):
        probs, chosen = route(x)
        probs.retain_grad()
        kept.update(probs=probs, chosen=chosen)
        return probs, chosen

    layer.route = route_and_keep
    return kept


def check_against_reference(case: Case, group, device: torch.device, profile_path: str | None = None) -> dict:
    """One forward + backward of the expert-parallel layer on this rank's share of a global batch,
    and of the single-process layer (every rank computes it, on its own device) on all of it, from
    the same weights. Returns {"rows": R, "comparisons": {name: Comparison}, "copies": [...] or None}."""
    cfg, rank, world_size = case.cfg, dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(cfg.seed)
    reference = moe_layer.MoE(cfg, grouped.GroupedMLP(cfg.num_experts, cfg.hidden, cfg.ffn_hidden, device=device),
                              device=device)
    if case.route_to_first_rank:
        if cfg.top_k != 1 or cfg.num_experts // world_size < 2:
            raise ValueError(f"route_to_first_rank needs top_k 1 and 2 experts a rank, got top_k {cfg.top_k} "
                             f"and {cfg.num_experts // world_size}")
        with torch.no_grad():  # logits (a, -a, 0, ...): expert 0 or 1, whichever sign a has
            reference.router.weight.zero_()
            reference.router.weight[1] = -reference.router.weight[0].normal_()
    layer = ExpertParallelMoE(cfg, group, device=device)
    layer.copy_from(reference)

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x_all = torch.randn(world_size * cfg.tokens, cfg.hidden, generator=gen).to(device, torch.bfloat16)
    grad_all = torch.randn(world_size * cfg.tokens, cfg.hidden, generator=gen).to(device, torch.bfloat16)
    mine = slice(rank * cfg.tokens, (rank + 1) * cfg.tokens)
    kept_reference, kept = _keep_routing(reference), _keep_routing(layer)

    x_ref = x_all.clone().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(grad_all)
    x = x_all[mine].clone().requires_grad_()
    y = layer(x)
    y.backward(grad_all[mine])

    rerouted = (kept["chosen"] != kept_reference["chosen"][mine]).any(dim=1).sum().item()
    if rerouted:
        raise RuntimeError(f"rank {rank}: {rerouted} tokens routed differently from the single-process layer "
                           "(a near-tie of the fp32 router's logits); try another seed")
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad, group=group)  # the replicas' gradients, as data parallelism sums them
    experts = slice(rank * layer.experts_per_rank, (rank + 1) * layer.experts_per_rank)
    comparisons = {
        "output": compare(y, y_ref[mine]),
        "input grad": compare(x.grad, x_ref.grad[mine]),
        "probs grad": compare(kept["probs"].grad, kept_reference["probs"].grad[mine]),
        "router weight grad": compare(router_grad, reference.router.weight.grad),
        "fc1 weight grad": compare(layer.experts.fc1.weight.grad, reference.experts.fc1.weight.grad[experts]),
        "fc2 weight grad": compare(layer.experts.fc2.weight.grad, reference.experts.fc2.weight.grad[experts]),
    }
    rows = int((kept_reference["chosen"] // layer.experts_per_rank == rank).sum())  # what this rank's experts ran
    copies = None
    if profile_path is not None:
        copies = profile_step(layer, x.detach(), grad_all[mine], profile_path)
    return {"rows": rows, "comparisons": comparisons, "copies": copies}


def profile_step(layer: ExpertParallelMoE, x: torch.Tensor, grad: torch.Tensor, path: str) -> list[str]:
    """One more forward + backward under torch.profiler, its trace written to ``path``; returns the
    device-to-device copies launched while the experts or the combine ran (see device_copies)."""
    on_gpu = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        layer(x.requires_grad_()).backward(grad)
        if on_gpu:
            torch.cuda.synchronize(x.device)
    prof.export_chrome_trace(path)
    return device_copies(path, PROFILED_RANGES)


def device_copies(trace_path: str, range_names=PROFILED_RANGES) -> list[str]:
    """The device-to-device (or peer-to-peer) memcpys in a torch.profiler chrome trace whose launch
    (the CUDA runtime or driver call, matched by correlation id) happened inside one of the
    record_function ranges ``range_names``; each as "name, bytes, range". A copy done by a kernel
    (an elementwise copy_ of strided tensors) is not a memcpy and is not seen here."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    ranges = [e for e in events if e.get("cat") == "user_annotation" and e["name"] in range_names]
    missing = set(range_names) - {e["name"] for e in ranges}
    if missing:
        raise ValueError(f"{trace_path} has no range named {sorted(missing)}: expected the layer's record_function "
                         f"ranges {list(range_names)} (was a forward profiled?)")
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    found = []
    for copy in events:
        args = copy.get("args", {})
        kind = args.get("copy kind") or copy["name"]
        if copy.get("cat") != "gpu_memcpy" or not ("DtoD" in kind or "PtoP" in kind):
            continue
        launch = launches.get(args.get("correlation"))
        inside = [r["name"] for r in ranges if launch is not None and r["ts"] <= launch["ts"] <= r["ts"] + r["dur"]]
        if inside:
            found.append(f"{copy['name']}, {args.get('bytes')} bytes, launched in {inside[0]}")
    return found


def _worker(rank: int, world_size: int, backend: str, rendezvous_file: str, case_fields: list[dict],
            profile_dir: str | None, report_dir: str) -> None:
    # NVLink multicast stays off (issue #25): symmetric memory and NCCL's NVLS both use it otherwise.
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        options = {"device_id": device}
    else:
        device, options = torch.device("cpu"), {}
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, init_method=f"file://{rendezvous_file}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT, **options)
    try:
        reports = []
        for i, fields in enumerate(case_fields):
            case = Case(moe_layer.Config(**fields.pop("cfg")), **fields)
            trace = os.path.join(profile_dir, f"ep_moe_case{i}_rank{rank}.json") if profile_dir else None
            report = check_against_reference(case, dist.group.WORLD, device, trace)
            report["comparisons"] = {name: dataclasses.asdict(c) for name, c in report["comparisons"].items()}
            reports.append(report)
        with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
            json.dump(reports, f)
    finally:
        dist.destroy_process_group()


def launch(cases: list[Case], *, backend: str = "gloo", nprocs: int = 2, profile_dir: str | None = None) -> list:
    """Check every case on ``nprocs`` spawned processes; returns reports[case][rank], each
    {"rows", "comparisons": {name: Comparison}, "copies"} (see check_against_reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise ValueError(f"--backend nccl runs one process a GPU: {nprocs} processes, {torch.cuda.device_count()} GPUs")
    if profile_dir is not None:
        os.makedirs(profile_dir, exist_ok=True)
    # The cases travel as plain fields: pickling a Config needs the very class sys.modules["moe_layer"]
    # holds, which a caller that loads moe_layer.py by its path may have replaced.
    case_fields = [dataclasses.asdict(case) for case in cases]
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(_worker, args=(nprocs, backend, os.path.join(scratch, "rendezvous"), case_fields, profile_dir,
                                scratch), nprocs=nprocs)
        by_rank = []
        for rank in range(nprocs):
            with open(os.path.join(scratch, f"rank{rank}.json")) as f:
                by_rank.append(json.load(f))
    for reports in by_rank:
        for report in reports:
            report["comparisons"] = {name: Comparison(**c) for name, c in report["comparisons"].items()}
    return [[by_rank[rank][i] for rank in range(nprocs)] for i in range(len(cases))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="gloo", help="gloo: CPU processes; nccl: one GPU each")
    parser.add_argument("--nprocs", type=int, default=2)
    for name in ("hidden", "ffn_hidden", "num_experts", "top_k", "tokens", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(moe_layer.Config, name),
                            help="per rank" if name == "tokens" else None)
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace a rank and case to DIR and "
                        "report device-to-device copies launched in the experts or the combine")
    args = parser.parse_args()
    cfg = moe_layer.Config(args.hidden, args.ffn_hidden, args.num_experts, args.top_k, args.tokens, seed=args.seed)
    cases = [Case(cfg)]
    if cfg.num_experts // args.nprocs >= 2:  # the skewed case routes onto rank 0's first two experts
        cases.append(Case(dataclasses.replace(cfg, top_k=1), route_to_first_rank=True))
    else:
        print(f"skipped the all-to-rank-0 case: it needs 2 experts a rank, {cfg.num_experts // args.nprocs} here")
    results = launch(cases, backend=args.backend, nprocs=args.nprocs, profile_dir=args.profile)

    all_ok = True
    for case, reports in zip(cases, results):
        c = case.cfg
        print(f"{args.nprocs} ranks ({args.backend}), {c.num_experts} experts, top-{c.top_k}, {c.tokens} tokens "
              f"a rank, hidden {c.hidden}, ffn {c.ffn_hidden}"
              + (", all routed to rank 0" if case.route_to_first_rank else ""))
        for rank, report in enumerate(reports):
            print(f"  rank {rank}: {report['rows']} rows on its experts")
            for name, cmp in report["comparisons"].items():
                ulps = f"{cmp.worst_ulps:5.2f} ulp" if cmp.worst_ulps is not None else " " * 9
                verdict = "bit-identical" if cmp.identical else ("ok" if cmp.ok else "OVER TOLERANCE")
                print(f"    {name:<20} normwise {cmp.normwise:9.2e}  {ulps}  {verdict}")
                all_ok &= cmp.ok
            if report["copies"] is not None:
                print("    profile: " + ("; ".join(report["copies"]) or "no device-to-device copy launched in "
                                         + " or ".join(PROFILED_RANGES)))
                all_ok &= not report["copies"]
    print("against the single-process layer, within docs/design.md's tolerances"
          + (", no copy of the expert output" if args.profile else "") + f": {'yes' if all_ok else 'NO'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
