"""The memory queue's journal folder: private to the server's user, and never one that another
user made first (its default lies in the shared temporary folder)."""

from __future__ import annotations

import stat

import pytest

from backends.sdxl_backend.jobs import JobJournal


def test_the_journal_folder_is_made_private(tmp_path):
    folder = tmp_path / "sdxl-jobs-123"
    JobJournal(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o777)  # (made open since, or left so by an older version)
    JobJournal(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_link_in_its_place_is_refused(tmp_path):
    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    (tmp_path / "sdxl-jobs-123").symlink_to(elsewhere)
    with pytest.raises(RuntimeError, match="not this user's own"):
        JobJournal(tmp_path / "sdxl-jobs-123")
