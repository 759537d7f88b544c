"""GPU proof: each bucket's batches run on a CUDA stream of their own. Two buckets' batches
run at once from two threads, many times over, and every answer equals the model run on its
sequence alone; every batch ran on its bucket's stream, never the default one."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import fa3trt
from deploy.replica import ModelReplica
from tests.utils import as_requests, gpu, rel_err

pytestmark = gpu

EDGES = [128, 512]


def test_two_buckets_run_at_once_on_their_own_streams() -> None:
    server = ModelReplica(
        {"model": {"preset": "tiny", "dtype": "bfloat16"}, "backend": "torch", "buckets": EDGES},
        {"max_batch_tokens": 2048},
    )
    assert server.backend.device.type == "cuda"
    streams = [s for s in server._streams if s is not None]
    assert len(streams) == len(EDGES)
    default = torch.cuda.default_stream(server.backend.device)
    assert len({s.cuda_stream for s in streams} | {default.cuda_stream}) == 3
    seen: dict[int, set[int]] = {e: set() for e in EDGES}
    lock = threading.Lock()
    run = server.backend.run

    def recording_run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with lock:
            seen[EDGES[0] if batch["x"].shape[1] <= EDGES[0] else EDGES[1]].add(torch.cuda.current_stream().cuda_stream)
        return run(batch)

    server.backend.run = recording_run  # type: ignore[method-assign,assignment]
    rng = np.random.default_rng(0)
    batches = {
        e: [rng.standard_normal((int(n), 256)).astype(np.float16) for n in rng.integers(e // 4 + 1, e + 1, size=4)]
        for e in EDGES
    }
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny"))
    with torch.inference_mode():
        want = {e: [model(torch.from_numpy(x).float()[None])[0] for x in xs] for e, xs in batches.items()}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(20):
            futures = {e: pool.submit(server._run_split, as_requests(server, batches[e]), e) for e in EDGES}
            for e, f in futures.items():
                for y, w in zip(f.result(), want[e]):
                    assert isinstance(y, np.ndarray) and rel_err(torch.from_numpy(y).float(), w) < 3e-2
    assert seen == {e: {s.cuda_stream} for e, s in zip(EDGES, streams)}
