"""The end of a run on several machines: the launcher that hosts the rendezvous store stays until
every node's launcher has left torch's exit barrier (``commands.launch.leave_last``). Without that,
the last launcher into the barrier left it at once, and where it hosted the store, its exit closed
the store under a launcher that had just arrived: a traceback after a run that had finished."""

from __future__ import annotations

import threading

import pytest
from torch.distributed import TCPStore
from torch.distributed.elastic.utils import store as store_util

from finetune.commands import launch

PREFIX = "torchelastic/exit/"
SECONDS = 30  # how long a step below may wait for the other side before the test fails


def test_the_store_host_leaves_after_a_node_that_arrived_before_it_but_waits_after_it():
    """Node 1 checks in to torch's exit barrier first and is paused before its wait; the host (rank
    0) arrives last, so torch's barrier lets it through at once. It must not return (its process
    would exit, closing the store) before node 1 has left too."""
    host = TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    node = TCPStore("127.0.0.1", host.port, 2, is_master=False)
    checked_in, host_through, resume = threading.Event(), threading.Event(), threading.Event()
    node_left = threading.Event()
    order: list[str] = []

    def node_side() -> None:
        last_member = store_util._barrier_nonblocking(node, 2, PREFIX)  # checked in, not yet waiting
        checked_in.set()
        resume.wait(SECONDS)
        node.wait([last_member])  # torch's barrier, from here on
        order.append("node through")  # before its check-out, which the host waits for
        launch.leave_last(node, 1, 2, SECONDS)
        node_left.set()

    def host_side() -> None:
        checked_in.wait(SECONDS)
        store_util.barrier(host, 2, PREFIX, barrier_timeout=SECONDS)  # the last to arrive: through at once
        host_through.set()
        launch.leave_last(host, 0, 2, SECONDS)
        order.append("host left")

    threads = [threading.Thread(target=node_side), threading.Thread(target=host_side)]
    for t in threads:
        t.start()
    assert host_through.wait(SECONDS), "the host never got through torch's barrier"
    resume.set()  # the node goes on to its wait only now, after the host was let through
    for t in threads:
        t.join(SECONDS)
    assert node_left.is_set() and order == ["node through", "host left"]


def test_a_node_that_never_checks_out_keeps_the_host_its_timeout_and_is_one_line(capsys):
    host = TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    launch.leave_last(host, 0, 2, 1)
    err = capsys.readouterr().err
    # The launcher's own line (torch's C++ store may add warnings of its own on the terminal).
    assert err.startswith("launcher: the run has finished here, but not every node's launcher checked out (")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_one_machine_has_nothing_to_wait_for():
    class NoStore:
        def __getattr__(self, name):
            raise AssertionError(f"store.{name} used with one machine")

    launch.leave_last(NoStore(), 0, 1, SECONDS)


def test_the_agent_leaves_last_after_torchs_exit_barrier(monkeypatch: pytest.MonkeyPatch):
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    calls: list[tuple] = []
    monkeypatch.setattr(SimpleElasticAgent, "_exit_barrier", lambda agent: calls.append(("torch's barrier",)))
    monkeypatch.setattr(launch, "leave_last", lambda *args: calls.append(("leave_last", *args)))
    launch.hold_the_store_at_exit()
    launch.hold_the_store_at_exit()  # a second call does not wrap it twice

    class Rendezvous:
        def __init__(self, backend: str):
            self.backend = backend

        def get_backend(self) -> str:
            return self.backend

    class Spec:
        def __init__(self, backend: str):
            self.rdzv_handler = Rendezvous(backend)

    class Group:
        def __init__(self, backend: str):
            self.group_rank, self.group_world_size, self.spec = 1, 3, Spec(backend)

    class Agent:
        def __init__(self, backend: str):
            self._store, self._worker_group, self._exit_barrier_timeout = "store", Group(backend), 300

    SimpleElasticAgent._exit_barrier(Agent("static"))
    assert calls[0] == ("torch's barrier",) and calls[1][:4] == ("leave_last", "store", 1, 3)
    assert 299 < calls[1][4] <= 300  # what torch's barrier left of the timeout
    calls.clear()
    SimpleElasticAgent._exit_barrier(Agent("c10d"))  # any launcher may host c10d's store: torch's barrier alone
    assert calls == [("torch's barrier",)]


def test_a_stop_signal_during_the_check_out_is_the_launchers_to_handle():
    from torch.distributed.elastic.multiprocessing.api import SignalException

    class Signalled:
        timeout = None

        def set_timeout(self, timeout):
            self.timeout = timeout

        def add(self, key, value):
            raise SignalException("SIGTERM", 15)

    with pytest.raises(SignalException):
        launch.leave_last(Signalled(), 0, 2, SECONDS)
