"""Schemathesis over /docs.json: every operation, requests generated from the document (its
examples, boundary and invalid values, then random ones), against a served process whose
limits keep generations small. Checked: no server error, every status code and content type
declared, every answer conforming to its declared schema. Run through schemathesis' own CLI,
as a user would run it against a deployment."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.long
def test_every_operation_keeps_the_documents_promises(serve, tmp_path):
    server = serve(
        "fuzzed", {"SDXL_MODELS": "tiny-sdxl", "SDXL_MAX_SIDE": "128", "SDXL_MAX_STEPS": "3", "SDXL_MAX_IMAGES": "2"}
    )
    document = tmp_path / "docs.json"
    document.write_bytes(httpx.get(f"{server.url}/docs.json", timeout=300).content)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            str(document),
            "--url",
            server.url,
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "20",
            "--request-timeout",
            "300",
            "--workers",
            "1",
            "--continue-on-failure",
            "--seed",
            "1",
            "--no-color",
            # No examples replayed from earlier runs, no cache left in the checkout: every run as CI's.
            "--generation-database",
            "none",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-6000:]
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", run.stdout)
    assert selected and selected[1] == selected[2] == selected[3], "every operation is tested"
    cases = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert cases and cases[1] == cases[2] and int(cases[1]) >= 500, cases
    print(f"\nschemathesis: {selected[3]} operations, {cases[1]} cases, 0 failures")
