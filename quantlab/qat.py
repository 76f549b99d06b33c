"""Quantization-aware training (QAT) through nvidia-modelopt: the last rung of the escalation ladder.

When no calibrator and no partial quantization keeps the INT8 model within its tolerance, Wu et al.
2020 (arXiv 2004.09602) fine-tune the network with fake quantizers in place, starting from the
best calibrated ranges, for a fraction of the original schedule at about 1% of the training
learning rate, with the ranges fixed.  :func:`run_qat` does that for the configured PyTorch model
(``[model] pytorch = "module:factory"``):

1. **Fake quantizers** (``modelopt.torch.quantization``, ``INT8_DEFAULT_CFG``): signed INT8,
   weights per channel on axis 0, activations per tensor, on the inputs of every Conv, Linear and
   pooling module.  Subclasses of Conv/Linear that override ``forward`` (such as EfficientNet's
   "same"-padding convolutions) get the quantized class of their parent, so they are quantized too.
2. **Ranges from quantlab**: ``amax`` maps tensors of quantlab's prepared FP32 ONNX (exported from
   the same factory, so its node names carry the PyTorch module scope, e.g.
   ``/_blocks.0/_depthwise_conv/Conv``) to calibrated thresholds.  A module's input quantizer takes
   the amax of the one tensor that *enters* the module's scope: the input of the module's first
   node, produced outside it.  Quantizers no tensor maps to keep modelopt's max calibration over
   ``calib_batches`` training batches; weight quantizers always take the per-channel max of the
   weights.  :attr:`QatResult.mapped` and :attr:`QatResult.fallback` report both.
3. **Fine-tuning**: SGD with momentum, cosine-annealed from ``lr``.  With labels, cross-entropy on
   the first output; without, distillation: mean squared error between the FP32 model's outputs and
   the fake-quantized model's.  The model stays in eval mode: BatchNorm statistics and dropout are
   frozen (small QAT batches would corrupt the running statistics), BatchNorm's affine parameters
   and every weight still train.  The ranges stay fixed: modelopt 0.47 learns no INT8 amax
   (``learn_amax`` is deprecated; its learned scales are NVFP4 only); the fake quantizers pass
   gradients straight through inside the range and zero them outside.  Runs are seeded and
   deterministic on the CPU.
4. **Export**: ``torch.onnx.export`` (TorchScript exporter) turns each quantizer into
   QuantizeLinear/DequantizeLinear with INT8 zero-points 0 and scale ``amax / 127``.  BatchNorm is
   exported after its Conv; folding it later scales each output channel, which leaves per-channel
   weight quantization unchanged.  The model is checked (``onnx.checker``, an ONNX Runtime session
   run and compared with FP32 on the first training batch, :func:`quantlab.qdq.lint.lint_tensorrt`)
   and written atomically.

Training batches are quantlab feeds, ``dict[input name -> np.ndarray]`` (what
:func:`quantlab.data.make_reader` yields), or ``(feed, labels)`` pairs with integer class labels
``labels[N]``.  The iterable is read once per epoch, so it must be re-iterable (a list or a reader).
"""

from __future__ import annotations

import copy
import importlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quantlab.config import Config
from quantlab.errors import QuantlabError, check

ProgressFactory = Callable[[int], Any]
Feed = dict[str, np.ndarray]
Batch = Feed | tuple[Feed, np.ndarray]

#: The newest ONNX IR version ONNX Runtime 1.31 loads.
MAX_IR_VERSION = 10


@dataclass
class QatResult:
    """What :func:`run_qat` did; ``to_dict()`` is JSON-ready, truthy when every check passed.

    Attributes:
        path: the exported Q/DQ ONNX model.
        device: ``cpu`` or ``cuda``.
        loss: ``labels`` or ``distill``.
        epochs: epochs run (fewer than configured after an early stop or ``max_steps``).
        steps: optimizer steps run.
        losses: mean training loss of each epoch.
        metrics: ``evaluate(model)`` after each epoch (empty without ``evaluate``).
        stopped_early: ``good_enough`` held after the last epoch run.
        quantizers: enabled activation (input) quantizers.
        mapped: of those, how many took quantlab's calibrated amax.
        fallback: module names whose input quantizer kept modelopt's max calibration.
        tensorrt_rules: ``"pass"`` or ``"fail: <rule ids>"`` from :func:`lint_tensorrt`.
        lint: the lint report as a dict (``passed``, ``qdq_nodes``, ``issues``).
        cosine, sqnr_db: the exported model in ONNX Runtime against the FP32 PyTorch model on the
            first training batch.
        ir_version: IR version of the written model.
        seconds: wall time per phase; ``train_step`` is the mean per optimizer step.
    """

    path: Path
    device: str
    loss: str
    epochs: int
    steps: int
    losses: list[float]
    metrics: list[float]
    stopped_early: bool
    quantizers: int
    mapped: int
    fallback: list[str]
    tensorrt_rules: str
    lint: dict[str, Any]
    cosine: float
    sqnr_db: float
    ir_version: int
    seconds: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return not self.tensorrt_rules.startswith("fail")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        return d

    def __str__(self) -> str:
        lines = [
            f"QAT on {self.device}: {self.epochs} epoch(s), {self.steps} steps, loss {self.loss}"
            + (" (stopped early: good enough)" if self.stopped_early else ""),
            "  losses:  " + ", ".join(f"{v:.5g}" for v in self.losses),
        ]
        if self.metrics:
            lines.append("  metrics: " + ", ".join(f"{v:.5g}" for v in self.metrics))
        lines += [
            f"  activation quantizers: {self.quantizers}, {self.mapped} from quantlab's ranges, "
            f"{len(self.fallback)} calibrated by modelopt",
            f"  vs FP32: cosine {self.cosine:.5f}, SQNR {self.sqnr_db:.1f} dB; TensorRT rules: {self.tensorrt_rules}",
            f"  model: {self.path}",
        ]
        return "\n".join(lines)


def activation_amax(stats: Any, calibrator: Any) -> dict[str, float]:
    """The ``amax`` argument of :func:`run_qat` from a statistics pass and a calibrator.

    ``stats`` is a :class:`quantlab.stats.StatsSet` of the prepared FP32 model; ranges are the
    ``tensorrt`` target's (symmetric signed INT8, as modelopt's quantizers are).
    """
    from quantlab.qdq.targets import TARGETS, compute_ranges

    return {name: r.amax for name, r in compute_ranges(stats, calibrator, TARGETS["tensorrt"]).items()}


# ---------------------------------------------------------------------------------------------
# the model and its quantizers


def _load_factory(factory: str) -> Any:
    import torch

    module_name, _, attr = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise QuantlabError(f"cannot load PyTorch factory '{factory}' ({exc}): set model.pytorch to 'module:function'") from None
    module = fn()
    check(isinstance(module, torch.nn.Module), f"'{factory}' returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def _import_mtq() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # version notes about optional integrations
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise QuantlabError(f"QAT needs nvidia-modelopt ({exc}): pip install 'quantlab[qat]'") from None
    return mtq


def _register_subclasses(model: Any) -> None:
    """Give Conv/Linear subclasses that override ``forward`` their parent's quantized class.

    modelopt quantizes a subclass only when it inherits ``forward``; a subclass that pads first
    and then calls ``F.conv2d(x, self.weight, ...)`` still reads ``self.weight``, which the
    quantized class replaces by its fake-quantized value, and its input passes the input quantizer.
    """
    import torch.nn as nn
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules import quant_conv, quant_linear

    bases = [
        (nn.Conv1d, quant_conv._QuantConv1d), (nn.Conv2d, quant_conv._QuantConv2d),
        (nn.Conv3d, quant_conv._QuantConv3d), (nn.ConvTranspose1d, quant_conv._QuantConvTranspose1d),
        (nn.ConvTranspose2d, quant_conv._QuantConvTranspose2d),
        (nn.ConvTranspose3d, quant_conv._QuantConvTranspose3d), (nn.Linear, quant_linear._QuantLinear),
    ]
    for cls in {type(m) for m in model.modules()}:
        if cls in QuantModuleRegistry:
            continue
        for base, quantized in bases:
            if issubclass(cls, base):
                QuantModuleRegistry.register({cls: f"{cls.__module__}.{cls.__qualname__}"})(quantized)
                break


def _input_quantizers(model: Any) -> dict[str, Any]:
    """Module name -> its enabled input quantizer."""
    out = {}
    for name, module in model.named_modules():
        q = getattr(module, "input_quantizer", None)
        if q is not None and q.is_enabled:
            out[name] = q
    return out


def scope_inputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """PyTorch module name -> the tensors entering its scope in an ONNX graph exported from it.

    The TorchScript exporter names nodes ``/<scope>/<Op>``, the scope being the module path with
    ``/`` between levels (``/_blocks.0/_depthwise_conv/Conv``: module ``_blocks.0._depthwise_conv``).
    A tensor enters a scope when a node inside it reads a non-constant tensor produced outside it.
    """
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    scope_of: dict[str, str] = {}
    for node in graph.node:
        scope = node.name.rsplit("/", 1)[0].strip("/").replace("/", ".") if "/" in node.name else ""
        for o in node.output:
            scope_of[o] = scope
        if node.op_type == "Constant":
            constants.update(node.output)
    entering: dict[str, list[str]] = {}
    for node in graph.node:
        if "/" not in node.name:
            continue
        parts = node.name.rsplit("/", 1)[0].strip("/").replace("/", ".").split(".")
        for name in node.input:
            if not name or name in constants:
                continue
            source = scope_of.get(name, "")
            # every enclosing module this tensor enters from outside
            for k in range(1, len(parts) + 1):
                module = ".".join(parts[:k])
                if source == module or source.startswith(module + "."):
                    continue
                lst = entering.setdefault(module, [])
                if name not in lst:
                    lst.append(name)
    return entering


def _map_amax(quantizers: Mapping[str, Any], prepared: onnx.ModelProto, amax: Mapping[str, float]) -> dict[str, float]:
    """Module name -> quantlab amax for every input quantizer with exactly one entering tensor."""
    entering = scope_inputs(prepared)
    mapped = {}
    for name in quantizers:
        tensors = entering.get(name, [])
        if len(tensors) == 1 and tensors[0] in amax and amax[tensors[0]] > 0:
            mapped[name] = float(amax[tensors[0]])
    return mapped


# ---------------------------------------------------------------------------------------------
# data


def _split(batch: Batch) -> tuple[Feed, np.ndarray | None]:
    if isinstance(batch, tuple):
        check(len(batch) == 2 and isinstance(batch[0], dict), "a QAT batch is a feed dict or a (feed, labels) pair")
        return batch[0], np.asarray(batch[1])
    check(isinstance(batch, dict), f"a QAT batch is a feed dict or a (feed, labels) pair, not {type(batch).__name__}")
    return batch, None


def _tensors(feed: Feed, names: tuple[str, ...], device: Any) -> list[Any]:
    import torch

    missing = [n for n in names if n not in feed]
    check(not missing, f"training batch lacks input(s) {missing}: it holds {sorted(feed)}")
    return [torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in names]


def _first_output(out: Any) -> Any:
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    return getattr(out, "last_hidden_state", out)


def _outputs(out: Any) -> list[Any]:
    if isinstance(out, (tuple, list)):
        return [o for o in out if hasattr(o, "shape")]
    if isinstance(out, dict):
        return [o for o in out.values() if hasattr(o, "shape")]
    return [_first_output(out)]


def _resolve_device(wanted: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    if wanted == "cuda":
        check(cuda, "qat.device = 'cuda' but PyTorch sees no CUDA GPU: use 'auto' or 'cpu'")
    return "cuda" if (wanted == "cuda" or (wanted == "auto" and cuda)) else "cpu"


def training_data(config: Config, prepared_inputs: Any) -> Iterable[Feed]:
    """The configured training folder (``[qat] data``, else the calibration folder), unlabelled."""
    import dataclasses

    from quantlab.data import make_reader

    folder = config.qat.data or config.data.calib
    check(folder is not None, "QAT needs training data: set [qat] data or [data] calib, or pass train batches")
    data = dataclasses.replace(config.data, batch_size=config.qat.batch_size)
    return make_reader(data, config.resolve(folder), prepared_inputs, resolve=config.resolve)


# ---------------------------------------------------------------------------------------------
# export and checks


def _export(model: Any, config: Config, example: list[Any], path: Path) -> None:
    import torch

    m = config.model
    names_in, names_out = list(m.input_names), list(m.output_names)
    axes = {n: {0: "batch"} for n in (*names_in, *names_out)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, tuple(t[:1] for t in example), str(path), input_names=names_in, output_names=names_out,
            dynamic_axes=axes, opset_version=max(m.opset, 13), dynamo=False,
        )
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:  # a newer writer's IR; the graph uses nothing beyond 10
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------------------


def run_qat(
    config: Config,
    *,
    amax: Mapping[str, float],
    out: str | Path,
    train: Iterable[Batch] | None = None,
    evaluate: Callable[[Path], float] | None = None,
    good_enough: Callable[[float], bool] | None = None,
    progress: ProgressFactory | None = None,
) -> QatResult:
    """Fine-tune the configured PyTorch model with INT8 fake quantizers and export Q/DQ ONNX to ``out``.

    Args:
        config: the run's config; reads ``[model]`` (``pytorch``, names, opset, input shapes) and
            ``[qat]``.
        amax: calibrated thresholds by tensor name of quantlab's prepared FP32 model (see
            :func:`activation_amax`); they initialise the activation quantizers.
        out: where the Q/DQ ONNX model is written (atomically).
        train: training batches (see the module docstring); ``None`` reads ``[qat] data`` (or the
            calibration folder) without labels.
        evaluate: ``evaluate(onnx_path) -> metric`` after each epoch, on an export of the model.
        good_enough: ``good_enough(metric) -> bool``; training stops after the first epoch where it
            holds.
        progress: ``progress(total)`` may return a bar (``update(n)``, ``close()``, optionally
            ``set_description``) for each epoch's steps, like ``run_ptq``'s.
    """
    check(
        bool(config.model.pytorch),
        "QAT needs the PyTorch model: set [model] pytorch = 'module:factory'",
    )
    import torch

    from quantlab.collect import ort_session
    from quantlab.compare.metrics import check_agreement
    from quantlab.model import export_pytorch, prepare_model
    from quantlab.qdq.lint import lint_tensorrt

    qc, mc = config.qat, config.model
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    prepared = prepare_model(
        export_pytorch(mc.pytorch, mc.input_shapes, mc.input_names, mc.output_names, mc.opset), mc.input_shapes
    )
    seconds["prepare"] = time.perf_counter() - t0
    if train is None:
        train = training_data(config, prepared.inputs)
    first = next(iter(train), None)
    check(first is not None, "the QAT training data is empty: give at least one batch")
    first_feed, first_labels = _split(first)
    loss_kind = qc.loss if qc.loss != "auto" else ("labels" if first_labels is not None else "distill")
    check(
        loss_kind != "labels" or first_labels is not None,
        "qat.loss = 'labels' but the training batches carry no labels: pass (feed, labels) pairs or use 'distill'",
    )
    device = _resolve_device(qc.device)
    mtq = _import_mtq()
    names = tuple(mc.input_names)
    out = Path(out)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(qc.seed)
        t0 = time.perf_counter()
        model = _load_factory(mc.pytorch).to(device)
        teacher = copy.deepcopy(model).eval() if loss_kind == "distill" else None
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
        _register_subclasses(model)

        def calibrate(m: Any) -> None:
            with torch.no_grad():
                for i, batch in enumerate(train):
                    if i >= qc.calib_batches:
                        break
                    m(*_tensors(_split(batch)[0], names, device))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, calibrate)
        model.eval()
        quantizers = _input_quantizers(model)
        mapped = _map_amax(quantizers, onnx.load(str(prepared.path)), amax)
        for name, value in mapped.items():
            q = quantizers[name]
            q.amax = torch.full_like(q.amax, value) if q.amax is not None else torch.tensor(value)
        fallback = sorted(set(quantizers) - set(mapped))
        seconds["quantize"] = time.perf_counter() - t0

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=qc.lr, momentum=qc.momentum)
        try:
            per_epoch = len(train)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = 0
        total = per_epoch * qc.epochs
        if qc.max_steps:
            total = min(total, qc.max_steps) if total else qc.max_steps
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1)) if total else None

        exported: tuple[Path, int] | None = None  # the last export and the step it was taken at
        losses: list[float] = []
        metrics: list[float] = []
        steps = 0
        stopped = False
        train_seconds = 0.0
        out.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # beside out: os.replace is atomic
        try:
            for epoch in range(qc.epochs):
                if qc.max_steps and steps >= qc.max_steps:
                    break
                left = qc.max_steps - steps if qc.max_steps else 0
                n_bar = min(per_epoch, left) if (per_epoch and left) else (per_epoch or left)
                bar = progress(n_bar) if progress else None
                if bar is not None and hasattr(bar, "set_description"):
                    bar.set_description(f"QAT epoch {epoch + 1}/{qc.epochs}")
                epoch_losses = []
                try:
                    for batch in train:
                        if qc.max_steps and steps >= qc.max_steps:
                            break
                        t = time.perf_counter()
                        feed, labels = _split(batch)
                        inputs = _tensors(feed, names, device)
                        outputs = model(*inputs)
                        if loss_kind == "labels":
                            check(labels is not None, "a training batch has no labels while others have: give every batch labels")
                            target = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
                            loss = torch.nn.functional.cross_entropy(_first_output(outputs), target)
                        else:
                            with torch.no_grad():
                                reference = _outputs(teacher(*inputs))
                            loss = sum(
                                torch.nn.functional.mse_loss(o, r) for o, r in zip(_outputs(outputs), reference)
                            )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        if schedule is not None:
                            schedule.step()
                        steps += 1
                        epoch_losses.append(float(loss.detach()))
                        train_seconds += time.perf_counter() - t
                        if bar is not None:
                            bar.update(1)
                finally:
                    if bar is not None:
                        bar.close()
                check(epoch_losses or steps, "the QAT training data yielded no batch: pass a list or a reader, not a used-up iterator")
                if not epoch_losses:
                    break
                losses.append(float(np.mean(epoch_losses)))
                if evaluate is not None:
                    t = time.perf_counter()
                    candidate = tmpdir / f"epoch{epoch + 1}.onnx"
                    _export(model, config, _tensors(first_feed, names, device), candidate)
                    exported = (candidate, steps)
                    metrics.append(float(evaluate(candidate)))
                    seconds["evaluate"] = seconds.get("evaluate", 0.0) + time.perf_counter() - t
                    if good_enough is not None and good_enough(metrics[-1]):
                        stopped = True
                        break
            seconds["train"] = train_seconds
            seconds["train_step"] = train_seconds / steps if steps else 0.0

            t0 = time.perf_counter()
            example = _tensors(first_feed, names, device)
            with torch.no_grad():
                reference = _first_output(model(*example))  # for the exported model's check below
                fp32_ref = teacher or _load_factory(mc.pytorch).to(device)
                fp32_out = _first_output(fp32_ref(*example)).detach().cpu().numpy()
            if exported is not None and exported[1] == steps:
                staged = exported[0]  # evaluated after the last step: ship that very file
            else:
                staged = tmpdir / "model.onnx"
                _export(model, config, example, staged)
            proto = onnx.load(str(staged))
            onnx.checker.check_model(proto)
            session = ort_session(str(staged), level="all")
            feed = {n: np.ascontiguousarray(first_feed[n]) for n in names}
            ort_out = session.run(None, feed)[0]
            cosine, sqnr = check_agreement(fp32_out, ort_out)
            fq_cos, _ = check_agreement(reference.detach().cpu().numpy(), ort_out)
            # ONNX Runtime's integer kernels round differently from float fake quantization; on a
            # transformer the two agree to about 0.98 cosine, so only a gross mismatch is an error
            check(
                fq_cos > 0.95,
                f"the exported model disagrees with the fake-quantized PyTorch model (cosine {fq_cos:.4f}): "
                "the Q/DQ export is broken for this model; report it with the model",
            )
            report = lint_tensorrt(proto)
            rules = "pass" if report else "fail: " + ", ".join(report.rules)
            os.replace(staged, out)
            seconds["export"] = time.perf_counter() - t0
        finally:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)

    return QatResult(
        path=out, device=device, loss=loss_kind, epochs=len(losses), steps=steps, losses=losses,
        metrics=metrics, stopped_early=stopped, quantizers=len(quantizers), mapped=len(mapped),
        fallback=fallback, tensorrt_rules=rules, lint=report.to_dict(), cosine=cosine, sqnr_db=sqnr,
        ir_version=proto.ir_version, seconds=seconds,
    )

