"""Launch each paged-attention backend once per ARPG decoding shape, for Nsight Compute to read.

scripts/gpu_session.sh runs this under `ncu --clock-control none --kernel-name regex:...`: one launch per
(backend, kv_len, q_len); the paged Triton kernel is not autotuned, and its JIT compile runs on the host
before the launch, so the one launch is the kernel ncu should see. B=128 sequences, 16 heads, head_dim 64,
page 16, bf16: early decoding (16 keys) to a 16x16 grid's end.

    python3 scripts/ncu_paged.py [--kv 16,64,256] [--q 4,16,64] [--backends cuda,triton] [--dry-run]

--dry-run prints the launches without a GPU (the CPU rehearsal of the script).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv", default="16,64,256", help="comma-separated keys per sequence")
    parser.add_argument("--q", default="4,16,64", help="comma-separated queries per sequence")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--backends", default="cuda,triton")
    parser.add_argument("--dry-run", action="store_true", help="list the launches; needs no GPU")
    args = parser.parse_args(argv)
    kvs = [int(v) for v in args.kv.split(",")]
    qs = [int(v) for v in args.q.split(",")]
    backends = args.backends.split(",")
    unknown = set(backends) - {"cuda", "triton"}
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}: choose from cuda, triton")
    launches = [(b, kv, q) for b in backends for kv in kvs for q in qs]
    if args.dry_run:
        for b, kv, q in launches:
            print(f"{b} batch={args.batch} kv={kv} q={q}")
        return 0

    import torch

    from arpg.bench.kernels import paged_inputs
    from arpg_kernels import cuda as cuda_backend
    from arpg_kernels import triton as triton_backend

    if not torch.cuda.is_available():
        print("ncu_paged: no CUDA device", file=sys.stderr)
        return 2
    modules = {"cuda": cuda_backend, "triton": triton_backend}
    for b, kv, q in launches:
        if b == "cuda" and not cuda_backend.is_available():
            print(f"skip {b}: arpg_kernels._C is not built")
            continue
        inputs = paged_inputs(args.batch, 16, 64, kv, q, 16, torch.bfloat16, "cuda")
        qt, kc, vc, table, lens, cu, max_q = inputs
        modules[b].paged_attention(qt, kc, vc, table, lens, cu, max_q, False, 64 ** -0.5, False)
        torch.cuda.synchronize()
        print(f"{b} batch={args.batch} kv={kv} q={q}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
