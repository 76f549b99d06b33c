"""Compare the FP32, FP16 and INT8 engines of a PTQ run on real data (``quantlab compare``)."""

from quantlab.compare.harness import CompareResult, EngineResult, load_eval_set, run_compare

__all__ = ["CompareResult", "EngineResult", "load_eval_set", "run_compare"]
