"""Gradient filtering on the benchmark's trained regime: what each rule skips, and at what
gradient error, before a kernel is built for it.

    python benchmarks/filtering.py [--preset gemma2-2b llama3-8b] [--rows 1024] [--device cuda]
                                   [--log2-budgets -10 -8 -6]

For each preset it reports, on the trained regime (`logitless.bench.data`):

- the Triton backward's census at the bench's filtered methods' budget (tiles kept, chunks
  kept), on a CUDA device: the rule in use, which skips a tile only if every row's mass in it
  is under the tile's equal share `filter_eps * BLOCK_V / V` of the budget;
- on any device, that rule emulated from the exact masses at the H100's 128 x 256 tile, beside
  SPEC.md's (and cut-cross-entropy's) per-entry rule, which skips a tile whose softmax entries
  are all below a threshold: tiles skipped, the mass a token loses, the gradient errors;
- the share of (row block, vocabulary chunk) cells a budget decided from each chunk's exact
  softmax mass could skip (the mass a forward pass can record per vocabulary split): per row
  block, the chunks of least mass are skipped while the sum of their largest row masses stays
  within the budget, and a chunk holding a row's target is always kept. Chunks of the natural
  vocabulary order and of the order by average logit, at two chunk sizes, for each budget;
- on the first `--rows` rows, the relative errors of dE and dC that this skipping causes
  against float64, beside eager bfloat16's own errors there.

The trained regime's logits have the model's rank (its width plus one): the masses are computed
at that width, which gives the same logits as the preset's D at a fraction of the cost.
"""

from __future__ import annotations

import argparse
import math

import torch

from logitless.backends import triton_backend
from logitless.bench import data, lm
from logitless.bench.methods import FILTER_EPS
from logitless.bench.runner import PRESETS
from logitless.reference import reference_linear_cross_entropy, relative_error

ROW_BLOCK = 128
"""Rows per block of every decision: the rows of the Triton backward's tile on the H100."""
CHUNKS = (2048, 8192)
BLOCK_ROWS = 512
"""Rows per step when sweeping logits in float32, to bound memory."""


def chunk_masses(e: torch.Tensor, c: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, chunks) softmax mass of each row in each chunk of `chunk` vocabulary rows, and
    (N, chunks) the row's largest softmax entry in the chunk."""
    n, vocab = len(e), len(c)
    chunks = math.ceil(vocab / chunk)
    masses = torch.empty(n, chunks, dtype=torch.float64, device=e.device)
    peaks = torch.empty_like(masses)
    for begin in range(0, n, BLOCK_ROWS):
        z = (e[begin : begin + BLOCK_ROWS] @ c.T).double()
        p = torch.softmax(z, 1)
        p = torch.nn.functional.pad(p, (0, chunks * chunk - vocab)).view(len(z), chunks, chunk)
        masses[begin : begin + len(z)] = p.sum(2)
        peaks[begin : begin + len(z)] = p.amax(2)
    return masses, peaks


def block_max(values: torch.Tensor) -> torch.Tensor:
    """(row blocks, columns): the largest of `values` (N, columns) over each ROW_BLOCK rows."""
    blocks = math.ceil(len(values) / ROW_BLOCK)
    padded = torch.nn.functional.pad(values, (0, 0, 0, blocks * ROW_BLOCK - len(values)))
    return padded.view(blocks, ROW_BLOCK, -1).amax(1)


def holding_targets(target_columns: torch.Tensor, columns: int) -> torch.Tensor:
    """(row blocks, columns) bool: the cells that hold a target of one of the block's rows."""
    n = len(target_columns)
    held = torch.zeros(
        math.ceil(n / ROW_BLOCK), columns, dtype=torch.bool, device=target_columns.device
    )
    held[torch.arange(n, device=target_columns.device) // ROW_BLOCK, target_columns] = True
    return held


def per_row(cells: torch.Tensor, n: int) -> torch.Tensor:
    """(N, columns): each row's value of its row block's cells."""
    return cells.repeat_interleave(ROW_BLOCK, 0)[:n]


def skippable(masses: torch.Tensor, target_chunks: torch.Tensor, eps: float) -> torch.Tensor:
    """(row blocks, chunks) cells to skip: per row block, the chunks of least block mass (the
    largest mass of a row of the block) while their sum stays within `eps`; a chunk holding a
    target of the block is kept. No row then loses more than `eps` of its softmax mass."""
    holds_target = holding_targets(target_chunks, masses.shape[1])
    block_mass = block_max(masses).masked_fill(holds_target, math.inf)
    ascending, rank = block_mass.sort(1)
    skip = torch.zeros_like(holds_target)
    skip.scatter_(1, rank, ascending.cumsum(1) <= eps)
    return skip


def filtered_errors(
    e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, skip_rows: torch.Tensor, chunk: int
) -> tuple[float, float]:
    """Relative errors of dE and dC (summed loss) when the softmax entries of each row's skipped
    chunks (`skip_rows`, (rows, chunks) bool) are dropped, against float64."""
    c64 = c.double()
    exact = [torch.zeros(len(e), c.shape[1], dtype=torch.float64, device=e.device), 0.0]
    dropped = [torch.zeros_like(exact[0]), 0.0]
    for begin in range(0, len(e), BLOCK_ROWS // 4):
        rows = slice(begin, begin + BLOCK_ROWS // 4)
        e64 = e[rows].double()
        grad = torch.softmax(e64 @ c64.T, 1)
        lost = grad * skip_rows[rows].repeat_interleave(chunk, 1)[:, : len(c)]
        grad[torch.arange(len(e64), device=e.device), targets[rows]] -= 1
        exact[0][rows], dropped[0][rows] = grad @ c64, lost @ c64
        exact[1] = exact[1] + grad.T @ e64
        dropped[1] = dropped[1] + lost.T @ e64
    return tuple(relative_error(x - lost, x) for x, lost in zip(exact, dropped, strict=True))


def eager_errors(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Relative errors of eager PyTorch's bfloat16 dE and dC (mean loss) against float64.

    Off a GPU the bfloat16 matmuls run as `_Bfloat16Product`, the way cuBLAS computes them
    (a CPU without bfloat16 units would emulate them at a few GFLOP/s); the cross-entropy
    itself runs in bfloat16, as eager code runs it."""
    results = []
    for dtype in (torch.float64, torch.bfloat16):
        ee, cc = (x.detach().to(dtype).requires_grad_() for x in (e, c))
        if dtype == torch.bfloat16 and e.device.type != "cuda":
            logits = _Bfloat16Product.apply(ee, cc)
            loss = torch.nn.functional.cross_entropy(logits, targets)
        else:
            loss = reference_linear_cross_entropy(ee, cc, targets, dtype=dtype)
        results.append(torch.autograd.grad(loss, (ee, cc)))
    return tuple(
        relative_error(ours, exact) for ours, exact in zip(results[1], results[0], strict=True)
    )


class _Bfloat16Product(torch.autograd.Function):
    """e @ c.T of bfloat16 inputs and its gradients as a GPU's bfloat16 GEMM gives them: exact
    products summed in float32, the result rounded once to bfloat16."""

    @staticmethod
    def forward(ctx, e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(e, c)
        return (e.float() @ c.float().T).bfloat16()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, c = ctx.saved_tensors
        grad = grad.float()
        return (grad @ c.float()).bfloat16(), (grad.T @ e.float()).bfloat16()


def study(preset: str, rows: int, device: torch.device, budgets: list[int]) -> None:
    """The census and rules at filter_eps=FILTER_EPS, then the best chunk decisions
    under each per-token budget 2^b of `budgets`."""
    shape = PRESETS[preset]
    eps = FILTER_EPS
    width = lm.DEFAULT_CONFIG.width + 1
    low = data.make_inputs("trained", data.Shape(shape.n, width, shape.v), torch.float32, device)
    e, c, targets = low.e, low.c, low.targets
    print(f"== {preset} ({shape}), trained, filter_eps = 2^{int(math.log2(eps))}", flush=True)
    if device.type == "cuda":
        census(preset, shape, device, eps)
    by_average_logit = (c @ e.mean(0)).argsort(descending=True)
    tile_rules(e, c, targets, by_average_logit, eps, rows)
    for order_name, order in (("natural", None), ("by average logit", by_average_logit)):
        ordered = c if order is None else c[order]
        positions = targets if order is None else triton_backend._positions(order, targets)
        for chunk in CHUNKS:
            masses, _ = chunk_masses(e, ordered, chunk)
            for budget in budgets:
                skip = skippable(masses, positions // chunk, 2.0**budget)
                skip_rows = per_row(skip, len(e))
                de, dc = filtered_errors(
                    e[:rows], ordered, positions[:rows], skip_rows[:rows], chunk
                )
                cells, whole = skip.float().mean(), skip.all(0).float().mean()
                print(
                    f"  {order_name:16s} chunk {chunk:5d}, budget 2^{budget}: {cells:6.1%} of "
                    f"{skip.numel()} (row block, chunk) cells skippable, {whole:6.1%} of chunks "
                    f"for every row block; first {rows} rows: dE {de:.2e}, dC {dc:.2e} from "
                    "float64",
                    flush=True,
                )
    full = data.make_inputs("trained", shape, torch.float32, device)
    de, dc = eager_errors(full.e[:rows], full.c, full.targets[:rows])
    print(f"  eager bfloat16 on the first {rows} rows: dE {de:.2e}, dC {dc:.2e} from float64")


def tile_rules(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    eps: float,
    rows: int,
) -> None:
    """Two rules for the Triton backward's (128-row, 256-position) tiles over the vocabulary in
    `order` (by average logit, as the backend sorts it), a tile holding a target always kept:

    - the share rule in use: a tile is skipped when every row's mass in it is at most its share
      eps * 256 / V of the per-token budget, so no token loses more than eps in all;
    - SPEC.md's (and cut-cross-entropy's) entry rule: a tile is skipped when every softmax entry
      in it is below a threshold (eps, and 2^-12: cut-cross-entropy's "auto" for bfloat16), with
      no bound on what a token loses.

    For each: tiles skipped, chunks of the backward's bf16 buffer whose matmuls are skipped (all
    their tiles are), the softmax mass a token loses (mean, largest) and, on the first `rows`
    rows, the dE / dC errors of the skip against float64."""
    tile_positions = 256  # the tile's rows are ROW_BLOCK
    chunk_tiles = triton_backend._chunk_positions(len(e), len(c), 2) // tile_positions
    ordered = c[order]
    masses, peaks = chunk_masses(e, ordered, tile_positions)
    positions = triton_backend._positions(order, targets)
    block_mass, block_peak = block_max(masses), block_max(peaks)
    holds_target = holding_targets(positions // tile_positions, masses.shape[1])
    rules = {
        "share rule (in use)": block_mass > eps * tile_positions / len(c),
        f"entry rule 2^{int(math.log2(eps))}": block_peak >= eps,
        "entry rule 2^-12 (cce)": block_peak >= 2.0**-12,
    }
    for name, above in rules.items():
        kept = holds_target | above
        tiles = kept.shape[1]
        chunk_kept = torch.nn.functional.pad(kept, (0, -tiles % chunk_tiles))
        chunk_kept = chunk_kept.view(len(kept), -1, chunk_tiles).any(2).any(0)
        skip_rows = per_row(~kept, len(e))
        lost = (masses * skip_rows).sum(1)
        de, dc = filtered_errors(
            e[:rows], ordered, positions[:rows], skip_rows[:rows], tile_positions
        )
        print(
            f"  {name:22s} (emulated, 128 x 256 tiles): {1 - kept.float().mean():6.1%} of "
            f"{kept.numel()} tiles skipped; {int((~chunk_kept).sum())} of {chunk_kept.numel()} "
            f"chunks skip their matmuls; mass lost per token: mean {lost.mean():.1e}, largest "
            f"{lost.max():.1e}; first {rows} rows: dE {de:.2e}, dC {dc:.2e} from float64",
            flush=True,
        )


def census(preset: str, shape: data.Shape, device: torch.device, eps: float) -> None:
    """The Triton backward's filtering census at the preset's full shape in bfloat16."""
    from logitless import linear_cross_entropy

    inputs = data.make_inputs("trained", shape, torch.bfloat16, device)
    e, c, targets = inputs.e, inputs.c, inputs.targets
    _, lse = linear_cross_entropy(e, c, targets, reduction="none", return_lse=True, impl="triton")
    tiles, kept, chunks, chunks_kept = triton_backend.tile_census(
        e, c, None, targets, torch.stack([lse, torch.zeros_like(lse)]), softcap=None,
        filter_eps=eps,
    )  # fmt: skip
    print(
        f"  Triton backward, tile share rule: {kept / tiles:6.1%} of {tiles} tiles kept, "
        f"{chunks_kept} of {chunks} chunks"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["gemma2-2b", "llama3-8b"])
    parser.add_argument("--rows", type=int, default=1024, help="rows of the error measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--log2-budgets",
        nargs="+",
        type=int,
        default=[int(math.log2(FILTER_EPS))],
        help="per-token budgets 2^b of the chunk decisions (default: the filtered methods')",
    )
    args = parser.parse_args()
    for preset in args.preset:
        study(preset, args.rows, torch.device(args.device), args.log2_budgets)


if __name__ == "__main__":
    main()
