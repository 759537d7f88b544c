"""Probe: ragged attention in one cuDNN SDPA launch (cuDNN frontend padding mask) on this GPU.

Prints the frontend/backend versions and where libcudnn came from, then at 8x2048x32x128 bf16
with lengths 2048..300: correctness against the float64 reference, zeroed padded rows, what
cuDNN itself leaves in padded rows, the plan-build time, device times against dense cuDNN
SDPA on the full batch and the per-sequence cuDNN path, plan reuse across length mixes, and
1x15708 with full lengths against dense SDPA. Every section catches and prints its own
failure; the exit status is 0 whatever happens.

    python3 -m bench.cudnn_ragged_probe
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from fa3trt.attention.kernels import cudnn_graph as cf  # noqa: E402
from fa3trt.attention.kernels.tail import triton_kernel, zero_tail_  # noqa: E402
from fa3trt.testing import reference_attention, run_kernel  # noqa: E402
from fa3trt.timing import time_cuda_ms  # noqa: E402

H, D = 32, 128
LENS = [2048, 1900, 1700, 1500, 1200, 900, 600, 300]
LENS2 = [1024, 2000, 512, 1800, 100, 2048, 700, 1]


def say(*a: Any) -> None:
    print(*a, flush=True)


def section(name: str, fn: Callable[[], None]) -> None:
    say(f"\n=== {name}")
    try:
        fn()
    except Exception:
        say(f"!!! {name} failed:")
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()


def useful_flops(lens: list[int]) -> float:
    return sum(4.0 * n * n * H * D for n in lens)


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12


def dense_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def timed_first_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, (time.perf_counter() - t0) * 1e3


def environment() -> None:
    say("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
    say(
        "torch's cuDNN:",
        torch.backends.cudnn.version(),
        "| GPU:",
        torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    )
    say("LD_LIBRARY_PATH =", os.environ.get("LD_LIBRARY_PATH", "(unset)"))
    for mod in ("cuda.bindings", "triton"):
        try:
            m = __import__(mod, fromlist=["_"])
            say(f"{mod}: {getattr(m, '__version__', 'importable')}")
        except Exception as e:
            say(f"{mod}: not importable ({e})")
    try:
        import cudnn  # type: ignore[import-not-found]

        say("cudnn frontend", cudnn.__version__, "from", cudnn.__file__)
        say("cudnn backend", cudnn.backend_version_string(), f"({cudnn.backend_version()})")
    except Exception:
        say("importing cudnn failed:")
        traceback.print_exc(file=sys.stdout)
    say("fa3trt.attention.kernels.cudnn_graph.available() =", cf.available(), cf.frontend_versions())
    try:  # every libcudnn mapped into the process: one directory means one copy
        with open("/proc/self/maps") as maps:
            libs = sorted({line.split()[-1] for line in maps if "libcudnn" in line})
        say("libcudnn mapped:" + "".join(f"\n  {p}" for p in libs))
    except Exception as e:
        say("no /proc/self/maps:", e)


def main() -> int:
    section("environment", environment)
    if not torch.cuda.is_available():
        say("no CUDA device: nothing more to probe")
        return 0
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def qkv(b: int, s: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        return [torch.randn(b, s, H, D, device=dev, dtype=dtype, generator=g) for _ in range(3)]

    q, k, v = qkv(8, 2048)
    lens_host = torch.tensor(LENS, dtype=torch.int32)
    lens = lens_host.to(dev)
    st: dict[str, Any] = {}

    def first_calls() -> None:
        _, ms = timed_first_call(
            lambda: zero_tail_(torch.empty_like(q), lens)
        )  # same shape: same Triton specialization
        say(f"zeroing kernel first call (Triton compile if Triton): {ms:.1f} ms; triton={triton_kernel() is not None}")
        out, ms = timed_first_call(lambda: cf.ragged_attention(q, k, v, lens))
        st["out"] = out
        entry = cf.cached_graph(q)
        say(
            f"ragged_attention first call (plan build + run): {ms:.1f} ms; plan build alone: {getattr(entry, 'build_ms', float('nan')):.1f} ms"
        )
        if entry is not None and not isinstance(entry, Exception):
            say(f"workspace {entry.workspace} bytes; plans cached on this thread: {cf.cached_plans()}")
            for name in ("get_execution_plan_count",):
                try:
                    say(name, getattr(entry.graph, name)())
                except Exception as e:
                    say(name, "n/a:", e)
            try:
                say("plan[0] name:", entry.graph.get_plan_name_at_index(0))
            except Exception as e:
                say("plan name n/a:", e)
        _, ms = timed_first_call(lambda: cf.ragged_attention(q, k, v, lens))
        say(f"second call: {ms:.2f} ms wall")

    section("first calls (8x2048x32x128 bf16)", first_calls)

    def correctness() -> None:
        out = st.get("out")
        if out is None:
            out = cf.ragged_attention(q, k, v, lens)
        ref = reference_attention(q[6:8], k[6:8], v[6:8], lens[6:8])
        err = rel_err(out[6:8], ref)
        say(
            f"rel err vs float64 reference, sequences 6..7 (n={LENS[6]},{LENS[7]}): {err:.2e} -> {'OK' if err < 2e-2 else 'FAIL'} (< 2e-2)"
        )
        tails = [float(out[i, n:].abs().max()) if n < 2048 else 0.0 for i, n in enumerate(LENS)]
        say("max |out| past each length:", tails, "->", "OK zero" if max(tails) == 0 else "FAIL")
        say("NaN anywhere:", bool(torch.isnan(out).any()))
        # What cuDNN itself leaves in padded rows (decides whether the zeroing kernel is needed).
        raw = torch.full_like(q, float("nan"))
        cf.prepare(q, k, v, lens, raw)()
        torch.cuda.synchronize()
        kinds = []
        for i, n in enumerate(LENS):
            t = raw[i, n:]
            if t.numel() == 0:
                kinds.append("-")
            elif bool(torch.isnan(t).all()):
                kinds.append("untouched")
            elif bool((t == 0).all()):
                kinds.append("zero")
            else:
                kinds.append(
                    f"mixed(nan={float(torch.isnan(t).float().mean()):.2f},zero={float((t == 0).float().mean()):.2f})"
                )
        say("cuDNN's own padded rows (output prefilled with NaN):", kinds)
        say(
            "raw valid rows equal the zeroed output:",
            all(torch.equal(raw[i, :n], out[i, :n]) for i, n in enumerate(LENS)),
        )
        # fp16 once, smaller.
        q16, k16, v16 = qkv(2, 512, torch.float16)
        l16 = torch.tensor([512, 137], dtype=torch.int32, device=dev)
        o16 = cf.ragged_attention(q16, k16, v16, l16)
        say(f"fp16 2x512 lens [512,137]: rel err {rel_err(o16, reference_attention(q16, k16, v16, l16)):.2e}")

    section("correctness", correctness)

    def timing() -> None:
        flop = useful_flops(LENS)
        dense_flop = useful_flops([2048] * 8)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ms = time_cuda_ms(lambda: dense_cudnn(q, k, v))
        dense_t = tflops(dense_flop, dense_ms)
        rows = [("dense cuDNN SDPA, full 8x2048 (all FLOPs useful)", dense_ms, dense_t)]
        rag_ms = time_cuda_ms(lambda: cf.ragged_attention(q, k, v, lens))
        rows.append(("ragged_attention (cuDNN padding mask + zeroing)", rag_ms, tflops(flop, rag_ms)))
        raw = torch.empty_like(q)
        raw_ms = time_cuda_ms(lambda: cf.prepare(q, k, v, lens, raw)())
        rows.append(("  cuDNN launch alone (no zeroing)", raw_ms, tflops(flop, raw_ms)))
        for method in ("triton", "masked_fill"):
            try:
                zms = time_cuda_ms(lambda: zero_tail_(raw, lens, method))
                rows.append((f"  zeroing alone ({method})", zms, float("nan")))
            except Exception as e:
                say(f"zeroing {method}: {e}")
        for _ in range(2):  # warm-up calls
            run_kernel("cudnn", q, k, v, lens_host)
        per_ms = time_cuda_ms(lambda: run_kernel("cudnn", q, k, v, lens_host))
        rows.append(("per-sequence cuDNN (run_kernel cudnn, host lens)", per_ms, tflops(flop, per_ms)))
        try:
            fs_ms = time_cuda_ms(lambda: run_kernel("flash_seqused", q, k, v, lens))
            rows.append(("flash seqused_k (run_kernel flash_seqused)", fs_ms, tflops(flop, fs_ms)))
        except Exception as e:
            say("flash_seqused:", e)
        say(f"{'path':52s} {'ms':>8s} {'useful TFLOP/s':>15s}")
        for name, ms, t in rows:
            say(f"{name:52s} {ms:8.3f} {t:15.1f}")
        say(f"ragged / dense (useful TFLOP/s): {tflops(flop, rag_ms) / dense_t:.3f}  (goal >= 0.90)")
        say(f"cuDNN launch alone / dense:      {tflops(flop, raw_ms) / dense_t:.3f}")
        say(f"per-sequence / dense:            {tflops(flop, per_ms) / dense_t:.3f}")

    section("timing 8x2048 ragged", timing)

    def reuse() -> None:
        before = cf.cached_plans()
        l2 = torch.tensor(LENS2, dtype=torch.int32, device=dev)
        out2, ms = timed_first_call(lambda: cf.ragged_attention(q, k, v, l2))
        say(
            f"lengths {LENS2}: first call {ms:.2f} ms wall; plans cached before/after: {before}/{cf.cached_plans()} (same = plan reused)"
        )
        err = rel_err(out2[4:5], reference_attention(q[4:5], k[4:5], v[4:5], l2[4:5]))
        err7 = rel_err(out2[7:8, :1], reference_attention(q[7:8, :1], k[7:8, :1], v[7:8, :1]))
        say(
            f"rel err sequence 4 (n={LENS2[4]}): {err:.2e}; sequence 7 (n=1): {err7:.2e}; NaN: {bool(torch.isnan(out2).any())}"
        )
        ms2 = time_cuda_ms(lambda: cf.ragged_attention(q, k, v, l2))
        nz = LENS2
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ms = time_cuda_ms(lambda: dense_cudnn(q, k, v))
        say(
            f"ragged {ms2:.3f} ms = {tflops(useful_flops(nz), ms2):.1f} useful TFLOP/s; ratio to dense {tflops(useful_flops(nz), ms2) / tflops(useful_flops([2048] * 8), dense_ms):.3f}"
        )

    section("plan reuse: other lengths, same (B, S)", reuse)

    def seed_shape() -> None:
        s = 15708
        q1, k1, v1 = qkv(1, s)
        full = torch.tensor([s], dtype=torch.int32, device=dev)
        out, ms = timed_first_call(lambda: cf.ragged_attention(q1, k1, v1, full))
        say(f"1x{s}: first call (plan build) {ms:.1f} ms")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = dense_cudnn(q1, k1, v1).transpose(1, 2)
            dense_ms = time_cuda_ms(lambda: dense_cudnn(q1, k1, v1))
        say(f"rel err ragged(full lengths) vs dense cuDNN SDPA: {rel_err(out, dense):.2e}")
        rag_ms = time_cuda_ms(lambda: cf.ragged_attention(q1, k1, v1, full))
        flop = useful_flops([s])
        say(f"dense cuDNN SDPA {dense_ms:.3f} ms = {tflops(flop, dense_ms):.1f} TFLOP/s")
        say(f"ragged_attention {rag_ms:.3f} ms = {tflops(flop, rag_ms):.1f} TFLOP/s; ratio {dense_ms / rag_ms:.3f}")

    section("1x15708, lengths = S", seed_shape)

    def zero_length() -> None:  # last: should cuDNN fault on an empty sequence, nothing else is lost
        l0 = torch.tensor([300, 0, 2048, 0, 5, 17, 64, 1000], dtype=torch.int32, device=dev)
        out = cf.ragged_attention(q, k, v, l0)
        torch.cuda.synchronize()
        say(
            f"lengths {l0.tolist()}: empty sequences all zero: {bool((out[1] == 0).all() and (out[3] == 0).all())}; NaN: {bool(torch.isnan(out).any())}"
        )
        say(
            f"rel err sequence 4 (n=5): {rel_err(out[4:5, :5], reference_attention(q[4:5, :5], k[4:5, :5], v[4:5, :5])):.2e}"
        )
        big = torch.tensor([4096] * 8, dtype=torch.int32, device=dev)  # past S: clamped to S
        say(
            f"lengths past S (clamped) vs dense: rel err {rel_err(cf.ragged_attention(q, k, v, big), dense_cudnn(q, k, v).transpose(1, 2)):.2e}"
        )

    section("zero-length sequences, lengths past S", zero_length)
    return 0


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # the probe reports, it never fails the caller
        traceback.print_exc(file=sys.stdout)
    sys.exit(0)
