"""Allocates 256 MiB blocks until the framework raises its out-of-memory error."""
import sys

fw = sys.argv[1]
block = 256 << 20
held = []
if fw == "torch":
    import torch

    free, total = torch.cuda.mem_get_info()
    print(f"torch mem_get_info: free={free} total={total}")
    try:
        while True:
            held.append(torch.empty(block, dtype=torch.uint8, device="cuda"))
    except torch.cuda.OutOfMemoryError as e:
        print(f"torch: {type(e).__name__} after {len(held) * block >> 20} MiB: {str(e).splitlines()[0]}")
else:
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    print(f"cupy memGetInfo: free={free} total={total}")
    try:
        while True:
            held.append(cupy.empty(block, dtype=cupy.uint8))
    except cupy.cuda.memory.OutOfMemoryError as e:
        print(f"cupy: {type(e).__name__} after {len(held) * block >> 20} MiB: {e}")
