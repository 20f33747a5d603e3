"""The member's trio handler and the test adversaries that wrap it, with no network: the
requests go straight to ``handle`` and the gossip into a list."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from p2p_infer.errors import ConfigError, NotSelected, ProtocolViolation
from p2p_infer.identity import Identity
from p2p_infer.ml.tensors import encode_tensor
from p2p_infer.net.framing import remote_peer
from p2p_infer.proto.auditor import Auditor
from p2p_infer.proto.committee_codec import ExecuteRequest, TicketRequest, activation_hash, parse_result_reply, round_message
from p2p_infer.proto.consensus import CandidateSet, Commit, Reveal, StageTask, output_hash, outputs_agree, request_hash
from p2p_infer.clock import now_ms
from p2p_infer.proto.reputation import Reputation
from p2p_infer.testing.adversaries import TEST_FAULTS, install
from p2p_infer.testing.population import draw, identities, provider

MODEL = "cd" * 32
HIDDEN = encode_tensor(torch.ones(1, 8))
CLIENT = identities(1)[0]


@pytest.fixture(autouse=True)
def from_the_client():
    """Requests arrive on a stream from the task's client (the handler reads the remote peer)."""
    token = remote_peer.set(CLIENT.peer_id)
    yield
    remote_peer.reset(token)


@dataclass
class FakeModel:
    def check_activation(self, act, max_batch: int = 32) -> None:
        assert act.hidden.shape == (1, 8) and max_batch >= 1


class FakeShards:
    max_batch = 32  # ShardServer's batch limit, which committee members pass to check_activation

    def serving(self, model_id: str, first: int, last: int) -> FakeModel:
        return FakeModel()


async def double(model, first, last, act):
    return act.hidden * 2


def member_for(fault: str, slot: int = 0, later=None):
    published: list[dict] = []
    behaviour = install(fault, identities(3, offset=1)[slot], double, published.append, later)
    behaviour.member.shards = FakeShards()
    return behaviour, published


def execute(deadline_in_ms: int = 2000) -> dict:
    """A task for the three pool identities after the client: k=3, so all three are members."""
    now = now_ms()
    task = StageTask(request_hash(MODEL, output_hash(HIDDEN), b"", b"n" * 32, CLIENT.public_key), 0, 0, MODEL, 1, 1,
                     activation_hash(HIDDEN, None), 3, now, now + deadline_in_ms, CLIENT.public_key)
    pool = [provider(i, MODEL, 1, 1, now - 10_000) for i in identities(3, offset=1)]
    return ExecuteRequest(draw(CLIENT, task, pool), HIDDEN, None).to_wire()


async def commit_and_reveal(member, message: dict) -> tuple[Commit, Reveal, dict]:
    answer = parse_result_reply(await member.handle(message))
    return answer.commit, answer.reveal, answer.output


async def test_an_honest_member_answers_once_in_one_reply_and_gossips_after_the_deadline():
    held: list[tuple[int, object]] = []
    behaviour, published = member_for("", later=lambda at, thunk: held.append((at, thunk)))
    ticket = await behaviour.member.handle(TicketRequest(b"s" * 32, MODEL, 1, 1).to_wire())
    assert ticket["type"] == "ticket"
    message = execute()
    first = await behaviour.member.handle(message)
    assert first["type"] == "result" and await behaviour.member.handle(message) == first  # one answer per task
    answer = parse_result_reply(first)
    assert answer.reveal.opens(answer.commit)
    assert outputs_agree(answer.output, encode_tensor(torch.ones(1, 8) * 2))
    candidates = CandidateSet.from_wire(message["candidates"])
    assert published == [] and [at for at, _ in held] == [candidates.task.commit_deadline_ms + 1]  # held past the deadline
    held[0][1]()
    assert published == [round_message(candidates, answer.commit, answer.reveal)]
    with pytest.raises(ProtocolViolation, match="unknown message type"):
        await behaviour.member.handle({"type": "reveal", "task_id": answer.commit.task_id})  # no reveal request in 3.0.0


async def test_a_replayed_execute_gets_no_output_from_anyone_but_the_tasks_client():
    """Fellow members hold the candidate set: replaying the client's execute (even with no
    hidden state) must not hand them the kept answer, so nobody can copy an output."""
    behaviour, _ = member_for("")
    message = execute()
    first = await behaviour.member.handle(message)
    fellow = identities(3, offset=1)[1].peer_id
    token = remote_peer.set(fellow)
    try:
        for replay in (message, {**message, "hidden": None}):
            with pytest.raises(NotSelected, match=f"not {fellow}'s"):
                await behaviour.member.handle(replay)
    finally:
        remote_peer.reset(token)
    assert await behaviour.member.handle(message) == first  # the client's own repeat: the same answer


async def test_wrong_output_commits_to_and_reveals_a_wrong_output():
    behaviour, _ = member_for("wrong-output")
    commit, reveal, output = await commit_and_reveal(behaviour.member, execute())
    assert reveal.opens(commit) and not outputs_agree(output, encode_tensor(torch.ones(1, 8) * 2))


async def test_no_reveal_withholds_and_publishes_nothing():
    behaviour, published = member_for("no-reveal")
    answer = parse_result_reply(await behaviour.member.handle(execute()))
    assert answer.reveal is None and answer.output is None
    assert published == []


async def test_late_commit_signs_after_the_deadline():
    behaviour, _ = member_for("late-commit")
    message = execute(deadline_in_ms=1000)  # room for the draw and the checks on a loaded box
    commit = parse_result_reply(await behaviour.member.handle(message)).commit
    assert commit.committed_at_ms > CandidateSet.from_wire(message["candidates"]).task.commit_deadline_ms


async def test_the_copier_finds_nothing_to_copy_before_the_deadline_and_answers_zeros():
    held: list = []
    honest, gossip = member_for("", later=lambda at, thunk: held.append(thunk))
    copier, _ = member_for("copy", slot=1)
    message = execute(deadline_in_ms=300)
    await commit_and_reveal(honest.member, message)
    assert gossip == []  # the honest round is held until the deadline: nothing to copy in time
    commit, reveal, output = await commit_and_reveal(copier.member, message)
    assert reveal.opens(commit) and not outputs_agree(output, encode_tensor(torch.ones(1, 8) * 2))
    held[0]()
    assert "output" not in gossip[0]  # topic v6: a round names its output's hash only: nothing to copy, even late
    again, _ = member_for("copy", slot=2)
    again.member.on_gossip(gossip[0])
    assert not outputs_agree((await commit_and_reveal(again.member, message))[2], encode_tensor(torch.ones(1, 8) * 2))


async def test_the_equivocator_gossips_another_commitment_than_the_client_got():
    behaviour, published = member_for("equivocate")
    told_client, _, _ = await commit_and_reveal(behaviour.member, execute())
    gossiped = Commit.from_wire(published[0]["commit"])
    assert gossiped.task_id == told_client.task_id and gossiped.commitment != told_client.commitment
    candidates = CandidateSet.from_wire(published[0]["candidates"])
    auditor = Auditor(Reputation())
    auditor.on_commit(told_client, candidates)
    assert [e.kind for e in auditor.on_commit(gossiped, candidates)] == ["equivocation"]


def test_lie_after_trial_is_honest_once_then_lies():
    behaviour, _ = member_for("lie-after-trial")
    hidden = torch.zeros(1, 4)
    assert torch.equal(behaviour.forward_output(hidden), hidden)
    assert torch.equal(behaviour.forward_output(hidden), hidden + 0.5)
    assert torch.equal(member_for("")[0].forward_output(hidden), hidden)


def test_unknown_faults_are_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown --test-fault 'bogus'; known: " + ", ".join(TEST_FAULTS)):
        install("bogus", Identity.generate(), double, lambda _m: None)


async def test_claims_fast_advertises_1e9_is_slow_and_lies_after_each_clients_first_request():
    from p2p_infer.net.framing import remote_peer

    behaviour, _ = member_for("claims-fast")
    assert behaviour.advertise(250.0) == 1e9
    hidden = torch.zeros(1, 4)
    for client in ("c1", "c2"):  # honest once per client: it passes every new client's first-contact trial
        remote_peer.set(client)
        assert torch.equal(behaviour.forward_output(hidden), hidden)
        assert torch.equal(behaviour.forward_output(hidden), hidden + 0.5)
    import trio

    started = trio.current_time()
    await behaviour.pace()
    assert trio.current_time() - started >= 0.05
    honest, _ = member_for("")
    assert honest.advertise(250.0) == 250.0


async def test_the_link_delay_holds_every_reply_and_error_without_cpu(autojump_clock):
    import random

    import trio

    from p2p_infer.errors import NotServed
    from p2p_infer.testing import link_delay

    async def echo(message: dict) -> dict:
        if message.get("fail"):
            raise NotServed("no layers")
        return {"type": "echo"}

    assert link_delay(echo, 0, 0) is echo  # off: the handler itself
    delayed = link_delay(echo, 40, 20, random.Random(1))
    for message in ({}, {"fail": True}):
        started = trio.current_time()
        try:
            assert await delayed(message) == {"type": "echo"}
        except NotServed:
            assert message  # the error, held like a reply
        assert 0.040 <= trio.current_time() - started <= 0.060
