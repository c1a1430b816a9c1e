"""The one interface every ``hardware=`` option implements: timed devices and analytic counts alike.

An app or a strategy holds a :class:`Hardware` and never asks which kind it is:

* :meth:`cost_model` gives the additive cost model of a space on it (a measured latency table for
  a timed device, cached and built when missing; an exact count for ``flops`` / ``params``);
* :meth:`measure_nets` measures (or counts) whole subnets end to end;
* :meth:`measure_modules` measures (or counts) any whole ``nn.Module`` (a pruned net, a user's model);
* :attr:`timed` says whether repeated measurements can differ (what a test-retest means).

Every option of ``conf/hardware/`` names its class with ``_target_``; classes register a name with
:func:`register_hardware`, and :func:`nas.latency.create_hardware` builds one by name for library
users (``create_hardware("onnxruntime", threads=1)``).
"""
from __future__ import annotations

import abc
import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from nas.latency.cost import CostModel
    from supernets.arch import Arch
    from supernets.space import SearchSpace


class Hardware(abc.ABC):
    """What the apps need of a target: its identity, a cost model per space, whole-net measurement."""

    name: str
    threads: int
    batch_size: int
    #: True where a measurement is timed (and so varies); False for an exact count.
    timed: bool = True
    #: The unit of :meth:`measure_nets` (``ms``, ``MFLOPs``, ``Mparams``).
    unit: str = "ms"
    #: What a latency table's validation must reach to be used without the user's say (None: exact).
    trust_bar: dict[str, float] | None = None

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What determines the measured costs (JSON-serialisable, stable for one machine and config)."""

    def fingerprint_id(self) -> str:
        """A short (12 hex digits) sha1 of the sorted-key JSON of :meth:`fingerprint`."""
        blob = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]

    @abc.abstractmethod
    def cost_model(self, space: SearchSpace, num_classes: int, *, cache_dir: str | None = None,
                   rebuild: bool = False, path: str | None = None, progress: bool = True,
                   log: Callable[[str], Any] = print, accept_untrusted: bool = False) -> CostModel:
        """The additive cost model of ``space`` on this hardware."""

    @abc.abstractmethod
    def measure_nets(self, space: SearchSpace, archs: Sequence[Arch], *, reference_ms: float | None = None,
                     **kw: Any) -> list[float]:
        """End-to-end cost of each architecture's static net (see :func:`nas.latency.measure.measure_archs`)."""

    @abc.abstractmethod
    def measure_modules(self, items: Mapping[str, tuple[Any, tuple[int, ...]]], *,
                        reference_ms: float | None = None, **kw: Any) -> dict[str, float]:
        """End-to-end cost of each whole module ``{name: (module, input_shape)}`` in :attr:`unit`
        (timed in groups in reference alternation, see :func:`nas.latency.measure.measure_modules`,
        or counted where exact). Timed results also carry ``"__reference__"``: the reference's median
        ms of the pass, to give later passes as ``reference_ms``."""


#: ``{name: class}`` of every registered hardware (filled as the classes' modules are imported).
REGISTRY: dict[str, Callable[..., Hardware]] = {}


def register_hardware(*names: str):
    """Class decorator: ``create_hardware(name)`` builds this class (like timm's ``register_model``)."""

    def deco(cls):
        for n in names:
            REGISTRY[n] = cls
        return cls

    return deco
