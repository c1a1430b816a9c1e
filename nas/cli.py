"""What the Hydra apps share: the config folder, turning config into objects, clean user errors."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _cause_user_error(exc: BaseException) -> UserError | None:
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def user_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Print a user's mistake as one clear message and exit 2 (no traceback from deep inside)."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        except Exception as e:  # noqa: BLE001
            ue = _cause_user_error(e)
            if ue is None:
                raise
            print(f"error: {ue}", file=sys.stderr)
            sys.stdout.flush()
            sys.exit(2)

    return wrapper


def instantiate(cfg, *args, **kwargs):
    """``hydra.utils.instantiate`` that lets a :class:`UserError` from the constructor through."""
    from hydra.utils import instantiate as _inst

    try:
        return _inst(cfg, *args, **kwargs)
    except Exception as e:  # noqa: BLE001
        ue = _cause_user_error(e)
        if ue is not None:
            raise ue from None
        raise


def make_space(cfg_space):
    from supernets.space import SearchSpace, SpaceError

    try:
        return SearchSpace.from_dict(OmegaConf.to_container(cfg_space, resolve=True))
    except SpaceError as e:
        raise UserError(f"space: {e}") from None


def make_device(cfg_hw):
    """A timed device (``cpu``, ``onnxruntime``, ``cuda``) or an analytic one (``flops``, ``params``)."""
    from .cost import ANALYTIC_NAMES, AnalyticDevice
    from .devices import DEVICE_NAMES, build_device

    hw = OmegaConf.to_container(cfg_hw, resolve=True)
    name = hw.get("name")
    if name in ANALYTIC_NAMES:
        return AnalyticDevice(**hw)
    if name not in DEVICE_NAMES:
        raise UserError(f"unknown hardware '{name}'; choose one of: {', '.join((*DEVICE_NAMES, *ANALYTIC_NAMES))} "
                        f"(conf/hardware/)")
    return build_device(**hw)


def make_cost_model(cfg, space, device, num_classes: int, log=print):
    """The device's latency table (cached, built when missing; or ``lut.path``), or for
    ``hardware=flops|params`` the analytic model."""
    from .cost import AnalyticDevice, LatencyTable, load_or_build_table

    if isinstance(device, AnalyticDevice):
        if cfg.lut.get("path"):
            log(f"note: hardware={device.name} is analytic; lut.path={cfg.lut.path} is not used")
        return device.cost_model(space, num_classes)
    if cfg.lut.get("path"):
        path = Path(cfg.lut.path).expanduser()
        if not path.exists():
            raise UserError(f"lut.path={path} does not exist; build a table with `nas-lut space={space.name} "
                            f"hardware={device.name}` or drop lut.path to use the cache")
        return LatencyTable.load(path, space, device.fingerprint_id(), warn=log)
    return load_or_build_table(space, device, num_classes, cfg.lut.cache_dir, rebuild=bool(cfg.lut.rebuild),
                               progress=cfg.get("progress", "rich") != "none", log=log)


def make_logger(cfg_logger):
    if cfg_logger is None or "_target_" not in cfg_logger:
        return False
    if "wandb" in str(cfg_logger._target_).lower():
        # keep every W&B file inside the run directory
        save_dir = str(cfg_logger.save_dir)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CACHE_DIR", "wandb-cache")):
            os.environ.setdefault(var, os.path.join(save_dir, sub))
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    return instantiate(cfg_logger)


def progress_callbacks(kind: str) -> list:
    if kind == "rich":
        from pytorch_lightning.callbacks import RichProgressBar

        return [RichProgressBar(leave=True)]
    return []


def trainer_kwargs(cfg) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kw["enable_progress_bar"] = cfg.get("progress", "rich") != "none"
    return kw
