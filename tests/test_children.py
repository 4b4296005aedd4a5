"""flows/children.py: how a parent flow tells a dead child from a slow one, submits it again,
and gives up loudly when no worker is left (issue 14, fault 1). A fake Prefect client plays
the server, so every timing is exact; tests/test_flows.py kills a real worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import State, StateType

from flows import children
from flows.children import Child, dead_reason, wait_for_children

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def state(kind: StateType, seconds_ago: float) -> State:
    return State(type=kind, timestamp=NOW - timedelta(seconds=seconds_ago))


@pytest.mark.parametrize(
    ("kind", "age", "beating", "dead"),
    [
        (StateType.SCHEDULED, 10_000, False, False),  # waits for a free worker: not dead
        (StateType.PENDING, 299, False, False),
        (StateType.PENDING, 301, False, True),  # claimed by a worker that died
        (StateType.RUNNING, 301, True, False),  # long, but its process beats
        (StateType.RUNNING, 299, False, False),  # too young to judge
        (StateType.RUNNING, 301, False, True),  # its process died
    ],
)
def test_dead_is_pending_or_silent_for_longer_than_the_stall(kind, age, beating, dead):
    asked = []

    def heartbeat(since):
        asked.append(since)
        return beating

    reason = dead_reason(state(kind, age), NOW, 300.0, heartbeat)
    assert (reason is not None) == dead
    if kind == StateType.RUNNING and age > 300:
        assert asked == [NOW - timedelta(seconds=300)]  # heartbeats of the last stall only


class FakeServer:
    """The few client calls wait_for_children makes; `script[flow_run_id]` is the list of
    states a run goes through, one per poll (the last one stays)."""

    def __init__(self, workers_seen_ago: float | None = 1.0) -> None:
        self.script: dict = {}
        self.polls: dict = {}
        self.forced: dict = {}
        self.workers_seen_ago = workers_seen_ago
        self.clock = NOW
        self.requests = 0  # read_flow_runs calls
        self.rows = 0  # flow runs those calls returned

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_deployment_by_name(self, name):
        return SimpleNamespace(work_pool_name="ubo-cpu")

    def read_workers_for_work_pool(self, pool):
        if self.workers_seen_ago is None:
            return []
        seen = self.clock - timedelta(seconds=self.workers_seen_ago)
        return [SimpleNamespace(last_heartbeat_time=seen)]

    def read_flow_run(self, flow_run_id):
        if flow_run_id in self.forced:
            return SimpleNamespace(state=self.forced[flow_run_id])
        steps = self.script[flow_run_id]
        index = min(self.polls.get(flow_run_id, 0), len(steps) - 1)
        self.polls[flow_run_id] = self.polls.get(flow_run_id, 0) + 1
        return SimpleNamespace(state=steps[index])

    def read_flow_runs(self, flow_run_filter, limit):
        """The server's filter: these ids, without the state types `not_any_` names."""
        ids = flow_run_filter.id.any_
        assert len(ids) <= limit
        left_out = flow_run_filter.state.type.not_any_ if flow_run_filter.state else []
        self.requests += 1
        runs = [SimpleNamespace(id=i, state=self.read_flow_run(i).state) for i in ids]
        runs = [run for run in runs if run.state.type not in left_out]
        self.rows += len(runs)
        return runs

    def set_flow_run_state(self, flow_run_id, new_state, force=False):
        assert force
        self.forced[flow_run_id] = new_state

    def read_events(self, filter, limit):
        return SimpleNamespace(events=[])  # nothing beats: a RUNNING child is silent


@pytest.fixture
def server(monkeypatch):
    fake = FakeServer()
    monkeypatch.setattr(children, "get_client", lambda sync_client: fake)
    monkeypatch.setattr(children.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(children, "datetime", SimpleNamespace(now=lambda tz: fake.clock))
    return fake


def test_a_dead_child_is_crashed_and_submitted_again(server, monkeypatch):
    first, second = uuid4(), uuid4()
    server.script[first] = [state(StateType.RUNNING, 400)]  # silent for 400 s: dead
    server.script[second] = [state(StateType.RUNNING, 0), State(type=StateType.COMPLETED)]
    fresh = iter([second])

    def submit(child):
        child.flow_run_id = next(fresh)
        child.attempts.append(child.flow_run_id)
        return child

    monkeypatch.setattr(children, "submit", submit)
    child = Child("coat/umf/seed0", "ubo-train/cpu", {}, first, [first])
    lines = []
    (final,) = wait_for_children([child], 0.0, 300.0, resubmits=2, log=lines.append)
    assert final.is_completed() and child.attempts == [first, second]
    assert server.forced[first].type == StateType.CRASHED
    assert "declared dead: no heartbeat for 300 s" in server.forced[first].message
    assert lines == [
        "coat/umf/seed0: no heartbeat for 300 s: its worker or process died; submitted again"
    ]


def test_a_child_that_keeps_dying_is_given_up_after_its_resubmits(server, monkeypatch):
    runs = [uuid4() for _ in range(3)]
    for run in runs:
        server.script[run] = [state(StateType.PENDING, 400)]
    fresh = iter(runs[1:])

    def submit(child):
        child.flow_run_id = next(fresh)
        child.attempts.append(child.flow_run_id)
        return child

    monkeypatch.setattr(children, "submit", submit)
    child = Child("coat/ubo/seed1", "ubo-train/cpu", {}, runs[0], [runs[0]])
    (final,) = wait_for_children([child], 0.0, 300.0, resubmits=2, log=lambda _: None)
    assert final.type == StateType.CRASHED and child.attempts == runs  # 1 + 2 resubmits


def test_no_live_worker_fails_the_parent_after_the_stall_naming_the_pool(server, monkeypatch):
    run = uuid4()
    server.script[run] = [state(StateType.SCHEDULED, 0)]
    server.workers_seen_ago = 10_000.0  # the pool's last worker died long ago
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(children.time, "monotonic", lambda: float(next(clock)))
    child = Child("coat/umf/seed0", "ubo-train/cpu", {}, run, [run])
    with pytest.raises(RuntimeError, match=r"no worker of work pool\(s\) ubo-cpu has been seen"):
        wait_for_children([child], 0.0, 300.0)


def test_waiting_children_with_a_live_worker_are_left_to_wait(server, monkeypatch):
    run = uuid4()
    server.script[run] = [state(StateType.SCHEDULED, 0)] * 50 + [State(type=StateType.COMPLETED)]
    clock = iter(range(0, 100_000, 100))
    monkeypatch.setattr(children.time, "monotonic", lambda: float(next(clock)))
    child = Child("coat/umf/seed0", "ubo-train/cpu", {}, run, [run])
    (final,) = wait_for_children([child], 0.0, 300.0)
    assert final.is_completed()


def test_a_poll_reads_the_states_of_all_children_in_pages_not_one_request_each(server):
    """A request per child per poll kept the SQLite server at half a core through a 200-cell
    study; now one request per 200 children per poll."""
    runs = [uuid4() for _ in range(450)]
    for run in runs:
        server.script[run] = [state(StateType.RUNNING, 0), State(type=StateType.COMPLETED)]
    cells = [Child(f"cell{i}", "ubo-train/cpu", {}, r, [r]) for i, r in enumerate(runs)]
    finals = wait_for_children(cells, 0.0, 300.0)
    assert all(final.is_completed() for final in finals)
    assert server.requests == 2 * 3  # two polls (running, then completed), 3 pages of <= 200


def test_a_poll_reads_only_the_children_past_scheduled(server, monkeypatch):
    """Scheduled children need no look (they wait for a worker): a poll transfers the few
    running ones, not the study's 140 waiting ones, and still knows that some wait."""
    waiting = [uuid4() for _ in range(140)]
    running = [uuid4() for _ in range(2)]
    for run in waiting:
        server.script[run] = [state(StateType.SCHEDULED, 0)] * 3 + [State(type=StateType.COMPLETED)]
    for run in running:
        server.script[run] = [state(StateType.RUNNING, 0)] + [State(type=StateType.COMPLETED)]
    server.workers_seen_ago = 10_000.0  # no live worker while children wait: counted below
    stalls = []
    clock = iter(range(0, 10_000, 1))
    monkeypatch.setattr(children.time, "monotonic", lambda: stalls.append(1) or float(next(clock)))
    cells = [
        Child(f"cell{i}", "ubo-train/cpu", {}, r, [r]) for i, r in enumerate(waiting + running)
    ]
    finals = wait_for_children(cells, 0.0, 300.0)
    assert all(final.is_completed() for final in finals)
    assert server.rows == 2 + 2 + 140  # running twice, then every child once, completed
    assert stalls  # the waiting children were seen as waiting (the no-worker watch ran)
