"""What the Hydra apps share: the config folder, turning config into objects, clean user errors."""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from nas.errors import UserError
from nas.latency.hardware import Hardware, create_hardware

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _gpus_per_node(accelerator: str, devices) -> int:
    """SLURM GPUs per node for a Lightning accelerator/devices pair (0 on CPU)."""
    if str(accelerator).lower() in ("gpu", "cuda"):
        return int(devices) if str(devices).isdigit() else 1
    return 0


OmegaConf.register_new_resolver("hwnas_gpus", _gpus_per_node, replace=True)

#: Values of the ``progress`` option of every app.
PROGRESS_KINDS = ("rich", "tqdm", "none")


# ---------------------------------------------------------------------------------------- quiet output
class _DropLightningTips(logging.Filter):
    """Lightning advertises its cloud products ("💡 Tip: ... litlogger / litmodels") on every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def _quiet_third_party() -> None:
    # torch deprecated LeafSpec; Lightning's _pytree still builds one on every fit (FutureWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())


_quiet_third_party()


def _cause_user_error(exc: BaseException) -> UserError | None:
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _config_value_error(exc: BaseException) -> UserError | None:
    """A config value the user left out (``???``) or pointed at nothing (a broken ``${...}``)."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    while exc is not None:
        key = getattr(exc, "full_key", None) or ""
        if isinstance(exc, MissingMandatoryValue):
            return UserError(f"{key or 'a config value'} has no value; set it on the command line, "
                             f"e.g. `{key or '<key>'}=...`")
        if isinstance(exc, InterpolationResolutionError):
            msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
            return UserError(f"{key}: {msg}" if key else f"config interpolation ${{...}}: {msg}")
        exc = exc.__cause__ or exc.__context__
    return None


def user_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Print a user's mistake as one clear message and exit 2 (no traceback from deep inside).

    A user's mistake is a :class:`UserError` anywhere in the exception's chain, or a config value
    left at ``???`` / an interpolation that does not resolve.
    """

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        except Exception as e:  # noqa: BLE001
            ue = _cause_user_error(e) or _config_value_error(e)
            if ue is None:
                raise
            sys.stdout.flush()
            print(f"error: {ue}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def _is_command_line_error(exc: BaseException | None) -> bool:
    """Hydra's own report of a mistake on the command line (``space=nope``, an unknown key, a
    malformed override): raised while composing the config, before any job ran."""
    from hydra.errors import (
        ConfigCompositionException,
        OverrideParseException,
        SearchPathException,
    )

    return isinstance(exc, (ConfigCompositionException, OverrideParseException, SearchPathException))


#: Keys of earlier versions: ``{old key: what to write instead}``.
RENAMED_KEYS = {
    "strategy.latency_target": "strategy.targets=[{value}]",
    "strategy.budgets": "strategy.targets={value}",
    "search.budgets": "search.targets=[{value}]",
}


def renamed_key_error(args: list[str]) -> str | None:
    """The one-line message for a command-line override of a renamed key (None when there is none)."""
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if key in RENAMED_KEYS:
            value = value if sep and value else "..."
            return (f"{key} was renamed: every strategy takes its latency targets as a list, "
                    f"`{RENAMED_KEYS[key].format(value=value.strip('[]'))}`")
    return None


def hydra_entry(app: Callable[..., Any]) -> Callable[..., Any]:
    """The console entry point around a ``@hydra.main`` function.

    Hydra prints a command-line mistake it finds itself (an unknown config option, listing the
    available ones; an unknown key) without a traceback, but exits 1; such mistakes exit 2 here,
    like every :class:`UserError`. A crash inside a job keeps Hydra's exit code 1. Called with a
    config (``main(cfg)``), it runs the app on that config as ``@hydra.main`` functions do.
    """

    @functools.wraps(app)
    def main(cfg_passthrough: DictConfig | None = None):
        if cfg_passthrough is not None:
            return app(cfg_passthrough)
        renamed = renamed_key_error(sys.argv[1:])
        if renamed:
            print(f"error: {renamed}", file=sys.stderr)
            sys.exit(2)
        try:
            return app()
        except SystemExit as e:
            # Hydra's run_and_report calls sys.exit(1) inside its `except`: the cause is the context
            if e.code == 1 and _is_command_line_error(e.__context__):
                sys.exit(2)
            raise

    return main


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


def make_device(cfg_hw) -> Hardware:
    """The ``hardware=`` option as an object: made from its ``_target_`` (a config without one, e.g.
    ``{name: cpu, threads: 1}``, is built by name)."""
    hw = OmegaConf.to_container(cfg_hw, resolve=True)
    if "_target_" in hw:
        return instantiate(hw)
    return create_hardware(**hw)


def make_cost_model(cfg, space, device: Hardware, num_classes: int, log=print):
    """The cost model of ``space`` on ``device``: its latency table (``lut.path``, or cached and built
    when missing) or, for ``hardware=flops|params``, the exact count."""
    lut = cfg.lut
    return device.cost_model(space, num_classes, cache_dir=lut.get("cache_dir"), rebuild=bool(lut.get("rebuild")),
                             path=lut.get("path"), progress=cfg.get("progress", "rich") != "none", log=log,
                             accept_untrusted=bool(lut.get("accept_untrusted", False)))


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


def check_progress(kind: Any) -> str:
    if kind not in PROGRESS_KINDS:
        raise UserError(f"progress={kind!r} unknown; choose one of: {', '.join(PROGRESS_KINDS)}")
    return str(kind)


def check_epochs(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r}: the number of epochs is a whole number >= 1, e.g. {key}=10")
    return value


def _metrics_without_version(metrics: dict) -> dict:
    metrics.pop("v_num", None)  # the logger's version number, not a metric
    return metrics


def _progress_bar_class(kind: str):
    """Lightning's progress bar for ``kind`` without the ``v_num: 0.000`` entry (built on first use,
    so that importing this module does not import Lightning)."""
    name = {"rich": "QuietRichProgressBar", "tqdm": "QuietTQDMProgressBar"}[kind]
    cls = globals().get(name)
    if cls is None:
        from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

        base = RichProgressBar if kind == "rich" else TQDMProgressBar
        cls = type(name, (base,), {
            "get_metrics": lambda self, trainer, pl_module: _metrics_without_version(
                base.get_metrics(self, trainer, pl_module)),
            "__module__": __name__,
            "__doc__": f"{base.__name__} without the logger's version number.",
        })
        globals()[name] = cls
    return cls


def __getattr__(name: str):  # unpickling a progress bar (e.g. ddp_spawn) finds its class here
    kinds = {"QuietRichProgressBar": "rich", "QuietTQDMProgressBar": "tqdm"}
    if name in kinds:
        return _progress_bar_class(kinds[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def progress_callbacks(kind: str) -> list:
    kind = check_progress(kind)
    if kind == "rich":
        return [_progress_bar_class("rich")(leave=True)]
    if kind == "tqdm":
        return [_progress_bar_class("tqdm")()]
    return []


def trainer_kwargs(cfg) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kw["enable_progress_bar"] = check_progress(cfg.get("progress", "rich")) != "none"
    return kw
