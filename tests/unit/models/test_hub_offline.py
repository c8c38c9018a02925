"""Hub ids fail fast and in one line without a network: offline mode and the cache are
checked first, and the hub is probed once, without retries."""

import logging
import time

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import errors

import mmscope
from mmscope.core.errors import OfflineError, UnknownModelError
from mmscope.models import hub


@pytest.fixture()
def online(monkeypatch):
    """Offline mode off; the probe of the hub is what each test makes it."""
    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    calls = []

    def probe(make_error):
        def fake(url, **kwargs):
            calls.append(kwargs)
            raise make_error()

        monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", fake)
        return calls

    return probe


def test_offline_mode_and_no_cache_fail_at_once(monkeypatch):
    monkeypatch.setattr(hub, "_offline", lambda: True)
    start = time.monotonic()
    with pytest.raises(OfflineError, match="not-cached is not in the local cache and offline"):
        mmscope.load("owner/not-cached")
    assert time.monotonic() - start < 5


def test_the_environment_flag_counts_even_after_import(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub._offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hub._offline()


def test_no_network_is_one_probe_without_retries(online, caplog):
    calls = online(lambda: httpx2.ConnectError("[Errno -2] Name or service not known"))
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    with pytest.raises(OfflineError) as err:
        mmscope.load("owner/model")
    assert time.monotonic() - start < 5
    assert "cannot be reached" in str(err.value) and "ConnectError" in str(err.value)
    assert len(calls) == 1 and calls[0]["retry_on_errors"] is False
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


def test_an_unknown_repository_is_one_line(online):
    url = "https://huggingface.co/owner/nothing/resolve/main/config.json"
    response = httpx2.Response(404, request=httpx2.Request("HEAD", url))
    message = "Repository Not Found.\nMore text."
    online(lambda: errors.RepositoryNotFoundError(message, response=response))
    with pytest.raises(UnknownModelError) as err:
        mmscope.load("owner/nothing")
    assert str(err.value) == "cannot load 'owner/nothing' from the hub: Repository Not Found."


def test_a_malformed_hub_id(monkeypatch):
    monkeypatch.setattr(hub, "_offline", lambda: False)
    with pytest.raises(UnknownModelError, match="is not a hub id"):
        mmscope.load("own er/na me")
