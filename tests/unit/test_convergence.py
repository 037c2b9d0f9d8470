"""Property (b): replicas with random concurrent operations converge.

Three replicas create / edit (ingest_disk_text) / rename / delete files concurrently and
exchange their updates in random order, with duplicates, through the delivery discipline the
agent uses (each sender's messages numbered; a CausalBuffer per receiver releases them in
per-sender order). After everyone has received everything, all replicas must have identical
index entries, identical layouts and identical texts — and a file that several replicas
created from the same content, and nobody edited, must hold that content exactly once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc

from qmoi_sync.agent.causal import CausalBuffer
from qmoi_sync.agent.index import IndexDoc, derive_file_id
from qmoi_sync.agent.layout import Layout, compute_layout
from qmoi_sync.agent.textdoc import ingest_disk_text, new_text_doc, text_of

KEY = b"convergence-test-key-32-bytes!!!"
PATHS = ["a.txt", "b.txt", "dir/c.md", "a"]
CONTENTS = ["hello\n", "héllo 😀\r\nworld\n", "", "line1\nline2\nline3\n"]
INDEX = "index"


def mutate(text: str, variant: int) -> str:
    """Deterministic edits, so two replicas in the same state sometimes make the same one."""
    lines = text.splitlines(keepends=True)
    if variant == 0:
        return text + "appended line\n"
    if variant == 1 and lines:
        return "FIRST " + text
    if variant == 2 and lines:
        return "".join(lines[:-1])
    if variant == 3:
        mid = len(lines) // 2
        return "".join([*lines[:mid], "中文 e\u0301 👩\u200d💻\n", *lines[mid:]])
    return text.replace("l", "L", 1) if "l" in text else text + "l"


@dataclass
class Replica:
    dev: str
    index: IndexDoc
    texts: dict[str, Doc[Any]] = field(default_factory=dict)
    outbox: list[tuple[str, bytes]] = field(default_factory=list)
    inbox: CausalBuffer = field(default_factory=CausalBuffer)

    def text(self, fid: str) -> Doc[Any]:
        if fid not in self.texts:
            self.texts[fid] = new_text_doc()
        return self.texts[fid]

    def send(self, doc_id: str, update: bytes | None) -> None:
        if update is not None:
            self.outbox.append((doc_id, update))

    def alive(self) -> list[str]:
        return sorted(fid for fid, e in self.index.entries().items() if e.alive)


def deliver(src: Replica, dst: Replica, seq: int) -> None:
    """``dst`` receives message ``seq`` of ``src`` (maybe early, maybe again)."""
    _doc_id, update = src.outbox[seq - 1]
    for rel in dst.inbox.offer(src.dev, seq, update):
        # What is released is message rel.seq of src (possibly held since earlier).
        doc_id, _ = src.outbox[rel.seq - 1]
        if doc_id == INDEX:
            dst.index.apply_update(rel.update)
        else:
            dst.text(doc_id).apply_update(rel.update)


op_st = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 2), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("edit"), st.integers(0, 2), st.integers(0, 9), st.integers(0, 4)),
    st.tuples(st.just("rename"), st.integers(0, 2), st.integers(0, 9), st.integers(0, 3)),
    st.tuples(st.just("delete"), st.integers(0, 2), st.integers(0, 9), st.just(0)),
    st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 8)),
)


def run(ops: list[tuple[str, int, int, int]], rnd: random.Random) -> list[Replica]:
    reps = [
        Replica(dev, IndexDoc(client_id=cid))
        for dev, cid in (("AAAAAAA", 101), ("BBBBBBB", 202), ("CCCCCCC", 303))
    ]
    now = 1_764_000_000.0
    created_content: dict[str, str] = {}
    edited: set[str] = set()
    for kind, r, a, b in ops:
        rep = reps[r]
        now += 1.0
        if kind == "create":
            path, content = PATHS[a], CONTENTS[b]
            fid = derive_file_id(KEY, path, content.encode(), kind="text").hex()
            created_content[fid] = content
            rep.send(INDEX, rep.index.create(fid, path, "text", 0o644, rep.dev, now))
            rep.send(fid, ingest_disk_text(rep.text(fid), content))
            continue
        if kind == "deliver":
            dst = reps[a]
            if dst is rep or not rep.outbox:
                continue
            seqs = rnd.choices(range(1, len(rep.outbox) + 1), k=b)  # random, with repeats
            for seq in seqs:
                deliver(rep, dst, seq)
            continue
        alive = rep.alive()
        if not alive:
            continue
        fid = alive[a % len(alive)]
        if kind == "edit":
            doc = rep.text(fid)
            new = mutate(text_of(doc), b)
            upd = ingest_disk_text(doc, new)
            if upd is not None:
                edited.add(fid)
                rep.send(fid, upd)
                rep.send(INDEX, rep.index.record_edit(fid, rep.dev))
        elif kind == "rename":
            rep.send(INDEX, rep.index.rename(fid, PATHS[b], rep.dev))
        else:
            rep.send(INDEX, rep.index.delete(fid, rep.dev, now))

    # Final anti-entropy: everyone gets everything, shuffled, with duplicates.
    for src in reps:
        for dst in reps:
            if src is dst:
                continue
            seqs = list(range(1, len(src.outbox) + 1))
            seqs += rnd.sample(seqs, k=len(seqs) // 2)
            rnd.shuffle(seqs)
            for seq in seqs:
                deliver(src, dst, seq)

    for dst in reps:
        assert dst.inbox.held_count == 0
    check(reps, created_content, edited)
    return reps


def check(reps: list[Replica], created_content: dict[str, str], edited: set[str]) -> None:
    entries = [r.index.entries() for r in reps]
    assert entries[0] == entries[1] == entries[2]
    layouts: list[Layout] = [compute_layout(e) for e in entries]
    assert layouts[0] == layouts[1] == layouts[2]
    fids = set().union(*(r.texts for r in reps))
    for fid in fids:
        texts = {text_of(r.text(fid)) for r in reps}
        assert len(texts) == 1, (fid, texts)
        if fid not in edited:
            # Created (possibly by several replicas at once) and never edited: no doubling.
            assert texts == {created_content[fid]}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(op_st, max_size=30), st.randoms(use_true_random=False))
def test_property_three_replicas_converge(
    ops: list[tuple[str, int, int, int]], rnd: random.Random
) -> None:
    run(ops, rnd)


def test_everyone_seeds_the_same_existing_folder() -> None:
    # A folder that already exists on all three devices when they join the space.
    ops = [("create", r, p, p) for r in range(3) for p in range(4)]
    reps = run(ops, random.Random(1))
    for r in reps:
        assert len(r.alive()) == 4
        assert compute_layout(r.index.entries()).conflicts == frozenset()


def test_same_path_different_content_gives_one_conflict_copy_everywhere() -> None:
    ops = [("create", 0, 0, 0), ("create", 1, 0, 1), ("create", 2, 0, 3)]
    reps = run(ops, random.Random(2))
    layout = compute_layout(reps[0].index.entries())
    assert len(layout.conflicts) == 2
    assert layout.paths["a.txt"] not in layout.conflicts


def test_identical_git_pull_on_two_replicas_converges_without_doubling() -> None:
    ops = [
        ("create", 0, 0, 3),
        ("deliver", 0, 1, 8),
        ("deliver", 0, 1, 8),
        ("edit", 0, 0, 0),  # both replicas make the same edit from the same state
        ("edit", 1, 0, 0),
    ]
    reps = run(ops, random.Random(3))
    fid = reps[0].alive()[0]
    assert text_of(reps[0].text(fid)).count("appended line") == 1
