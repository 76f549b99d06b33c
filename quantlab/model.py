"""Getting a model ready to quantize: load and check it, export PyTorch, normalize, fix shapes, pre-process.

Preparation takes what exporters write (see :func:`normalize_model` and :mod:`quantlab.normalize`):
weights stored as external data, initializers listed as graph inputs (IR < 4), FP16 models
(quantized from their FP32 upcast), opsets from 7 up (upgraded to 13 where lower), weights computed
by constant subgraphs (folded into initializers), MatMul with the weight on the left, fixed batch
dimensions.  Dynamic dimensions other than the batch axis must be given in ``[model.input_shapes]``;
the error names them.  It then runs ONNX Runtime's ``quant_pre_process`` (shape inference,
constant folding, BatchNorm folding), checks that ONNX Runtime loads the result, and caches it by
content hash, so the graph that is calibrated, quantized and compared is the same every time.

It then chooses the activation tensors to calibrate: every float tensor that is a graph input or a
node output, except a tensor whose only consumer is a ``Relu`` or ``Clip``.  Such a tensor is
*folded*: it takes the range of the activation's output, which is what both TensorRT (Conv+ReLU
fusion) and ONNX Runtime (activation removal in Q/DQ graphs) quantize.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from quantlab.data import InputSpec
from quantlab.errors import QuantlabError, check, describe, stage
from quantlab import normalize

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FOLDED_ACTIVATIONS = ("Relu", "Clip")
LARGEST_MODEL = 2**31 - 1  # bytes: protobuf's limit for one serialized message


def cache_dir() -> Path:
    """Where exported and prepared models are kept: ``$QUANTLAB_CACHE`` or ``~/.cache/quantlab``."""
    root = os.environ.get("QUANTLAB_CACHE") or Path.home() / ".cache" / "quantlab"
    return Path(root)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_onnx(path: str | Path, *, checker: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX file, with one-line errors for anything that is not one.

    Weights saved as external data (files beside the model, as exporters write models over 2 GB)
    are loaded from the model's folder; a missing data file is named in the error.
    ``checker=False`` leaves out ``onnx.checker`` (then call :func:`check_onnx` when needed).
    """
    p = Path(path)
    check(p.exists(), f"model file '{p}' does not exist: pass the path of an .onnx file")
    check(p.is_file(), f"model path '{p}' is a folder: pass the path of an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-wrapped errors, ...
        raise QuantlabError(f"'{p}' is not an ONNX model ({type(exc).__name__}): pass an .onnx file") from None
    check(len(model.graph.node) > 0, f"'{p}' is not an ONNX model (it has no graph nodes): pass an .onnx file")
    external = sorted({
        entry.value for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)
        for entry in t.external_data if entry.key == "location"
    })
    missing = [loc for loc in external if not (p.parent / loc).is_file()]
    check(
        not missing,
        f"prepare: model '{p.name}' keeps its weights in external data file(s) {missing[:3]} that are not beside it "
        f"in '{p.parent}': copy them next to the model",
    )
    if checker:
        check_onnx(model, p)
    if external:
        with stage("prepare", f"loading the external data of '{p.name}'", "check the data files match the model"):
            external_data_helper.load_external_data_for_model(model, str(p.parent))
    return model


def check_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    """``onnx.checker`` on the model read from ``path``: a failure is one line naming the first problem.

    The checker runs on the file (it reads external data itself and accepts models over 2 GB).
    """
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise QuantlabError(f"'{path}' fails onnx.checker ({first}): fix or re-export the model") from None


def export_pytorch(
    factory: str,
    input_shapes: dict[str, tuple[int, ...]],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    opset: int,
) -> Path:
    """Export ``module:factory()`` to ONNX (TorchScript exporter, dynamic batch axis), cached.

    The cache key hashes the factory name, shapes, names, opset, torch version and the module's
    weights, so changed weights give a new export and an unchanged model is exported once.  The
    example inputs are float32 ``rand`` tensors, except those the module lists in an
    ``input_dtypes = {name: torch.dtype}`` attribute, which are ones of that dtype (token ids).
    """
    module_name, _, attr = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise QuantlabError(f"cannot load PyTorch factory '{factory}' ({exc}): set model.pytorch to 'module:function'") from None
    missing = [n for n in input_names if n not in input_shapes]
    check(not missing, f"model.input_shapes has no shape for input(s) {missing}: give the export shape, e.g. [1, 3, 224, 224]")
    import torch

    module = fn()
    check(isinstance(module, torch.nn.Module), f"'{factory}' returned {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    h = hashlib.sha256(repr((factory, sorted(input_shapes.items()), input_names, output_names, opset, torch.__version__)).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    out = cache_dir() / "exported" / f"{attr}-{h.hexdigest()[:16]}.onnx"
    if out.exists():
        return out
    gen = torch.Generator().manual_seed(0)
    dtypes = getattr(module, "input_dtypes", {})  # a module may declare integer inputs, e.g. token ids
    args = tuple(
        torch.ones(input_shapes[n], dtype=dtypes[n]) if n in dtypes else torch.rand(input_shapes[n], generator=gen)
        for n in input_names
    )
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, tmp, input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=axes, opset_version=opset, dynamo=False,
            )
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _toml_key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() and name.isascii() else f'"{name}"'


def _fix_input_dims(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """Set dims named in ``input_shapes``; refuse dynamic dims other than the batch axis.

    A dimension is dynamic when it has no value, a symbolic name, or a value of 0 or less (some
    exporters write -1).  A batch axis fixed by the model (e.g. ``[2, 3, 224, 224]``) stays fixed.
    """
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in graph_inputs]
    unknown = sorted(set(input_shapes) - set(names))
    check(not unknown, f"model.input_shapes names {unknown}, but the model's inputs are {names}: use those names")
    dynamic: list[tuple[onnx.ValueInfoProto, list[tuple[int, str]]]] = []
    for inp in graph_inputs:
        if not inp.type.HasField("tensor_type"):
            raise QuantlabError(
                f"prepare: model '{source.name}' input '{inp.name}' is not a tensor "
                f"({inp.type.WhichOneof('value')}): export the model with tensor inputs"
            )
        dims = inp.type.tensor_type.shape.dim
        for d in dims:
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()
                d.dim_param = "?"
        given = input_shapes.get(inp.name)
        if given is not None:
            check(
                len(given) == len(dims),
                f"model.input_shapes.{inp.name} has {len(given)} dims but the model input has {len(dims)}: give all of them",
            )
            for axis, (d, g) in enumerate(zip(dims, given)):
                if axis == 0 and not d.HasField("dim_value"):
                    continue  # keep the batch axis dynamic so data can be batched
                check(
                    not d.HasField("dim_value") or d.dim_value == g,
                    f"model.input_shapes.{inp.name} sets axis {axis} to {g} but the model fixes it at {d.dim_value}",
                )
                d.Clear()
                d.dim_value = g
        open_axes = [(axis, d.dim_param or "?") for axis, d in enumerate(dims) if axis > 0 and not d.HasField("dim_value")]
        if open_axes:
            dynamic.append((inp, open_axes))
    if dynamic:
        inp, open_axes = dynamic[0]
        dims = inp.type.tensor_type.shape.dim
        labels = {axis: label for axis, label in open_axes}
        example = [
            str(d.dim_value) if d.HasField("dim_value") else ("1" if axis == 0 else f"<{labels[axis]}>")
            for axis, d in enumerate(dims)
        ]
        which = ", ".join(f"'{label}' at axis {axis}" for axis, label in open_axes)
        others = [i.name for i, _ in dynamic[1:]]
        more = f" (inputs {others} too)" if others else ""
        raise QuantlabError(
            f"prepare: model '{source.name}' input '{inp.name}' has dynamic dimension {which}{more}: "
            f"set the size your data has with [model.input_shapes] {_toml_key(inp.name)} = [{', '.join(example)}] "
            f"in quantlab.toml, or --input-shape {inp.name}={','.join(example)}"
        )


def input_specs(model: onnx.ModelProto | str | Path) -> list[InputSpec]:
    """The graph inputs of a model (initializers excluded), batch axis ``None`` when dynamic."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(InputSpec(inp.name, dims, _np_dtype(tt.elem_type)))
    return specs


@dataclass
class PreparedModel:
    """A model ready to calibrate: the prepared FP32 graph and what to calibrate in it.

    Attributes:
        path: the prepared FP32 ONNX file (in the cache).
        source: the file the user gave (or quantlab exported).
        inputs: model inputs, batch axis ``None`` when dynamic.
        outputs: model output names.
        tensors: activation tensors whose statistics the one pass collects.
        folded: pre-activation tensor -> the activation output whose range it takes.
        notes: what preparation changed to make the model quantizable (opset upgrade, folding, ...).
    """

    path: Path
    source: Path
    inputs: list[InputSpec]
    outputs: list[str]
    tensors: list[str]
    folded: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    notes: list[str] = field(default_factory=list)


def _select_tensors(model: onnx.ModelProto) -> tuple[list[str], dict[str, str]]:
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*graph.value_info, *graph.input, *graph.output)
        if v.type.HasField("tensor_type")
    }
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    candidates = [i.name for i in graph.input if i.name not in inits]
    candidates += [o for node in graph.node if node.op_type != "Constant" for o in node.output if o]
    selected: list[str] = []
    folded: dict[str, str] = {}
    for name in dict.fromkeys(candidates):
        if name in inits or types.get(name, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            continue
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type in FOLDED_ACTIVATIONS and name not in graph_outputs:
            folded[name] = users[0].output[0]
        else:
            selected.append(name)
    for name in folded:  # chains such as Conv -> Relu -> Clip resolve to the last activation
        target = folded[name]
        while target in folded:
            target = folded[target]
        folded[name] = target
    return selected, folded


def _weighted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv, ConvTranspose, Gemm and MatMul nodes whose weight (input 1) is an initializer."""
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in inits]


def normalize_model(model: onnx.ModelProto, source: Path) -> list[str]:
    """Rewrite ``model`` in place into the form quantization expects; returns notes on what changed.

    The steps (see :mod:`quantlab.normalize`): refuse an already quantized model; drop initializers
    from the graph inputs (IR < 4); quantize an FP16 model from its FP32 upcast; upgrade opsets below
    13 (per-channel Q/DQ) with ONNX's version converter; fold constant subgraphs into initializers.
    """
    notes: list[str] = []
    quantized = normalize.quantized_nodes(model)
    if quantized:
        kinds = sorted({n.op_type for n in quantized})
        raise QuantlabError(
            f"prepare: model '{source.name}' is already quantized ({len(quantized)} {'/'.join(kinds)} node(s), "
            f"e.g. '{quantized[0].name or quantized[0].output[0]}'): pass the FP32 model it was made from"
        )
    dropped = normalize.drop_shadowed_initializers(model)
    if dropped:
        notes.append(f"{dropped} initializer(s) removed from the graph inputs")
    check(
        not normalize.uses_dtype(model, onnx.TensorProto.BFLOAT16),
        f"prepare: model '{source.name}' computes in bfloat16, which ONNX Runtime's quantizer and CPU kernels do not "
        "cover: export it in float32 (or float16) and quantize that",
    )
    if normalize.uses_dtype(model, onnx.TensorProto.FLOAT16):
        normalize.upcast_fp16(model)
        notes.append("FP16 model: quantized from its FP32 upcast (inputs and outputs become float32)")
    opset = normalize.default_opset(model)
    if opset < 13:
        from onnx import version_converter

        with stage(
            "prepare", f"converting '{source.name}' from opset {opset} to 13 (per-channel Q/DQ needs it)",
            "re-export the model with opset >= 13",
        ):
            model.CopyFrom(version_converter.convert_version(model, 13))
        notes.append(f"opset {opset} upgraded to 13")
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    folded = normalize.fold_constants(model)
    if folded:
        notes.append(f"{folded} constant node(s) folded into initializers")
    return notes


def prepare_model(source: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> PreparedModel:
    """Load, check, normalize, fix shapes and pre-process ``source``; see the module docstring."""
    source = Path(source)
    model = load_onnx(source)
    notes = normalize_model(model, source)
    _fix_input_dims(model, dict(input_shapes or {}), source)
    moved = normalize.weight_to_the_right(model)
    if moved:
        notes.append(f"{len(moved)} MatMul(s) with the weight on the left rewritten with it on the right")
    split = normalize.split_grouped_deconv_bias(model)
    if split:
        notes.append(f"{len(split)} grouped ConvTranspose bias(es) moved into an Add")
    check(
        bool(_weighted_nodes(model)),
        f"prepare: model '{source.name}' has nothing to quantize (no Conv, ConvTranspose, Gemm or MatMul with constant weights): "
        "pass a model with weighted layers",
    )
    digest = _digest(model)
    out = cache_dir() / "prepared" / f"{digest[:24]}.onnx"
    if not out.exists():
        _preprocess(model, out, source)
    prepared = onnx.load(str(out))
    inputs = input_specs(prepared)
    tensors, folded = _select_tensors(prepared)
    return PreparedModel(
        path=out, source=source, inputs=inputs, outputs=[o.name for o in prepared.graph.output],
        tensors=tensors, folded=folded, sha256=sha256_file(out), notes=notes,
    )


def prepared_from(model: onnx.ModelProto, source: Path, folder: str = "transformed") -> PreparedModel:
    """A :class:`PreparedModel` for a model derived from a prepared one (e.g. by a graph transform).

    The model is written into the cache under its content hash (atomically), so the same model is
    one file and its statistics can be matched to it.
    """
    data = model.SerializeToString(deterministic=True)
    digest = hashlib.sha256(data).hexdigest()
    out = cache_dir() / folder / f"{digest[:24]}.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".onnx")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    tensors, folded = _select_tensors(model)
    return PreparedModel(
        path=out, source=source, inputs=input_specs(model), outputs=[o.name for o in model.graph.output],
        tensors=tensors, folded=folded, sha256=sha256_file(out),
    )


def _digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the model's serialized content."""
    check(
        model.ByteSize() < LARGEST_MODEL,
        f"prepare: the model is {model.ByteSize() / 2**30:.1f} GB in memory, over the 2 GB a protobuf message can hold: "
        "quantlab prepares models up to 2 GB; quantize a smaller export (e.g. FP16 weights) or split the model",
    )
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _preprocess(model: onnx.ModelProto, out: Path, source: Path) -> None:
    """ONNX Runtime's ``quant_pre_process`` into ``out``, then a check that ONNX Runtime loads the result."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from quantlab.collect import ort_session

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        errors: list[BaseException] = []
        for skip_symbolic in (False, True):
            try:
                # ONNX Runtime's shape inference writes scratch files into the working directory
                with warnings.catch_warnings(), contextlib.chdir(tmp):
                    warnings.simplefilter("ignore")
                    quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
                break
            except Exception as exc:  # symbolic shape inference fails on some graphs; retry without it
                errors.append(exc)
        else:
            raise QuantlabError(
                f"prepare: ONNX Runtime cannot pre-process '{source.name}' ({describe(errors[-1])}): "
                "check that the model loads and runs in ONNX Runtime"
            )
        with stage("prepare", f"loading '{source.name}' in ONNX Runtime", "check that the model loads in ONNX Runtime"):
            ort_session(str(dst))
        os.replace(dst, out)
