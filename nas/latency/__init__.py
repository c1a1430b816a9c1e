"""Latency: devices, measured tables and analytic counts behind one interface (:class:`Hardware`).

``create_hardware(name, **options)`` builds any registered hardware by name (``cpu``, ``onnxruntime``,
``cuda``, ``flops``, ``params``); the apps instantiate ``conf/hardware/*.yaml`` by ``_target_``.
"""
from __future__ import annotations

from typing import Any

from nas.errors import UserError
from nas.latency import analytic, devices  # noqa: F401  (registers the built-in hardware)
from nas.latency.hardware import REGISTRY, Hardware, register_hardware

__all__ = ["Hardware", "create_hardware", "hardware_names", "register_hardware"]


def hardware_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def create_hardware(name: str, **kwargs: Any) -> Hardware:
    """Build the hardware called ``name`` with the given options (a :class:`UserError` for an unknown name)."""
    cls = REGISTRY.get(str(name))
    if cls is None:
        raise UserError(f"unknown hardware '{name}'; choose one of: {', '.join(REGISTRY)} (conf/hardware/)")
    return cls(name=str(name), **kwargs)
