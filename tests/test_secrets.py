"""No credential in a URL, repr, log line or error: a password, a token or a query secret.

The commands run as processes against ports where nothing listens (port 1), so that
every failure path that could echo a URL is taken; no server is needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pybondi._redact import redact, scrub
from pybondi.messaging.brokers import check_url, connect
from pybondi.persistence import SQLStore

ROOT = Path(__file__).parent.parent
SECRET = "S3cretXyz"

# A credential in every position a URL may hold one.
URLS = [
    f"postgresql://app:{SECRET}@127.0.0.1:1/bank",  # user info: a password
    f"postgresql://app@127.0.0.1:1/bank?password={SECRET}",  # a query parameter
    f"postgresql://app@127.0.0.1:1/bank?sslmode=require&sslpassword={SECRET}",
    f"nats://{SECRET}@127.0.0.1:1",  # user info without a colon: a NATS token
    f"nats://a:b@127.0.0.1:1,nats://{SECRET}@127.0.0.1:2",  # several servers
    f"redis://127.0.0.1:1/0?password={SECRET}",
    f"redis://:{SECRET}@127.0.0.1:1/0",
    f"amqp://guest:{SECRET}@127.0.0.1:1/",
    f"rediss://user:p@{SECRET}@127.0.0.1:1",  # a raw @ in the password
    f"nats://127.0.0.1:1?auth_token={SECRET}",
]


@pytest.mark.parametrize("url", URLS)
def test_redact_masks_the_secret_and_keeps_the_rest(url: str) -> None:
    masked = redact(url)
    assert SECRET not in masked and "***" in masked
    assert "127.0.0.1:1" in masked
    said = "the server said: {} is wrong"
    secret = f"p@{SECRET}" if url.startswith("rediss://user:p@") else SECRET  # whole
    assert scrub(said.format(secret), url) == said.format("***")


def test_redact_leaves_urls_without_credentials_alone() -> None:
    for url in ("postgresql://db/bank?sslmode=require", "redis://127.0.0.1:6379/0", "a b c"):
        assert redact(url) == url


@pytest.mark.parametrize("url", [url for url in URLS if "://" in url and "postgres" not in url])
def test_broker_reprs_show_no_credential(url: str) -> None:
    assert SECRET not in repr(connect(url))


def test_store_reprs_show_no_credential() -> None:
    for url in URLS[:3]:
        store = SQLStore(url)
        assert SECRET not in repr(store)
        store.dispose()


def test_an_unknown_broker_scheme_is_refused_without_its_credentials() -> None:
    with pytest.raises(ValueError, match="No broker adapter") as refused:
        check_url(f"kafka://app:{SECRET}@127.0.0.1:9092?token={SECRET}")
    assert SECRET not in str(refused.value)


def pybondi(*arguments: str, **environment: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pybondi", *arguments],
        cwd=ROOT,
        env={**os.environ, **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    "arguments",
    [
        # A misspelt driver, an unknown broker scheme, a store that does not answer.
        ["relay", "--store", f"postgresql+psycpg://app:{SECRET}@127.0.0.1:1/db"],
        ["relay", "--store", "sqlite://", "--broker", f"kafka://app:{SECRET}@127.0.0.1:1"],
        ["dead-letters", "list", "--store", f"postgresql://app@127.0.0.1:1/db?password={SECRET}"],
        ["dead-letters", "list", "--store", f"postgresql://app:{SECRET}@127.0.0.1:1/db"],
    ],
)
def test_refusals_show_no_credential(arguments: list[str]) -> None:
    if "--broker" not in arguments and arguments[0] == "relay":
        arguments += ["--broker", "redis://127.0.0.1:1"]
    out, errors = pybondi(*arguments).communicate(timeout=60)
    assert errors and SECRET not in out + errors


def test_a_worker_s_log_shows_no_credential(tmp_path: Path) -> None:
    broker = f"redis://127.0.0.1:1/0?password={SECRET}"
    process = pybondi(
        "worker",
        "tests.worker_app:consumer",
        "--create-tables",
        PYBONDI_STORE_URL=f"sqlite:///{tmp_path / 'worker.db'}",
        PYBONDI_BROKER_URL=broker,  # from the environment: not in the process list
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        while "cannot receive" not in (lines[-1] if lines else ""):
            lines.append(process.stderr.readline())
            assert lines[-1], "the worker exited"
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    log = "".join(lines) + rest
    assert "Worker started" in log and "redis://127.0.0.1:1/0?password=***" in log
    assert SECRET not in log
