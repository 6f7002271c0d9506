"""ONNX export, artifacts written atomically, and file hashing.

Every artifact hwprune writes goes to a temporary name in the destination folder first and is then renamed over the
final name, so a crash or a parallel reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from hwprune.errors import ExportError

Exporter = Literal["torchscript", "dynamo"]

# The protobuf limit: bigger models cannot be serialized into one file and need external data.
_PROTO_LIMIT = 2**31 - 1
_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch.fx", "torch._dynamo", "onnxscript", "onnx_ir", "onnx")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---------------------------------------------------------------------------------------------------------------------
# files


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_path(path: Path) -> Path:
    # Same folder as the target so os.replace is a rename on one filesystem (atomic), never a copy.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); artifacts are meant to be read like any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on failure remove it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file in ``path``'s folder, flush it to disk, then rename it over ``path``."""
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` atomically (see :func:`atomic_write_bytes`): a reader, or the next run after a crash,
    never finds a half-written checkpoint."""
    import torch

    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_record(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` for a file, its path relative to ``root`` in POSIX form (run-folder style)."""
    p = Path(path)
    try:
        rel = p.resolve().relative_to(Path(root).resolve())
    except ValueError:
        raise ValueError(f"{p} is not inside {root}") from None
    return {"path": rel.as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}


# ---------------------------------------------------------------------------------------------------------------------
# quiet export


def _debug() -> bool:
    return bool(os.environ.get("HWPRUNE_DEBUG"))


@contextlib.contextmanager
def _silenced() -> Iterator[io.StringIO]:
    """Silence the exporters' chatter; yields a buffer that receives what was printed (to search error context).

    The TorchScript exporter logs from C++ straight to file descriptor 2 (its IR dump on failure), so Python-level
    redirection is not enough: the process's stdout/stderr descriptors are pointed at a temporary file meanwhile.
    That is process-wide, so output other threads print during an export (a fraction of a second) is dropped too;
    set ``HWPRUNE_DEBUG=1`` to see everything.
    """
    captured = io.StringIO()
    if _debug():
        yield captured
        return
    saved_levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR + 10)
    sink = tempfile.TemporaryFile(mode="w+b")
    saved_fds: list[tuple[int, int]] = []
    try:
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            with contextlib.suppress(Exception):
                stream.flush()
            try:
                saved_fds.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            except OSError:
                pass
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield captured
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in saved_fds:
            os.dup2(saved, fd)
            os.close(saved)
        with contextlib.suppress(Exception):
            sink.seek(0)
            captured.write(sink.read().decode("utf-8", "replace"))
        sink.close()
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Put every submodule in eval mode for the export and restore the caller's flags afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------------------------------------------------------------
# error messages


def _first_line(text: str) -> str:
    for line in _ANSI.sub("", text).splitlines():
        line = line.strip()
        if line:
            return line
    return ""


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _summary_line(text: str) -> str:
    """The innermost line of the dynamo exporter's "## Exception summary" block, if there is one."""
    text = _ANSI.sub("", text)
    if "## Exception summary" not in text:
        return ""
    block = text.split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("<class")]
    return lines[0] if lines else ""


def _find_op(text: str) -> str | None:
    for pattern in (r"op='([\w.:]+)'", r"operator '([\w.:]+)'", r"\b(aten::\w+)", r"\b(aten\.\w+)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def _find_module(op: str | None, log: str) -> str | None:
    """Module path of the failing op from the TorchScript exporter's IR dump (``scope: pkg.Model::/...::conv``)."""
    if not op or "::" not in op:
        return None
    for line in log.splitlines():
        if f"= {op}(" in line and "scope:" in line:
            scope = line.split("scope:", 1)[1].split("#", 1)[0].strip()
            parts = [p.split("::", 1)[1] for p in scope.split("/") if "::" in p and p.split("::", 1)[1]]
            top = scope.split("::", 1)[0].rsplit(".", 1)[-1]
            # Each scope level carries the module's qualified name (``body.1``), so the last one is the full path.
            return parts[-1] if parts else top
    return None


def _find_location(text: str) -> str | None:
    matches = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    user = [m for m in matches if "site-packages" not in m[0] and "/torch/" not in m[0]]
    if user:
        f, line, fn = user[-1]
        return f"{Path(f).name}:{line} in {fn}"
    return None


def _export_error(model: Any, exporter: str, exc: BaseException, log: str) -> ExportError:
    full = f"{exc}\n{log}"
    cause = _root_cause(exc)
    reason = _summary_line(str(exc))
    if not reason:
        src = cause if _first_line(str(cause)) else exc
        reason = f"{type(src).__name__}: {_first_line(str(src))}"
    reason = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", reason)
    if "data-dependent" in full or "GuardOnDataDependent" in full:
        reason = f"data-dependent Python control flow on tensor values ({reason})"
    op = _find_op(f"{reason}\n{exc}")
    where = []
    if op and op not in reason:
        where.append(f"op {op}")
    module = _find_module(op, log)
    if module:
        where.append(f"in module '{module}'")
    loc = _find_location(full)
    if loc:
        where.append(f"at {loc}")
    if len(reason) > 300:
        reason = reason[:297] + "..."
    suffix = f" [{', '.join(where)}]" if where else ""
    msg = f"cannot export {type(model).__name__} to ONNX with the {exporter} exporter: {reason}{suffix}"
    if exporter == "torchscript" and "data-dependent" not in reason:
        msg += "; try exporter='dynamo'"
    return ExportError(" ".join(msg.split()))


# ---------------------------------------------------------------------------------------------------------------------
# export


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _rename_outputs(model: Any) -> None:
    """Name graph outputs ``output`` (or ``output_0``, ``output_1``, ...) so they read the same for both exporters."""
    outputs = list(model.graph.output)
    names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    taken = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        taken.update(n.output)
    mapping: dict[str, str] = {}
    for out, new in zip(outputs, names):
        producers = [n for n in model.graph.node if out.name in n.output]
        # Leave odd graphs alone: an output that is a graph input/initializer, or a name clash.
        if out.name == new or len(producers) != 1 or new in taken or out.name in mapping:
            continue
        mapping[out.name] = new
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in mapping:
                n.input[i] = mapping[name]
        for i, name in enumerate(n.output):
            if name in mapping:
                n.output[i] = mapping[name]
    for out in model.graph.output:
        if out.name in mapping:
            out.name = mapping[out.name]
    for vi in model.graph.value_info:
        if vi.name in mapping:
            vi.name = mapping[vi.name]


def _torchscript_proto(model: Any, args: tuple[Any, ...], opset: int, input_names: list[str], strict: bool) -> Any:
    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=input_names,
                          do_constant_folding=True)
    if _debug():
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    _record_control_flow(model, caught)
    if strict:
        for w in caught:
            if w.category.__name__ == "TracerWarning" and "Converting a tensor to a Python" in str(w.message):
                first = _first_line(str(w.message)).split(". ", 1)[0].rstrip(".")
                raise _StrictTraceError(f"{first} (at {Path(w.filename).name}:{w.lineno})")
    return onnx.load_from_string(buf.getvalue())


class _StrictTraceError(RuntimeError):
    pass


# the tracer's warning for ``if <tensor>:``: the trace follows the branch the example took, and so does pruning
_BRANCH_WARNING = "Converting a tensor to a Python boolean"
# model -> (file, line) of its branches on tensor values, as the last TorchScript export of it saw them
_CONTROL_FLOW: weakref.WeakKeyDictionary[Any, tuple[tuple[str, int], ...]] = weakref.WeakKeyDictionary()


def _branch_sites(caught: Sequence[warnings.WarningMessage]) -> tuple[tuple[str, int], ...]:
    sites = [(w.filename, w.lineno) for w in caught
             if w.category.__name__ == "TracerWarning" and _BRANCH_WARNING in str(w.message)]
    return tuple(dict.fromkeys(sites))


def _record_control_flow(model: Any, caught: Sequence[warnings.WarningMessage]) -> None:
    with contextlib.suppress(TypeError):  # a model that cannot be weakly referenced is not recorded
        _CONTROL_FLOW[model] = _branch_sites(caught)


def control_flow_sites(model: Any, example_inputs: Any = None) -> tuple[tuple[str, int], ...]:
    """Where ``model``'s forward branches on a tensor value (``if x.mean() > 0:``), as ``(file, line)``: what its
    last TorchScript export saw (the tracer's warnings), or, never exported so, a trace on ``example_inputs``.

    Such a branch hides the code not taken for the example inputs from tracing, and so from pruning's dependency
    graph: a layer there keeps its width while the layer feeding it is pruned.

    Args:
        model: an ``nn.Module``.
        example_inputs: a batch for tracing (a tensor or a tuple); without it only a recorded export answers.

    Returns:
        Distinct sites in the order the trace met them (empty when there are none or nothing is known).
    """
    with contextlib.suppress(TypeError):
        if model in _CONTROL_FLOW:
            return _CONTROL_FLOW[model]
    if example_inputs is None:
        return ()
    import torch

    with _silenced(), warnings.catch_warnings(record=True) as caught, _eval_mode(model), torch.no_grad():
        warnings.simplefilter("always")
        try:
            torch.jit.trace(model, _as_args(example_inputs), check_trace=False, strict=False)
        except Exception:  # noqa: BLE001 - a model the tracer rejects still had its warnings until then
            pass
    _record_control_flow(model, caught)
    return _branch_sites(caught)


def _dynamo_proto(model: Any, args: tuple[Any, ...], opset: int, input_names: list[str]) -> Any:
    import torch

    with warnings.catch_warnings():
        if not _debug():
            warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, None, dynamo=True, opset_version=opset, input_names=input_names,
                                    external_data=False, verbose=_debug(), optimize=True)
    if program is None:  # pragma: no cover - only with f given
        raise RuntimeError("the dynamo exporter returned no program")
    return program.model_proto


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """Without nn.MultiheadAttention's eval-mode fast path: its fused ``_native_multi_head_attention`` op has no ONNX
    export (a ViT of nn.TransformerEncoderLayer failed to export), while the plain path computes the same."""
    import torch  # lazily, as everywhere in this module: the CLI's error paths import it without torch

    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def export_onnx(
    model: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    exporter: Exporter = "torchscript",
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    strict: bool = False,
) -> Path:
    """Export ``model`` (in eval mode, with the batch of ``example_inputs`` as given) to one ONNX file at ``path``.

    ``exporter="torchscript"`` is the legacy tracer (fast: ~0.1 s for a small CNN, what a search uses per trial);
    ``"dynamo"`` is ``torch.export`` based (~25x slower, but its graphs have static pads, which TVM needs). Inputs are
    named ``input`` (``input_0``, ``input_1``, ... for several) unless ``input_names`` is given; outputs ``output``.
    With ``strict=True`` a trace that turned a tensor into a Python value (data-dependent control flow, which the
    tracer freezes to the branch taken for the example) is an error rather than a warning. The file is written to a
    temporary name and renamed; models over 2 GB keep their weights in ``<name>.data`` next to it.

    Raises :class:`~hwprune.errors.ExportError` with one line naming the op/module when the model cannot be exported.
    """
    import onnx
    import torch

    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"unknown exporter {exporter!r}; choose 'torchscript' or 'dynamo'")
    path = Path(path)
    args = _as_args(example_inputs)
    n_tensors = sum(isinstance(a, torch.Tensor) for a in args)
    if input_names is None:
        input_names = ["input"] if n_tensors == 1 else [f"input_{i}" for i in range(n_tensors)]
    names = list(input_names)

    proto = None
    error: BaseException | None = None
    with _silenced() as log:
        try:
            with _eval_mode(model), torch.no_grad(), _no_mha_fastpath():
                if exporter == "torchscript":
                    proto = _torchscript_proto(model, args, opset, names, strict)
                else:
                    proto = _dynamo_proto(model, args, opset, names)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - any exporter failure becomes one clear line
            error = exc
    if error is not None:
        if isinstance(error, _StrictTraceError):
            raise ExportError(
                f"cannot export {type(model).__name__} to ONNX: data-dependent Python control flow on tensor values: "
                f"{error}; the traced graph would only follow the branch taken for the example input"
            ) from None
        raise _export_error(model, exporter, error, log.getvalue()) from error
    assert proto is not None
    _rename_outputs(proto)

    try:
        size = proto.ByteSize()
    except Exception:  # noqa: BLE001 - ByteSize itself can fail past the protobuf limit
        size = _PROTO_LIMIT + 1
    if size <= _PROTO_LIMIT:
        atomic_write_bytes(path, proto.SerializeToString())
    else:
        # Only the graph file is renamed atomically; the weights land next to it under their final name first.
        path.parent.mkdir(parents=True, exist_ok=True)
        location = f"{path.name}.data"
        with contextlib.suppress(FileNotFoundError):
            (path.parent / location).unlink()
        with _atomic_target(path) as tmp:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location, size_threshold=1024)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# inputs


def _load_onnx(onnx_path_or_model: Any, *, load_external_data: bool = False) -> Any:
    import onnx

    if isinstance(onnx_path_or_model, onnx.ModelProto):
        return onnx_path_or_model
    return onnx.load(str(onnx_path_or_model), load_external_data=load_external_data)


def graph_inputs(onnx_path_or_model: Any) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``(name, shape, dtype)`` of each real graph input (initializers listed as inputs excluded; dynamic dims -> 1)."""
    from onnx import helper

    model = _load_onnx(onnx_path_or_model)
    inits = {t.name for t in model.graph.initializer}
    result = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim)
        result.append((vi.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return result


def input_feed(onnx_path_or_model: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the graph's input names, shapes and dtypes (dynamic dims -> 1), reproducible by seed.

    Floats are standard normal; integers are drawn from [0, 10) so that index-like inputs stay in range; booleans
    are fair coin flips.
    """
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for name, shape, dtype in graph_inputs(onnx_path_or_model):
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            arr = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype == np.bool_:
            arr = rng.integers(0, 2, size=shape).astype(bool)
        else:
            arr = np.zeros(shape, dtype=dtype)
        feed[name] = np.ascontiguousarray(arr)
    return feed


__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "control_flow_sites",
    "export_onnx",
    "file_record",
    "graph_inputs",
    "input_feed",
    "sha256_file",
]
