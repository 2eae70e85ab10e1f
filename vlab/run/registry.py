"""Experiment declarations, the registry that discovers them, and suites.

An experiment is one small declaration: name, parameter grid, requirements, metrics and units,
privilege level, and the code that measures one case. Two kinds exist:

- `LoopExperiment`: a repeated measurement driven by pyperf worker processes. `setup(params)`
  builds the state once per worker (a Machine, usually), `measure(state, loops)` runs `loops`
  samples and returns a `Measurement`, `teardown(state)` releases it.
- `OneShotExperiment`: a whole case run once (a time series, a model, a migration), returning
  rows itself.

Requirements are checked against the host record before anything runs; a failing one becomes a
`skip` row whose reason names it.
"""
from __future__ import annotations

import ast
import fnmatch
import functools
import hashlib
import importlib
import inspect
import itertools
import os
import pkgutil
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from vlab._errors import UsageError
from vlab._units import size_bytes

AREAS = ("exits", "paging", "io", "migration")


@dataclass
class Requirement:
    """A condition on the host (and the case's parameters); `check` returns None or a reason."""
    name: str
    check: Callable[[dict, dict], str | None]


def needs_kvm() -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        kvm = host.get("kvm", {})
        if not kvm.get("usable"):
            return f"KVM unusable: {kvm.get('reason') or '/dev/kvm cannot be opened'}"
        return None
    return Requirement("kvm", check)


def needs_cap(cap: str, why: str = "") -> Requirement:
    """A KVM capability, named as KVM names it (without the KVM_CAP_ prefix)."""
    def check(host: dict, params: dict) -> str | None:
        caps = host.get("kvm", {}).get("caps", {})
        if not caps.get(cap):
            return f"KVM capability KVM_CAP_{cap} is missing" + (f" ({why})" if why else "")
        return None
    return Requirement(f"cap:{cap}", check)


def needs_vendor(vendor: str, what: str) -> Requirement:
    def check(host: dict, params: dict) -> str | None:
        got = host.get("cpu_vendor")
        if got != vendor:
            return f"{what} needs a {vendor.upper()} CPU (this host: {got})"
        return None
    return Requirement(f"vendor:{vendor}", check)


@dataclass(frozen=True)
class Limit:
    """The values one parameter may take, declared beside the parameter grid: a number in
    [lo, hi] (an integer unless `integer` is False), because it goes into a register or field
    of that size (`what` names it, for the message), or, with `file`, a path to an input file
    of at most `hi` bytes ("" for none). A value outside is a one-line UsageError before
    anything runs; without limits, a 70-bit leaf went into a 32-bit register."""
    lo: int | float = 0
    hi: int | float = 0
    what: str = ""
    integer: bool = True
    file: bool = False
    choices: tuple = ()                 # else: exactly one of these values (e.g. "in", "out")

    def check(self, name: str, value: Any) -> None:
        from vlab import _inputs

        if self.choices:
            if not any(type(value) is type(c) and value == c for c in self.choices):
                raise UsageError(f"{name} must be one of {', '.join(map(str, self.choices))}, "
                                 f"not {value!r}")
            return
        if self.file:
            if not isinstance(value, str):
                raise UsageError(f"{name}={value!r}: expected a path to a {self.what}")
            if value:
                _inputs.read_file(value, self.what, int(self.hi))
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (self.integer and not isinstance(value, int)):
            kind = "an integer" if self.integer else "a number"
            raise UsageError(f"{name}={value!r} is not {kind} ({self.what})")
        _inputs.check_fits(name, value, self.lo, self.hi, self.what)


def bits(n: int, what: str, lo: int = 0, **kw: Any) -> Limit:
    """An unsigned `n`-bit register or field (from `lo`, e.g. 1 for a count)."""
    return Limit(lo, (1 << n) - 1, f"{what}, {n} bits", **kw)


def within(lo: int | float, hi: int | float, what: str, integer: bool = True,
           **kw: Any) -> Limit:
    """A range the code that takes the value can honour (a ring size, a duration ...)."""
    return Limit(lo, hi, what, integer, **kw)


def one_of(*values: Any) -> Limit:
    """One of these exact values (a string choice, or true/false)."""
    return Limit(choices=tuple(values))


def input_file(what: str, max_bytes: int) -> Limit:
    """A path to an input file: a regular file of at most `max_bytes`, or "" for none."""
    return Limit(0, max_bytes, what, file=True)


#: `-p iters=N` (any loop experiment): the guest's per-sample loop count.
ITERS = bits(32, "operations per sample (the guest's loop count)", lo=1)


@dataclass
class Measurement:
    """What one `measure(state, loops)` call produced.

    `seconds`: the time pyperf records for these loops (normally guest time, from rdtsc).
    `metrics`: metric -> raw samples (per operation). `extra`: anything else worth keeping.
    """
    seconds: float
    metrics: dict[str, list[float]]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Experiment:
    name: str
    description: str
    params: dict[str, list]
    metrics: dict[str, str]                     # metric -> unit
    requires: list[Requirement] = field(default_factory=list)
    cpl: int | str | None = None                # privilege level, or a param name ("cpl")
    handled_by: str = ""
    quick: dict[str, list] | None = None        # a smaller grid for the quick suite
    higher_is_better: tuple[str, ...] = ()
    validate: Callable[[dict, dict], None] | None = None   # (params, host) -> raises UsageError
    # (params, host, metric, samples, extras) -> (warnings, flags, extra) for that metric's row
    annotate: Callable[..., tuple[list[str], dict, dict]] | None = None
    payload: str | None = "micro"
    module: str = ""
    source_hash: str = ""                       # computed on first use (see `code_hash`)
    # (rows of this experiment's cases, host) -> more rows computed from several cases (ratios
    # between cases, knees of a sweep, model rows beside measured ones); run once after all
    # cases of the run, see _runner.derived_rows
    derive: Callable[[list[dict], dict], list[dict]] | None = None
    # param -> the values it may take (see Limit); every numeric parameter declares one
    limits: dict[str, Limit] = field(default_factory=dict)

    def check_values(self, params: dict) -> None:
        """Each value must fit where it goes (its declared Limit); else a UsageError."""
        for k, v in params.items():
            limit = ITERS if k == "iters" else self.limits.get(k)
            if limit is not None:
                try:
                    limit.check(k, v)
                except UsageError as e:
                    raise UsageError(f"{self.name}: {e}") from None

    def check_params(self, params: dict, host: dict) -> None:
        """The declared limits first (a validator may assume a number is a number), then the
        experiment's own `validate`. Where both refuse a value, the validator's message wins
        (it is the more specific one, e.g. "cpl must be 0 or 3")."""
        try:
            self.check_values(params)
        except UsageError as limit_error:
            if self.validate is not None:
                try:
                    self.validate(params, host)
                except UsageError as own:
                    raise own from None
                except Exception:  # noqa: BLE001 - the limit's message stands
                    pass
            raise limit_error from None
        if self.validate is not None:
            self.validate(params, host)

    @property
    def area(self) -> str:
        return self.name.split(".", 1)[0]

    def grid(self, quick: bool = False, overrides: dict[str, list] | None = None) -> list[dict]:
        """Every parameter combination, with user overrides replacing whole axes."""
        axes = dict(self.quick if (quick and self.quick) else self.params)
        for k, v in (overrides or {}).items():
            if k in self.params:
                axes[k] = v
        if not axes:
            return [{}]
        keys = list(axes)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]

    def version(self) -> str:
        """Hash of the experiment's source and its guest payload: results of other versions
        are not comparable."""
        h = hashlib.sha256(self.code_hash().encode())
        if self.payload:
            try:
                from vlab.vmm.payloads import load_payload

                h.update(load_payload(self.payload).image)
            except Exception:  # noqa: BLE001 - native part missing: source hash alone
                pass
        return h.hexdigest()[:12]

    def code_hash(self) -> str:
        """`source_hash`, computed (and kept) the first time it is asked for: parsing every
        experiment module at registration cost each pyperf worker process seconds."""
        if not self.source_hash:
            fn = getattr(self, "measure", None) or getattr(self, "run", None)
            self.source_hash = _source_hash(fn) if fn else ""
        return self.source_hash

    def check(self, host: dict, params: dict) -> str | None:
        for req in self.requires:
            why = req.check(host, params)
            if why:
                return why
        return None


@dataclass
class LoopExperiment(Experiment):
    setup: Callable[[dict, dict], Any] | None = None      # (params, host) -> state
    measure: Callable[[Any, int], Measurement] | None = None
    teardown: Callable[[Any], None] | None = None
    kind: str = "loop"


@dataclass
class OneShotExperiment(Experiment):
    run: Callable[..., list[dict]] | None = None          # (params, host, progress) -> rows
    kind: str = "oneshot"


_REGISTRY: dict[str, Experiment] = {}


class _Unimported(ast.NodeTransformer):
    """Drops import statements and docstrings: where a helper comes from, and what the prose
    says, is not what an experiment measures."""

    def visit_Import(self, node: ast.AST) -> None:
        return None

    visit_ImportFrom = visit_Import

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list):
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body.pop(0)
            if not body and not isinstance(node, ast.Module):
                body.append(ast.Pass())
        return node


def measuring_code(source: str) -> str:
    """The code of a module as far as it measures anything: its syntax tree without import
    statements, docstrings, comments, layout or line numbers. Moving a helper to another package
    rewrites import lines only, so it leaves this (and the experiment's version) unchanged."""
    return ast.dump(_Unimported().visit(ast.parse(source)))


def _source_hash(fn: Callable) -> str:
    mod = inspect.getmodule(fn)
    return _module_hash(mod.__name__) if mod else hashlib.sha256().hexdigest()


@functools.lru_cache(maxsize=None)
def _module_hash(name: str) -> str:
    """Hash of the measuring code (see `measuring_code`) of module `name` and of the
    private helper modules of the experiments package it imports (e.g. experiments/_micro.py),
    so a change to either bumps the version and a move of code between packages does not."""
    mod = sys.modules[name]
    pkg = name.rpartition(".")[0]
    mods = [mod] + sorted((m for m in vars(mod).values() if inspect.ismodule(m)
                           and m.__name__.startswith(pkg + "._")), key=lambda m: m.__name__)
    h = hashlib.sha256()
    for m in mods:
        try:
            h.update(measuring_code(inspect.getsource(m)).encode())
        except (OSError, TypeError, SyntaxError):
            pass
    return h.hexdigest()


def register(exp: Experiment) -> Experiment:
    if exp.name in _REGISTRY:
        raise ValueError(f"experiment {exp.name} registered twice")
    fn = getattr(exp, "measure", None) or getattr(exp, "run", None)
    exp.module = fn.__module__ if fn else ""
    _REGISTRY[exp.name] = exp
    return exp


_DISCOVERED = False


def discover() -> dict[str, Experiment]:
    """Import every module of vlab.experiments (each registers its experiments)."""
    global _DISCOVERED
    if not _DISCOVERED:
        from vlab import experiments as pkg  # vlab.experiments (the top-level experiments/ dir)

        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")
        _DISCOVERED = True
    return _REGISTRY


def get(name: str) -> Experiment:
    """One experiment by name. Imports only its area's module when it can (pyperf workers
    start once per process, so they should not import every area)."""
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"vlab.experiments.{name.split('.', 1)[0]}")
        except ImportError:
            pass
    if name not in _REGISTRY:
        reg = discover()
        if name not in reg:
            raise UsageError(f"unknown experiment {name!r} (see `vlab list`)")
    return _REGISTRY[name]


def select(selectors: Iterable[str]) -> list[Experiment]:
    """Experiments matching names, globs (`exits.*`) or bare area names (`exits`), in
    registry order. An unmatched selector is a usage error."""
    reg = discover()
    out: list[Experiment] = []
    for sel in selectors:
        pattern = sel if any(c in sel for c in "*?[") or "." in sel else f"{sel}.*"
        hits = [e for n, e in reg.items() if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UsageError(f"unknown experiment {sel!r} (see `vlab list`)")
        out += [e for e in hits if e not in out]
    return out


# ---- suites ----

def suite_dir() -> str:
    from vlab import experiments as pkg  # vlab.experiments (the top-level experiments/ dir)

    return os.path.dirname(pkg.__file__)


def suite_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(suite_dir()) if f.endswith(".toml"))


@dataclass
class Suite:
    name: str
    description: str
    quick: bool                         # use each experiment's quick grid
    pyperf: dict[str, Any]              # processes, values, warmups, min_time
    entries: list[tuple[str, dict[str, list]]]   # (selector, param overrides)
    pin: list[str] | None = None        # the suite's `pin` (vlab/run/pinning.py), None: default
    # per entry, pyperf loops per value for its cases (an entry's `loops = N`): pyperf's own
    # calibration costs a worker process per case; None: calibrate
    loops: list[int | None] = field(default_factory=list)


def load_suite(name: str) -> Suite:
    path = os.path.join(suite_dir(), f"{name}.toml")
    if not os.path.exists(path):
        raise UsageError(f"unknown suite {name!r}; suites: {', '.join(suite_names())}")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"suite {name}: {path} is not valid TOML: {e}") from None
    entries, loops = [], []
    for item in data.get("experiment", []):
        entries.append((item["select"], {k: v if isinstance(v, list) else [v]
                                         for k, v in item.get("params", {}).items()}))
        n = item.get("loops")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not
                              1 <= n <= 1 << 20):
            raise UsageError(f"suite {name}: loops of {item['select']!r} must be an integer "
                             f"from 1 to {1 << 20}, not {n!r}")
        loops.append(n)
    pin = data.get("pin")
    if pin is not None:
        if isinstance(pin, str):
            pin = [pin]
        elif isinstance(pin, dict):
            pin = [f"{k}={v}" for k, v in pin.items()]
        if not isinstance(pin, list) or not all(isinstance(p, (str, int)) for p in pin):
            raise UsageError(f"suite {name}: pin must be a string, a list of strings or a "
                             f"table of ROLE = \"CPUS\", not {pin!r}")
        pin = [str(p) for p in pin]
    return Suite(name, data.get("description", ""), bool(data.get("quick", False)),
                 dict(data.get("pyperf", {})), entries, pin, loops)


def parse_param(text: str) -> tuple[str, list]:
    """`-p KEY=VALUE[,VALUE...]` -> (key, [values]); numbers with K/M/G suffixes allowed."""
    if "=" not in text:
        raise UsageError(f"bad parameter {text!r}: expected KEY=VALUE")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or not raw.strip():
        raise UsageError(f"bad parameter {text!r}: expected KEY=VALUE")
    return key, [parse_value(v.strip()) for v in raw.split(",")]


def parse_value(v: str) -> Any:
    """One `-p` value: true/false, an integer (decimal or 0x hex), a float, a size with a unit
    ("4k", "64M", "1GiB" -> bytes, as `vlab._units.size_bytes` reads it), else the string."""
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v, 0) if conv is int else conv(v)
        except ValueError:
            pass
    size = size_bytes(v)
    return v if size is None else size
