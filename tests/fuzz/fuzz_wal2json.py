"""Mutation fuzzer of the wal2json decoder and the replication frame parsers.

Seeds: the frames captured from a real PostgreSQL 15 + wal2json 2.5 server
(tests/data/wal2json_v2_frames.json: XLogData with B/I/C/M objects, keepalives). Each input is
a seed with one to four stacked mutations:

* bytes: bit flips, interesting bytes (NUL, 0xff, quotes, brackets, CESU-8 surrogates...),
  truncation, deletion, duplication, insertion of tokens (``\\u0000``, ``\\ud800``, ``1e400``,
  ``[[[[``...), splices of two frames; on the payload, or on the whole frame (the header
  parsers);
* JSON: any node of the object, including the JSON documents nested in strings (the headers
  column, the table-less envelope), replaced by another type, an interesting value, a deep
  nest, deleted, duplicated or renamed; columns given hostile values (NULL, '', a topic with a
  space, a reserved header name...); re-serialized with random escaping.

Every input goes through what the WAL source does with a CopyData frame (parse the XLogData
header or the keepalive, decode the payload, read the commit time of a B object) and is
checked against the contract in tests/fuzz/contract.py: only ProtocolError or EventDecodeError,
or the exact, well formed event. Open bugs (contract.OPEN_BUGS) are counted, not failed.

    python -m tests.fuzz.fuzz_wal2json                    # 50,000 inputs: the CI run, seconds
    python -m tests.fuzz.fuzz_wal2json --long             # 10 minutes
    python -m tests.fuzz.fuzz_wal2json --duration 60 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outbox_cdc.errors import ProtocolError
from outbox_cdc.protocol import wal2json
from outbox_cdc.protocol.replication import (
    KEEPALIVE_TAG,
    XLOGDATA_HEADER_SIZE,
    XLOGDATA_TAG,
    parse_keepalive,
    parse_xlogdata_header,
)
from tests.fuzz.contract import ContractViolation, decode_checked

FRAMES_FILE = Path(__file__).parents[1] / "data" / "wal2json_v2_frames.json"
PREFIX = "outbox-cdc"  # the message prefix of the captured table-less event
SHORT_ITERATIONS = 50_000
LONG_SECONDS = 600.0

INTERESTING_BYTES = b'\x00\xff\x7f\x80\xc0\xed\x22\x5c{}[],:0-en tu"\n'
TOKENS = [
    b"\\u0000",
    b"\\ud800",
    b"\\udfff",
    b"\\ud83d\\ude00",
    b"\\",
    b'"',
    b"null",
    b"true",
    b"1e400",
    b"-0",
    b"NaN",
    b"Infinity",
    b"[" * 40,
    b"{}",
    b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8 (CESU-8): invalid UTF-8
    b"\xc3\x28",  # invalid 2-byte sequence
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xef\xbb\xbf",  # BOM
    b'"action":"I"',
    b'"action":"M"',
    b'"columns":[]',
    b'"transactional":true',
]
INTERESTING_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",
    "a\udfffb",
    "ce_id",
    "Content-Type",
    "ce_time",
    "with space",
    ".",
    "..",
    "a" * 250,
    "zz",
    "0x00",
    "\\x00",
    "00000000-0000-4000-8000-000000000001",
    "not-a-uuid",
    "infinity",
    "0001-01-01 00:00:00+01",
    "9999-12-31 23:00:00-02",
    "10000-01-01 00:00:00+00",
    "2026-02-30 00:00:00+00",
    "{}",
    "[]",
    "[1,2]",
    '{"base64":"/wA="}',
    '{"a":{"base64":"not base64!"}}',
    '{"a":1}',
    "null",
    "outbox-cdc",
    "ключ-🔑",
    "\u2028\u2029",
]
INTERESTING_NUMBERS: list[Any] = [0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 1.5, 1e308, -0.0]
HOSTILE_COLUMN_VALUES: dict[str, list[Any]] = {
    "id": [None, "", "x", 42, "{00000000-0000-4000-8000-000000000001}", []],
    "created_at": [None, "", "infinity", "2026-13-01 00:00:00+00", 1700000000, "0001-01-01"],
    "topic": [None, "", ".", "..", "with space", "a" * 250, "ü", 5],
    "key": [None, "", "\ud800", 5, True, [1], {"a": 1}, "k\x00"],
    "type": [None, "", " ", 5, "\ud800"],
    "content_type": [None, "", "\x00", "application/x-unknown; v=9", 5],
    "payload": [None, "", "zz", "abc", "ABCD", 5, "0" * 4000],
    "headers": [
        None,
        "",
        "[1,2]",
        '"text"',
        "5",
        "{",
        '{"a":1}',
        '{"a":null}',
        '{"ce_id":"forged"}',
        '{"":"x"}',
        '{"a":{"base64":"***"}}',
        '{"a":"\\ud800"}',
        '{"\\ud800":"x"}',
        "[" * 3000 + "]" * 3000,
        {"a": "b"},
    ],
}


def load_seeds() -> list[bytes]:
    return [bytes.fromhex(f["hex"]) for f in json.loads(FRAMES_FILE.read_text())]


# -- byte mutations ------------------------------------------------------------------------------


def _flip_bit(r: random.Random, data: bytes, _: list[bytes]) -> bytes:
    if not data:
        return data
    i = r.randrange(len(data))
    return data[:i] + bytes([data[i] ^ (1 << r.randrange(8))]) + data[i + 1 :]


def _set_byte(r: random.Random, data: bytes, _: list[bytes]) -> bytes:
    if not data:
        return bytes([r.choice(INTERESTING_BYTES)])
    i = r.randrange(len(data))
    value = r.choice(INTERESTING_BYTES) if r.random() < 0.7 else r.randrange(256)
    return data[:i] + bytes([value]) + data[i + 1 :]


def _truncate(r: random.Random, data: bytes, _: list[bytes]) -> bytes:
    return data[: r.randrange(len(data) + 1)]


def _delete(r: random.Random, data: bytes, _: list[bytes]) -> bytes:
    if not data:
        return data
    i = r.randrange(len(data))
    return data[:i] + data[i + r.randint(1, 16) :]


def _duplicate(r: random.Random, data: bytes, _: list[bytes]) -> bytes:
    if not data:
        return data
    i = r.randrange(len(data))
    j = min(len(data), i + r.randint(1, 64))
    return data[:j] + data[i:j] + data[j:]


def _insert_token(r: random.Random, data: bytes, _: list[bytes]) -> bytes:
    i = r.randrange(len(data) + 1)
    return data[:i] + r.choice(TOKENS) + data[i:]


def _splice(r: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    other = r.choice(seeds)
    return data[: r.randrange(len(data) + 1)] + other[r.randrange(len(other) + 1) :]


BYTE_MUTATORS: list[Callable[[random.Random, bytes, list[bytes]], bytes]] = [
    _flip_bit,
    _set_byte,
    _truncate,
    _delete,
    _duplicate,
    _insert_token,
    _splice,
]


# -- JSON mutations ------------------------------------------------------------------------------


def random_json(r: random.Random, depth: int = 0) -> Any:
    roll = r.random()
    if roll < 0.15:
        return None
    if roll < 0.25:
        return r.choice([True, False])
    if roll < 0.40:
        return r.choice(INTERESTING_NUMBERS)
    if roll < 0.70 or depth > 2:
        return r.choice(INTERESTING_STRINGS)
    if roll < 0.80:
        return [random_json(r, depth + 1) for _ in range(r.randint(0, 3))]
    if roll < 0.95:
        return {
            r.choice(INTERESTING_STRINGS): random_json(r, depth + 1) for _ in range(r.randint(0, 3))
        }
    # a JSON document nested around and above Python's recursion limit, as text (a headers
    # column or an envelope holds it; json.dumps cannot write such a tree itself)
    nest = r.randint(900, 3000)
    return "[" * nest + "]" * nest


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into the tree, and into JSON documents held in strings (marked "json")."""
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    elif isinstance(node, str) and node[:1] in ("{", "["):
        try:
            inner = json.loads(node)
        except (ValueError, RecursionError):
            return out
        out += _paths(inner, (*path, "json"))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        node = json.loads(node) if step == "json" else node[step]
    return node


def _set(node: Any, path: tuple[Any, ...], value: Any, r: random.Random) -> Any:
    """A copy of ``node`` with the node at ``path`` replaced (None: deleted)."""
    if not path:
        return None if value is _DELETE else value
    step, rest = path[0], path[1:]
    if step == "json":
        inner = _set(json.loads(node), rest, value, r)
        return _dumps_text(r, inner)
    out = copy.copy(node)
    if rest:
        out[step] = _set(node[step], rest, value, r)
    elif value is not _DELETE:
        out[step] = value
    elif isinstance(out, dict):
        del out[step]
    else:
        out.pop(step)
    return out


_DELETE = object()


def _dumps_text(r: random.Random, obj: Any) -> str:
    seps = r.choice([(",", ":"), (", ", ": "), (",", ":")])
    return json.dumps(obj, ensure_ascii=r.random() < 0.3, separators=seps)


def _dumps(r: random.Random, obj: Any) -> bytes:
    # a lone surrogate written raw (not escaped) becomes CESU-8 bytes: invalid UTF-8
    return _dumps_text(r, obj).encode("utf-8", "surrogatepass")


def _json_mutate(r: random.Random, obj: Any) -> Any:
    paths = _paths(obj)
    path = r.choice(paths)
    current = _get(obj, path)
    roll = r.random()
    if roll < 0.25 and path:
        return _set(obj, path, _DELETE, r)
    if roll < 0.55:
        return _set(obj, path, random_json(r), r)
    if isinstance(current, str) and roll < 0.8:
        s = current
        i = r.randrange(len(s) + 1)
        variants = [
            s[:i],
            s[:i] + r.choice(INTERESTING_STRINGS) + s[i:],
            s.upper(),
            s + s,
            "",
        ]
        return _set(obj, path, r.choice(variants), r)
    if isinstance(current, dict) and roll < 0.8:
        key = r.choice([*INTERESTING_STRINGS, "action", "columns", "content", "prefix"])
        return _set(obj, (*path, key), random_json(r), r)
    if isinstance(current, list) and current and roll < 0.8:
        return _set(obj, path, [*current, r.choice(current)], r)
    return _set(obj, path, random_json(r), r)


def _column_mutate(r: random.Random, obj: Any) -> Any:
    """Give one column of an insert a hostile value (what another tool may have written)."""
    columns = obj.get("columns") if isinstance(obj, dict) else None
    if not isinstance(columns, list) or not columns:
        return _json_mutate(r, obj)
    obj = copy.deepcopy(obj)
    col = r.choice(obj["columns"])
    name = col.get("name") if isinstance(col, dict) else None
    if isinstance(name, str) and name in HOSTILE_COLUMN_VALUES:
        col["value"] = r.choice(HOSTILE_COLUMN_VALUES[name])
    return obj


def _envelope_mutate(r: random.Random, obj: Any) -> Any:
    """Give one field of a table-less envelope a hostile value."""
    if not (isinstance(obj, dict) and isinstance(obj.get("content"), str)):
        return _json_mutate(r, obj)
    try:
        env = json.loads(obj["content"])
    except (ValueError, RecursionError):
        return _json_mutate(r, obj)
    if not isinstance(env, dict) or not env:
        return _json_mutate(r, obj)
    name = r.choice(list(env))
    hostile = HOSTILE_COLUMN_VALUES.get(name) or [None, 5, "", "\ud800", [], {}, 2]
    env[name] = r.choice(hostile) if r.random() < 0.7 else random_json(r)
    if name == "headers" and isinstance(env[name], str) and r.random() < 0.5:
        with contextlib.suppress(ValueError, RecursionError):
            env[name] = json.loads(env[name])
    return {**obj, "content": _dumps_text(r, env)}


# -- one input -----------------------------------------------------------------------------------


@dataclass
class FuzzResult:
    inputs: int = 0
    seconds: float = 0.0
    seed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    mutators: Counter[str] = field(default_factory=Counter)
    open_bugs: Counter[str] = field(default_factory=Counter)
    open_bug_examples: dict[str, bytes] = field(default_factory=dict)
    violations: list[tuple[str, bytes]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.inputs:,} inputs in {self.seconds:.1f} s (seed {self.seed}): "
            f"{len(self.violations)} contract violations, "
            f"{sum(self.open_bugs.values())} hits of open bugs",
            "outcomes: " + ", ".join(f"{k} {v:,}" for k, v in self.outcomes.most_common()),
            "mutations: " + ", ".join(f"{k} {v:,}" for k, v in self.mutators.most_common()),
        ]
        for bug, count in self.open_bugs.most_common():
            example = self.open_bug_examples[bug]
            lines.append(f"open bug {bug}: {count:,} inputs, e.g. {example[:300]!r}")
        for message, data in self.violations[:10]:
            lines.append(f"VIOLATION: {message[:500]}\n  input ({len(data)} bytes): {data[:600]!r}")
        return "\n".join(lines)


def check_frame(frame: bytes) -> str:
    """What the WAL source does with one CopyData frame; returns the outcome or raises
    ContractViolation."""
    if not frame:
        return "empty"
    tag = frame[0]
    if tag == KEEPALIVE_TAG:
        try:
            parse_keepalive(frame)
        except ProtocolError:
            return "protocol_error"
        except Exception as exc:
            raise ContractViolation(f"parse_keepalive raised {type(exc).__name__}: {exc}") from exc
        return "keepalive"
    if tag != XLOGDATA_TAG:
        return "other_tag"  # the source ignores unknown messages
    try:
        start, _ = parse_xlogdata_header(frame)
    except ProtocolError:
        return "protocol_error"
    except Exception as exc:
        raise ContractViolation(
            f"parse_xlogdata_header raised {type(exc).__name__}: {exc}"
        ) from exc
    payload = frame[XLOGDATA_HEADER_SIZE:]
    outcome, _ = decode_checked(wal2json.Wal2JsonDecoder(PREFIX), payload, start)
    if outcome == "begin":
        try:
            value = wal2json.commit_time(payload)
        except Exception as exc:
            raise ContractViolation(f"commit_time raised {type(exc).__name__}: {exc}") from exc
        if value is not None and not isinstance(value, float):
            raise ContractViolation(f"commit_time returned {value!r}")
    return outcome


def make_input(r: random.Random, seeds: list[bytes]) -> tuple[bytes, str]:
    frame = r.choice(seeds)
    names = []
    whole_frame = frame[0] != XLOGDATA_TAG or r.random() < 0.1
    if whole_frame:
        data = frame
        for _ in range(r.randint(1, 3)):
            m = r.choice(BYTE_MUTATORS)
            names.append("frame:" + m.__name__.strip("_"))
            data = m(r, data, seeds)
        return data, "+".join(names)
    header, payload = frame[:XLOGDATA_HEADER_SIZE], frame[XLOGDATA_HEADER_SIZE:]
    for _ in range(r.randint(1, 4)):
        if r.random() < 0.6:
            try:
                obj = json.loads(payload)
            except (ValueError, RecursionError):
                obj = None
            if obj is not None:
                kind = r.random()
                try:
                    if kind < 0.35:
                        obj, name = _column_mutate(r, obj), "json:column"
                    elif kind < 0.55:
                        obj, name = _envelope_mutate(r, obj), "json:envelope"
                    else:
                        obj, name = _json_mutate(r, obj), "json:node"
                    payload = _dumps(r, obj)
                except RecursionError:
                    # a tree nested too deep for json.dumps (a mutation of a nested document):
                    # mutate its bytes instead
                    pass
                else:
                    names.append(name)
                    continue
        m = r.choice(BYTE_MUTATORS)
        names.append("bytes:" + m.__name__.strip("_"))
        payload = m(r, payload, [s[XLOGDATA_HEADER_SIZE:] for s in seeds])
    return header + payload, "+".join(names)


def minimize(data: bytes, message: str, budget: int = 2000) -> bytes:
    """Greedy: drop chunks while the same kind of violation remains (for the report)."""
    kind = message.split(":")[0]

    def still_fails(candidate: bytes) -> bool:
        try:
            check_frame(candidate)
        except ContractViolation as exc:
            return exc.bug is None and str(exc).split(":")[0] == kind
        return False

    chunk = max(1, len(data) // 2)
    tries = 0
    while chunk >= 1 and tries < budget:
        i = XLOGDATA_HEADER_SIZE if data[:1] == b"w" else 0
        shrunk = False
        while i < len(data) and tries < budget:
            candidate = data[:i] + data[i + chunk :]
            tries += 1
            if still_fails(candidate):
                data, shrunk = candidate, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return data


def run(
    iterations: int | None = SHORT_ITERATIONS,
    *,
    seconds: float | None = None,
    seed: int = 1,
    progress: Callable[[FuzzResult], None] | None = None,
) -> FuzzResult:
    """Fuzz until ``iterations`` inputs or ``seconds`` passed, whichever comes first."""
    r = random.Random(seed)
    seeds = load_seeds()
    result = FuzzResult(seed=seed)
    started = time.monotonic()
    deadline = started + seconds if seconds else None
    next_progress = started + 60
    # the seeds themselves first: they must pass
    inputs = [(s, "seed") for s in seeds]
    while True:
        if inputs:
            data, how = inputs.pop()
        else:
            if iterations is not None and result.inputs >= iterations:
                break
            if deadline is not None and (result.inputs & 255) == 0 and time.monotonic() > deadline:
                break
            data, how = make_input(r, seeds)
        result.inputs += 1
        for name in how.split("+"):
            result.mutators[name] += 1
        try:
            result.outcomes[check_frame(data)] += 1
        except ContractViolation as exc:
            if exc.bug is not None:
                result.open_bugs[exc.bug] += 1
                result.outcomes["open_bug"] += 1
                example = result.open_bug_examples.get(exc.bug)
                if example is None or len(data) < len(example):
                    result.open_bug_examples[exc.bug] = data
            else:
                result.outcomes["VIOLATION"] += 1
                if len(result.violations) < 50:
                    result.violations.append((str(exc), minimize(data, str(exc))))
        if progress is not None and time.monotonic() >= next_progress:
            result.seconds = time.monotonic() - started
            progress(result)
            next_progress += 60
    result.seconds = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=None, help="inputs (default 50,000)")
    parser.add_argument("--duration", type=float, default=None, help="seconds to run")
    parser.add_argument("--long", action="store_true", help="run for 10 minutes")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    seconds = LONG_SECONDS if args.long else args.duration
    iterations = args.iterations
    if iterations is None and seconds is None:
        iterations = SHORT_ITERATIONS

    def progress(res: FuzzResult) -> None:
        print(
            f"... {res.inputs:,} inputs, {res.seconds:.0f} s, "
            f"{len(res.violations)} violations, {sum(res.open_bugs.values())} open-bug hits",
            file=sys.stderr,
            flush=True,
        )

    print(f"fuzzing with seed {seed}", file=sys.stderr, flush=True)
    result = run(iterations, seconds=seconds, seed=seed, progress=progress)
    print(result.summary())
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
