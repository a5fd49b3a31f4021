"""Builds the dispatcher of each delivery method from the config."""

from __future__ import annotations

from ptdaemon.config import Config
from ptdaemon.dispatch.base import Dispatcher
from ptdaemon.dispatch.custom import CustomDispatcher
from ptdaemon.dispatch.email import EmailDispatcher
from ptdaemon.dispatch.file import FileDispatcher
from ptdaemon.dispatch.http import HttpDispatcher, ResolverFactory
from ptdaemon.models import Method
from ptdaemon.netpolicy import AddressPolicy


def build_dispatchers(
    config: Config, *, resolver: ResolverFactory | None = None
) -> dict[Method, Dispatcher]:
    """One dispatcher per method; `resolver` replaces the system's DNS."""
    limit = config.dispatch.concurrency
    policy = AddressPolicy(config.security.networks())

    def http(method: Method) -> HttpDispatcher:
        return HttpDispatcher(
            method, policy=policy, connector_limit=limit, resolver=resolver
        )

    return {
        Method.HTTP_POST: http(Method.HTTP_POST),
        Method.API: http(Method.API),
        # The operator's own SMTP server is trusted: no address policy.
        Method.EMAIL: EmailDispatcher(
            config.smtp, password=config.smtp_password, ca_path=config.smtp_ca_path
        ),
        Method.FILE: FileDispatcher(
            file_roots=config.file_root_paths, state_dir=config.state_path
        ),
        Method.CUSTOM: CustomDispatcher(),
    }


async def close_dispatchers(dispatchers: dict[Method, Dispatcher]) -> None:
    for dispatcher in {id(d): d for d in dispatchers.values()}.values():
        await dispatcher.close()
