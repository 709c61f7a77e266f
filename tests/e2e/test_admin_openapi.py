"""The admin API against its own OpenAPI document: schemathesis (positive and negative data)
against a real `cardcore serve` process finds no server error and no answer that breaks the
document (status codes, content types, headers, response schemas)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cardcore.db import make_engine
from cardcore.org.service import OrgService
from cardcore.records import Records
from tests.e2e.pos_support import CardcoreServer

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)
# 10 keeps `make test` under its time budget (about 80 s here; 25 took 200 s, and over 300 s
# on a loaded machine); a deeper run: CARDCORE_TEST_SCHEMATHESIS_EXAMPLES=100 pytest tests/e2e/...
EXAMPLES_PER_OPERATION = int(os.environ.get("CARDCORE_TEST_SCHEMATHESIS_EXAMPLES", "10"))
RUN_S_MAX = 540


async def _bootstrap(db_url: str) -> str:
    engine = make_engine(db_url)
    try:
        minted = await OrgService(Records(engine)).bootstrap_admin("root", 3600)
    finally:
        await engine.dispose()
    return str(minted["token"])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
    db_url: str, tmp_path: Path
) -> None:
    token = asyncio.run(_bootstrap(db_url))
    server = CardcoreServer(db_url, tmp_path)
    server.vault["admin token"] = token
    server.start()
    try:
        # Revoking a token may revoke the run's own: that operation goes last, alone.
        done = _schemathesis(server.url, token, tmp_path, "--exclude-name", REVOKE)
        last = _schemathesis(server.url, token, tmp_path, "--include-name", REVOKE)
    finally:
        server.stop()
    for run in (done, last):
        report = run.stdout[-20_000:] + run.stderr[-5_000:]
        assert run.returncode == 0, report
        # Warnings (operations that mostly met 404 or validation) are not failures.
        assert re.search(r"\d+ generated, \d+ passed", report), report
        assert "failures" not in report.rpartition("SUMMARY")[2].lower(), report


REVOKE = "DELETE /v1/tokens/{token_id}"


def _schemathesis(
    url: str, token: str, workdir: Path, *selection: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{url}/v1/openapi.json",
            *selection,
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--mode",
            "all",
            "--max-examples",
            str(EXAMPLES_PER_OPERATION),
            "--generation-deterministic",
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "20",
            "--header",
            f"Authorization: Bearer {token}",
            "--continue-on-failure",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_S_MAX,
        check=False,
        cwd=workdir,
    )
