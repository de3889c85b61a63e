"""Runners over the fused ONNX export (:func:`fewbits.export.onnx.to_onnx` with ``fuse=True``):
ONNX Runtime (the ``onnx`` extra) and OpenVINO (the ``bench`` extra, optional).

A runner is a callable ``images (N, C, H, W) float32 -> logits`` built from an
``onnx.ModelProto``; builders raise ``ImportError`` / ``RuntimeError`` with the reason when the
runtime is missing or rejects the graph, which the planner (:mod:`fewbits.runtime.planner`)
records before it tries the next candidate.

    >>> from fewbits.models import create_model
    >>> from fewbits.export.onnx import to_onnx
    >>> run = ort_runner(to_onnx(create_model("mnist_fp_net_mlp", width=32), fuse=True)[0])
    >>> run(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..export.onnx import onnx_feed, onnx_session

__all__ = ["CheckedRunner", "Runner", "openvino_runner", "optimized_operators", "ort_runner",
           "plain_runner"]

Runner = Callable[..., Any]


def _images(x: Tensor) -> np.ndarray:
    """``x`` as the float32 array the fused graphs take, refusing NaN / inf as the integer and
    binary engines do: the graphs' ``QuantizeLinear`` maps NaN to a code and inf to a clamp
    level, so a NaN image came back as finite, plausible logits (PyTorch's quantizers raise)."""
    a = x.detach().float().numpy()
    if not np.isfinite(a).all():
        raise ValueError("the images contain NaN or inf")
    return a


class CheckedRunner:
    """ONNX Runtime over a graph with checked uint8 residual sums
    (:func:`fewbits.export.onnx.to_onnx` ``checked_sums=True``) and its unchecked twin: a batch
    whose ``sum_peak`` reaches 255 (a sum may have saturated) is recomputed with the twin, so
    the result is always the unchecked graph's. ``fallbacks`` counts those batches."""

    def __init__(self, proto: Any, exact: Any, threads: int | None = None) -> None:
        self.sess = onnx_session(proto, threads=threads)
        self.checked = len(self.sess.get_outputs()) > 1
        self._exact, self._threads, self._exact_sess = exact, threads, None
        self.fallbacks = 0

    def __call__(self, x: Tensor) -> Tensor:
        feed = {"images": _images(x)}
        out = self.sess.run(None, feed)
        if self.checked and int(out[1]) >= 255:
            self.fallbacks += 1
            if self._exact_sess is None:
                self._exact_sess = onnx_session(self._exact, threads=self._threads)
            out = self._exact_sess.run(None, feed)
        return torch.from_numpy(out[0])


def ort_runner(proto: Any, threads: int | None = None) -> Runner:
    """ONNX Runtime CPU session over ``proto`` (all graph optimisations, QDQ fusion included)."""
    sess = onnx_session(proto, threads=threads)

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(sess.run(None, {"images": _images(x)})[0])

    return run


def plain_runner(proto: Any, model: torch.nn.Module, example: Any,
                 threads: int | None = None) -> Runner:
    """ONNX Runtime over the plain export of ``model`` (:func:`fewbits.export.onnx.to_onnx`
    with ``example``): called as the model is (``run(*args, **kwargs)``, tensors of any dtype),
    returning the model's output structure (tensor, tuple, dict, HF ``ModelOutput``), rebuilt
    from the graph's outputs in order."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    sess = onnx_session(proto, threads=threads)
    args = (example,) if isinstance(example, Tensor) else example
    with torch.inference_mode():
        ref = model(**args) if isinstance(args, dict) else model(*args)
    leaves, spec = tree_flatten(ref)
    tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, Tensor)]
    if len(tensor_at) != len(sess.get_outputs()):
        raise ValueError(f"the graph has {len(sess.get_outputs())} outputs, the model returns "
                         f"{len(tensor_at)} tensors")

    def run(*a: Any, **kw: Any) -> Any:
        outs = sess.run(None, onnx_feed(sess, a, kw))
        new = list(leaves)
        for i, o in zip(tensor_at, outs, strict=True):
            new[i] = torch.from_numpy(np.asarray(o))
        return tree_unflatten(new, spec)

    return run


def optimized_operators(proto: Any) -> Counter:
    """Operator counts of ONNX Runtime's optimised graph of ``proto``
    (``SessionOptions.optimized_model_filepath``): how many convolutions it fused to integer
    ``QLinearConv``, for instance."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def openvino_runner(proto: Any, threads: int | None = None) -> Runner:
    """OpenVINO CPU over ``proto`` (its low-precision transformations run the QDQ convolutions
    in int8). Raises ``ImportError`` without the ``openvino`` package."""
    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError("OpenVINO is not installed (pip install 'fewbits[bench]')") from e
    core = ov.Core()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        with open(path, "wb") as f:
            f.write(proto.SerializeToString())
        model = core.read_model(path)
    # f32: on CPUs with AMX / AVX-512 BF16 OpenVINO otherwise runs float layers in bfloat16
    # no pinning: on a shared machine a pinned worker waits for its one busy core (measured
    # 10x slower at batch 1 under load)
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                              "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled: dict[tuple[int, ...], Any] = {}

    def run(x: Tensor) -> Tensor:
        # one compiled model per input shape: static shapes let OpenVINO plan its layouts
        # (a dynamic batch costs several times the work at batch 1)
        shape = tuple(x.shape)
        req = compiled.get(shape)
        if req is None:
            if len(compiled) >= 4:
                compiled.clear()
            m = model.clone()
            m.reshape({m.inputs[0].get_any_name(): list(shape)})
            req = compiled[shape] = core.compile_model(m, "CPU", config).create_infer_request()
        out = req.infer({0: np.ascontiguousarray(_images(x))})
        return torch.from_numpy(np.array(next(iter(out.values()))))

    return run
