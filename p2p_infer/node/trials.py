"""Carries out the trial tasks the client's :class:`~p2p_infer.proto.trial.Admission` plans:
builds each from a synthetic input and the answer the client's own weights give, sends it
exactly like a live hop (``QueryDriver.exchange``: the same request, session, timing and
checks), and reports the outcome. Trials the query must wait for run first; the others run
in the client's background nursery, each after its rng-drawn delay, among the live traffic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import torch
import trio

from ..errors import NoRoute
from ..ml.models import Activation, SplitModel
from ..ml.tensors import encode_optional, encode_tensor
from ..proto.query import HopFailure
from ..proto.trial import Provider, TrialSpec, TrialTask
from .query_driver import QueryDriver

if TYPE_CHECKING:
    from .client import Client

log = structlog.get_logger("p2p_infer.client")


def tokens_of(act: Activation) -> int:
    """The live query's sequence length (0 for models without one)."""
    return int(act.hidden.shape[1]) if act.hidden.dim() == 3 else 0


async def trials_for_query(client: Client, model: SplitModel, act: Activation) -> None:
    """This query's trials: wait for those it cannot route without, start the rest among live traffic."""
    assert client.directory is not None
    providers = [Provider(r.peer_id, s.first, s.last) for r, s in client.directory.shards_of(model.model_id)
                 if client.reputation.trusted(r.peer_id)]
    specs = client.admission.plan(providers, remote_first=client.local_layers, n_layers=len(model.layers),
                                  tokens=tokens_of(act), gate_untried=not routable(client, model),
                                  whole_shards=client.query_plan.check == "zk")
    driver = TrialDriver(client, model, batch=int(act.hidden.shape[0]))  # shaped like the live request, batch too
    async with trio.open_nursery() as nursery:
        for spec in specs:
            if spec.gating:
                nursery.start_soon(driver.run, spec)
    for spec in specs:
        if not spec.gating and client._nursery is not None:
            client._nursery.start_soon(driver.run, spec)


def routable(client: Client, model: SplitModel) -> bool:
    """Whether the peers already admitted cover the model (then new ones need not hold the query up)."""
    try:
        client.plan(model, client.local_layers)
    except NoRoute:
        return False
    return True


class TrialDriver:
    def __init__(self, client: Client, model: SplitModel, batch: int = 1) -> None:
        self.client = client
        self.model = model
        self.batch = batch  # a batched query's trials carry as many synthetic inputs (peers must not tell them apart)
        self.hops = QueryDriver(client, model)

    async def run(self, spec: TrialSpec) -> None:
        await trio.sleep(spec.delay)
        task = await trio.to_thread.run_sync(self.task, spec)  # the client's own compute, off the event loop
        admission = self.client.admission
        [send] = admission.start([task], trio.current_time())
        outcome = await self.hops.exchange(send)
        if isinstance(outcome, HopFailure):
            log.info("trial task failed to run", peer=send.peer_id, reason=outcome.reason)
            self.hops._apply(admission.on_failure(send.request_id, outcome, trio.current_time()))
            return
        self.hops._apply(admission.on_reply(send.request_id, outcome.output, trio.current_time()))
        log.info("trial task", peer=send.peer_id, layers=f"{send.first}-{send.last}", passed=admission.admitted(send.peer_id))

    def task(self, spec: TrialSpec) -> TrialTask:
        """A model-shaped input for layer ``spec.first`` and the answer to it, from the client's weights."""
        acts = [self.model.synthetic_input(spec.tokens, self.client._rng) for _ in range(self.batch)]
        act = acts[0] if self.batch == 1 else Activation(torch.cat([a.hidden for a in acts]),
                                                          None if acts[0].mask is None else torch.cat([a.mask for a in acts]))
        if spec.first > 0:
            act = Activation(self.model.run_layers(act, 0, spec.first - 1), act.mask)
        expected = self.model.run_layers(act, spec.first, spec.last)
        return TrialTask(spec.peer_id, spec.first, spec.last, encode_tensor(act.hidden), encode_tensor(expected),
                         encode_optional(act.mask), spec.session)
