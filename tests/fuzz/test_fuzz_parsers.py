"""Byte-level fuzzing of every trust-boundary parser (tests/fuzz/targets.py).

Each target gets random bytes, mutations of its valid encodings (truncation, bit flips, lying
length / count fields, inserted and duplicated runs, appended garbage) and the valid encodings
themselves; the target checks the parser's contract (documented error type with a readable
message, canonical round trip). QMOI_FUZZ_EXAMPLES=N raises the budget (fuzzlib.examples).
"""

from __future__ import annotations

import pytest
from fuzz.fuzzlib import bytes_inputs, examples
from fuzz.targets import NASTY, TARGETS
from hypothesis import given
from hypothesis import strategies as st

#: Per-target budget: cheap decoders get more examples than the slow ones (membership logs
#: verify signatures, settings parsers are pure Python over text, snapshots decrypt).
_BUDGET = {
    "membership_log": 60,
    "member_op": 80,
    "settings_json": 80,
    "settings_toml": 80,
    "settings_ini": 80,
    "settings_gitconfig": 40,
    "snapshot_content": 60,
    "snapshot_manifest": 60,
    "state_vector": 100,
    "envelope": 100,
}
_DEFAULT = 150

_STRATEGIES = {name: bytes_inputs(t.samples()) for name, t in TARGETS.items()}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_valid_samples_pass(name: str) -> None:
    """The seeds are valid: each one is accepted (and round-trips where that applies)."""
    target = TARGETS[name]
    samples = target.samples()
    assert samples
    for data in samples:
        target.check(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_nasty_inputs(name: str) -> None:
    """Deep nesting, long runs, invalid UTF-8: a clean error (or a value), bounded time."""
    for data in NASTY:
        TARGETS[name].check(data)


def _fuzz(name: str) -> None:
    target = TARGETS[name]

    @examples(_BUDGET.get(name, _DEFAULT))
    @given(data=_STRATEGIES[name])
    def run(data: bytes) -> None:
        target.check(data)

    run()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz(name: str) -> None:
    _fuzz(name)


# -- structured strategies: text-level inputs the byte mutations rarely produce -----------------

_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)


@examples(150)
@given(
    obj=st.fixed_dictionaries(
        {},
        optional={
            "v": st.one_of(st.just(1), st.booleans(), st.integers(), st.text(max_size=3)),
            "cmd": st.one_of(
                st.sampled_from(
                    [
                        "status",
                        "invite",
                        "add_space",
                        "stop",
                        "devices",
                        "revoke",
                        "pause",
                        "resume",
                        "settings",
                        "nope",
                    ]
                ),
                _JSONISH,
            ),
            "space": _JSONISH,
            "device": _JSONISH,
            "role": st.one_of(st.sampled_from(["admin", "member", "reader", "root"]), _JSONISH),
            "expires_s": st.one_of(st.integers(), _JSONISH),
        },
    )
)
def test_control_request_structured(obj: dict[str, object]) -> None:
    import json

    TARGETS["control_request"].check(json.dumps(obj).encode() + b"\n")


@examples(200)
@given(
    text=st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "a",
                    "b.txt",
                    ".",
                    "..",
                    "",
                    " ",
                    "CON",
                    "nul.txt",
                    "x.",
                    "é",
                    "\x00",
                    "\x7f",
                    "\\",
                    "C:",
                    "\ud800",
                    "a" * 300,
                ]
            ),
            st.text(max_size=12),
        ),
        min_size=1,
        max_size=6,
    ).map("/".join)
)
def test_paths_structured(text: str) -> None:
    TARGETS["path"].check(text.encode("utf-8", "surrogatepass"))


_TOML_PIECES = st.sampled_from(
    [
        "a = 1\n",
        "[t]\n",
        "[[t]]\n",
        'a.b = "x"\n',
        '"q" = 2\n',
        "d = 1979-05-27\n",
        "x = [\n",
        "]\n",
        "i = {a = 1}\n",
        "f = nan\n",
        "s = '''\n",
        "# c\n",
        "[t.a]\n",
        "a = [[1], {}]\n",
        "\n",
        "b = true\n",
        "o = 0o7\n",
        "h = 0xff\n",
        "e = 1e400\n",
        "t = 07:32:00\n",
    ]
)
_JSON_PIECES = st.sampled_from(
    [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        '"k"',
        "1",
        "-0.5e3",
        "null",
        "true",
        "// c\n",
        "/* c */",
        '"\\ud800"',
        '"\\u00e9"',
        " ",
        "\n",
        '"a.b"',
        "1e999",
        '"',
    ]
)
_INI_PIECES = st.sampled_from(
    [
        "[s]\n",
        '[s "sub"]\n',
        "k = v\n",
        "k\n",
        "\tk = v \\\n",
        "; c\n",
        "# c\n",
        "[\n",
        "=\n",
        'k = "q\n',
        "[s.t]\n",
        " k = v\n",
        "\n",
        "k=\n",
        "[]\n",
    ]
)


@examples(150)
@given(
    fmt=st.sampled_from(["json", "toml", "ini", "gitconfig"]),
    pieces=st.data(),
)
def test_settings_structured(fmt: str, pieces: st.DataObject) -> None:
    strat = {
        "json": _JSON_PIECES,
        "toml": _TOML_PIECES,
        "ini": _INI_PIECES,
        "gitconfig": _INI_PIECES,
    }[fmt]
    text = "".join(pieces.draw(st.lists(strat, max_size=30)))
    name = "settings_" + fmt
    TARGETS[name].check(text.encode())


@examples(100)
@given(content=_JSONISH)
def test_snapshot_content_structured(content: object) -> None:
    import json

    TARGETS["snapshot_content"].check(json.dumps(content).encode())


@examples(150)
@given(manifest=_JSONISH)
def test_chunk_manifest_structured(manifest: object) -> None:
    import json

    TARGETS["chunk_manifest"].check(json.dumps(manifest).encode())


# -- memory: a lying length or count field must not make a parser allocate for it -------------

#: Python-level allocation allowed while parsing one input: a fixed allowance plus a multiple
#: of the input's own size (copies of the input are fine; trusting a u32 length is not).
_MEM_FIXED = 16 * 1024 * 1024
_MEM_PER_INPUT_BYTE = 64


def _length_lies(sample: bytes) -> list[bytes]:
    """The sample with 0xFFFFFFFF / 0x7FFFFFFF / 0xFFFF written over every offset in turn
    (capped at 40 offsets spread over the sample)."""
    step = max(1, len(sample) // 40)
    out = []
    for pos in range(0, len(sample), step):
        for lie in (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\xff\xff"):
            out.append(sample[:pos] + lie + sample[pos + len(lie) :])
    return out


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_lying_lengths_do_not_allocate(name: str) -> None:
    import tracemalloc

    target = TARGETS[name]
    inputs = [lie for s in target.samples() for lie in _length_lies(s)]
    tracemalloc.start()
    try:
        for data in inputs:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            target.check(data)
            peak = tracemalloc.get_traced_memory()[1] - base
            limit = _MEM_FIXED + _MEM_PER_INPUT_BYTE * len(data)
            assert peak <= limit, f"{name}: {peak} bytes allocated for a {len(data)}-byte input"
    finally:
        tracemalloc.stop()
