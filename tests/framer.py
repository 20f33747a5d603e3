"""A dishonest process for the framing test, written from protocols/committee.md: it sits on
no committee and tries to get an honest member VICTIM penalised. Not part of the package.

1. It asks VICTIM for tickets on seeds of tasks it makes up (anyone may), then sends
   ``execute`` for them: k=1 with VICTIM alone, and k=3 padded with keys that solve no
   identity puzzle. An honest member refuses both.
2. It waits for VICTIM's gossiped round of a real query (commit, reveal, candidate set;
   since topic v6 a round carries only the output's hash, so the test hands the framer the
   output itself in OUTPUT_FILE: the strongest framer, one who learned it), then gossips
   wrong-output evidence against VICTIM built from those real signatures:
   a k=1 certificate of one sybil for the real task under a candidate set it signed itself,
   the real candidate set with a sybil "quorum", and a task it made up listing VICTIM.
3. As a control that gossip reaches everyone, it gossips valid equivocation evidence
   against one of its own sybils (on a committee of its own sybils, which is legitimate).

usage: python tests/framer.py BOOTSTRAP_ADDR VICTIM READY_FILE REPORT_FILE OUTPUT_FILE
"""

import json
import os
import sys

import trio
from libp2p.tools.anyio_service import background_trio_service

from p2p_infer.clock import now_ms
from p2p_infer.errors import P2PInferError
from p2p_infer.identity import Identity
from p2p_infer.net.dht import Discovery
from p2p_infer.net.gossip import running_gossip
from p2p_infer.net.host import parse_peer_addr, quiet_libp2p_logging, running_host
from p2p_infer.net.streams import StreamPool
from p2p_infer.proto.auditor import evidence_message
from p2p_infer.proto.committee_codec import ExecuteRequest, TicketRequest, activation_hash, parse_ticket_reply
from p2p_infer.proto.consensus import (
    Candidate,
    CandidateSet,
    Commit,
    Evidence,
    Reveal,
    StageCertificate,
    StageTask,
    commitment,
    make_ticket,
    output_hash,
    read_activation_file,
    request_hash,
    sign_candidates,
    sign_commit,
    sign_reveal,
)
from p2p_infer.proto.sortition import CANDIDATES_DOMAIN, MIN_RECORD_AGE_MS
from p2p_infer.proto.wire import COMMITTEE_PROTOCOL
from p2p_infer.testing.population import draw, provider

HIDDEN = {"dtype": "float32", "shape": [1, 32], "data": bytes(4 * 32)}  # digits-mlp hidden state


def write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)  # atomic: the test never reads half a file


def made_up_task(me: Identity, model: str, first: int, last: int, k: int) -> StageTask:
    now = now_ms()
    req = request_hash(model, output_hash(HIDDEN), b"", os.urandom(32), me.public_key)
    return StageTask(req, 0, 0, model, first, last, activation_hash(HIDDEN, None), k, now, now + 5000, me.public_key)


def signed_by(signer: Identity, task: StageTask, candidates: list[Candidate]) -> CandidateSet:
    """Sign whatever we like: an attacker does not use sign_candidates' own-task check."""
    body = CandidateSet(task, tuple(candidates), b"\0" * 64).body()
    return CandidateSet(task, tuple(candidates), signer.sign(CANDIDATES_DOMAIN + body))


def quorum(signed: CandidateSet, sybils: list, output: dict) -> StageCertificate:
    task, r = signed.task, os.urandom(32)
    commits = [sign_commit(s, task.task_id, signed.id, commitment(task.task_id, output_hash(output), r), task.requested_at_ms + 1) for s in sybils]
    return StageCertificate(signed, commits, [sign_reveal(s, task.task_id, output_hash(output), r) for s in sybils], [output] * len(sybils))


async def try_execute(pool: StreamPool, me: Identity, victim: str, envelope: bytes, shard, lazy: list[Identity]) -> list[str]:
    """Made-up tasks the victim must refuse: k=1, then k=3 padded with puzzle-less keys."""
    refusals = []
    for k, padding in ((1, []), (3, lazy)):
        task = made_up_task(me, shard.model_id, shard.first, shard.last, k)
        reply = await pool.request(victim, COMMITTEE_PROTOCOL, TicketRequest(task.seed, task.model_id, task.first, task.last).to_wire(), timeout=10)
        listed = [Candidate(parse_ticket_reply(reply), envelope)] + [Candidate(make_ticket(i, task.seed), b"") for i in padding]
        try:
            answer = await pool.request(victim, COMMITTEE_PROTOCOL, ExecuteRequest(sign_candidates(me, task, listed), HIDDEN, None).to_wire(), timeout=10)
            refusals.append(f"EXECUTED: {answer.get('type')}")
        except P2PInferError as exc:
            refusals.append(exc.message)
    return refusals


async def framing_evidence(pool: StreamPool, me: Identity, round_msg: dict, output: dict, shard, sybils: list) -> list[Evidence]:
    real = CandidateSet.from_wire(round_msg["candidates"])
    commit, reveal = Commit.from_wire(round_msg["commit"]), Reveal.from_wire(round_msg["reveal"])
    victim = commit.member
    assert output_hash(output) == reveal.output_hash, "the leaked output is not the one the victim revealed"
    other = {**output, "data": bytes(len(output["data"]))}  # "the right answer", says the framer
    records = {s.peer_id: provider(s, shard.model_id, shard.first, shard.last, now_ms() - 600_000).record for s in sybils}
    task = real.task
    own = signed_by(me, task, [Candidate(make_ticket(sybils[0], task.seed), records[sybils[0].peer_id])])
    made_up = made_up_task(me, shard.model_id, shard.first, shard.last, 3)
    victim_record = next(c.record for c in real.candidates if c.ticket.peer_id == victim)
    asked = TicketRequest(made_up.seed, made_up.model_id, made_up.first, made_up.last).to_wire()
    victim_ticket = parse_ticket_reply(await pool.request(victim, COMMITTEE_PROTOCOL, asked, timeout=10))  # anyone may ask
    listed = sign_candidates(me, made_up, [Candidate(victim_ticket, victim_record)]
                             + [Candidate(make_ticket(s, made_up.seed), records[s.peer_id]) for s in sybils[:2]])
    return [
        Evidence("wrong-output", victim, [commit], reveal, output, quorum(own, sybils[:1], other)),
        Evidence("wrong-output", victim, [commit], reveal, output, quorum(real, sybils[:2], other)),
        Evidence("wrong-output", victim, [commit], reveal, output, quorum(listed, sybils[:2], other)),
    ]


def control_evidence(me: Identity, shard, sybils: list) -> Evidence:
    """Valid evidence against our own sybil: proves gossip reaches every auditor."""
    pool = [provider(s, shard.model_id, shard.first, shard.last, now_ms() - 600_000) for s in sybils]
    signed = draw(me, made_up_task(me, shard.model_id, shard.first, shard.last, 3), pool)
    liar = next(s for s in sybils if s.peer_id == signed.members[0])
    task = signed.task
    commits = [sign_commit(liar, task.task_id, signed.id, commitment(task.task_id, os.urandom(32), os.urandom(32)), task.requested_at_ms + 1)
               for _ in range(2)]
    return Evidence("equivocation", liar.peer_id, commits, candidates=signed)


async def main(bootstrap: str, victim: str, ready_file: str, report_file: str, output_file: str) -> None:
    quiet_libp2p_logging()
    me, sybils = Identity.generate(), [Identity.generate() for _ in range(3)]
    lazy = [i for i in (Identity.from_seed(bytes([n]) * 32) for n in range(64)) if not i.solves_puzzle][:2]
    rounds: list[dict] = []

    async def on_gossip(sender: str, message: dict) -> None:
        if message.get("type") == "round" and Commit.from_wire(message.get("commit")).member == victim:
            rounds.append(message)

    async with running_host(me) as host:
        discovery = Discovery(host, server=False, bootstrap=[parse_peer_addr(bootstrap)])
        async with background_trio_service(discovery.kad), running_gossip(host, on_gossip) as gossip:
            await discovery.join()
            with trio.fail_after(60):
                while (record := await discovery.get_record(victim)) is None:
                    await trio.sleep(0.5)
            shard, pool = record.shards[0], StreamPool(host, lambda _peer: list(record.addrs))  # dial it where its record says
            # a record just re-published is refused for its age before any puzzle is looked at: wait as an attacker would
            await trio.sleep(max(0, record.issued_at_ms + MIN_RECORD_AGE_MS + 200 - now_ms()) / 1000)
            refusals = await try_execute(pool, me, victim, record.envelope, shard, lazy)
            write_json(ready_file, {"peer_id": me.peer_id, "refusals": refusals})
            with trio.fail_after(180):
                while not rounds or not os.path.exists(output_file):
                    await trio.sleep(0.2)
            with open(output_file, "rb") as f:
                output, _ = read_activation_file(f.read())
            evidence = await framing_evidence(pool, me, rounds[0], output, shard, sybils) + [control_evidence(me, shard, sybils)]
            for item in evidence:
                await gossip.publish(evidence_message(item))
            write_json(report_file, {"peer_id": me.peer_id, "refusals": refusals, "published": len(evidence),
                                     "control": evidence[-1].member})
            await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:6])
