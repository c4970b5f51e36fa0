"""One point of the CPU-expert microbenchmark, run by the server's interpreter.

Run as a file (``python worker.py MODE JSON``) by ``server.python``, where kt-kernel and torch
live on a serving machine, so it needs nothing but the standard library, numpy and kt-kernel;
kttune reads its tagged JSON lines (``TAG``). One process is one worker-pool shape, because
kt-kernel's ``CPUInfer`` fixes its pool at creation. Modes:

- ``probe``: kt-kernel's version, the CPU variant it loaded (``kt_kernel.__cpu_variant__``;
  ``KT_KERNEL_CPU_VARIANT`` forces one) and whether it has the kernel class of the method;
- ``point``: one MoE layer of the model's shape on ``threads`` workers in ``pools`` subpools,
  timed at each batch size. Quantized methods take kt-kernel's pre-quantized pointer path
  (``gate_projs``/``gate_scales`` per subpool and expert): a few distinct experts of random
  bytes, and every expert of the real count pointing at one of them, so memory stays a few
  experts while the kernel takes the per-token or batched path the real expert count gives
  (it switches near a batch of 4·E/top-k). Weight values do not change the kernels' speed.
- ``check``: a small layer quantized online from random BF16 weights, run through the kernel
  and compared with a float32 torch reference (cosine, relative error).

Two Python APIs are spoken: kt-kernel 0.7 (``MOEConfig.gpu_experts_mask``, pointers read with
``load = False``) and 0.5 (``num_gpu_experts``, pointers read with ``load = True``).
Known pitfalls handled here: AMX kernels need ``max_len`` a multiple of 32 and segfault on a
batch above it; every buffer handed to a task must outlive it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

TAG = "KTTUNE_CPUBENCH "
#: kt-method → (kernel class, bits of a quantized weight; 16 = BF16, converted online).
METHODS: dict[str, tuple[tuple[str, ...], int]] = {
    "AMXINT4": (("AMXInt4_MOE",), 4),
    "AMXINT8": (("AMXInt8_MOE",), 8),
    "BF16": (("AMXBF16_MOE", "AVX2BF16_MOE"), 16),
}
ROUTINGS = 8  # distinct random routings cycled through per batch size


def emit(data: dict[str, Any]) -> None:
    print(TAG + json.dumps(data), flush=True)


def kernel_class(moe: Any, method: str) -> str | None:
    names, _bits = METHODS.get(method.upper(), ((), 0))
    return next((n for n in names if hasattr(moe, n)), None)


def load_kt() -> tuple[Any, dict[str, Any]]:
    import kt_kernel

    info = {"kt_kernel": getattr(kt_kernel, "__version__", "?"), "variant": getattr(kt_kernel, "__cpu_variant__", "?"),
            "python": sys.version.split()[0], "cores": len(os.sched_getaffinity(0))}
    return kt_kernel.kt_kernel_ext, info


def bf16(a: Any) -> Any:
    """float32 → BF16 bits (round to nearest even) as uint16."""
    import numpy as np

    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: Any) -> Any:
    import numpy as np

    return (b.astype(np.uint32) << 16).view(np.float32)


class Layer:
    """One MoE layer in kt-kernel on its own worker pool; `keep` holds every buffer it points at."""

    def __init__(self, ext: Any, spec: dict[str, Any], *, online: bool) -> None:
        import numpy as np

        self.ext, self.spec = ext, spec
        self.rng = np.random.default_rng(int(spec.get("seed", 0)))
        e, k, h, i = (int(spec[n]) for n in ("experts", "top_k", "hidden", "inter"))
        threads, pools = int(spec["threads"]), int(spec["pools"])
        self.e, self.k, self.h = e, k, h
        wc = ext.WorkerPoolConfig()
        wc.subpool_count = pools
        wc.subpool_numa_map = [int(n) for n in spec.get("numa_map") or [0] * pools]
        wc.subpool_thread_count = [threads // pools + (1 if p < threads % pools else 0) for p in range(pools)]
        self.cpu = ext.CPUInfer(wc)
        self.keep: list[Any] = []
        method = str(spec["method"]).upper()
        cls = kernel_class(ext.moe, method)
        if cls is None:
            raise LookupError(f"no kernel class for {method} in this kt-kernel build")
        mask = np.zeros(e, dtype=np.bool_)
        # The fifth argument is a pointer to a mask of the experts on the GPU in kt-kernel 0.7,
        # their count in 0.5 (the four-argument form leaves it unset: experts go missing).
        new_api = hasattr(ext.moe.MOEConfig(e, k, h, i), "gpu_experts_mask")
        cfg = ext.moe.MOEConfig(e, k, h, i, mask.ctypes.data if new_api else 0)
        self.keep.append(mask)
        cfg.layer_idx = 0
        cfg.pool = self.cpu.backend_
        self.max_len = max(32, -(-int(spec["max_len"]) // 32) * 32)
        cfg.max_len = self.max_len
        bits = METHODS[method][1]
        self.bf16: tuple[Any, Any, Any] | None = None
        if online or bits == 16:
            self.bf16 = self._online(cfg, e, h, i)
        else:
            self._prequantized(cfg, e, h, i, pools, bits, new_api)
        self.moe = getattr(ext.moe, cls)(cfg)
        self.cls = cls
        p2l = np.arange(e, dtype=np.int64)
        self.cpu.submit(self.moe.load_weights_task(p2l.ctypes.data))
        self.cpu.sync()
        self.keep.append(p2l)

    def _online(self, cfg: Any, e: int, h: int, i: int) -> tuple[Any, Any, Any]:
        import numpy as np

        scale = float(self.spec.get("wscale", 0.02))
        gate, up, down = (bf16(self.rng.standard_normal(shape, dtype=np.float32) * scale)
                          for shape in ((e, i, h), (e, i, h), (e, h, i)))
        cfg.save = cfg.load = False
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.ctypes.data, up.ctypes.data, down.ctypes.data
        self.keep += [gate, up, down]
        return gate, up, down

    def _prequantized(self, cfg: Any, e: int, h: int, i: int, pools: int, bits: int, new_api: bool) -> None:
        """Random quantized bytes for `distinct` experts per subpool (the intermediate dim split
        across subpools, per-row float32 scales), every expert of the real count aliased to one."""
        import numpy as np

        distinct = max(1, min(e, int(self.spec.get("distinct", 4))))
        part = i // pools
        for mat, (rows, cols) in (("gate", (part, h)), ("up", (part, h)), ("down", (h, part))):
            ptrs, scales = [], []
            for _pool in range(pools):
                qs = [self.rng.integers(0, 256, rows * cols * bits // 8, dtype=np.uint8) for _ in range(distinct)]
                ss = [np.full(rows, 1e-3, dtype=np.float32) for _ in range(distinct)]
                self.keep += qs + ss
                ptrs.append([qs[x % distinct].ctypes.data for x in range(e)])
                scales.append([ss[x % distinct].ctypes.data for x in range(e)])
            setattr(cfg, mat + "_projs", ptrs)
            setattr(cfg, mat + "_scales", scales)
        cfg.save = False
        cfg.load = not new_api  # 0.5 reads the pointers on its load path, 0.7 when nothing is loaded

    def routing(self, q: int) -> Any:
        import numpy as np

        return np.ascontiguousarray(np.argsort(self.rng.random((q, self.e)), axis=1)[:, : self.k], dtype=np.int64)

    def forward(self, q: int, ids: Any, weights: Any, x: Any, out: Any, qlen: Any) -> None:
        if q > self.max_len:  # the kernel would overrun its buffers without a word
            raise ValueError(f"batch {q} exceeds max_len {self.max_len}")
        self.cpu.submit(self.moe.forward_task(qlen.ctypes.data, self.k, ids.ctypes.data, weights.ctypes.data,
                                              x.ctypes.data, out.ctypes.data, False))
        self.cpu.sync()


def _np() -> Any:
    import numpy

    return numpy


def time_batch(layer: Layer, q: int, repeats: int, min_time_s: float, warmup: int) -> list[float]:
    """Per-call seconds, one mean per repeat (each at least min_time_s / repeats of calls)."""
    np = _np()
    routes = [layer.routing(q) for _ in range(ROUTINGS)]
    weights = layer.rng.random((q, layer.k), dtype=np.float32)
    x = bf16(layer.rng.standard_normal((q, layer.h), dtype=np.float32))
    out = np.empty((q, layer.h), dtype=np.uint16)
    qlen = np.array([q], dtype=np.int32)
    for n in range(warmup):
        layer.forward(q, routes[n % ROUTINGS], weights, x, out, qlen)
    means, calls = [], 0
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            layer.forward(q, routes[calls % ROUTINGS], weights, x, out, qlen)
            n, calls = n + 1, calls + 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time_s / repeats:
                break
        means.append(elapsed / n)
    if not np.isfinite(from_bf16(out)).all():
        raise FloatingPointError(f"non-finite output at batch {q}")
    return means


def reference(layer: Layer, ids: Any, weights: Any, x: Any) -> Any:
    """y_t = Σ_j w_tj · down_e(silu(gate_e x_t) · up_e x_t) in float32 torch."""
    import torch

    assert layer.bf16 is not None, "the reference needs the BF16 weights of an online layer"
    gate, up, down = (torch.from_numpy(from_bf16(w).copy()) for w in layer.bf16)
    xf, ids_t, w_t = torch.from_numpy(from_bf16(x).copy()), torch.from_numpy(ids), torch.from_numpy(weights)
    y = torch.zeros_like(xf)
    for e in torch.unique(ids_t).tolist():
        tok, slot = (ids_t == e).nonzero(as_tuple=True)
        xe = xf[tok]
        h = torch.nn.functional.silu(xe @ gate[e].t()) * (xe @ up[e].t())
        y.index_add_(0, tok, (h @ down[e].t()) * w_t[tok, slot].unsqueeze(1))
    return y.numpy()


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else ""
    spec: dict[str, Any] = json.loads(argv[1]) if len(argv) > 1 else {}
    try:
        ext, info = load_kt()
    except Exception as exc:  # noqa: BLE001 - reported as one line by the caller
        emit({"error": f"{type(exc).__name__}: {exc}"[-400:], "kind": "no_kt_kernel"})
        return 3
    method = str(spec.get("method", "")).upper()
    if mode == "probe":
        emit({**info, "method": method, "class": kernel_class(ext.moe, method),
              "classes": sorted(n for n in dir(ext.moe) if n.endswith("_MOE"))})
        return 0
    if kernel_class(ext.moe, method) is None:
        emit({**info, "error": f"no kernel for {method}", "kind": "method"})
        return 3
    np = _np()
    try:
        started = time.perf_counter()
        layer = Layer(ext, spec, online=mode == "check")
        setup_s = time.perf_counter() - started
        emit({**info, "kind": "setup", "class": layer.cls, "setup_s": round(setup_s, 3), "max_len": layer.max_len})
        for q in spec["batches"]:
            if mode == "check":
                ids, w = layer.routing(q), layer.rng.random((q, layer.k), dtype=np.float32)
                x = bf16(layer.rng.standard_normal((q, layer.h), dtype=np.float32))
                out = np.full((q, layer.h), 0x7FC0, dtype=np.uint16)  # NaN until written
                layer.forward(q, ids, w, x, out, np.array([q], dtype=np.int32))
                got, ref = from_bf16(out).ravel().astype(np.float64), reference(layer, ids, w, x).ravel().astype(np.float64)
                cos = float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref)))
                rel = float(np.abs(got - ref).mean() / np.abs(ref).mean())
                emit({"kind": "check", "batch": q, "cosine": cos, "rel_err": rel, "finite": bool(np.isfinite(got).all())})
            else:
                means = time_batch(layer, q, int(spec.get("repeats", 3)), float(spec.get("min_time_s", 0.3)),
                                   int(spec.get("warmup", 2)))
                emit({"kind": "batch", "batch": q, "seconds": means})
    except Exception as exc:  # noqa: BLE001 - a kernel refusal ends this point, not the sweep
        emit({**info, "error": f"{type(exc).__name__}: {exc}"[-400:], "kind": "point"})
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
