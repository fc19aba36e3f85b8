"""The kombu and Celery internals deepqueue's worker overrides or calls are still there, with the
parameters it passes.

The transport (``worker.delivery.transport``), the consumer (``worker.delivery.consumer``), the strategy
(``worker.delivery.strategy``) and the leases (``worker.delivery.leases``) reach below the public APIs of kombu and
Celery. pyproject pins both to the minor version tested; this test is what fails, naming the
member, when an upgrade renames or reshapes one of them, before any worker misbehaves.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

#: ``module:Class.member`` (or ``module:function``) -> the parameter names deepqueue relies on, in
#: order, after ``self``; None for an attribute (constant, property) that must exist.
INTERNALS: dict[str, tuple[str, ...] | None] = {
    # worker.delivery.transport.QoS
    "kombu.transport.redis:QoS.append": ("message", "delivery_tag"),
    "kombu.transport.redis:QoS.pipe_or_acquire": ("pipe", "client"),
    "kombu.transport.redis:QoS._remove_from_indices": ("delivery_tag", "pipe"),
    "kombu.transport.redis:QoS.restore_by_tag": ("tag", "client", "leftmost"),
    "kombu.transport.redis:QoS.restore_unacked_once": ("stderr",),
    "kombu.transport.redis:QoS.reject": ("delivery_tag", "requeue"),
    "kombu.transport.redis:QoS.unacked_key": None,
    "kombu.transport.redis:QoS.unacked_index_key": None,
    "kombu.transport.virtual.base:QoS.append": ("message", "delivery_tag"),
    "kombu.transport.virtual.base:QoS.ack": ("delivery_tag",),
    # worker.delivery.transport.Channel
    "kombu.transport.redis:Channel._brpop_start": ("timeout",),
    "kombu.transport.redis:Channel._brpop_read": ("options",),
    "kombu.transport.redis:Channel._flush_brpop_reauth": (),
    "kombu.transport.redis:Channel._q_for_pri": ("queue", "pri"),
    "kombu.transport.redis:Channel._create_client": ("asynchronous",),
    "kombu.transport.redis:Channel._do_restore_message": ("payload", "exchange", "routing_key", "pipe", "leftmost"),
    "kombu.transport.redis:Channel._in_poll": None,
    "kombu.transport.redis:Channel.priority_steps": None,
    "kombu.transport.redis:Channel.brpop_timeout": None,
    "kombu.transport.redis:Channel._queue_cycle": None,
    "kombu.transport.redis:Channel.global_keyprefix": None,
    "kombu.transport.redis:Channel.unacked_key": None,
    "kombu.transport.redis:Channel.unacked_index_key": None,
    "kombu.transport.redis:Channel.unacked_mutex_key": None,
    "kombu.transport.redis:Channel.unacked_mutex_expire": None,
    "kombu.transport.virtual.base:Transport._deliver": ("message", "queue"),
    "kombu.transport.redis:Mutex": ("client", "name", "expire"),
    "kombu.transport.redis:MutexHeld": None,
    "kombu.transport.virtual.base:Message._raw": None,
    # worker.delivery.consumer.GuardedConsumer
    "celery.worker.consumer.consumer:Consumer.ensure_connected": ("conn",),
    "celery.worker.consumer.consumer:Consumer.on_connection_error_after_connected": ("exc",),
    "celery.worker.consumer.consumer:Consumer.on_decode_error": ("message", "exc"),
    "celery.worker.consumer.consumer:Consumer.create_task_handler": ("promise",),
    # worker.delivery.strategy.BatchingStrategy
    "celery.worker.strategy:hybrid_to_proto2": ("message", "body"),
    "celery.worker.strategy:proto1_to_proto2": ("message", "body"),
    "celery.worker.request:create_request_cls": ("base", "task", "pool", "hostname", "eventer"),
    "celery.worker.state:task_ready": ("request", "successful"),
}

#: Instance attributes kombu sets in ``__init__`` that deepqueue reads: ``module:Class.attribute``.
SET_BY_INIT = (
    "kombu.transport.redis:Channel.brpop_timeout",
    "kombu.transport.redis:Channel._queue_cycle",
    "kombu.transport.virtual.base:Message._raw",
)


def resolve(spec: str) -> tuple[Any, str]:
    """``(owner, member name)`` for ``module:Class.member`` or ``module:function``."""
    module_name, _, path = spec.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def set_in_init(cls: type, name: str) -> bool:
    """Whether ``__init__`` of ``cls`` or a base assigns ``self.<name>``."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if inspect.isfunction(init) and f"self.{name} =" in inspect.getsource(init):
            return True
    return False


@pytest.mark.parametrize("spec", sorted(INTERNALS))
def test_internal_member_exists_with_its_parameters(spec: str) -> None:
    owner, name = resolve(spec)
    if spec in SET_BY_INIT:
        assert set_in_init(owner, name), f"{spec} is no longer set in __init__: deepqueue's worker reads it"
        return
    assert hasattr(owner, name), f"{spec} is gone: deepqueue's worker overrides or calls it"
    expected = INTERNALS[spec]
    if expected is None:
        return
    member = inspect.getattr_static(owner, name)
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    parameters = [p for p in inspect.signature(member).parameters if p != "self"]
    assert parameters[: len(expected)] == list(expected), (
        f"{spec} takes {parameters}, deepqueue's worker passes {list(expected)}"
    )


def test_the_set_by_init_check_fails_for_what_is_not_set() -> None:
    """The check above can fail: a name kombu never assigns is not found."""
    owner, _ = resolve("kombu.transport.redis:Channel.x")
    assert not set_in_init(owner, "deepqueue_never_set")


def test_pins_bound_celery_and_kombu_to_the_minor_versions_tested() -> None:
    """The versions running here are the ones pyproject allows, and it allows no other minor."""
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    requirements = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    for name in ("celery", "kombu"):
        installed = Version(importlib.import_module(name).__version__)
        spec = requirements[name].specifier
        assert installed in spec, f"{name} {installed} is outside pyproject's {spec}"
        next_minor = Version(f"{installed.major}.{installed.minor + 1}.0")
        assert next_minor not in spec, f"pyproject allows {name} {next_minor}: pin the minor version tested"


def test_kombu_takes_every_broker_transport_option_the_contract_sets() -> None:
    """kombu's Redis channel copies only the transport options it names: one it stopped taking
    (``unacked_mutex_expire`` among them, without which a SIGKILLed worker's restore mutex
    blocks every other worker's restores for 5 minutes) would be dropped without a word."""
    from kombu.transport.redis import Channel

    from producer.contract import celery_config
    from producer.settings import ClientSettings

    options = celery_config(ClientSettings())["broker_transport_options"]
    assert set(options) <= set(Channel.from_transport_options), set(options) - set(Channel.from_transport_options)
