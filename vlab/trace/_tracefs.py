"""tracefs access and tracepoint format parsing.

Exit-reason names come from the kernel itself: every tracepoint's `format` file carries the
`print fmt` the kernel uses to print the event, and for enum-like fields that is a
`__print_symbolic(REC->field, { value, "NAME" }, ...)` table. Reading those tables (instead of
hand-writing them, as bcc's kvmexit.py does) means the names always match the running kernel.

Real format files are messier than the simple case, and the parser handles what they contain:

- several tables for one field, chosen by a ternary: `kvm_exit` prints
  `(REC->isa == 1) ? __print_symbolic(REC->exit_reason & 0xffff, VMX...) :
  __print_symbolic(REC->exit_reason, SVM...)` (both tables are in the file on every x86 host;
  the `isa` field of each event says which one applies);
- keys that are expressions (`0x040 + 13`, `(1 << 0) | (1 << 2)`, `-1`) and names made of
  adjacent string literals (`"KVM_EXIT_" "IO"`);
- calls nested in other calls and arbitrary whitespace.
"""
from __future__ import annotations

import ast
import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass, field as dc_field

from vlab._errors import VlabError

#: Where tracefs may be mounted, in order of preference.
TRACEFS_CANDIDATES: tuple[str, ...] = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
#: The mount point `ensure_tracefs` uses when tracefs is not mounted anywhere.
TRACEFS_MOUNTPOINT = "/sys/kernel/tracing"


class TracingUnavailable(VlabError):
    """Tracing cannot work on this host or for this user; the message says which piece is missing."""


# --------------------------------------------------------------------------------------------
# tracefs

def tracefs_path() -> str | None:
    """The tracefs directory that has an `events/` tree, or None when tracefs is not mounted."""
    for path in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def ensure_tracefs() -> tuple[str, bool]:
    """Return `(path, mounted_by_us)`, mounting tracefs at /sys/kernel/tracing when it is missing.

    Mounting needs root (CAP_SYS_ADMIN); without it this raises `TracingUnavailable`. The mount
    is left in place (it is harmless and other tools expect it); `mounted_by_us` lets callers
    report that they changed the host.
    """
    path = tracefs_path()
    if path is not None:
        return path, False
    if os.geteuid() != 0:
        raise TracingUnavailable("tracefs is not mounted and mounting it needs root "
                                 f"(mount -t tracefs nodev {TRACEFS_MOUNTPOINT})")
    if not os.path.isdir(TRACEFS_MOUNTPOINT):
        raise TracingUnavailable(f"tracefs is not mounted and {TRACEFS_MOUNTPOINT} does not exist "
                                 "(kernel without CONFIG_TRACING?)")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    rc = libc.mount(b"nodev", TRACEFS_MOUNTPOINT.encode(), b"tracefs", ctypes.c_ulong(0), None)
    if rc != 0:
        err = ctypes.get_errno()
        raise TracingUnavailable(f"mount -t tracefs nodev {TRACEFS_MOUNTPOINT} failed: "
                                 f"{os.strerror(err)} (errno {err})")
    path = tracefs_path()
    if path is None:
        raise TracingUnavailable(f"tracefs mounted at {TRACEFS_MOUNTPOINT} but has no events/ "
                                 "directory (kernel without tracepoints?)")
    return path, True


def _events_root(root: str | None) -> str:
    base = root if root is not None else tracefs_path()
    if base is None:
        raise TracingUnavailable("tracefs is not mounted (call ensure_tracefs() as root)")
    return os.path.join(base, "events")


def event_exists(system: str, event: str, root: str | None = None) -> bool:
    """Whether tracepoint `system:event` exists (its format file is readable)."""
    try:
        return os.path.isfile(os.path.join(_events_root(root), system, event, "format"))
    except TracingUnavailable:
        return False


def list_events(system: str, root: str | None = None) -> list[str]:
    """Names of the tracepoints of one system (e.g. "kvmmmu"), sorted; [] if the system is absent."""
    directory = os.path.join(_events_root(root), system)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if os.path.isfile(os.path.join(directory, n, "format")))


def read_format(system: str, event: str, root: str | None = None) -> str:
    """The text of tracepoint `system:event`'s format file.

    `root` is a tracefs directory (or a recorded copy with the same layout); by default the
    mounted tracefs. Raises `TracingUnavailable` when tracefs is not mounted and
    `FileNotFoundError` when the event does not exist.
    """
    with open(os.path.join(_events_root(root), system, event, "format"), encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# format files

@dataclass(frozen=True)
class Field:
    """One `field:` line of a format file."""

    name: str
    ctype: str
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class TraceFormat:
    """A parsed tracepoint format file: name, numeric id (what `common_type` holds), fields."""

    name: str
    id: int
    fields: dict[str, Field]
    print_fmt: str


_FIELD_RE = re.compile(r"^\s*field:(?P<decl>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
                       r"\s*signed:(?P<signed>\d+);")


def parse_format(text: str) -> TraceFormat:
    """Parse a format file's header (name, ID), its fields and its `print fmt` text."""
    name = ""
    ident = -1
    fields: dict[str, Field] = {}
    print_fmt = ""
    for line in text.splitlines():
        if line.startswith("name:"):
            name = line[5:].strip()
        elif line.startswith("ID:"):
            ident = int(line[3:].strip())
        elif line.startswith("print fmt:"):
            print_fmt = line[len("print fmt:"):].strip()
        else:
            m = _FIELD_RE.match(line)
            if m:
                decl = m.group("decl").strip()
                # "unsigned int exit_reason", "__u8 insn[15]", "__data_loc char[] name"
                dm = re.match(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(\[[^\]]*\])?$", decl)
                if dm:
                    fname = dm.group("name")
                    fields[fname] = Field(fname, dm.group("type").strip(), int(m.group("offset")),
                                          int(m.group("size")), m.group("signed") == "1")
    if not print_fmt:
        # Tolerate a print fmt that was wrapped onto following lines by whoever saved the file.
        idx = text.find("print fmt:")
        if idx >= 0:
            print_fmt = " ".join(text[idx + len("print fmt:"):].split())
    return TraceFormat(name, ident, fields, print_fmt)


# --------------------------------------------------------------------------------------------
# a small scanner for the C-like print fmt text

def _scan(text: str):
    """Yield (index, char, depth, in_string) for every character outside string literals.

    Depth counts (), {} and [] together; string literals (with backslash escapes) and char
    literals are skipped so that brackets and commas inside names never confuse the parser.
    """
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            quote = c
            i += 1
            while i < n and text[i] != quote:
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if c in "({[":
            depth += 1
            yield i, c, depth - 1
        elif c in ")}]":
            depth -= 1
            yield i, c, depth
        else:
            yield i, c, depth
        i += 1


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at `sep` characters that are at bracket depth 0 and outside string literals."""
    parts: list[str] = []
    start = 0
    for i, c, depth in _scan(text):
        if c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _matching_close(text: str, open_idx: int) -> int:
    """Index of the bracket closing the one at `open_idx` (which must be an opening bracket)."""
    base = None
    for i, c, depth in _scan(text):
        if i == open_idx:
            base = depth
        elif base is not None and c in ")}]" and depth == base:
            return i
    raise ValueError(f"unbalanced brackets after offset {open_idx}")


_STRING_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _c_strings(text: str) -> str | None:
    """Concatenate the adjacent C string literals in `text` ("KVM_EXIT_" "IO" -> KVM_EXIT_IO)."""
    pieces = _STRING_RE.findall(text)
    if not pieces:
        return None
    rest = _STRING_RE.sub("", text).strip()
    if rest:
        return None  # not a plain string literal (e.g. a pointer expression)
    return "".join(re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), p)
                   for p in pieces)


# --------------------------------------------------------------------------------------------
# C integer expressions (symbolic keys, masks, ternary guards)

_INT_RE = re.compile(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b")
_REC_RE = re.compile(r"REC->([A-Za-z_]\w*)")
_ALLOWED_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                   ast.Mult: lambda a, b: a * b, ast.LShift: lambda a, b: a << b,
                   ast.RShift: lambda a, b: a >> b, ast.BitAnd: lambda a, b: a & b,
                   ast.BitOr: lambda a, b: a | b, ast.BitXor: lambda a, b: a ^ b,
                   ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_ALLOWED_CMPS = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
                 ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
                 ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b}


class _Unknown(Exception):
    """An expression refers to a record field whose value was not given."""


def _c_to_py(expr: str) -> str:
    """Rewrite a C integer expression into Python syntax (evaluated by a whitelist, never eval)."""
    s = _INT_RE.sub(lambda m: str(int(m.group(1), 0)) if not m.group(1).startswith(("0x", "0X"))
                    else str(int(m.group(1), 16)), expr)
    s = _REC_RE.sub(lambda m: f"REC_{m.group(1)}", s)
    s = s.replace("&&", " and ").replace("||", " or ")
    s = re.sub(r"!(?!=)", " not ", s)
    s = s.replace("/", "//")
    return s


def eval_c_int(expr: str, rec: dict[str, int] | None = None) -> int:
    """Evaluate a C integer expression such as `0x040 + 13`, `(1 << 0) | (1 << 2)` or
    `REC->exit_reason & 0xffff` (with `rec` giving field values). Comparisons give 0 or 1.

    Raises ValueError on anything that is not a plain integer expression, and KeyError when the
    expression uses a REC field missing from `rec`.
    """
    rec = rec or {}
    try:
        tree = ast.parse(_c_to_py(expr.strip()), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not a C integer expression: {expr!r}") from e

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return int(node.value)
        if isinstance(node, ast.Name) and node.id.startswith("REC_"):
            key = node.id[4:]
            if key not in rec:
                raise KeyError(key)
            return int(rec[key])
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            if isinstance(node.op, ast.USub):
                return -v
            if isinstance(node.op, ast.UAdd):
                return v
            if isinstance(node.op, ast.Invert):
                return ~v
            if isinstance(node.op, ast.Not):
                return int(not v)
        if isinstance(node, ast.BinOp) and type(node.op) in _ALLOWED_BINOPS:
            return _ALLOWED_BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.BoolOp):
            vals = [ev(v) for v in node.values]
            return int(all(vals)) if isinstance(node.op, ast.And) else int(any(vals))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _ALLOWED_CMPS:
            return int(_ALLOWED_CMPS[type(node.ops[0])](ev(node.left), ev(node.comparators[0])))
        raise ValueError(f"unsupported construct in C expression {expr!r}")

    return ev(tree)


# --------------------------------------------------------------------------------------------
# __print_symbolic tables

@dataclass(frozen=True)
class SymbolicTable:
    """One `__print_symbolic(expr, {key, "name"}, ...)` table of a print fmt.

    `expr` is the value expression (e.g. `REC->exit_reason & 0xffff`), `entries` maps keys to
    names, and `guard`/`guard_branch` record the ternary that selects this table, if any
    (`REC->isa == 1` and True for the VMX table of `kvm_exit`).
    """

    expr: str
    entries: dict[int, str]
    guard: str | None = None
    guard_branch: bool = True
    fields: tuple[str, ...] = dc_field(default=())

    def applies(self, rec: dict[str, int]) -> bool | None:
        """Whether this table is the one the kernel would use for a record with these field
        values: True / False, or None when the guard needs a field that `rec` lacks."""
        if self.guard is None:
            return True
        try:
            return bool(eval_c_int(self.guard, rec)) == self.guard_branch
        except KeyError:
            return None

    def name(self, field_name: str, value: int, bits: int = 32, rec: dict[str, int] | None = None) -> str | None:
        """The name the kernel prints for `REC->field_name == value`, or None when the table
        has no entry (the kernel then prints the number). Negative keys such as `-1` match
        their unsigned `bits`-wide value."""
        values = dict(rec or {})
        values[field_name] = value
        try:
            key = eval_c_int(self.expr, values)
        except (KeyError, ValueError):
            key = value
        mask = (1 << bits) - 1
        if key in self.entries:
            return self.entries[key]
        for k, v in self.entries.items():
            if k < 0 and (k & mask) == (key & mask):
                return v
        return None

    def flag_names(self, field_name: str, value: int, rec: dict[str, int] | None = None) -> list[str]:
        """For a `__print_flags` table: the names of the flags set in the table's expression
        evaluated with `REC->field_name == value` (table order)."""
        values = dict(rec or {})
        values[field_name] = value
        try:
            v = eval_c_int(self.expr, values)
        except (KeyError, ValueError):
            return []
        return [name for bit, name in self.entries.items() if bit and (v & bit) == bit]


def _top_ternary(text: str) -> tuple[int, int] | None:
    """Offsets of the `?` and matching `:` of a ternary at bracket depth 0, if any."""
    q = None
    pending = 0
    for i, c, depth in _scan(text):
        if depth != 0:
            continue
        if c == "?":
            if q is None:
                q = i
            else:
                pending += 1
        elif c == ":" and q is not None:
            if pending:
                pending -= 1
            else:
                return q, i
    return None


def _guard_for(text: str, pos: int) -> tuple[str | None, bool]:
    """The innermost ternary (`cond ? a : b`) around offset `pos` of `text`:
    (condition text, True if `pos` is in the `a` branch), or (None, True) when there is none.

    Descends through parentheses and call arguments, so `((REC->isa == 1) ? X : Y)` and
    `f(1, c ? X : Y)` are understood as well as a bare top-level ternary.
    """
    tern = _top_ternary(text)
    if tern is not None:
        q, colon = tern
        if pos < q:
            lo, hi, here = 0, q, (None, True)
        elif pos < colon:
            lo, hi, here = q + 1, colon, (text[:q].strip(), True)
        else:
            lo, hi, here = colon + 1, len(text), (text[:q].strip(), False)
        inner = _guard_for(text[lo:hi], pos - lo)
        return inner if inner[0] is not None else here
    # No ternary at this level: look inside the bracket group that contains pos.
    for i, c, depth in _scan(text):
        if depth == 0 and c in "({[" and i < pos:
            close = _matching_close(text, i)
            if pos < close:
                body = text[i + 1:close]
                rel = pos - i - 1
                off = 0
                for piece in _split_top(body):
                    if off <= rel <= off + len(piece):
                        return _guard_for(piece, rel - off)
                    off += len(piece) + 1
                return None, True
    return None, True


def _strip_parens(s: str) -> str:
    s = s.strip()
    while s.startswith("(") and _matching_close(s, 0) == len(s) - 1:
        s = s[1:-1].strip()
    return s


def symbolic_tables(format_text: str, field: str = "exit_reason",
                    call: str = "__print_symbolic") -> list[SymbolicTable]:
    """All `__print_symbolic` tables whose value expression uses `REC-><field>`, in file order.

    `format_text` is a whole format file or just its print fmt. Tables nested anywhere (inside
    other calls or ternaries) are found; the innermost ternary around each call becomes its
    guard (`SymbolicTable.applies` evaluates it for given record fields).
    With `call="__print_flags"`, reads flag tables instead (`__print_flags(expr, "delim",
    { bit, "NAME" }, ...)`; see `SymbolicTable.flag_names`).
    """
    if call not in ("__print_symbolic", "__print_flags"):
        raise ValueError(f"unsupported call {call!r}")
    idx = format_text.find("print fmt:")
    text = format_text[idx + len("print fmt:"):] if idx >= 0 else format_text
    text = text.strip()
    field_re = re.compile(r"REC->" + re.escape(field) + r"\b")
    args = _split_top(text)
    # Offsets of each top-level argument, to find which one holds a call.
    starts = []
    off = 0
    for a in args:
        starts.append(off)
        off += len(a) + 1
    tables: list[SymbolicTable] = []
    for m in re.finditer(r"\b" + call + r"\s*\(", text):
        # Skip matches inside string literals.
        if _inside_string(text, m.start()):
            continue
        open_idx = m.end() - 1
        close_idx = _matching_close(text, open_idx)
        inner = text[open_idx + 1:close_idx]
        parts = _split_top(inner)
        expr = parts[0].strip()
        if not field_re.search(expr):
            continue
        entries: dict[int, str] = {}
        first = 2 if call == "__print_flags" else 1  # flags: parts[1] is the delimiter
        for part in parts[first:]:
            part = part.strip()
            if not part:
                continue
            if not (part.startswith("{") and part.endswith("}")):
                raise ValueError(f"unexpected {call} entry {part!r}")
            kv = _split_top(part[1:-1])
            if len(kv) != 2:
                raise ValueError(f"unexpected {call} entry {part!r}")
            name = _c_strings(kv[1])
            if name is None:
                raise ValueError(f"{call} entry without a string name: {part!r}")
            entries[eval_c_int(kv[0])] = name
        # Which top-level argument holds this call, and which ternary branch.
        k = max(j for j, s in enumerate(starts) if s <= m.start())
        arg = args[k]
        lead = len(arg) - len(arg.lstrip())
        guard, branch = _guard_for(arg.strip(), m.start() - starts[k] - lead)
        if guard is not None:
            guard = _strip_parens(guard)
        used = tuple(sorted(set(_REC_RE.findall(expr))))
        tables.append(SymbolicTable(expr, entries, guard, branch, used))
    return tables


def _inside_string(text: str, pos: int) -> bool:
    """Whether offset `pos` of `text` lies inside a string literal."""
    i = 0
    while i < pos:
        c = text[i]
        if c in "\"'":
            quote = c
            j = i + 1
            while j < len(text) and text[j] != quote:
                j += 2 if text[j] == "\\" else 1
            if i < pos <= j:
                return True
            i = j + 1
            continue
        i += 1
    return False


def parse_symbolic(format_text: str, field: str = "exit_reason", **rec: int) -> dict[int, str]:
    """The `{value: name}` table the kernel uses to print `REC-><field>`.

    With several candidate tables (kvm_exit has one for VMX and one for SVM), pass the record
    fields that select one, e.g. `parse_symbolic(text, "exit_reason", isa=2)` for SVM; without
    them the first table in the file is returned. Raises LookupError when the format has no
    table for the field.
    """
    tables = symbolic_tables(format_text, field)
    if not tables:
        raise LookupError(f"no __print_symbolic table for REC->{field} in this format")
    if rec:
        for t in tables:
            if t.applies(rec):
                return dict(t.entries)
        raise LookupError(f"no __print_symbolic table for REC->{field} applies to {rec}")
    return dict(tables[0].entries)


def select_table(tables: list[SymbolicTable], rec: dict[str, int]) -> SymbolicTable | None:
    """The first table whose guard holds for `rec` (tables with an undecidable guard come
    after decided ones); None if there is none."""
    undecided = None
    for t in tables:
        ok = t.applies(rec)
        if ok:
            return t
        if ok is None and undecided is None:
            undecided = t
    return undecided
