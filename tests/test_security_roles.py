"""Security: keys have roles. On a server with SDXL_ADMIN_KEYS (`guarded`: the first key), a
plain key cannot unload the models, and the fleet view shows it its own row of the queue and its
own errors, never another tenant's; the admin key does both and sees every row."""

from __future__ import annotations

import httpx

from tests.conftest import GUARD_KEYS
from tests.test_jobs import LONG, submit, wait

ADMIN, PLAIN, OTHER = GUARD_KEYS[0], GUARD_KEYS[2], GUARD_KEYS[3]


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_only_an_admin_key_unloads_the_models(guarded):
    for route in ("/v1/system/unload", "/sdapi/v1/unload-checkpoint"):
        refused = httpx.post(f"{guarded.url}{route}", headers=as_key(PLAIN), timeout=300)
        assert refused.status_code == 403 and "SDXL_ADMIN_KEYS" in refused.json()["error"]["message"], route
        assert httpx.post(f"{guarded.url}{route}", headers=as_key(ADMIN), timeout=300).status_code == 200, route


def test_the_fleet_view_shows_a_plain_key_its_own_row_alone(guarded):
    with guarded.parked():
        blocker = submit(guarded, LONG, headers=as_key(OTHER))
        wait(guarded, blocker["id"], headers=as_key(OTHER), until=lambda job: job["status"] == "running")
        mine = submit(guarded, {**LONG, "prompt": "a quick one"}, headers=as_key(PLAIN))
        theirs = submit(guarded, {**LONG, "prompt": "another quick one"}, headers=as_key(OTHER))
        views = {
            key: httpx.get(f"{guarded.url}/v1/system/fleet", headers=as_key(key), timeout=300).json()
            for key in (PLAIN, ADMIN)
        }
        for job, key in ((blocker, OTHER), (mine, PLAIN), (theirs, OTHER)):
            httpx.delete(f"{guarded.url}/v1/jobs/{job['id']}", headers=as_key(key), timeout=300)
    assert len(views[PLAIN]["queue"]["by_key"]) == 1  # its own digest's row alone
    assert len(views[ADMIN]["queue"]["by_key"]) == 2  # every key's
    assert views[PLAIN]["queue"]["length"] == views[ADMIN]["queue"]["length"] == 2  # (the length is the queue's)
