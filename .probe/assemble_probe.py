import time, statistics, numpy as np, torch
from bench.host_path import batch_rows, pageable_assemble
from fa3trt.buckets import assemble
dev = torch.device("cuda")
print("threads", torch.get_num_threads())
def t(fn, n=10):
    s=[]
    for _ in range(n+2):
        torch.cuda.synchronize(); t0=time.perf_counter(); fn(); torch.cuda.synchronize(); s.append((time.perf_counter()-t0)*1e3)
    return statistics.median(s[2:])
for b, L in ((8, 2048), (32, 512)):
    rows = batch_rows(b, L)
    lens = [r.shape[0] for r in rows]
    srcs = [torch.from_numpy(r) for r in rows]
    st = {}
    st["assemble"] = t(lambda: assemble(rows, torch.bfloat16, dev))
    st["pageable"] = t(lambda: pageable_assemble(rows, torch.bfloat16, dev))
    st["alloc pinned"] = t(lambda: torch.empty((b, L, 4096), dtype=torch.float16, pin_memory=True))
    stage = torch.empty((b, L, 4096), dtype=torch.float16, pin_memory=True)
    def copies():
        for i, r in enumerate(srcs): stage[i, :lens[i]].copy_(r)
    st["row copies into pinned"] = t(copies)
    plain = torch.empty((b, L, 4096), dtype=torch.float16)
    def copies2():
        for i, r in enumerate(srcs): plain[i, :lens[i]].copy_(r)
    st["row copies into pageable"] = t(copies2)
    def copies_np():
        a = stage.numpy()
        for i, r in enumerate(rows): a[i, :lens[i]] = r
    st["row copies numpy into pinned"] = t(copies_np)
    st["h2d nonblocking"] = t(lambda: stage.to(dev, non_blocking=True))
    g = stage.to(dev)
    st["convert"] = t(lambda: g.to(torch.bfloat16))
    o = g.to(torch.bfloat16)
    def zeros():
        for i, n in enumerate(lens):
            if n < L: o[i, n:].zero_()
    st["zero loop"] = t(zeros)
    lt = torch.tensor(lens, dtype=torch.int32).pin_memory()
    def mask():
        lg = lt.to(dev, non_blocking=True)
        o.masked_fill_((torch.arange(L, device=dev)[None, :] >= lg[:, None])[:, :, None], 0)
    st["masked fill"] = t(mask)
    print(b, L, {k: round(v, 2) for k, v in st.items()})
