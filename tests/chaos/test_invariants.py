"""The invariant checker and ledger on hand-made trees: each check catches what it is for
(a checker that never fails would pass every chaos run)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from chaos.invariants import OutsideWatch, check_ledger, check_plaintext, check_settings
from chaos.ledger import BIN_MAGIC, Ledger, interleaved, lineage_of, tokens_in


def _text(lin: str, *toks: str) -> bytes:
    return f"# lineage {lin}\n".encode() + b"".join(f"w {t}\n".encode() for t in toks)


def test_a_lost_line_is_reported_and_a_removed_one_is_not() -> None:
    led = Ledger()
    lin = led.lineage()
    t1, t2, t3 = led.token("a"), led.token("a"), led.token("b")
    led.text_written("a", "create", "f.txt", lin, [t1, t2], [])
    led.text_written("b", "edit", "f.txt", lin, [t3], [t2])  # b replaced t2's line
    assert check_ledger({"f.txt": _text(lin, t1, t3)}, led) == []
    lost = check_ledger({"f.txt": _text(lin, t3)}, led)
    assert len(lost) == 1 and t1 in lost[0].detail and lost[0].kind == "lost"


def test_a_deleted_lineage_is_not_required() -> None:
    led = Ledger()
    lin = led.lineage()
    t = led.token("a")
    led.text_written("a", "create", "f.txt", lin, [t], [])
    led.text_written("b", "append", "f.txt", lin, [led.token("b")], [])
    led.kill_lineage("c", "delete", "f.txt", lin)
    assert check_ledger({}, led) == []


def test_binary_versions_concurrent_both_kept_superseded_not() -> None:
    led = Ledger()
    lin = led.lineage()
    v0 = BIN_MAGIC + lin.encode() + b"\n\x00v0"
    v1 = BIN_MAGIC + lin.encode() + b"\n\x00v1"
    v2 = BIN_MAGIC + lin.encode() + b"\n\x00v2"
    led.binary_written("a", "bin_new", "x.bin", lin, v0, None)
    led.binary_written("a", "bin_edit", "x.bin", lin, v1, v0)  # a overwrote v0
    led.binary_written("b", "bin_edit", "x.bin", lin, v2, v0)  # b too, concurrently
    assert lineage_of(v1) == lin
    assert check_ledger({"x.bin": v1, "x (conflict b).bin": v2}, led) == []
    lost = check_ledger({"x.bin": v1}, led)
    assert len(lost) == 1 and hashlib.sha256(v2).hexdigest()[:12] in lost[0].detail


def test_tokens_parse_exactly() -> None:
    assert tokens_in(b"a tok-a-1; tok-a-12; tok-a-1") == {"tok-a-1;", "tok-a-12;"}


def test_outside_watch_sees_a_stray_file_and_ignores_allowed(tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    other.mkdir()
    (other / "keep.txt").write_text("x")
    watch = OutsideWatch(tmp_path, [root])
    (root / "inside.txt").write_text("fine")
    assert watch.changes() == []
    (other / "stray.txt").write_text("written outside")
    (tmp_path / OutsideWatch.SENTINEL).write_text("touched")
    kinds = sorted(v.detail for v in watch.changes())
    assert len(kinds) == 2 and "stray.txt" in kinds[1] and OutsideWatch.SENTINEL in kinds[0]


def test_plaintext_and_settings_checks(tmp_path: Path) -> None:
    led = Ledger()
    lin = led.lineage()
    t = led.token("a")
    led.text_written("a", "create", "docs/secret-name.txt", lin, [t], [])
    led.set_key("a", "app", "k1a", "v1")
    store = tmp_path / "relay"
    store.mkdir()
    (store / "blob").write_bytes(b"sealed \x00\x01")
    assert check_plaintext([store], led) == []
    (store / "leak").write_bytes(b"... secret-name.txt ...")
    assert [v.kind for v in check_plaintext([store], led)] == ["plaintext"]
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"k1a": "v1"}')
    bad.write_text("{}")
    vs = check_settings({"a": good, "b": bad}, led)
    assert len(vs) == 1 and vs[0].detail.startswith("b:")


def test_a_line_merged_into_another_is_lost_and_said_to_be_interleaved() -> None:
    led = Ledger()
    lin = led.lineage()
    ta, tb = led.token("a"), led.token("b")  # tok-a-2; and tok-b-3;
    led.text_written("a", "edit", "f.txt", lin, [ta], [])
    led.text_written("b", "edit", "f.txt", lin, [tb], [])
    # what a character-level merge of two concurrent replacements of one line looks like
    tree = {"f.txt": f"# lineage {lin}\nkappa tok-a-b-23;\n".encode()}
    (v,) = check_ledger(tree, led)
    assert v.kind == "lost" and "interleaved" in v.detail
    assert interleaved(ta, tree["f.txt"]) and not interleaved("tok-c-9;", tree["f.txt"])


def test_short_needles_are_not_grepped_for() -> None:
    led = Ledger()
    led.set_key("a", "app", "k4a", "v")  # 3 bytes occur in random ciphertext by chance
    led.set_key("a", "app", "chaos-opt-5-a", "v")
    assert led.needles() == [b"chaos-opt-5-a"]


def test_overwriting_a_file_of_two_merged_lineages_removes_what_it_held() -> None:
    # Chaos soak seed 924441503: b and c each renamed a file onto docs/doc-b-22.txt while
    # partitioned; both are edits of that one file, so it held both texts (headers L17 then L2).
    # b later renamed another file onto it: every line b's disk held was b's user's to remove,
    # not only the first header's lineage. A line of L2 b had not seen must still survive.
    led = Ledger()
    l2, l17 = led.lineage(), led.lineage()
    t2, t17 = led.token("c"), led.token("b")
    unseen = led.token("a")
    led.text_written("c", "create", "src/c.txt", l2, [t2], [])
    led.text_written("b", "create", "docs/b.txt", l17, [t17], [])
    merged = _text(l17, t17) + _text(l2, t2)
    led.overwritten("b", "replace", "docs/x.txt -> docs/b.txt", merged)
    led.text_written("a", "append", "docs/b.txt", l2, [unseen], [])  # concurrent with b's mv
    assert check_ledger({"docs/b.txt": _text("L99")}, led)[0].detail.count("tok-") == 1
    assert unseen in check_ledger({}, led)[0].detail
    assert check_ledger({"docs/b.txt": _text("L99", unseen)}, led) == []


def test_a_whole_longer_token_is_not_an_interleaving() -> None:
    # Seed 924441503's report said tok-c-4; was interleaved: the tree held tok-c-40;.
    assert not interleaved("tok-c-4;", b"kappa iota tok-c-40;\n")
    assert not interleaved("tok-c-13;", b"gamma beta tok-c-103;\n")
    assert interleaved("tok-c-4;", b"kappa tok-ca-b-41;\n")  # a real character merge still is
