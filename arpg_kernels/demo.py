"""A tour of the ops and the paged cache on this machine: `python -m arpg_kernels.demo`.

Builds an ARPG-shaped decoding step by hand (a shared class-token prefix forked into a batch,
several position queries per sequence), runs it through every backend available here and
prints what each did and how far it is from the float64 oracle.
"""

from __future__ import annotations

import argparse
import time

import torch

import arpg_kernels as ak
from arpg_kernels.ops import triton_interpreting


def _available_backends(device: torch.device) -> list[str]:
    names = ["reference"]
    if device.type == "cuda" or triton_interpreting():
        names.append("triton")
    if device.type == "cuda":
        from arpg_kernels import cuda

        if cuda.is_available():
            names.append("cuda")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=40, help="tokens already in the cache")
    parser.add_argument("--queries", type=int, default=8, help="position queries per sequence this step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)

    print(f"arpg_kernels {ak.__version__} on {device} ({dtype}); torch {torch.__version__}")
    cache = ak.PagedKVCache(2, 64, args.page_size, args.heads, args.head_dim, dtype, device)
    print(f"cache: 2 layers x 64 pages x {args.page_size} tokens x {args.heads} heads x {args.head_dim}, "
          f"{cache.nbytes / 2**20:.2f} MiB")

    # One sequence holds the shared prefix; the batch forks it, so those pages are shared.
    (root,) = cache.add_sequences(1)
    slots = cache.reserve([root], args.prefix)
    k = torch.randn(args.prefix, args.heads, args.head_dim, generator=g).to(device, dtype)
    for layer in range(2):
        ak.append_kv(k, -k, *cache.layer(layer), slots)
    seqs = [cache.fork(root) for _ in range(args.batch)]
    print(f"prefix: {args.prefix} tokens in pages {cache.pages(root)}, forked into sequences {seqs} "
          f"({cache.num_free_pages} pages still free)")

    # Each sequence appends its own new tokens: copy-on-write gives it a private last page.
    new = [1 + i % 3 for i in range(args.batch)]
    slots = cache.reserve(seqs, new)
    k_new = torch.randn(sum(new), args.heads, args.head_dim, generator=g).to(device, dtype)
    for layer in range(2):
        ak.append_kv(k_new, k_new, *cache.layer(layer), slots)
    for s in seqs:
        print(f"  sequence {s}: {cache.seq_len(s)} tokens, pages {cache.pages(s)}")

    q_lens = [args.queries - i % 2 for i in range(args.batch)]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), args.heads, args.head_dim, generator=g).to(device, dtype)
    call = (q, *cache.layer(1), cache.block_table(seqs), cache.kv_lens(seqs), cu, max(q_lens))

    with ak.use_backend("reference"):
        q64 = q.double().cpu()
        k64, v64 = (t.double().cpu() for t in cache.layer(1))
        oracle, _ = ak.reference.paged_attention(
            q64, k64, v64, *(t.cpu() for t in call[3:6]), call[6], False, args.head_dim**-0.5, False
        )
    print(f"paged_attention: {sum(q_lens)} position queries over {args.batch} sequences of "
          f"{cache.kv_lens(seqs).tolist()} keys")
    for name in _available_backends(device):
        with ak.use_backend(name):
            out, lse = ak.paged_attention(*call, return_lse=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, lse = ak.paged_attention(*call, return_lse=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
        err = (out.double().cpu() - oracle).abs().max().item()
        print(f"  backend {name:9s}: max |out - float64| = {err:.2e}, one call {ms:.2f} ms (not a benchmark)")

    cache.free(seqs + [root])
    print(f"freed every sequence: {cache.num_free_pages}/{cache.num_pages} pages free")


if __name__ == "__main__":
    main()
