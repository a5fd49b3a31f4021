"""Builds the dispatcher of each delivery method from the config."""

from __future__ import annotations

from ptdaemon.config import Config
from ptdaemon.dispatch.base import Dispatcher
from ptdaemon.dispatch.custom import CustomDispatcher
from ptdaemon.dispatch.email import EmailDispatcher
from ptdaemon.dispatch.file import FileDispatcher
from ptdaemon.dispatch.http import HttpDispatcher
from ptdaemon.models import Method


def build_dispatchers(config: Config) -> dict[Method, Dispatcher]:
    limit = config.dispatch.concurrency
    return {
        Method.HTTP_POST: HttpDispatcher(Method.HTTP_POST, connector_limit=limit),
        Method.API: HttpDispatcher(Method.API, connector_limit=limit),
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
