"""A dishonest process for the overlay tests: joins the DHT and publishes a capability
record in the right format but with a wrong signature, bypassing its own validator, then
announces itself under the member-list key so readers come looking. Not part of the package.

usage: python tests/forger.py BOOTSTRAP_ADDR READY_FILE
"""

import json
import os
import sys

import msgpack
import trio
from libp2p.tools.anyio_service import background_trio_service

from p2p_infer.net.dht import Discovery
from p2p_infer.net.host import full_addrs, parse_peer_addr, quiet_libp2p_logging, running_host
from p2p_infer.clock import now_ms
from p2p_infer.identity import Identity
from p2p_infer.proto.records import SIGNING_DOMAIN, all_peers_key, encode_body, make_record, record_key


async def main(bootstrap: str, ready_file: str) -> None:
    quiet_libp2p_logging()
    me, impostor = Identity.generate(), Identity.generate()
    async with running_host(me) as host:
        discovery = Discovery(host, server=True, bootstrap=[parse_peer_addr(bootstrap)])
        async with background_trio_service(discovery.kad):
            await discovery.join()
            record = make_record(me, addrs=full_addrs(host), throughput=1e9, ttl_ms=600_000, issued_at_ms=now_ms())
            body = encode_body(record)
            forged = msgpack.packb([1, body, impostor.sign(SIGNING_DOMAIN + body)], use_bin_type=True)
            key = record_key(me.peer_id).encode()
            discovery.kad.value_store.put(key, forged)  # our own validator would refuse it
            accepted = 0
            for peer in discovery.connected_peers():
                try:
                    with trio.move_on_after(5):
                        accepted += bool(await discovery.kad.value_store._store_at_peer(peer, key, forged))
                except Exception:
                    pass
            await discovery.provide([all_peers_key()])
            tmp = ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"peer_id": me.peer_id, "addrs": full_addrs(host), "stored_remotely": accepted}, f)
            os.replace(tmp, ready_file)  # atomic: the test never reads half a file
            await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
