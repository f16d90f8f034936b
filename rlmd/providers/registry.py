"""Building providers from their config.

The API key is read here, once, from the environment variable the config names
(``api_key_env``); it is handed to the provider and lives nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from rlmd.config import ConfigError, ProviderConfig
from rlmd.providers.anthropic import AnthropicProvider
from rlmd.providers.base import Provider
from rlmd.providers.http import HttpProvider
from rlmd.providers.ollama import OllamaProvider
from rlmd.providers.openai import OpenAIProvider

EmbeddedFactory = Callable[[ProviderConfig], Provider]

_KINDS: dict[str, type[HttpProvider]] = {
    "ollama": OllamaProvider,
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}


def read_api_key(cfg: ProviderConfig, env: Mapping[str, str]) -> str | None:
    """The provider's key from ``env[cfg.api_key_env]``; a clear error when it is unset.

    The error names the variable, never a value.
    """
    if cfg.api_key_env is None:
        if cfg.kind == "anthropic":
            raise ConfigError(
                f"provider {cfg.name!r}: kind 'anthropic' needs an API key; set api_key_env "
                "to the name of the environment variable that holds it"
            )
        return None
    key = env.get(cfg.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"provider {cfg.name!r}: environment variable {cfg.api_key_env} is not set "
            "(or empty); export it with the API key before starting rlmd"
        )
    return key


def build_provider(
    cfg: ProviderConfig,
    env: Mapping[str, str],
    *,
    embedded_factory: EmbeddedFactory | None = None,
) -> Provider:
    """A provider for ``cfg``; ``embedded`` providers come from ``embedded_factory``."""
    if cfg.kind == "embedded":
        if embedded_factory is None:
            raise NotImplementedError(
                f"provider {cfg.name!r}: kind 'embedded' is built by the daemon "
                "(pass embedded_factory)"
            )
        return embedded_factory(cfg)
    if cfg.kind == "command":
        from rlmd.providers.command import CommandProvider

        return CommandProvider(cfg, env)
    cls = _KINDS.get(cfg.kind)
    if cls is None:
        raise ConfigError(
            f"provider {cfg.name!r}: unknown kind {cfg.kind!r} "
            f"(expected one of: {', '.join([*_KINDS, 'embedded', 'command'])})"
        )
    key = read_api_key(cfg, env)
    try:
        return cls(cfg, api_key=key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
