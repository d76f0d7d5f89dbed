"""examples/site.toml documents every key of the config, in its section, and is itself valid."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from config_keys import key_paths

from siteagent.agent.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "site.toml"

# A commented-out key (`# tokens_file = "..."`) or section header (`# [[gpu_nodes]]`):
# an optional key is documented by such a line, in the section it belongs to.
_COMMENTED = re.compile(r"^(\s*)#\s?(\[\[?[\w.]+\]\]?\s*(?:#.*)?|[A-Za-z_]\w*\s*=.*)$")


def uncommented(text: str) -> str:
    """The example with its commented-out keys and headers made active."""
    return "\n".join(_COMMENTED.sub(r"\1\2", line) for line in text.splitlines())


def documented(doc: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Key paths of a parsed document, rows of a list of tables written ``name[]``."""
    for key, value in doc.items():
        if isinstance(value, Mapping):
            yield from documented(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for row in value:
                yield from documented(row, f"{prefix}{key}[].")
        else:
            yield prefix + key


def test_the_example_is_a_valid_config() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.site.cap_w > cfg.site.safety_margin_w
    assert cfg.gpu_nodes, "the example shows a GPU node"


def test_the_example_documents_every_key_of_the_config() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    doc = tomllib.loads(uncommented(text))  # the commented keys must be valid TOML too
    shown = set(documented(doc))
    keys = {path for path, _ in key_paths(Config)}
    missing = sorted(keys - shown)
    assert not missing, f"examples/site.toml does not document: {', '.join(missing)}"
    unknown = sorted(shown - keys)
    assert not unknown, f"examples/site.toml shows keys the config lacks: {', '.join(unknown)}"


def test_the_walk_finds_keys_in_comments_and_in_their_sections() -> None:
    text = '[api]\nport = 1\n# tokens_file = "/t"  # hashed\n\n# [[gpu_nodes]]\n# id = "n"\n'
    assert sorted(documented(tomllib.loads(uncommented(text)))) == [
        "api.port",
        "api.tokens_file",
        "gpu_nodes[].id",
    ]
    assert list(documented(tomllib.loads(text))) == ["api.port"]
