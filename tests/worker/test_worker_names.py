"""Worker names: Celery node names unique across hosts and readable; lease names never shared."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery.bin.worker import Hostname
from celery.utils.nodenames import gethostname

from worker.app import create_app
from worker.cli import _names_node, node_name
from worker.runtime import Runtime
from worker.settings import WorkerSettings


def celery_expands(name: str) -> str:
    """What `celery worker --hostname NAME` makes of it (its own option type)."""
    return Hostname().convert(name, None, None)


@pytest.mark.parametrize(
    ("name", "host", "node"),
    [
        ("gpu0", "node-a", "gpu0@node-a"),
        ("gpu0", "node-b", "gpu0@node-b"),
        ("deepqueue-worker-7f9c-x2ab", "gpu-node-3", "deepqueue-worker-7f9c-x2ab@gpu-node-3"),
        (None, "node-a", "worker@node-a"),
        ("  ", " node-a ", "worker@node-a"),
    ],
)
def test_node_name_is_name_at_host(name: str | None, host: str | None, node: str) -> None:
    assert node_name(name, host) == node
    assert celery_expands(node_name(name, host)) == node


def test_node_name_without_a_host_is_this_machines_hostname() -> None:
    assert node_name("gpu0", None) == node_name("gpu0", "") == "gpu0@%h"
    assert celery_expands(node_name("gpu0", None)) == f"gpu0@{gethostname()}"
    assert celery_expands(node_name(None, None)) == f"worker@{gethostname()}"
    # docker-compose.yml's CPU workers: `--scale worker-cpu=N` gives N containers, N names.
    assert celery_expands(node_name("cpu-%h", "node-a")) == f"cpu-{gethostname()}@node-a"


def test_same_service_on_two_hosts_gets_two_names() -> None:
    assert node_name("gpu0", "node-a") != node_name("gpu0", "node-b")


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ([], False),
        (["--concurrency=1", "--without-gossip"], False),
        (["--hostname", "itest@%h"], True),
        (["--hostname=itest@%h"], True),
        (["-n", "a@b"], True),
        (["-na@b"], True),
        (["--no-color"], False),
    ],
)
def test_a_hostname_given_by_the_user_wins(extra: list[str], names: bool) -> None:
    assert _names_node(extra) is names


def test_two_workers_with_one_node_name_never_share_a_lease() -> None:
    """Two hosts' containers can have the same node name and the same pid: the lease names differ."""
    app = create_app(WorkerSettings(broker_url="redis://127.0.0.1:6379/9"))
    names = set()
    for _ in range(2):
        worker = SimpleNamespace(hostname="gpu0@same-host", app=app)
        Runtime(worker)
        assert worker.deepqueue.leases.name == worker.deepqueue.name
        assert worker.deepqueue.name.startswith("gpu0@same-host:")
        names.add(worker.deepqueue.name)
    assert len(names) == 2
