"""The owner's attested key-release service (`infenclave keyserver`); see `service`."""

from infenclave.keyserver.service import KeyServerConfig, create_app, run_keyserver

__all__ = ["KeyServerConfig", "create_app", "run_keyserver"]
