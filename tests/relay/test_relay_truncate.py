"""Relay log compaction after snapshots: Truncate (admins only), Truncated, and LogTruncated for
a subscriber whose cursor lies below the retained log."""

from __future__ import annotations

from relay_helpers import Space, authed

from qmoi_sync.protocol import frames as F


async def test_truncate_admin_only_and_subscribers_below_are_told(relay_url: str) -> None:
    space = Space.create(n_members=1)
    member = space.members[0]
    admin = await authed(relay_url, space, space.admin)
    for _ in range(5):
        await admin.send(F.Publish(space.envelope(space.admin)))
        await admin.expect(F.Ack)

    m = await authed(relay_url, space, member)
    await m.send(F.Truncate(before_seq=4))
    await m.expect_error("not_admin", fatal=False)

    await admin.send(F.Truncate(before_seq=4))
    assert (await admin.expect(F.Truncated)).before_seq == 4
    # Asking for less than what is already gone changes nothing.
    await admin.send(F.Truncate(before_seq=2))
    assert (await admin.expect(F.Truncated)).before_seq == 4
    # Beyond the head: clamped to head + 1.
    await admin.send(F.Truncate(before_seq=99))
    assert (await admin.expect(F.Truncated)).before_seq == 6

    # Cursor 0 needs seq 1, which is gone: told, nothing delivered.
    await m.send(F.Subscribe(from_seq=0))
    assert (await m.expect(F.LogTruncated)).before_seq == 6
    # Cursor 5 (= covered by the snapshot): the log continues from 6.
    await m.send(F.Subscribe(from_seq=5))
    await m.expect(F.CaughtUp)
    await admin.send(F.Publish(space.envelope(space.admin)))
    await admin.expect(F.Ack)
    delivers, _ = await m.collect_delivers(1)
    assert delivers[0].relay_seq == 6
    await m.close()
    await admin.close()


async def test_truncation_survives_a_relay_restart(relay_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from relay_helpers import url_of

    space = Space.create(n_members=0)
    server = await relay_factory(data_dir=tmp_path / "d")
    admin = await authed(url_of(server), space, space.admin)
    for _ in range(3):
        await admin.send(F.Publish(space.envelope(space.admin)))
        await admin.expect(F.Ack)
    await admin.send(F.Truncate(before_seq=3))
    assert (await admin.expect(F.Truncated)).before_seq == 3
    await admin.close()
    await server.close()
    server2 = await relay_factory(data_dir=tmp_path / "d")
    c = await authed(url_of(server2), space, space.admin)
    await c.send(F.Subscribe(from_seq=1))
    assert (await c.expect(F.LogTruncated)).before_seq == 3
    await c.close()
