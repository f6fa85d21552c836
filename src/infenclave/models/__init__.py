"""Models: zoo names and user specs, resolved into `LoadedModel`."""

from infenclave.models.spec import LoadedModel, load_model
from infenclave.models.zoo import DEFAULT_MODEL, ZOO

__all__ = ["DEFAULT_MODEL", "ZOO", "LoadedModel", "load_model"]
