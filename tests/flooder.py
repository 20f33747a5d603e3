"""A flooding client, in its own process: CONCURRENCY streams each sending MiniLM forward
requests of T tokens back to back (a refused request is sent again at once) until killed
or SECONDS pass; prints a JSON count of replies by type/code at the end.

    python tests/flooder.py PEER_ADDR FIRST LAST [CONCURRENCY] [T] [SECONDS] [READY_FILE]
"""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import trio

from p2p_infer.identity import Identity
from p2p_infer.ml.models import load_model
from p2p_infer.ml.tensors import activation_to_wire
from p2p_infer.net.framing import read_message, write_message
from p2p_infer.net.host import dial, open_stream, parse_peer_addr, quiet_libp2p_logging, running_host
from p2p_infer.proto.forward import ForwardRequest
from p2p_infer.proto.wire import FORWARD_PROTOCOL


async def main(addr: str, first: int, last: int, concurrency: int, tokens: int, seconds: float, ready: Path | None) -> None:
    quiet_libp2p_logging()
    model = load_model("minilm-l6")
    act = model.embed(" ".join(["word"] * (tokens - 2)))
    act.hidden = torch.randn(1, act.hidden.shape[1], act.hidden.shape[2])
    wire = ForwardRequest(model.model_id, first, last, *activation_to_wire(act)).to_wire()
    counts: Counter[str] = Counter()
    async with running_host(Identity.generate()) as host:
        info = parse_peer_addr(addr)
        await dial(host, info)

        async def flood() -> None:
            stream = None
            while True:
                try:
                    if stream is None:
                        stream = await open_stream(host, info.peer_id, FORWARD_PROTOCOL)
                    await write_message(stream, wire)
                    reply = await read_message(stream, timeout=30)
                    counts[reply.get("code", reply["type"])] += 1
                except Exception as exc:  # refused and reset: a new stream, at once
                    counts[type(exc).__name__] += 1
                    stream = None
                    await trio.sleep(0)

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(flood)
                if ready is not None:
                    ready.write_text("flooding")
    print(json.dumps(dict(counts)), flush=True)


if __name__ == "__main__":
    # The flooder shares this 2-core box with the peer it floods; in the field its own CPU
    # (Noise, framing: about a core at full rate) would be another machine's. Niced, the
    # test measures what the peer does with the flood, not what the flooder costs the box.
    os.nice(10)
    argv = sys.argv[1:]
    trio.run(main, argv[0], int(argv[1]), int(argv[2]), int(argv[3]) if len(argv) > 3 else 40,
             int(argv[4]) if len(argv) > 4 else 256, float(argv[5]) if len(argv) > 5 else 60.0,
             Path(argv[6]) if len(argv) > 6 else None)
