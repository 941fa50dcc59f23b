"""Prints ms per 8192x8192 fp16 matmul (200 iterations after warm-up, CUDA events)."""
import torch

a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
for _ in range(20):
    torch.matmul(a, b)
torch.cuda.synchronize()
start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(200):
    torch.matmul(a, b)
stop.record()
torch.cuda.synchronize()
print(f"{start.elapsed_time(stop) / 200:.4f}")
