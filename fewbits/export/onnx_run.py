"""Running an exported ONNX graph in ONNX Runtime, and the check :func:`to_onnx` makes of every
graph it writes: the graph, run by ONNX Runtime at its default optimisations (what users run),
must give PyTorch's outputs on the example input within the stated tolerance
(:func:`fewbits.runtime.agreement.check_outputs`: logits within the tolerance the planner
gives ONNX Runtime, of their range, and top-1 agreement), else the export
raises. No graph pass (the fused form's, ONNX Runtime's own) can then be silently wrong on the
example input. Cost: one ONNX Runtime session and one run of the example input; skipped (and
noted) where ``onnxruntime`` is not installed, and switched off with ``check=False``.

    >>> import torch
    >>> from fewbits.export.onnx import to_onnx
    >>> from fewbits.models import create_model
    >>> m = create_model("mnist_fp_net_mlp", width=8).eval()
    >>> proto, report = to_onnx(m, torch.rand(2, 1, 28, 28))  # raises on a mismatch
    >>> [o.shape for o in run_onnx(onnx_session(proto), torch.rand(3, 1, 28, 28))]
    [torch.Size([3, 10])]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .onnx_qdq import SUM_PEAK

__all__ = ["check_graph", "onnx_feed", "onnx_session", "run_onnx"]


def onnx_session(model: Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for a path, bytes or ``ModelProto``, at ONNX Runtime's
    default graph optimisations."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    so = ort.SessionOptions()
    # Idle workers sleep instead of spinning: spinning threads steal the cores from whatever
    # runs next (PyTorch, in a benchmark that interleaves both).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def onnx_feed(sess: Any, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    """ONNX Runtime's feed for a call ``model(*args, **kwargs)`` of the graph :func:`to_onnx`
    wrote: keyword arguments by name, else the tensor leaves in order."""
    names = [i.name for i in sess.get_inputs()]
    if kwargs and not args and set(names) <= set(kwargs):
        return {n: kwargs[n].detach().cpu().numpy() for n in names}
    leaves = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, Tensor)]
    if len(names) != len(leaves):
        raise ValueError(f"the graph takes {len(names)} inputs ({', '.join(names)}), the call "
                         f"gives {len(leaves)} tensors")
    return {n: v.detach().cpu().numpy() for n, v in zip(names, leaves, strict=True)}


def run_onnx(sess: Any, inputs: Any) -> list[Tensor]:
    """Run an ONNX Runtime session on ``inputs`` (a tensor, a tuple of arguments or a dict of
    keyword arguments, as given to :func:`to_onnx`); the outputs as tensors, in order."""
    args, kwargs = ((inputs,), {}) if isinstance(inputs, Tensor) else \
        (((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs), {}))
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, onnx_feed(sess, args, kwargs))]


def check_graph(proto: Any, model: nn.Module, args: tuple, kwargs: dict, ref: Any,
                form: str) -> str | None:
    """Raise ``ValueError`` unless ONNX Runtime (default optimisations) runs ``proto`` on
    ``model(*args, **kwargs)``'s inputs to PyTorch's outputs ``ref`` within the tolerance
    (see the module doc); the first outputs of the graph are compared, leaf by leaf (a
    ``checked_sums`` graph has one more). ``form``: the graph's name in the message. Returns a
    note when it cannot check (``onnxruntime`` not installed; a ``checked_sums`` graph whose
    ``sum_peak`` is 255 on the example input, which its contract leaves to the caller), else
    None."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "not checked against PyTorch: onnxruntime is not installed"
    # imported here: the package fewbits.runtime imports the planner, which imports export
    from ..runtime.agreement import check_outputs, relative_tolerance

    want = [v.float() if v.is_floating_point() else v
            for v in torch.utils._pytree.tree_leaves(ref) if isinstance(v, Tensor)]
    try:
        sess = onnx_session(proto)
        outs = dict(zip([o.name for o in sess.get_outputs()],
                        sess.run(None, onnx_feed(sess, args, kwargs)), strict=True))
    except Exception as e:  # ONNX Runtime's reasons are many kinds; keep its message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"ONNX Runtime cannot run the {form} ONNX graph ({first[:300]}); "
                         "pass check=False (fewbits export --no-check) to write it unchecked") \
            from None
    if int(np.max(outs.get(SUM_PEAK, 0))) >= 255:  # a checked_sums graph's contract
        return (f"not checked against PyTorch: a residual sum saturated on the example input "
                f"({SUM_PEAK} 255), where the caller recomputes with the unchecked graph")
    got = [torch.from_numpy(np.asarray(o)) for o in outs.values()][: len(want)]
    got = [g.to(w.dtype) if g.is_floating_point() and w.is_floating_point() else g
           for g, w in zip(got, want, strict=False)]
    why = check_outputs(got, want, relative_tolerance(model), "example input")
    if why is not None:
        alt = "the plain form (fuse=False; fewbits export without --fuse) or " \
            if form != "plain" else ""
        raise ValueError(f"the {form} ONNX graph is wrong under ONNX Runtime's default "
                         f"optimisations: {why}; use {alt}fewbits.runtime.compile_for_cpu, "
                         "which runs a backend checked against PyTorch (check=False, or "
                         "fewbits export --no-check, writes the graph anyway)")
    return None
