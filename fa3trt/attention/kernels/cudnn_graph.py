"""Ragged-batch attention in one cuDNN SDPA launch, through NVIDIA's cuDNN frontend (``cudnn``).

Why: PyTorch's cuDNN SDPA takes no per-sequence lengths. A padded batch then runs either with
a dense boolean mask (every padded tile computed and masked) or one launch per sequence (a
launch and a cuDNN plan per distinct length); docs/benchmarks.md, section 1, has both rates.
The cuDNN graph API has a *padding mask* driven by two
device tensors, ``seq_len_q`` and ``seq_len_kv`` (int32, shape (B, 1, 1, 1)): the kernel stops
each sequence's query and key loops at its length, so padded tiles are skipped rather than
masked, in one launch, with the lengths never leaving the GPU (no host sync). The execution
plan depends on (B, S, H, D, dtype) only, not on the lengths, so one plan serves every length
mix of a padded shape.

Layout: q, k, v, o are (B, S, H, D) contiguous; cuDNN is told dims (B, H, S, D) with the
strides of that BSHD memory, (S*H*D, D, H*D, 1), so nothing is transposed or copied.

cuDNN leaves the output rows past ``seq_len_q`` undefined (its own tests zero them on both
sides before comparing: test/python/sdpa/fp16.py), so they are zeroed here
(``fa3trt.attention.kernels.tail``).

Threading: cuDNN handles must not be shared between threads, and a built graph holds mutable
execution state, so each thread keeps its own handle per device and its own bounded LRU of
built graphs (no locks on the hot path). A handle follows torch's current stream; the stream
is re-set on the handle only when it changes.

The ``cudnn`` package is imported lazily (``available()``, first ``ragged_attention``), never
when fa3trt is imported. It finds libcudnn itself: an ``LD_LIBRARY_PATH`` entry holding
libcudnn.so.9 first, then ``<purelib>/nvidia/cudnn/lib``, then ``dlopen("libcudnn.so.9")``,
which resolves to the copy torch's libtorch_cuda.so already loaded (torch is imported first).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fa3trt.attention.kernels.base import default_scale, key_lengths
from fa3trt.attention.kernels.tail import zero_tail_
from fa3trt.errors import CudnnGraphUnsupportedError, InvalidInputError, MissingDependencyError

__all__ = [
    "available",
    "ragged_attention",
    "prepare",
    "frontend_versions",
    "cached_plans",
    "cached_graph",
    "graph_key",
    "prepared",
    "INSTALL_HINT",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install nvidia-cudnn-frontend (the 'gpu' or 'tensorrt' extra)"

MAX_GRAPHS = 64  # built graphs kept per thread (LRU); each holds an execution plan

# Tensor uids of the graph's variant pack (ints work as keys on every frontend release).
_UID_Q, _UID_K, _UID_V, _UID_O, _UID_LEN_Q, _UID_LEN_KV = 1, 2, 3, 4, 5, 6

_DTYPES = (torch.bfloat16, torch.float16)

# (B, Sq, Sk, H, Hk, D, input dtype, device index, q strides, k/v strides in (B, S, H, D) order, scale,
#  output dtype)
GraphKey = tuple[int, int, int, int, int, int, torch.dtype, int, tuple[int, ...], tuple[int, ...], float, torch.dtype]


@functools.cache
def _module() -> Any | None:
    """The ``cudnn`` frontend module, or None. torch is imported first (module top), so the
    libcudnn.so.9 its CUDA library links is already in the process when cudnn looks for one."""
    try:
        import cudnn  # type: ignore[import-not-found]

        cudnn.backend_version()  # raises when no libcudnn could be loaded
    except Exception as e:  # ImportError, OSError from dlopen, RuntimeError from the binding
        log.debug("cuDNN frontend unavailable: %s", e)
        return None
    return cudnn


def available() -> bool:
    """True when the cuDNN frontend imports, finds libcudnn, and a CUDA device is visible."""
    try:
        return torch.cuda.is_available() and _module() is not None
    except Exception:  # never let a probe raise
        return False


def frontend_versions() -> dict[str, str]:
    """{'frontend': cudnn.__version__, 'backend': cuDNN library version} (empty if unavailable)."""
    m = _module()
    if m is None:
        return {}
    return {"frontend": str(getattr(m, "__version__", "?")), "backend": str(m.backend_version_string())}


def _require() -> Any:
    m = _module()
    if m is None:
        raise MissingDependencyError(f"the cuDNN frontend (module cudnn) is not available; {INSTALL_HINT}")
    return m


# --------------------------------------------------------------------------- per-thread state
@dataclass
class _Graph:
    graph: Any
    workspace: int  # bytes
    build_ms: float
    workspaces: dict[int, torch.Tensor] = field(default_factory=dict)  # stream handle -> buffer
    scratch_uids: tuple[int, ...] = ()  # outputs the plan writes and nobody reads (an FP8 graph's amax)
    scratch: dict[int, torch.Tensor] = field(default_factory=dict)


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.handles: dict[int, Any] = {}  # device index -> cuDNN handle
        self.streams: dict[int, int] = {}  # device index -> stream last set on that handle
        self.graphs: collections.OrderedDict[GraphKey, _Graph | CudnnGraphUnsupportedError] = collections.OrderedDict()


_state = _ThreadState()


def cached_plans() -> int:
    """Graphs (built or refused) cached for the calling thread."""
    return len(_state.graphs)


def graph_key(q: torch.Tensor, k: torch.Tensor, scale: float, out_dtype: torch.dtype | None = None) -> GraphKey:
    """The cache key of the graph for these tensors (``out_dtype`` None: q's dtype)."""
    b, sq, h, d = q.shape
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    out = q.dtype if out_dtype is None else out_dtype
    return (b, sq, k.shape[1], h, k.shape[2], d, q.dtype, dev, tuple(q.stride()), tuple(k.stride()), scale, out)


def cached_graph(q: torch.Tensor, k: torch.Tensor | None = None, scale: float | None = None) -> Any | None:
    """The calling thread's cached graph for these tensors (with its ``build_ms`` and
    ``workspace``), its refusal, or None; for probes and benchmarks."""
    k = q if k is None else k
    return _state.graphs.get(graph_key(q, k, default_scale(q.shape[3]) if scale is None else scale))


def _handle(cudnn: Any, device: int, stream: int) -> Any:
    """This thread's handle on ``device`` (the current CUDA device), set to ``stream``."""
    h = _state.handles.get(device)
    if h is None:
        h = _state.handles[device] = cudnn.create_handle()  # bound to the current device
    if _state.streams.get(device) != stream:
        cudnn.set_stream(handle=h, stream=stream)
        _state.streams[device] = stream
    return h


def _build(cudnn: Any, handle: Any, key: GraphKey) -> _Graph:
    b, sq, sk, h, hk, d, dtype, _, (qb, qs, qh, qd), (kb, ks, kh, kd), scale, _ = key
    io = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
    f32, i32 = cudnn.data_type.FLOAT, cudnn.data_type.INT32
    t0 = time.perf_counter()
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    # BHSD dims over BSHD memory. q, k, v keep their own strides (a fused QKV projection's
    # views have a token stride of 3*H*D), so they are never copied; the output is contiguous.
    # k and v may have fewer heads (grouped-query) and another length (cross-attention).
    dims, strides = [b, h, sq, d], [sq * h * d, d, h * d, 1]
    kv_dims, kv_strides = [b, hk, sk, d], [kb, kh, ks, kd]
    q = g.tensor(name="q", dim=dims, stride=[qb, qh, qs, qd], data_type=io, uid=_UID_Q)
    k = g.tensor(name="k", dim=kv_dims, stride=kv_strides, data_type=io, uid=_UID_K)
    v = g.tensor(name="v", dim=kv_dims, stride=kv_strides, data_type=io, uid=_UID_V)
    len_q = g.tensor(name="seq_len_q", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32, uid=_UID_LEN_Q)
    len_kv = g.tensor(name="seq_len_kv", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32, uid=_UID_LEN_KV)
    common = dict(
        name="ragged_sdpa",
        q=q,
        k=k,
        v=v,
        attn_scale=scale,
        use_padding_mask=True,
        seq_len_q=len_q,
        seq_len_kv=len_kv,
    )
    try:
        result = g.sdpa(generate_stats=False, **common)
    except TypeError:  # releases before generate_stats took is_inference
        result = g.sdpa(is_inference=True, **common)
    o = result[0]
    o.set_output(True).set_dim(dims).set_stride(strides).set_uid(_UID_O)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    workspace = int(g.get_workspace_size())
    return _Graph(g, workspace, (time.perf_counter() - t0) * 1e3)


Build = Callable[[Any, Any, GraphKey], _Graph]


def _graph(cudnn: Any, handle: Any, key: GraphKey, build: Build) -> _Graph:
    cache = _state.graphs
    hit = cache.get(key)
    if hit is None:
        try:
            hit = build(cudnn, handle, key)
            log.info("cuDNN ragged SDPA plan for B,Sq,Sk,H,Hk,D=%s %s built in %.0f ms", key[:6], key[6], hit.build_ms)
        except Exception as e:  # cudnnGraphNotSupportedError, RuntimeError from the binding, ...
            b, sq, sk, h, hk, d, dtype, dev = key[:8]
            hit = CudnnGraphUnsupportedError(
                f"cuDNN refused the ragged SDPA graph ({dtype} in, {key[11]} out) for q (B={b}, S={sq}, H={h}, "
                f"D={d}), k/v (S={sk}, H={hk}) on cuda:{dev}: {type(e).__name__}: {e}"
            )
        cache[key] = hit  # a refusal is cached too: a caller falling back must not pay a rebuild per call
        if len(cache) > MAX_GRAPHS:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    if isinstance(hit, CudnnGraphUnsupportedError):
        raise hit
    return hit


# --------------------------------------------------------------------------- the op
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise InvalidInputError(
            f"q must be (B, Sq, H, D) and k, v one (B, Sk, Hk, D) shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise InvalidInputError(f"q's {q.shape[2]} heads are not a multiple of k's {k.shape[2]}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvalidInputError(f"q, k, v must be one of bfloat16/float16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" or k.device != q.device or v.device != q.device:
        raise InvalidInputError(f"q, k, v must be on one CUDA device; got {q.device}, {k.device}, {v.device}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != q.shape[0]:
        raise InvalidInputError(f"seq_lens must have shape ({q.shape[0]},); got {tuple(seq_lens.shape)}")


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: torch.Tensor,
    out: torch.Tensor,
    lens_k: torch.Tensor | None = None,
    scale: float | None = None,
) -> Callable[[], None]:
    """A launch of the ragged graph on exactly these tensors, on the current stream, for the
    calling thread: handle, plan, workspace and variant pack are looked up once, so each call
    is one ``execute``. For a caller that runs the same buffers again and again (the TensorRT
    plugin). ``lens_k`` None: ``lens`` are the key lengths too; ``scale`` None: 1/sqrt(D). k and
    v share their strides. Padded rows are left as cuDNN leaves them. Raises
    CudnnGraphUnsupportedError.
    """
    key = graph_key(q, k, default_scale(q.shape[3]) if scale is None else scale)
    # Only the data pointers are read: the graph declared BHSD dims over this BSHD memory.
    pack = {
        _UID_Q: q,
        _UID_K: k,
        _UID_V: v,
        _UID_O: out,
        _UID_LEN_Q: lens,
        _UID_LEN_KV: lens if lens_k is None else lens_k,
    }
    return prepared(key, _build, pack, q.device)


def prepared(key: GraphKey, build: Build, pack: dict[int, torch.Tensor], device: torch.device) -> Callable[[], None]:
    """A launch of ``key``'s graph (built by ``build`` on first sight, cached per thread) on the
    variant ``pack``, on the current stream: handle, plan and workspace are looked up once, so
    each call is one ``execute``. Raises CudnnGraphUnsupportedError (cached too)."""
    cudnn = _require()
    dev = key[7]
    # Handle creation and plan build bind to the current device: switch only when it differs.
    ctx = torch.cuda.device(dev) if torch.cuda.current_device() != dev else contextlib.nullcontext()
    with ctx:
        stream = torch.cuda.current_stream(dev).cuda_stream
        handle = _handle(cudnn, dev, stream)
        entry = _graph(cudnn, handle, key, build)
    # One workspace per (graph, stream): calls on one stream run in order, so it is reused.
    workspace = entry.workspaces.get(stream)
    if workspace is None:
        workspace = entry.workspaces[stream] = torch.empty(max(entry.workspace, 1), dtype=torch.uint8, device=device)
    for uid in entry.scratch_uids:
        if uid not in entry.scratch:
            entry.scratch[uid] = torch.empty(1, dtype=torch.float32, device=device)
        pack[uid] = entry.scratch[uid]
    graph, streams = entry.graph, _state.streams

    def launch() -> None:
        if streams.get(dev) != stream:  # another launch on this thread moved the handle
            cudnn.set_stream(handle=handle, stream=stream)
            streams[dev] = stream
        graph.execute(pack, workspace, handle=handle)

    return launch


def clamped_lengths(
    q: torch.Tensor, k: torch.Tensor, seq_lens: torch.Tensor | None, seq_lens_k: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query lengths, key lengths) as int32 on q's device for a graph's variant pack, clamped on
    the device to [0, Sq] and [0, Sk] (a length past S would make cuDNN read past the tensors):
    every query where ``seq_lens`` is None, the key lengths the call means (``key_lengths``;
    every key where it means none), the query lengths' own tensor for padded self-attention."""
    b, sq, sk, dev = q.shape[0], q.shape[1], k.shape[1], q.device
    if seq_lens is None:
        lens = torch.full((b,), sq, dtype=torch.int32, device=dev)
    else:
        lens = seq_lens.to(device=dev, dtype=torch.int32).clamp(0, sq)
    keys = key_lengths(seq_lens, seq_lens_k, sq, sk)
    if sk == sq and keys is seq_lens:  # padded self-attention (or every key of every query)
        return lens, lens
    if keys is None:
        return lens, torch.full((b,), sk, dtype=torch.int32, device=dev)
    return lens, keys.to(device=dev, dtype=torch.int32).clamp(0, sk)


def ragged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_k: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    zero_tail: bool = True,
) -> torch.Tensor:
    """Non-causal softmax(q k^T * scale) v per sequence of a padded batch: q (B, Sq, H, D), k
    and v (B, Sk, Hk, D), H a multiple of Hk.

    ``seq_lens`` (int32, (B,), on q's device; others are converted, a host tensor at the cost
    of a copy) gives each sequence's query length, ``seq_lens_k`` its key length (None: the
    same lengths where Sq == Sk, else every key). Keys past a length are never read, rows past a query length are
    zero in the returned new tensor. One cuDNN launch plus one small zeroing kernel on torch's
    current stream; no host sync. The first call for a shape on a thread builds a cuDNN plan.

    Raises CudnnGraphUnsupportedError when cuDNN refuses the shape, and
    MissingDependencyError when the frontend is not installed. ``zero_tail=False`` leaves the
    padded rows as cuDNN leaves them (for a caller that masks them itself, like the plugin).
    """
    _check(q, k, v, seq_lens)
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride() != k.stride():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lens, lens_k = clamped_lengths(q, k, seq_lens, seq_lens_k)
    out = torch.empty_like(q)
    prepare(q, k, v, lens, out, lens_k, scale)()
    return zero_tail_(out, lens) if zero_tail else out
