"""Built-in generators of reasoning tasks: the offline embedded default needs nothing but the package.

Each generator is a function `(n, seed, **params) -> Iterator[dict]` yielding rows with the fields
`uid` (stable source row id), `task` (the subset: one stratum per task), `question`, `answer` and
`condition` (direct = answer only, cot = worked steps). Rows are deterministic in (n, seed, params).

`near_dup_rate` / `exact_dup_rate` plant realistic duplicates: a later row repeats an earlier one with
light edits (a synonym, a changed filler phrase, extra punctuation or whitespace) or verbatim, as
scraped instruction sets do. The dedup stage must find them.

Held-out split. Every problem has a canonical text (`problem`, one row field): the problem itself,
independent of its phrasing and of the condition (arithmetic "123 + 45", a word problem's or a
sequence's question, a comparison's two fractions in sorted order). A problem whose canonical text
hashes into the held-out bucket (`is_heldout`, about 1 in HELDOUT_BUCKETS) is never emitted by a
generator run from a spec, with any seed and any parameters: the generators draw again instead. Only
`heldout(name, n, seed, **params)` emits those problems (evaluation.heldout builds the demo's held-out
benchmark with it); specs cannot ask for them (`heldout` is not a spec parameter).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import zlib
from typing import Callable, Iterator

GENERATORS: dict[str, Callable[..., Iterator[dict]]] = {}


def generator(name: str):
    def deco(fn):
        GENERATORS[name] = fn
        return fn

    return deco


def get_generator(name: str) -> Callable[..., Iterator[dict]]:
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; built-in generators: {sorted(GENERATORS)}")
    return GENERATORS[name]


def _rng(seed: int, name: str) -> random.Random:
    return random.Random((seed * 1_000_003) ^ zlib.crc32(name.encode()))


# ------------------------------------------------------------------------------------------------
# the held-out split
# ------------------------------------------------------------------------------------------------
HELDOUT_BUCKETS = 32  # 1 problem in 32 (by the hash of its canonical text) is held out
_MAX_DRAWS = 100_000  # draws in a row without a problem of the wanted split: the parameters leave none


def canonical(text: str) -> str:
    """The canonical form of a problem's text: lower case, runs of whitespace as one space, stripped."""
    return " ".join(text.lower().split())


def is_heldout(problem: str) -> bool:
    """True when the problem (its canonical text) is in the held-out bucket: never a training row."""
    h = hashlib.blake2b(canonical(problem).encode("utf-8"), digest_size=8, person=b"hrm-heldout").digest()
    return int.from_bytes(h, "big") % HELDOUT_BUCKETS == 0


def _draw(rng: random.Random, make: Callable[[random.Random], tuple], heldout: bool, what: str) -> tuple:
    """`make(rng)` -> (canonical problem text, ...) drawn again until the problem is in the wanted split."""
    for _ in range(_MAX_DRAWS):
        out = make(rng)
        if is_heldout(out[0]) == heldout:
            return out
    raise ValueError(f"{what}: no {'held-out' if heldout else 'training'} problem in {_MAX_DRAWS} draws; "
                     "the parameters leave too few problems")


# ------------------------------------------------------------------------------------------------
# arithmetic with and without worked steps
# ------------------------------------------------------------------------------------------------
def _digits(rng: random.Random, lo: int, hi: int) -> int:
    d = rng.randint(lo, hi)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def _add_steps(a: int, b: int) -> list[str]:
    sa, sb = str(a)[::-1], str(b)[::-1]
    carry, digits, steps = 0, [], []
    for i in range(max(len(sa), len(sb))):
        x = int(sa[i]) if i < len(sa) else 0
        y = int(sb[i]) if i < len(sb) else 0
        s = x + y + carry
        place = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]
        pname = place[i] if i < len(place) else f"10^{i}"
        steps.append(f"{pname}: {x} + {y}" + (f" + {carry} (carry)" if carry else "") + f" = {s}, write {s % 10}"
                     + (f", carry {s // 10}" if s >= 10 else ""))
        digits.append(s % 10)
        carry = s // 10
    if carry:
        steps.append(f"final carry: write {carry}")
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    steps, partials = [], []
    for i, ch in enumerate(str(b)[::-1]):
        d = int(ch)
        p = a * d * 10**i
        partials.append(p)
        steps.append(f"{a} x {d}" + (f" x 10^{i}" if i else "") + f" = {p}")
    if len(partials) > 1:
        steps.append(" + ".join(str(p) for p in partials) + f" = {sum(partials)}")
    return steps


@generator("arithmetic")
def arithmetic(n: int, seed: int, cot: bool = False, max_digits: int = 6, ops: str = "+-*", *,
               heldout: bool = False) -> Iterator[dict]:
    """Multi-digit +, - and x. cot=True writes the column-by-column or partial-product steps."""
    rng = _rng(seed, f"arithmetic-{cot}-{max_digits}-{ops}" + ("-heldout" if heldout else ""))
    phr = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.", "Find the value of {a} {op} {b}."]

    def make(rng: random.Random) -> tuple[str, str, int, int]:
        op = ops[rng.randrange(len(ops))]
        if op == "*":
            a, b = _digits(rng, 2, max_digits), _digits(rng, 1, max(1, max_digits // 2))
        else:
            a, b = _digits(rng, 2, max_digits), _digits(rng, 2, max_digits)
        if op == "-" and b > a:
            a, b = b, a
        sym = {"+": "+", "-": "-", "*": "x"}[op]
        return f"{a} {sym} {b}", op, a, b  # the problem whatever its phrasing

    for i in range(n):
        problem, op, a, b = _draw(rng, make, heldout, "arithmetic")
        res = a + b if op == "+" else a - b if op == "-" else a * b
        sym = {"+": "+", "-": "-", "*": "x"}[op]
        q = rng.choice(phr).format(a=a, op=sym, b=b)
        if cot:
            if op == "+":
                steps = _add_steps(a, b)
            elif op == "*":
                steps = _mul_steps(a, b)
            else:
                steps = [f"{a} - {b}: subtract {b} from {a}", f"{a} - {b // 10 * 10} = {a - b // 10 * 10}",
                         f"{a - b // 10 * 10} - {b % 10} = {res}"]
            ans = "Let's work it out step by step.\n" + "\n".join(steps) + f"\nThe answer is {res}."
        else:
            ans = str(res)
        task = {"+": "addition", "-": "subtraction", "*": "multiplication"}[op]
        yield {"uid": f"{i}", "task": task, "question": q, "answer": ans, "condition": "cot" if cot else "direct",
               "problem": canonical(problem)}


# ------------------------------------------------------------------------------------------------
# multi-step word problems from templates
# ------------------------------------------------------------------------------------------------
NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam",
         "Mona", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Yusuf"]
ITEMS = [("apples", "apple"), ("notebooks", "notebook"), ("pencils", "pencil"), ("tickets", "ticket"),
         ("muffins", "muffin"), ("stickers", "sticker"), ("marbles", "marble"), ("books", "book"),
         ("oranges", "orange"), ("candles", "candle"), ("plants", "plant"), ("cookies", "cookie")]
PLACES = ["the market", "a fair", "the school shop", "a bakery", "the library sale", "a flea market"]


def _wp_shopping(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    (items, _), place = rng.choice(ITEMS), rng.choice(PLACES)
    k, price, extra, paid = rng.randint(2, 12), rng.randint(2, 15), rng.randint(1, 9), 0
    total = k * price + extra
    paid = (total // 10 + 1 + rng.randint(0, 3)) * 10
    q = (f"{name} buys {k} {items} at {place} for ${price} each and pays a ${extra} fee. "
         f"{name} hands over ${paid}. How much change does {name} get?")
    steps = [f"The {items} cost {k} x ${price} = ${k * price}.",
             f"With the fee the total is ${k * price} + ${extra} = ${total}.",
             f"The change is ${paid} - ${total} = ${paid - total}."]
    return q, steps, paid - total


def _wp_rate(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    speed, h1, h2 = rng.randint(3, 80), rng.randint(1, 6), rng.randint(1, 6)
    q = (f"{name} travels at {speed} km per hour for {h1} hours, rests, then travels {h2} more hours at the "
         f"same speed. How many kilometers does {name} travel in total?")
    steps = [f"First part: {speed} x {h1} = {speed * h1} km.", f"Second part: {speed} x {h2} = {speed * h2} km.",
             f"Total: {speed * h1} + {speed * h2} = {speed * (h1 + h2)} km."]
    return q, steps, speed * (h1 + h2)


def _wp_share(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.sample(NAMES, 2)
    items, _ = rng.choice(ITEMS)
    per, people, kept = rng.randint(2, 9), rng.randint(2, 8), rng.randint(1, 20)
    total = per * people + kept
    q = (f"{a} has {total} {items}. {a} keeps {kept} and shares the rest equally between {b} and "
         f"{people - 1} other friends. How many {items} does each friend get?")
    steps = [f"{a} shares {total} - {kept} = {total - kept} {items}.",
             f"There are 1 + {people - 1} = {people} friends.",
             f"Each friend gets {total - kept} / {people} = {per}."]
    return q, steps, per


def _wp_age(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.sample(NAMES, 2)
    age_b, diff, years = rng.randint(3, 40), rng.randint(1, 30), rng.randint(2, 15)
    q = (f"{a} is {diff} years older than {b}. {b} is {age_b} years old now. "
         f"How old will {a} be in {years} years?")
    steps = [f"{a} is {age_b} + {diff} = {age_b + diff} now.",
             f"In {years} years {a} will be {age_b + diff} + {years} = {age_b + diff + years}."]
    return q, steps, age_b + diff + years


def _wp_percent(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    items, _ = rng.choice(ITEMS)
    price = rng.randint(2, 40) * 10
    pct = rng.choice([10, 20, 25, 50])
    q = f"A box of {items} costs ${price}. {name} gets a {pct}% discount. How much does {name} pay?"
    off = price * pct // 100
    steps = [f"The discount is {pct}% of ${price} = ${off}.", f"{name} pays ${price} - ${off} = ${price - off}."]
    return q, steps, price - off


WORD_PROBLEMS = {"shopping": _wp_shopping, "rate": _wp_rate, "share": _wp_share, "age": _wp_age,
                 "percent": _wp_percent}


@generator("word_problems")
def word_problems(n: int, seed: int, cot: bool = True, kinds: str = "shopping,rate,share,age,percent", *,
                  heldout: bool = False) -> Iterator[dict]:
    """Multi-step word problems from templates; cot=True writes the steps, then '#### answer'."""
    rng = _rng(seed, f"word_problems-{cot}-{kinds}" + ("-heldout" if heldout else ""))
    names = [k.strip() for k in kinds.split(",") if k.strip()]
    for k in names:
        if k not in WORD_PROBLEMS:
            raise ValueError(f"word_problems: unknown kind {k!r}; known: {sorted(WORD_PROBLEMS)}")

    def make(rng: random.Random) -> tuple[str, str, list[str], int]:
        kind = names[rng.randrange(len(names))]
        q, steps, ans = WORD_PROBLEMS[kind](rng)
        return q, kind, steps, ans  # the question is the problem

    for i in range(n):
        q, kind, steps, ans = _draw(rng, make, heldout, "word_problems")
        text = "\n".join(steps) + f"\n#### {ans}" if cot else str(ans)
        yield {"uid": f"{i}", "task": kind, "question": q, "answer": text, "condition": "cot" if cot else "direct",
               "problem": canonical(q)}


# ------------------------------------------------------------------------------------------------
# sequences and comparisons (short direct answers)
# ------------------------------------------------------------------------------------------------
@generator("sequences")
def sequences(n: int, seed: int, *, heldout: bool = False) -> Iterator[dict]:
    """Next terms of arithmetic, geometric and Fibonacci-like sequences, with a one-line rule."""
    rng = _rng(seed, "sequences" + ("-heldout" if heldout else ""))

    def make(rng: random.Random) -> tuple[str, str, list[int], str]:
        kind = rng.choice(["arithmetic", "geometric", "fibonacci"])
        if kind == "arithmetic":
            a, d = rng.randint(-200, 200), rng.randint(-25, 25) or 3
            seq = [a + d * j for j in range(6)]
            rule = f"Each term adds {d}."
        elif kind == "geometric":
            a, r = rng.randint(1, 99) * rng.choice([1, -1]), rng.randint(2, 7)
            seq = [a * r**j for j in range(6)]
            rule = f"Each term is multiplied by {r}."
        else:
            x, y = rng.randint(1, 60), rng.randint(1, 60)
            seq = [x, y]
            while len(seq) < 6:
                seq.append(seq[-1] + seq[-2])
            rule = "Each term is the sum of the two before it."
        q = f"What number comes next: {', '.join(map(str, seq[:5]))}, ...?"
        return q, kind, seq, rule  # the question (the five terms shown) is the problem

    for i in range(n):
        q, kind, seq, rule = _draw(rng, make, heldout, "sequences")
        yield {"uid": f"{i}", "task": f"seq_{kind}", "question": q, "answer": f"{rule} The next term is {seq[5]}.",
               "condition": "cot", "problem": canonical(q)}


@generator("comparisons")
def comparisons(n: int, seed: int, *, heldout: bool = False) -> Iterator[dict]:
    """Which of two fractions/decimals is larger (direct answers)."""
    rng = _rng(seed, "comparisons" + ("-heldout" if heldout else ""))

    def make(rng: random.Random) -> tuple[str, int, int, int, int]:
        a, b, c, d = rng.randint(1, 30), rng.randint(2, 40), rng.randint(1, 30), rng.randint(2, 40)
        while a * d == b * c:
            c += 1
        pair = sorted([f"{a}/{b}", f"{c}/{d}"])  # the same problem in either order
        return f"which is larger: {pair[0]} or {pair[1]}", a, b, c, d

    for i in range(n):
        problem, a, b, c, d = _draw(rng, make, heldout, "comparisons")
        q = f"Which is larger, {a}/{b} or {c}/{d}?"
        yield {"uid": f"{i}", "task": "fractions", "question": q, "answer": f"{a}/{b}" if a * d > b * c else f"{c}/{d}",
               "condition": "direct", "problem": canonical(problem)}


# ------------------------------------------------------------------------------------------------
# duplicates, as real scraped sets have them
# ------------------------------------------------------------------------------------------------
_EDITS = [("How much", "How much money"), ("travels", "drives"), ("shares", "splits"), ("buys", "purchases"),
          ("What is", "What's"), ("Compute", "Please compute"), ("years old", "years of age"), ("?", "??"),
          (". ", ".  "), ("each", "apiece")]


def _light_edit(rng: random.Random, text: str) -> str:
    """One or two small edits that keep the text a near-duplicate (high word 5-gram overlap)."""
    out = text
    for _ in range(rng.randint(1, 2)):
        options = [e for e in _EDITS if e[0] in out]
        if options:
            a, b = rng.choice(options)
            out = out.replace(a, b, 1)
        else:
            out = out + " Show your work."
    return out if out != text else text + " Explain."


class _RowPool:
    """The rows copies are drawn from, kept in a temporary file (one JSON line each, the file's offsets
    in an array of int64) rather than in memory: a generator source of any size holds a few bytes per
    pooled row. `pool[i]` reads row i back (a fresh dict, as `dict(row)` was)."""

    def __init__(self) -> None:
        import tempfile
        from array import array

        self._f = tempfile.TemporaryFile()
        self._off = array("q", [0])
        self._end = 0

    def __len__(self) -> int:
        return len(self._off) - 1

    def append(self, row: dict) -> None:
        b = json.dumps(row).encode() + b"\n"
        self._f.seek(self._end)
        self._f.write(b)
        self._end += len(b)
        self._off.append(self._end)

    def __getitem__(self, i: int) -> dict:
        self._f.seek(self._off[i])
        return json.loads(self._f.read(self._off[i + 1] - self._off[i]))

    def close(self) -> None:
        self._f.close()


def with_duplicates(rows: Iterator[dict], seed: int, near_dup_rate: float = 0.0, exact_dup_rate: float = 0.0,
                    name: str = "") -> Iterator[dict]:
    """Pass rows through; after each, with the given rates, emit a verbatim or lightly edited copy of
    an earlier row (ids are new: the copy is a different source row, as in real data)."""
    if near_dup_rate <= 0 and exact_dup_rate <= 0:
        yield from rows
        return
    rng = _rng(seed, f"dups-{name}")
    pool = _RowPool()
    k = 0
    try:
        for row in rows:
            yield row
            # only rows long enough to carry 5-grams make useful near-duplicates
            if len((row["question"] + " " + row["answer"]).split()) >= 20:
                pool.append(row)
            u = rng.random()
            if len(pool) and u < exact_dup_rate + near_dup_rate:
                src = pool[rng.randrange(len(pool))]
                copy = dict(src)
                copy["uid"] = f"dup{k}"
                k += 1
                if u >= exact_dup_rate:
                    copy["question"] = _light_edit(rng, src["question"])
                yield copy
    finally:
        pool.close()


# parameters every generator takes besides its own: row count, seed, planted duplicates
COMMON_PARAMS = ("n", "seed", "near_dup_rate", "exact_dup_rate")


def accepted_params(name: str) -> list[str] | None:
    """The parameter names a spec may give generator `name` (None: any, it takes **kwargs)."""
    sig = inspect.signature(get_generator(name))
    own = [p for p in list(sig.parameters.values())[2:] if p.name != "heldout"]  # after (n, seed)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own):
        return None
    return sorted({*COMMON_PARAMS, *(p.name for p in own)})


def check_params(name: str, params: dict) -> list[str]:
    """Problems with a spec's `params` for generator `name`, one message each (empty: fine)."""
    if name not in GENERATORS:
        return [f"unknown generator {name!r}; built-in generators: {sorted(GENERATORS)}"]
    problems = []
    n = params.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        problems.append(f"generator {name!r} needs an integer 'n' >= 0 (rows), got {n!r}")
    if "seed" in params and (not isinstance(params["seed"], int) or isinstance(params["seed"], bool)):
        problems.append(f"generator {name!r}: 'seed' must be an integer, got {params['seed']!r}")
    for k in ("near_dup_rate", "exact_dup_rate"):
        v = params.get(k, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            problems.append(f"generator {name!r}: {k!r} must be a number in [0, 1], got {v!r}")
    if "heldout" in params:
        problems.append(f"generator {name!r}: 'heldout' is not a spec parameter (held-out problems are never "
                        "training data; evaluation.heldout builds the held-out benchmark)")
    accepted = accepted_params(name)
    if accepted is not None:
        for k in params:
            if k == "heldout":
                continue
            if k not in accepted:
                problems.append(f"generator {name!r} has no parameter {k!r}; accepted: {accepted}")
    return problems


def generate(name: str, n: int, seed: int, **params) -> Iterator[dict]:
    """Training rows of generator `name` (no held-out problem among them, duplicates planted as asked)."""
    if "heldout" in params:
        raise ValueError(f"generator {name!r}: 'heldout' is not a parameter of training data; "
                         "use pipeline.generators.heldout")
    near = float(params.pop("near_dup_rate", 0.0))
    exact = float(params.pop("exact_dup_rate", 0.0))
    fn = get_generator(name)
    try:
        rows = fn(n, seed, **params)
    except TypeError as e:
        raise ValueError(f"generator {name!r}: bad params {sorted(params)}: {e}") from None
    return with_duplicates(rows, seed, near, exact, name)


def heldout(name: str, n: int, seed: int, **params) -> Iterator[dict]:
    """n rows of generator `name` whose problems are all in the held-out bucket (never training rows),
    drawn like the training rows of the same parameters; duplicate parameters are ignored. A small
    problem space repeats problems: callers keep the first row of each `problem`."""
    for k in ("near_dup_rate", "exact_dup_rate", "heldout"):
        params.pop(k, None)
    fn = get_generator(name)
    try:
        return fn(n, seed, heldout=True, **params)
    except TypeError as e:
        raise ValueError(f"generator {name!r}: bad params {sorted(params)}: {e}") from None
