"""Key file, key store and rate limiter on their own (no Ray): the exact semantics the stack tests rely on."""
from __future__ import annotations

import json
import os
import stat
import time

import pytest

from serving.api.auth import KeyStore, add_key, hash_key, list_keys, parse_authorization, revoke_key
from serving.api.errors import APIError
from serving.api.ratelimit import RateLimiter


def test_key_file_holds_only_hashes(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice", requests_per_minute=10)
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (record,) = list_keys(path)
    assert (record.name, record.requests_per_minute, record.tokens_per_minute) == ("alice", 10, None)
    with pytest.raises(ValueError, match="already exists"):
        add_key(path, "alice")
    with pytest.raises(ValueError, match="invalid key name"):
        add_key(path, "bad name")
    with pytest.raises(ValueError, match="requests_per_minute"):
        add_key(path, "bob", requests_per_minute=0)
    assert add_key(path, "bob") != key


@pytest.mark.parametrize("header, expected", [
    ("Bearer abc", "abc"), ("bearer   abc ", "abc"), ("abc", "abc"), ("", None), (None, None), ("Bearer ", None),
])
def test_parse_authorization(header, expected):
    assert parse_authorization(header) == expected


def test_store_accepts_raw_and_bearer_and_sees_revocation(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice")
    store = KeyStore(path, reload_interval_s=0.05)
    assert store.authenticate(key).name == "alice"
    assert store.authenticate(f"Bearer {key}").name == "alice"
    for bad in (None, "Bearer", key[:-1], key + "x"):
        with pytest.raises(APIError) as err:
            store.authenticate(bad)
        assert err.value.status == 401
    revoke_key(path, "alice")
    time.sleep(0.1)
    with pytest.raises(APIError, match="invalid or revoked"):
        store.authenticate(key)
    with pytest.raises(ValueError, match="no key named"):
        revoke_key(path, "alice")


def test_store_fails_closed_on_a_broken_file(tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "alice")
    store = KeyStore(path, reload_interval_s=0.0)
    path.write_text(json.dumps({"keys": "oops"}))
    with pytest.raises(APIError):
        store.authenticate(key)
    path.unlink()
    with pytest.raises(APIError):
        store.authenticate(key)


async def test_rate_limits_requests_then_tokens(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "rpm", requests_per_minute=2)
    add_key(path, "tpm", tokens_per_minute=100)
    records = {r.name: r for r in list_keys(path)}
    limiter = RateLimiter("memory://")
    await limiter.reserve(records["rpm"], tokens=10**6)
    await limiter.reserve(records["rpm"], tokens=10**6)
    with pytest.raises(APIError) as err:
        await limiter.reserve(records["rpm"], tokens=1)
    assert err.value.status == 429 and 1 <= err.value.retry_after <= 120
    assert err.value.to_response().headers["retry-after"] == str(err.value.retry_after)

    await limiter.reserve(records["tpm"], tokens=60)
    with pytest.raises(APIError) as err:
        await limiter.reserve(records["tpm"], tokens=60)
    assert err.value.status == 429 and "tokens per minute" in err.value.message
    await limiter.reserve(records["tpm"], tokens=40)
    with pytest.raises(APIError) as err:
        await limiter.reserve(records["tpm"], tokens=101)
    assert err.value.status == 400 and "101 tokens" in err.value.message


async def test_refused_for_tokens_does_not_spend_a_request(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "both", requests_per_minute=2, tokens_per_minute=10)
    (record,) = list_keys(path)
    limiter = RateLimiter()
    await limiter.reserve(record, tokens=10)
    for _ in range(3):
        with pytest.raises(APIError, match="tokens per minute"):
            await limiter.reserve(record, tokens=5)
    # The refused attempts charged nothing: the second request slot is still free (with no tokens).
    await limiter.reserve(record, tokens=0)
    with pytest.raises(APIError, match="requests per minute"):
        await limiter.reserve(record, tokens=0)


async def test_settle_refunds_what_was_not_used(tmp_path):
    path = tmp_path / "keys.json"
    add_key(path, "tpm", tokens_per_minute=100)
    (record,) = list_keys(path)
    limiter = RateLimiter()
    first = await limiter.reserve(record, tokens=100)
    with pytest.raises(APIError, match="tokens per minute"):
        await limiter.reserve(record, tokens=50)
    await limiter.settle(first, 30)           # used 30 of the 100 reserved
    await limiter.settle(first, 0)            # settling twice changes nothing
    second = await limiter.reserve(record, tokens=70)
    with pytest.raises(APIError, match="tokens per minute"):
        await limiter.reserve(record, tokens=1)
    await limiter.settle(second, 0)           # failed before its first token: everything back
    await limiter.reserve(record, tokens=70)


@pytest.mark.parametrize("previous, previous_ttl, current, current_ttl, room, expected", [
    (0, 0.0, 100, 90.0, 100, 0.0),     # fits now
    (0, 0.0, 200, 90.0, 100, 60.0),    # 30 s to the rollover, then half of the 200 must fade: 30 more
    (0, 0.0, 200, 90.0, 0, 90.0),      # nothing may remain: the whole current window must fade
    (120, 30.0, 0, 90.0, 30, 15.0),    # the previous window fades: 120 * (30 - t) / 60 <= 30 at t = 15
    (120, 30.0, 50, 90.0, 100, 5.0),   # 120 * (30 - t) / 60 + 50 <= 100 at t = 5
])
def test_retry_after_is_when_the_cost_fits(previous, previous_ttl, current, current_ttl, room, expected):
    from serving.api.ratelimit import seconds_until_fits

    wait = seconds_until_fits(room, 60.0, previous, previous_ttl, current, current_ttl)
    if expected:
        assert wait == pytest.approx(expected)
    # Whatever the case, at `wait` the weighted count is within `room` and a moment earlier it was not.
    assert _weighted_at(wait, 60.0, previous, previous_ttl, current, current_ttl) <= room + 1e-6
    if wait > 0:
        assert _weighted_at(wait - 0.5, 60.0, previous, previous_ttl, current, current_ttl) > room


def _weighted_at(t, period, previous, previous_ttl, current, current_ttl):
    to_rollover = current_ttl - period
    if t < to_rollover:
        return previous * max(0.0, previous_ttl - t) / period + current
    return current * max(0.0, to_rollover + period - t) / period


async def test_retry_after_tells_the_truth_for_tokens(tmp_path, monkeypatch):
    """200 tokens/minute, 100-token requests: after two, the third fits only once the window slid on."""
    clock = [6000.0]  # the start of a window
    monkeypatch.setattr(time, "time", lambda: clock[0])
    path = tmp_path / "keys.json"
    add_key(path, "tpm", tokens_per_minute=200)
    (record,) = list_keys(path)
    limiter = RateLimiter()
    await limiter.reserve(record, tokens=100)
    clock[0] += 10
    await limiter.reserve(record, tokens=100)
    clock[0] += 5
    with pytest.raises(APIError) as err:
        await limiter.reserve(record, tokens=100)
    retry_after = err.value.retry_after
    # 45 s to the window's end, then 200 must fade to 100: half a period more.
    assert retry_after == 75
    clock[0] += retry_after - 2
    with pytest.raises(APIError):
        await limiter.reserve(record, tokens=100)
    clock[0] += 2
    await limiter.reserve(record, tokens=100)


@pytest.mark.parametrize("entry, fragment", [
    ({"name": "a", "sha256": 12345}, "no valid sha256"),
    ({"name": "a", "sha256": "ab"}, "no valid sha256"),
    ({"sha256": "0" * 64}, "no valid name"),
    ({"name": "a", "sha256": "0" * 64, "tokens_per_minute": "lots"}, "tokens_per_minute"),
    ({"name": "a", "sha256": "0" * 64, "role": "admin"}, "unknown fields"),
    ("just a string", "not an object"),
])
def test_malformed_key_entries_are_a_clear_error_and_fail_closed(tmp_path, caplog, entry, fragment):
    path = tmp_path / "keys.json"
    key = add_key(path, "good")
    data = json.loads(path.read_text())
    data["keys"].append(entry)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=fragment):
        list_keys(path)
    with caplog.at_level("ERROR", logger="serving.api.auth"):
        store = KeyStore(path)
    assert fragment in caplog.text and hash_key(key) not in caplog.text
    with pytest.raises(APIError) as err:  # every key refused (401), not a 500 on each request
        store.authenticate(f"Bearer {key}")
    assert err.value.status == 401


def test_missing_key_file_at_start_is_logged(tmp_path, caplog):
    with caplog.at_level("ERROR", logger="serving.api.auth"):
        store = KeyStore(tmp_path / "nope.json")
        with pytest.raises(APIError):
            store.authenticate("Bearer msk-x")
    assert caplog.text.count("cannot read API key file") == 1
