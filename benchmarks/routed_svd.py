"""What `method: routed` costs on a full fine-tune: the truncated SVD of one projection's delta, full against
randomized, and how much of the delta's energy each keeps.

    python -m benchmarks.routed_svd [--shape 4096 4096] [--ranks 64 256] [--threads N]

The delta is a random matrix with the slowly decaying spectrum of a fine-tune (singular values `k^-0.5`: no rank
holds it, as with real full fine-tunes). For each rank: the seconds of `torch.linalg.svd` (what a rank at or near full
takes) and of `conversion.low_rank.truncated_svd` (randomized below a quarter of the smaller side), their ratio, and
the energy each keeps; the randomized one must keep close to the optimum. Multiply by the routed projections of a
model (224 on a 7B Llama) and the full fine-tune sources to get a conversion's SVD time.
"""

import argparse
import time

import torch

from conversion.low_rank import truncated_svd


def fine_tune_like(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A random `shape` matrix with singular values `k^-0.5` (k = 1, 2, ...) and random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    rows, columns = shape
    size = min(shape)
    left, _ = torch.linalg.qr(torch.randn(rows, size, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(columns, size, generator=generator))
    values = torch.arange(1, size + 1, dtype=torch.float32).pow(-0.5)
    return (left * values) @ right.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], help="out_features in_features")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    delta = fine_tune_like(tuple(args.shape))
    start = time.perf_counter()
    _, values, _ = torch.linalg.svd(delta, full_matrices=False)
    full_seconds = time.perf_counter() - start
    total = float(values.square().sum())
    print(
        f"delta {args.shape[0]} x {args.shape[1]} fp32, {torch.get_num_threads()} threads; "
        f"full SVD (torch.linalg.svd): {full_seconds:.1f} s"
    )
    print(f"{'rank':>6}  {'truncated_svd s':>15}  {'x faster':>8}  {'energy kept':>11}  {'optimum':>8}")
    for rank in args.ranks:
        start = time.perf_counter()
        factors = truncated_svd(delta, rank)
        seconds = time.perf_counter() - start
        optimum = float(values[:rank].square().sum()) / total
        print(
            f"{rank:>6}  {seconds:>15.2f}  {full_seconds / seconds:>8.1f}  {factors.kept / factors.total:>11.4f}  "
            f"{optimum:>8.4f}"
        )


if __name__ == "__main__":
    main()
