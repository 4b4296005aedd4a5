"""A parent flow's children: submit one flow run per cell, wait for all of them, and survive
workers that die.

A worker killed with SIGKILL (a lost machine, the OOM killer) leaves its child run PENDING
(claimed, never started) or RUNNING (its process gone) for ever: Prefect itself never
finishes it. The parent therefore watches its children:

- a child PENDING for longer than `stall_seconds`, or RUNNING without a heartbeat
  (`prefect.flow-run.heartbeat` events; the training deployments send one every
  HEARTBEAT_SECONDS, prefect.yaml) for that long, is dead: the parent marks it Crashed and
  submits the cell again, to whichever worker is free, at most `resubmits` times;
- when no worker of the children's pool has been seen for `stall_seconds` while children
  wait, the parent fails with one line saying so (finished cells stay in MLflow: a rerun
  trains only the rest);
- a parent that fails or is stopped cancels the children it leaves waiting, so that no
  worker trains them later for a parent that is gone.

MLflow keeps one run per cell whatever happened: a resubmitted child deletes what the dead
one left (flows/tracked_run.py), and a child declared dead by mistake can no longer finish
its deleted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.deployments import run_deployment
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled, Crashed

from flows.slot_gate import SLOT_WAIT_TAG

PARENT_TAG = "ubo-parent:"  # children carry PARENT_TAG + the parent's flow run id (progress)
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
HEARTBEAT_SECONDS = 30  # prefect.yaml's training deployments send one this often
STALL_SECONDS = 300.0  # default of the flows' `stall_seconds`: 10 heartbeats missed
PAGE = 200  # flow runs read per request (the API's limit)


@dataclass
class Child:
    """One cell of a parent flow: its deployment and parameters, and its current flow run."""

    name: str
    deployment: str
    parameters: dict[str, Any]
    flow_run_id: UUID | None = None
    attempts: list[UUID] = field(default_factory=list)


def submit(child: Child) -> Child:
    """Submit `child` (again) without waiting, as a subflow of the current flow run and
    tagged with its id (how `flows.local` shows progress)."""
    flow_run = run_deployment(
        child.deployment,
        parameters=child.parameters,
        timeout=0,
        as_subflow=True,
        flow_run_name=child.name,
        tags=[f"{PARENT_TAG}{current_flow_run.id}"],
    )
    child.flow_run_id = flow_run.id
    child.attempts.append(flow_run.id)
    return child


def mark_waiting_for_slot(waiting: bool) -> None:
    """Tag the current flow run with SLOT_WAIT_TAG while it waits at its slot's gate, and
    untag it once it has the slot (`slot_gate`'s on_wait). Best effort: a failed call costs
    only the progress line's accuracy, so it is logged, not raised (two API calls each way)."""
    if current_flow_run.id is None:  # not in a flow run: nothing shows its progress
        return
    try:
        with get_client(sync_client=True) as client:
            # update_flow_run replaces the tag list: read it now, not at the run's start.
            run = client.read_flow_run(current_flow_run.id)
            tags = [tag for tag in run.tags if tag != SLOT_WAIT_TAG]
            client.update_flow_run(run.id, tags=[*tags, SLOT_WAIT_TAG] if waiting else tags)
    except Exception as error:  # noqa: BLE001 (the cell trains either way)
        get_run_logger().warning("could not mark the run as waiting for its slot: %s", error)


def _age(state: State, now: datetime) -> float:
    return (now - state.timestamp).total_seconds() if state.timestamp else 0.0


def _has_heartbeat(client: SyncPrefectClient, flow_run_id: UUID, since: datetime) -> bool:
    page = client.read_events(
        EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
        ),
        limit=1,
    )
    return bool(page.events)


def dead_reason(
    state: State, now: datetime, stall_seconds: float, heartbeat: Callable[[datetime], bool]
) -> str | None:
    """Why a child in `state` is dead, or None while it may still finish: PENDING too long
    (its worker claimed it and died), or RUNNING with no heartbeat for `stall_seconds` (its
    process died). `heartbeat(since)` says whether one arrived since then."""
    if state.type == StateType.PENDING and _age(state, now) > stall_seconds:
        return f"pending for {_age(state, now):.0f} s: its worker claimed it and never started it"
    if (
        state.type == StateType.RUNNING
        and _age(state, now) > stall_seconds
        and not heartbeat(now - timedelta(seconds=stall_seconds))
    ):
        return f"no heartbeat for {stall_seconds:.0f} s: its worker or process died"
    return None


def _states(client: SyncPrefectClient, flow_run_ids: list[UUID | None]) -> dict[UUID, State]:
    """The current state of each flow run past SCHEDULED, in pages of 200; a run left out is
    still waiting for a worker (or has no state yet), which needs no look. A request per
    child per poll kept a SQLite server at half a core through a 200-cell study (28 requests
    a second); a page of every open child, most of them scheduled, was still most of what
    the parent cost the server."""
    ids = [flow_run_id for flow_run_id in flow_run_ids if flow_run_id is not None]
    past_scheduled = FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED]))
    states: dict[UUID, State] = {}
    for start in range(0, len(ids), PAGE):
        page = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=ids[start : start + PAGE]), state=past_scheduled
            ),
            limit=PAGE,
        )
        states |= {run.id: run.state for run in page if run.state is not None}
    return states


def read_all_flow_runs(client: SyncPrefectClient, flow_run_filter: FlowRunFilter) -> list[FlowRun]:
    """Every flow run `flow_run_filter` matches, in pages of PAGE: one read stops at the
    API's limit (a study with resubmitted cells has more than 200 children)."""
    runs: list[FlowRun] = []
    while page := client.read_flow_runs(
        flow_run_filter=flow_run_filter, limit=PAGE, offset=len(runs)
    ):
        runs += page
    return runs


def _pool_of(client: SyncPrefectClient, deployment: str) -> str | None:
    return client.read_deployment_by_name(deployment).work_pool_name


def training_slots(deployment: str, recent: float = 60.0) -> int | None:
    """How many runs of `deployment` can train at once: its pool's concurrency limit, else
    the number of its pool's workers heard from in the last `recent` seconds (None: no
    server answer). The report divides the study's run time by it (overhead ratio)."""
    with get_client(sync_client=True) as client:
        pool = _pool_of(client, deployment)
        if pool is None:
            return None
        limit = client.read_work_pool(pool).concurrency_limit
        if limit:
            return int(limit)
        return len(_live_workers(client, pool, datetime.now(UTC), recent)) or None


def _live_workers(client: SyncPrefectClient, pool: str, now: datetime, within: float) -> list:
    """The workers of `pool` heard from in the last `within` seconds."""
    return [
        worker
        for worker in client.read_workers_for_work_pool(pool)
        if worker.last_heartbeat_time is not None
        and (now - worker.last_heartbeat_time).total_seconds() <= within
    ]


def wait_for_children(
    children: list[Child],
    poll_seconds: float,
    stall_seconds: float = STALL_SECONDS,
    resubmits: int = 2,
    log: Callable[[str], None] = print,
) -> list[State]:
    """Poll until every child is in a final state, resubmitting dead ones (above); returns
    each child's final state (of its last attempt), in order."""
    final: dict[int, State] = {}
    no_worker_since: float | None = None
    with get_client(sync_client=True) as client:
        deployments = {child.deployment for child in children}
        pools = {pool for name in deployments if (pool := _pool_of(client, name))}
        while len(final) < len(children):
            now = datetime.now(UTC)
            waiting = False
            states = _states(
                client, [c.flow_run_id for i, c in enumerate(children) if i not in final]
            )
            for index, child in enumerate(children):
                if index in final:
                    continue
                state = states.get(child.flow_run_id)
                if state is None:  # scheduled: waits for a free worker
                    waiting = True
                    continue
                if state.is_final():
                    final[index] = state
                    continue
                waiting |= state.type in (StateType.SCHEDULED, StateType.PENDING)
                reason = dead_reason(
                    state,
                    now,
                    stall_seconds,
                    lambda since, child=child: _has_heartbeat(client, child.flow_run_id, since),
                )
                if reason is None:
                    continue
                client.set_flow_run_state(
                    child.flow_run_id, Crashed(message=f"declared dead: {reason}"), force=True
                )
                if len(child.attempts) > resubmits:
                    log(f"{child.name}: {reason}; given up after {len(child.attempts)} attempts")
                    final[index] = client.read_flow_run(child.flow_run_id).state
                    continue
                log(f"{child.name}: {reason}; submitted again")
                submit(child)
            if (
                waiting
                and pools
                and not any(_live_workers(client, pool, now, stall_seconds) for pool in pools)
            ):
                no_worker_since = no_worker_since or time.monotonic()
                if time.monotonic() - no_worker_since > stall_seconds:
                    raise RuntimeError(
                        f"no worker of work pool(s) {', '.join(sorted(pools))} has been seen "
                        f"for {stall_seconds:.0f} s while {len(children) - len(final)} run(s) "
                        "wait: start a worker (README, Several machines) and run the flow "
                        "again; finished runs are kept"
                    )
            else:
                no_worker_since = None
            if len(final) < len(children):
                time.sleep(poll_seconds)
    return [final[index] for index in range(len(children))]


def cancel_waiting(children: list[Child]) -> int:
    """Cancel the children not yet running (a failed or stopped parent's); returns how many."""
    cancelled = 0
    with get_client(sync_client=True) as client:
        for child in children:
            if child.flow_run_id is None:
                continue
            state = client.read_flow_run(child.flow_run_id).state
            if state is not None and state.type in (StateType.SCHEDULED, StateType.PENDING):
                client.set_flow_run_state(
                    child.flow_run_id, Cancelled(message="its parent flow run ended"), force=True
                )
                cancelled += 1
    return cancelled
