"""Engines behind one small protocol: ONNX Runtime on the CPU, and TensorRT.

A :class:`Runner` takes a feed ``{input name: array}`` and returns the model's outputs in graph
order.  ``make_runner(backend, path, precision)`` builds one:

* ``onnxruntime`` (default, always available): an ``InferenceSession`` on the CPU execution
  provider with all graph optimisations, as a user deploying with ONNX Runtime would run it.
* ``tensorrt``: a strongly typed TensorRT engine built from the ONNX file (FP32 model, FP16 model
  or explicit Q/DQ INT8 model: with strong typing the precisions come from the graph itself, which
  is the only mode TensorRT 11 keeps), serialised to quantlab's cache keyed by the ONNX file's
  hash, the TensorRT version and the GPU, and run with device buffers from PyTorch's CUDA
  allocator.  ``tensorrt`` is imported only here and only when asked for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantlab.errors import QuantlabError, check

Feed = dict[str, np.ndarray]


class Runner(Protocol):
    """What the comparison needs of an engine."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feed: Feed) -> list[np.ndarray]: ...


class OrtRunner:
    """An ONNX Runtime CPU session."""

    def __init__(self, path: str | Path, name: str = "", threads: int = 0) -> None:
        from quantlab.collect import ort_session

        self.name = name or Path(path).stem
        self.path = Path(path)
        try:
            self.session = ort_session(str(path), level="all", threads=threads, spinning=True)
        except Exception as exc:  # ORT raises its own exception types for unloadable models
            raise QuantlabError(
                f"ONNX Runtime cannot load '{path}' ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                "re-create the run with quantlab ptq"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = [i.shape for i in self.session.get_inputs()]

    def run(self, feed: Feed) -> list[np.ndarray]:
        return self.session.run(None, feed)


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise QuantlabError(
            "the tensorrt backend needs the 'tensorrt' package (and a CUDA GPU): pip install tensorrt "
            "(NVIDIA's index), or use --backend onnxruntime"
        ) from None
    return trt


def _engine_cache_key(onnx_bytes: bytes, trt: Any, device: str, shapes: dict[str, tuple[int, ...]]) -> str:
    h = hashlib.sha256(onnx_bytes)
    h.update(f"|trt={trt.__version__}|gpu={device}|shapes={sorted(shapes.items())}".encode())
    return h.hexdigest()[:24]


class TensorRTRunner:
    """A strongly typed TensorRT engine built from an ONNX file and cached on disk.

    ``max_batch`` sets the optimisation profile of a dynamic batch axis (min 1, opt and max
    ``max_batch``); other dimensions must be static, as quantlab's prepared models are.
    """

    def __init__(self, path: str | Path, name: str = "", max_batch: int = 8, workspace_gb: float = 2.0) -> None:
        trt = _import_tensorrt()
        import torch

        from quantlab.model import cache_dir

        check(torch.cuda.is_available(), "the tensorrt backend needs a CUDA GPU, and torch sees none: use --backend onnxruntime")
        self.trt, self.torch = trt, torch
        self.name = name or Path(path).stem
        self.logger = trt.Logger(trt.Logger.WARNING)
        onnx_bytes = Path(path).read_bytes()
        self._inputs = self._input_shapes(onnx_bytes, max_batch)
        key = _engine_cache_key(onnx_bytes, trt, torch.cuda.get_device_name(), self._inputs)
        engine_path = cache_dir() / "tensorrt" / f"{key}.engine"
        if engine_path.is_file():
            plan = engine_path.read_bytes()
        else:
            plan = self._build(onnx_bytes, workspace_gb)
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = engine_path.with_suffix(".tmp")
            tmp.write_bytes(plan)
            tmp.replace(engine_path)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(plan)
        check(self.engine is not None, f"TensorRT could not deserialise the engine built from '{path}': delete {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    @staticmethod
    def _input_shapes(onnx_bytes: bytes, max_batch: int) -> dict[str, tuple[int, ...]]:
        import onnx

        model = onnx.load_model_from_string(onnx_bytes)
        init = {i.name for i in model.graph.initializer}
        shapes: dict[str, tuple[int, ...]] = {}
        for vi in model.graph.input:
            if vi.name in init:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
            check(
                all(d > 0 for d in dims[1:]),
                f"input '{vi.name}' has dynamic dimensions {dims} beyond the batch axis: fix them with "
                "[model] input_shapes",
            )
            shapes[vi.name] = (dims[0] if dims and dims[0] > 0 else -max_batch, *dims[1:])
        return shapes

    def _build(self, onnx_bytes: bytes, workspace_gb: float) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise QuantlabError(f"TensorRT's ONNX parser rejected the model ({errors}): run quantlab lint on it")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        dynamic = {n: s for n, s in self._inputs.items() if s[0] < 0}
        if dynamic:
            profile = builder.create_optimization_profile()
            for name, shape in dynamic.items():
                top = -shape[0]
                profile.set_shape(name, (1, *shape[1:]), (top, *shape[1:]), (top, *shape[1:]))
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        check(plan is not None, "TensorRT failed to build an engine from the model: see TensorRT's log above")
        return bytes(plan)

    def run(self, feed: Feed) -> list[np.ndarray]:
        torch, trt = self.torch, self.trt
        keep: list[Any] = []
        for name in self.input_names:
            check(name in feed, f"the feed has no input '{name}'")
            x = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
            keep.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            y = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device="cuda")
            outputs.append(y)
            self.context.set_tensor_address(name, y.data_ptr())
        stream = torch.cuda.current_stream()
        check(self.context.execute_async_v3(stream.cuda_stream), "TensorRT execution failed: see TensorRT's log")
        stream.synchronize()
        return [y.cpu().numpy() for y in outputs]


def make_runner(backend: str, path: str | Path, name: str = "", max_batch: int = 8) -> Runner:
    if backend == "tensorrt":
        return TensorRTRunner(path, name, max_batch=max_batch)
    check(backend == "onnxruntime", f"unknown backend '{backend}': choose one of onnxruntime, tensorrt")
    return OrtRunner(path, name)
