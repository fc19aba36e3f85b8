"""``deepqueue``: the command group, its error handling and the entry point. The commands live
by what they do: ``cli_submit`` (submit, wait), ``cli_runs`` (managing runs), ``cli_outputs``
(reading results back) and ``cli_worker`` (the commands that run worker code)."""

from __future__ import annotations

from typing import Any

import click

from producer import cli_outputs, cli_runs, cli_submit, cli_worker
from producer.cli_options import InputError, settings_help
from producer.errors import DeepQueueError, StorageError, WaitTimeoutError
from producer.exits import EXIT_INTERRUPTED, EXIT_STORAGE, EXIT_TIMEOUT, EXIT_UNREACHABLE, CommandError
from producer.settings import ClientSettings, redact_url


class Group(click.Group):
    """Turn errors a user can act on into one line and an exit code that says which kind."""

    def invoke(self, ctx: click.Context) -> Any:
        from kombu.exceptions import OperationalError
        from pydantic import ValidationError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        # Every message goes through redact_url: a Redis URL in it never shows its password.
        try:
            return super().invoke(ctx)
        except WaitTimeoutError as error:
            raise CommandError(redact_url(str(error)), EXIT_TIMEOUT) from error
        except StorageError as error:
            raise CommandError(storage_message(error), EXIT_STORAGE) from error
        except DeepQueueError as error:
            raise InputError(redact_url(str(error))) from error
        except (RedisConnectionError, RedisTimeoutError, OperationalError) as error:
            raise CommandError(unreachable_message(error), EXIT_UNREACHABLE) from error
        except ValidationError as error:
            if not error.title.endswith("Settings"):  # job errors arrive as InvalidJobError; others are bugs
                raise
            raise InputError(redact_url(settings_message(error))) from error
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def storage_message(error: Exception) -> str:
    """One line: what the run's storage failed on, and the settings to check."""
    reason = " ".join(str(error).split())
    return redact_url(f"storage: {reason} (check DEEPQUEUE_STORAGE, DEEPQUEUE_S3_* or DEEPQUEUE_OUTPUT_DIR)")


def unreachable_message(error: Exception) -> str:
    """One line: what failed, and the two settings (passwords hidden) to check."""
    try:
        settings = ClientSettings()
        where = f" (broker {settings.broker_url}, result backend {settings.result_backend})"
    except ValueError:  # the settings themselves are broken: the error says enough
        where = ""
    reason = " ".join(str(error).split())  # one line, whatever the library put in it
    return redact_url(f"cannot reach Redis ({reason}); check DEEPQUEUE_BROKER_URL and DEEPQUEUE_RESULT_BACKEND{where}")


def settings_message(error: Any) -> str:
    """A pydantic settings error as one line naming each DEEPQUEUE_* variable, value and rule."""
    problems = []
    for item in error.errors():
        name = f"DEEPQUEUE_{str(item['loc'][0]).upper()}" if item["loc"] else "settings"
        got = f", got {item['input']!r}" if item["loc"] and item["type"] != "missing" else ""
        problems.append(f"{name}: {item['msg'].removeprefix('Value error, ')}{got}")
    return "invalid setting: " + "; ".join(problems)


#: Every command, by module; ``deepqueue --help`` lists them by name.
COMMANDS = [
    cli_submit.submit,
    cli_submit.wait,
    cli_runs.status,
    cli_runs.runs,
    cli_runs.run_set,
    cli_runs.cancel,
    cli_runs.resume,
    cli_runs.retry,
    cli_runs.delete,
    cli_runs.prune,
    cli_outputs.results,
    cli_outputs.dead_letters,
    cli_outputs.manifest_command,
    cli_outputs.export_command,
    cli_outputs.audit,
    cli_worker.worker,
    cli_worker.run_embedded,
    cli_worker.make_test_model,
    cli_worker.make_test_lora,
]


@click.group(
    cls=Group,
    commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=settings_help(ClientSettings),
)
@click.version_option(package_name="deepqueue")
def cli() -> None:
    """deepqueue: bulk image generation with warm DeepCache workers.

    Connection settings come from DEEPQUEUE_BROKER_URL and DEEPQUEUE_RESULT_BACKEND; where
    images go (read back by export and audit) from DEEPQUEUE_STORAGE and DEEPQUEUE_S3_*.
    """


def main() -> None:
    cli(prog_name="deepqueue")
