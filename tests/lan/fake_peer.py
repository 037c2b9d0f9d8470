"""A hostile LAN peer for the spoofing test (run inside a test namespace).

It advertises `_qmoi-sync._tcp.local.` twice:

* on --forged-port with a random (forged) tag: members must not even connect;
* on --replay-port with a real member's current tag, copied from that member's own
  advertisement, behind a key that is NOT in the membership: it answers the challenge with a
  *valid* signature (it is given the space id, which is no secret: it is in every envelope
  header), so only the membership check stands between it and the data.

It also dials the member it copied the tag from, as a client with that non-member key, and
completes the handshake as far as it is let; with --chunk-id it then asks for that chunk of a
binary file of the space right away (without waiting for a welcome), as a member would.

Every connection and every frame it receives is written to --out as JSON lines; the test then
checks that nothing beyond the first handshake message ever arrived (no envelope, no state
request/vector, no log, no welcome, no chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from typing import Any

import ifaddr
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from qmoi_sync.protocol import lan as L
from qmoi_sync.protocol.errors import ProtocolError
from qmoi_sync.protocol.identity import DeviceIdentity

IDENTITY = DeviceIdentity.generate()


class Recorder:
    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, **event: Any) -> None:
        event["t"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")


def frame_name(data: bytes | str) -> str:
    if isinstance(data, str):
        return "text"
    try:
        return type(L.decode_peer_frame(data)).__name__
    except ProtocolError:
        return f"undecodable:{len(data)}"


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--space-id", required=True)
    p.add_argument("--forged-port", type=int, default=47801)
    p.add_argument("--replay-port", type=int, default=47802)
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--chunk-id", default="", help="hex id of a chunk to ask the member for")
    args = p.parse_args()
    record = Recorder(args.out)
    space_id = bytes.fromhex(args.space_id)
    my_ip = next(
        ip.ip
        for a in ifaddr.get_adapters()
        for ip in a.ips
        if ip.is_IPv4 and isinstance(ip.ip, str) and ip.ip.startswith("10.213.1.")
    )

    def server_for(port: int) -> Any:
        async def handler(ws: ServerConnection) -> None:
            record(event="connected", port=port, peer=str(ws.remote_address[0]))
            try:
                async for data in ws:
                    name = frame_name(data)
                    record(event="frame", port=port, frame=name, size=len(data))
                    if name == "PeerHello":
                        assert isinstance(data, bytes)
                        hello = L.decode_peer_frame(data)
                        assert isinstance(hello, L.PeerHello)
                        nonce = os.urandom(32)
                        me = IDENTITY.public.sign_pk
                        sig = IDENTITY.sign(
                            L.server_auth_message(
                                space_id, hello.tag, hello.client_nonce, nonce, me
                            )
                        )
                        await ws.send(L.encode_peer_frame(L.PeerChallenge(me, nonce, sig)))
            except Exception as exc:  # recorded, never fatal
                record(event="closed", port=port, why=repr(exc))
            else:
                record(event="closed", port=port, why="clean")

        return handler

    servers = [
        await serve(server_for(args.forged_port), "0.0.0.0", args.forged_port, compression=None),
        await serve(server_for(args.replay_port), "0.0.0.0", args.replay_port, compression=None),
    ]
    azc = AsyncZeroconf(interfaces=[my_ip], ip_version=IPVersion.V4Only)

    async def advertise(tag: bytes, port: int) -> None:
        name = f"{os.urandom(10).hex()}.{L.SERVICE_TYPE}"
        info = AsyncServiceInfo(
            L.SERVICE_TYPE,
            name,
            port=port,
            properties=L.space_txt(tag),
            server=f"{os.urandom(8).hex()}.local.",
            addresses=[socket.inet_aton(my_ip)],
        )
        await azc.async_register_service(info, cooperating_responders=True)
        record(event="advertised", port=port, tag=tag.hex())

    await advertise(os.urandom(16), args.forged_port)
    copied: asyncio.Future[tuple[bytes, str, int]] = asyncio.get_running_loop().create_future()

    pending: set[asyncio.Future[None]] = set()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: Any) -> None:
        if state_change is ServiceStateChange.Removed or copied.done():
            return

        async def resolve() -> None:
            info = AsyncServiceInfo(service_type, name)
            if not await info.async_request(zeroconf, 3000):
                return
            try:
                advert = L.parse_txt(info.properties or {})
            except ProtocolError:
                return
            addrs = info.parsed_addresses(IPVersion.V4Only)
            if advert.kind == "space" and addrs and addrs[0] != my_ip and not copied.done():
                assert info.port is not None
                copied.set_result((advert.tag, addrs[0], info.port))

        pending.add(asyncio.ensure_future(resolve()))

    browser = AsyncServiceBrowser(azc.zeroconf, [L.SERVICE_TYPE], handlers=[on_change])
    tag, member_ip, member_port = await asyncio.wait_for(copied, 10)
    record(event="copied", tag=tag.hex(), member=f"{member_ip}:{member_port}")
    await advertise(tag, args.replay_port)

    # As a client: knock on the member's door with the copied tag and a non-member key.
    try:
        async with connect(f"ws://{member_ip}:{member_port}/", compression=None) as ws:
            nonce = os.urandom(32)
            await ws.send(L.encode_peer_frame(L.PeerHello(tag=tag, client_nonce=nonce)))
            data = await asyncio.wait_for(ws.recv(), 5)
            record(event="client_frame", frame=frame_name(data))
            challenge = L.decode_peer_frame(data) if isinstance(data, bytes) else None
            if isinstance(challenge, L.PeerChallenge):
                me = IDENTITY.public.sign_pk
                sig = IDENTITY.sign(
                    L.client_auth_message(
                        space_id, tag, nonce, challenge.server_nonce, challenge.sign_pk, me
                    )
                )
                await ws.send(L.encode_peer_frame(L.PeerAuth(sign_pk=me, signature=sig)))
                if args.chunk_id:
                    cid = bytes.fromhex(args.chunk_id)
                    for epoch in range(3):  # the first epochs of a space: whichever is current
                        await ws.send(L.encode_peer_frame(L.ChunkGet(epoch=epoch, chunk_id=cid)))
                    record(event="chunk_asked", chunk=args.chunk_id)
                async for more in ws:
                    record(event="client_frame", frame=frame_name(more))
    except Exception as exc:
        record(event="client_closed", why=repr(exc))
    await asyncio.sleep(args.duration)
    await browser.async_cancel()
    await azc.async_close()
    for s in servers:
        s.close()
    record(event="done")


if __name__ == "__main__":
    asyncio.run(main())
