"""The in-process cache of API key -> user (kiln.services.auth.ApiKeyCache)."""

from __future__ import annotations

import time

from kiln.services.auth import ApiKeyCache
from kiln.store.models import User


def test_a_cached_key_expires_and_a_forgotten_one_is_gone() -> None:
    cache = ApiKeyCache(ttl_seconds=0.05)
    user = User(id=1, username="ann")
    cache.put("h1", user, cache.generation)
    assert cache.get("h1") is user
    cache.forget("h1")
    assert cache.get("h1") is None
    cache.put("h1", user, cache.generation)
    time.sleep(0.06)
    assert cache.get("h1") is None


def test_a_lookup_that_began_before_a_deletion_does_not_cache_the_key() -> None:
    cache = ApiKeyCache()
    began = cache.generation  # the request read the key row here ...
    cache.forget("h1")  # ... then the key was deleted
    cache.put("h1", User(id=1, username="ann"), began)
    assert cache.get("h1") is None
