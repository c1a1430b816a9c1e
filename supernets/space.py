"""Search spaces: what a supernet can become.

A space is plain data (``conf/space/<name>.yaml``): a stem, one fixed first block, stages of
searchable layers, and a head. Each searchable layer is one *decision* whose choices are MBConv
candidates plus ``zero`` (skip the layer) where the layer keeps its shape.

Op grammar: ``k{kernel}_e{expand}[_se][_{act}]``: ``k5_e6`` (MobileNetV2 style), ``k3_e4_se`` (with
squeeze-excite, ratio 0.25 of the block's input channels as timm's ``_se0.25``), ``k5_e6_se_hs`` (and
hard-swish instead of the stage's activation). ``act`` is one of timm's block activation codes
(:data:`ACT_CODES`: ``re`` relu, ``r6`` relu6, ``hs`` hard_swish, ``sw`` swish, ``mi`` mish). An op
without an activation code runs the activation of its stage (a stage's ``act``, else the space's
``act``, which also serves the stem, the fixed first block and the head). A stage may list its own
``ops`` (MobileNetV3: no SE and ReLU early, SE and h-swish late); the space's ``ops`` serve the rest.
A space that uses none of this has exactly the decisions, fingerprint and block keys it had before.

Widths (optional): ``widths: [0.5, 0.75, 1.0]`` (multipliers of every stage's ``channels``, rounded
to multiples of ``width_divisor``, 8 by default) or a stage's own ``widths: [16, 24]`` (channel
counts) make the output channels of a stage one more decision, ``s{i}.width`` with choices
``c{channels}``. One decision per stage, not per layer: the residual adds inside a stage tie the
output channels of all its layers (coupled channels), so every choice is a valid network. A space
without widths has exactly the decisions (and fingerprint) it had before widths existed.

The space knows the shape of every layer, so it can describe each candidate as a timm block string
(``ir_r1_k5_s2_e6_c24``), enumerate decisions, sample architectures and fingerprint itself.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import yaml

from .arch import Arch, ArchError

ZERO = "zero"
_OP_RE = re.compile(r"^k(\d+)_e(\d+)(_se)?(?:_([a-z0-9]+))?$")
#: timm's block activation codes (the ``n`` token of a block string) and the activations they name
ACT_CODES = {"re": "relu", "r6": "relu6", "hs": "hard_swish", "sw": "swish", "mi": "mish"}
ACT_NAMES = {v: k for k, v in ACT_CODES.items()}
#: squeeze-excite ratio of an op with ``_se`` (of the block's input channels, timm's ``_se0.25``)
SE_RATIO = 0.25
#: the activation a :class:`BlockSpec` runs unless told otherwise (every space before per-op
#: activations used it; block keys name the activation only when it differs)
DEFAULT_ACT = "relu6"
_WIDTH_RE = re.compile(r"^c(\d+)$")
WIDTH_SUFFIX = ".width"


def width_decision(stage: int) -> str:
    """Name of the width decision of stage ``stage`` (1-based): ``s2.width``."""
    return f"s{stage}{WIDTH_SUFFIX}"


def width_choice(chs: int) -> str:
    """A width choice as written in an Arch: ``c24`` (as the ``c`` of a timm block string)."""
    return f"c{int(chs)}"


def parse_width(choice: str) -> int:
    m = _WIDTH_RE.match(str(choice))
    if not m:
        raise SpaceError(f"width choice {choice!r} is not of the form c<channels> (e.g. c24)")
    return int(m.group(1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor`` (at least ``divisor``), never more than 10 % below
    ``v`` (the rule of timm / MobileNet for width multipliers)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


class SpaceError(ValueError):
    """The space description itself is malformed."""


@dataclass(frozen=True)
class OpSpec:
    """An op choice spelled out: ``k5_e6_se_hs`` -> kernel 5, expand 6, SE on, hard_swish."""

    kernel: int
    expand: int
    se: bool = False
    act: str | None = None  # None: the stage's activation


def parse_candidate(op: str) -> OpSpec:
    """``"k5_e6_se_hs"`` -> ``OpSpec(5, 6, True, "hard_swish")`` (see the module docstring)."""
    m = _OP_RE.match(str(op))
    if not m or (m.group(4) is not None and m.group(4) not in ACT_CODES):
        raise SpaceError(f"op {op!r} is not of the form k<kernel>_e<expand>[_se][_<act>] with act one of "
                         f"{', '.join(ACT_CODES)} (e.g. k3_e6, k5_e4_se, k5_e6_se_hs) or 'zero'")
    act = ACT_CODES[m.group(4)] if m.group(4) else None
    return OpSpec(int(m.group(1)), int(m.group(2)), bool(m.group(3)), act)


def parse_op(op: str) -> tuple[int, int]:
    """``"k5_e6"`` (or ``"k5_e6_se_hs"``) -> ``(5, 6)``: kernel and expand."""
    c = parse_candidate(op)
    return c.kernel, c.expand


def op_size(op: str) -> tuple[int, int, int]:
    """Order of ops by size: expand x kernel area, then SE, then a costlier activation than ReLU
    (used for the largest / smallest architecture)."""
    c = parse_candidate(op)
    return c.expand * c.kernel ** 2, int(c.se), int(c.act not in (None, "relu", "relu6"))


def conv_out(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded conv with this stride (timm's symmetric padding)."""
    return (size + stride - 1) // stride


@dataclass(frozen=True)
class BlockSpec:
    """One concrete block at its place in the network: everything that changes its cost."""

    type: str  # "ir" (MBConv) or "ds" (depthwise separable, the fixed first block)
    in_chs: int
    out_chs: int
    kernel: int
    expand: int
    stride: int
    in_size: int  # input height == width
    se: float = 0.0  # squeeze-excite ratio of the input channels (0: none)
    act: str = DEFAULT_ACT  # the block's activation

    @property
    def skip(self) -> bool:
        return self.stride == 1 and self.in_chs == self.out_chs

    @property
    def out_size(self) -> int:
        return conv_out(self.in_size, self.stride)

    def timm_str(self, net_act: str | None = None) -> str:
        """The block as a timm arch-def string (decoded by ``decode_arch_def``): ``_se0.25`` with SE,
        ``_nhs`` (the activation's code) when the block's activation differs from ``net_act``, the
        activation the net is built with (``None``: no code; the builder sets it)."""
        if self.type == "ds":
            out = f"ds_r1_k{self.kernel}_s{self.stride}_c{self.out_chs}"
        else:
            out = f"ir_r1_k{self.kernel}_s{self.stride}_e{self.expand}_c{self.out_chs}"
        if self.se:
            out += f"_se{self.se:g}"
        if net_act is not None and self.act != net_act:
            out += f"_n{ACT_NAMES[self.act]}"
        return out

    def key(self) -> str:
        """A key naming every field that changes the block's cost (used by latency tables)."""
        return (
            f"{self.type}:in{self.in_size}x{self.in_size}x{self.in_chs}:out{self.out_chs}"
            f":k{self.kernel}:e{self.expand}:s{self.stride}:skip{int(self.skip)}"
        )


@dataclass(frozen=True)
class Layer:
    """A searchable layer: its position, shape and candidate ops."""

    name: str  # decision name, e.g. "s2.l1"
    stage: int  # index in the supernet's ``blocks`` (0 is the fixed first block)
    index: int  # layer index inside the stage
    in_chs: int
    out_chs: int
    stride: int
    in_size: int
    choices: tuple[str, ...]
    act: str = DEFAULT_ACT  # the stage's activation (ops without an activation code run it)
    # width candidates of the input and output channels (empty: fixed at in_chs / out_chs, which are
    # then the widest); in_chs / out_chs are always the largest
    widths_in: tuple[int, ...] = ()
    widths_out: tuple[int, ...] = ()

    def spec(self, op: str, in_chs: int | None = None, out_chs: int | None = None) -> BlockSpec | None:
        """The block for candidate ``op`` (``None`` for ``zero``) at the given widths (default: widest)."""
        if op == ZERO:
            return None
        c = parse_candidate(op)
        return BlockSpec("ir", int(in_chs or self.in_chs), int(out_chs or self.out_chs), c.kernel, c.expand,
                         self.stride, self.in_size, SE_RATIO if c.se else 0.0, c.act or self.act)

    def width_pairs(self) -> list[tuple[int, int]]:
        """Every (input, output) channel pair this layer can run at."""
        return [(i, o) for i in (self.widths_in or (self.in_chs,)) for o in (self.widths_out or (self.out_chs,))]


@dataclass(frozen=True)
class SearchSpace:
    name: str
    resolution: int
    stem_chs: int
    first: BlockSpec
    layers: tuple[Layer, ...]
    stage_layers: tuple[int, ...]  # number of searchable layers per stage (stages 1..N)
    head_chs: int
    act: str = "relu6"
    in_chans: int = 3
    ops: tuple[str, ...] = ()
    spec_dict: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    stage_widths: tuple[tuple[int, ...], ...] = ()  # per stage, ascending; () = no width decisions

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchSpace":
        """Build from the YAML structure of ``conf/space/*.yaml`` (see ``mbv2_tiny.yaml``)."""
        d = dict(d)
        try:
            name = str(d["name"])
            res = int(d["resolution"])
            stem = dict(d["stem"])
            first = dict(d.get("first", {"channels": stem["channels"], "kernel": 3}))
            stages = [dict(s) for s in d["stages"]]
            if "ops" not in d and not (stages and all("ops" in st for st in stages)):
                raise KeyError("ops")  # required unless every stage lists its own
            ops = tuple(str(o) for o in d.get("ops", ()))
            head_chs = int(d["head"]["channels"])
        except KeyError as e:
            raise SpaceError(f"space description lacks the key {e}; see conf/space/mbv2_tiny.yaml") from None
        allow_zero = bool(d.get("zero", True))
        act = str(d.get("act", DEFAULT_ACT))
        stage_ops = [tuple(str(o) for o in st["ops"]) if "ops" in st else ops for st in stages]
        stage_acts = [str(st.get("act", act)) for st in stages]
        for si, (sops, sact) in enumerate(zip(stage_ops, stage_acts), start=1):
            where = f"space {name!r}" + (f" stage {si}" if "ops" in stages[si - 1] else "")
            if len(set(sops)) != len(sops) or not sops:
                raise SpaceError(f"{where}: ops must be a non-empty list without repeats, got {list(sops)}")
            if sact != act and sact not in ACT_NAMES:
                raise SpaceError(f"space {name!r} stage {si}: act {sact!r} unknown; a stage's act is one of "
                                 f"{', '.join(ACT_NAMES)} (timm block strings name only these)")
            resolved = [(parse_op(op), parse_candidate(op).se, parse_candidate(op).act or sact) for op in sops]
            if len(set(resolved)) != len(resolved):
                raise SpaceError(f"{where}: ops {list(sops)} name the same block twice (an activation code equal "
                                 f"to the stage's act {sact!r} is the op without it)")
        chans = [int(stem["channels"]), int(first["channels"]), head_chs] + [int(s["channels"]) for s in stages]
        if any(c % 8 for c in chans):
            raise SpaceError(f"space {name!r}: channel counts must be multiples of 8, got {chans}")
        if int(stem.get("stride", 2)) != 2:
            raise SpaceError(f"space {name!r}: the stem stride is 2 (as in timm's EfficientNet)")

        stage_widths = _parse_widths(name, d, stages)
        if stage_widths:  # a stage's largest width is what its weights are built for
            stages = [{**st, "channels": max(ws)} for st, ws in zip(stages, stage_widths)]
        size = conv_out(res, 2)
        stem_chs = int(stem["channels"])
        first_spec = BlockSpec("ds", stem_chs, int(first["channels"]), int(first.get("kernel", 3)), 1, 1, size,
                               act=act)
        in_chs = first_spec.out_chs
        in_widths: tuple[int, ...] = ()
        layers: list[Layer] = []
        counts: list[int] = []
        total_stride = 2
        for si, st in enumerate(stages, start=1):
            n, out, stride = int(st["layers"]), int(st["channels"]), int(st["stride"])
            if n < 1 or stride not in (1, 2):
                raise SpaceError(f"space {name!r} stage {si}: layers must be >= 1 and stride 1 or 2")
            total_stride *= stride
            counts.append(n)
            for li in range(n):
                s = stride if li == 0 else 1
                # zero (skip) only where the shape is kept, and never for a stage's first layer, so
                # every stage keeps at least one block (as in ProxylessNAS)
                zero_ok = allow_zero and li > 0 and s == 1 and in_chs == out
                choices = stage_ops[si - 1] + ((ZERO,) if zero_ok else ())
                sact = stage_acts[si - 1]
                if stage_widths:
                    w_out = stage_widths[si - 1]
                    layers.append(Layer(f"s{si}.l{li}", si, li, in_chs, out, s, size, choices, sact,
                                        in_widths or (in_chs,), w_out))
                    in_widths = w_out
                else:
                    layers.append(Layer(f"s{si}.l{li}", si, li, in_chs, out, s, size, choices, sact))
                size = conv_out(size, s)
                in_chs = out
        if total_stride > 32:
            raise SpaceError(f"space {name!r}: total stride {total_stride} exceeds 32")
        return cls(
            name=name,
            resolution=res,
            stem_chs=stem_chs,
            first=first_spec,
            layers=tuple(layers),
            stage_layers=tuple(counts),
            head_chs=head_chs,
            act=act,
            in_chans=int(d.get("in_chans", 3)),
            ops=tuple(dict.fromkeys(op for sops in stage_ops for op in sops)),  # every op, in order of appearance
            spec_dict=_canonical(d),
            stage_widths=stage_widths,
        )

    @classmethod
    def from_yaml(cls, path) -> "SearchSpace":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))

    # ------------------------------------------------------------------ queries
    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.spec_dict, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def last_chs(self) -> int:
        return self.layers[-1].out_chs if self.layers else self.first.out_chs

    @property
    def final_size(self) -> int:
        last = self.layers[-1] if self.layers else None
        return conv_out(last.in_size, last.stride) if last else self.first.out_size

    @property
    def has_widths(self) -> bool:
        return bool(self.stage_widths)

    def decisions(self) -> dict[str, tuple[str, ...]]:
        """Every decision and its choices: one per layer (ops), then one per stage (widths), if any."""
        d = {layer.name: layer.choices for layer in self.layers}
        for si, ws in enumerate(self.stage_widths, start=1):
            d[width_decision(si)] = tuple(width_choice(w) for w in ws)
        return d

    def width_decisions(self) -> list[str]:
        return [width_decision(si) for si in range(1, len(self.stage_widths) + 1)]

    def uniform_widths(self) -> dict[float, list[int]]:
        """Channels per stage of every uniform width multiplier: ``{0.25: [8, 8, 8, 16], ...}`` from the
        space's ``widths`` multipliers; for stages with their own width lists, multiplier ``i / (n - 1)``
        takes the same rank in every stage (``{1.0: widest}`` without widths)."""
        if not self.stage_widths:
            return {1.0: self.widths(None)}
        mults = self.spec_dict.get("widths")
        if mults is not None and not any("widths" in st for st in self.spec_dict.get("stages", [])):
            divisor = int(self.spec_dict.get("width_divisor", 8))
            bases = [int(st["channels"]) for st in self.spec_dict["stages"]]
            return {float(m): [make_divisible(b * float(m), divisor) for b in bases] for m in sorted(mults)}
        n = max(len(ws) for ws in self.stage_widths)
        rank = lambda ws, i: ws[int(i * (len(ws) - 1) / max(1, n - 1) + 0.5)]  # noqa: E731  (half up)
        return {(i / (n - 1) if n > 1 else 1.0): [rank(ws, i) for ws in self.stage_widths] for i in range(n)}

    def widths(self, arch: Arch) -> list[int]:
        """Output channels of every stage (1..N) in ``arch`` (the stage's channels without widths)."""
        if not self.stage_widths:
            return [self.layers[sum(self.stage_layers[:i])].out_chs for i in range(len(self.stage_layers))]
        return [parse_width(arch.choices[width_decision(si)]) for si in range(1, len(self.stage_widths) + 1)]

    def layer_chs(self, arch: Arch) -> list[tuple[int, int]]:
        """(input, output) channels of every searchable layer in ``arch``."""
        w = self.widths(arch)
        out = []
        for layer in self.layers:
            o = w[layer.stage - 1]
            if layer.index > 0:
                i = o
            else:
                i = w[layer.stage - 2] if layer.stage > 1 else self.first.out_chs
            out.append((i, o))
        return out

    def last_width(self, arch: Arch) -> int:
        """Channels entering the head in ``arch``."""
        return self.widths(arch)[-1] if self.layers else self.first.out_chs

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def size(self) -> int:
        """Number of distinct architectures."""
        n = 1
        for choices in self.decisions().values():
            n *= len(choices)
        return n

    def make_arch(self, choices: Mapping[str, str], num_classes: int) -> Arch:
        arch = Arch(
            space=self.name,
            fingerprint=self.fingerprint,
            resolution=self.resolution,
            num_classes=int(num_classes),
            choices=dict(choices),
        )
        self.validate(arch)
        return arch

    def validate(self, arch: Arch) -> None:
        """Raise :class:`ArchError` naming the decision and the allowed choices."""
        if arch.space != self.name:
            raise ArchError(f"architecture is for space {arch.space!r}, not {self.name!r}")
        if arch.fingerprint and arch.fingerprint != self.fingerprint:
            raise ArchError(
                f"architecture was made for another version of space {self.name!r} "
                f"(fingerprint {arch.fingerprint}, this space is {self.fingerprint}); "
                f"re-export it from a search on this space"
            )
        dec = self.decisions()
        missing = [k for k in dec if k not in arch.choices]
        extra = [k for k in arch.choices if k not in dec]
        if missing or extra:
            raise ArchError(
                f"architecture has {len(arch.choices)} decisions, space {self.name!r} has {len(dec)}"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unknown: {', '.join(extra)}" if extra else "")
                + f"; decisions are: {', '.join(dec)}"
            )
        for k, allowed in dec.items():
            if arch.choices[k] not in allowed:
                raise ArchError(
                    f"decision {k!r} has choice {arch.choices[k]!r}; allowed: {', '.join(allowed)}"
                )

    def sample(self, num_classes: int, rng: random.Random | None = None) -> Arch:
        rng = rng or random.Random()
        return self.make_arch({k: rng.choice(v) for k, v in self.decisions().items()}, num_classes)

    def largest(self, num_classes: int) -> Arch:
        """Every layer at its biggest op (largest kernel x expand, never zero)."""
        choices = {l.name: max((c for c in l.choices if c != ZERO), key=op_size) for l in self.layers}
        choices.update({width_decision(si): width_choice(max(ws)) for si, ws in enumerate(self.stage_widths, 1)})
        return self.make_arch(choices, num_classes)

    def smallest(self, num_classes: int) -> Arch:
        """Every layer at zero where allowed, else its smallest op."""
        choices = {l.name: ZERO if ZERO in l.choices else min(l.choices, key=op_size) for l in self.layers}
        choices.update({width_decision(si): width_choice(min(ws)) for si, ws in enumerate(self.stage_widths, 1)})
        return self.make_arch(choices, num_classes)

    def block_specs(self, arch: Arch) -> list[list[BlockSpec]]:
        """Blocks per stage (stage 0 = the fixed first block), zero layers left out."""
        stages: list[list[BlockSpec]] = [[self.first]] + [[] for _ in self.stage_layers]
        chs = self.layer_chs(arch) if self.stage_widths else [(None, None)] * len(self.layers)
        for layer, (cin, cout) in zip(self.layers, chs):
            spec = layer.spec(arch.choices[layer.name], cin, cout)
            if spec is not None:
                stages[layer.stage].append(spec)
        return stages

    def arch_def(self, arch: Arch) -> list[list[str]]:
        """timm arch_def (list of stages of block strings) of the static net for ``arch``."""
        return [[b.timm_str(self.act) for b in stage] for stage in self.block_specs(arch)]

    @property
    def has_se(self) -> bool:
        """Whether any op of the space carries squeeze-excite."""
        return any(parse_candidate(op).se for layer in self.layers for op in layer.choices if op != ZERO)


def _parse_widths(name: str, d: Mapping[str, Any], stages: list[dict]) -> tuple[tuple[int, ...], ...]:
    """Width candidates per stage from ``widths`` (multipliers of every stage) and stages' own
    ``widths`` (channel counts); ``()`` when the space has none."""
    glob = d.get("widths")
    if glob is None and not any("widths" in st for st in stages):
        return ()
    divisor = int(d.get("width_divisor", 8))
    if divisor < 1:
        raise SpaceError(f"space {name!r}: width_divisor must be >= 1, got {divisor}")
    out = []
    for si, st in enumerate(stages, start=1):
        base = int(st["channels"])
        if "widths" in st:
            ws = [w for w in st["widths"]]
            bad = [w for w in ws if isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % divisor]
            if bad or not ws:
                raise SpaceError(f"space {name!r} stage {si}: widths are channel counts, positive multiples of "
                                 f"{divisor} (width_divisor), got {list(ws)}")
            chs = ws
        elif glob is not None:
            mults = list(glob)
            if not mults or any(isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in mults):
                raise SpaceError(f"space {name!r}: widths are positive multipliers of each stage's channels "
                                 f"(e.g. [0.5, 0.75, 1.0]), got {mults}")
            chs = [make_divisible(base * float(m), divisor) for m in mults]
        else:
            chs = [base]
        out.append(tuple(sorted(set(int(c) for c in chs))))
    return tuple(out)


def _canonical(d: Mapping[str, Any]) -> dict:
    """JSON-able plain copy of a (possibly OmegaConf) mapping, for fingerprinting."""
    return json.loads(json.dumps(d, default=lambda o: list(o) if not isinstance(o, dict) else dict(o)))
