"""``Arch``: one frozen choice per decision of a search space, with a YAML/JSON round trip."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import yaml

SCHEMA_VERSION = 1


class ArchError(ValueError):
    """An architecture does not fit its space (wrong decisions, unknown ops, other space)."""


@dataclass(frozen=True)
class Arch:
    space: str
    fingerprint: str
    resolution: int
    num_classes: int
    choices: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "choices", MappingProxyType(dict(self.choices)))

    def __hash__(self) -> int:
        return hash((self.space, self.fingerprint, tuple(sorted(self.choices.items()))))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Arch) and self.to_dict(with_def=False) == other.to_dict(with_def=False)

    def replace(self, **choices: str) -> "Arch":
        new = dict(self.choices)
        new.update(choices)
        return Arch(self.space, self.fingerprint, self.resolution, self.num_classes, new)

    def to_dict(self, arch_def: list[list[str]] | None = None, with_def: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "space": self.space,
            "fingerprint": self.fingerprint,
            "resolution": self.resolution,
            "classes": self.num_classes,
            "choices": dict(self.choices),
        }
        if with_def and arch_def is not None:
            d["arch_def"] = arch_def
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Arch":
        if not isinstance(d, Mapping):
            raise ArchError("an architecture file holds a mapping with keys space, fingerprint, resolution, "
                            "classes, choices")
        version = d.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ArchError(f"architecture schema_version {version} is not supported (this hwnas reads "
                            f"{SCHEMA_VERSION})")
        missing = [k for k in ("space", "resolution", "classes", "choices") if k not in d]
        if missing:
            raise ArchError(f"architecture lacks the keys: {', '.join(missing)}")
        choices = d["choices"]
        if not isinstance(choices, Mapping):
            raise ArchError("'choices' must map decision names (e.g. s1.l0) to ops (e.g. k3_e6)")
        return cls(
            space=str(d["space"]),
            fingerprint=str(d.get("fingerprint", "") or ""),
            resolution=int(d["resolution"]),
            num_classes=int(d["classes"]),
            choices={str(k): str(v) for k, v in choices.items()},
        )

    def to_yaml(self, arch_def: list[list[str]] | None = None, extra: Mapping[str, Any] | None = None) -> str:
        d = self.to_dict(arch_def)
        if extra:
            d.update(extra)
        return yaml.safe_dump(d, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Arch":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ArchError(f"architecture file is not valid YAML: {e}") from None
        return cls.from_dict(data)

    def short(self) -> str:
        """Compact one-line form: ops of every layer in order."""
        return " ".join(v for v in self.choices.values())
