"""Per-tensor activation statistics, gathered in one streaming pass.

Each calibrated tensor keeps its signed minimum and maximum and two histograms of magnitudes, one
for ``x >= 0`` and one for ``x < 0``, over the same ``NBINS`` bins of ``[0, R)``.  ``R`` is always a
power of two, the smallest one strictly above ``max|x|`` seen so far:

    bin(x) = floor(|x| * NBINS / R)          bin width w = R / NBINS

When a later batch holds a larger value, ``R`` doubles (as often as needed) and neighbouring bins are
added pairwise.  Because ``R`` and ``w`` are powers of two, ``|x| * NBINS / R`` is exact in floating
point and a bin of width ``2w`` holds exactly the values its two halves held: the histogram of a
data set is the same whatever the batch size or order.  Memory per tensor is ``2 * NBINS`` int64
counts, independent of the number of samples.

Worked example (NBINS = 4): values [0.3, -0.6, 1.5] give max|x| = 1.5, R = 2, w = 0.5;
pos = [1, 0, 0, 1] (0.3 -> bin 0, 1.5 -> bin 3), neg = [0, 1, 0, 0] (0.6 -> bin 1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

NBINS = 2048


def range_for(amax: float) -> float:
    """Smallest power of two strictly greater than ``amax`` (0.0 for an all-zero tensor)."""
    if amax <= 0.0:
        return 0.0
    return float(2.0 ** (math.floor(math.log2(amax)) + 1))


@dataclass
class TensorStats:
    """Streaming statistics of one tensor.

    Attributes:
        name: tensor name in the ONNX graph.
        min, max: signed extremes over every element seen.
        hist_pos: int64[NBINS], counts of elements ``x >= 0`` by ``|x|`` bin.
        hist_neg: int64[NBINS], counts of elements ``x < 0`` by ``|x|`` bin.
        range: ``R``, the upper edge of the last bin; 0.0 while every element seen is zero
            (then all counts sit in ``hist_pos[0]``).
        count: number of elements seen.
    """

    name: str
    min: float = math.inf
    max: float = -math.inf
    hist_pos: np.ndarray = field(default_factory=lambda: np.zeros(NBINS, np.int64))
    hist_neg: np.ndarray = field(default_factory=lambda: np.zeros(NBINS, np.int64))
    range: float = 0.0
    count: int = 0

    @property
    def nbins(self) -> int:
        return int(self.hist_pos.shape[0])

    @property
    def hist(self) -> np.ndarray:
        """int64[NBINS]: histogram of ``|x|`` (both signs together)."""
        return self.hist_pos + self.hist_neg

    @property
    def bin_width(self) -> float:
        return self.range / self.nbins

    @property
    def amax(self) -> float:
        """max |x| over every element seen."""
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def bin_edges(self) -> np.ndarray:
        """float64[NBINS + 1]: edges ``0, w, 2w, ..., R``."""
        return np.arange(self.nbins + 1, dtype=np.float64) * self.bin_width

    def grow_to(self, new_range: float) -> None:
        """Double ``range`` until it reaches ``new_range``, merging neighbouring bins pairwise."""
        if self.range == 0.0:
            # Everything so far was exactly zero: it stays in bin 0 at any range.
            self.range = new_range
            return
        while self.range < new_range:
            for h in (self.hist_pos, self.hist_neg):
                merged = h.reshape(-1, 2).sum(axis=1)
                h[: merged.shape[0]] = merged
                h[merged.shape[0] :] = 0
            self.range *= 2.0

    @classmethod
    def from_array(cls, name: str, x: np.ndarray, nbins: int = NBINS) -> "TensorStats":
        """Statistics of one array, computed directly with NumPy (the reference for the fast path).

        >>> s = TensorStats.from_array("t", np.array([0.3, -0.6, 1.5]), nbins=4)
        >>> s.range, s.hist_pos.tolist(), s.hist_neg.tolist()
        (2.0, [1, 0, 0, 1], [0, 1, 0, 0])
        """
        x = np.asarray(x, dtype=np.float64).ravel()
        s = cls(name, hist_pos=np.zeros(nbins, np.int64), hist_neg=np.zeros(nbins, np.int64))
        if x.size == 0:
            return s
        s.min, s.max, s.count = float(x.min()), float(x.max()), int(x.size)
        s.range = range_for(s.amax)
        if s.range == 0.0:
            s.hist_pos[0] = x.size
            return s
        idx = np.minimum(np.floor(np.abs(x) * (nbins / s.range)).astype(np.int64), nbins - 1)
        neg = x < 0
        s.hist_pos[:] = np.bincount(idx[~neg], minlength=nbins)
        s.hist_neg[:] = np.bincount(idx[neg], minlength=nbins)
        return s


@dataclass
class StatsSet:
    """Statistics of every calibrated tensor of one model, plus how folded tensors map to them."""

    tensors: dict[str, TensorStats]
    folded: dict[str, str] = field(default_factory=dict)
    model_sha256: str = ""
    samples: int = 0

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[self.folded.get(name, name)]

    def names(self) -> list[str]:
        """Every tensor with a range: the calibrated ones, then the folded ones."""
        return [*self.tensors, *self.folded]

    def save(self, path: str | "os.PathLike[str]") -> None:
        """Write an ``.npz`` file, byte-identical for identical statistics (fixed zip timestamps)."""
        import json
        import zipfile

        names = list(self.tensors)
        meta = {
            "format": "quantlab-stats-1",
            "nbins": NBINS,
            "names": names,
            "folded": self.folded,
            "model_sha256": self.model_sha256,
            "samples": self.samples,
        }
        arrays = {
            "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
            "min": np.array([self.tensors[n].min for n in names], np.float64),
            "max": np.array([self.tensors[n].max for n in names], np.float64),
            "range": np.array([self.tensors[n].range for n in names], np.float64),
            "count": np.array([self.tensors[n].count for n in names], np.int64),
            "hist_pos": np.stack([self.tensors[n].hist_pos for n in names]) if names else np.zeros((0, NBINS), np.int64),
            "hist_neg": np.stack([self.tensors[n].hist_neg for n in names]) if names else np.zeros((0, NBINS), np.int64),
        }
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key, arr in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w") as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)

    @classmethod
    def load(cls, path: str | "os.PathLike[str]") -> "StatsSet":
        import json

        from quantlab.errors import QuantlabError

        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                data = {k: z[k] for k in ("min", "max", "range", "count", "hist_pos", "hist_neg")}
        except (OSError, KeyError, ValueError) as exc:
            raise QuantlabError(f"'{path}' is not a quantlab statistics file ({exc}): pass the stats.npz of a run") from None
        if meta.get("format") != "quantlab-stats-1":
            raise QuantlabError(f"'{path}' has unknown statistics format {meta.get('format')!r}: re-run calibration")
        tensors = {
            n: TensorStats(
                n, float(data["min"][i]), float(data["max"][i]), data["hist_pos"][i].copy(),
                data["hist_neg"][i].copy(), float(data["range"][i]), int(data["count"][i]),
            )
            for i, n in enumerate(meta["names"])
        }
        return cls(tensors, dict(meta["folded"]), meta["model_sha256"], int(meta["samples"]))
