"""Timing torch modules on a target device, robustly on a noisy shared machine.

Why not just take the median wall time?
    On a shared machine the processor switches between speed states for seconds at a time, so the
    absolute median of the same network moves between passes. What is stable is the *ratio* of an
    item's time to the time of a fixed reference module measured right next to it: both calls see
    the same machine state. (The measurements behind every choice here: docs/latency.md.)

How :meth:`Device.measure` works
    1. Every module is compiled once into a zero-argument callable for the device
       (:meth:`Device.runner`): torch eager on ``cpu``, an ONNX Runtime session on ``onnxruntime``,
       torch on the GPU on ``cuda``.
    2. The reference and every item are warmed up (``warmup`` calls each).
    3. ``repeats`` rounds follow. Each round visits the items in a freshly shuffled (seeded) order
       and the calls alternate with the reference::

           ref, item_a, ref, item_c, ref, item_b, ref, ...

       Every item call gets ``ratio = t_item / mean(t_ref_before, t_ref_after)``.
    4. An item's latency is its median ratio (in "reference units") times the reference's own
       median time in the same session. The spread is the interquartile range over the median of
       the per-call estimates ``ratio_i * reference_ms``.
    5. Adaptive mode (``rel_ci=...``, what latency tables use): after those rounds, further full
       rounds while any item's median is not yet known to ``+-rel_ci`` (distribution-free 95 %
       confidence interval, :func:`median_ci`), up to ``max_repeats`` calls or ``max_seconds``.
       Full rounds, not just the pending items: a slow spell of the machine late in the pass
       would otherwise shift only the items measured late. Calls during which the process was
       preempted (``getrusage`` reports an
       involuntary context switch of any of its threads) are left out, as long as at least
       ``MIN_CLEAN_SAMPLES`` clean ones remain: on a loaded machine they hold another process's
       work (tens to hundreds of ms with 2 threads on 2 busy cores), not the item's. If only one
       neighbouring reference call is clean, the ratio uses that one.
    6. ``warm_calls=k``: every timed call (item and reference) follows k untimed calls of the same
       module, so it runs warm as in a deployed loop. Without it an item's data is evicted by the
       rest of the rotation while the reference stays cached, and the ratio then depends on what
       else is being measured.

The fixed per-call overhead of a runtime (e.g. one ``InferenceSession.run``) is measured as part of
what the runner does and is *not* corrected here; the latency table calibrates an overhead term.

Hardware is chosen with :func:`build_device` from a plain config (``conf/hardware/*.yaml``)::

    device = build_device(**{"name": "cpu", "threads": 2, "batch_size": 1})
    result = device.measure({"block": (block, (16, 56, 56))})
    result["block"]["median_ms"], result["__reference__"]["median_ms"]
"""

from __future__ import annotations

import abc
import contextlib
import copy
import gc
import math
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nas.console import item_progress
from nas.errors import UserError
from nas.io import export_onnx
from nas.latency.build import check_trusted, load_or_build_table
from nas.latency.hardware import REGISTRY, Hardware, register_hardware
from nas.latency.measure import REFERENCE_KEY, measure_modules, measure_timed
from nas.latency.table import LatencyTable
from supernets.arch import Arch
from supernets.space import SearchSpace

__all__ = [
    "DEVICE_NAMES",
    "REFERENCE_KEY",
    "Device",
    "CpuDevice",
    "OnnxRuntimeDevice",
    "CudaDevice",
    "reference_module",
    "build_device",
    "median_ci",
]

#: Names accepted by :func:`build_device`, one per file in ``conf/hardware/``.
DEVICE_NAMES: tuple[str, ...] = ("cpu", "onnxruntime", "cuda")


#: Input shape (without the batch dimension) of :func:`reference_module`.
REFERENCE_INPUT_SHAPE: tuple[int, ...] = (16, 16, 16)

_REFERENCE_SEED = 0

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def reference_module() -> tuple[nn.Module, tuple[int, ...]]:
    """Return THE reference module all latencies are expressed against, and its input shape.

    It is a small, deterministic (seeded) block: ``conv3x3(16->32) - BN - ReLU6 - conv3x3(32->16) -
    BN - ReLU6`` in eval mode, run on inputs of shape ``(batch, 16, 16, 16)``. Every call builds an
    identical fresh copy, and the global torch random state is left untouched. Changing this block
    changes the meaning of every stored ratio, so do not.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_REFERENCE_SEED)
        module = nn.Sequential(
            nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU6(inplace=True),
            nn.Conv2d(32, 16, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(inplace=True),
        )
        # Non-trivial but fixed normalisation statistics, so the block is not an identity-like no-op.
        for bn in (module[1], module[4]):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.1, 0.1)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    module.eval()
    return module, REFERENCE_INPUT_SHAPE


def _processor_name() -> str:
    """A human-readable processor model: /proc/cpuinfo's model name, else ``platform.processor()``.

    On Linux ``platform.processor()`` usually only says ``x86_64``, which does not tell two machines
    apart, so the cpuinfo model name is preferred when it exists.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _to_numpy_list(output: Any) -> list[np.ndarray]:
    """Flatten a module's output (tensor, array, or nested tuple/list/dict of them) to numpy arrays."""
    if isinstance(output, torch.Tensor):
        return [output.detach().float().cpu().numpy()]
    if isinstance(output, np.ndarray):
        return [output]
    if isinstance(output, Mapping):
        return [a for value in output.values() for a in _to_numpy_list(value)]
    if isinstance(output, (tuple, list)):
        return [a for value in output for a in _to_numpy_list(value)]
    raise TypeError(f"cannot convert module output of type {type(output).__name__} to numpy")


def _robust_stats(values: list[float]) -> tuple[float, float]:
    """Median and relative spread (interquartile range / median) of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    q25, median, q75 = np.percentile(array, [25.0, 50.0, 75.0])
    spread = float((q75 - q25) / median) if median > 0 else float("inf")
    return float(median), spread


def _involuntary_switches() -> int | None:
    """Involuntary context switches of this process so far (all threads), or None where unknown."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    except (ImportError, OSError, AttributeError):
        return None


#: Fewest clean (not preempted) samples an item needs before the preempted ones are left out.
MIN_CLEAN_SAMPLES = 3

#: Rounds every item gets even when ``max_seconds`` has run out.
MIN_ROUNDS = 5


def _usable(values: list[float], clean: list[bool]) -> list[float]:
    """The clean samples when there are enough of them, else all (a heavily loaded machine)."""
    kept = [v for v, ok in zip(values, clean) if ok]
    return kept if len(kept) >= MIN_CLEAN_SAMPLES else values


def median_ci(values: list[float], z: float = 1.96) -> float:
    """Relative half-width of the distribution-free confidence interval of the median of ``values``.

    The interval runs between the order statistics ``n/2 -+ z*sqrt(n)/2`` (binomial normal
    approximation; ``z = 1.96`` gives about 95 %), divided by twice the median. ``inf`` for fewer than
    6 values, where the interval is not defined.
    """
    n = len(values)
    if n < 6:
        return float("inf")
    ordered = sorted(values)
    half = z * math.sqrt(n) / 2.0
    lo = max(0, int(math.floor(n / 2.0 - half)))
    hi = min(n - 1, int(math.ceil(n / 2.0 + half)))
    median = float(np.median(ordered))
    return float((ordered[hi] - ordered[lo]) / (2.0 * median)) if median > 0 else float("inf")


class Device(Hardware):
    """A target to time modules on. Subclasses compile a module into a zero-argument callable.

    Args:
        name: ``"cpu"``, ``"onnxruntime"`` or ``"cuda"``.
        threads: intra-op threads (torch threads on cpu, ``intra_op_num_threads`` on onnxruntime).
        batch_size: leading dimension of the random input.
        warmup: untimed calls of each module before timing.
        repeats: timed calls of each item (rounds of the alternation).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (onnxruntime: float32 only).
        seed: seeds the fixed random inputs and the per-round shuffling of the item order.
        **kw: device-specific options (see the subclass); keys starting with ``_`` (config
            metadata) are ignored, any other unknown key is a :class:`UserError`.
    """

    #: Device-specific keyword options a subclass accepts, with their defaults.
    extra_options: dict[str, Any] = {}

    #: The bar a latency table on this device must meet on its validation to be used without the user's
    #: say (``lut.accept_untrusted=true``): fraction of subnets within +-10 %, and Spearman. It is the
    #: floor of a usable table, below the quality goal a good day reaches (docs/latency.md: >= 95 %
    #: and >= 0.95 on torch, >= 90 % and >= 0.93 on ONNX Runtime): a search's quick check validates on
    #: only 22 nets, and a table that ranks 80 % of them within +-10 % still steers a search; the
    #: broken tables seen on a loaded machine scored 14-46 % and Spearman 0.15-0.67.
    trust_bar: dict[str, float] = {"within_10pct": 0.80, "spearman": 0.90}

    #: Whether calls are timed with the host clock (so a preemption of the process inflates them).
    host_timed: bool = True

    def __init__(
        self,
        name: str,
        threads: int = 2,
        batch_size: int = 1,
        warmup: int = 10,
        repeats: int = 50,
        dtype: str = "float32",
        seed: int = 0,
        **kw: Any,
    ) -> None:
        self.name = str(name)
        self.threads = self._check_int("threads", threads, minimum=1)
        self.batch_size = self._check_int("batch_size", batch_size, minimum=1)
        self.warmup = self._check_int("warmup", warmup, minimum=0)
        self.repeats = self._check_int("repeats", repeats, minimum=1)
        self.seed = int(seed)
        if dtype not in _DTYPES:
            raise UserError(
                f"unknown dtype {dtype!r} for hardware '{self.name}'; choose one of: {', '.join(_DTYPES)}"
            )
        self.dtype = str(dtype)
        unknown = sorted(k for k in kw if not k.startswith("_") and k not in self.extra_options)
        if unknown:
            allowed = ["threads", "batch_size", "warmup", "repeats", "dtype", "seed", *self.extra_options]
            raise UserError(
                f"unknown option(s) {', '.join(unknown)} for hardware '{self.name}'; "
                f"allowed: {', '.join(allowed)}"
            )
        self.options: dict[str, Any] = {
            k: kw.get(k, default) for k, default in self.extra_options.items()
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, threads={self.threads}, "
            f"batch_size={self.batch_size}, warmup={self.warmup}, repeats={self.repeats}, "
            f"dtype={self.dtype!r})"
        )

    def _check_int(self, key: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise UserError(
                f"hardware '{self.name}': {key} must be an integer >= {minimum}, got {value!r}"
            )
        return int(value)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype the modules and inputs are run in."""
        return _DTYPES[self.dtype]

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> dict[str, Any]:
        """What determines the measured latencies: device kind, processor, settings, library versions.

        JSON-serialisable and stable for a given machine and config; subclasses add their runtime
        (onnxruntime version, CUDA device name). Timing options (warmup, repeats, seed) are not part
        of it, because they do not change what is being measured.
        """
        return {
            "name": self.name,
            "processor": _processor_name(),
            "machine": platform.machine(),
            "threads": self.threads,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "torch": torch.__version__,
        }

    # ------------------------------------------------------------------ the Hardware interface

    def cost_model(self, space: SearchSpace, num_classes: int, *, cache_dir: str | None = None,
                   rebuild: bool = False, path: str | None = None, progress: bool = True,
                   log: Callable[[str], Any] = print, accept_untrusted: bool = False) -> LatencyTable:
        """The latency table of ``space`` on this device: ``path`` if given, else the cache (built when missing)."""
        if path:
            file = Path(path).expanduser()
            if not file.exists():
                raise UserError(f"lut.path={file} does not exist; build a table with `nas-lut space={space.name} "
                                f"hardware={self.name}` or drop lut.path to use the cache")
            table = LatencyTable.load(file, space, self.fingerprint_id(), warn=log)
            check_trusted(table, file, bar=self.trust_bar, accept_untrusted=accept_untrusted, log=log)
            return table
        if cache_dir is None:
            raise UserError("a timed device needs lut.cache_dir (or lut.path) for its latency table")
        return load_or_build_table(space, self, num_classes, cache_dir, rebuild=rebuild, progress=progress, log=log,
                                   accept_untrusted=accept_untrusted)

    def measure_nets(self, space: SearchSpace, archs: Sequence[Arch], **kw: Any) -> list[float]:
        return measure_timed(space, list(archs), self, **kw)

    def measure_modules(self, items: Mapping[str, tuple[nn.Module, tuple[int, ...]]], *,
                        reference_ms: float | None = None, **kw: Any) -> dict[str, float]:
        return measure_modules(self, items, reference_ms=reference_ms, **kw)

    # ------------------------------------------------------------------ running

    def example_input(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        """The fixed random float32 CPU input of shape ``(batch_size, *input_shape)`` runners use."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn((self.batch_size, *tuple(input_shape)), generator=generator)

    def _prepare_module(self, module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
        """An eval-mode copy of ``module`` in the device dtype; the caller's module is not touched."""
        prepared = copy.deepcopy(module).eval()
        return prepared.to(device=device, dtype=self.torch_dtype)

    @abc.abstractmethod
    def _compile(self, module: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], Any]:
        """Return a zero-argument callable that runs one inference and returns its raw output.

        On asynchronous devices the callable does not wait for completion; :meth:`runner` and
        :meth:`_time_ns` take care of that.
        """

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], None]:
        """A zero-argument callable running ONE inference of ``module`` on a fixed random input.

        The input has shape ``(batch_size, *input_shape)``; the module runs in eval mode without
        autograd. The module passed in is copied, never modified. When the callable returns, the
        inference has completed (so wall-clock timing of the call is meaningful).
        """
        call = self._compile(module, tuple(input_shape))

        def run() -> None:
            call()

        return run

    def predict(self, module: nn.Module, input_shape: tuple[int, ...]) -> list[np.ndarray]:
        """Run ``module`` once the way the runner does and return its outputs as float32 numpy arrays.

        For checking a runtime against torch: the input is :meth:`example_input` ``(input_shape)``.
        """
        outputs = _to_numpy_list(self._compile(module, tuple(input_shape))())
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    def _time_ns(self, call: Callable[[], Any]) -> float:
        """Duration of one call of a compiled callable, in nanoseconds (wall clock)."""
        start = time.perf_counter_ns()
        call()
        return float(time.perf_counter_ns() - start)

    # ------------------------------------------------------------------ measuring

    def measure(
        self,
        items: Mapping[str, tuple[nn.Module, tuple[int, ...]]],
        reference: tuple[nn.Module, tuple[int, ...]] | None = None,
        progress: bool = False,
        desc: str = "measuring",
        *,
        rel_ci: float | None = None,
        max_repeats: int | None = None,
        max_seconds: float | None = None,
        warm_calls: int = 0,
    ) -> dict[str, dict[str, float | int]]:
        """Time every item in alternation with a reference module (see the module docstring).

        Args:
            items: ``{name: (module, input_shape)}``; ``input_shape`` excludes the batch dimension.
            reference: ``(module, input_shape)``; default :func:`reference_module`.
            progress: show progress over items x rounds (a transient bar on a terminal, plain lines elsewhere).
            desc: label of the progress bar.
            rel_ci: adaptive mode. After ``repeats`` rounds, further full rounds continue until the
                distribution-free 95 % confidence interval of every item's median ratio is within
                ``+-rel_ci`` of the median, or the items have ``max_repeats`` calls. Items then carry ``"ci"`` (the achieved relative half-width)
                and their own ``count``.
            max_repeats: cap of the adaptive mode (default ``4 * repeats``).
            max_seconds: time budget of the whole measurement: no round starts after it (but every
                item gets at least ``MIN_ROUNDS`` calls).
            warm_calls: untimed calls of the item (and of the reference) right before each timed
                one, so that every timed call finds its weights and buffers in cache (as in a
                deployed loop) whatever else the rotation holds.

        Returns:
            ``{name: {"median_ms", "ratio", "spread", "count"}}`` for every item, where ``ratio``
            is the median of ``t_item / mean(t_ref_before, t_ref_after)``, ``median_ms`` is
            ``ratio`` times the reference's median ms of this session, ``spread`` is IQR/median of
            the per-call ms estimates and ``count`` is ``repeats`` (adaptive mode: the number of
            calls the item got); plus
            ``"__reference__": {"median_ms", "spread", "count"}`` for the reference's own calls.
        """
        if REFERENCE_KEY in items:
            raise ValueError(f"item name {REFERENCE_KEY!r} is reserved for the reference")
        if rel_ci is not None and not rel_ci > 0:
            raise ValueError(f"rel_ci must be positive, got {rel_ci!r}")
        ref_module, ref_shape = reference if reference is not None else reference_module()
        names = list(items)
        ref_call = self._compile(ref_module, tuple(ref_shape))
        calls = {n: self._compile(items[n][0], tuple(items[n][1])) for n in names}

        adaptive = rel_ci is not None
        cap = max(self.repeats, int(max_repeats) if max_repeats is not None else 4 * self.repeats)
        # In adaptive mode a call during which the process was preempted (an involuntary context
        # switch of any of its threads) is not used: its time includes another process's work.
        watch = adaptive and self.host_timed and _involuntary_switches() is not None

        ref_ns: list[float] = []
        ref_clean: list[bool] = []
        ratios: dict[str, list[float]] = {n: [] for n in names}
        clean: dict[str, list[bool]] = {n: [] for n in names}
        order_rng = random.Random(self.seed)
        state = {"ref_before": 0.0, "ref_before_clean": True}

        def timed(call: Callable[[], Any]) -> tuple[float, bool]:
            if not watch:
                return self._time_ns(call), True
            before = _involuntary_switches()
            t = self._time_ns(call)
            return t, _involuntary_switches() == before

        def step(n: str) -> None:
            for _ in range(warm_calls):  # untimed: the timed call finds the item's data in cache
                calls[n]()
            t_item, item_ok = timed(calls[n])
            for _ in range(warm_calls):
                ref_call()
            ref_after, ref_ok = timed(ref_call)
            ref_ns.append(ref_after)
            ref_clean.append(ref_ok)
            ref_before, before_ok = state["ref_before"], state["ref_before_clean"]
            if watch and before_ok != ref_ok:  # one neighbour was preempted: compare with the other
                denominator = ref_after if ref_ok else ref_before
            else:
                denominator = 0.5 * (ref_before + ref_after)
            ratios[n].append(t_item / denominator)
            clean[n].append(item_ok and (ref_ok or before_ok))
            state["ref_before"], state["ref_before_clean"] = ref_after, ref_ok

        def usable(n: str) -> list[float]:
            return _usable(ratios[n], clean[n]) if watch else ratios[n]

        progress_cm = contextlib.nullcontext() if not progress else self._progress_bar(max_seconds)
        gc_was_enabled = gc.isenabled()
        t_start = time.perf_counter()
        with progress_cm as bar:
            task = bar.add_task(desc, total=self.repeats * len(names)) if bar is not None else None
            try:
                gc.collect()
                gc.disable()  # a collection inside a timed call is noise, not latency
                for _ in range(self.warmup):
                    ref_call()
                for n in names:
                    for _ in range(self.warmup):
                        calls[n]()
                state["ref_before"], state["ref_before_clean"] = timed(ref_call)
                ref_ns.append(state["ref_before"])
                ref_clean.append(state["ref_before_clean"])
                for round_index in range(self.repeats):
                    if (max_seconds is not None and round_index >= MIN_ROUNDS
                            and time.perf_counter() - t_start > max_seconds):
                        break
                    order = names.copy()
                    order_rng.shuffle(order)
                    for n in order:
                        step(n)
                        if bar is not None:
                            bar.advance(task)
                    if not names:  # nothing to compare: still give the reference its repeats
                        ref_ns.append(self._time_ns(ref_call))
                        ref_clean.append(True)
                while adaptive and names:
                    if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                        break
                    if not any(len(ratios[n]) < cap and median_ci(usable(n)) > rel_ci for n in names):
                        break
                    # a full round, not just the pending items: every item keeps sampling the same
                    # mix of machine states, or items measured late would see another one
                    order = [n for n in names if len(ratios[n]) < cap]
                    if bar is not None:
                        bar.update(task, total=bar.tasks[0].total + len(order))
                    order_rng.shuffle(order)
                    for n in order:
                        step(n)
                        if bar is not None:
                            bar.advance(task)
            finally:
                if gc_was_enabled:
                    gc.enable()

        ref_values = _usable(ref_ns, ref_clean) if watch else ref_ns
        ref_median_ns, ref_spread = _robust_stats(ref_values)
        ref_ms = ref_median_ns / 1e6
        result: dict[str, dict[str, float | int]] = {}
        for n in names:
            values = usable(n)
            ratio, spread = _robust_stats(values)
            result[n] = {
                "median_ms": ratio * ref_ms,
                "ratio": ratio,
                "spread": spread,
                "count": len(values),
            }
            if adaptive:
                result[n]["ci"] = median_ci(values)
                result[n]["calls"] = len(ratios[n])
                result[n]["clean"] = sum(clean[n])
        result[REFERENCE_KEY] = {"median_ms": ref_ms, "spread": ref_spread, "count": len(ref_values)}
        if adaptive:
            result[REFERENCE_KEY]["calls"] = len(ref_ns)
            result[REFERENCE_KEY]["clean"] = sum(ref_clean)
        return result

    @staticmethod
    def _progress_bar(budget: float | None = None):
        """Items done / total, elapsed and an estimate: a rich bar on a terminal, plain lines elsewhere."""
        return item_progress(budget=budget, unit="timed calls")


@register_hardware("cpu")
class CpuDevice(Device):
    """Torch eager on the CPU with ``torch.set_num_threads(threads)``.

    The thread count is process-global in torch; the runner re-applies it before a call whenever
    something else changed it.
    """

    def __init__(self, name: str = "cpu", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)

    def _compile(self, module: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], Any]:
        threads = self.threads
        torch.set_num_threads(threads)
        model = self._prepare_module(module, "cpu")
        x = self.example_input(input_shape).to(dtype=self.torch_dtype)

        def call() -> Any:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            with torch.inference_mode():
                return model(x)

        return call


@register_hardware("onnxruntime")
class OnnxRuntimeDevice(Device):
    """ONNX Runtime on the CPU (``CPUExecutionProvider``), float32.

    Each module is exported to ONNX in a temporary directory and loaded into an
    ``InferenceSession`` with ``threads`` intra-op threads, one inter-op thread, sequential
    execution and all graph optimisations. Each session has its own intra-op pool with spinning
    off: measuring keeps many sessions alive at once (one per block), and spinning idle workers of
    all of them would inflate every time (40 sessions: load above 40 on a 2-core machine). A
    process-wide pool (``set_global_thread_pool_sizes``) would avoid that too, but it makes every
    later plain ``InferenceSession`` in the process fail, the user's own included.

    Options:
        opset: ONNX opset to export with (default: the exporter's default).
    """

    extra_options = {"opset": None}

    def __init__(self, name: str = "onnxruntime", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        if self.dtype != "float32":
            raise UserError(
                f"hardware 'onnxruntime' runs float32 only, got dtype={self.dtype!r}; "
                "use dtype=float32 or hardware=cpu"
            )
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise UserError(
                "hardware 'onnxruntime' needs the onnxruntime package, which is not installed; "
                "run `pip install onnxruntime` or use hardware=cpu"
            ) from exc
        self.thread_pool = "per-session, no spinning"

    def fingerprint(self) -> dict[str, Any]:
        import onnxruntime

        return {**super().fingerprint(), "onnxruntime": onnxruntime.__version__}

    def _export(self, model: nn.Module, x: torch.Tensor, path: str) -> None:
        export_onnx(model, x, path, opset=self.options["opset"])

    def _compile(self, module: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], Any]:
        import onnxruntime as ort

        model = self._prepare_module(module, "cpu")
        x = self.example_input(input_shape)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="hwnas_onnx_") as tmp:
            path = os.path.join(tmp, "model.onnx")
            with torch.inference_mode(False), torch.no_grad():
                self._export(model, x, path)
            # The session reads the model (and any external weight files) now; tmp can go after.
            session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        output_names = [o.name for o in session.get_outputs()]

        def call() -> Any:
            return session.run(output_names, feed)

        return call


@register_hardware("cuda")
class CudaDevice(Device):
    """Torch on a CUDA GPU. The runner synchronizes after each call; :meth:`measure` times calls
    with CUDA events (``torch.cuda.Event(enable_timing=True)``) instead of the host clock.

    Options:
        device_index: which GPU to use (default 0).
    """

    extra_options = {"device_index": 0}
    host_timed = False

    def __init__(self, name: str = "cuda", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        if not torch.cuda.is_available():
            raise UserError(
                "hardware 'cuda' was chosen but no CUDA device is available on this machine; "
                "use hardware=cpu or hardware=onnxruntime"
            )
        index = int(self.options["device_index"])
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(
                f"hardware 'cuda': device_index={index} but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
        self.device = torch.device("cuda", index)

    def fingerprint(self) -> dict[str, Any]:
        return {
            **super().fingerprint(),
            "cuda_device": torch.cuda.get_device_name(self.device),
            "cuda": torch.version.cuda,
        }

    def _compile(self, module: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], Any]:
        model = self._prepare_module(module, self.device)
        x = self.example_input(input_shape).to(device=self.device, dtype=self.torch_dtype)

        def call() -> Any:
            with torch.inference_mode():
                return model(x)

        return call

    def runner(self, module: nn.Module, input_shape: tuple[int, ...]) -> Callable[[], None]:
        call = self._compile(module, tuple(input_shape))
        device = self.device

        def run() -> None:
            call()
            torch.cuda.synchronize(device)

        return run

    def predict(self, module: nn.Module, input_shape: tuple[int, ...]) -> list[np.ndarray]:
        outputs = self._compile(module, tuple(input_shape))()
        torch.cuda.synchronize(self.device)
        return [np.asarray(o, dtype=np.float32) for o in _to_numpy_list(outputs)]

    def _time_ns(self, call: Callable[[], Any]) -> float:
        """GPU time of one call between two CUDA events on the current stream, in nanoseconds."""
        with torch.cuda.device(self.device):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e6  # elapsed_time is in ms


def build_device(name: str, **kwargs: Any) -> Device:
    """Build the timed device called ``name`` (one of :data:`DEVICE_NAMES`) with the given options.

    Raises :class:`UserError` for an unknown name, for ``cuda`` without a CUDA device, and for
    invalid options. (:func:`nas.latency.create_hardware` also knows the analytic ones.)
    """
    if str(name) not in DEVICE_NAMES:
        raise UserError(
            f"unknown hardware '{name}'; choose one of: {', '.join(DEVICE_NAMES)} (conf/hardware/)"
        )
    return REGISTRY[str(name)](name=str(name), **kwargs)
