"""The latency table: measured block times on one device as an additive cost model, and its file format.

File format version 2 (JSON): ``entries`` maps :func:`~nas.latency.items.entry_key` to
``{median_ms, ratio, spread, count, ci, role, fields}``; ``fixed_parts`` names the entries of the
stem, the fixed first block and the head; ``overhead`` is the per-device calibration
(:mod:`nas.latency.overhead`). ``layers`` and ``fixed_ms`` are the resulting additive model (derived;
recomputed from the entries on load). The file also holds the space's name and fingerprint (a
table for another space is refused), the device fingerprint (a table from another device
configuration is loaded with a warning), the measurement method, and the ``validation`` summary
(:mod:`nas.latency.validate`), which every search copies into its report.

All times are "table milliseconds": a median ratio to a fixed reference block timed in
alternation, times the reference's median time in the pass that built the table (see
:mod:`nas.latency.devices`).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from nas.errors import UserError
from nas.io import atomic_write_text, json_default
from nas.latency.cost import CostModel
from nas.latency.items import entry_key, head_key
from nas.latency.overhead import arch_features
from supernets.arch import Arch
from supernets.space import SearchSpace

#: Version of the latency-table file format written by :meth:`LatencyTable.save`.
TABLE_VERSION = 2
TABLE_FORMAT = "hwnas-latency-table"


class LatencyTableWarning(UserWarning):
    """A latency table was measured on another device configuration than this machine's."""


_STRUCTURAL = ("version", "format", "space", "space_fingerprint", "entries", "fixed_parts", "overhead",
               "layers", "fixed_ms")


def _rebuild_cmd(space_name: str, device: str | None) -> str:
    return f"nas-lut space={space_name} hardware={device or '<device>'}"


class LatencyTable(CostModel):
    """Measured latency (ms) of every candidate on one device, as an additive cost model.

    Build one with :func:`build_latency_table` (or ``nas-lut``), or from entries with
    :meth:`from_entries`. ``entries`` holds the measured blocks (see the module docstring); the
    additive ``layer_costs`` / ``fixed`` follow from them and the ``overhead`` calibration.
    """

    kind = "latency"
    unit = "ms"
    measured = True

    def __init__(self, space, layer_costs, fixed, meta=None, entries=None, width_costs=None, head_delta=None):
        super().__init__(space, layer_costs, fixed, meta, width_costs, head_delta)
        self.entries: dict[str, dict[str, Any]] = dict(entries or {})

    @classmethod
    def from_entries(cls, space: SearchSpace, entries: Mapping[str, Mapping[str, Any]],
                     fixed_parts: Mapping[str, str], overhead: Mapping[str, Any] | None = None,
                     meta: Mapping[str, Any] | None = None) -> "LatencyTable":
        """The additive model from measured entries and an overhead calibration.

        A candidate costs ``scale * median_ms + per_block_ms``, ``zero`` costs 0, and the fixed
        part is ``scale * (stem + first + head) + offset_ms``.
        """
        ov = {"model": "none", "scale": 1.0, "per_block_ms": 0.0, "offset_ms": 0.0, **dict(overhead or {})}
        scale, per_block, offset = float(ov["scale"]), float(ov["per_block_ms"]), float(ov["offset_ms"])
        missing = [k for k in fixed_parts.values() if k not in entries]
        layer_costs: dict[str, list[float]] = {}
        for layer in space.layers:
            costs = []
            for op in layer.choices:
                spec = layer.spec(op)
                if spec is None:
                    costs.append(0.0)
                    continue
                key = entry_key(spec)
                if key not in entries:
                    missing.append(key)
                    costs.append(0.0)
                    continue
                costs.append(scale * float(entries[key]["median_ms"]) + per_block)
            layer_costs[layer.name] = costs
        width_costs, head_delta = None, None
        if space.has_widths:
            width_costs = {}
            for layer in space.layers:
                wc = {}
                for cin, cout in layer.width_pairs():
                    for op in layer.choices:
                        spec = layer.spec(op, cin, cout)
                        if spec is None:
                            continue
                        key = entry_key(spec)
                        if key not in entries:
                            missing.append(key)
                            continue
                        wc[(op, cin, cout)] = scale * float(entries[key]["median_ms"]) + per_block
                width_costs[layer.name] = wc
            num_classes = int((meta or {}).get("num_classes") or 0)
            widest = fixed_parts.get("head")
            head_delta = {}
            for w in space.stage_widths[-1]:
                key = head_key(space, w, num_classes) if num_classes else None
                if key is None or key not in entries or widest not in entries:
                    missing.append(key or f"head at width {w} (the table's meta lacks num_classes)")
                    continue
                head_delta[w] = scale * (float(entries[key]["median_ms"]) - float(entries[widest]["median_ms"]))
        if missing:
            raise UserError(f"latency table lacks {len(missing)} entries of space {space.name!r} (e.g. "
                            f"{missing[0]}); rebuild it with `{_rebuild_cmd(space.name, (meta or {}).get('device'))}`")
        fixed = scale * sum(float(entries[k]["median_ms"]) for k in fixed_parts.values()) + offset
        m = dict(meta or {})
        m.update(fixed_parts=dict(fixed_parts), overhead=ov, scale=scale, overhead_ms=offset,
                 per_block_ms=per_block)
        return cls(space, layer_costs, fixed, m, {k: dict(v) for k, v in entries.items()}, width_costs, head_delta)

    def with_overhead(self, overhead: Mapping[str, Any]) -> "LatencyTable":
        """The same entries under another overhead calibration."""
        meta = {k: v for k, v in self.meta.items() if k not in ("overhead", "scale", "overhead_ms", "per_block_ms")}
        return LatencyTable.from_entries(self.space, self.entries, self.meta["fixed_parts"], overhead, meta)

    def block_sum(self, arch: Arch) -> tuple[float, int]:
        """``(sum of the standalone ms of the net's parts, number of searchable blocks)``."""
        ms = {k: float(v["median_ms"]) for k, v in self.entries.items()}
        return arch_features(self.space, arch, ms, list(self.meta["fixed_parts"].values()))

    # ------------------------------------------------------------------ file format
    def to_dict(self) -> dict[str, Any]:
        meta = {k: v for k, v in self.meta.items() if k not in _STRUCTURAL}
        d: dict[str, Any] = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "space": self.space.name,
            "space_fingerprint": self.space.fingerprint,
            **meta,
        }
        if "fixed_parts" in self.meta:
            d["fixed_parts"] = self.meta["fixed_parts"]
        if "overhead" in self.meta:
            d["overhead"] = self.meta["overhead"]
        d.update(entries=self.entries, layers=self.layer_costs, fixed_ms=self.fixed)
        return d

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=False, default=json_default))

    @classmethod
    def load(cls, path: str | os.PathLike, space: SearchSpace, device_fingerprint: str | None = None,
             warn: Callable[[str], Any] | None = None) -> "LatencyTable":
        """Read a table for ``space``.

        Refuses (:class:`UserError` naming the ``nas-lut`` command to rebuild) a file that is not a
        table, has another format version, or was built for another space or another version of it
        (space fingerprint). Warns (``warn(message)``; default: a :class:`LatencyTableWarning`) when
        ``device_fingerprint`` differs from the table's.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read latency table {path}: {e}; rebuild it with "
                            f"`{_rebuild_cmd(space.name, None)}`") from None
        if not isinstance(d, dict):
            raise UserError(f"{path} is not a latency table; rebuild it with `{_rebuild_cmd(space.name, None)}`")
        device = d.get("device")
        cmd = _rebuild_cmd(space.name, device)
        if d.get("version") != TABLE_VERSION:
            raise UserError(f"latency table {path} has format version {d.get('version')}, this hwnas reads "
                            f"{TABLE_VERSION}; rebuild it with `{cmd}`")
        if d.get("space") != space.name or d.get("space_fingerprint") != space.fingerprint:
            raise UserError(
                f"latency table {path} was built for space {d.get('space')!r} (fingerprint "
                f"{d.get('space_fingerprint')}), not for {space.name!r} (fingerprint {space.fingerprint}); "
                f"rebuild it with `{cmd}` (or point lut.path at a table of this space)")
        if device_fingerprint and d.get("device_fingerprint") not in (None, device_fingerprint):
            msg = (f"latency table {path} was measured on another device configuration "
                   f"({d.get('device_fingerprint')}: {_describe_device(d.get('device_info'))}); this machine "
                   f"is {device_fingerprint}; its predictions are for that device. Rebuild with `{cmd}` to "
                   f"measure this one")
            if warn is None:
                warnings.warn(msg, LatencyTableWarning, stacklevel=2)
            else:
                warn(f"warning: {msg}")
        meta = {k: v for k, v in d.items() if k not in _STRUCTURAL}
        entries = d.get("entries") or {}
        if "fixed_parts" in d and "overhead" in d:
            return cls.from_entries(space, entries, d["fixed_parts"], d["overhead"], meta)
        try:
            return cls(space, d["layers"], d["fixed_ms"], meta, entries)
        except (KeyError, ValueError):
            raise UserError(f"latency table {path} does not cover space {space.name!r}; rebuild it with "
                            f"`{cmd}`") from None


def _describe_device(info: Any) -> str:
    if not isinstance(info, Mapping):
        return "unknown"
    keys = ("name", "processor", "threads", "batch_size", "dtype", "onnxruntime", "torch")
    return ", ".join(f"{k}={info[k]}" for k in keys if k in info)


