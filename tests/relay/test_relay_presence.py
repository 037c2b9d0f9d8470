"""Presence: the relay tells every connection of a space which devices are connected."""

from __future__ import annotations

from relay_helpers import Client, Space, authed


async def test_presence_after_welcome_and_on_changes(relay_url: str) -> None:
    url = relay_url
    space = Space.create(n_members=2)
    a, b = space.members
    pa, pb = a.public.sign_pk, b.public.sign_pk
    ca = await authed(url, space, a)
    await ca.wait_presence({pa})  # right after Welcome: only itself
    cb = await authed(url, space, b)
    await cb.wait_presence({pa, pb})
    await ca.wait_presence({pa, pb})  # a learns that b came
    # A second connection of a device (its blob channel) changes nothing for the others,
    # and gets the current set itself.
    cb2 = await authed(url, space, b)
    await cb2.wait_presence({pa, pb})
    await cb2.close()
    await cb.close()
    await ca.wait_presence({pa})  # b gone (both its connections)


async def test_presence_is_per_space(relay_url: str) -> None:
    url = relay_url
    s1, s2 = Space.create(n_members=1), Space.create(n_members=1)
    c1 = await authed(url, s1, s1.members[0])
    await c1.wait_presence({s1.members[0].public.sign_pk})
    c2: Client = await authed(url, s2, s2.members[0])
    await c2.wait_presence({s2.members[0].public.sign_pk})
    # Only its own space's devices, whatever else connects.
    assert all(set(p.online) == {s1.members[0].public.sign_pk} for p in c1.presences)
