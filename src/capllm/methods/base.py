"""The method interface and the registry.

A *layer-wise* method (every baseline) gives the engine one :class:`LayerCompressor` per linear
layer. The engine feeds it the layer's calibration inputs through ``add_batch`` (the gptq
accumulator shape), calls ``compress`` once, then ``free``. ``compress`` returns a
:class:`CompressedWeight` ``W ≈ U Vᵀ + S`` whose kept parameters are ``r(m + n) + nnz(S)``.

A *global* method (CAP) overrides :meth:`Method.compress_model` and sees the whole model.

Budget arithmetic (DESIGN §1): the ratio ρ is the fraction of the compressed linear layers'
dense parameters removed; a matrix of shape ``(m, n)`` has a budget of ``(1 − ρ)·m·n`` kept
parameters, which :func:`matrix_budget` rounds down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from capllm.engine.compressed import CompressedWeight  # noqa: F401  (re-exported: the result type of every method)
from capllm.engine.stats import InputStats
from capllm.errors import CapllmError

if TYPE_CHECKING:
    from capllm.engine.context import CompressionContext
    from capllm.models.layers import LinearHandle


class LayerCompressor(Protocol):
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None: ...
    def compress(self, weight: torch.Tensor) -> CompressedWeight: ...
    def free(self) -> None: ...


class StatsCompressor:
    """A layer compressor whose only statistics are the layer's inputs (``STATS``: the
    :class:`~capllm.engine.stats.InputStats` moments it needs); subclasses define ``compress``."""

    STATS: ClassVar[dict[str, bool]] = {"sq": True}

    def __init__(self, n_in: int, device, method: "Method") -> None:
        self.stats = InputStats(n_in, device, **self.STATS)
        self.method = method

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.stats.add_batch(inp)

    def reduce(self, dist) -> None:
        """Statistics over every rank's calibration windows (a no-op in one process)."""
        self.stats.reduce(dist)

    def free(self) -> None:
        self.stats.free()


@dataclass(frozen=True)
class Structure:
    """``N:M`` semi-structured sparsity: at most ``n`` non-zeros in every ``m`` consecutive inputs."""

    n: int
    m: int

    @staticmethod
    def parse(text: str | None) -> "Structure | None":
        if text in (None, "", "unstructured"):
            return None
        try:
            n, m = (int(x) for x in text.split(":"))
        except ValueError:
            raise CapllmError(f"structure {text!r} is not N:M (e.g. 2:4) or 'unstructured'") from None
        if not 0 < n < m:
            raise CapllmError(f"structure {text}: need 0 < N < M")
        return Structure(n, m)

    @property
    def ratio(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def matrix_budget(m: int, n: int, ratio: float) -> int:
    """Kept parameters allowed for an ``(m, n)`` matrix at compression ratio ``ratio``."""
    return int((1.0 - ratio) * m * n + 1e-9)


class Method:
    """Base class; subclasses set ``name``, ``description`` and an ``Options`` dataclass."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    supports_structure: ClassVar[bool] = False
    uses_ratio: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, ratio: float, structure: Structure | None = None, options: dict | None = None) -> None:
        if self.uses_ratio and not 0.0 < ratio < 1.0:
            raise CapllmError(f"ratio {ratio} is outside (0, 1): it is the fraction of decoder-linear parameters to remove, e.g. 0.5")
        if structure is not None and not self.supports_structure:
            raise CapllmError(f"method {self.name} does not support N:M structure {structure}")
        if structure is not None and abs(structure.ratio - ratio) > 1e-9:
            raise CapllmError(f"structure {structure} removes {structure.ratio:.0%} of weights, but --ratio is {ratio}: pass --ratio {structure.ratio:g}")
        self.ratio = ratio
        self.structure = structure
        self.options = make_options(self.Options, options or {}, self.name)
        self.given_options = frozenset(options or {})
        if self.block_tune is not None:
            self.block_tune.check(self.name)

    @property
    def block_tune(self):
        """The block tuning the engine runs after each block (:mod:`capllm.engine.block_tune`):
        built from the ``tune_*`` options of methods whose ``Options`` mix in
        :class:`~capllm.engine.block_tune.BlockTuneOptions`; ``None`` for the others. Strict
        (too few calibration windows is an error) when the user set ``tune_epochs``; a method's
        default tuning is skipped there with a notice instead."""
        make = getattr(self.options, "block_tune", None)
        return make(getattr(self.options, "seed", 0), "tune_epochs" in self.given_options) if make is not None else None

    def layer_compressor(self, handle: "LinearHandle") -> LayerCompressor:
        raise NotImplementedError(f"{self.name} is not a layer-wise method")

    def compress_model(self, ctx: "CompressionContext") -> None:
        """Compress every decoder linear of ``ctx.model`` in place (layer-wise by default)."""
        from capllm.engine.layerwise import run_layerwise

        run_layerwise(ctx, self, checkpoint=ctx.checkpoint(self.name))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": dataclasses.asdict(self.options)}


def make_options(cls: type, given: dict, method: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise CapllmError(f"method {method} has no option {unknown[0]!r} (its options: {known})")
    converted = {}
    for k, v in given.items():
        default = fields[k].default
        converted[k] = _coerce(v, type(default) if default is not dataclasses.MISSING and default is not None else str, k, method)
    return cls(**converted)


def _coerce(v: Any, typ: type, key: str, method: str):
    if not isinstance(v, str) or typ is str:
        return v
    try:
        if typ is bool:
            if v.lower() in ("1", "true", "yes", "on"):
                return True
            if v.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(v)
    except ValueError:
        raise CapllmError(f"option {key}={v!r} of {method} is not a valid {typ.__name__}") from None


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    from capllm import methods  # noqa: F401  (imports register every built-in method)

    try:
        return REGISTRY[name]
    except KeyError:
        raise CapllmError(f"unknown method {name!r}: run `capllm methods` to list them ({', '.join(sorted(REGISTRY))})") from None
