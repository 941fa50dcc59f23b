"""A saturating load for SECONDS: back-to-back matmuls, or the same replayed as a CUDA graph."""
import sys
import time

import torch

mode, seconds = sys.argv[1], float(sys.argv[2])
a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
b = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
c = torch.empty_like(a)
if mode == "graph":
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            torch.matmul(a, b, out=c)
    step = g.replay
else:
    def step():
        for _ in range(10):
            torch.matmul(a, b, out=c)
end = time.time() + seconds
n = 0
while time.time() < end:
    step()
    n += 1
    if n % 10 == 0:
        torch.cuda.synchronize()
torch.cuda.synchronize()
print(f"{mode}: {n} steps")
