"""Vocabulary-parallel cross-entropy on CPU ranks (gloo), and the bytes it communicates.

    PYTHONPATH=src python examples/vocab_parallel.py [--world 2] [--rows 4096] [--dim 512]
        [--vocab 65536]

Spawns `world` processes on this machine, each holding an even vocabulary shard of the
classifier, computes loss and gradients, and has rank 0 print the bytes each rank sent into
collectives in forward and backward against the size of the N x V logits, and the difference
from one process holding the whole classifier.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from unittest import mock

import torch
import torch.distributed as dist
from torch.multiprocessing import start_processes

from logitless import VocabParallel, linear_cross_entropy


def make_inputs(rows: int, dim: int, vocab: int):
    """The same random e, c and targets on every rank."""
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(rows, dim, generator=gen) / dim**0.25
    c = torch.randn(vocab, dim, generator=gen) / dim**0.25
    return e, c, torch.randint(0, vocab, (rows,), generator=gen)


def rank_main(rank: int, args: argparse.Namespace, rendezvous: str) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // args.world))
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=args.world)
    vp = VocabParallel.from_vocab(args.vocab)
    e, c, targets = make_inputs(args.rows, args.dim, args.vocab)
    e, shard = e.requires_grad_(), c[vp.start : vp.stop].clone().requires_grad_()

    sent: list[int] = []  # bytes of each collective this rank takes part in
    all_reduce = dist.all_reduce

    def counted_all_reduce(tensor, *rest, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *rest, **kwargs)

    start = time.perf_counter()
    with mock.patch.object(dist, "all_reduce", counted_all_reduce):
        loss = linear_cross_entropy(e, shard, targets, label_smoothing=0.1, vocab_parallel=vp)
        forward = sum(sent)
        loss.backward()
    seconds = time.perf_counter() - start
    dist.destroy_process_group()
    if rank != 0:
        return

    logits = args.rows * args.vocab * 4
    print(f"N={args.rows} D={args.dim} V={args.vocab} fp32, {args.world} gloo ranks, rank 0:")
    print(f"  all-reduces of {sent} bytes; the N x V fp32 logits are {logits:,} bytes")
    for step, size in (("forward", forward), ("backward", sum(sent) - forward)):
        print(f"  {step:<8} {size:>10,} bytes = {size / logits:.1e} x the logits")
    print(f"  loss + backward: {seconds:.2f} s over its {vp.stop - vp.start} vocabulary rows")

    full_e, full_c = e.detach().clone().requires_grad_(), c.requires_grad_()
    full_loss = linear_cross_entropy(full_e, full_c, targets, label_smoothing=0.1)
    full_loss.backward()
    differences = [
        (loss - full_loss).abs() / full_loss.abs(),
        (e.grad - full_e.grad).norm() / full_e.grad.norm(),
        (shard.grad - full_c.grad[vp.start : vp.stop]).norm() / shard.grad.norm(),
    ]
    print(f"  relative difference from one process (loss, grad_e, grad_c): {max(differences):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=65536)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start_processes(rank_main, args=(args, f"file://{tmp}/rendezvous"), nprocs=args.world)


if __name__ == "__main__":
    main()
