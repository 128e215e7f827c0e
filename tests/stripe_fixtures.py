"""Real Stripe payloads from tests/fixtures/stripe, and the events tests derive from them.

Every file is read verbatim and checked against the sha256 its INDEX.json records, so a test can
only start from the real payload. Whatever a test changes goes through `derive`, which records
each change: a derived event says so (`derived`, `changes`), and its `str()` names the source
file and the changes, so a failing test shows exactly what was adapted.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

# Copied verbatim into the repository, with their provenance and licences (README.md there).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "stripe"

JsonObject = dict[str, Any]


@cache
def _checksums() -> dict[str, str]:
    entries = json.loads((FIXTURES / "INDEX.json").read_text(encoding="utf-8"))
    return {str(entry["file"]): str(entry["sha256"]) for entry in entries}


def load(name: str) -> JsonObject:
    """The fixture file `name` (relative to the fixtures directory), verified against INDEX.json."""
    raw = (FIXTURES / name).read_bytes()
    expected = _checksums().get(name)
    if expected is None:
        raise KeyError(f"{name} is not listed in {FIXTURES / 'INDEX.json'}")
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{name} differs from the copy INDEX.json records ({actual} != {expected})"
        )
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise TypeError(f"{name} is not a JSON object")
    return data


def fixture_names(folder: str, *, envelopes_only: bool = False) -> list[str]:
    """Fixture files of one folder, sorted; with `envelopes_only`, just the full events. Never
    empty: a missing or emptied folder would otherwise drop its test cases without a word."""
    names = sorted(f"{folder}/{path.name}" for path in (FIXTURES / folder).glob("*.json"))
    if envelopes_only:
        names = [name for name in names if load(name).get("object") == "event"]
    if not names:
        raise FileNotFoundError(
            f"no {'envelopes' if envelopes_only else 'fixtures'} in {FIXTURES / folder}"
        )
    return names


@dataclass(frozen=True)
class StripeEvent:
    """An event payload, the fixture it comes from, and every change a test made to it."""

    payload: JsonObject
    source: str
    changes: tuple[str, ...] = ()

    @property
    def derived(self) -> bool:
        return bool(self.changes)

    @property
    def id(self) -> str:
        return str(self.payload["id"])

    @property
    def object(self) -> JsonObject:
        obj = self.payload["data"]["object"]
        assert isinstance(obj, dict)
        return obj

    def __str__(self) -> str:
        if not self.derived:
            return f"{self.source} (verbatim)"
        return f"{self.source} (derived: {'; '.join(self.changes)})"


def fixture_event(name: str, event_type: str | None = None) -> StripeEvent:
    """The fixture as an event. A full envelope is used as it is; an `event.data`-only file or a
    bare object gets an envelope (id, type, created), which counts as a change."""
    data = load(name)
    if data.get("object") == "event":
        return StripeEvent(data, name)
    if event_type is None:
        raise ValueError(f"{name} is not a full event: say which event type it should become")
    inner = data if isinstance(data.get("object"), dict) else {"object": data}
    stem = "".join(ch if ch.isalnum() else "_" for ch in Path(name).stem)
    payload: JsonObject = {
        "id": f"evt_fixture_{stem}",
        "object": "event",
        "api_version": None,
        "created": int(inner["object"].get("created") or 1_700_000_000),
        "livemode": False,
        "type": event_type,
        "data": inner,
    }
    return StripeEvent(payload, name, (f"envelope added (type {event_type})",))


def merge(base: Any, patch: Any) -> Any:
    """Deep merge: objects merge key by key; anything else in `patch` replaces what is in `base`."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(patch)


def _set_path(target: JsonObject, path: str, value: Any) -> None:
    node: Any = target
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def derive(
    event: StripeEvent,
    *,
    event_id: str | None = None,
    event_type: str | None = None,
    created: int | None = None,
    patch: JsonObject | None = None,
    paths: dict[str, Any] | None = None,
) -> StripeEvent:
    """A copy of `event` with a new id, type or created, `patch` deep-merged into data.object and
    `paths` (dotted, list indices as numbers, relative to data.object) set; each change recorded."""
    payload = copy.deepcopy(event.payload)
    changes = list(event.changes)
    if event_id is not None:
        payload["id"] = event_id
        changes.append(f"id={event_id}")
    if event_type is not None:
        payload["type"] = event_type
        changes.append(f"type={event_type}")
    if created is not None:
        payload["created"] = created
        changes.append(f"created={created}")
    if patch:
        payload["data"]["object"] = merge(payload["data"]["object"], patch)
        changes.append(f"data.object merged with {json.dumps(patch, sort_keys=True)}")
    for path, value in (paths or {}).items():
        _set_path(payload["data"]["object"], path, value)
        changes.append(f"data.object.{path}={json.dumps(value)}")
    return StripeEvent(payload, event.source, tuple(changes))


# pay-rails' real account.updated envelope (Stripe Connect), which account_updated derives from.
ACCOUNT_UPDATED = "pay-rails-stripe/account.updated.json"
_account_events = itertools.count(1)


def account_updated(
    account_id: str,
    *,
    charges: bool,
    payouts: bool,
    created: int,
    submitted: bool = True,
    requirements: JsonObject | None = None,
) -> StripeEvent:
    """pay-rails' real account.updated envelope, for this connected account and state;
    `requirements` is merged into the fixture's requirements object (currently_due, ...)."""
    paths: dict[str, Any] = {
        "id": account_id,
        "charges_enabled": charges,
        "payouts_enabled": payouts,
        "details_submitted": submitted,
    }
    for key, value in (requirements or {}).items():
        paths[f"requirements.{key}"] = value
    event = derive(
        fixture_event(ACCOUNT_UPDATED),
        event_id=f"evt_acct_{next(_account_events)}",
        created=created,
        paths=paths,
    )
    event.payload["account"] = account_id  # the Connect endpoint's field: whose event it is
    return StripeEvent(event.payload, event.source, (*event.changes, f"account={account_id}"))
