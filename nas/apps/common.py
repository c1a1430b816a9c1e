"""What the Hydra apps share: the config folder, turning config into objects, clean user errors."""
from __future__ import annotations

import difflib
import errno
import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import (
    ConfigCompositionException,
    OverrideParseException,
    SearchPathException,
)
from hydra.utils import instantiate as _inst
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from nas.console import PROGRESS_KINDS, resolve_progress, run_log
from nas.errors import UserError
from nas.latency import Hardware, create_hardware
from supernets.space import SearchSpace, SpaceError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _gpus_per_node(accelerator: str, devices) -> int:
    """SLURM GPUs per node for a Lightning accelerator/devices pair (0 on CPU)."""
    if str(accelerator).lower() in ("gpu", "cuda"):
        return int(devices) if str(devices).isdigit() else 1
    return 0


OmegaConf.register_new_resolver("hwnas_gpus", _gpus_per_node, replace=True)



# ---------------------------------------------------------------------------------------- quiet output
#: Lightning's INFO lines that say nothing a user of these apps needs: its cloud products
#: ("💡 Tip: ... litlogger / litmodels"), the accelerators of this machine on every fit, the end of fit.
_LIGHTNING_NOISE = ("💡 Tip", "GPU available:", "TPU available:", "HPU available:", "IPU available:",
                    "`Trainer.fit` stopped:")


class _DropLightningTips(logging.Filter):
    """Drops :data:`_LIGHTNING_NOISE` lines (the summary of the run says what matters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _LIGHTNING_NOISE)


def _quiet_third_party() -> None:
    # torch deprecated LeafSpec; Lightning's _pytree still builds one on every fit (FutureWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # small data sets have fewer batches than log_every_n_steps: the epoch's metrics are logged anyway
    warnings.filterwarnings("ignore", message=r".*log_every_n_steps.*")
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


#: OSError numbers that are the user's environment, not a bug: a read-only or full disk, no permission.
_ENV_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def environment_error(exc: BaseException) -> UserError | None:
    """A file that could not be written or read for a reason of the user's environment (read-only
    file system, permissions, a full disk), as one line naming the file (None for any other error)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _ENV_ERRNOS:
            where = exc.filename or "a file"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return UserError(f"cannot write {where}: {exc.strerror}; free some space and run again")
            return UserError(f"cannot use {where}: {exc.strerror}; check its permissions, or write the run "
                             f"folders elsewhere with HWNAS_OUTPUTS=<folder> (or hydra.run.dir=<folder>)")
        exc = exc.__cause__ or exc.__context__
    return None


def user_errors(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Print a user's mistake as one clear message and exit 2 (no traceback from deep inside).

    A user's mistake is a :class:`UserError` anywhere in the exception's chain, a config value left
    at ``???`` / an interpolation that does not resolve, or a file the environment does not let us
    write (:func:`environment_error`). Ctrl-C outside training (which Lightning handles itself)
    prints one line and exits 130, as a shell does.
    """

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        except KeyboardInterrupt as e:
            sys.stdout.flush()
            print(f"interrupted (Ctrl-C){' ' + str(e) if str(e) else ''}", file=sys.stderr)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001
            ue = _cause_user_error(e) or _config_value_error(e) or environment_error(e)
            if ue is None:
                raise
            sys.stdout.flush()
            print(f"error: {ue}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def _is_command_line_error(exc: BaseException | None) -> bool:
    """Hydra's own report of a mistake on the command line (``space=nope``, an unknown key, a
    malformed override): raised while composing the config, before any job ran."""
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


def _config_groups() -> set[str]:
    """The config groups of ``conf/`` (``space``, ``strategy``, ..., ``hydra/launcher``)."""
    root = Path(CONF_DIR)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a config as a dotted path, inner nodes included (values are not resolved)."""
    if not isinstance(node, DictConfig):
        return []
    out = []
    for k in node.keys():
        key = f"{prefix}{k}"
        out.append(key)
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            out += _dotted_keys(child, key + ".")
    return out


def _unknown_key(cfg: DictConfig, key: str) -> bool:
    """True when ``key`` names nothing in ``cfg`` and its nearest existing parent is a mapping (which
    Hydra would refuse to extend without ``+``)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or node._is_none() or node._is_interpolation():
            return False  # under a value, a null or an interpolation: let Hydra decide
        if part not in list(node.keys()):  # (`in` is False for a key whose value is ???)
            return True
        node = node._get_node(part)
    return False


def _suggestion(key: str, value: str | None, keys: list[str], all_keys: list[str]) -> str:
    """``did you mean ...?``: the closest of the config's keys or the renamed keys (in their new
    spelling, with ``value`` where it is one value), by difflib's ratio; or the keys beside it."""
    candidates = {k: f"`{k}`" for k in keys if not k.startswith("hydra") and not k.rpartition(".")[2].startswith("_")}
    for old, new in RENAMED_KEYS.items():
        spelled = new.format(value=value.strip("[]")) if value else new.partition("=")[0]
        candidates.setdefault(old, f"`{spelled}`")
    def leaf(k: str) -> str:
        return k.rpartition(".")[2]

    # the whole path decides, but the last part must look alike too (not just a shared `strategy.`)
    scores = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in candidates
                     if difflib.SequenceMatcher(None, leaf(key), leaf(k)).ratio() >= 0.6), reverse=True)
    best = [k for r, k in scores if r >= 0.6 and r >= scores[0][0] - 0.02] if scores else []
    if best:
        return "did you mean " + " or ".join(dict.fromkeys(candidates[k] for k in best[:2])) + "?"
    parent = key.rpartition(".")[0]
    siblings = sorted(leaf(k) for k in all_keys if k.rpartition(".")[0] == parent and not leaf(k).startswith("_"))
    return f"the keys {'under ' + parent if parent else 'at the top level'} are: {', '.join(siblings)}" if siblings else ""


def _compose(config_name: str, overrides: list[str], hydra_cfg: bool = False) -> DictConfig | None:
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=hydra_cfg)
    except Exception:  # noqa: BLE001 - Hydra reports what it refuses itself
        return None


def _first_writable_problem(folder: Path) -> str | None:
    """Why the run folder ``folder`` cannot be created or written (None when it can)."""
    p = folder
    while not p.exists():
        if p.parent == p:
            return None
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        read_only = os.statvfs(p).f_flag & os.ST_RDONLY
    except OSError:
        read_only = False
    if read_only:
        return f"{p} is on a read-only file system"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def command_line_error(config_name: str, argv: list[str]) -> str | None:
    """The one-line message for a mistake on the command line that Hydra would report badly, or None.

    * a key the composed config does not have (``strategy.latency_targte=0.5``): Hydra's tip is to
      add it with ``+``; here the close matches among the config's keys are named (difflib), and a
      renamed key's new spelling;
    * a run folder that cannot be created (a read-only file system, no permission), which Hydra
      reports with a traceback from its own ``mkdir``.

    The config is composed once with Hydra's compose API (about as long as Hydra's own composition);
    anything else Hydra refuses (an unknown option of a group, a malformed override) is left to it.
    """
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.experimental_rerun:
        return None
    if args.config_dir or args.config_path or any(o.lstrip("+~").startswith("hydra.searchpath") for o in args.overrides):
        return None  # configs of the user's own beside ours: Hydra knows their keys, we do not
    config_name = args.config_name or config_name
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001 - a malformed override: Hydra's message names it
        return None
    groups = _config_groups()
    is_group = [o.key_or_group in groups or "/" in o.key_or_group for o in overrides]
    if any(g and o.is_sweep_override() for o, g in zip(overrides, is_group)):
        return None  # the keys differ between the options swept
    plain = [o for o, g in zip(overrides, is_group) if not g and o.type == OverrideType.CHANGE and o.package is None
             and not o.key_or_group.startswith("hydra.")]
    structural = [o.input_line for o in overrides if o not in plain and not o.is_sweep_override()]
    full = _compose(config_name, [*structural, *(o.input_line for o in plain if not o.is_sweep_override())],
                    hydra_cfg=True)
    cfg = full if full is not None else _compose(config_name, structural)
    if cfg is None:
        return None
    all_keys = [k for k in _dotted_keys(cfg) if not k.startswith("hydra")]
    keys = [k for k in all_keys if not isinstance(OmegaConf.select(cfg, k, throw_on_resolution_failure=False),
                                                             DictConfig)]
    for o in plain:
        key = o.key_or_group
        if _unknown_key(cfg, key):
            value = None if o.is_sweep_override() else o.input_line.partition("=")[2]
            hint = _suggestion(key, value, keys, all_keys)
            return (f"{key} is not a key of the {config_name} config" + (f"; {hint}" if hint else "")
                    + f" (to add a new key on purpose, write +{o.input_line})")
    if full is not None:
        try:
            folder = Path(str(full.hydra.sweep.dir if args.multirun else full.hydra.run.dir))
        except Exception:  # noqa: BLE001 - a folder that only resolves inside a job: not checked here
            return None
        problem = _first_writable_problem(folder)
        if problem:
            return (f"cannot create the run folder {folder}: {problem}; run from a folder you can write to, or "
                    f"point the run folders elsewhere with HWNAS_OUTPUTS=<folder> (or hydra.run.dir=<folder>)")
    return None


def hydra_entry(app: Callable[..., Any], config_name: str | None = None) -> Callable[..., Any]:
    """The console entry point around a ``@hydra.main`` function.

    Before Hydra runs: a renamed key (:data:`RENAMED_KEYS`), a misspelled key and an unwritable run
    folder (:func:`command_line_error`, with ``config_name``) stop with one line and exit 2.
    Hydra prints a command-line mistake it finds itself (an unknown config option, listing the
    available ones) without a traceback, but exits 1; such mistakes exit 2 here, like every
    :class:`UserError`. A crash inside a job keeps Hydra's exit code 1. Called with a config
    (``main(cfg)``), it runs the app on that config as ``@hydra.main`` functions do.
    """

    @functools.wraps(app)
    def main(cfg_passthrough: DictConfig | None = None):
        if cfg_passthrough is not None:
            return app(cfg_passthrough)
        problem = renamed_key_error(sys.argv[1:])
        if problem is None and config_name:
            problem = command_line_error(config_name, sys.argv[1:])
        if problem:
            print(f"error: {problem}", file=sys.stderr)
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
    try:
        return _inst(cfg, *args, **kwargs)
    except Exception as e:  # noqa: BLE001
        ue = _cause_user_error(e)
        if ue is not None:
            raise ue from None
        raise


def make_space(cfg_space):
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
                             path=lut.get("path"), progress=cfg.get("progress", "auto") != "none", log=log,
                             accept_untrusted=bool(lut.get("accept_untrusted", False)))


def make_logger(cfg_logger):
    if cfg_logger is None or "_target_" not in cfg_logger:
        return False
    if "wandb" in str(cfg_logger._target_).lower():
        # keep every W&B file inside the run directory, and its console lines out of the user's output
        os.environ.setdefault("WANDB_SILENT", "true")
        save_dir = str(cfg_logger.save_dir)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CACHE_DIR", "wandb-cache")):
            os.environ.setdefault(var, os.path.join(save_dir, sub))
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = instantiate(cfg_logger)
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", False) is None:
        # Lightning passes anonymous=None, and W&B warns that the setting "has no effect" (before its
        # silent mode applies): leave the key out, as W&B asks
        del init["anonymous"]
    return logger


def check_progress(kind: Any) -> str:
    if kind not in PROGRESS_KINDS:
        raise UserError(f"progress={kind!r} unknown; choose one of: {', '.join(PROGRESS_KINDS)} (auto: a bar on "
                        f"a terminal, plain lines in a pipe or a log)")
    return str(kind)


def check_epochs(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key}={value!r}: the number of epochs is a whole number >= 1, e.g. {key}=10")
    return value


#: ``trainer.precision`` values the apps accept (Lightning's names): fp32; bfloat16 autocast (CPU and
#: GPU, no loss scaling); float16 autocast with a gradient scaler (CUDA GPUs only).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def uses_cuda(accelerator: Any) -> bool:
    """Whether a Lightning ``accelerator`` setting trains on a CUDA GPU on this machine."""
    a = str(accelerator).lower()
    return a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available())


def check_precision(precision: Any, accelerator: Any) -> str:
    """``trainer.precision`` as Lightning's name, refused with one line where it cannot run: an unknown
    value, ``16-mixed`` without a CUDA GPU (Lightning would silently switch to bf16), ``bf16-mixed`` on
    a GPU without bfloat16 support."""
    value = "32-true" if str(precision) in ("32", "32-true") else str(precision)
    if value not in PRECISIONS:
        raise UserError(f"trainer.precision={precision!r} is unknown; choose one of: {', '.join(PRECISIONS)} "
                        f"(bf16-mixed on CPU or GPU, 16-mixed on a CUDA GPU)")
    cuda = uses_cuda(accelerator)
    if value == "16-mixed" and not cuda:
        raise UserError(f"trainer.precision=16-mixed needs a CUDA GPU (trainer.accelerator={accelerator}); "
                        f"on CPU use trainer.precision=bf16-mixed")
    if value == "bf16-mixed" and cuda and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError(f"trainer.precision=bf16-mixed: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 "
                        f"support; use trainer.precision=16-mixed")
    return value


def trainer_kwargs(cfg) -> dict[str, Any]:
    """``cfg.trainer`` as ``pl.Trainer`` arguments (hwnas's own keys, such as ``channels_last``, left out:
    :func:`trainer_callbacks` turns them into callbacks)."""
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kw.pop("channels_last", None)
    kw["precision"] = check_precision(kw.get("precision", "32-true"), kw.get("accelerator", "auto"))
    kw["enable_progress_bar"] = resolve_progress(check_progress(cfg.get("progress", "auto"))) != "none"
    return kw


def check_channels_last(value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"trainer.channels_last={value!r}: true (train in NHWC memory format, faster on CPUs with "
                        f"oneDNN and on GPUs) or false")
    return value


def trainer_callbacks(cfg) -> list:
    """The callbacks ``cfg.trainer``'s own keys ask for (``channels_last``)."""
    from nas.training import ChannelsLast

    return [ChannelsLast()] if check_channels_last(cfg.trainer.get("channels_last", False)) else []


def training_record(cfg) -> dict[str, Any]:
    """How a run trained (for its report): accelerator, devices, precision, data-loader workers."""
    t = cfg.trainer
    return {"accelerator": str(t.get("accelerator", "auto")), "devices": t.get("devices"),
            "precision": check_precision(t.get("precision", "32-true"), t.get("accelerator", "auto")),
            "channels_last": check_channels_last(t.get("channels_last", False)),
            "num_workers": int(cfg.data.get("num_workers", 0) or 0),
            "pin_memory": uses_cuda(t.get("accelerator", "auto"))}


def make_datamodule(cfg):
    """The ``data=`` option as an object, its loaders pinning host memory when the trainer
    (``trainer.accelerator``) uses a CUDA GPU, and only then."""
    datamodule = instantiate(cfg.data)
    datamodule.pin_memory = uses_cuda(cfg.get("trainer", {}).get("accelerator", "cpu"))
    return datamodule


def logged_run(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run ``fn(cfg)`` with everything it prints (and a user error's message) also appended to the run
    folder's log, ``<run folder>/<app>.log`` (Hydra's job log: it holds Hydra's INFO lines too).
    Outside a Hydra run (a test calling the app's function) it just runs ``fn``."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            hc = HydraConfig.get()
            path = Path(hc.runtime.output_dir) / f"{hc.job.name}.log"
        except ValueError:  # HydraConfig was not set: not inside a Hydra run
            return fn(cfg)
        with run_log(path):
            return fn(cfg)

    return wrapper


def console_main(run: Callable[[DictConfig], Any], config_name: str) -> Callable[..., Any]:
    """The console entry point of an app: ``run(cfg)`` as a Hydra app on ``conf/<config_name>.yaml``,
    its output also in the run folder's log (:func:`logged_run`), a user's mistake as one line
    (:func:`user_errors`), command-line mistakes checked first (:func:`hydra_entry`)."""

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    @logged_run
    @user_errors
    @functools.wraps(run)
    def _hydra_main(cfg: DictConfig) -> Any:
        return run(cfg)

    return hydra_entry(_hydra_main, config_name=config_name)
